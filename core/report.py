"""The numbers behind every table and figure of `moesafe report`: pure functions of result rows.

Rows are dicts (a pyarrow Table's `to_pylist()`, or rows built by hand); a pa.Table is accepted
wherever rows are. Nothing here reads the store, draws, or imports Ray: `jobs/report.py` loads
the tables and renders what these functions return.

Columns that later schema versions add are read when present: `metrics.judge` (several judges
per method; without the column a metric row belongs to its method's one judge, named from the
run's manifest), `units.reused_from` (the store's mark of a unit copied from an earlier run; also
`units.status == "reused"` or `units.reused`), a model's `revision` (from
the manifest, or a `revision` column) and `metrics.model_path` (v3: which model a name stood for).
"""
from __future__ import annotations

import json
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import pyarrow as pa
import yaml

Z95 = 1.959963984540054  # standard normal quantile of 0.975
FALLBACK_JUDGE = "judge"  # a metric row's judge when neither the row nor the manifest names one
# Per method: the metric that measures the attack (or intervention) and the one it is compared with.
HEADLINE_METRICS = {
    "fsour": ("asr", "asr_baseline"),
    "steermoe": ("asr_steered", "asr_unsteered"),
    "safex": ("refusal_after", "refusal_before"),
    "fsour_transfer": ("transfer_asr", "transfer_asr_baseline"),  # other prompts' routes vs unrouted
    "route_monitor": ("asr_adaptive", None),  # the adaptive attacker; its detection: metrics
    "universal_route": ("universal_asr_heldout", "asr_heldout_unrouted"),  # one route on prompts it never saw
}
_ASR_AT_L = re.compile(r"asr_at_L(\d+)")

Rows = "Sequence[Mapping[str, Any]] | pa.Table"


def rows_of(data: Any) -> list[dict]:
    """Rows as dicts, from a pa.Table or any iterable of mappings."""
    if isinstance(data, pa.Table):
        return data.to_pylist()
    return [dict(r) for r in data]


# ---- intervals -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rate:
    """k of n, with its Wilson 95% interval; value, low and high are nan when n is 0."""

    k: int
    n: int

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else math.nan

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.k, self.n)


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the proportion k/n (z = 1.96: 95%)."""
    if n <= 0:
        return math.nan, math.nan
    if not 0 <= k <= n:
        raise ValueError(f"a rate needs 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def metric_rate(value: float | None, n: int | None) -> Rate | None:
    """A `metrics` row's value as k of n (values are shares of n decided verdicts); None when the
    value is not a share (nan, or outside [0, 1])."""
    if value is None or n is None or not n or math.isnan(value) or not 0 <= value <= 1:
        return None
    return Rate(round(value * n), n)


@dataclass(frozen=True)
class MeanInterval:
    """Mean of n values with a normal-approximation 95% interval (mean +- 1.96 standard errors);
    the interval is nan for fewer than two values."""

    mean: float
    n: int
    low: float
    high: float


def mean_interval(values: Sequence[float]) -> MeanInterval:
    n = len(values)
    if not n:
        return MeanInterval(math.nan, 0, math.nan, math.nan)
    mean = math.fsum(values) / n
    if n < 2:
        return MeanInterval(mean, n, math.nan, math.nan)
    half = Z95 * statistics.stdev(values) / math.sqrt(n)
    return MeanInterval(mean, n, mean - half, mean + half)


# ---- the runs' manifests: models, judges -------------------------------------------------------

def parse_manifest(text: str | None) -> dict:
    """A `runs.manifest` YAML text as a dict ({} when empty or not a mapping)."""
    loaded = yaml.safe_load(text) if text else None
    return loaded if isinstance(loaded, dict) else {}


def _method_datasets(entry: Mapping[str, Any]) -> set[str]:
    names = {entry["dataset"]} if entry.get("dataset") else set()
    return names | set((entry.get("datasets") or {}).values())


def method_judges(manifest: Mapping[str, Any]) -> dict[tuple[str, str | None], str]:
    """(method, dataset) -> the judge the manifest gives that method (its first, if it lists
    several); (method, None) for the method whatever the dataset."""
    judges: dict[tuple[str, str | None], str] = {}
    for entry in manifest.get("methods") or []:
        if not isinstance(entry, Mapping) or not entry.get("method"):
            continue
        listed = entry.get("judges") or ([entry["judge"]] if entry.get("judge") else [])
        if not listed:
            continue
        for dataset in (*_method_datasets(entry), None):
            judges.setdefault((entry["method"], dataset), listed[0])
    return judges


def metric_judge(row: Mapping[str, Any], judges: Mapping[tuple[str, str | None], str]) -> str:
    """The judge of a `metrics` row: its `judge` column, else the manifest's judge of its method."""
    if row.get("judge"):
        return row["judge"]
    return judges.get((row["method"], row.get("dataset"))) or judges.get((row["method"], None)) or FALLBACK_JUDGE


