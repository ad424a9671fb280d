"""F-SOUR route transfer: does a route found for one prompt jailbreak other prompts?

F-SOUR finds one route per prompt. For every successful route (source i: the restart F-SOUR
reports for prompt i, jailbroken under the deciding judge) and every other prompt j of the same
dataset (destination), the route is re-indexed onto j and j is answered under it and judged:

- alignment "end": a step keeps its distance from the end of the prompt (the chat template's
  closing tokens, where the answer is decided, meet the same experts); "start": it keeps its
  index (F-SOUR walks positions from the start and stops early, so its steps sit at the front);
- controls: "none" (j unrouted, once per destination), "random_<d>" (the same (position, layer)
  slots, each with k experts drawn at random, seeded by source, destination, alignment and d);
- the target log-prob gain: log Pr(j's target | route) - log Pr(j's target | unrouted),
  teacher-forced, which tells a route that moves the model from one that moves the judge.

How it gets F-SOUR's routes: its plan runs F-SOUR's own stages first, with F-SOUR's parameters
taken from its own (core.method.derived). They are the units an `fsour` entry with the same
parameters, dataset and judges runs, with the same ids: beside such an entry in one manifest they
are computed once, and a later run under the same root reuses an earlier run's. Reading another
entry's rows instead would tie this method to the order the scheduler happens to run entries in.

Generation is batched: every (source, destination, alignment, control) row of a unit is a batch
row with its own route (core.stored_routes).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

from core.chat import JudgePanel, generation_rows
from core.fsour import FsourParams, select_restart
from core.method import Method, PlanContext, Read, Rows, UnitKind, WorkUnit, derived, nested_stages, rate, records, \
    verdicts_of
from core.routing import Route
from core.stored_routes import ALIGNMENTS, align_steps, prompt_lengths, random_steps, routed_answers, target_logprobs


@dataclass(frozen=True)
class TransferParams(FsourParams):
    """F-SOUR's parameters (the search whose routes are transferred; the published defaults) and the transfer's."""

    random_draws: int = field(default=1, metadata={
        "help": "random-expert controls per (source, destination, alignment), same slots as the route"})
    batch_size: int = field(default=32, metadata={
        "help": "generations per batch (rows of different routes); lower it only to fit memory"})

    def __post_init__(self):
        super().__post_init__()
        for name in ("random_draws", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"fsour_transfer.{name} must be a positive integer, got {getattr(self, name)}")


def fsour_params(params: FsourParams) -> FsourParams:
    """The plain F-SOUR parameters inside a method's params that extend them."""
    return FsourParams(**{f.name: getattr(params, f.name) for f in dataclasses.fields(FsourParams)})


def reported_routes(rows: Sequence[dict], dataset: str, jailbroken_only: bool) -> dict[str, dict]:
    """prompt id -> the fsour_routes row F-SOUR reports for it (select_restart, the deciding
    judge's verdicts), if that is a searched route (restart >= 0), and jailbroken if asked."""
    by_prompt: dict[str, list[dict]] = {}
    for row in rows:
        if row["dataset"] == dataset:
            by_prompt.setdefault(row["prompt_id"], []).append(row)
    found = {}
    for prompt_id, restarts in by_prompt.items():
        chosen = select_restart(restarts)
        if chosen is None or restarts[chosen]["restart"] < 0:
            continue
        if restarts[chosen]["jailbroken"] or not jailbroken_only:
            found[prompt_id] = restarts[chosen]
    return found


def plan_transfer(ctx: PlanContext) -> Iterator[list[WorkUnit]]:
    """F-SOUR's stages (shared with an `fsour` entry of the same settings), then the transfer
    generations, one unit per chunk of destination prompts with every source route."""
    dataset = ctx.datasets["dataset"]
    fsour = derived(ctx, "fsour", fsour_params(ctx.params), {"dataset": dataset})
    yield from nested_stages(fsour)
    routes = reported_routes(fsour.read("fsour_routes"), dataset, jailbroken_only=True)
    categories = {p.id: p.category for p in ctx.prompts["dataset"]}
    sources = [{"id": pid, "route": row["route"], "prompt_tokens": row["prompt_tokens"],
                "category": categories.get(pid)} for pid, row in sorted(routes.items())]
    yield ctx.prompt_units("transfer_generate", ctx.prompts["dataset"], sources=sources)


