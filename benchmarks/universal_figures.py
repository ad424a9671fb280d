"""The README's universal-route figures, generated from a run of manifests/beyond.yaml.

Reads the run's `universal_route` metrics, its route and its search from a result root and rewrites
the README block between the two marker comments below, with the commit and the machine.

    moesafe run manifests/beyond.yaml                     # into results/, the manifest's own run id
    python benchmarks/universal_figures.py                # `make figures` runs both
    python benchmarks/universal_figures.py --out /tmp/beyond --run-id ID --print   # README untouched
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.readme_figures import FiguresError, commit, finished_run, machine, query, replace_block  # noqa: E402
from jobs.manifest import load_manifest  # noqa: E402

BEYOND = REPO / "manifests" / "beyond.yaml"
BEGIN = "<!-- universal route figures: begin (written by benchmarks/universal_figures.py; edits here are overwritten) -->"
END = "<!-- universal route figures: end -->"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results", help="result root holding the run (default: results)")
    ap.add_argument("--run-id", help="the run (default: manifests/beyond.yaml's own run id)")
    ap.add_argument("--readme", default=str(REPO / "README.md"), help="the file whose marked block is rewritten")
    ap.add_argument("--print", action="store_true", help="print the block instead of writing the README")
    args = ap.parse_args(argv)
    try:
        run_id = args.run_id or load_manifest(BEYOND).run_id
        run = finished_run(args.out, run_id)
        if run is None:
            raise FiguresError(f"{args.out} holds no finished run {run_id}: run `moesafe run manifests/beyond.yaml "
                               f"--out {args.out} --run-id {run_id}` first")
        block = figures_block(args.out, run_id)
        if args.print:
            print(block)
        else:
            replace_block(Path(args.readme), block, BEGIN, END)
            print(f"rewrote the universal route figures in {args.readme} from run {run_id} in {args.out}")
    except FiguresError as error:
        print(f"universal_figures: {error}", file=sys.stderr)
        return 2
    return 0


def figures_block(root: str, run_id: str) -> str:
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
              "", f"Run `{run_id}` of `manifests/beyond.yaml`; written by `benchmarks/universal_figures.py` at commit "
                  f"{commit()} on {machine()}.", "", END]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
