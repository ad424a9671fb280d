"""A method as one object: its settings, its plan of work units, what runs each unit, the tables
it writes and the reducer that turns its rows into `metrics`.

Each method's `METHOD = Method(...)` sits in its own science module (core/fsour.py, ...), next
to the code it schedules; core/methods.py is the one registry that manifest validation,
planning, execution and the CLI read. Nothing here imports Ray, pydantic or a method.

A plan is a generator: it yields the units of one stage, the scheduler runs them, and the plan
then reads that stage's results back *from the store* to plan the next one. Because the store
is the only source of truth, a resumed run re-enters the same plan, skips the units already
committed, and ends with the same tables. A stage whose units did not all succeed ends the
plan there (the run is incomplete); the next attempt retries them and then goes on.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

Rows = dict[str, list[dict]]  # table -> rows, what a unit returns
Read = Callable[[str], list[dict]]  # table -> this run's committed rows of the units this plan planned


class PromptLike(Protocol):
    """What the methods read from a prompt record (core.datasets.PromptRecord has it)."""

    id: str
    prompt: str
    target: str | None
    dataset: str


@dataclass(frozen=True)
class WorkUnit:
    unit_id: str
    model: str  # the manifest's model name
    method: str
    kind: str  # which UnitKind of the method runs it
    payload: Mapping[str, Any]  # JSON-able inputs
    on_driver: bool = False


# Payload keys a unit id does not hash: the prompts (their ids are hashed: the texts are in the model key's
# content), and `timings`, wall times of upstream units that a unit only copies into its rows: two
# computations of the same inputs measure other times, and must still plan units of the same ids.
UNHASHED_PAYLOAD: tuple[str, ...] = ("prompts", "timings")


def make_unit(model_key: Mapping[str, Any], method: str, kind: str, payload: Mapping[str, Any],
              on_driver: bool = False) -> WorkUnit:
    """A unit whose id is the hash of its model, method, kind and inputs (UNHASHED_PAYLOAD excluded)."""
    determining = {k: v for k, v in payload.items() if k not in UNHASHED_PAYLOAD}
    determining["prompt_ids"] = [p["id"] for p in payload.get("prompts", [])]
    blob = json.dumps({"model": model_key, "method": method, "kind": kind, "inputs": determining},
                      sort_keys=True, default=str)
    return WorkUnit(f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}", model_key["name"], method, kind,
                    dict(payload), on_driver)


def chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def prompt_dicts(prompts: Sequence[PromptLike]) -> list[dict]:
    return [dataclasses.asdict(p) for p in prompts]


def records(payload: Mapping[str, Any]) -> list[PromptLike]:
    """The prompt records a unit's payload carries."""
    from core.datasets import PromptRecord

    return [PromptRecord(**p) for p in payload["prompts"]]


def params_hash(params_json: str) -> str:
    """The `params_hash` column: tells two settings of one method apart in `metrics`."""
    return hashlib.sha256(params_json.encode()).hexdigest()[:16]


@dataclass
class PlanContext:
    """What a plan needs: the model, the method entry's settings, prompts, and stored results."""

    model_key: Mapping[str, Any]
    method: str
    params: Any  # the method's params dataclass
    judges: tuple[str, ...]  # manifest judge names; the first decides
    prompts: Mapping[str, list[PromptLike]]  # dataset role -> prompts
    datasets: Mapping[str, str]  # dataset role -> dataset name in the manifest
    prompts_per_unit: int
    rounds_per_unit: int
    num_layers: int  # MoE layers of the model
    read: Read
    # ids of the units of every stage planned so far (the scheduler appends each stage's): a later
    # unit's id hashes them, so a unit derived from other inputs is a different unit
    upstream: list[str] = field(default_factory=list)
    # derive(method, params, datasets) -> the context a manifest entry of `method` with these params
    # and dataset roles (role -> dataset name) would have on this model, set by the scheduler: a
    # method that builds on another runs that method's stages through it (`nested_stages`), as the
    # very units such an entry runs (same ids), so that a unit both plan is computed once
    derive: Callable[[str, Any, Mapping[str, str]], "PlanContext"] | None = None

    def unit(self, kind: str, on_driver: bool = False, self_contained: bool = False, **payload) -> WorkUnit:
        """A unit of this plan. Its id hashes the ids of every unit planned before it, unless
        `self_contained`: its payload names everything its rows depend on, and earlier stages only
        decided *whether* it runs (an F-SOUR search), so it stays the same unit however those were
        chunked, and a re-chunked run reuses it."""
        base = {"params": dataclasses.asdict(self.params), "judges": list(self.judges),
                "datasets": dict(self.datasets)}
        if not self_contained:
            base["upstream"] = hashlib.sha256(" ".join(sorted(self.upstream)).encode()).hexdigest()[:16]
        return make_unit(self.model_key, self.method, kind, {**base, **payload}, on_driver)

    def prompt_units(self, kind: str, prompts: Sequence[PromptLike], **payload) -> list[WorkUnit]:
        return [self.unit(kind, prompts=prompt_dicts(chunk), **payload)
                for chunk in chunks(prompts, self.prompts_per_unit)]


