"""Work units: each method split into idempotent pieces, planned stage by stage.

A plan is a generator per (model, method): it yields the units of one stage, the scheduler runs
them, and the plan then reads that stage's results back *from the store* to plan the next one.
Because the store is the only source of truth, a resumed run re-enters the same plan, skips the
units already committed, and ends with the same tables.

A unit's id hashes everything that determines its result (model, method, kind, parameters,
prompt ids, seed, and the inputs planned from earlier stages); its payload also carries the
prompt texts, so workers need no dataset access.

Units marked `on_driver` are pure arithmetic over stored rows (bootstrap rounds, metrics) and run
in the driver; the rest run on a model actor.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

from core.datasets import PromptRecord

REFUSAL_REPLY = "I'm sorry, but I cannot help with that."  # SteerMoE's refusal behaviour (paired with targets)


@dataclass(frozen=True)
class WorkUnit:
    unit_id: str
    model: str  # the manifest's model name
    method: str
    kind: str  # which executor runs it
    payload: Mapping[str, Any]  # JSON-able inputs
    on_driver: bool = False


def make_unit(model_key: Mapping[str, Any], method: str, kind: str, payload: Mapping[str, Any],
              on_driver: bool = False) -> WorkUnit:
    """A unit whose id is the hash of its model, method, kind and inputs (prompt texts excluded: ids suffice)."""
    determining = {k: v for k, v in payload.items() if k != "prompts"}
    determining["prompt_ids"] = [p["id"] for p in payload.get("prompts", [])]
    blob = json.dumps({"model": model_key, "method": method, "kind": kind, "inputs": determining},
                      sort_keys=True, default=str)
    return WorkUnit(f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}", model_key["name"], method, kind,
                    dict(payload), on_driver)


def chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _records(payload: Mapping[str, Any]) -> list[PromptRecord]:
    return [PromptRecord(**p) for p in payload["prompts"]]


def _prompt_dicts(prompts: Sequence[PromptRecord]) -> list[dict]:
    return [dataclasses.asdict(p) for p in prompts]


@dataclass
class PlanContext:
    """What a plan needs: the model, the method entry's settings, prompts, and stored results."""

    model_key: Mapping[str, Any]
    method: str
    params: Any  # the method's params dataclass
    params_dict: dict
    judge: str
    prompts: Mapping[str, list[PromptRecord]]  # role ("dataset", or safex group) -> prompts
    datasets: Mapping[str, str]  # role -> dataset name in the manifest
    prompts_per_unit: int
    rounds_per_unit: int
    num_layers: int  # MoE layers of the model
    read: Callable[[str], list[dict]]  # stored rows of a table for this run and model

    def unit(self, kind: str, on_driver: bool = False, **payload) -> WorkUnit:
        base = {"params": self.params_dict, "judge": self.judge, "datasets": dict(self.datasets)}
        return make_unit(self.model_key, self.method, kind, {**base, **payload}, on_driver)

    def prompt_units(self, kind: str, prompts: Sequence[PromptRecord], **payload) -> list[WorkUnit]:
        return [self.unit(kind, prompts=_prompt_dicts(chunk), **payload)
                for chunk in chunks(prompts, self.prompts_per_unit)]


# ---- plans: one generator per method, yielding the units of each stage -----------------------

def plan_fsour(ctx: PlanContext) -> Iterator[list[WorkUnit]]:
    """Pre-check, then restart 0 for prompts not yet jailbroken, then restarts 1..R-1 in parallel for
    those still not jailbroken. Which restarts run depends only on seeded results, so an
    interrupted and resumed run schedules exactly the same units as an undisturbed one."""
    prompts = ctx.prompts["dataset"]
    dataset = ctx.datasets["dataset"]
    yield ctx.prompt_units("fsour_precheck", prompts)

    def not_jailbroken(restart: int, among: Sequence[PromptRecord]) -> list[PromptRecord]:
        done = {r["prompt_id"]: r["jailbroken"] for r in ctx.read("fsour_routes")
                if r["restart"] == restart and r["dataset"] == dataset}
        return [p for p in among if p.id in done and not done[p.id]]

    todo = not_jailbroken(-1, prompts)
    yield [ctx.unit("fsour_restart", prompts=_prompt_dicts([p]), restart=0) for p in todo]
    todo = not_jailbroken(0, todo)
    yield [ctx.unit("fsour_restart", prompts=_prompt_dicts([p]), restart=r)
           for r in range(1, ctx.params.restarts) for p in todo]
    yield [ctx.unit("fsour_metrics", on_driver=True, prompt_ids=[p.id for p in prompts])]


