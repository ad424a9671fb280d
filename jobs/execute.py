"""Executors: what each kind of work unit computes, as rows per result table.

Model units run on a model actor (`execute_unit`); driver units are arithmetic over the rows
earlier stages stored (`execute_driver_unit`). Both return {table: rows}; writing is the
caller's job, all tables of a unit together.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Mapping, Sequence

import torch

from core.models import LoadedModel
from jobs.manifest import method_params
from jobs.units import REFUSAL_REPLY, WorkUnit, _records

Rows = dict[str, list[dict]]
STORE_ANSWERS = ("full", "hash", "none")


# ---- model units -----------------------------------------------------------------------------

def _fsour_precheck(unit, lm, judge, params) -> Rows:
    from core.fsour import fsour_precheck

    rows, gens = fsour_precheck(lm, _records(unit.payload), judge, params)
    return {"fsour_routes": rows, "generations": gens}


def _fsour_restart(unit, lm, judge, params) -> Rows:
    from core.fsour import fsour_restart

    row, gen = fsour_restart(lm, _records(unit.payload)[0], unit.payload["restart"], judge, params)
    return {"fsour_routes": [row], "generations": [gen]}


def _rosais_scores(unit, lm, judge, params) -> Rows:
    from core.rosais import rosais_scores

    return {"rosais_scores": rosais_scores(lm, _records(unit.payload), [unit.payload["layer"]], params)}


def _rosais_attack(unit, lm, judge, params) -> Rows:
    from core.rosais import rosais_attack

    p = unit.payload
    rows, gens = rosais_attack(lm, _records(p), p["ranking"], p["score_rows"], judge=judge, L_values=[p["L"]],
                               params=params)
    return {"rosais_attack": rows, "generations": gens}


def _safex_counts(unit, lm, judge, params) -> Rows:
    from core.safex import safex_counts

    return {"safex_counts": safex_counts(lm, _records(unit.payload), unit.payload["group"], params)}


def _safex_validation(unit, lm, judge, params) -> Rows:
    from core.safex import safex_validation

    p = unit.payload
    disabled = {int(layer): experts for layer, experts in p["disabled"].items()}
    rows, gens = safex_validation(lm, _records(p), p["group"], disabled, p["condition"], judge, params)
    return {"safex_validation": rows, "generations": gens}


def _steer_rank(unit, lm, judge, params) -> Rows:
    from core.steermoe import steer_rank

    prompts = _records(unit.payload)
    missing = [p.id for p in prompts if not p.target]
    if missing:
        raise ValueError(f"steermoe needs each prompt's target (compliance reply); missing for {missing[:3]}")
    rows = steer_rank(lm, prompts, [REFUSAL_REPLY] * len(prompts), [p.target for p in prompts], params)
    return {"steer_experts": rows}


def _steer_generate(unit, lm, judge, params) -> Rows:
    from core.steermoe import steer_generate, steer_route

    p = unit.payload
    route = None
    if p["condition"] == "steered":
        route = steer_route(p["top"], params.top_n, lm.control.num_experts, params.mode, params.scope)
    _, gens = steer_generate(lm, _records(p), route, judge, params, condition=p["condition"])
    return {"generations": gens}


MODEL_UNITS: dict[str, Callable[..., Rows]] = {
    "fsour_precheck": _fsour_precheck, "fsour_restart": _fsour_restart,
    "rosais_scores": _rosais_scores, "rosais_attack": _rosais_attack,
    "safex_counts": _safex_counts, "safex_validation": _safex_validation,
    "steer_rank": _steer_rank, "steer_generate": _steer_generate,
}


def execute_unit(unit: WorkUnit, lm: LoadedModel, judges: Mapping[str, Any], store_answers: str) -> Rows:
    """Run a model unit; generated answers are kept, hashed or dropped per `store_answers`."""
    judge = judges[unit.payload["judge"]]
    tables = MODEL_UNITS[unit.kind](unit, lm, judge, method_params(unit.method, unit.payload["params"]))
    if "generations" in tables:
        tables["generations"] = [_stored_answer(g, store_answers) for g in tables["generations"]]
    return tables


def _stored_answer(row: dict, store_answers: str) -> dict:
    answer = row["answer"]
    return {**row, "answer": answer if store_answers == "full" else None,
            "answer_sha256": "" if store_answers == "none" else hashlib.sha256(answer.encode()).hexdigest(),
            "store_answers": store_answers}


# ---- driver units ------------------------------------------------------------------------------

def _metric(dataset: str | None, method: str, metric: str, decided: Sequence[bool]) -> dict:
    return {"dataset": dataset, "method": method, "metric": metric,
            "value": sum(decided) / len(decided) if decided else float("nan"), "n": len(decided)}


def _fsour_metrics(unit, read, params) -> Rows:
    from core.fsour import select_restart

    dataset = unit.payload["datasets"]["dataset"]
    by_prompt: dict[str, list[dict]] = {}
    for r in read("fsour_routes"):
        if r["dataset"] == dataset:
            by_prompt.setdefault(r["prompt_id"], []).append(r)
    baseline = [rows for rows in by_prompt.values() if any(r["restart"] == -1 for r in rows)]
    prechecked = [next(r for r in rows if r["restart"] == -1)["jailbroken"] for rows in baseline]
    attacked = []
    for rows in by_prompt.values():
        chosen = select_restart(rows)
        if chosen is not None and rows[chosen]["jailbroken"] is not None:
            attacked.append(rows[chosen]["jailbroken"])
    return {"metrics": [_metric(dataset, "fsour", "asr", attacked),
                        _metric(dataset, "fsour", "asr_baseline", [j for j in prechecked if j is not None])]}


def _rosais_metrics(unit, read, params) -> Rows:
    dataset = unit.payload["datasets"]["dataset"]
    by_L: dict[int, list[bool]] = {}
    for r in read("rosais_attack"):
        if r["dataset"] == dataset and r["jailbroken"] is not None:
            by_L.setdefault(r["L"], []).append(r["jailbroken"])
    return {"metrics": [_metric(dataset, "rosais", f"asr_at_L{L}", by_L[L]) for L in sorted(by_L)]}


def _safex_bootstrap(unit, read, params) -> Rows:
    from core.safex import bootstrap_selection, stack_counts

    p = unit.payload
    rows = [r for r in read("safex_counts") if r["group"] == p["group"]]
    order = {pid: i for i, pid in enumerate(p["prompt_ids"])}
    rows = sorted((r for r in rows if r["prompt_id"] in order), key=lambda r: order[r["prompt_id"]])
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


def _safex_sets(unit, read, params) -> Rows:
    from core.safex import expert_set_rows

    totals = {}
    for r in read("safex_rounds"):
        table = totals.setdefault(r["group"], {})
        table[(r["layer"], r["expert"])] = table.get((r["layer"], r["expert"]), 0) + r["selected_rounds"]
    if set(totals) != {"regular", "jailbreak"}:
        raise ValueError("safex bootstrap results are missing for a group: the bootstrap units failed")
    n_layers = 1 + max(l for l, _ in totals["regular"])
    n_experts = 1 + max(e for _, e in totals["regular"])

    def dense(group):
        t = torch.zeros(n_layers, n_experts, dtype=torch.long)
        for (l, e), v in totals[group].items():
            t[l, e] = v
        return t

    return {"safex_experts": expert_set_rows(dense("regular"), dense("jailbreak"), params)}


def _safex_metrics(unit, read, params) -> Rows:
    names = {"before": "refusal_before", "after": "refusal_after", "random": "refusal_after_random"}
    decided: dict[tuple[str, str], list[bool]] = {}
    for r in read("safex_validation"):
        if r["refused"] is not None:
            decided.setdefault((r["group"], r["condition"]), []).append(r["refused"])
    datasets = unit.payload["datasets"]
    return {"metrics": [_metric(datasets[group], "safex", names[condition], values)
                        for (group, condition), values in sorted(decided.items())]}


def _steer_metrics(unit, read, params) -> Rows:
    dataset = unit.payload["datasets"]["dataset"]
    decided: dict[str, list[bool]] = {}
    for r in read("generations"):
        if r["method"] == "steermoe" and r["dataset"] == dataset:
            verdict = r["verdicts"][0]
            if verdict["jailbroken"] is not None:
                decided.setdefault(r["condition"], []).append(verdict["jailbroken"])
    return {"metrics": [_metric(dataset, "steermoe", f"asr_{c}", v) for c, v in sorted(decided.items())]}


DRIVER_UNITS: dict[str, Callable[..., Rows]] = {
    "fsour_metrics": _fsour_metrics, "rosais_metrics": _rosais_metrics, "safex_bootstrap": _safex_bootstrap,
    "safex_sets": _safex_sets, "safex_metrics": _safex_metrics, "steer_metrics": _steer_metrics,
}


def execute_driver_unit(unit: WorkUnit, read: Callable[[str], list[dict]]) -> Rows:
    return DRIVER_UNITS[unit.kind](unit, read, method_params(unit.method, unit.payload["params"]))