def run_judges(run_rows: Rows) -> dict[str, dict[tuple[str, str | None], str]]:
    """run_id -> method_judges of that run's manifest."""
    return {r["run_id"]: method_judges(parse_manifest(r.get("manifest"))) for r in rows_of(run_rows)}


# ---- overview --------------------------------------------------------------------------------

def run_summaries(run_rows: Rows) -> list[dict]:
    """One dict per run, oldest first: id, status, start, end, seconds, moesafe version, models."""
    out = []
    for r in sorted(rows_of(run_rows), key=lambda r: (r["started_at"], r["run_id"])):
        ended = r.get("ended_at")
        versions = r.get("versions")
        versions = json.loads(versions) if isinstance(versions, str) else (versions or {})
        manifest = parse_manifest(r.get("manifest"))
        out.append({"run_id": r["run_id"], "status": r["status"], "started_at": r["started_at"], "ended_at": ended,
                    "seconds": _driver_seconds(r),
                    "versions": versions,
                    "models": [m.get("name") for m in manifest.get("models") or [] if isinstance(m, Mapping)]})
    return out


def _driver_seconds(run: Mapping[str, Any]) -> float | None:
    """How long the run's drivers ran: each attempt's (a first start, then every resume, even one
    that found nothing to do) from its start to its end, without the hours between attempts that
    `ended_at - started_at` would count. None while an attempt runs."""
    attempts = run.get("attempts") or [{"started_at": run["started_at"], "ended_at": run.get("ended_at")}]
    if any(a["ended_at"] is None for a in attempts):
        return None
    return sum((a["ended_at"] - a["started_at"]).total_seconds() for a in attempts)


def model_summaries(run_rows: Rows, *tables: Rows) -> list[dict]:
    """One dict per (run, model of its manifest): name, path, revision (None: not pinned). A
    `revision` column in any of `tables` fills a revision the manifest does not give."""
    seen_revisions: dict[tuple[str, str], str] = {}
    for table in tables:
        for r in rows_of(table):
            if r.get("revision") and r.get("run_id") and r.get("model"):
                seen_revisions.setdefault((r["run_id"], r["model"]), r["revision"])
    out = []
    for run in rows_of(run_rows):
        for m in parse_manifest(run.get("manifest")).get("models") or []:
            if not isinstance(m, Mapping) or not m.get("name"):
                continue
            out.append({"run_id": run["run_id"], "model": m["name"], "path": m.get("path"),
                        "revision": m.get("revision") or seen_revisions.get((run["run_id"], m["name"])),
                        "dtype": m.get("dtype"), "replicas": m.get("replicas")})
    return sorted(out, key=lambda m: (m["run_id"], m["model"]))


def _is_reused(unit: Mapping[str, Any]) -> bool:
    return bool(unit.get("reused_from")) or unit.get("status") == "reused" or bool(unit.get("reused"))


