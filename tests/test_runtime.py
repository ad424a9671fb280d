"""The runtime on a real local Ray cluster: a reduced quickstart end to end, a two-model sweep, resume."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray

from core.configs import save_tiny_model
from core.query import run_query
from core.store import ResultStore
from jobs.manifest import load_manifest
from jobs.runner import run_manifest

REPO = Path(__file__).resolve().parents[1]

# The quickstart's shape at test size: every method on the sandbox model.
SMALL = """
run_id: {run_id}
store_answers: {store_answers}
chunking: {{prompts_per_unit: 2, rounds_per_unit: 5}}
models:
{models}
datasets:
  harmful: {{source: sandbox, split: regular, limit: 3}}
  jailbreak: {{source: sandbox, split: jailbreak, limit: 3}}
  benign: {{source: sandbox, split: benign, limit: 3}}
methods:
  - method: fsour
    dataset: harmful
    params: {{candidates: 4, restarts: 2, max_new_tokens: 12}}
  - method: rosais
    dataset: harmful
    params: {{s1: 2, l_max: 2, max_new_tokens: 12}}
  - method: safex
    datasets: {{regular: harmful, jailbreak: jailbreak, benign: benign}}
    params: {{rounds: 10, random_draws: 2, max_new_tokens: 12}}
  - method: steermoe
    dataset: harmful
    params: {{top_n: 4, max_new_tokens: 12}}
