"""`moesafe report`: one self-contained HTML page of a result root's runs.

    write_report("results")                                  # -> results/report.html
    write_report("s3://b/nightly", html="nightly.html", compare=("nightly-1", "nightly-2"))

The numbers come from core.report; this module loads the tables, draws each figure with
matplotlib (Agg, no pyplot state) as an SVG inlined as a data: URI, and fills the jinja2
template `report.html.jinja`. The page fetches nothing: no script, font or stylesheet, and the
SVGs carry their text as paths.
"""
from __future__ import annotations

import base64
import io
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import jinja2
import matplotlib

matplotlib.use("Agg")  # no display here, and none needed: figures are only ever saved
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from core import report as numbers  # noqa: E402
from core.schemas import RESULT_TABLES, RUNS_TABLE, UNITS_TABLE  # noqa: E402
from core.store import ResultStore, StoreError  # noqa: E402

SECTIONS = (("overview", "Overview"), ("rosais", "RoSais"), ("safex", "SAFEx"), ("fsour", "F-SOUR"),
            ("steermoe", "SteerMoE"), ("beyond", "Beyond the papers"), ("maps", "Where safety lives"),
            ("compare", "Compare"),
            ("samples", "Sample answers"))
REPORT_FILE = "report.html"
BEYOND_METHODS = ("fsour_transfer", "universal_route", "route_monitor")  # every metric of theirs, as a table
SAFEX_GROUPS = ("regular", "jailbreak", "benign")
_RC = {"svg.fonttype": "path", "svg.hashsalt": "moesafe", "font.size": 9, "axes.titlesize": 10,
       "axes.spines.top": False, "axes.spines.right": False}
_BLUE, _RED, _GREY, _GREEN = "#2b6cb0", "#c53030", "#718096", "#2f855a"


class ReportError(ValueError):
    """The report cannot be made as asked (no runs, an unknown run id); nothing was written."""


@dataclass
class FigureHtml:
    """One figure: its anchor id, caption and the SVG as a data: URI."""

    id: str
    caption: str
    src: str
    width: int  # CSS pixels at 100% zoom: a figure is never drawn wider than it was made


@dataclass
class Block:
    """A titled part of a section: figures plus the rows of its table."""

    title: str
    figures: list[FigureHtml] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    note: str | None = None


# ---- loading ---------------------------------------------------------------------------------

def load_tables(root: str, run_ids: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """Every table's rows (committed units only) of the given runs, or of every run under `root`."""
    store = ResultStore(root, read_only=True)
    runs = store.read_table(RUNS_TABLE).to_pylist()
    if not runs:
        raise ReportError(f"no runs under {store.root}: pass the result root of a run with --out")
    known = {r["run_id"] for r in runs}
    wanted = list(dict.fromkeys(run_ids or sorted(known)))
    unknown = [r for r in wanted if r not in known]
    if unknown:
        raise ReportError(f"no run {', '.join(map(repr, unknown))} under {store.root}; its runs: {', '.join(sorted(known))}")
    tables = {RUNS_TABLE: [r for r in runs if r["run_id"] in wanted]}
    for name in (UNITS_TABLE, *RESULT_TABLES):
        if set(wanted) == known:  # one listing per table, not one per run (each is a round trip on S3)
            tables[name] = store.read_table(name).to_pylist()
        else:
            tables[name] = [row for run_id in wanted for row in store.read_table(name, run_id=run_id).to_pylist()]
    return tables


# ---- figures ---------------------------------------------------------------------------------

def _figure(width: float, height: float, ncols: int = 1, **kwargs) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False, **kwargs)[0]


def _svg(fig: Figure, fig_id: str, caption: str) -> FigureHtml:
    buffer = io.BytesIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    return FigureHtml(fig_id, caption, "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode(),
                      round(fig.get_figwidth() * 96))


def _draw(fig_id: str, caption: str, width: float, height: float, draw, ncols: int = 1, **kwargs) -> FigureHtml:
    """Build a figure under the report's style (rc_context must be active while artists are made)."""
    with matplotlib.rc_context(_RC):
        fig, axes = _figure(width, height, ncols, **kwargs)
        draw(fig, axes)
    return _svg(fig, fig_id, caption)


