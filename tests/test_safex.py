"""SAFEx: counts on tiny models against by-hand counts, the bootstrap against a naive
per-round loop, expert-set algebra, and validation with disabled experts."""
from __future__ import annotations

from collections import Counter

import pyarrow.compute as pc
import pytest
import torch

from core.chat import encode_chat
from core.configs import save_tiny_model
from core.datasets import PromptRecord
from core.judges import RefusalJudge
from core.models import load_model
from core.safex import (SafexParams, bootstrap_samples, bootstrap_selection, expert_set_rows, expert_sets,
                        random_control, safex_counts, safex_validation, stack_counts, top_n_size)
from core.schemas import build_table

KEY = dict(run_id="r", model="tiny", unit_id="u")


def _records(texts: list[str], dataset: str = "toy") -> list[PromptRecord]:
    return [PromptRecord(f"p{i}", text, None, None, dataset) for i, text in enumerate(texts)]


@pytest.fixture(scope="module", params=["mixtral", "deepseek_v2"])
def tiny(request, tmp_path_factory):
    """A tiny model with route control; deepseek_v2's first layer is dense (MoE ordinal != layer)."""
    return load_model(str(save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))))


# ---- counts ----------------------------------------------------------------------------------

PROMPTS = ["w1 w2 w3 w4 w5 w6", "w9 w8", "w20 w21 w22 w23"]  # different lengths: left padding


def _early_eos(lm, prompts: list[str], new_tokens: int) -> tuple[int, int, int]:
    """(token, row, index) such that making `token` the EOS stops `row` at answer index `index` >= 1
    while the other rows run to the end."""
    batch = encode_chat(lm.tokenizer, prompts)
    with torch.no_grad():
        out = lm.model.generate(**batch, do_sample=False, max_new_tokens=new_tokens, eos_token_id=None,
                                pad_token_id=lm.tokenizer.pad_token_id)
    answers = out[:, batch["input_ids"].shape[1]:].tolist()
    for row, answer in enumerate(answers):
        others = {t for r, a in enumerate(answers) if r != row for t in a}
        for token in answer[1:]:
            if token not in others and token not in answer[:answer.index(token)] and answer.index(token) < new_tokens - 2:
                return token, row, answer.index(token)
    pytest.skip("no token ends exactly one row early on this random model")


def _by_hand(lm, prompts: list[str], phase: str, max_new_tokens: int) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """Expected C (B, L, E) and T from indices recorded during the same greedy generation, by Python
    loops over positions, plus route control's own generated-token counts."""
    c = lm.control
    batch = encode_chat(lm.tokenizer, prompts)
    prompt_len = batch["input_ids"].shape[1]
    with torch.no_grad(), c.record(keep_indices=True) as rec:
        out = lm.model.generate(**batch, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id,
                                max_new_tokens=1 if phase == "prefill" else max_new_tokens + 1)
    eos = lm.model.generation_config.eos_token_id
    indices = [rec.indices(layer).tolist() for layer in range(c.num_layers)]  # L x (B, S, k)
    expected = torch.zeros(len(prompts), c.num_layers, c.num_experts, dtype=torch.long)
    tokens = [0] * len(prompts)
    for row in range(len(prompts)):
        positions = []
        if phase in ("prefill", "both"):
            positions += [p for p in range(prompt_len) if batch["attention_mask"][row, p]]
        if phase in ("decode", "both"):
            for p in range(prompt_len, len(indices[0][row])):
                if int(out[row, p]) == eos:
                    break
                positions.append(p)
        tokens[row] = len(positions)
        for layer in range(c.num_layers):
            for p in positions:
                for e in indices[layer][row][p]:
                    expected[row, layer, e] += 1
    return expected, tokens, rec.tokens()[:, 1]


