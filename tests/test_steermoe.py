"""SteerMoE baseline: response-only counts against batch-1 by-hand counts, the |delta| ranking,
the split into per-chunk counts and a driver ranking (the same whatever the chunking, for SteerMoE
and the universal route), the steering route, and steering's effect on the selected experts."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from core.chat import render_chat
from core.configs import save_tiny_model
from core.datasets import PromptRecord
from core.judges import Verdict
from core.method import PlanContext
from core.methods import get_method
from core.models import load_model
from core.safex import stack_counts
from core.schemas import build_table
from core.steermoe import (BEHAVIOURS, REFUSAL_REPLY, SteerParams, behaviour_replies, response_routing, steer_counts,
                           steer_generate, steer_rank, steer_route)
from core.store import ResultStore
from core.universal_route import UniversalParams, split_prompts
from jobs.runner import RunError, _check_schema

KEY = dict(run_id="r", model="tiny", unit_id="u")
PROMPTS = ["w1 w2 w3 w4 w5 w6", "w9 w8", "w20 w21 w22 w23"]
REFUSALS = ["w40 w41 w42", "w40 w41", "w40 w41 w42 w43 w44"]
COMPLIANCE = ["w60", "w61 w62 w63 w64", "w65 w66"]


def _records(texts: list[str], targets: list[str | None] | None = None) -> list[PromptRecord]:
    targets = targets or [None] * len(texts)
    return [PromptRecord(f"p{i}", text, target, None, "toy") for i, (text, target) in enumerate(zip(texts, targets))]


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def tiny(request, tmp_path_factory):
    """float64, so batched (padded) and batch-1 forwards route identically."""
    return load_model(str(save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))), dtype="float64")


def test_response_routing_counts_only_response_tokens(tiny):
    c, tok = tiny.control, tiny.tokenizer
    expected = torch.zeros(len(PROMPTS), c.num_layers, c.num_experts, dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(PROMPTS, REFUSALS)):  # batch 1, no padding: count by hand
        prompt_ids = tok(render_chat(tok, [prompt]), add_special_tokens=False)["input_ids"][0]
        response_ids = tok(response, add_special_tokens=False)["input_ids"]
        with torch.no_grad(), c.record(keep_indices=True) as rec:
            tiny.model(torch.tensor([prompt_ids + response_ids]))
        for layer in range(c.num_layers):
            for e in rec.indices(layer)[0, len(prompt_ids):].flatten().tolist():
                expected[row, layer, e] += 1
    expected_tokens = [len(r.split()) for r in REFUSALS]
    assert expected.sum((1, 2)).tolist() == [n * c.top_k * c.num_layers for n in expected_tokens]
    for batch_size in (3, 2, 1):  # right padding and mixed prompt lengths in one batch
        counts, tokens = response_routing(tiny, PROMPTS, REFUSALS, batch_size)
        assert torch.equal(counts, expected) and tokens.tolist() == expected_tokens


def test_rank_rows_order_by_absolute_delta(tiny):
    c = tiny.control
    rows = steer_counts(tiny, _records(PROMPTS, COMPLIANCE), 2, SteerParams().to_json())
    build_table("steer_counts", rows, **KEY)
    assert [(r["prompt_id"], r["behaviour"]) for r in rows] == [(f"p{i}", b) for b in BEHAVIOURS for i in range(3)]
    stacked = {b: stack_counts([r for r in rows if r["behaviour"] == b]) for b in BEHAVIOURS}
    rows = steer_rank({b: s[0] for b, s in stacked.items()}, {b: s[1] for b, s in stacked.items()}, "toy",
                      SteerParams().to_json())
    assert len(rows) == c.num_layers * c.num_experts
    assert [r["rank"] for r in rows] == list(range(len(rows)))
    magnitudes = [abs(r["delta"]) for r in rows]
    assert magnitudes == sorted(magnitudes, reverse=True)
    for r in rows:
        assert r["delta"] == pytest.approx(r["p1"] - r["p2"])
    for layer in range(c.num_layers):  # each token has k experts: shares sum to k per layer
        assert sum(r["p1"] for r in rows if r["layer"] == layer) == pytest.approx(c.top_k)
    counts, tokens = response_routing(tiny, PROMPTS, COMPLIANCE)
    assert {r["compliance_tokens"] for r in rows} == {int(tokens.sum())}
    assert {r["refusal_tokens"] for r in rows} == {3 * len(tiny.tokenizer(REFUSAL_REPLY, add_special_tokens=False)
                                                           ["input_ids"])}
    assert {(r["layer"], r["expert"]): r["p2"] for r in rows} == {
        (l, e): pytest.approx(float(counts[:, l, e].sum()) / float(tokens.sum()))
        for l in range(c.num_layers) for e in range(c.num_experts)}
    build_table("steer_experts", rows, **KEY)


# ---- the ranking split into counting units and a driver unit ----------------------------------

HARMFUL = _records(["w1 w2 w3 w4 w5 w6", "w9 w8", "w20 w21 w22 w23", "w30 w31", "w33 w34 w35"],
                   ["w60", "w61 w62 w63 w64", "w65 w66", "w67 w68 w69", "w70"])


def _single_pass(lm, prompts, dataset: str, params_json: str) -> list[dict]:
    """The ranking as one unit over all prompts computed it, here with one forward per behaviour."""
    texts = [p.prompt for p in prompts]
    summed = {b: response_routing(lm, texts, replies, batch_size=len(texts))
              for b, replies in behaviour_replies(prompts).items()}
    return steer_rank({b: c.sum(0, keepdim=True) for b, (c, _) in summed.items()},
                      {b: t.sum(0, keepdim=True) for b, (_, t) in summed.items()}, dataset, params_json)


def _counted(lm, method: str, params, prompts_per_unit: int, lose_chunk: int | None = None):
    """Plan `method` up to its ranking and run its steer_counts units on `lm`, keeping their rows as
    the store would (each row through its table's schema); lose_chunk: that counting unit's rows
    never commit. Returns (counting units, ranking unit, what the driver reads)."""
    entry = get_method(method)
    stored: dict[str, list[dict]] = {}
    prompts = {"dataset": HARMFUL} if method == "steermoe" else {"harmful": HARMFUL, "benign": HARMFUL[:1]}
    datasets = {role: "toy" for role in prompts}
    ctx = PlanContext({"name": "tiny", "num_experts": lm.control.num_experts}, method, params, ("a",), prompts,
                      datasets, prompts_per_unit, 50, lm.control.num_layers, lambda t: list(stored.get(t, [])))
    stages = entry.stages(ctx)
    first = next(stages)
    ctx.upstream += [u.unit_id for u in first]  # as the scheduler does after each stage
    counting = [u for u in first if u.kind == "steer_counts"]
    for i, unit in enumerate(counting):
        if i != lose_chunk:
            rows = entry.kind(unit.kind).run(unit, lm, None, params)["steer_counts"]
            stored.setdefault("steer_counts", []).extend(
                build_table("steer_counts", rows, run_id="r", model="tiny", unit_id=unit.unit_id).to_pylist())
    (ranking,) = next(stages)
    assert ranking.kind == "steer_rank" and ranking.on_driver and entry.kind("steer_rank").on_driver
    return counting, ranking, ctx.read


def _ranked(method: str, ranking, read, params) -> list[dict]:
    """The ranking unit run on the driver: `steer_experts` rows."""
    return get_method(method).kind("steer_rank").run(ranking, read, params)["steer_experts"]


@pytest.mark.parametrize("method, params", [("steermoe", SteerParams(batch_size=2)),
                                            ("universal_route", UniversalParams(train_prompts=4, batch_size=3))])
def test_split_ranking_is_the_single_pass_ranking_whatever_the_chunking(tiny, method, params):
    trained = HARMFUL if method == "steermoe" else split_prompts(HARMFUL, params.train_prompts, params.seed)[0]
    expected = _single_pass(tiny, trained, "toy", params.to_json())
    for prompts_per_unit in (1, 2, len(trained)):
        counting, ranking, read = _counted(tiny, method, params, prompts_per_unit)
        rows = _ranked(method, ranking, read, params)
        assert len(counting) == -(-len(trained) // prompts_per_unit)
        assert sorted(p["id"] for u in counting for p in u.payload["prompts"]) == sorted(p.id for p in trained)
        assert rows == expected, f"{prompts_per_unit} prompts per unit rank otherwise than one pass"
    build_table("steer_experts", rows, **KEY)
    assert {r["params"] for r in rows} == {params.to_json()}, "rows carry the settings of the method ranking"


def test_ranking_names_the_counting_unit_whose_rows_are_missing(tiny):
    counting, ranking, read = _counted(tiny, "steermoe", SteerParams(), 2, lose_chunk=1)
    with pytest.raises(ValueError, match=r"no stored steer_counts of dataset 'toy' for the prompts of ") as error:
        _ranked("steermoe", ranking, read, SteerParams())
    assert counting[1].unit_id in str(error.value)
    assert all(u.unit_id not in str(error.value) for i, u in enumerate(counting) if i != 1)


def test_a_run_holding_a_steer_ranking_of_one_unit_is_not_resumed(tmp_path):
    """Rows of steer_experts v1 came from one unit over all prompts; this version ranks in another
    (driver) unit, so resuming would add a second ranking beside them: the schema rule refuses."""
    root = tmp_path / "results"
    store = ResultStore(str(root))
    store.write_unit("old", "tiny", "u1", {}, {"method": "steermoe", "kind": "steer_rank", "status": "ok",
                                               "attempts": 1, "seconds": 0.1, "error": None})
    v1 = build_table("steer_experts", [{"dataset": "toy", "layer": 0, "expert": 1, "p1": 0.5, "p2": 0.25,
                                        "delta": 0.25, "rank": 0, "params": "{}"}], run_id="old", model="tiny",
                     unit_id="u1").drop_columns(["refusal_tokens", "compliance_tokens", "schema_version"])
    v1 = v1.append_column("schema_version", pa.array([1], pa.int32()))
    (root / "steer_experts/model=tiny/run=old").mkdir(parents=True)
    pq.write_table(v1, root / "steer_experts/model=tiny/run=old/u1.parquet")
    stored = ResultStore(str(root)).read_table("steer_experts", run_id="old")
    assert stored.column("refusal_tokens").to_pylist() == [None], "v1 rows read with the new columns null"
    with pytest.raises(RunError, match=r"older moesafe \(steer_experts schema version 1; this version writes 2\)"):
        _check_schema(ResultStore(str(root)), "old")


def _rows(*entries: tuple[int, int, float]) -> list[dict]:
    """Rank rows from (layer, expert, delta), ranked in the order given."""
    return [{"layer": l, "expert": e, "delta": d, "rank": i} for i, (l, e, d) in enumerate(entries)]


def test_steer_route_takes_top_n_and_mode_sets_direction():
    rows = _rows((0, 3, 0.4), (2, 1, -0.3), (0, 5, -0.2), (1, 0, 0.0), (2, 6, 0.1))
    unsafe = steer_route(rows[::-1], top_n=4, num_experts=8, mode="unsafe")  # row order does not matter
    assert unsafe.scope == "all"
    assert unsafe.steer[0][0].tolist() == [0, 0, 0, -1, 0, 1, 0, 0]  # compliance (delta < 0) activated
    assert unsafe.steer[2][0].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]  # rank 4 (2, 6) is past top_n
    assert 1 not in unsafe.steer  # delta == 0 is not steered
    safe = steer_route(rows, top_n=4, num_experts=8, mode="safe", scope="prompt")
    assert torch.equal(safe.steer[0], -unsafe.steer[0]) and safe.scope == "prompt"
    with pytest.raises(ValueError, match="mode"):
        steer_route(rows, 2, 8, mode="sideways")


class FixedJudge:
    """Jailbroken, refused, undecided, in turn."""

    name = "fixed"
    settings: dict = {}

    def judge(self, prompts, answers):
        outcomes = [True, False, None]
        return [Verdict(self.name, outcomes[i % 3], None) for i in range(len(answers))]


def test_steering_selects_activated_and_never_deactivated(tiny):
    c = tiny.control
    last = c.num_layers - 1
    # layer 0: activate 3, deactivate 5 and 6; last layer: activate 1 and deactivate 2 (k = 2 < E - 2)
    rows = _rows((0, 3, -0.5), (0, 5, 0.4), (last, 1, -0.3), (0, 6, 0.2), (last, 2, 0.1))
    params = SteerParams(top_n=5, mode="unsafe", max_new_tokens=5)
    route = steer_route(rows, params.top_n, c.num_experts, params.mode, params.scope)
    prompts = _records(["w1 w2 w3", "w4 w5 w6", "w7 w8 w9"])  # same length: every position is real
    with c.record(keep_indices=True) as free:
        steer_generate(tiny, prompts, None, FixedJudge(), params)
    with c.record(keep_indices=True) as rec:
        generations = steer_generate(tiny, prompts, route, FixedJudge(), params)
    unsteered = free.indices(0)
    assert not (unsteered == 3).any(-1).all() or torch.isin(unsteered, torch.tensor([5, 6])).any(), \
        "the unsteered model must not already route this way"
    for layer, activated, deactivated in ((0, [3], [5, 6]), (last, [1], [2])):
        indices = rec.indices(layer)  # (B, S, k)
        for e in activated:
            assert (indices == e).any(-1).all(), f"layer {layer}: expert {e} missing from some token's top-k"
        assert not torch.isin(indices, torch.tensor(deactivated)).any()
    assert [g["condition"] for g in generations] == ["steered"] * 3 and generations[0]["scope"] == "all"
    assert [g["verdicts"][0].jailbroken for g in generations] == [True, False, None]
    build_table("generations", [{**g, "answer_sha256": "-", "store_answers": "all"} for g in generations], **KEY)


def test_unsteered_generation_has_no_scope(tiny):
    generations = steer_generate(tiny, _records(PROMPTS[:1]), None, FixedJudge(),
                                 SteerParams(max_new_tokens=3), condition="baseline")
    assert generations[0]["condition"] == "baseline" and generations[0]["scope"] is None