def _err(rate: numbers.Rate) -> tuple[float, float]:
    low, high = rate.interval
    return max(0.0, rate.value - low), max(0.0, high - rate.value)  # rounding can put a bound past the value


def _slug(*parts: Any) -> str:
    return "-".join("".join(c if c.isalnum() else "-" for c in str(p)) for p in parts if p is not None)


def _asr_figure(rows: list[dict]) -> FigureHtml:
    labels = [f'{r["model"]} · {r["method"]} · {r["dataset"]} · {r["judge"]}' for r in rows]

    def draw(fig, axes):
        ax = axes[0]
        for offset, part, color in ((-0.18, "baseline", _GREY), (0.18, "attacked", _RED)):
            shown = [(i, r[part]["rate"]) for i, r in enumerate(rows) if r[part] and r[part]["rate"]]
            if shown:
                ax.errorbar([rate.value for _, rate in shown], [i + offset for i, _ in shown],
                            xerr=list(zip(*(_err(rate) for _, rate in shown))), fmt="o", color=color, capsize=3,
                            label=part)
        ax.set_yticks(range(len(rows)), labels)
        ax.invert_yaxis()
        ax.set_xlim(-0.02, 1.02)
        ax.set_xlabel("rate (ASR; SAFEx: refusal), Wilson 95% interval")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)

    return _draw("fig-asr", "Headline rate of each model, method and judge against its baseline (95% Wilson intervals).",
                 9, 0.9 + 0.42 * len(rows), draw)


def _rosais_figure(key, layers: list[dict], by_judge: dict[str, list]) -> FigureHtml:
    run_id, model, dataset = key

    def draw(fig, axes):
        left, right = axes
        xs = [r["layer"] for r in layers]
        means = [r["score"].mean for r in layers]
        errs = [[0 if math.isnan(r["score"].low) else r["score"].mean - r["score"].low for r in layers],
                [0 if math.isnan(r["score"].high) else r["score"].high - r["score"].mean for r in layers]]
        colors = [_RED if r["rank"] == 0 else _BLUE for r in layers]
        left.bar(xs, means, yerr=errs, color=colors, capsize=3)
        for r in layers:
            left.annotate(f'#{r["rank"] + 1}', (r["layer"], r["score"].mean), ha="center", va="bottom",
                          xytext=(0, 3), textcoords="offset points", fontsize=8)
        left.set_xlabel("MoE layer (#: rank, masked in this order)")
        left.set_ylabel("RoSais score (mean over prompts, 95% CI)")
        left.set_xticks(xs)
        for judge, levels in by_judge.items():
            Ls = [L for L, _ in levels]
            right.plot(Ls, [r.value for _, r in levels], "o-", label=judge)
            right.fill_between(Ls, [r.interval[0] for _, r in levels], [r.interval[1] for _, r in levels], alpha=0.2)
        right.set_ylim(-0.02, 1.02)
        right.set_xlabel("L (top-ranked routers masked)")
        right.set_ylabel("ASR(L), Wilson 95%")
        if by_judge:
            right.set_xticks(sorted({L for levels in by_judge.values() for L, _ in levels}))
            right.legend(title="judge", fontsize=8)

    return _draw(_slug("fig-rosais", run_id, model, dataset), f"RoSais on {model}, dataset {dataset} (run {run_id}): "
                 "per-layer score and attack success by the number of masked routers.", 9, 3.2, draw, ncols=2)