@pytest.mark.parametrize("phase", ["decode", "prefill", "both"])
def test_counts_match_recorded_indices_and_skip_eos_padding(tiny, phase, monkeypatch):
    max_new_tokens = 8
    eos, early_row, eos_index = _early_eos(tiny, PROMPTS, max_new_tokens + 1)
    monkeypatch.setattr(tiny.model.generation_config, "eos_token_id", eos)
    params = SafexParams(phase=phase, max_new_tokens=max_new_tokens, batch_size=len(PROMPTS))
    rows = safex_counts(tiny, _records(PROMPTS), "regular", params)
    counts, tokens = stack_counts(rows)
    expected, expected_tokens, recorder_generated = _by_hand(tiny, PROMPTS, phase, max_new_tokens)
    assert torch.equal(counts, expected)
    assert tokens.tolist() == expected_tokens
    # every counted token has exactly k experts at each layer
    assert torch.equal(counts.sum(-1), tokens[:, None].expand(-1, tiny.control.num_layers) * tiny.control.top_k)
    if phase == "decode":
        # the early row counts its answer up to the EOS; the others their max_new_tokens tokens
        assert tokens[early_row] == eos_index
        assert all(t == max_new_tokens for r, t in enumerate(tokens.tolist()) if r != early_row)
        # route control's own recording agrees: it also stops at the row's EOS
        assert recorder_generated[early_row] == tokens[early_row]
    assert rows[1]["prompt_id"] == "p1" and rows[1]["phase"] == phase
    assert rows[0]["moe_layers"] == [layer.decoder_index for layer in tiny.control.layers]
    build_table("safex_counts", rows, **KEY)


def test_counts_do_not_depend_on_batching(tiny):
    prompts = _records(PROMPTS)
    one_batch = safex_counts(tiny, prompts, "jailbreak", SafexParams(max_new_tokens=6, batch_size=3))
    one_by_one = safex_counts(tiny, prompts, "jailbreak", SafexParams(max_new_tokens=6, batch_size=1))
    assert [r["counts"] for r in one_batch] == [r["counts"] for r in one_by_one]


# ---- bootstrap -------------------------------------------------------------------------------