def plan_rosais(ctx: PlanContext) -> Iterator[list[WorkUnit]]:
    """Scores by (prompt chunk x layer); the ranking from all stored scores; attack by (prompt chunk x L)."""
    prompts = ctx.prompts["dataset"]
    dataset = ctx.datasets["dataset"]
    yield [u for layer in range(ctx.num_layers) for u in ctx.prompt_units("rosais_scores", prompts, layer=layer)]
    from core.rosais import rank_layers

    scores = [r for r in ctx.read("rosais_scores") if r["dataset"] == dataset]
    if not scores:
        return
    ranking = rank_layers(scores)
    best = {}  # prompt id -> its score rows, as much of them as the attack reads
    for r in scores:
        best.setdefault(r["prompt_id"], []).append(
            {key: r[key] for key in ("dataset", "prompt_id", "layer", "score", "best_mask_experts")})
    units = []
    for chunk in chunks(prompts, ctx.prompts_per_unit):
        rows = [row for p in chunk for row in sorted(best.get(p.id, []), key=lambda row: row["layer"])]
        for L in range(min(ctx.params.l_max, len(ranking)) + 1):
            units.append(ctx.unit("rosais_attack", prompts=_prompt_dicts(chunk), L=L, ranking=ranking,
                                  score_rows=rows))
    yield units
    yield [ctx.unit("rosais_metrics", on_driver=True, prompt_ids=[p.id for p in prompts])]


SAFEX_GROUPS = ("regular", "jailbreak", "benign")  # benign is optional: counted, never validated


def plan_safex(ctx: PlanContext) -> Iterator[list[WorkUnit]]:
    """Counts by (group x prompt chunk); bootstrap by (group x chunk of rounds); expert sets;
    validation by (group x condition x prompt chunk)."""
    yield [u for g in SAFEX_GROUPS if g in ctx.prompts
           for u in ctx.prompt_units("safex_counts", ctx.prompts[g], group=g)]
    rounds = ctx.params.rounds
    yield [ctx.unit("safex_bootstrap", on_driver=True, group=g, first_round=r0,
                    rounds=min(ctx.rounds_per_unit, rounds - r0),
                    prompt_ids=[p.id for p in ctx.prompts[g]])
           for g in ("regular", "jailbreak") for r0 in range(0, rounds, ctx.rounds_per_unit)]
    yield [ctx.unit("safex_sets", on_driver=True)]
    from core.safex import random_control

    hrcg: dict[int, list[int]] = {}
    for r in ctx.read("safex_experts"):
        if r["expert_set"] == "HRCG" and r["expert"] is not None:  # null: HRCG is empty
            hrcg.setdefault(r["layer"], []).append(r["expert"])
    hrcg = {layer: sorted(experts) for layer, experts in sorted(hrcg.items())}
    num_experts = ctx.model_key["num_experts"]
    conditions = {"before": {}, "after": hrcg, "random": random_control(hrcg, num_experts, ctx.params.seed)}
    yield [u for g in ("regular", "jailbreak") for condition, disabled in conditions.items()
           for u in ctx.prompt_units("safex_validation", ctx.prompts[g], group=g, condition=condition,
                                     disabled={str(l): e for l, e in disabled.items()})]
    yield [ctx.unit("safex_metrics", on_driver=True)]


def plan_steermoe(ctx: PlanContext) -> Iterator[list[WorkUnit]]:
    """Rank experts by refusal-vs-compliance routing, then generate steered and unsteered by chunk."""
    prompts = ctx.prompts["dataset"]
    yield [ctx.unit("steer_rank", prompts=_prompt_dicts(prompts))]
    ranked = sorted(ctx.read("steer_experts"), key=lambda r: r["rank"])[: ctx.params.top_n]
    top = [{"layer": r["layer"], "expert": r["expert"], "delta": r["delta"], "rank": r["rank"]} for r in ranked]
    yield [u for condition in ("unsteered", "steered")
           for u in ctx.prompt_units("steer_generate", prompts, condition=condition, top=top)]
    yield [ctx.unit("steer_metrics", on_driver=True)]


PLANS: dict[str, Callable[[PlanContext], Iterator[list[WorkUnit]]]] = {
    "fsour": plan_fsour, "rosais": plan_rosais, "safex": plan_safex, "steermoe": plan_steermoe,
}