def unit_health(unit_rows: Rows) -> list[dict]:
    """Per (run, model): units ok, failed, retried (more than one attempt) and reused; the sum of
    unit seconds; and the wall time from the first unit's start to the last unit's end."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for u in rows_of(unit_rows):
        groups[(u["run_id"], u["model"])].append(u)
    out = []
    for (run_id, model), units in sorted(groups.items()):
        starts = [u["finished_at"].timestamp() - (u["seconds"] or 0) for u in units]
        ends = [u["finished_at"].timestamp() for u in units]
        reused = sum(_is_reused(u) for u in units)
        out.append({
            "run_id": run_id, "model": model, "units": len(units),
            "ok": sum(u["status"] == "ok" and not _is_reused(u) for u in units),
            "failed": sum(u["status"] == "failed" for u in units),
            "retried": sum((u.get("attempts") or 1) > 1 for u in units),
            "reused": reused,
            "unit_seconds": math.fsum(u["seconds"] or 0 for u in units),
            "wall_seconds": max(ends) - min(starts),
        })
    return out


def failed_units(unit_rows: Rows) -> list[dict]:
    return sorted(({k: u.get(k) for k in ("run_id", "model", "method", "kind", "unit_id", "attempts", "error")}
                   for u in rows_of(unit_rows) if u["status"] == "failed"),
                  key=lambda u: (u["run_id"], u["model"], u["unit_id"]))


# ---- metrics: ASR table, every metric, run-vs-run -------------------------------------------------

def judged_metrics(metric_rows: Rows, judges_by_run: Mapping[str, Mapping]) -> list[dict]:
    """`metrics` rows with `judge` filled (see metric_judge) and `rate` (a Rate, or None)."""
    out = []
    for r in rows_of(metric_rows):
        judge = metric_judge(r, judges_by_run.get(r["run_id"], {}))
        out.append({**r, "judge": judge, "rate": metric_rate(r["value"], r["n"])})
    return sorted(out, key=lambda r: (r["run_id"], r["model"], r["method"], str(r.get("dataset")), r["judge"],
                                      r["metric"]))


def headline_metrics(method: str, metric_names: Iterable[str]) -> tuple[str | None, str | None]:
    """(attacked, baseline) metric names of a method. RoSais: ASR at its largest L against L = 0."""
    names = set(metric_names)
    if method == "rosais":
        levels = sorted(int(m.group(1)) for m in map(_ASR_AT_L.fullmatch, names) if m)
        return (f"asr_at_L{levels[-1]}" if levels else None), ("asr_at_L0" if 0 in levels else None)
    attacked, baseline = HEADLINE_METRICS.get(method, ("asr", "asr_baseline"))
    return (attacked if attacked in names else None), (baseline if baseline in names else None)


def asr_table(judged: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Models x methods x judges: per (run, model, method, dataset, judge) the headline metric and
    its baseline, each a metrics row (value, n, rate) or None."""
    groups: dict[tuple, dict[str, Mapping]] = defaultdict(dict)
    for r in judged:
        groups[(r["run_id"], r["model"], r["method"], r.get("dataset"), r["judge"])][r["metric"]] = r
    out = []
    for (run_id, model, method, dataset, judge), by_metric in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        attacked, baseline = headline_metrics(method, by_metric)
        if attacked is None and baseline is None:
            continue
        out.append({"run_id": run_id, "model": model, "method": method, "dataset": dataset, "judge": judge,
                    "attacked": by_metric.get(attacked), "baseline": by_metric.get(baseline)})
    return out


def model_source(row: Mapping[str, Any]) -> str | None:
    """"path@revision" of a `metrics` row's model (v3 columns; None in older rows)."""
    path = row.get("model_path")
    return f"{path}@{row['revision']}" if path and row.get("revision") else path


def metric_deltas(judged: Sequence[Mapping[str, Any]], run_a: str, run_b: str) -> list[dict]:
    """Every (model, method, dataset, judge, metric) of runs A and B: both rows (or None when one
    run lacks it), delta = B - A, and `sources` ("A's path → B's path") when the model's name
    stands for another path or revision in B (e.g. a new checkpoint), else None."""
    by_key: dict[tuple, dict[str, Mapping]] = defaultdict(dict)
    for r in judged:
        if r["run_id"] in (run_a, run_b):
            by_key[(r["model"], r["method"], r.get("dataset"), r["judge"], r["metric"])][r["run_id"]] = r
    out = []
    for key, runs in sorted(by_key.items(), key=lambda kv: tuple(map(str, kv[0]))):
        a, b = runs.get(run_a), runs.get(run_b)
        delta = b["value"] - a["value"] if a and b else None
        sources = (model_source(a), model_source(b)) if a and b else (None, None)
        moved = f"{sources[0]} → {sources[1]}" if all(sources) and sources[0] != sources[1] else None
        out.append(dict(zip(("model", "method", "dataset", "judge", "metric"), key), a=a, b=b, delta=delta,
                        sources=moved))
    return out


# ---- RoSais ----------------------------------------------------------------------------------

def rosais_layer_scores(score_rows: Rows) -> dict[tuple[str, str, str], list[dict]]:
    """(run, model, dataset) -> per MoE layer: mean RoSais over prompts with its interval, and the
    layer's rank (0 = masked first; core.rosais.rank_layers, the attack's own ranking)."""
    from core.rosais import rank_layers

    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in rows_of(score_rows):
        groups[(r["run_id"], r["model"], r["dataset"])].append(r)
    out = {}
    for key, rows in sorted(groups.items()):
        rank = {layer: i for i, layer in enumerate(rank_layers(rows))}
        by_layer: dict[int, list[float]] = defaultdict(list)
        for r in rows:
            by_layer[r["layer"]].append(r["score"])
        out[key] = [{"layer": layer, "rank": rank[layer], "score": mean_interval(scores)}
                    for layer, scores in sorted(by_layer.items())]
    return out