def transfer_rows(items, sources: Sequence[Mapping], dst_tokens: Sequence[int], params: TransferParams,
                  num_experts: int, top_k: int) -> list[dict]:
    """Every row a unit generates: per destination its unrouted answer, then per other source,
    alignment and control its route's steps on that destination."""
    planned = []
    for item, tokens in zip(items, dst_tokens):
        planned.append({"src": None, "dst": item, "alignment": None, "control": "none", "steps": [],
                        "same_category": None})
        for src in sources:
            if src["id"] == item.id:  # a route on its own prompt is F-SOUR's result, not a transfer
                continue
            same = None if src["category"] is None or item.category is None else src["category"] == item.category
            for alignment in ALIGNMENTS:
                steps = align_steps(src["route"], src["prompt_tokens"], tokens, alignment)
                planned.append({"src": src["id"], "dst": item, "alignment": alignment, "control": "route",
                                "steps": steps, "same_category": same})
                for draw in range(params.random_draws):
                    planned.append({"src": src["id"], "dst": item, "alignment": alignment,
                                    "control": f"random_{draw}", "same_category": same,
                                    "steps": random_steps(steps, num_experts, top_k, params.seed,
                                                          src["id"], item.id, alignment, draw)})
    return planned


def condition(row: Mapping) -> str:
    """The `generations` condition of a transfer row (unique per destination)."""
    return "baseline" if row["src"] is None else f"src={row['src']} {row['alignment']} {row['control']}"


def _generate_unit(unit: WorkUnit, lm, judge, params: TransferParams) -> Rows:
    items = records(unit.payload)
    control = lm.control
    planned = transfer_rows(items, unit.payload["sources"], prompt_lengths(lm.tokenizer, [p.prompt for p in items]),
                            params, control.num_experts, control.top_k)
    prompts = [row["dst"].prompt for row in planned]
    steps = [row["steps"] for row in planned]
    answers, _, _ = routed_answers(lm, prompts, steps, params.scope, params.max_new_tokens, params.batch_size)
    logprobs = target_logprobs(lm, prompts, [row["dst"].target for row in planned], steps, params.scope,
                               params.batch_size)
    unrouted = {row["dst"].id: float(lp) for row, lp in zip(planned, logprobs) if row["src"] is None}
    verdicts = JudgePanel.of(judge).judge_all(prompts, answers)
    rows, gens = [], []
    for row, answer, verdict, logprob in zip(planned, answers, verdicts, logprobs):
        item = row["dst"]
        rows.append({"src": row["src"], "dst": item.id, "dataset": item.dataset, "alignment": row["alignment"],
                     "control": row["control"], "same_category": row["same_category"], "slots": len(row["steps"]),
                     "jailbroken": verdict[0].jailbroken, "score": verdict[0].score, "judge": verdict[0].judge,
                     "target_logprob": float(logprob), "target_logprob_gain": float(logprob) - unrouted[item.id],
                     "scope": params.scope, "params": params.to_json()})
        gens += generation_rows([item], [answer], [verdict], "fsour_transfer", condition(row),
                                None if row["src"] is None else Route(scope=params.scope), params.to_json())
    return {"fsour_transfer": rows, "generations": gens}


def transfer_metrics(read: Read, datasets: Mapping[str, str], judge: str) -> list[dict]:
    """Per alignment ("" = end, "_start"): `transfer_asr` (routes on other prompts), `transfer_asr_random`
    (the random controls, all draws), each also `_same_category` / `_cross_category` where both
    prompts have one; `transfer_asr_baseline` (destinations unrouted); `transfer_logprob_gain`
    (mean target log-prob gain of the routes). Verdicts are `judge`'s; n counts decided rows."""
    dataset = datasets["dataset"]
    verdicts = verdicts_of(read, "fsour_transfer", judge)
    rows = [r for r in read("fsour_transfer") if r["dataset"] == dataset]

    def decided(chosen: Sequence[dict]) -> list[bool]:
        found = [verdicts.get((dataset, condition(r), r["dst"]), {}).get("jailbroken") for r in chosen]
        return [v for v in found if v is not None]

    out = [rate(dataset, "transfer_asr_baseline", decided([r for r in rows if r["control"] == "none"]))]
    for alignment in ALIGNMENTS:
        suffix = "" if alignment == "end" else f"_{alignment}"
        for control, name in (("route", "transfer_asr"), ("random", "transfer_asr_random")):
            chosen = [r for r in rows if r["alignment"] == alignment and r["control"].startswith(control)]
            out.append(rate(dataset, f"{name}{suffix}", decided(chosen)))
            for same, split in ((True, "same_category"), (False, "cross_category")):
                part = [r for r in chosen if r["same_category"] is same]
                if part:
                    out.append(rate(dataset, f"{name}{suffix}_{split}", decided(part)))
        gains = [r["target_logprob_gain"] for r in rows if r["alignment"] == alignment and r["control"] == "route"]
        out.append({"dataset": dataset, "metric": f"transfer_logprob_gain{suffix}",
                    "value": sum(gains) / len(gains) if gains else float("nan"), "n": len(gains)})
    return out


METHOD = Method(
    name="fsour_transfer", params=TransferParams, plan=plan_transfer,
    units={"transfer_generate": UnitKind(_generate_unit)},
    reduce=transfer_metrics, tables=("fsour_transfer", "generations"),
    needs_target=True,  # F-SOUR's search, and the target log-prob gain
)
