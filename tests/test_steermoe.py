"""SteerMoE baseline: response-only counts against batch-1 by-hand counts, the |delta|
ranking, the steering route, and steering's effect on the selected experts."""
from __future__ import annotations

import pytest
import torch

from core.chat import render_chat
from core.configs import save_tiny_model
from core.datasets import PromptRecord
from core.judges import Verdict
from core.models import load_model
from core.schemas import build_table
from core.steermoe import SteerParams, response_routing, steer_generate, steer_rank, steer_route

KEY = dict(run_id="r", model="tiny", unit_id="u")
PROMPTS = ["w1 w2 w3 w4 w5 w6", "w9 w8", "w20 w21 w22 w23"]
REFUSALS = ["w40 w41 w42", "w40 w41", "w40 w41 w42 w43 w44"]
COMPLIANCE = ["w60", "w61 w62 w63 w64", "w65 w66"]


def _records(texts: list[str]) -> list[PromptRecord]:
    return [PromptRecord(f"p{i}", text, None, None, "toy") for i, text in enumerate(texts)]


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def tiny(request, tmp_path_factory):
    """float64, so batched (padded) and batch-1 forwards route identically."""
    return load_model(str(save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))), dtype="float64")


def test_response_routing_counts_only_response_tokens(tiny):
    c, tok = tiny.control, tiny.tokenizer
    expected = torch.zeros(c.num_layers, c.num_experts, dtype=torch.long)
    expected_tokens = 0
    for prompt, response in zip(PROMPTS, REFUSALS):  # batch 1, no padding: count by hand
        prompt_ids = tok(render_chat(tok, [prompt]), add_special_tokens=False)["input_ids"][0]
        response_ids = tok(response, add_special_tokens=False)["input_ids"]
        with torch.no_grad(), c.record(keep_indices=True) as rec:
            tiny.model(torch.tensor([prompt_ids + response_ids]))
        for layer in range(c.num_layers):
            for e in rec.indices(layer)[0, len(prompt_ids):].flatten().tolist():
                expected[layer, e] += 1
        expected_tokens += len(response_ids)
    assert expected_tokens == sum(len(r.split()) for r in REFUSALS)
    for batch_size in (3, 2, 1):  # right padding and mixed prompt lengths in one batch
        counts, tokens = response_routing(tiny, PROMPTS, REFUSALS, batch_size)
        assert torch.equal(counts, expected) and tokens == expected_tokens


def test_rank_rows_order_by_absolute_delta(tiny):
    c = tiny.control
    rows = steer_rank(tiny, _records(PROMPTS), REFUSALS, COMPLIANCE)
    assert len(rows) == c.num_layers * c.num_experts
    assert [r["rank"] for r in rows] == list(range(len(rows)))
    magnitudes = [abs(r["delta"]) for r in rows]
    assert magnitudes == sorted(magnitudes, reverse=True)
    for r in rows:
        assert r["delta"] == pytest.approx(r["p1"] - r["p2"])
    for layer in range(c.num_layers):  # each token has k experts: shares sum to k per layer
        assert sum(r["p1"] for r in rows if r["layer"] == layer) == pytest.approx(c.top_k)
    counts, tokens = response_routing(tiny, PROMPTS, COMPLIANCE)
    assert {(r["layer"], r["expert"]): r["p2"] for r in rows} == {
        (l, e): pytest.approx(float(counts[l, e]) / tokens) for l in range(c.num_layers) for e in range(c.num_experts)}
    build_table("steer_experts", rows, **KEY)


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