def asr_by_L(judged: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str, str, str], list[tuple[int, Rate]]]:
    """(run, model, dataset, judge) -> [(L, ASR(L))] from the `asr_at_L<L>` metrics, by L."""
    out: dict[tuple, list[tuple[int, Rate]]] = defaultdict(list)
    for r in judged:
        match = _ASR_AT_L.fullmatch(r["metric"]) if r["method"] == "rosais" else None
        if match and r["rate"] is not None:
            out[(r["run_id"], r["model"], r.get("dataset"), r["judge"])].append((int(match.group(1)), r["rate"]))
    return {key: sorted(levels) for key, levels in sorted(out.items(), key=lambda kv: tuple(map(str, kv[0])))}


# ---- SAFEx -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SelectionMatrix:
    """Selection frequency (share of S bootstrap rounds whose Top-N held the expert), (L, E)."""

    group: str
    rounds: int
    frequency: list[list[float]]  # [layer][expert]


def safex_shapes(count_rows: Rows) -> dict[tuple[str, str], tuple[int, int]]:
    """(run, model) -> (MoE layers, experts), from the `safex_counts` rows."""
    return {(r["run_id"], r["model"]): (r["n_layers"], r["n_experts"]) for r in rows_of(count_rows)}


def _dense(cells: Mapping[tuple[int, int], float], shape: tuple[int, int]) -> list[list[float]]:
    n_layers, n_experts = shape
    matrix = [[0.0] * n_experts for _ in range(n_layers)]
    for (layer, expert), value in cells.items():
        matrix[layer][expert] = value
    return matrix


def safex_selection(round_rows: Rows, shapes: Mapping[tuple[str, str], tuple[int, int]]
                    ) -> dict[tuple[str, str], list[SelectionMatrix]]:
    """(run, model) -> a SelectionMatrix per bootstrapped group, from the `safex_rounds` chunks:
    selected rounds summed over chunks over the rounds of the distinct chunks."""
    selected: dict[tuple[str, str, str], dict[tuple[int, int], int]] = defaultdict(lambda: defaultdict(int))
    chunks: dict[tuple[str, str, str], dict[int, int]] = defaultdict(dict)
    for r in rows_of(round_rows):
        key = (r["run_id"], r["model"], r["group"])
        selected[key][(r["layer"], r["expert"])] += r["selected_rounds"]
        chunks[key][r["first_round"]] = r["rounds"]
    out: dict[tuple[str, str], list[SelectionMatrix]] = defaultdict(list)
    for (run_id, model, group), cells in sorted(selected.items()):
        rounds = sum(chunks[(run_id, model, group)].values())
        shape = shapes.get((run_id, model)) or (1 + max(l for l, _ in cells), 1 + max(e for _, e in cells))
        out[(run_id, model)].append(
            SelectionMatrix(group, rounds, _dense({c: v / rounds for c, v in cells.items()}, shape)))
    return dict(out)


def bootstrap_frequency(count_rows: Rows, group: str) -> dict[tuple[str, str], SelectionMatrix]:
    """(run, model) -> the selection frequency of a group the run counted but did not bootstrap
    (benign), by the run's own bootstrap (core.safex) with its parameters (each row's `params`)."""
    from core.safex import bootstrap_selection, stack_counts

    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows_of(count_rows):
        if r["group"] == group:
            groups[(r["run_id"], r["model"])].append(r)
    out = {}
    for key, rows in sorted(groups.items()):
        rows.sort(key=lambda r: r["prompt_id"])
        params = json.loads(rows[0]["params"])
        counts, tokens = stack_counts(rows)
        if not int(tokens.sum()):
            continue
        selected = bootstrap_selection(counts, tokens, params["rounds"], params["alpha"], params["per_layer"],
                                       params["seed"])
        out[key] = SelectionMatrix(group, params["rounds"], (selected.double() / params["rounds"]).tolist())
    return out


