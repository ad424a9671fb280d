"""`moesafe report`: the numbers behind each figure on hand-built rows (worked out by hand), and
the page of real runs: a local root holding a complete run and a run with a failed unit, the
same root in S3 (the loopback server), --compare, and the page opened in headless Chromium."""
from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import markupsafe
import pytest

from core import report as numbers
from core.report import Rate
from core.store import ResultStore
from jobs.cli import EXIT_BAD_INPUT, main
from jobs.report import SECTIONS, write_report

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


# ---- intervals -------------------------------------------------------------------------------

def test_wilson_interval_matches_the_formula_worked_by_hand():
    # 5/10: centre (0.5 + 1.92/10) / 1.384 = 0.5, half 1.96 * sqrt(0.025 + 0.0096) / 1.384 = 0.2634
    low, high = numbers.wilson_interval(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    # 0/3: the interval starts at 0 and reaches 2 * 0.6403 / 2.2805 = 0.5615 (a point estimate of 0 is not certainty)
    assert numbers.wilson_interval(0, 3) == pytest.approx((0.0, 0.5615), abs=1e-4)
    assert numbers.wilson_interval(3, 3) == pytest.approx((0.4385, 1.0), abs=1e-4)
    assert all(math.isnan(x) for x in numbers.wilson_interval(0, 0))
    with pytest.raises(ValueError, match="0 <= k <= n"):
        numbers.wilson_interval(4, 3)


def test_metric_rate_recovers_the_count_and_refuses_non_shares():
    assert numbers.metric_rate(2 / 3, 3) == Rate(2, 3)
    assert numbers.metric_rate(0.95, 66) == Rate(63, 66)
    assert numbers.metric_rate(float("nan"), 0) is None and numbers.metric_rate(8.6, 66) is None


def test_mean_interval_is_mean_plus_minus_two_standard_errors():
    m = numbers.mean_interval([1.0, 2.0, 3.0])  # sd 1, se 1/sqrt(3)
    assert (m.mean, m.n) == (2.0, 3)
    assert (m.low, m.high) == pytest.approx((2 - 1.959964 / 3 ** 0.5, 2 + 1.959964 / 3 ** 0.5))
    single = numbers.mean_interval([4.0])
    assert single.mean == 4.0 and math.isnan(single.low)


# ---- judges, overview ------------------------------------------------------------------------

MANIFEST = """
models:
  - {name: m1, path: org/m1, revision: abc123}
  - {name: m2, path: /models/m2}
methods:
  - {method: fsour, dataset: harmful, judge: sr}
  - {method: safex, dataset: null, datasets: {regular: harmful, jailbreak: jb}, judge: refusal}
  - {method: rosais, dataset: adv, judges: [llm, refusal]}
"""


def _run(run_id="r1", manifest=MANIFEST, **extra):
    return {"run_id": run_id, "manifest": manifest, "status": "finished", "started_at": T0,
            "ended_at": T0 + timedelta(seconds=90), "versions": '{"moesafe": "0.1.0"}', **extra}


def _metric(metric, value, n, method="fsour", dataset="harmful", run_id="r1", model="m1", **extra):
    return {"run_id": run_id, "model": model, "method": method, "dataset": dataset, "metric": metric,
            "value": value, "n": n, **extra}


def test_a_metric_row_takes_its_judge_column_else_the_manifest_judge_of_its_method():
    judges = numbers.run_judges([_run()])
    rows = numbers.judged_metrics([
        _metric("asr", 1.0, 4),                                    # before the judge column: the manifest's
        _metric("asr", 0.5, 4, judge="llm"),                       # after it: the column
        _metric("refusal_after", 0.25, 4, method="safex", dataset="jb"),
        _metric("asr_at_L1", 0.5, 2, method="rosais", dataset="adv"),  # a judges list: its first
        _metric("asr", 0.5, 2, method="newmethod"),                # a method the manifest does not name
    ], judges)
    assert [(r["method"], r["judge"]) for r in rows] == [
        ("fsour", "llm"), ("fsour", "sr"), ("newmethod", "judge"), ("rosais", "llm"), ("safex", "refusal")]
    assert rows[1]["rate"] == Rate(4, 4)


def test_asr_table_pairs_each_methods_headline_with_its_baseline_per_judge():
    judged = numbers.judged_metrics([
        _metric("asr", 0.75, 4, judge="a"), _metric("asr_baseline", 0.0, 4, judge="a"),
        _metric("asr", 0.5, 4, judge="b"), _metric("asr_baseline", 0.25, 4, judge="b"),
        *[_metric(f"asr_at_L{L}", v, 4, method="rosais", dataset="adv") for L, v in ((0, 0.0), (1, 0.5), (2, 0.75))],
        _metric("refusal_before", 1.0, 4, method="safex", dataset="jb"),
    ], numbers.run_judges([_run()]))
    table = numbers.asr_table(judged)
    summary = [(r["method"], r["judge"], r["attacked"] and r["attacked"]["metric"], r["baseline"]["metric"],
                r["attacked"] and r["attacked"]["rate"]) for r in table]
    assert summary == [("fsour", "a", "asr", "asr_baseline", Rate(3, 4)),
                       ("fsour", "b", "asr", "asr_baseline", Rate(2, 4)),
                       ("rosais", "llm", "asr_at_L2", "asr_at_L0", Rate(3, 4)),
                       ("safex", "refusal", None, "refusal_before", None)]


def test_a_runs_time_is_its_attempts_without_the_gaps_between_them():
    def attempt(start, end):
        return {"started_at": T0 + timedelta(seconds=start), "ended_at": end and T0 + timedelta(seconds=end),
                "status": "finished", "host": "h", "pid": 1}

    resumed = _run(ended_at=T0 + timedelta(hours=5), attempts=[attempt(0, 60), attempt(5 * 3600 - 30, 5 * 3600)])
    running = _run("r2", ended_at=None, attempts=[attempt(0, 60), attempt(100, None)])
    before_attempts = _run("r3")  # a runs row of schema version 1: ended_at - started_at
    seconds = {r["run_id"]: r["seconds"] for r in numbers.run_summaries([resumed, running, before_attempts])}
    assert seconds == {"r1": 90, "r2": None, "r3": 90}


def test_models_show_the_revision_of_the_manifest_or_of_a_revision_column():
    models = numbers.model_summaries([_run()], [_metric("asr", 1.0, 1, model="m2", revision="r-from-column")])
    assert [(m["model"], m["path"], m["revision"]) for m in models] == [
        ("m1", "org/m1", "abc123"), ("m2", "/models/m2", "r-from-column")]


def _unit(unit_id, status="ok", attempts=1, seconds=10.0, end=20, model="m1", **extra):
    return {"run_id": "r1", "model": model, "unit_id": unit_id, "method": "fsour", "kind": "fsour_search",
            "status": status, "attempts": attempts, "seconds": seconds, "error": None,
            "finished_at": T0 + timedelta(seconds=end), **extra}


def test_unit_health_counts_ok_failed_retried_reused_and_the_wall_time():
    units = [_unit("a", end=20, seconds=10), _unit("b", attempts=2, end=35, seconds=5),
             _unit("c", status="failed", attempts=3, end=60, seconds=1.5, error="IndexError: boom"),
             _unit("d", status="reused", end=12, seconds=0), _unit("e", reused=True, end=13, seconds=0),
             _unit("f", model="m2", end=100, seconds=4)]
    health = numbers.unit_health(units)
    assert [(h["model"], h["units"], h["ok"], h["failed"], h["retried"], h["reused"]) for h in health] == [
        ("m1", 5, 2, 1, 2, 2), ("m2", 1, 1, 0, 0, 0)]
    # m1: first start 20 - 10 = 10 s, last end 60 s; unit time 10 + 5 + 1.5
    assert health[0]["wall_seconds"] == 50 and health[0]["unit_seconds"] == 16.5
    assert [u["unit_id"] for u in numbers.failed_units(units)] == ["c"]


# ---- RoSais, SAFEx, F-SOUR, SteerMoE ---------------------------------------------------------

def _score(prompt, layer, score, model="m1"):
    return {"run_id": "r1", "model": model, "dataset": "adv", "prompt_id": prompt, "layer": layer, "score": score}


def test_rosais_layer_means_intervals_ranks_and_asr_by_L():
    rows = [_score("p1", 0, 1.0), _score("p2", 0, 3.0), _score("p1", 1, 4.0), _score("p2", 1, 4.0),
            _score("p1", 2, 0.5), _score("p2", 2, 0.5)]
    [(key, layers)] = numbers.rosais_layer_scores(rows).items()
    assert key == ("r1", "m1", "adv")
    assert [(r["layer"], r["rank"], r["score"].mean) for r in layers] == [(0, 1, 2.0), (1, 0, 4.0), (2, 2, 0.5)]
    # layer 0: sd sqrt(2), se 1
    assert (layers[0]["score"].low, layers[0]["score"].high) == pytest.approx((2 - 1.959964, 2 + 1.959964))
    judged = numbers.judged_metrics([_metric(f"asr_at_L{L}", v, 4, method="rosais", dataset="adv")
                                     for L, v in ((2, 0.75), (0, 0.0), (10, 1.0), (1, 0.25))],
                                    numbers.run_judges([_run()]))
    assert numbers.asr_by_L(judged) == {("r1", "m1", "adv", "llm"): [(0, Rate(0, 4)), (1, Rate(1, 4)),
                                                                     (2, Rate(3, 4)), (10, Rate(4, 4))]}


def _rounds(group, first, rounds, cells):
    return [{"run_id": "r1", "model": "m1", "group": group, "first_round": first, "rounds": rounds, "layer": l,
             "expert": e, "selected_rounds": n} for (l, e), n in cells.items()]


def test_safex_selection_frequency_sums_chunks_of_rounds():
    rows = (_rounds("regular", 0, 5, {(0, 1): 5, (1, 2): 3}) + _rounds("regular", 5, 5, {(0, 1): 3, (1, 0): 2})
            + _rounds("jailbreak", 0, 4, {(0, 1): 4}))
    matrices = numbers.safex_selection(rows, {("r1", "m1"): (2, 3)})[("r1", "m1")]
    assert [(m.group, m.rounds) for m in matrices] == [("jailbreak", 4), ("regular", 10)]
    assert matrices[1].frequency == [[0.0, 0.8, 0.0], [0.2, 0.0, 0.3]]
    assert matrices[0].frequency == [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]


def _counts(prompt, counts, tokens, group="benign", rounds=20):
    params = {"rounds": rounds, "alpha": 0.05, "per_layer": True, "seed": 42}
    return {"run_id": "r1", "model": "m1", "prompt_id": prompt, "group": group, "tokens": tokens, "n_layers": 2,
            "n_experts": 4, "counts": counts, "params": json.dumps(params)}


def test_benign_frequency_is_the_runs_own_bootstrap_over_its_counts():
    # Top-N = max(1, floor(0.05 * 4)) = 1 per layer. Layer 0: expert 2 leads in every prompt, so
    # every round picks it. Layer 1: expert 3 leads in p1 (9 vs 1), expert 0 in p2 (2 vs 0):
    # a round picks expert 3 unless it resampled p2 only, 0.5 ** 2 of rounds on average.
    rows = [_counts("p1", [0, 1, 5, 0, 1, 0, 0, 9], 10), _counts("p2", [0, 0, 4, 1, 2, 0, 0, 0], 5),
            _counts("p3", [1] * 8, 8, group="regular")]
    matrix = numbers.bootstrap_frequency(rows, "benign")[("r1", "m1")]
    assert matrix.group == "benign" and matrix.rounds == 20
    assert matrix.frequency[0] == [0.0, 0.0, 1.0, 0.0]
    assert matrix.frequency[1][1:3] == [0.0, 0.0]
    assert matrix.frequency[1][0] + matrix.frequency[1][3] == 1.0 and 0 < matrix.frequency[1][0] < 0.6


def test_safex_sets_and_refusal_before_after_and_each_random_draw():
    experts = [{"run_id": "r1", "model": "m1", "expert_set": s, "layer": l, "expert": e}
               for s, l, e in (("HCDG", 1, 6), ("HCDG", 0, 2), ("HRCG", 2, 7))]
    assert numbers.safex_sets(experts) == {("r1", "m1"): {"HCDG": [(0, 2), (1, 6)], "HRCG": [(2, 7)]}}

    def row(condition, refused, n_disabled=1):
        return {"run_id": "r1", "model": "m1", "group": "regular", "judge": "refusal", "condition": condition,
                "refused": refused, "n_disabled": n_disabled}

    rows = ([row("before", r, 0) for r in (True, True, True, False)] + [row("after", r) for r in (True, False, None)]
            + [row("random=1", True)] + [row("random", r) for r in (True, True)])
    [(key, conditions)] = numbers.safex_refusal(rows).items()
    assert key == ("r1", "m1", "regular", "refusal")
    assert [(c["condition"], c["refusal"], c["n_disabled"]) for c in conditions] == [
        ("before", Rate(3, 4), 0), ("after", Rate(1, 2), 1), ("random", Rate(2, 2), 1), ("random=1", Rate(1, 1), 1)]


def _route(prompt, restart, jailbroken, score, steps=(), prompt_tokens=6, forwards=0, candidates=0):
    return {"run_id": "r1", "model": "m1", "dataset": "d", "prompt_id": prompt, "restart": restart,
            "jailbroken": jailbroken, "score": score, "forwards": forwards, "candidates": candidates,
            "prompt_tokens": None if restart < 0 else prompt_tokens,
            "route": [{"layer": l, "token": t, "experts": [0, 1]} for l, t in steps]}


ROUTES = [
    # a: jailbroken at restart 0, its route changed layers 0 and 1 at token 4 of 6 (1 from the end)
    _route("a", -1, False, 0.0), _route("a", 0, True, 1.0, [(0, 4), (1, 4)], forwards=10, candidates=40),
    # b: never jailbroken; the higher-scoring restart 1 is reported: layer 2 at token 3 (2 from the end)
    _route("b", -1, False, 0.0), _route("b", 0, False, 0.2, [(0, 5)], forwards=12, candidates=48),
    _route("b", 1, False, 0.5, [(2, 3)], forwards=8, candidates=32),
    # c: jailbroken unattacked, no search
    _route("c", -1, True, 1.0),
]


def test_fsour_route_changes_count_prompts_by_position_from_the_end_and_layer():
    changes = numbers.fsour_route_changes(ROUTES, {("r1", "m1"): 4})[("r1", "m1")]
    assert changes.from_end and changes.prompts == 3
    assert changes.counts == [[0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]]
    # rows written before fsour_routes v2 have no prompt length: positions count from the start
    old = numbers.fsour_route_changes([{**r, "prompt_tokens": None} for r in ROUTES])[("r1", "m1")]
    assert not old.from_end and old.counts[3] == [0, 0, 1] and old.counts[4] == [1, 1, 0]


def test_fsour_cost_per_prompt_and_asr_by_restart():
    cost = numbers.fsour_cost(ROUTES)[("r1", "m1")]
    assert [(c["prompt"], c["forwards"], c["candidates"], c["restarts"]) for c in cost] == [
        ("d/a", 10, 40, 1), ("d/b", 20, 80, 2), ("d/c", 0, 0, 0)]
    assert numbers.fsour_asr_by_restart(ROUTES)[("r1", "m1")] == [(-1, Rate(1, 3)), (0, Rate(2, 3)), (1, Rate(2, 3))]


def _steer(layer, expert, delta, rank, top_n=2, unit_id="steer_rank-1"):
    return {"run_id": "r1", "model": "m1", "unit_id": unit_id, "dataset": "d", "layer": layer, "expert": expert,
            "p1": 0.5 + delta / 2, "p2": 0.5 - delta / 2, "delta": delta, "rank": rank,
            "params": json.dumps({"top_n": top_n})}


STEER_UNITS = [_unit("steer_rank-1", method="steermoe"), _unit("steer_rank-2", method="universal_route")]


def test_steer_top_experts_are_the_ones_the_run_steered_and_the_map_puts_each_view_on_its_layer():
    # the universal route's own ranking of the same dataset (unit steer_rank-2) is not SteerMoE's
    theirs = [_steer(2, 0, 0.9, 0, unit_id="steer_rank-2"), _steer(2, 1, 0.8, 1, unit_id="steer_rank-2")]
    top = numbers.steer_top_experts([_steer(0, 3, 0.1, 2), _steer(1, 5, -0.4, 0), _steer(0, 1, 0.3, 1), *theirs],
                                    STEER_UNITS)
    assert [(r["layer"], r["expert"]) for r in top[("r1", "m1", "d")]] == [(1, 5), (0, 1)]
    assert len(numbers.steer_top_experts([_steer(0, 3, 0.1, 2), _steer(1, 5, -0.4, 0)], STEER_UNITS,
                                         top=5)[("r1", "m1", "d")]) == 2

    [(_, layers)] = numbers.rosais_layer_scores([_score("p", 0, 1.0), _score("p", 2, 3.0)]).items()
    changes = numbers.fsour_route_changes(ROUTES, {("r1", "m1"): 3})[("r1", "m1")]
    rows = numbers.safety_map(3, layers, changes, {"HCDG": [(0, 2)], "HRCG": [(2, 7), (2, 1)]}, top[("r1", "m1", "d")])
    assert [(r["layer"], r["rosais_rank"], r["fsour_changes"], r["hcdg"], r["hrcg"], r["steer"]) for r in rows] == [
        (0, 1, 1, [2], [], [(1, 0.3)]), (1, None, 1, [], [], [(5, -0.4)]), (2, 0, 1, [], [7, 1], [])]


# ---- compare, samples ------------------------------------------------------------------------

def test_metric_deltas_pair_runs_by_model_method_dataset_judge_and_metric():
    judged = numbers.judged_metrics([
        _metric("asr", 0.5, 4, run_id="a"), _metric("asr", 0.75, 4, run_id="b"),
        _metric("asr_baseline", 0.0, 4, run_id="a"), _metric("asr", 1.0, 2, run_id="b", model="m2"),
        _metric("asr", 0.1, 10, run_id="c")], {})
    deltas = numbers.metric_deltas(judged, "a", "b")
    assert [(d["model"], d["metric"], d["a"] and d["a"]["value"], d["b"] and d["b"]["value"], d["delta"])
            for d in deltas] == [("m1", "asr", 0.5, 0.75, 0.25), ("m1", "asr_baseline", 0.0, None, None),
                                 ("m2", "asr", None, 1.0, None)]
    assert all(d["sources"] is None for d in deltas), "rows without model_path (before schema v3) name no path"
    judged = numbers.judged_metrics([_metric("asr", 0.5, 4, run_id="a", model_path="org/m", revision="v1"),
                                     _metric("asr", 0.7, 4, run_id="b", model_path="org/m", revision="v2"),
                                     _metric("asr_baseline", 0.0, 4, run_id="a", model_path="org/m"),
                                     _metric("asr_baseline", 0.0, 4, run_id="b", model_path="org/m")], {})
    assert [d["sources"] for d in numbers.metric_deltas(judged, "a", "b")] == ["org/m@v1 → org/m@v2", None]


def test_sample_answers_show_the_text_the_hash_or_a_note_by_store_answers():
    def gen(prompt, condition, answer, sha, policy, verdicts):
        return {"run_id": "r1", "model": "m1", "method": "fsour", "dataset": "d", "prompt_id": prompt,
                "condition": condition, "prompt": f"question {prompt}", "answer": answer, "answer_sha256": sha,
                "store_answers": policy, "verdicts": verdicts}

    v = [{"judge": "refusal", "jailbroken": True, "score": 1.0}, {"judge": "sr", "jailbroken": None, "score": None}]
    rows = [gen("p2", "restart=10", None, "ab" * 32, "hash", v), gen("p2", "baseline", None, "", "none", v),
            gen("p2", "restart=2", "Sure", "cd" * 32, "full", v), gen("p3", "baseline", "x", "", "full", v),
            gen("p1", "baseline", "No", "ef" * 32, "full", v)]
    samples = numbers.sample_answers(rows, prompts_per_method=2)[("r1", "m1", "fsour")]
    assert [(s["prompt_id"], s["condition"], s["answer"], s["answer_sha256"]) for s in samples] == [
        ("p1", "baseline", "No", "ef" * 32), ("p2", "baseline", None, None), ("p2", "restart=2", "Sure", "cd" * 32),
        ("p2", "restart=10", None, "ab" * 32)]
    assert samples[0]["verdicts"] == v


# ---- the page of real runs -------------------------------------------------------------------

SMALL_RUN = "small"


def make_real_root(tmp: Path) -> str:
    """A result root holding a small real run of every method on the sandbox model, and a run of
    a model one of whose units fails every time (the fault test's model and prompts)."""
    import ray

    from core.configs import save_tiny_model, tiny_tokenizer
    from jobs.manifest import load_manifest
    from jobs.runner import run_manifest
    from tests.test_faults import FAILING, MANIFEST as FAULTS_MANIFEST
    from tests.test_runtime import SANDBOX_MODEL

    out = str(tmp / "out")
    small = tmp / "small.yaml"
    small.write_text(FAULTS_MANIFEST.format(run_id=SMALL_RUN, models=SANDBOX_MODEL, store_answers="full"))
    model = save_tiny_model("mixtral", tmp / "short-vocab", vocab_size=64)
    tiny_tokenizer(128).save_pretrained(model)
    csv = tmp / "mixed.csv"
    csv.write_text("id,prompt,target\np0,w10 w11 w12,w20 w21\np2,w100 w15,w24 w25\n")
    failing = tmp / "failing.yaml"
    failing.write_text(FAILING.format(model=model, csv=csv))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert run_manifest(load_manifest(small), out=out, progress=False).complete
        assert run_manifest(load_manifest(failing), out=out, progress=False).units_failed == 1
    finally:
        ray.shutdown()
    return out


@pytest.fixture(scope="module")
def real_root(sandbox_dir, tmp_path_factory):
    return make_real_root(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def real_page(real_root, tmp_path_factory) -> Path:
    """The report of the real root, written once for the tests that only read it."""
    return Path(write_report(real_root, str(tmp_path_factory.mktemp("page") / "report.html"))).resolve()


def _figures(html: str) -> list[str]:
    return re.findall(r'<figure id="([^"]+)" data-figure>', html)


def _data_uris_decode_to_svg(html: str) -> int:
    sources = re.findall(r'<img src="([^"]+)"', html)
    for src in sources:
        assert src.startswith("data:image/svg+xml;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).lstrip().startswith(b"<?xml")
    return len(sources)


SMALL_FIGURES = {"fig-asr", "fig-rosais-small-sandbox-harmful", "fig-safex-small-sandbox", "fig-safex-refusal-small-sandbox",
                 "fig-fsour-small-sandbox", "fig-steermoe-small-sandbox-harmful", "fig-map-small-sandbox"}


def failing_run_figures(root: str) -> set[str]:
    """The failing run has F-SOUR only: its map has layers to show only if a route changed one, and
    its ASR figure needs metrics (a stage with a failed unit ends the method's plan before them)."""
    store = ResultStore(root, read_only=True)
    changed = any(r["route"] for r in store.read_table("fsour_routes", run_id="keeps-failing").to_pylist())
    measured = store.read_table("metrics", run_id="keeps-failing").num_rows > 0
    return {"fig-fsour-keeps-failing-short-vocab", *(["fig-map-keeps-failing-short-vocab"] if changed else []),
            *(["fig-asr"] if measured else [])}


def test_report_of_a_real_root_with_a_failed_unit(real_root, capsys):
    assert main(["report", "--out", real_root]) == 0
    path = capsys.readouterr().out.strip()
    assert path == os.path.join(real_root, "report.html")
    html = Path(path).read_text()
    for section, _ in SECTIONS:
        assert f'<section id="{section}">' in html
    expected = SMALL_FIGURES | failing_run_figures(real_root)
    assert set(_figures(html)) == expected
    assert _data_uris_decode_to_svg(html) == len(expected)
    assert not re.search(r'(src|href)="(https?:)?//', html), "nothing may be fetched"
    # the failed unit: its run, its error, and the run's unit health
    store = ResultStore(real_root, read_only=True)
    [failed] = [u for u in store.read_table("units", run_id="keeps-failing").to_pylist() if u["status"] == "failed"]
    assert failed["unit_id"] in html and "IndexError: index out of range" in html
    assert '<td class="bad">incomplete</td>' in html
    # the ASR table shows every stored headline metric with its n and interval
    for m in store.read_table("metrics", run_id=SMALL_RUN).to_pylist():
        if m["metric"] in ("asr", "asr_baseline", "asr_steered", "asr_unsteered"):
            rate = numbers.metric_rate(m["value"], m["n"])
            low, high = rate.interval
            assert f"{rate.value:.2f} [{low:.2f}, {high:.2f}]</td>\n<td class=\"num\">{m['n']}</td>" in html
    # answers are shown (store_answers: full)
    answer = store.read_table("generations", run_id=SMALL_RUN).to_pylist()[0]["answer"]
    assert answer and str(markupsafe.escape(answer)) in html


def test_report_of_one_run_and_bad_run_ids(real_root, tmp_path, capsys):
    page = tmp_path / "one.html"
    assert main(["report", "--out", real_root, "--run-id", "keeps-failing", "--html", str(page)]) == 0
    html = page.read_text()
    assert set(_figures(html)) == failing_run_figures(real_root)
    assert "No RoSais results in the selected runs." in html
    capsys.readouterr()
    missing = tmp_path / "missing.html"
    assert main(["report", "--out", real_root, "--run-id", "nope", "--html", str(missing)]) == EXIT_BAD_INPUT
    assert "no run 'nope' under" in capsys.readouterr().err and not missing.exists()
    assert main(["report", "--out", str(tmp_path / "empty"), "--html", str(missing)]) == EXIT_BAD_INPUT
    assert "no runs under" in capsys.readouterr().err and not missing.exists()


def test_report_of_the_same_root_in_s3(real_root, real_page, s3_bucket, tmp_path):
    import s3fs

    for table in Path(real_root).iterdir():
        if table.is_dir():
            s3fs.S3FileSystem().put(str(table), f"{s3_bucket}/nightly/", recursive=True)
    local = real_page.read_text()
    remote = Path(write_report(f"s3://{s3_bucket}/nightly", str(tmp_path / "s3.html"))).read_text()
    assert set(_figures(remote)) == SMALL_FIGURES | failing_run_figures(real_root)

    def tables(html):  # the page less its root, its time and the figures' bytes
        html = re.sub(r'src="data:[^"]+"', "", html.replace(real_root, "ROOT").replace(f"s3://{s3_bucket}/nightly", "ROOT"))
        return re.sub(r"written [0-9-]+ [0-9:]+ UTC", "", html)

    assert tables(remote) == tables(local)


def test_compare_shows_the_metric_deltas_of_two_runs(tmp_path):
    root = str(tmp_path / "out")
    store = ResultStore(root)
    manifest = "methods:\n  - {method: fsour, dataset: harmful, judge: refusal}\n"
    # one model name, two checkpoints: the comparison says which path each run's rows came from
    for run_id, asr, path in (("before", 0.25, "/ckpt/step-1000"), ("after", 0.75, "/ckpt/step-2000")):
        store.write_run(run_id, manifest, status="finished")
        store.write_unit(run_id, "m1", "metrics-1", {"metrics": [
            {"dataset": "harmful", "method": "fsour", "judge": "refusal", "params_hash": "p", "metric": "asr",
             "value": asr, "n": 8, "model_path": path, "revision": None}]},
            {"method": "fsour", "kind": "fsour_metrics", "status": "ok", "attempts": 1, "seconds": 0.1})
    html = Path(write_report(root, compare=("before", "after"))).read_text()
    assert "fig-compare" in _figures(html)
    assert ('<td>m1<br><span class="muted">/ckpt/step-1000 → /ckpt/step-2000</span></td>'
            "<td>fsour</td><td>harmful</td><td>refusal</td><td>asr</td>") in html
    assert ">0.25 [0.07, 0.59]</td>" in html and ">0.75 [0.41, 0.93]</td>" in html and ">+0.500</td>" in html
    with pytest.raises(ValueError, match="no run 'other'"):
        write_report(root, str(tmp_path / "x.html"), compare=("before", "other"))
    assert not (tmp_path / "x.html").exists()


# ---- the page in a browser -------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# What headless Chromium needs on a machine without network or display (and as root, no sandbox).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1366,900", "--remote-debugging-port=0", "about:blank"]


class DevTools:
    """The Chrome DevTools protocol over one page's websocket: commands, and the events seen."""

    def __init__(self, url: str):
        import websocket

        self.socket = websocket.create_connection(url, timeout=60, suppress_origin=True)
        self.events: list[dict] = []
        self._next_id = 0

    def call(self, method: str, **params) -> dict:
        self._next_id += 1
        self.socket.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def wait_for(self, event: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(e.get("method") == event for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {event} within {timeout_s} s")
            self.events.append(json.loads(self.socket.recv()))


@pytest.fixture
def chromium_page(tmp_path):
    if not CHROMIUM:
        pytest.skip("needs Chromium: install the Debian package `chromium` (.ci/run installs it when missing)")
    import urllib.request

    profile = tmp_path / "profile"
    browser = subprocess.Popen([CHROMIUM, f"--user-data-dir={profile}", *CHROMIUM_FLAGS],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert browser.poll() is None and time.monotonic() < deadline, "Chromium did not start"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30))
        page = next(t for t in targets if t["type"] == "page")
        devtools = DevTools(page["webSocketDebuggerUrl"])
        yield devtools
        devtools.socket.close()
    finally:
        browser.terminate()
        browser.wait(timeout=30)


def test_report_opens_offline_in_chromium_without_errors_or_requests(real_root, real_page, chromium_page, tmp_path):
    page = real_page
    for domain in ("Page", "Runtime", "Log", "Network"):
        chromium_page.call(f"{domain}.enable")
    chromium_page.call("Page.navigate", url=page.as_uri())
    chromium_page.wait_for("Page.loadEventFired")
    found = chromium_page.call("Runtime.evaluate", returnByValue=True, expression="""({
        sections: [...document.querySelectorAll('section')].map(s => s.id),
        figures: [...document.querySelectorAll('figure[data-figure]')].map(f => f.id),
        drawn: [...document.querySelectorAll('figure img')].filter(i => i.complete && i.naturalWidth > 0).length,
        width: document.documentElement.scrollWidth})""")["result"]["value"]
    expected = SMALL_FIGURES | failing_run_figures(real_root)
    assert found["sections"] == [s for s, _ in SECTIONS]
    assert set(found["figures"]) == expected and found["drawn"] == len(expected)
    assert found["width"] <= 1366, "the page fits a laptop screen's width"
    shot = base64.b64decode(chromium_page.call("Page.captureScreenshot", format="png")["data"])
    assert shot.startswith(b"\x89PNG") and len(shot) > 10_000
    (tmp_path / "report.png").write_bytes(shot)

    events = chromium_page.events
    errors = [e["params"] for e in events if e["method"] == "Runtime.exceptionThrown"
              or (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert not errors
    requested = [e["params"]["request"]["url"] for e in events if e["method"] == "Network.requestWillBeSent"]
    assert page.as_uri() in requested
    assert [u for u in requested if not u.startswith(("file://", "data:"))] == [], "the page fetched from a network"


def test_beyond_section_lists_every_metric_of_the_three_methods_per_run_and_model():
    from jobs.report import beyond_blocks

    def row(run_id, model, method, metric, value, n):
        return {"run_id": run_id, "model": model, "method": method, "dataset": "h", "judge": "refusal",
                "metric": metric, "value": value, "n": n, "rate": numbers.metric_rate(value, n)}

    judged = [row("r1", "m", "fsour", "asr", 1.0, 4), row("r1", "m", "route_monitor", "monitor_auroc", 0.75, 8),
              row("r1", "m", "universal_route", "slots_forced", 7.0, 1), row("r2", "m", "fsour_transfer",
                                                                            "transfer_asr", 0.5, 10)]
    blocks = beyond_blocks(judged)
    assert [b.title for b in blocks] == ["m · run r1", "m · run r2"]
    assert [r["metric"] for r in blocks[0].rows] == ["monitor_auroc", "slots_forced"]  # fsour is not theirs
    assert blocks[0].rows[1]["rate"] is None and blocks[1].rows[0]["rate"].k == 5  # a count is no share
    assert numbers.headline_metrics("universal_route", ["universal_asr_heldout", "asr_heldout_unrouted"]) == (
        "universal_asr_heldout", "asr_heldout_unrouted")
