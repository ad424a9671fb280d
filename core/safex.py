"""SAFEx: stability-based selection of safety-critical experts (Lai et al. 2025).

Three steps, each a function the runtime can run as its own unit:

1. `safex_counts`: one batched greedy generation per chunk of prompts, recorded by route control,
   gives per prompt C_i[l, e] (tokens whose top-k at MoE layer l contains expert e) and T_i
   (tokens counted), for the decode phase (default), the prefill phase or both.
2. `bootstrap_selection`: pure arithmetic on the stored C_i. Round s resamples the group with
   replacement, scores p_s = sum_{i in X_s} C_i / sum_{i in X_s} T_i and takes the Top-N experts;
   the result counts in how many rounds each expert was selected. Each round's sample is a
   function of (seed, round index) only, so rounds split over units add up to the same answer.
   `expert_sets` turns the selection counts of the Regular and Jailbreak groups into
   E_top (selected in >= pi * S rounds), HCDG = E_top(Regular) & E_top(Jailbreak) and
   HRCG = E_top(Regular) minus E_top(Jailbreak).
3. `safex_validation`: greedy answers with given experts disabled (-inf, top-k refills), judged;
   conditions "before" (nothing disabled), "after" (HRCG) and "random_0" .. "random_<D-1>"
   (`random_controls`: D independent draws of as many random experts in the same layers; one
   draw could land on safety experts or on none by chance, so the control is the mean over draws).

Layers are MoE layer ordinals 0..L-1 (what `Route` takes); `safex_counts` rows carry the model
layer index of each ordinal in `moe_layers`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from core.chat import JudgePanel, encode_chat, generation_rows, judged_answers
from core.judges import Judge
from core.method import Method, PlanContext, PromptLike, Read, Rows, UnitKind, WorkUnit, rate, records, verdicts_of
from core.models import LoadedModel
from core.routing import SCOPES, Route, Scope

PHASES: tuple[str, ...] = ("decode", "prefill", "both")
CONDITIONS: tuple[str, ...] = ("before", "after")  # plus random_<draw>, see random_condition
EXPERT_SETS: tuple[str, ...] = ("E_top_regular", "E_top_jailbreak", "HCDG", "HRCG")


@dataclasses.dataclass(frozen=True)
class SafexParams:
    """SAFEx settings (the paper gives no defaults; these are the project's). Each field's `help` is what
    `moesafe params safex` prints."""

    rounds: int = dataclasses.field(default=100, metadata={"help": "S: bootstrap rounds over each prompt group"})
    alpha: float = dataclasses.field(default=0.05, metadata={
        "help": "Top-N share: N = max(1, floor(alpha * K)), K experts per layer (or in all)"})
    pi: float = dataclasses.field(default=1.0, metadata={
        "help": "an expert is stable if in the Top-N of >= pi * S rounds (1: every round)"})
    seed: int = dataclasses.field(default=42, metadata={
        "help": "seeds the bootstrap samples and the random control experts"})
    phase: str = dataclasses.field(default="decode", metadata={
        "help": "tokens counted: decode (the answer's), prefill (the prompt's) or both"})
    max_new_tokens: int = dataclasses.field(default=128, metadata={
        "help": "answer length, for counting and for validation"})
    per_layer: bool = dataclasses.field(default=True, metadata={
        "help": "Top-N within each layer (true) or over all layers' experts (false)"})
    batch_size: int = dataclasses.field(default=16, metadata={
        "help": "prompts per generation batch; lower it only to fit memory"})
    scope: Scope = dataclasses.field(default="all", metadata={
        "help": "where disabled experts are blocked: all tokens, or prompt tokens only"})
    random_draws: int = dataclasses.field(default=5, metadata={
        "help": "draws of the random control (as many random experts per layer as HRCG); its refusal is their mean"})

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if not 0 < self.alpha <= 1 or not 0 < self.pi <= 1:
            raise ValueError(f"alpha and pi must be in (0, 1], got alpha={self.alpha}, pi={self.pi}")
        if (self.rounds < 1 or self.max_new_tokens < 1 or self.batch_size < 1 or self.random_draws < 1
                or self.seed < 0):
            raise ValueError("rounds, max_new_tokens, batch_size and random_draws must be positive and seed >= 0")

    def to_json(self) -> str:
        """The `params` column: every setting, keys sorted."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


# ---------------------------------------------------------------------------------------------
# 1. Counts C_i, T_i
# ---------------------------------------------------------------------------------------------

def count_routed(indices: torch.Tensor, counted: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens whose top-k contains each expert: indices (B, L, S, k), counted (B, S) bool -> (B, L, E)."""
    b, l, s, k = indices.shape
    weight = counted[:, None, :, None].expand(b, l, s, k).long()
    counts = torch.zeros(b, l, num_experts, dtype=torch.long, device=indices.device)
    return counts.scatter_add_(2, indices.reshape(b, l, s * k), weight.reshape(b, l, s * k))


@torch.inference_mode()
def _generation_counts(lm: LoadedModel, prompts: Sequence[str], phase: str,
                       max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """C (B, L, E) and T (B,) for one left-padded batch, rows in the order of `prompts`.

    Decode counts the answer's tokens as they are fed back, EOS excluded, at most max_new_tokens:
    generating one token more routes the last of them. `generate` keeps the attention mask at 1
    after a row's EOS, so route control's own counts include the padding of finished rows; the
    top-k indices are recorded instead and counted under this function's own mask.
    """
    control = lm.control
    batch = encode_chat(lm.tokenizer, prompts).to(lm.device)
    prompt_len = batch["input_ids"].shape[1]
    new_tokens = 1 if phase == "prefill" else max_new_tokens + 1  # 1: the prefill forward only
    with control.record(keep_indices=True) as rec:
        output_ids = lm.model.generate(**batch, do_sample=False, max_new_tokens=new_tokens,
                                       pad_token_id=lm.tokenizer.pad_token_id)
    indices = torch.stack([rec.indices(l) for l in range(control.num_layers)], 1)  # (B, L, S, k)
    fed_back = output_ids[:, prompt_len:indices.shape[2]]  # (B, S - P): generated tokens that were routed
    eos_ids = lm.model.generation_config.eos_token_id
    eos = torch.tensor([] if eos_ids is None else eos_ids, dtype=torch.long, device=fed_back.device).reshape(-1)
    # A generated position counts until the row's first EOS: the cumsum is > 0 from the EOS on.
    answer_tokens = torch.isin(fed_back, eos).long().cumsum(1) == 0  # (B, S - P)
    prompt_tokens = batch["attention_mask"].bool()  # (B, P)
    if phase == "decode":
        prompt_tokens = torch.zeros_like(prompt_tokens)
    elif phase == "prefill":
        answer_tokens = torch.zeros_like(answer_tokens)
    counted = torch.cat([prompt_tokens, answer_tokens], 1)  # (B, S)
    return count_routed(indices, counted, control.num_experts), counted.sum(1)


def safex_counts(lm: LoadedModel, prompts: Sequence[PromptLike], group: str,
                 params: SafexParams = SafexParams()) -> list[dict]:
    """Rows of `safex_counts`: C_i flattened (L, E) row-major and T_i per prompt, in prompt order."""
    control = lm.control
    moe_layers = [layer.decoder_index for layer in control.layers]
    rows = []
    for start in range(0, len(prompts), params.batch_size):
        chunk = prompts[start:start + params.batch_size]
        counts, tokens = _generation_counts(lm, [p.prompt for p in chunk], params.phase, params.max_new_tokens)
        for prompt, c, t in zip(chunk, counts.cpu(), tokens.tolist()):
            rows.append({"prompt_id": prompt.id, "dataset": prompt.dataset, "group": group,
                         "phase": params.phase, "tokens": t, "n_layers": control.num_layers,
                         "n_experts": control.num_experts, "moe_layers": moe_layers,
                         "counts": c.flatten().tolist(), "params": params.to_json()})
    return rows


def stack_counts(rows: Sequence[Mapping]) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts rows of one group (`safex_counts`, or `steer_counts` of one behaviour) -> counts
    (P, L, E) int64 and tokens (P,) int64."""
    shapes = {(r["n_layers"], r["n_experts"]) for r in rows}
    if len(shapes) != 1:
        raise ValueError(f"counts rows must share one (n_layers, n_experts) shape, got {sorted(shapes)}")
    n_layers, n_experts = shapes.pop()
    counts = torch.tensor([r["counts"] for r in rows], dtype=torch.long).view(len(rows), n_layers, n_experts)
    return counts, torch.tensor([r["tokens"] for r in rows], dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# 2. Bootstrap and expert sets
# ---------------------------------------------------------------------------------------------

_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic is defined for uint64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def bootstrap_samples(group_size: int, first_round: int, num_rounds: int, seed: int) -> torch.Tensor:
    """Resampled prompt indices (R, P) of rounds first_round .. first_round + R - 1.

    A counter-based generator: round r's sample depends only on (seed, r), so any split of the
    rounds into chunks draws the same samples, and all rounds are drawn at once.
    """
    rounds = np.arange(first_round, first_round + num_rounds, dtype=np.uint64)  # (R,)
    seed_key = _splitmix64(np.full(1, seed, dtype=np.uint64))
    round_keys = _splitmix64(seed_key + rounds * _GOLDEN_GAMMA)  # (R,)
    draws = np.arange(1, group_size + 1, dtype=np.uint64) * _GOLDEN_GAMMA  # (P,)
    samples = _splitmix64(round_keys[:, None] + draws[None, :]) % np.uint64(group_size)  # (R, P)
    return torch.from_numpy(samples.astype(np.int64))


def top_n_size(alpha: float, num_candidates: int) -> int:
    """N = max(1, floor(alpha * K))."""
    return max(1, math.floor(alpha * num_candidates))


def bootstrap_selection(counts: torch.Tensor, tokens: torch.Tensor, rounds: int, alpha: float = 0.05,
                        per_layer: bool = True, seed: int = 42, round_offset: int = 0,
                        chunk_rounds: int = 256) -> torch.Tensor:
    """In how many of rounds round_offset .. round_offset + rounds - 1 each expert is in the Top-N.

    counts: (P, L, E) C_i of one group; tokens: (P,) T_i. Returns (L, E) int64. Top-N is per layer
    (K = E) or over all layers (K = L * E); equal scores go to the lower (layer, expert) index.
    Rounds run `chunk_rounds` at a time: the (R, P) sample multiplicities times the (P, L * E)
    counts give every round's scores in one matrix product.
    """
    group_size, num_layers, num_experts = counts.shape
    if tokens.sum() == 0:
        raise ValueError("the group has no counted tokens: nothing to select from")
    num_slots = num_layers * num_experts
    top_n = top_n_size(alpha, num_experts if per_layer else num_slots)
    device = counts.device
    # Scores are integer sums <= group_size * max T_i; float32 holds them exactly below 2**24.
    exact32 = group_size * int(tokens.max()) < 2 ** 24
    flat_counts = counts.reshape(group_size, num_slots).to(torch.float32 if exact32 else torch.float64)
    # Subtracting index / K (< 1) from integer scores breaks ties toward the lower index.
    tie_break = torch.arange(num_slots, device=device, dtype=torch.float64) / num_slots  # (L*E,)
    layer_start = (torch.arange(num_layers, device=device) * num_experts)[:, None]  # (L, 1)
    selected = torch.zeros(num_slots, dtype=torch.long, device=device)
    for first in range(round_offset, round_offset + rounds, chunk_rounds):
        n = min(chunk_rounds, round_offset + rounds - first)
        samples = bootstrap_samples(group_size, first, n, seed).to(device)  # (R, P)
        multiplicity = torch.zeros(n, group_size, dtype=flat_counts.dtype, device=device)
        multiplicity.scatter_add_(1, samples, torch.ones_like(samples, dtype=flat_counts.dtype))
        # p_s = numerator / sum T over the sample; the denominator is shared by all experts of a
        # round, so ranking the numerators ranks p_s.
        scores = (multiplicity @ flat_counts).double() - tie_break  # (R, L*E)
        if per_layer:
            top = scores.view(n, num_layers, num_experts).topk(top_n, dim=-1).indices + layer_start  # (R, L, N)
        else:
            top = scores.topk(top_n, dim=-1).indices  # (R, N)
        selected += torch.bincount(top.flatten(), minlength=num_slots)
    return selected.view(num_layers, num_experts)


def _as_sets(chosen: torch.Tensor) -> dict[int, list[int]]:
    """(L, E) bool -> {layer: [experts]} for layers with any expert chosen."""
    return {layer: experts.nonzero().flatten().tolist() for layer, experts in enumerate(chosen) if experts.any()}


def _stable(selected: torch.Tensor, rounds: int, pi: float) -> torch.Tensor:
    """(L, E) bool: selected in >= pi * rounds rounds (rounded to 1e-9 so 0.9 * 100 means 90)."""
    return selected >= math.ceil(round(pi * rounds, 9))


def expert_sets(selected_regular: torch.Tensor, selected_jailbreak: torch.Tensor, rounds: int,
                pi: float = 1.0) -> dict[str, dict[int, list[int]]]:
    """E_top of each group, HCDG and HRCG as {layer: [experts]}, from (L, E) selection counts."""
    top_regular = _stable(selected_regular, rounds, pi)
    top_jailbreak = _stable(selected_jailbreak, rounds, pi)
    return {"E_top_regular": _as_sets(top_regular), "E_top_jailbreak": _as_sets(top_jailbreak),
            "HCDG": _as_sets(top_regular & top_jailbreak), "HRCG": _as_sets(top_regular & ~top_jailbreak)}


def expert_set_rows(selected_regular: torch.Tensor, selected_jailbreak: torch.Tensor,
                    params: SafexParams) -> list[dict]:
    """Rows of `safex_experts` for the expert sets (params.rounds rounds, threshold params.pi).

    frequency = share of the rounds selecting the expert in the set's defining group: Jailbreak for
    E_top_jailbreak, Regular for the others (HCDG and HRCG are parts of E_top(Regular)). Rows
    "selected_regular" / "selected_jailbreak" give every expert selected in at least one round,
    so other thresholds pi can be applied to the stored table. An empty set has one row with
    layer, expert and frequency null, so "computed and empty" differs from "not computed".
    """
    sets = expert_sets(selected_regular, selected_jailbreak, params.rounds, params.pi)
    sets["selected_regular"] = _as_sets(selected_regular > 0)
    sets["selected_jailbreak"] = _as_sets(selected_jailbreak > 0)
    rows = []
    for name, members in sets.items():
        if not members:
            rows.append({"expert_set": name, "phase": params.phase, "layer": None, "expert": None,
                         "frequency": None, "params": params.to_json()})
        selected = selected_jailbreak if name.endswith("jailbreak") else selected_regular
        for layer, experts in members.items():
            rows += [{"expert_set": name, "phase": params.phase, "layer": layer, "expert": e,
                      "frequency": int(selected[layer, e]) / params.rounds, "params": params.to_json()}
                     for e in experts]
    return rows


# ---------------------------------------------------------------------------------------------
# 3. Validation
# ---------------------------------------------------------------------------------------------

def random_control(disabled: Mapping[int, Sequence[int]], num_experts: int, seed: int = 42) -> dict[int, list[int]]:
    """As many random experts as `disabled` in each of its layers, never one of the disabled ones.

    Deterministic in (disabled, num_experts, seed); layers are drawn in ascending order."""
    generator = torch.Generator().manual_seed(seed)
    control = {}
    for layer in sorted(disabled):
        blocked = set(disabled[layer])
        others = torch.tensor([e for e in range(num_experts) if e not in blocked], dtype=torch.long)
        if len(others) < len(blocked):
            raise ValueError(f"layer {layer}: cannot draw {len(blocked)} experts outside the {len(blocked)} "
                             f"disabled ones among {num_experts}")
        chosen = others[torch.randperm(len(others), generator=generator)[:len(blocked)]]
        control[layer] = sorted(chosen.tolist())
    return control


def random_condition(draw: int) -> str:
    """The validation condition of random-control draw `draw`."""
    return f"random_{draw}"


def random_controls(disabled: Mapping[int, Sequence[int]], num_experts: int, seed: int,
                    draws: int) -> dict[str, dict[int, list[int]]]:
    """Condition -> the experts of one random-control draw; draw d uses seed + d."""
    return {random_condition(d): random_control(disabled, num_experts, seed + d) for d in range(draws)}


def _random_draw(condition: str) -> int | None:
    """The draw of a random-control condition, None for any other condition."""
    prefix, _, draw = condition.partition("_")
    return int(draw) if prefix == "random" and draw.isdigit() else None


def safex_validation(lm: LoadedModel, prompts: Sequence[PromptLike], group: str,
                     disabled: Mapping[int, Sequence[int]], condition: str, judge: Judge,
                     params: SafexParams = SafexParams()) -> tuple[list[dict], list[dict]]:
    """Refusal per prompt with `disabled` experts blocked: (safex_validation rows, generations rows)."""
    if condition not in CONDITIONS and _random_draw(condition) is None:
        raise ValueError(f"condition must be one of {CONDITIONS} or random_<draw>, got {condition!r}")
    n_disabled = sum(len(experts) for experts in disabled.values())
    route = Route.disable(disabled, lm.control.num_experts, scope=params.scope) if n_disabled else None
    answers, verdicts = judged_answers(lm, prompts, route, judge, params.max_new_tokens, params.batch_size)
    rows = [{"prompt_id": p.id, "dataset": p.dataset, "group": group, "condition": condition,
             "refused": None if v.jailbroken is None else not v.jailbroken, "judge": JudgePanel.of(judge).name,
             "n_disabled": n_disabled, "scope": params.scope, "params": params.to_json()}
            for p, (v, *_) in zip(prompts, verdicts)]
    return rows, generation_rows(prompts, answers, verdicts, "safex", condition, route, params.to_json())


# ---------------------------------------------------------------------------------------------
# The method: plan, units, metrics
# ---------------------------------------------------------------------------------------------

GROUPS: tuple[str, ...] = ("regular", "jailbreak", "benign")  # benign is optional: counted, never validated
VALIDATED: tuple[str, ...] = ("regular", "jailbreak")
METRIC_NAMES: dict[str, str] = {"before": "refusal_before", "after": "refusal_after"}


def plan_safex(ctx: PlanContext) -> Iterator[list[WorkUnit]]:
    """Counts by (group x prompt chunk); bootstrap by (group x chunk of rounds); expert sets;
    validation by (group x condition x prompt chunk)."""
    yield [u for g in GROUPS if g in ctx.prompts for u in ctx.prompt_units("safex_counts", ctx.prompts[g], group=g)]
    rounds = ctx.params.rounds
    yield [ctx.unit("safex_bootstrap", on_driver=True, group=g, first_round=r0,
                    rounds=min(ctx.rounds_per_unit, rounds - r0), prompt_ids=[p.id for p in ctx.prompts[g]])
           for g in VALIDATED for r0 in range(0, rounds, ctx.rounds_per_unit)]
    num_experts = ctx.model_key["num_experts"]
    yield [ctx.unit("safex_sets", on_driver=True, num_layers=ctx.num_layers, num_experts=num_experts)]
    hrcg: dict[int, list[int]] = {}
    for r in ctx.read("safex_experts"):
        if r["expert_set"] == "HRCG" and r["expert"] is not None:  # null: HRCG is empty
            hrcg.setdefault(r["layer"], []).append(r["expert"])
    hrcg = {layer: sorted(experts) for layer, experts in sorted(hrcg.items())}
    conditions = {"before": {}, "after": hrcg,
                  **random_controls(hrcg, num_experts, ctx.params.seed, ctx.params.random_draws)}
    yield [u for g in VALIDATED for condition, disabled in conditions.items()
           for u in ctx.prompt_units("safex_validation", ctx.prompts[g], group=g, condition=condition,
                                     disabled={str(l): e for l, e in disabled.items()})]


def _counts_unit(unit: WorkUnit, lm: LoadedModel, judge, params: SafexParams) -> Rows:
    return {"safex_counts": safex_counts(lm, records(unit.payload), unit.payload["group"], params)}


def _validation_unit(unit: WorkUnit, lm: LoadedModel, judge, params: SafexParams) -> Rows:
    p = unit.payload
    disabled = {int(layer): experts for layer, experts in p["disabled"].items()}
    rows, gens = safex_validation(lm, records(p), p["group"], disabled, p["condition"], judge, params)
    return {"safex_validation": rows, "generations": gens}


def _bootstrap_unit(unit: WorkUnit, read: Read, params: SafexParams) -> Rows:
    p = unit.payload
    order = {pid: i for i, pid in enumerate(p["prompt_ids"])}
    rows = sorted((r for r in read("safex_counts") if r["group"] == p["group"] and r["prompt_id"] in order),
                  key=lambda r: order[r["prompt_id"]])
    if not rows:
        raise ValueError(f"no stored safex counts for group {p['group']!r}: the counting units failed")
    counts, tokens = stack_counts(rows)  # (P, L, E), (P,)
    selected = bootstrap_selection(counts, tokens, p["rounds"], params.alpha, params.per_layer, params.seed,
                                   round_offset=p["first_round"])  # (L, E)
    layers, experts = torch.nonzero(selected >= 0, as_tuple=True)
    return {"safex_rounds": [
        {"group": p["group"], "phase": params.phase, "first_round": p["first_round"], "rounds": p["rounds"],
         "layer": int(l), "expert": int(e), "selected_rounds": int(selected[l, e]), "params": params.to_json()}
        for l, e in zip(layers.tolist(), experts.tolist())]}


def _sets_unit(unit: WorkUnit, read: Read, params: SafexParams) -> Rows:
    """Selection counts summed over the bootstrap chunks, as (L, E) tensors of the model's shape."""
    shape = (unit.payload["num_layers"], unit.payload["num_experts"])
    selected = {g: torch.zeros(shape, dtype=torch.long) for g in VALIDATED}
    seen = set()
    for r in read("safex_rounds"):
        selected[r["group"]][r["layer"], r["expert"]] += r["selected_rounds"]
        seen.add(r["group"])
    if seen != set(VALIDATED):
        raise ValueError("safex bootstrap results are missing for a group: the bootstrap units failed")
    return {"safex_experts": expert_set_rows(selected["regular"], selected["jailbreak"], params)}


def safex_metrics(read: Read, datasets: Mapping[str, str], judge: str) -> list[dict]:
    """Refusal rate of each validated group per condition, over the answers `judge` decided:
    refusal_before, refusal_after (HRCG disabled), refusal_after_random_<d> (draw d's random experts
    disabled) and refusal_after_random = the mean of the draws' rates (n: their answers together)."""
    refused: dict[tuple[str, str], list[bool]] = {}
    verdicts = verdicts_of(read, "safex", judge)
    for group in VALIDATED:
        for (dataset, condition, _), verdict in verdicts.items():
            if (dataset == datasets[group] and (condition in METRIC_NAMES or _random_draw(condition) is not None)
                    and verdict["jailbroken"] is not None):
                refused.setdefault((group, condition), []).append(not verdict["jailbroken"])
    rows = []
    for group in VALIDATED:
        dataset = datasets[group]
        rows += [rate(dataset, METRIC_NAMES[c], refused[(group, c)]) for c in CONDITIONS if (group, c) in refused]
        draws = sorted((_random_draw(c), values) for (g, c), values in refused.items()
                       if g == group and _random_draw(c) is not None)
        per_draw = [rate(dataset, f"refusal_after_{random_condition(d)}", values) for d, values in draws]
        if per_draw:
            rows.append({"dataset": dataset, "metric": "refusal_after_random",
                         "value": sum(r["value"] for r in per_draw) / len(per_draw),
                         "n": sum(r["n"] for r in per_draw)})
        rows += per_draw
    return rows


METHOD = Method(
    name="safex", params=SafexParams, plan=plan_safex,
    units={"safex_counts": UnitKind(_counts_unit), "safex_validation": UnitKind(_validation_unit),
           "safex_bootstrap": UnitKind(_bootstrap_unit, on_driver=True),
           "safex_sets": UnitKind(_sets_unit, on_driver=True)},
    reduce=safex_metrics,
    tables=("safex_counts", "safex_rounds", "safex_experts", "safex_validation", "generations"),
    roles=VALIDATED, optional_roles=("benign",),
)
