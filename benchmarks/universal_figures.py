"""The README's universal-route block, built from a run of manifests/beyond.yaml: its
`universal_route` metrics, its route and its search. benchmarks/beyond_figures.py writes it (with
the other methods' block) from the same run."""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.readme_figures import FiguresError, commit, machine, query, sandbox_weights  # noqa: E402

BEGIN = "<!-- universal route figures: begin (written by `make figures`; edits here are overwritten) -->"
END = "<!-- universal route figures: end -->"


def figures_block(root: str, run: dict) -> str:
    run_id = run["run_id"]
    where = f"where run_id = '{run_id}'"
    metrics = query(f"select judge, metric, value, n from metrics {where} and method = 'universal_route'", root)
    if not metrics:
        raise FiguresError(f"run {run_id} in {root} has no universal_route metrics")
    value = {(m["judge"], m["metric"]): (m["value"], m["n"]) for m in metrics}
    judges = sorted({m["judge"] for m in metrics})
    route = query(f"select * from universal_routes {where}", root)[0]
    search = query(f"select sum(seconds) as s from units {where} and kind = 'universal_search'", root)[0]["s"]
    steps = route["step_objective"]

    def cell(judge: str, metric: str) -> str:
        v, n = value.get((judge, metric), (None, 0))
        return "–" if v is None else f"{v:.2f} (n = {n})"

    rows = [("harmful, training split: unrouted → universal route", "asr_train_unrouted", "universal_asr_train"),
            ("harmful, held-out split: unrouted → universal route", "asr_heldout_unrouted", "universal_asr_heldout"),
            ("harmful, held-out split: SteerMoE's fixed expert set (baseline)", None, "steermoe_asr_heldout"),
            ("benign: compliance unrouted → under the route", "benign_compliance_unrouted",
             "benign_compliance_under_route")]
    lines = [BEGIN, "", "| figure | " + " | ".join(f"{j} judge" for j in judges) + " |",
             "|---|" + "---|" * len(judges)]
    for name, before, after in rows:
        cells = [cell(j, after) if before is None else f"{cell(j, before)} → {cell(j, after)}" for j in judges]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    slots = ", ".join(f"({s['token']}, layer {s['layer']}): {s['experts']}" for s in route["route"]) or "none"
    lines += ["", f"The route forces {route['slots_forced']} (position, layer) slots on the template's "
                  f"{route['trailing_tokens']} trailing positions ((position from the prompt's end, layer): "
                  f"experts): {slots}. The search used "
                  f"{len(route['prompts_used'])} of {len(route['train_prompt_ids'])} training prompts "
                  f"({len(route['heldout_prompt_ids'])} held out), {len(steps)} slot visits, {route['candidates']} "
                  f"candidates, {route['forwards']} forwards, {search:.0f} s; summed target log-prob "
                  f"{steps[0]:.2f} after the first visit and {route['objective']:.2f} at the end over "
                  f"{len(route['prompts_used'])} prompts (mean {route['objective'] / len(route['prompts_used']):.2f}).",
              "", f"Run `{run_id}` of `manifests/beyond.yaml`.{sandbox_weights(run)} Written by `make figures` at "
                  f"commit {commit()} on {machine()}.", "", END]
    return "\n".join(lines)