def _safex_figure(key, matrices: list[numbers.SelectionMatrix], sets: dict) -> FigureHtml:
    run_id, model = key
    hcdg, hrcg = sets.get("HCDG", []), sets.get("HRCG", [])

    def draw(fig, axes):
        image = None
        for ax, matrix in zip(axes, matrices):
            n_layers, n_experts = len(matrix.frequency), len(matrix.frequency[0])
            image = ax.imshow(matrix.frequency, vmin=0, vmax=1, cmap="Blues", aspect="auto", interpolation="nearest")
            ax.set_title(f"{matrix.group} (S = {matrix.rounds})")
            ax.set_xlabel("expert")
            ax.set_ylabel("MoE layer")
            ax.set_xticks(range(0, n_experts, max(1, n_experts // 8)))
            ax.set_yticks(range(0, n_layers, max(1, n_layers // 8)))
            if hcdg:
                ax.scatter([e for _, e in hcdg], [l for l, _ in hcdg], marker="o", facecolors="none",
                           edgecolors=_GREEN, linewidths=1.6, s=60, label="HCDG")
            if hrcg:
                ax.scatter([e for _, e in hrcg], [l for l, _ in hrcg], marker="x", color=_RED, linewidths=1.6, s=50,
                           label="HRCG")
        if hcdg or hrcg:
            axes[0].legend(loc="upper right", fontsize=7, framealpha=0.8)
        fig.colorbar(image, ax=list(axes), label="selection frequency", shrink=0.9)

    return _draw(_slug("fig-safex", run_id, model), f"SAFEx on {model} (run {run_id}): share of bootstrap rounds whose "
                 "Top-N held each expert; ○ HCDG (detection), × HRCG (control).", 9, 3.0,
                 draw, ncols=len(matrices))


def _refusal_figure(key, by_group: dict[tuple[str, str], list[dict]]) -> FigureHtml:
    run_id, model = key

    def draw(fig, axes):
        ax = axes[0]
        conditions = list(dict.fromkeys(c["condition"] for rows in by_group.values() for c in rows))
        width = 0.8 / max(1, len(by_group))
        for i, ((group, judge), rows) in enumerate(by_group.items()):
            by_c = {c["condition"]: c for c in rows}
            xs = [j + (i - (len(by_group) - 1) / 2) * width for j, c in enumerate(conditions) if c in by_c]
            rates = [by_c[c]["refusal"] for c in conditions if c in by_c]
            ax.bar(xs, [r.value for r in rates], width, yerr=list(zip(*map(_err, rates))), capsize=3,
                   label=f"{group} · {judge}")
        ax.set_xticks(range(len(conditions)), conditions)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("refusal rate, Wilson 95%")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))

    return _draw(_slug("fig-safex-refusal", run_id, model), f"SAFEx validation on {model} (run {run_id}): refusal "
                 "before, after disabling HRCG, and after disabling as many random experts.", 6, 2.8, draw)


def _fsour_figure(key, changes: numbers.RouteChanges | None, cost: list[dict],
                  by_restart: list[tuple[int, numbers.Rate]]) -> FigureHtml:
    run_id, model = key

    def draw(fig, axes):
        heat, spend, restarts = axes
        if changes and changes.counts:
            shown = changes.counts[:40]
            zero_white = ListedColormap(["#ffffff", *matplotlib.colormaps["Reds"](range(40, 256))])
            image = heat.imshow(shown, cmap=zero_white, aspect="auto", interpolation="nearest", vmin=0,
                                vmax=max(1, max(map(max, shown))))
            fig.colorbar(image, ax=heat, label="prompts")
            heat.set_xticks(range(len(shown[0])))
        else:
            heat.text(0.5, 0.5, "no route changed", ha="center", va="center", transform=heat.transAxes)
        heat.set_xlabel("MoE layer")
        heat.set_ylabel("position from the end of the prompt" if not changes or changes.from_end
                        else "prompt position (from the start)")
        heat.set_title("route changes")
        spend.bar(range(len(cost)), [c["candidates"] for c in cost], color=_GREY, alpha=0.45, label="candidates")
        spend.bar(range(len(cost)), [c["forwards"] for c in cost], color=_BLUE, label="forwards")
        spend.set_xlabel("prompt")
        spend.set_ylabel("per prompt, all restarts")
        spend.set_title("search cost")
        spend.legend(fontsize=8)
        xs = [r for r, _ in by_restart]
        restarts.errorbar(xs, [rate.value for _, rate in by_restart], yerr=list(zip(*(_err(r) for _, r in by_restart))),
                          fmt="o-", color=_RED, capsize=3)
        restarts.set_xticks(xs, ["none" if r < 0 else str(r) for r in xs])
        restarts.set_ylim(-0.02, 1.02)
        restarts.set_xlabel("restarts run (none: unattacked)")
        restarts.set_ylabel("ASR, Wilson 95%")
        restarts.set_title("ASR by restart")

    return _draw(_slug("fig-fsour", run_id, model), f"F-SOUR on {model} (run {run_id}): where the reported routes "
                 "were changed, what the search cost, and attack success by restart.", 9.5, 3.2, draw, ncols=3)


def _steer_figure(key, top: list[dict]) -> FigureHtml:
    run_id, model, dataset = key

    def draw(fig, axes):
        ax = axes[0]
        labels = [f'L{r["layer"]} E{r["expert"]}' for r in top]
        ax.barh(range(len(top)), [r["delta"] for r in top], color=[_RED if r["delta"] > 0 else _BLUE for r in top])
        ax.set_yticks(range(len(top)), labels)
        ax.invert_yaxis()
        ax.axvline(0, color="black", linewidth=0.6)
        ax.set_xlabel("Δ = p(refusal) − p(compliance) routing share")

    return _draw(_slug("fig-steermoe", run_id, model, dataset), f"SteerMoE on {model}, dataset {dataset} (run "
                 f"{run_id}): top experts by |Δ|.", 6, 0.9 + 0.28 * len(top), draw)


def _map_figure(key, rows: list[dict], n_experts: int | None) -> FigureHtml:
    run_id, model = key
    layers = [r["layer"] for r in rows]

    def draw(fig, axes):
        rosais, fsour, experts = axes
        rosais.barh(layers, [r["rosais_mean"] or 0 for r in rows], color=_BLUE)
        for r in rows:
            if r["rosais_rank"] is not None:
                rosais.annotate(f'#{r["rosais_rank"] + 1}', (r["rosais_mean"], r["layer"]), va="center",
                                xytext=(3, 0), textcoords="offset points", fontsize=8)
        rosais.set_title("RoSais (mean, #rank)")
        rosais.set_ylabel("MoE layer")
        fsour.barh(layers, [r["fsour_changes"] or 0 for r in rows], color=_RED)
        fsour.set_title("F-SOUR route changes")
        for marker, name, color, part in (("o", "HCDG", _GREEN, "hcdg"), ("x", "HRCG", _RED, "hrcg")):
            points = [(e, r["layer"]) for r in rows for e in r[part]]
            if points:
                experts.scatter(*zip(*points), marker=marker, color=color, label=name, s=40)
        steer = [(e, r["layer"]) for r in rows for e, _ in r["steer"]]
        if steer:
            experts.scatter(*zip(*steer), marker="s", facecolors="none", edgecolors=_GREY, label="SteerMoE top", s=55)
        experts.set_title("experts: SAFEx, SteerMoE")
        experts.set_xlabel("expert")
        if n_experts:
            experts.set_xlim(-0.5, n_experts - 0.5)
        if experts.get_legend_handles_labels()[0]:
            experts.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        for ax in axes:
            ax.set_yticks(layers)
        rosais.invert_yaxis()

    return _draw(_slug("fig-map", run_id, model), f"Where safety lives in {model} (run {run_id}): each method's view "
                 "of each layer, side by side.", 9.5, 1.2 + 0.32 * len(rows), draw, ncols=3, sharey=True)


def _compare_figure(deltas: list[dict], run_a: str, run_b: str) -> FigureHtml:
    shared = [d for d in deltas if d["a"] and d["b"] and d["a"]["rate"] and d["b"]["rate"]]

    def draw(fig, axes):
        ax = axes[0]
        for offset, part, color, name in ((-0.15, "a", _GREY, run_a), (0.15, "b", _BLUE, run_b)):
            rates = [d[part]["rate"] for d in shared]
            if rates:
                ax.errorbar([r.value for r in rates], [i + offset for i in range(len(rates))],
                            xerr=list(zip(*map(_err, rates))), fmt="o", color=color, capsize=3, label=name)
        ax.set_yticks(range(len(shared)), [f'{d["model"]} · {d["method"]} · {d["metric"]} · {d["judge"]}'
                                           for d in shared])
        ax.invert_yaxis()
        ax.set_xlim(-0.02, 1.02)
        ax.set_xlabel("rate, Wilson 95%")
        if shared:
            ax.legend(fontsize=8, loc="lower right")

    return _draw("fig-compare", f"Every rate of run {run_a} (grey) against run {run_b} (blue).", 9,
                 0.9 + 0.36 * max(1, len(shared)), draw)


# ---- the page --------------------------------------------------------------------------------

def build_context(tables: dict[str, list[dict]], root: str, compare: tuple[str, str] | None = None) -> dict:
    """Everything the template shows: numbers from core.report, figures drawn here."""
    runs = tables[RUNS_TABLE]
    judges = numbers.run_judges(runs)
    judged = numbers.judged_metrics(tables["metrics"], judges)
    shapes = numbers.safex_shapes(tables["safex_counts"])
    health = numbers.unit_health(tables[UNITS_TABLE])

    asr_rows = numbers.asr_table(judged)
    overview = Block("Attack success by model, method and judge", rows=asr_rows)
    if asr_rows:
        overview.figures.append(_asr_figure(asr_rows))

    layer_scores = numbers.rosais_layer_scores(tables["rosais_scores"])
    asr_L = numbers.asr_by_L(judged)
    rosais = []
    for key, layers in layer_scores.items():
        by_judge = {k[3]: v for k, v in asr_L.items() if k[:3] == key}
        rosais.append(Block(f"{key[1]} · {key[2]} · run {key[0]}", [_rosais_figure(key, layers, by_judge)],
                            rows=[{"layer": r["layer"], "rank": r["rank"] + 1, "score": r["score"]} for r in layers]))

    selection = numbers.safex_selection(tables["safex_rounds"], shapes)
    benign = numbers.bootstrap_frequency(tables["safex_counts"], "benign")
    sets = numbers.safex_sets(tables["safex_experts"])
    refusal = numbers.safex_refusal(tables["safex_validation"])
    safex = []
    for key in sorted(set(selection) | set(benign) | {k[:2] for k in refusal}):
        matrices = sorted(selection.get(key, []) + ([benign[key]] if key in benign else []),
                          key=lambda m: _group_order(m.group))
        block = Block(f"{key[1]} · run {key[0]}", note=_sets_note(sets.get(key, {})))
        if matrices:
            block.figures.append(_safex_figure(key, matrices, sets.get(key, {})))
        by_group = {k[2:]: v for k, v in sorted(refusal.items(), key=lambda kv: _group_order(kv[0][2]))
                    if k[:2] == key}
        if by_group:
            block.figures.append(_refusal_figure(key, by_group))
            block.rows = [{"group": g, "judge": j, **c} for (g, j), rows in by_group.items() for c in rows]
        safex.append(block)

    n_layers = {key: shape[0] for key, shape in shapes.items()}
    for (run_id, model, _), layers in layer_scores.items():
        n_layers[(run_id, model)] = max(n_layers.get((run_id, model), 0), 1 + max(r["layer"] for r in layers))
    changes = numbers.fsour_route_changes(tables["fsour_routes"], n_layers)
    cost = numbers.fsour_cost(tables["fsour_routes"])
    by_restart = numbers.fsour_asr_by_restart(tables["fsour_routes"])
    converged = [r for r in judged if r["method"] == "fsour" and r["metric"] == "converged"]
    fsour = []
    for key in sorted(cost):
        spent = cost[key]
        block = Block(f"{key[1]} · run {key[0]}", [_fsour_figure(key, changes.get(key), spent, by_restart[key])],
                      rows=[r for r in converged if (r["run_id"], r["model"]) == key])
        searched = [c for c in spent if c["restarts"]]
        block.note = (f"{len(spent)} prompts, {len(searched)} searched; per searched prompt: median "
                      f"{_median([c['forwards'] for c in searched])} forwards, "
                      f"{_median([c['candidates'] for c in searched])} candidates.")
        fsour.append(block)

    steer_top = numbers.steer_top_experts(tables["steer_experts"], tables[UNITS_TABLE])
    steermoe = [Block(f"{key[1]} · {key[2]} · run {key[0]}", [_steer_figure(key, top)], rows=top)
                for key, top in steer_top.items()]

    beyond = beyond_blocks(judged)

    maps = []
    models = sorted({(r["run_id"], r["model"]) for name in ("rosais_scores", "safex_experts", "fsour_routes",
                                                             "steer_experts", "safex_counts") for r in tables[name]})
    for key in models:
        scores = next((v for k, v in layer_scores.items() if k[:2] == key), None)
        top = next((v for k, v in steer_top.items() if k[:2] == key), None)
        routed = changes.get(key)
        layers = max([n_layers.get(key, 0), len(routed.counts[0]) if routed and routed.counts else 0]
                     + [r["layer"] + 1 for r in top or []])
        rows = numbers.safety_map(layers, scores, changes.get(key), sets.get(key), top)
        if rows:
            n_experts = shapes.get(key, (None, None))[1]
            maps.append(Block(f"{key[1]} · run {key[0]}", [_map_figure(key, rows, n_experts)], rows=rows))

    comparison = None
    if compare:
        run_a, run_b = compare
        deltas = numbers.metric_deltas(judged, run_a, run_b)
        comparison = Block(f"run {run_a} → run {run_b}", [_compare_figure(deltas, run_a, run_b)], rows=deltas)

    return {
        "root": root, "generated_at": datetime.now(timezone.utc), "sections": SECTIONS,
        "runs": numbers.run_summaries(runs),
        "models": numbers.model_summaries(runs, tables["metrics"], tables[UNITS_TABLE]),
        "health": health, "failed": numbers.failed_units(tables[UNITS_TABLE]),
        "wall": _wall_per_model(health), "overview": overview, "metrics": judged,
        "rosais": rosais, "safex": safex, "fsour": fsour, "steermoe": steermoe, "beyond": beyond,
        "maps": maps,
        "compare": comparison, "compare_runs": compare,
        "samples": numbers.sample_answers(tables["generations"]),
    }


def beyond_blocks(judged: list[dict]) -> list[Block]:
    """Per run and model, every metric row of the beyond-the-papers methods (transfer rates,
    the universal route's train / held-out / benign rates, the monitor's AUROC and detection)."""
    rows: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in judged:
        if r["method"] in BEYOND_METHODS:
            rows[(r["run_id"], r["model"])].append(r)
    return [Block(f"{model} · run {run_id}", rows=found) for (run_id, model), found in sorted(rows.items())]


def _group_order(group: str) -> int:
    return SAFEX_GROUPS.index(group) if group in SAFEX_GROUPS else len(SAFEX_GROUPS)


def _sets_note(sets: dict) -> str:
    if not sets:
        return "No expert sets stored."
    def fmt(name):
        cells = sets.get(name, [])
        return f"{name}: " + (", ".join(f"L{l}/E{e}" for l, e in cells) if cells else "empty")
    return "; ".join(fmt(n) for n in ("HCDG", "HRCG"))


def _median(values: list[float]) -> str:
    if not values:
        return "–"
    values = sorted(values)
    middle = len(values) // 2
    return f"{values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2:g}"


def _wall_per_model(health: list[dict]) -> list[dict]:
    return [{"model": h["model"], "run_id": h["run_id"], "wall_seconds": h["wall_seconds"],
             "unit_seconds": h["unit_seconds"]} for h in health]


def _fmt_rate(rate: numbers.Rate | None) -> str:
    if rate is None:
        return "–"
    low, high = rate.interval
    return f"{rate.value:.2f} [{low:.2f}, {high:.2f}]"


def _fmt_num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def render_html(context: dict) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(rate=_fmt_rate, num=_fmt_num, secs=_fmt_seconds)
    return env.get_template("report.html.jinja").render(**context)


def default_html_path(root: str) -> str:
    """Inside a local root; for an S3 root, report-<bucket and prefix>.html in the working directory."""
    if root.startswith("s3://"):
        return f"report-{_slug(root[len('s3://'):].strip('/'))}.html"
    return os.path.join(root, REPORT_FILE)


def write_report(root: str, html: str | None = None, run_ids: Sequence[str] | None = None,
                 compare: tuple[str, str] | None = None) -> str:
    """Write the report of `root` (its runs `run_ids`, default all) to `html`; returns the path.
    Everything is checked and rendered before the file is written."""
    if compare:
        run_ids = list(dict.fromkeys([*(run_ids or []), *compare])) if run_ids else None
    try:
        tables = load_tables(root, run_ids)
    except StoreError as e:
        raise ReportError(str(e)) from None
    if compare:
        present = {r["run_id"] for r in tables[RUNS_TABLE]}
        missing = [r for r in compare if r not in present]
        if missing:
            raise ReportError(f"--compare: no run {', '.join(map(repr, missing))} under {root}")
    page = render_html(build_context(tables, root, compare))
    path = html or default_html_path(root)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)
    return path
