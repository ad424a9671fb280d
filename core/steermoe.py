"""SteerMoE baseline ("Steering MoE LLMs via Expert (De)Activation", 2025).

Experts are ranked by the risk difference between two paired behaviours on the same prompts,
teacher forced (chat(Q) + response, only the response tokens counted):

    p_b[l, i] = response tokens whose top-k at MoE layer l contains expert i / response tokens
    delta = p_1 - p_2, ranked by |delta|

By convention behaviour 1 is refusal and behaviour 2 compliance, so delta > 0 marks experts tied
to refusal. Steering (eps = 0.01 in core.routing) pushes the experts to activate above
the router's best score and those to deactivate below its worst, then selects as usual:
mode "safe" activates refusal experts and deactivates compliance ones, "unsafe" the reverse.

The counts are taken per prompt by `steer_counts` units, one per chunk of prompts, and stored;
the ranking (`steer_rank`) is arithmetic on the driver over the stored integer counts, so it is
the same however the prompts were chunked. core/universal_route.py ranks its training prompts
with the same two units.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Iterator, Mapping, Sequence

import torch

from core.chat import generation_rows, judged_answers, render_chat
from core.judges import Judge
from core.method import Method, PlanContext, PromptLike, Read, Rows, UnitKind, WorkUnit, rate, records, verdicts_of
from core.models import LoadedModel
from core.routing import SCOPES, Route, Scope
from core.safex import stack_counts

MODES: tuple[str, ...] = ("safe", "unsafe")
REFUSAL_REPLY = "I'm sorry, but I cannot help with that."  # behaviour 1, paired with each prompt's target
BEHAVIOURS: tuple[str, ...] = ("refusal", "compliance")  # behaviours 1 and 2: p1 and p2


@dataclasses.dataclass(frozen=True)
class SteerParams:
    """SteerMoE settings. top_n's default of 10 is a few experts per layer on an 8-expert model and
    a small share of a large model's. Each field's `help` is what `moesafe params steermoe` prints."""

    top_n: int = dataclasses.field(default=10, metadata={
        "help": "experts steered: the first top_n of the |delta| ranking over all layers"})
    mode: str = dataclasses.field(default="unsafe", metadata={
        "help": "unsafe: push routing towards compliance experts; safe: towards refusal ones"})
    scope: Scope = dataclasses.field(default="all", metadata={
        "help": "all: steer prompt and answer tokens; prompt: the prompt only"})
    max_new_tokens: int = dataclasses.field(default=128, metadata={"help": "length of the judged answer"})
    batch_size: int = dataclasses.field(default=16, metadata={
        "help": "prompts per generation batch; lower it only to fit memory"})

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.top_n < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("top_n, max_new_tokens and batch_size must be positive")

    def to_json(self) -> str:
        """The `params` column: every setting, keys sorted."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@torch.inference_mode()
def response_routing(lm: LoadedModel, prompts: Sequence[str], responses: Sequence[str],
                     batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert counts (P, L, E) over the response tokens of each chat(prompt) + response, and their
    numbers (P,), rows in the order of `prompts`.

    Prompt and response are tokenised apart, so the boundary is exact, and right padded, so the
    default positions are right; route control counts positions >= each row's prompt length
    (a per-row boundary) whose attention mask is 1, i.e. exactly the response tokens.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"one response per prompt: got {len(prompts)} prompts and {len(responses)} responses")
    tokenizer, control = lm.tokenizer, lm.control
    prompt_ids = tokenizer(render_chat(tokenizer, prompts), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    counts, tokens = [], []
    for start in range(0, len(prompts), batch_size):
        prompt_chunk = prompt_ids[start:start + batch_size]
        sequences = [p + r for p, r in zip(prompt_chunk, response_ids[start:start + batch_size])]
        width = max(map(len, sequences))
        input_ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in sequences])  # (B, S)
        attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])  # (B, S)
        boundary = torch.tensor([len(p) for p in prompt_chunk])  # (B,)
        with control.prompt_length(boundary.to(lm.device)), control.record() as rec:
            # Only the routing is needed: logits_to_keep=1 spares the (B, S, vocab) output.
            lm.model(input_ids=input_ids.to(lm.device), attention_mask=attention_mask.to(lm.device),
                     logits_to_keep=1)
        counts.append(rec.counts()[:, :, 1].cpu())  # (B, L, E); [:, :, 1]: positions past the prompt
        tokens.append(rec.tokens()[:, 1].cpu())  # (B,)
    return torch.cat(counts), torch.cat(tokens)