def derived(ctx: PlanContext, method: str, params: Any, datasets: Mapping[str, str]) -> PlanContext:
    """The context of `method` with `params` on `datasets` (role -> dataset name) beside `ctx`'s plan."""
    if ctx.derive is None:
        raise RuntimeError(f"{ctx.method} builds on {method}, and this plan context cannot derive one "
                           "(PlanContext.derive is set by the scheduler)")
    return ctx.derive(method, params, datasets)


def nested_stages(sub: PlanContext) -> Iterator[list[WorkUnit]]:
    """The stages of another method's plan inside this one, in `sub` (from `derived`; read their rows
    with `sub.read`). Each stage's ids are added to `sub.upstream` as the scheduler does for a plan
    of its own, so every unit is the one a manifest entry of that method would run."""
    from core.methods import get_method

    for units in get_method(sub.method).plan(sub):
        yield units
        sub.upstream += [unit.unit_id for unit in units]


@dataclass(frozen=True)
class UnitKind:
    """How one kind of unit runs. On a model actor: run(unit, lm, judge, params) with `judge` a
    core.chat.JudgePanel; on the driver: run(unit, read, params), arithmetic over stored rows."""

    run: Callable[..., Rows]
    on_driver: bool = False


# reduce(read, datasets, judge) -> metric rows {dataset, metric, value, n} for one judge
Reducer = Callable[[Read, Mapping[str, str], str], list[dict]]


@dataclass(frozen=True)
class Method:
    name: str
    params: type  # a frozen dataclass with defaults, its own checks and to_json()
    plan: Callable[[PlanContext], Iterator[list[WorkUnit]]]  # the stages before the metrics
    units: Mapping[str, UnitKind]  # kind -> how it runs
    reduce: Reducer  # fills `metrics`, once per judge, in a last stage of its own
    tables: tuple[str, ...]  # result tables its units write (besides metrics)
    needs_target: bool | tuple[str, ...] = False  # every prompt needs a target reply (a tuple: of those roles)
    roles: tuple[str, ...] = ("dataset",)  # dataset roles: ("dataset",) is `dataset: name`
    optional_roles: tuple[str, ...] = ()
    # check_model(params, num_experts, top_k) raises ValueError when the settings cannot run on a model
    check_model: Callable[[Any, int, int], None] | None = None
    # check_datasets(params, {role: number of prompts}) raises ValueError when the settings cannot run on them
    check_datasets: Callable[[Any, Mapping[str, int]], None] | None = None

    @property
    def metrics_kind(self) -> str:
        return f"{self.name}_metrics"

    def stages(self, ctx: PlanContext) -> Iterator[list[WorkUnit]]:
        yield from self.plan(ctx)
        yield [self.metrics_unit(ctx)]

    def metrics_unit(self, ctx: PlanContext) -> WorkUnit:
        """The last stage: `metrics` rows, which carry the model's path and revision so rows of two
        runs (two checkpoints under one name) can be told apart and matched."""
        source = {"path": ctx.model_key.get("path"), "revision": ctx.model_key.get("revision")}
        return ctx.unit(self.metrics_kind, on_driver=True, model_source=source)

    def kind(self, name: str) -> UnitKind:
        if name == self.metrics_kind:
            return UnitKind(self._metrics, on_driver=True)
        return self.units[name]

    def build_params(self, params: Mapping[str, Any]) -> Any:
        return self.params(**params)

    def _metrics(self, unit: WorkUnit, read: Read, params: Any) -> Rows:
        hashed = params_hash(params.to_json())
        source = unit.payload["model_source"]
        return {"metrics": [{**row, "method": self.name, "judge": judge, "params_hash": hashed,
                             "model_path": source["path"], "revision": source["revision"]}
                            for judge in unit.payload["judges"]
                            for row in self.reduce(read, unit.payload["datasets"], judge)]}


# ---- what reducers share -----------------------------------------------------------------------

def rate(dataset: str | None, metric: str, decided: Sequence[bool]) -> dict:
    """A metrics row: the share of True among decided verdicts (NaN when none was decided)."""
    return {"dataset": dataset, "metric": metric,
            "value": sum(decided) / len(decided) if decided else math.nan, "n": len(decided)}


def verdicts_of(read: Read, method: str, judge: str) -> dict[tuple[str, str, str], dict]:
    """(dataset, condition, prompt id) -> `judge`'s verdict on that generation of `method`."""
    found = {}
    for row in read("generations"):
        if row["method"] == method:
            for verdict in row["verdicts"]:
                if verdict["judge"] == judge:
                    found[(row["dataset"], row["condition"], row["prompt_id"])] = verdict
    return found
