"""F-SOUR: the batched search agrees with its serial scorer, and the restart logic is the paper's.

Both scorers run under one loop here; the independent check (a reference loop sharing no code
with core/fsour.py, with exact ties) is tests/test_fsour_reference.py."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from core.configs import save_tiny_model
from core.fsour import (FsourParams, _encode, _joint_logprob, draw_candidates, fsour_restart, fsour_search,
                        select_restart)
from core.judges import Verdict
from core.models import load_model
from core.routing import Route

PROMPT, TARGET = "w10 w11 w12", "w20 w21 w22"


@pytest.fixture(scope="module", params=["mixtral", "deepseek_v2", "qwen2_moe"])
def tiny(request, tmp_path_factory):
    path = save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    return load_model(str(path), dtype="float64")


def test_batched_search_returns_the_serial_route(tiny):
    params = FsourParams(candidates=6, threshold=0.999)
    batched = fsour_search(tiny, PROMPT, TARGET, restart=1, params=params, scorer="batched")
    serial = fsour_search(tiny, PROMPT, TARGET, restart=1, params=params, scorer="serial")
    assert batched.route, "the search should accept some candidates on a random model"
    assert batched.route == serial.route
    assert batched.joint_logprob == pytest.approx(serial.joint_logprob, abs=1e-6)
    assert batched.candidates == serial.candidates
    assert batched.forwards < serial.forwards / 3, "candidates must share forwards"


def test_route_found_reproduces_its_score(tiny):
    run = fsour_search(tiny, PROMPT, TARGET, params=FsourParams(candidates=6, threshold=0.999))
    problem = _encode(tiny, PROMPT, TARGET)
    with torch.no_grad(), tiny.control.prompt_length(problem.prompt_len), tiny.control.apply(Route(masks=run.masks)):
        logits = tiny.model(problem.full).logits[:, problem.prompt_len - 1:]
    assert float(_joint_logprob(logits, problem.target)[0]) == pytest.approx(run.joint_logprob, abs=1e-6)  # float32 routers
    with torch.no_grad():
        free = tiny.model(problem.full).logits[:, problem.prompt_len - 1:]
    assert run.joint_logprob > float(_joint_logprob(free, problem.target)[0])
    # every step forces a k-subset at a prompt position
    for step in run.route:
        assert 0 <= step["token"] < problem.prompt_len and len(step["experts"]) == tiny.control.top_k


def test_threshold_reached_stops_the_search(tiny):
    run = fsour_search(tiny, PROMPT, TARGET, params=FsourParams(candidates=4, threshold=1e-30))
    assert run.route == [] and run.candidates == 0 and run.forwards == 1


def test_restarts_draw_independent_candidates():
    g1, g2 = torch.Generator().manual_seed(42), torch.Generator().manual_seed(43)
    a, b = draw_candidates(g1, 50, 8, 2), draw_candidates(g2, 50, 8, 2)
    assert a.shape == (50, 2) and not torch.equal(a, b)
    assert (a[:, 0] != a[:, 1]).all(), "a candidate is a set of distinct experts"
    assert torch.equal(a, draw_candidates(torch.Generator().manual_seed(42), 50, 8, 2))


def _row(restart, jailbroken, score):
    return {"restart": restart, "jailbroken": jailbroken, "score": score}


def test_select_restart_is_what_the_serial_loop_reports():
    assert select_restart([_row(-1, False, 0), _row(0, False, 0.2), _row(1, True, 1.0), _row(2, True, 1.0)]) == 2
    assert select_restart([_row(2, True, 1), _row(-1, False, 0), _row(1, True, 1), _row(0, False, 0)]) == 2
    assert select_restart([_row(-1, False, 0), _row(0, False, 0.3), _row(1, False, 0.3), _row(2, False, 0.1)]) == 2
    assert select_restart([_row(-1, True, 1.0), _row(0, True, 1.0)]) == 0
    assert select_restart([_row(-1, False, 0), _row(0, None, None)]) is None


@dataclass
class _Item:
    id: str = "p0"
    prompt: str = PROMPT
    target: str | None = TARGET
    dataset: str = "toy"


class _JudgeSaysJailbrokenOnCall:
    """Deterministic judge: jailbroken from its `n`-th call on (0 = the pre-check)."""

    name = "scripted"

    def __init__(self, n):
        self.n, self.calls = n, 0

    def judge(self, prompts, answers):
        self.calls += 1
        hit = self.calls > self.n
        return [Verdict(self.name, hit, 1.0 if hit else 0.0)]


def test_bad_parameters_and_missing_target_are_named(tiny):
    with pytest.raises(ValueError, match="fsour.candidates must be a positive integer"):
        FsourParams(candidates=0)
    with pytest.raises(ValueError, match="fsour.restarts"):
        FsourParams(restarts=-1)
    with pytest.raises(ValueError, match="has no target"):
        fsour_restart(tiny, _Item(target=None), 0, _JudgeSaysJailbrokenOnCall(99), FsourParams(candidates=2))