def behaviour_replies(prompts: Sequence[PromptLike]) -> dict[str, list[str]]:
    """Behaviour -> the reply teacher-forced after each prompt: the refusal, and each prompt's target."""
    missing = [p.id for p in prompts if not p.target]
    if missing:
        raise ValueError(f"SteerMoE's ranking needs each prompt's target (compliance reply); missing for {missing[:3]}")
    return {"refusal": [REFUSAL_REPLY] * len(prompts), "compliance": [p.target for p in prompts]}


def steer_counts(lm: LoadedModel, prompts: Sequence[PromptLike], batch_size: int, params_json: str) -> list[dict]:
    """Rows of `steer_counts`: per prompt and behaviour, the (L, E) counts over the reply's tokens
    (flattened row-major) and the number of those tokens. `params_json`: the method's settings."""
    control = lm.control
    texts = [p.prompt for p in prompts]
    rows = []
    for behaviour, replies in behaviour_replies(prompts).items():
        counts, tokens = response_routing(lm, texts, replies, batch_size)  # (P, L, E), (P,)
        rows += [{"prompt_id": p.id, "dataset": p.dataset, "behaviour": behaviour, "tokens": t,
                  "n_layers": control.num_layers, "n_experts": control.num_experts,
                  "counts": c.flatten().tolist(), "params": params_json}
                 for p, c, t in zip(prompts, counts, tokens.tolist())]
    return rows


def steer_rank(counts: Mapping[str, torch.Tensor], tokens: Mapping[str, torch.Tensor], dataset: str,
               params_json: str) -> list[dict]:
    """Rows of `steer_experts` for every (layer, expert): p1, p2, delta = p1 - p2, rank by |delta|.

    counts: behaviour -> (P, L, E) per-prompt counts; tokens: behaviour -> (P,). Both behaviours'
    counts are summed over their prompts first: integer sums, the same whatever the prompts' order
    or chunking. Rank 0 is the largest |delta|; equal |delta| keep (layer, expert) order."""
    shares, totals = [], []
    for behaviour in BEHAVIOURS:
        total = int(tokens[behaviour].sum())
        if total == 0:
            raise ValueError(f"the {behaviour} replies have no tokens to count")
        shares.append(counts[behaviour].sum(0).double() / total)  # (L, E)
        totals.append(total)
    p1, p2 = shares
    delta = p1 - p2
    order = torch.sort(delta.abs().flatten(), descending=True, stable=True).indices  # (L*E,)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    num_experts = delta.shape[1]
    p1, p2, delta, rank = (t.flatten().tolist() for t in (p1, p2, delta, rank))
    return [{"dataset": dataset, "layer": slot // num_experts, "expert": slot % num_experts, "p1": p1[slot],
             "p2": p2[slot], "delta": delta[slot], "rank": rank[slot], "refusal_tokens": totals[0],
             "compliance_tokens": totals[1], "params": params_json}
            for slot in order.tolist()]


