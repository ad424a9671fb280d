"""F-SOUR: the batched search agrees with its serial scorer, the restart logic is the paper's, and
restarts of several prompts answered in one batch are answered as each alone.

Both scorers run under one loop here; the independent check (a reference loop sharing no code
with core/fsour.py, with exact ties) is tests/test_fsour_reference.py."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from core.configs import save_tiny_model
from core.datasets import PromptRecord
from core.chat import judged_answers
from core.fsour import (METHOD, SEARCH_FIELDS, FsourParams, _encode, _joint_logprob, answer_searches, draw_candidates,
                        fsour_answers, fsour_search, search_row, select_restart)
from core.method import WorkUnit, prompt_dicts
from core.judges import Verdict
from core.models import load_model
from core.routing import Route

PROMPT, TARGET = "w10 w11 w12", "w20 w21 w22"
LONGER = "w13 w14 w15 w16 w17 w18"


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
        search_row(tiny, _Item(target=None), 0, FsourParams(candidates=2))


# ---- answers of several searches in one batch --------------------------------------------------

class _AlwaysRefused:
    name = "scripted"

    def judge(self, prompts, answers):
        return [Verdict(self.name, False, 0.0) for _ in prompts]


ANSWER_PARAMS = FsourParams(candidates=6, threshold=0.999, max_new_tokens=8)


@pytest.fixture(scope="module")
def searched(tiny):
    """Two prompts of different lengths (so the batch is left-padded), two restarts of the first:
    (items, fsour_searches rows), each search with a route."""
    first, second = PromptRecord("p0", PROMPT, TARGET, None, "toy"), PromptRecord("p1", LONGER, TARGET, None, "toy")
    items = [first, second, first]
    searches = [search_row(tiny, item, restart, ANSWER_PARAMS) for item, restart in zip(items, (0, 0, 1))]
    assert all(s["route"] for s in searches) and searches[0]["route"] != searches[2]["route"]
    return items, searches


def test_searches_answered_in_one_batch_are_answered_as_each_alone(tiny, searched):
    """Greedy answers under per-row routes in one left-padded batch equal each row answered alone
    (float64), with the same experts forced off the router's own choice (so each route acts on its
    own row), and alone equals the route applied as the search found it (its masks over the prompt)."""
    items, searches = searched
    judge = _AlwaysRefused()
    batched = answer_searches(tiny, items, searches, judge, ANSWER_PARAMS, batch_size=3)
    alone = [answer_searches(tiny, [item], [search], judge, ANSWER_PARAMS, batch_size=1)
             for item, search in zip(items, searches)]
    assert batched.answers == [a.answers[0] for a in alone]
    assert batched.off_natural.tolist() == [int(a.off_natural[0]) for a in alone]
    assert batched.decisions.tolist() == [int(a.decisions[0]) for a in alone]
    assert batched.off_natural.sum() > 0, "the routes force experts the router would not choose"
    run = fsour_search(tiny, PROMPT, TARGET, 1, ANSWER_PARAMS)
    assert run.route == searches[2]["route"]
    as_found, _ = judged_answers(tiny, [items[2]], Route(masks=run.masks, scope="prompt"), judge,
                                 ANSWER_PARAMS.max_new_tokens, 1)
    assert as_found == alone[2].answers
    rows, gens = fsour_answers(tiny, items, searches, judge, ANSWER_PARAMS)
    assert [g["answer"] for g in gens] == batched.answers
    # the rows: one per search, as the unit of one search and one answer wrote them before
    assert [(r["prompt_id"], r["restart"], r["route"]) for r in rows] == \
        [(i.id, s["restart"], s["route"]) for i, s in zip(items, searches)]
    assert [g["condition"] for g in gens] == ["restart=0", "restart=0", "restart=1"]
    for row, search in zip(rows, searches):
        assert row["search_seconds"] == search["seconds"] < row["seconds"]
        assert (row["joint_logprob"], row["forwards"], row["prompt_tokens"]) == \
            (search["joint_logprob"], search["forwards"], search["prompt_tokens"])


def test_an_answer_unit_generates_its_searches_in_one_batch(tiny, searched, monkeypatch):
    """The answer unit runs one generate call holding all three rows, not one per search."""
    items, searches = searched
    calls = []
    generate = tiny.model.generate

    def counted(*args, **kwargs):
        calls.append(tuple(kwargs["input_ids"].shape))
        return generate(*args, **kwargs)

    monkeypatch.setattr(tiny.model, "generate", counted)
    unit = WorkUnit("u", "m", "fsour", "fsour_answer",
                    {"prompts": prompt_dicts(items), "searches": [{k: s[k] for k in SEARCH_FIELDS} for s in searches],
                     "timings": [s["seconds"] for s in searches]})
    out = METHOD.kind("fsour_answer").run(unit, tiny, _AlwaysRefused(), ANSWER_PARAMS)
    assert len(calls) == 1 and calls[0][0] == 3
    assert [(r["prompt_id"], r["restart"]) for r in out["fsour_routes"]] == [("p0", 0), ("p1", 0), ("p0", 1)]
    assert len(out["generations"]) == 3
    assert [r["search_seconds"] for r in out["fsour_routes"]] == [s["seconds"] for s in searches]