def safex_sets(expert_rows: Rows) -> dict[tuple[str, str], dict[str, list[tuple[int, int]]]]:
    """(run, model) -> expert set name (HCDG, HRCG, E_top_regular, ...) -> sorted (layer, expert)."""
    out: dict[tuple[str, str], dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for r in rows_of(expert_rows):
        out[(r["run_id"], r["model"])][r["expert_set"]].add((r["layer"], r["expert"]))
    return {key: {name: sorted(cells) for name, cells in sets.items()} for key, sets in out.items()}


def _condition_order(condition: str) -> tuple:
    fixed = {"before": 0, "after": 1}
    return (fixed.get(condition, 2), condition)


def safex_refusal(validation_rows: Rows) -> dict[tuple[str, str, str, str], list[dict]]:
    """(run, model, group, judge) -> per condition (before, after, then each random draw): the
    refusal rate over decided verdicts and the number of experts disabled."""
    counts: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(lambda: [0, 0, 0]))
    for r in rows_of(validation_rows):
        cell = counts[(r["run_id"], r["model"], r["group"], r["judge"])][r["condition"]]
        if r["refused"] is not None:
            cell[0] += bool(r["refused"])
            cell[1] += 1
        cell[2] = max(cell[2], r["n_disabled"])
    return {key: [{"condition": c, "refusal": Rate(k, n), "n_disabled": d}
                  for c, (k, n, d) in sorted(by_condition.items(), key=lambda kv: _condition_order(kv[0]))]
            for key, by_condition in sorted(counts.items())}


# ---- F-SOUR ----------------------------------------------------------------------------------

def _by_prompt(route_rows: Rows) -> dict[tuple[str, str], dict[str, list[dict]]]:
    out: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows_of(route_rows):
        out[(r["run_id"], r["model"])][f'{r["dataset"]}/{r["prompt_id"]}'].append(r)
    return out


@dataclass(frozen=True)
class RouteChanges:
    """counts[p][l]: prompts whose reported route forced layer l at prompt position p, where p
    counts from the end of the prompt (0 = its last token) when `from_end`, else from its start."""

    counts: list[list[int]]
    from_end: bool
    prompts: int


def fsour_route_changes(route_rows: Rows, n_layers: Mapping[tuple[str, str], int] | None = None
                        ) -> dict[tuple[str, str], RouteChanges]:
    """(run, model) -> RouteChanges of each prompt's reported restart (core.fsour.select_restart:
    the one the `asr` metric counts). Positions count from the end of the prompt when every route
    row knows its prompt length (`prompt_tokens`, schema v2), else from the start."""
    from core.fsour import select_restart

    out = {}
    for key, prompts in sorted(_by_prompt(route_rows).items()):
        chosen = []
        for rows in prompts.values():
            rows.sort(key=lambda r: r["restart"])
            index = select_restart(rows)
            if index is not None:
                chosen.append(rows[index])
        from_end = all(r.get("prompt_tokens") is not None for r in chosen if r["route"])
        cells: dict[tuple[int, int], int] = defaultdict(int)
        for r in chosen:
            for position, layer in {(r["prompt_tokens"] - 1 - s["token"] if from_end else s["token"], s["layer"])
                                    for s in r["route"]}:
                cells[(position, layer)] += 1
        layers = max([l + 1 for _, l in cells] + [(n_layers or {}).get(key, 0)])
        positions = max([p + 1 for p, _ in cells], default=0)
        counts = [[cells.get((p, l), 0) for l in range(layers)] for p in range(positions)]
        out[key] = RouteChanges(counts, from_end, len(chosen))
    return out


def fsour_cost(route_rows: Rows) -> dict[tuple[str, str], list[dict]]:
    """(run, model) -> per prompt: forwards and candidates over all its restarts, restarts run
    (a prompt jailbroken unattacked has none)."""
    out = {}
    for key, prompts in sorted(_by_prompt(route_rows).items()):
        out[key] = [{"prompt": prompt,
                     "forwards": sum(r["forwards"] for r in rows if r["restart"] >= 0),
                     "candidates": sum(r["candidates"] for r in rows if r["restart"] >= 0),
                     "restarts": sum(r["restart"] >= 0 for r in rows)}
                    for prompt, rows in sorted(prompts.items())]
    return out


def fsour_asr_by_restart(route_rows: Rows) -> dict[tuple[str, str], list[tuple[int, Rate]]]:
    """(run, model) -> [(r, share of prompts jailbroken at the pre-check (-1) or a restart <= r)],
    r = -1 .. the last restart run; a verdict the judge could not give counts as not jailbroken."""
    out = {}
    for key, prompts in sorted(_by_prompt(route_rows).items()):
        first: list[float] = []
        for rows in prompts.values():
            broken = [r["restart"] for r in rows if r["jailbroken"]]
            first.append(min(broken) if broken else math.inf)
        last = max(r["restart"] for rows in prompts.values() for r in rows)
        out[key] = [(restart, Rate(sum(f <= restart for f in first), len(first))) for restart in range(-1, last + 1)]
    return out


