"""F-SOUR against a reference loop written from the paper's pseudo-code, sharing no code with core/fsour.py.

The reference is the paper's sequential loop: batch 1, one full forward per candidate and per
coordinate's baseline, candidates compared one by one against the running best with a strict `>`
(so the earliest of equal candidates wins and a tie with the current route is no improvement).
Its only shared part is route control itself. Seeding contract (core/fsour.py documents it):
restart r draws from `torch.Generator().manual_seed(seed + r)`, one draw per coordinate visited,
in search order, each draw being `torch.rand(N, E).argsort(-1)[:, :k]`.

Everything runs in float64 (eager experts), where batched and batch-1 forwards agree exactly,
so the routes must be identical. The tie models make exact ties happen on purpose: a rule that
accepted ties, or kept the last of equal candidates, would return another route.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from core.configs import save_tiny_model
from core.fsour import FsourParams, fsour_search
from core.models import load_model
from core.routing import Route

PROMPT, TARGET = "w10 w11 w12", "w20 w21 w22"
SHORT_PROMPT = "w10"  # 4 prompt positions with the chat markers: keeps the batch-1 reference quick


@dataclass
class ReferenceRun:
    route: list[dict]  # [{"layer", "token", "experts"}] in search order
    start_logprob: float  # under the empty route
    joint_logprob: float
    candidates: int = 0
    ties_for_best: int = 0  # accepting coordinates where another expert set equalled the winner
    ties_with_route: int = 0  # candidates exactly as good as the current route (never accepted)
    coordinates: list[tuple[int, int]] = field(default_factory=list)  # (layer, token) visited


@dataclass(frozen=True)
class Problem:
    full: torch.Tensor  # (1, P + Y): chat(prompt) + target tokens
    prompt_len: int  # P
    target: list[int]  # the Y target token ids


def encode(lm, prompt: str, target: str) -> Problem:
    tok = lm.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                   tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    target_ids = tok(target, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return Problem(torch.cat([ids, target_ids])[None].to(lm.device), len(ids), target_ids.tolist())


def joint_logprob(lm, problem: Problem, route: dict[tuple[int, int], tuple[int, ...]]) -> float:
    """Σ log p(Y_i | prefix) under `route` ((layer, token) -> allowed experts), one batch-1 forward."""
    p, e, control = problem.prompt_len, lm.control.num_experts, lm.control
    masks = {}
    for (layer, token), experts in route.items():
        m = masks.setdefault(layer, torch.zeros(1, p, e, dtype=torch.float64))
        m[0, token] = float("-inf")
        m[0, token, list(experts)] = 0.0
    with torch.no_grad(), control.prompt_length(p), control.apply(Route(masks=masks)):
        logits = lm.model(problem.full).logits[0].double()  # (P + Y, V)
    logp = torch.log_softmax(logits[p - 1: -1], dim=-1)
    return float(sum(logp[i, y] for i, y in enumerate(problem.target)))


def reference_search(lm, prompt: str, target: str, restart: int, candidates: int, threshold: float,
                     seed: int = 42) -> ReferenceRun:
    """The paper's loop for one restart, written out plainly."""
    problem = encode(lm, prompt, target)
    p, e, k, n_layers = problem.prompt_len, lm.control.num_experts, lm.control.top_k, lm.control.num_layers
    route: dict[tuple[int, int], tuple[int, ...]] = {}
    start = joint_logprob(lm, problem, route)
    run = ReferenceRun([], start, start)
    rng = torch.Generator().manual_seed(seed + restart)
    stop = math.log(threshold)
    if run.joint_logprob >= stop:
        return run
    for t in range(p):
        for layer in range(n_layers):
            run.coordinates.append((layer, t))
            best = joint_logprob(lm, problem, route)
            draws = torch.rand(candidates, e, generator=rng).argsort(dim=-1)[:, :k]
            winner, winner_score, scored = None, best, []
            for cand in draws.tolist():
                run.candidates += 1
                score = joint_logprob(lm, problem, {**route, (layer, t): tuple(cand)})
                scored.append((sorted(cand), score))
                if score > winner_score:
                    winner, winner_score = cand, score
            run.ties_with_route += sum(score == best for _, score in scored)
            if winner is not None:
                run.ties_for_best += any(score == winner_score and cand != sorted(winner) for cand, score in scored)
                route[(layer, t)] = tuple(winner)
                run.route.append({"layer": layer, "token": t, "experts": sorted(winner)})
            run.joint_logprob = winner_score
            if winner_score >= stop:
                return run
    return run