def steer_route(rank_rows: Sequence[Mapping], top_n: int, num_experts: int, mode: str = "unsafe",
                scope: Scope = "all") -> Route:
    """The steering route for the top_n ranked experts (delta = 0 ones are left alone)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    refusal: dict[int, list[int]] = {}  # delta > 0: used more while refusing
    compliance: dict[int, list[int]] = {}
    for row in sorted(rank_rows, key=lambda r: r["rank"])[:top_n]:
        if row["delta"] != 0:
            side = refusal if row["delta"] > 0 else compliance
            side.setdefault(row["layer"], []).append(row["expert"])
    activate, deactivate = (refusal, compliance) if mode == "safe" else (compliance, refusal)
    return Route.steering(activate, deactivate, num_experts, scope=scope)


def steer_generate(lm: LoadedModel, prompts: Sequence[PromptLike], route: Route | None, judge: Judge,
                   params: SteerParams = SteerParams(), condition: str = "steered") -> list[dict]:
    """Greedy answers under `route` (None: unsteered), judged: rows of `generations` (every
    verdict of `judge`, a judge or a JudgePanel)."""
    answers, verdicts = judged_answers(lm, prompts, route, judge, params.max_new_tokens, params.batch_size)
    return generation_rows(prompts, answers, verdicts, "steermoe", condition, route, params.to_json())


# ---- the method: plan, units, metrics ----------------------------------------------------------

def ranking_unit(ctx: PlanContext, counting: Sequence[WorkUnit], dataset: str) -> WorkUnit:
    """The `steer_rank` unit over the stored counts of the `steer_counts` units `counting` (one per
    chunk of prompts: ctx.prompt_units), planned in the stage after theirs. Any method whose units
    include `RANKING_UNITS` ranks this way; `dataset` labels its `steer_experts` rows."""
    chunks = [{"unit_id": u.unit_id, "prompt_ids": [p["id"] for p in u.payload["prompts"]]} for u in counting]
    return ctx.unit("steer_rank", on_driver=True, dataset=dataset, chunks=chunks)


def top_experts(read: Read, dataset: str, top_n: int) -> list[dict]:
    """The first top_n stored `steer_experts` rows of `dataset`, as a unit payload carries them."""
    ranked = sorted((r for r in read("steer_experts") if r["dataset"] == dataset), key=lambda r: r["rank"])
    return [{"layer": r["layer"], "expert": r["expert"], "delta": r["delta"], "rank": r["rank"]}
            for r in ranked[:top_n]]


def plan_steermoe(ctx: PlanContext) -> Iterator[list[WorkUnit]]:
    """Count routing per prompt chunk, rank the experts on the driver, then generate steered and
    unsteered by chunk."""
    prompts, dataset = ctx.prompts["dataset"], ctx.datasets["dataset"]
    counting = ctx.prompt_units("steer_counts", prompts)
    yield counting
    yield [ranking_unit(ctx, counting, dataset)]
    top = top_experts(ctx.read, dataset, ctx.params.top_n)
    yield [u for condition in ("unsteered", "steered")
           for u in ctx.prompt_units("steer_generate", prompts, condition=condition, top=top)]


def _counts_unit(unit: WorkUnit, lm: LoadedModel, judge, params) -> Rows:
    """`params`: the settings of the method running it (its batch_size, and its to_json() for `params`)."""
    return {"steer_counts": steer_counts(lm, records(unit.payload), params.batch_size, params.to_json())}


def _rank_unit(unit: WorkUnit, read: Read, params) -> Rows:
    """Sums the stored counts of every chunk the plan counted; a chunk without rows is named."""
    p = unit.payload
    stored = {(r["prompt_id"], r["behaviour"]): r for r in read("steer_counts") if r["dataset"] == p["dataset"]}
    missing = [chunk["unit_id"] for chunk in p["chunks"]
               if any((pid, b) not in stored for pid in chunk["prompt_ids"] for b in BEHAVIOURS)]
    if missing:
        raise ValueError(f"no stored steer_counts of dataset {p['dataset']!r} for the prompts of "
                         f"{', '.join(missing)}: those counting units have not committed")
    counts, tokens = {}, {}
    for behaviour in BEHAVIOURS:
        rows = [stored[(pid, behaviour)] for chunk in p["chunks"] for pid in chunk["prompt_ids"]]
        counts[behaviour], tokens[behaviour] = stack_counts(rows)  # (P, L, E), (P,)
    return {"steer_experts": steer_rank(counts, tokens, p["dataset"], params.to_json())}


# The units that rank experts from per-chunk counts (`ranking_unit`), for any method's `units`.
RANKING_UNITS: dict[str, UnitKind] = {"steer_counts": UnitKind(_counts_unit),
                                      "steer_rank": UnitKind(_rank_unit, on_driver=True)}


def _generate_unit(unit: WorkUnit, lm: LoadedModel, judge, params: SteerParams) -> Rows:
    p = unit.payload
    route = None
    if p["condition"] == "steered":
        route = steer_route(p["top"], params.top_n, lm.control.num_experts, params.mode, params.scope)
    return {"generations": steer_generate(lm, records(p), route, judge, params, condition=p["condition"])}


def steer_metrics(read: Read, datasets: Mapping[str, str], judge: str) -> list[dict]:
    """`asr_<condition>` (unsteered, steered): share of jailbroken answers among those `judge` decided."""
    dataset = datasets["dataset"]
    decided: dict[str, list[bool]] = {}
    for (row_dataset, condition, _), verdict in verdicts_of(read, "steermoe", judge).items():
        if row_dataset == dataset and verdict["jailbroken"] is not None:
            decided.setdefault(condition, []).append(verdict["jailbroken"])
    return [rate(dataset, f"asr_{condition}", values) for condition, values in sorted(decided.items())]


METHOD = Method(
    name="steermoe", params=SteerParams, plan=plan_steermoe,
    units={**RANKING_UNITS, "steer_generate": UnitKind(_generate_unit)},
    reduce=steer_metrics, tables=("steer_counts", "steer_experts", "generations"),
    needs_target=True,  # each prompt's target is the compliance reply contrasted with refusal
)