# ---- SteerMoE --------------------------------------------------------------------------------

def steer_top_experts(steer_rows: Rows, units: Rows, top: int | None = None) -> dict[tuple[str, str, str], list[dict]]:
    """(run, model, dataset) -> SteerMoE's top experts by |delta| (rank 0 first): the `top` first, by
    default as many as the run steered (`top_n` of the rows' params). Only rows of SteerMoE's own
    units count: the universal route ranks experts too (its baseline), with settings of its own."""
    steermoe = {(u["run_id"], u["unit_id"]) for u in rows_of(units) if u["method"] == "steermoe"}
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in rows_of(steer_rows):
        if (r["run_id"], r["unit_id"]) in steermoe:
            groups[(r["run_id"], r["model"], r["dataset"])].append(r)
    out = {}
    for key, rows in sorted(groups.items()):
        rows.sort(key=lambda r: r["rank"])
        count = top if top is not None else json.loads(rows[0]["params"]).get("top_n", len(rows))
        out[key] = [{k: r[k] for k in ("layer", "expert", "p1", "p2", "delta", "rank")} for r in rows[:count]]
    return out


# ---- where safety lives: one map per model -------------------------------------------------------

def safety_map(n_layers: int, layer_scores: Sequence[Mapping] | None = None,
               route_changes: RouteChanges | None = None,
               sets: Mapping[str, Sequence[tuple[int, int]]] | None = None,
               steer_top: Sequence[Mapping] | None = None) -> list[dict]:
    """Per MoE layer, each method's view of it: RoSais mean score and rank, F-SOUR route changes
    (summed over positions), the layer's HCDG and HRCG experts, its SteerMoE top experts."""
    scores = {r["layer"]: r for r in layer_scores or []}
    sets = sets or {}
    rows = []
    for layer in range(n_layers):
        score = scores.get(layer)
        changes = sum(row[layer] for row in route_changes.counts) if route_changes and layer < len(
            route_changes.counts[0] if route_changes.counts else []) else 0
        rows.append({
            "layer": layer,
            "rosais_mean": score["score"].mean if score else None,
            "rosais_rank": score["rank"] if score else None,
            "fsour_changes": changes if route_changes else None,
            "hcdg": [e for l, e in sets.get("HCDG", []) if l == layer],
            "hrcg": [e for l, e in sets.get("HRCG", []) if l == layer],
            "steer": [(r["expert"], r["delta"]) for r in steer_top or [] if r["layer"] == layer],
        })
    return rows


# ---- sample answers --------------------------------------------------------------------------

def sample_answers(generation_rows: Rows, prompts_per_method: int = 2, max_rows: int = 8) -> dict[tuple[str, str, str], list[dict]]:
    """(run, model, method) -> the answers to its first prompts (by id) under every condition: the
    text when the run kept it, else its SHA-256, else a note; with every judge's verdict."""
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in rows_of(generation_rows):
        groups[(r["run_id"], r["model"], r["method"])].append(r)
    out = {}
    for key, rows in sorted(groups.items()):
        first = sorted({(r["dataset"], r["prompt_id"]) for r in rows})[:prompts_per_method]
        chosen = sorted((r for r in rows if (r["dataset"], r["prompt_id"]) in first),
                        key=lambda r: (r["dataset"], r["prompt_id"], _condition_key(r["condition"])))[:max_rows]
        out[key] = [{"prompt_id": r["prompt_id"], "dataset": r["dataset"], "condition": r["condition"],
                     "prompt": r["prompt"], "answer": r["answer"], "answer_sha256": r["answer_sha256"] or None,
                     "store_answers": r["store_answers"],
                     "verdicts": [{"judge": v["judge"], "jailbroken": v["jailbroken"], "score": v["score"]}
                                  for v in r["verdicts"] or []]}
                    for r in chosen]
    return out


_UNATTACKED = ("baseline", "before", "unsteered")


def _condition_key(condition: str) -> tuple:
    """Orders conditions naturally: the unattacked one first, then by name and any number they
    hold (L=2 before L=10)."""
    number = re.search(r"-?\d+", condition)
    return (condition not in _UNATTACKED, re.sub(r"-?\d+", "", condition), int(number.group()) if number else -2)