def _random_group(prompts=9, layers=3, experts=6, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Small integer counts (many ties) with two experts strong in every prompt."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 5, (prompts, layers, experts), generator=g)
    counts[:, 0, 2] += 6
    counts[:, 2, 5] += 6
    tokens = counts.max(-1).values.sum(-1) + torch.randint(0, 4, (prompts,), generator=g)
    return counts, tokens


def _naive_rounds(counts, tokens, rounds, alpha, per_layer, seed) -> list[set[tuple[int, int]]]:
    """Each round's Top-N set by plain Python: p_s = sum C / sum T, ties to the lower index."""
    group_size, layers, experts = counts.shape
    c, t = counts.tolist(), tokens.tolist()
    result = []
    for sample in bootstrap_samples(group_size, 0, rounds, seed).tolist():
        total = sum(t[i] for i in sample)
        p = {(l, e): sum(c[i][l][e] for i in sample) / total for l in range(layers) for e in range(experts)}
        if per_layer:
            n = top_n_size(alpha, experts)
            chosen = {(l, e) for l in range(layers)
                      for e in sorted(range(experts), key=lambda e: (-p[l, e], e))[:n]}
        else:
            n = top_n_size(alpha, layers * experts)
            chosen = set(sorted(p, key=lambda le: (-p[le], le))[:n])
        result.append(chosen)
    return result


@pytest.mark.parametrize("per_layer", [True, False])
def test_bootstrap_matches_naive_rounds_and_pi1_is_strict_intersection(per_layer):
    counts, tokens = _random_group()
    rounds, alpha, seed = 40, 0.34, 7
    selected = bootstrap_selection(counts, tokens, rounds, alpha, per_layer, seed)
    naive = _naive_rounds(counts, tokens, rounds, alpha, per_layer, seed)
    frequency = Counter(le for chosen in naive for le in chosen)
    assert {(l, e): int(n) for (l, e), n in zip(selected.nonzero().tolist(), selected[selected > 0])} == frequency
    strict = set.intersection(*naive)
    assert strict, "the planted experts should be stable"
    e_top = expert_sets(selected, selected, rounds, pi=1.0)["E_top_regular"]
    assert {(l, e) for l, es in e_top.items() for e in es} == strict


def test_bootstrap_samples_are_per_round_resamples():
    samples = bootstrap_samples(50, 0, 20, seed=42)
    assert samples.shape == (20, 50) and samples.min() >= 0 and samples.max() < 50
    assert all(len(set(row)) < 50 for row in samples.tolist()), "with replacement: repeats expected"
    assert len({tuple(row) for row in samples.tolist()}) == 20
    assert torch.equal(bootstrap_samples(50, 5, 3, seed=42), samples[5:8])
    assert not torch.equal(bootstrap_samples(50, 0, 20, seed=43), samples)
    # roughly uniform: every prompt drawn, none hugely over-drawn, over 20 * 50 draws
    drawn = torch.bincount(samples.flatten(), minlength=50)
    assert drawn.min() > 0 and drawn.max() < 60


@pytest.mark.parametrize("per_layer", [True, False])
def test_chunked_rounds_equal_all_rounds(per_layer):
    counts, tokens = _random_group(prompts=30, layers=4, experts=16, seed=1)
    whole = bootstrap_selection(counts, tokens, 100, 0.1, per_layer, seed=3)
    halves = (bootstrap_selection(counts, tokens, 50, 0.1, per_layer, seed=3)
              + bootstrap_selection(counts, tokens, 50, 0.1, per_layer, seed=3, round_offset=50))
    small_chunks = bootstrap_selection(counts, tokens, 100, 0.1, per_layer, seed=3, chunk_rounds=7)
    assert torch.equal(whole, halves) and torch.equal(whole, small_chunks)
    selected_per_round = 4 * top_n_size(0.1, 16) if per_layer else top_n_size(0.1, 4 * 16)
    assert whole.sum() == 100 * selected_per_round
    assert not torch.equal(whole, bootstrap_selection(counts, tokens, 100, 0.1, per_layer, seed=4))


def test_large_counts_use_exact_float64_scores():
    counts, tokens = _random_group(prompts=30, layers=4, experts=16, seed=2)
    scale = 2 ** 20  # 30 * max T * scale > 2**24: beyond float32's exact integers
    assert torch.equal(bootstrap_selection(counts * scale, tokens * scale, 60, 0.1, True, seed=1),
                       bootstrap_selection(counts, tokens, 60, 0.1, True, seed=1))


def test_bootstrap_rejects_a_group_without_tokens():
    with pytest.raises(ValueError, match="no counted tokens"):
        bootstrap_selection(torch.zeros(3, 2, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long), 5)


# ---- expert sets -----------------------------------------------------------------------------

def test_expert_set_algebra_and_rows():
    rounds = 10
    regular = torch.tensor([[10, 10, 9, 0], [0, 10, 5, 10]])  # (L=2, E=4) rounds selected
    jailbreak = torch.tensor([[10, 0, 10, 0], [0, 9, 0, 10]])
    strict = expert_sets(regular, jailbreak, rounds, pi=1.0)
    assert strict == {"E_top_regular": {0: [0, 1], 1: [1, 3]}, "E_top_jailbreak": {0: [0, 2], 1: [3]},
                      "HCDG": {0: [0], 1: [3]}, "HRCG": {0: [1], 1: [1]}}
    loose = expert_sets(regular, jailbreak, rounds, pi=0.9)
    assert loose["HCDG"] == {0: [0, 2], 1: [1, 3]} and loose["HRCG"] == {0: [1]}
    assert expert_sets(regular, jailbreak, rounds, pi=0.5)["E_top_regular"] == {0: [0, 1, 2], 1: [1, 2, 3]}

    params = SafexParams(rounds=rounds, pi=1.0, phase="prefill")
    rows = expert_set_rows(regular, jailbreak, params)
    by_set = {}
    for row in rows:
        by_set.setdefault(row["expert_set"], {})[(row["layer"], row["expert"])] = row["frequency"]
    assert by_set["HRCG"] == {(0, 1): 1.0, (1, 1): 1.0}
    assert by_set["E_top_jailbreak"] == {(0, 0): 1.0, (0, 2): 1.0, (1, 3): 1.0}
    assert by_set["selected_regular"][(1, 2)] == 0.5 and by_set["selected_jailbreak"][(1, 1)] == 0.9
    assert len(by_set["selected_regular"]) == 6
    assert {row["phase"] for row in rows} == {"prefill"}
    build_table("safex_experts", rows, **KEY)


def test_an_empty_expert_set_is_a_row_not_an_absence():
    regular = torch.tensor([[10, 0], [0, 10]])  # both groups select the same experts: HRCG empty
    rows = expert_set_rows(regular, regular.clone(), SafexParams(rounds=10))
    hrcg = [row for row in rows if row["expert_set"] == "HRCG"]
    assert [(row["layer"], row["expert"], row["frequency"]) for row in hrcg] == [(None, None, None)]
    assert {(row["layer"], row["expert"]) for row in rows if row["expert_set"] == "HCDG"} == {(0, 0), (1, 1)}
    table = build_table("safex_experts", rows, **KEY)
    assert table.filter(pc.field("expert_set") == "HRCG").num_rows == 1


# ---- validation ------------------------------------------------------------------------------

def test_random_control_same_layers_same_count_disjoint():
    disabled = {3: [1, 5], 0: [7], 2: [0, 1, 2, 3]}
    control = random_control(disabled, num_experts=8, seed=42)
    assert sorted(control) == sorted(disabled)
    for layer, experts in disabled.items():
        assert len(control[layer]) == len(set(control[layer])) == len(experts)
        assert not set(control[layer]) & set(experts)
        assert all(0 <= e < 8 for e in control[layer])
    assert control == random_control(disabled, 8, seed=42)
    assert any(random_control(disabled, 8, seed=s) != control for s in range(1, 5))
    with pytest.raises(ValueError, match="cannot draw"):
        random_control({0: [0, 1, 2, 3, 4]}, num_experts=8)


def test_disabled_experts_are_never_selected(tiny):
    c = tiny.control
    prompts = _records(["w1 w2 w3", "w4 w5 w6", "w7 w8 w9"])  # same length: every position is real
    params = SafexParams(max_new_tokens=6, batch_size=3)
    judge = RefusalJudge()
    with c.record() as free:
        before, _ = safex_validation(tiny, prompts, "regular", {}, "before", judge, params)
    busiest = free.counts().sum(dim=(0, 2)).topk(2, dim=-1).indices  # (L, 2): the most used experts
    disabled = {0: busiest[0, :1].tolist(), c.num_layers - 1: busiest[-1].tolist()}
    with c.record(keep_indices=True) as rec:
        rows, generations = safex_validation(tiny, prompts, "regular", disabled, "after", judge, params)
    for layer, experts in disabled.items():
        assert not torch.isin(rec.indices(layer), torch.tensor(experts)).any(), f"layer {layer} used a disabled expert"
    assert [r["condition"] for r in before] == ["before"] * 3 and before[0]["n_disabled"] == 0
    assert [r["n_disabled"] for r in rows] == [3] * 3
    assert [r["prompt_id"] for r in rows] == ["p0", "p1", "p2"]
    for row, generation in zip(rows, generations):
        verdict = generation["verdicts"][0]
        assert row["refused"] == (not verdict.jailbroken) == judge.is_refusal(generation["answer"])
        assert generation["method"] == "safex" and generation["condition"] == "after"
        assert generation["scope"] == "all"
    build_table("safex_validation", rows + before, **KEY)
    build_table("generations", [{**g, "answer_sha256": "-", "store_answers": "all"} for g in generations], **KEY)


def test_params_validate_and_serialise():
    assert '"phase": "decode"' in SafexParams().to_json() and '"rounds": 100' in SafexParams().to_json()
    for bad in (dict(phase="both-ish"), dict(alpha=0), dict(pi=1.5), dict(scope="decode"), dict(rounds=0)):
        with pytest.raises(ValueError):
            SafexParams(**bad)