def assert_same_search(lm, candidates: int, restart: int = 0, threshold: float = 0.999,
                       prompt: str = PROMPT) -> ReferenceRun:
    reference = reference_search(lm, prompt, TARGET, restart, candidates, threshold)
    batched = fsour_search(lm, prompt, TARGET, restart=restart,
                           params=FsourParams(candidates=candidates, threshold=threshold))
    assert batched.route == reference.route
    # the same route; its score agrees to float32 rounding where the router computes in float32 (DeepSeek), whose
    # CPU matmul may sum in another order for the batched scorer's batch size than for the reference's batch of 1
    assert batched.joint_logprob == pytest.approx(reference.joint_logprob, abs=1e-6)
    assert batched.candidates == reference.candidates
    return reference


@pytest.fixture(scope="module", params=["mixtral", "deepseek_v2", "qwen2_moe"])  # deepseek_v2: layer 0 dense
def tiny(request, tmp_path_factory):
    return load_model(str(save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))), dtype="float64")


def test_batched_search_equals_the_reference_loop(tiny):
    reference = assert_same_search(tiny, candidates=5, restart=1)
    assert reference.route, "a random model should accept some candidates"


def test_search_stops_at_the_threshold_where_the_reference_does(tiny):
    """A threshold halfway (in log-prob) between the empty route and where a full search ends."""
    never = FsourParams(candidates=4, threshold=1.0)  # log 1 = 0 is never reached
    full = fsour_search(tiny, SHORT_PROMPT, TARGET, params=never)
    start = joint_logprob(tiny, encode(tiny, SHORT_PROMPT, TARGET), {})
    assert full.joint_logprob > start
    threshold = math.exp((start + full.joint_logprob) / 2)
    reference = assert_same_search(tiny, candidates=4, threshold=threshold, prompt=SHORT_PROMPT)
    assert reference.joint_logprob >= math.log(threshold)
    assert reference.candidates < full.candidates, "the search should stop early"


# --- exact ties --------------------------------------------------------------------------------

def _experts_module(lm, layer):
    return lm.control.layers[layer].router, lm.model.get_submodule(
        lm.control.layers[layer].name.rsplit(".", 1)[0]).experts


@pytest.fixture(scope="module")
def twin_experts(tmp_path_factory):
    """Mixtral whose experts 4..7 are exact copies of 0..3 (router rows and weights): sets that
    differ by swapping an expert for its twin score exactly the same, so the best of N candidates
    is often tied with a later, different set."""
    lm = load_model(str(save_tiny_model("mixtral", tmp_path_factory.mktemp("twins"), seed=3)), dtype="float64")
    half = lm.control.num_experts // 2
    with torch.no_grad():
        for layer in range(lm.control.num_layers):
            router, experts = _experts_module(lm, layer)
            router.weight[half:] = router.weight[:half]
            experts.gate_up_proj[half:] = experts.gate_up_proj[:half]
            experts.down_proj[half:] = experts.down_proj[:half]
    return lm


def test_tied_best_candidates_keep_the_earliest(twin_experts):
    reference = assert_same_search(twin_experts, candidates=8, prompt=SHORT_PROMPT)
    assert reference.ties_for_best > 0, "the twin model should produce exact ties for the best candidate"


@pytest.fixture(scope="module")
def dead_layer(tmp_path_factory):
    """Mixtral whose MoE layer 1 experts output zero: every candidate there scores exactly the
    current route's joint log-prob, a tie that must not be accepted."""
    lm = load_model(str(save_tiny_model("mixtral", tmp_path_factory.mktemp("dead"), seed=4)), dtype="float64")
    with torch.no_grad():
        _experts_module(lm, 1)[1].down_proj.zero_()
    return lm


def test_a_tie_with_the_current_route_is_not_an_improvement(dead_layer):
    reference = assert_same_search(dead_layer, candidates=4, prompt=SHORT_PROMPT)
    assert any(layer == 1 for layer, _ in reference.coordinates)
    assert reference.ties_with_route > 0
    assert all(step["layer"] != 1 for step in reference.route), "a tie was accepted"
    assert reference.route, "the live layers should still improve"
