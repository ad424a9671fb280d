"""RoSais on tiny float64 models: batched scores against one mask at a time, mask draws, ranking, attack."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from core.chat import encode_chat, generate_batch
from core.configs import save_tiny_model
from core.judges import Verdict
from core.models import load_model
from core.rosais import (AFFIRMATIVE_WORDS, RosaisParams, affirmative_token_ids, draw_masks,
                         rank_layers, rosais_attack, rosais_scores)
from core.routing import Route, mask_allowing
from core.schemas import build_table

# The tiny tokenizer knows only w0..wN: its affirmative "replies" are a few of those words.
PARAMS = RosaisParams(s1=4, affirmative=("w20", "w21 w22", "w23", "w20"), max_new_tokens=4)


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str
    dataset: str = "toy"


PROMPTS = [Prompt("p0", "w10 w11 w12"), Prompt("p1", "w30 w31 w32 w33 w34 w35"), Prompt("p2", "w40")]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models' ops are too small to share: on a busy machine two threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["mixtral", "deepseek_v2"])  # deepseek_v2: layer 0 is dense
def lm(request, tmp_path_factory):
    path = save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    return load_model(str(path), dtype="float64")


@pytest.fixture(scope="module")
def scores(lm):
    return rosais_scores(lm, PROMPTS, params=PARAMS)


class ListJudge:
    """Verdicts in a fixed cycle (one missing), remembering what it was asked."""

    name = "cycle"

    def __init__(self):
        self.calls: list[tuple[list[str], list[str]]] = []

    def judge(self, prompts, answers):
        self.calls.append((list(prompts), list(answers)))
        cycle = [(True, 1.0), (False, 0.0), (None, None)]
        return [Verdict(self.name, *cycle[i % 3], reason=f"answer {i}") for i in range(len(answers))]


def _affirmative_ids(lm) -> torch.Tensor:
    return affirmative_token_ids(lm.tokenizer, PARAMS.affirmative)


def _one_mask_logprob(lm, prompt: str, masks: dict[int, torch.Tensor]) -> float:
    """Reference p or p_s: batch 1, a plain full forward, the mask given as a (1, E) route."""
    ids = encode_chat(lm.tokenizer, [prompt])["input_ids"]
    with torch.no_grad(), lm.control.apply(Route(masks=masks, scope="prompt")):
        logits = lm.model(ids).logits[0, -1]  # (V,)
    return float(torch.log_softmax(logits, -1)[_affirmative_ids(lm)].max())


def _one_mask_gains(lm, prompt: Prompt, layer: int) -> torch.Tensor:
    """(S1,) p_s - p, one mask at a time."""
    c = lm.control
    baseline = _one_mask_logprob(lm, prompt.prompt, {})
    draws = draw_masks(PARAMS.seed, prompt.id, layer, PARAMS.s1, c.num_experts, c.top_k)
    return torch.tensor([_one_mask_logprob(lm, prompt.prompt, {layer: mask_allowing(experts, c.num_experts)[None]})
                         - baseline for experts in draws], dtype=torch.float64)


def test_params_defaults_follow_spec():
    p = RosaisParams()
    assert (p.s1, p.seed, p.allowed, p.l_max, p.max_new_tokens, p.scope) == (16, 42, None, 8, 512, "prompt")
    assert p.affirmative == AFFIRMATIVE_WORDS == ("Sure", "Here", "Certainly", "Absolutely", "Of course")
    assert json.loads(p.to_json())["s1"] == 16
    assert RosaisParams(affirmative=["Sure"]).affirmative == ("Sure",)  # manifests give lists
    assert p.allowed_experts(num_experts=8, top_k=2) == 2 and RosaisParams(allowed=5).allowed_experts(8, 2) == 5
    for bad in (dict(s1=0), dict(scope="decode"), dict(affirmative=()), dict(l_max=-1), dict(allowed=0)):
        with pytest.raises(ValueError):
            RosaisParams(**bad)
    with pytest.raises(ValueError, match="top-k"):
        RosaisParams(allowed=1).allowed_experts(8, 2)


def test_affirmative_token_ids_take_first_tokens_dedupe_and_skip_unknown(lm):
    vocab = lm.tokenizer.get_vocab()
    ids = affirmative_token_ids(lm.tokenizer, ("w20", "w21 w22", "Sure", "w20"))  # "Sure" is <unk> here
    assert ids.tolist() == [vocab["w20"], vocab["w21"]]
    with pytest.raises(ValueError, match="vocabulary"):
        affirmative_token_ids(lm.tokenizer, ("Sure", "Here"))


def test_batched_scores_equal_one_mask_at_a_time(lm, scores):
    c = lm.control
    assert [(r["prompt_id"], r["layer"]) for r in scores] == [(p.id, l) for p in PROMPTS for l in range(c.num_layers)]
    distinct_gains = set()
    for row in scores:
        prompt = next(p for p in PROMPTS if p.id == row["prompt_id"])
        gains = _one_mask_gains(lm, prompt, row["layer"])
        distinct_gains.update(gains.tolist())
        assert row["baseline_logprob"] == pytest.approx(_one_mask_logprob(lm, prompt.prompt, {}), abs=1e-9)
        # RoSais = max_s [p_s - p]: at least every mask's gain, and equal to the best one
        assert row["score"] >= gains.max().item() - 1e-9
        assert row["score"] == pytest.approx(gains.max().item(), abs=1e-9)
        draws = draw_masks(PARAMS.seed, prompt.id, row["layer"], PARAMS.s1, c.num_experts, c.top_k)
        assert row["best_mask_experts"] == sorted(draws[gains.argmax()].tolist())
    assert len(distinct_gains) > len(PROMPTS), "masks should change the affirmative log-probability"


def test_rows_fit_the_schema(scores):
    assert build_table("rosais_scores", scores, run_id="r", model="m", unit_id="u").num_rows == len(scores)
    row = scores[0]
    assert (row["s1"], row["seed"], row["scope"]) == (PARAMS.s1, PARAMS.seed, "prompt")
    assert json.loads(row["params"]) == json.loads(PARAMS.to_json())


@pytest.mark.parametrize("allowed", [None, 3])
def test_masks_allow_exactly_the_drawn_experts(lm, allowed):
    """Inside the forward, layer l's chosen experts lie in each row's mask; layers below l run once."""
    c = lm.control
    params = RosaisParams(s1=PARAMS.s1, affirmative=PARAMS.affirmative, allowed=allowed)
    prompt, layer = PROMPTS[1], c.num_layers - 1
    seen: dict[int, list[torch.Tensor]] = {}
    handles = [l.router.register_forward_hook(
        lambda module, args, output, ordinal=l.ordinal: seen.setdefault(ordinal, []).append(output[2]))
        for l in c.layers]  # registered after route control: sees the indices it chose
    try:
        rosais_scores(lm, [prompt], layers=[layer], params=params)
    finally:
        for h in handles:
            h.remove()
    n_allowed = allowed or c.top_k
    draws = draw_masks(params.seed, prompt.id, layer, params.s1, c.num_experts, n_allowed)  # (S1, allowed)
    assert draws.shape == (params.s1, n_allowed) and (draws.sort(-1).values.diff(dim=-1) != 0).all()
    tokens = encode_chat(lm.tokenizer, [prompt.prompt])["input_ids"].shape[1]
    indices = seen[layer][-1].view(params.s1, tokens, c.top_k)  # the masked forward: S1 rows
    assert (indices[..., None] == draws[:, None, None, :]).any(-1).all(), "an expert outside the mask was used"
    if allowed == c.top_k or allowed is None:  # exactly k allowed: the mask is the route
        assert (indices.sort(-1).values == draws.sort(-1).values[:, None, :]).all()
    for below in range(layer):
        assert seen[below][-1].shape[0] == tokens, "layers below l must run once, on a batch of 1"


def test_mask_draws_and_scores_do_not_depend_on_the_work_split(lm, scores):
    c = lm.control
    a = draw_masks(42, "p0", 1, 16, c.num_experts, 2)
    assert torch.equal(a, draw_masks(42, "p0", 1, 16, c.num_experts, 2))
    assert not torch.equal(a, draw_masks(42, "p0", 0, 16, c.num_experts, 2))
    assert not torch.equal(a, draw_masks(42, "p1", 1, 16, c.num_experts, 2))
    assert not torch.equal(a, draw_masks(43, "p0", 1, 16, c.num_experts, 2))
    # units: (prompts 2, 0) x (layers below the last), then prompt 1 x all, then the rest
    last = c.num_layers - 1
    split = (rosais_scores(lm, [PROMPTS[2], PROMPTS[0]], layers=list(range(last)), params=PARAMS)
             + rosais_scores(lm, [PROMPTS[1]], params=PARAMS)
             + rosais_scores(lm, [PROMPTS[0], PROMPTS[2]], layers=[last], params=PARAMS))
    key = lambda r: (r["prompt_id"], r["layer"])
    assert sorted(split, key=key) == sorted(scores, key=key)


def test_rank_layers_by_mean_score_then_index():
    rows = [{"layer": l, "score": s} for l, s in [(0, 1.0), (0, -1.0), (1, 2.0), (1, 0.0), (2, 0.5), (2, 0.5),
                                                  (3, -2.0), (3, 0.0), (4, 1.0), (4, 0.0)]]
    assert rank_layers(rows) == [1, 2, 4, 0, 3]  # means 0, 1, 0.5, -1, 0.5: 2 and 4 tie
    assert rank_layers(reversed(rows)) == [1, 2, 4, 0, 3]


def test_rank_layers_of_real_scores(lm, scores):
    ranking = rank_layers(scores)
    mean = {l: sum(r["score"] for r in scores if r["layer"] == l) / len(PROMPTS) for l in ranking}
    assert sorted(ranking) == list(range(lm.control.num_layers))
    assert [mean[l] for l in ranking] == sorted(mean.values(), reverse=True)


def test_attack_rows_generations_and_verdicts(lm, scores):
    c = lm.control
    ranking = rank_layers(scores)
    judge = ListJudge()
    attack, generations = rosais_attack(lm, PROMPTS, ranking, scores, judge=judge, params=PARAMS, batch_size=2)
    n_L = min(PARAMS.l_max, c.num_layers) + 1  # L capped at the number of MoE layers
    assert [r["L"] for r in attack] == [L for L in range(n_L) for _ in PROMPTS]
    assert all(r["layers_masked"] == ranking[:r["L"]] for r in attack)
    assert build_table("rosais_attack", attack, run_id="r", model="m", unit_id="u").num_rows == len(attack)
    # one judge call per L over every prompt; its verdicts land in both row kinds unchanged
    assert len(judge.calls) == n_L
    for L, (prompts, answers) in enumerate(judge.calls):
        assert prompts == [p.prompt for p in PROMPTS]
        assert answers == [g["answer"] for g in generations[L * len(PROMPTS):(L + 1) * len(PROMPTS)]]
    expected = judge.judge(["x"] * len(PROMPTS), ["y"] * len(PROMPTS))
    for i, (row, gen) in enumerate(zip(attack, generations)):
        verdict = expected[i % len(PROMPTS)]
        assert (row["jailbroken"], row["score"], row["judge"]) == (verdict.jailbroken, verdict.score, "cycle")
        assert gen["verdicts"] == [verdict]
        assert (gen["prompt_id"], gen["dataset"], gen["method"], gen["condition"], gen["prompt"]) == \
            (row["prompt_id"], "toy", "rosais", f"L={row['L']}", PROMPTS[i % len(PROMPTS)].prompt)
        assert gen["scope"] == (None if row["L"] == 0 else "prompt")
    # L = 0 is the unattacked answer
    unattacked = generate_batch(lm.model, lm.tokenizer, [p.prompt for p in PROMPTS], PARAMS.max_new_tokens)
    assert [g["answer"] for g in generations[:len(PROMPTS)]] == unattacked


def test_attack_masks_each_prompt_with_its_own_best_mask(lm, scores):
    """Batched L=2 answers equal batch-1 generation under that prompt's own masks (scope prompt)."""
    c = lm.control
    ranking = rank_layers(scores)
    attack, generations = rosais_attack(lm, PROMPTS, ranking, scores, judge=ListJudge(), L_values=[2],
                                        params=PARAMS)
    best = {(r["prompt_id"], r["layer"]): r["best_mask_experts"] for r in scores}
    recorded = []
    for prompt, gen in zip(PROMPTS, generations):
        masks = {l: mask_allowing(torch.tensor([best[(prompt.id, l)]]), c.num_experts) for l in ranking[:2]}
        with c.apply(Route(masks=masks, scope="prompt")), c.record(keep_indices=True) as rec:
            assert generate_batch(lm.model, lm.tokenizer, [prompt.prompt], PARAMS.max_new_tokens) == [gen["answer"]]
        recorded.append(rec)
    # and the masked layers really used each prompt's best experts on its prompt tokens
    for prompt, rec in zip(PROMPTS, recorded):
        tokens = int(rec.tokens()[0, 0])
        for l in ranking[:2]:
            used = rec.indices(l)[0, :tokens].sort(-1).values
            assert (used == torch.tensor(best[(prompt.id, l)])).all()
    assert {r["L"] for r in attack} == {2}


def test_attack_refuses_missing_scores_and_bad_L(lm, scores):
    ranking = rank_layers(scores)
    with pytest.raises(ValueError, match="no RoSais score row"):
        rosais_attack(lm, PROMPTS, ranking, [r for r in scores if r["prompt_id"] != "p1"], judge=ListJudge(),
                      L_values=[1], params=PARAMS)
    with pytest.raises(ValueError, match="between 0 and"):
        rosais_attack(lm, PROMPTS, ranking, scores, judge=ListJudge(), L_values=[len(ranking) + 1], params=PARAMS)