"""
SANDBOX_MODEL = "  - {name: sandbox, path: sandbox, dtype: float32}"


@pytest.fixture(scope="module")
def ray_cluster(sandbox_dir):
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _manifest(tmp_path, run_id="t1", models=SANDBOX_MODEL, store_answers="full"):
    text = SMALL.format(run_id=run_id, models=models, store_answers=store_answers)
    path = tmp_path / f"{run_id}.yaml"
    path.write_text(text)
    return load_manifest(path)


def _table_rows(root, name, run_id):
    return sorted(json.dumps(r, sort_keys=True, default=str)
                  for r in ResultStore(root).read_table(name, run_id=run_id).drop_columns(["unit_id"]).to_pylist())


RESULT_TABLES = ("fsour_routes", "fsour_searches", "rosais_scores", "rosais_attack", "safex_counts", "safex_experts",
                 "safex_validation", "steer_counts", "steer_experts", "generations", "metrics")


@pytest.fixture(scope="module")
def quickstart(ray_cluster, tmp_path_factory):
    """The reduced quickstart run once: (manifest, result root, summary). Its tests only read the
    root, or copy it."""
    tmp = tmp_path_factory.mktemp("quickstart")
    manifest = _manifest(tmp)
    out = str(tmp / "out")
    return manifest, out, run_manifest(manifest, out=out, progress=False)


def test_small_quickstart_runs_end_to_end_and_answers_queries(quickstart):
    _, out, summary = quickstart
    assert summary.complete and summary.units_ok == summary.units_total > 0
    metrics = json.loads(run_query("select method, metric, value, n from metrics where run_id = 't1'", out, "json"))
    names = {(m["method"], m["metric"]) for m in metrics}
    assert {("fsour", "asr"), ("fsour", "asr_baseline"), ("rosais", "asr_at_L0"), ("safex", "refusal_before"),
            ("safex", "refusal_after"), ("safex", "refusal_after_random"), ("steermoe", "asr_steered"),
            ("steermoe", "asr_unsteered")} <= names
    for table in RESULT_TABLES:
        assert ResultStore(out).read_table(table, run_id="t1").num_rows > 0, table
    units = json.loads(run_query("select kind, status from units where run_id = 't1'", out, "json"))
    assert {u["status"] for u in units} == {"ok"}
    assert {"fsour_precheck", "fsour_search", "fsour_answer", "rosais_scores", "rosais_attack", "safex_counts",
            "safex_bootstrap", "safex_validation", "steer_counts", "steer_rank"} <= {u["kind"] for u in units}
    runs = ResultStore(out).read_table("runs", run_id="t1").to_pylist()
    assert runs[0]["status"] == "finished" and runs[0]["ended_at"] is not None


@pytest.fixture(scope="module")
def judged_run(ray_cluster, tmp_path_factory) -> str:
    """The quickstart with `judges: [refusal, picky]` on every method, keeping answers as hashes
    (the store_answers test reads it too); its result root."""
    text = (SMALL.format(run_id="judges", models=SANDBOX_MODEL, store_answers="hash")
            .replace("methods:\n", "judges:\n  picky: {type: refusal, phrases: [the]}\nmethods:\n")
            .replace("    params:", "    judges: [refusal, picky]\n    params:"))
    out = str(tmp_path_factory.mktemp("judges") / "out")
    assert run_manifest(load_manifest(text), out=out, progress=False).complete
    return out


def test_every_judge_of_a_method_gets_its_verdicts_and_metrics(judged_run):
    """`judges: [refusal, picky]`: the first decides (the method tables' `judge`), every answer keeps
    both verdicts, and `metrics` has one row per (method, judge, metric)."""
    out = judged_run
    rows = json.loads(run_query("select method, dataset, judge, metric, value, n from metrics", out, "json"))
    keys = [(r["method"], r["dataset"], r["judge"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys)), "one row per (method, dataset, judge, metric)"
    assert {k[0] for k in keys} == {"fsour", "rosais", "safex", "steermoe"}
    for judge in ("refusal", "picky"):  # every judge has every metric
        assert {k[:2] + k[3:] for k in keys if k[2] == judge} == {k[:2] + k[3:] for k in keys}
    store = ResultStore(out)
    gens = store.read_table("generations", run_id="judges").to_pylist()
    assert gens and all([v["judge"] for v in g["verdicts"]] == ["refusal", "picky"] for g in gens)
    for table in ("fsour_routes", "rosais_attack", "safex_validation"):
        assert set(store.read_table(table, run_id="judges").column("judge").to_pylist()) == {"refusal"}, table


def test_resumed_run_skips_finished_units_and_adds_no_duplicates(quickstart, tmp_path):
    manifest, finished, first = quickstart
    out = str(tmp_path / "out")
    shutil.copytree(finished, out)  # the quickstart's finished run, resumed in a copy
    before = {t: _table_rows(out, t, "t1") for t in RESULT_TABLES}
    # Simulate a run cut short: the last stages' units never committed.
    store = ResultStore(out)
    lost = [u for u in store.read_table("units", run_id="t1").to_pylist()
            if u["kind"] in ("rosais_attack", "safex_validation", "fsour_metrics")]
    for path in Path(out).glob("units/**/*.parquet"):
        if pq.read_table(path).column("unit_id")[0].as_py() in {u["unit_id"] for u in lost}:
            path.unlink()
    second = run_manifest(manifest, out=out, progress=False)
    assert second.units_total == first.units_total
    assert second.units_ok == len(lost), "only the lost units run again"
    assert second.units_skipped == first.units_total - len(lost)
    assert {t: _table_rows(out, t, "t1") for t in RESULT_TABLES} == before


@pytest.fixture(scope="module")
def two_model_run(ray_cluster, tmp_path_factory, sandbox_dir) -> tuple[str, Path]:
    """The quickstart on the sandbox and a second family, keeping no answers (the store_answers test
    reads it too): its result root, and the second model's path."""
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("two")
    # a second family, with a shared expert, reading the sandbox prompts with the sandbox's words
    tiny = save_tiny_model("qwen2_moe", tmp / "tiny_qwen", tokenizer=AutoTokenizer.from_pretrained(sandbox_dir))
    models = SANDBOX_MODEL + f"\n  - {{name: tiny-qwen, path: {tiny}, dtype: float32}}"
    out = str(tmp / "out")
    summary = run_manifest(_manifest(tmp, run_id="two", models=models, store_answers="none"), out=out,
                           progress=False)
    assert summary.complete
    return out, tiny


def test_two_models_in_one_sweep(two_model_run):
    out, tiny = two_model_run
    per_model = json.loads(run_query(
        "select model, count(*) as n from metrics where run_id = 'two' group by model order by model", out, "json"))
    assert [m["model"] for m in per_model] == ["sandbox", "tiny-qwen"]
    assert per_model[0]["n"] == per_model[1]["n"]

    # Another run under the same root gives the name "sandbox" to the tiny model (a new checkpoint
    # under an old name): `metrics` says which model each run's rows came from.
    other = SMALL.split("  - method: rosais")[0].format(run_id="renamed", store_answers="full",
                                                        models=f"  - {{name: sandbox, path: {tiny}, dtype: float32}}")
    assert run_manifest(load_manifest(other), out=out, progress=False).complete
    sources = json.loads(run_query("select distinct run_id, model, model_path, revision from metrics "
                                   "order by run_id, model", out, "json"))
    assert sources == [{"run_id": "renamed", "model": "sandbox", "model_path": str(tiny), "revision": None},
                       {"run_id": "two", "model": "sandbox", "model_path": "sandbox", "revision": None},
                       {"run_id": "two", "model": "tiny-qwen", "model_path": str(tiny), "revision": None}]


@pytest.mark.parametrize("mode, run, run_id", [("hash", "judged_run", "judges"), ("none", "two_model_run", "two")])
def test_store_answers_policy(request, mode, run, run_id):
    out = request.getfixturevalue(run)
    out = out[0] if run == "two_model_run" else out
    gens = ResultStore(out).read_table("generations", run_id=run_id).to_pylist()
    assert gens and all(g["answer"] is None and g["store_answers"] == mode for g in gens)
    assert all((len(g["answer_sha256"]) == 64) == (mode == "hash") for g in gens)
    if run == "two_model_run":  # the policy holds for every model of the run
        assert {g["model"] for g in gens} == {"sandbox", "tiny-qwen"}


def test_models_that_do_not_fit_together_run_in_turn(ray_cluster, tmp_path, sandbox_dir):
    """Each replica asks for both CPUs of the cluster: the second model starts after the first retires."""
    from transformers import AutoTokenizer

    tiny = save_tiny_model("olmoe", tmp_path / "tiny_olmoe", tokenizer=AutoTokenizer.from_pretrained(sandbox_dir))
    models = (f"  - {{name: first, path: sandbox, dtype: float32, num_cpus: 2}}\n"
              f"  - {{name: second, path: {tiny}, dtype: float32, num_cpus: 2}}")
    out = str(tmp_path / "out")
    assert run_manifest(_manifest(tmp_path, run_id="turns", models=models), out=out, progress=False).complete
    spans = json.loads(run_query(
        "select model, min(finished_at) as first_done, max(finished_at) as last_done from units "
        "where run_id = 'turns' and kind not like '%metrics' and kind not in ('safex_bootstrap', 'safex_sets') "
        "group by model order by first_done", out, "json"))
    assert [s["model"] for s in spans] == ["first", "second"]
    assert spans[0]["last_done"] < spans[1]["first_done"], "the models' actors must not have overlapped"
