"""The README's "Beyond the papers" figures, generated from a run of manifests/beyond.yaml.

Reads the manifest's run (its default run id) from a result root, running it first with --run
when the root does not hold it finished, and rewrites two README blocks with the figures, the
commit and the machine: the universal route's (benchmarks/universal_figures.py) and the block
between the two marker comments below. Each method has its own function of
the run's rows (`SECTIONS`); a method added to the manifest adds its function there.

    python benchmarks/beyond_figures.py                      # results/
    python benchmarks/beyond_figures.py --out /tmp/b --run   # run manifests/beyond.yaml there if needed
    python benchmarks/beyond_figures.py --print              # print the block, README untouched
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import universal_figures  # noqa: E402
from benchmarks.readme_figures import MetricFigures, figures_cli, finished_run, query, units_line  # noqa: E402

MANIFEST = REPO / "manifests" / "beyond.yaml"
BEGIN = "<!-- beyond figures: begin (written by `make figures`; edits here are overwritten) -->"
END = "<!-- beyond figures: end -->"

Row = tuple[str, str, str]  # method, figure, value


def transfer_rows(figure: MetricFigures, root: str, where: str) -> list[Row]:
    m = "fsour_transfer"
    slots = query(f"select avg(slots) as mean from fsour_transfer {where} and control = 'route' "
                  f"group by alignment order by alignment", root)
    return [
        (m, "ASR on other prompts, aligned from the end: route / random experts, same slots / unrouted",
         figure((m, "transfer_asr"), (m, "transfer_asr_random"), (m, "transfer_asr_baseline"), joint=" / ")),
        (m, "… same category / other category (route)",
         figure((m, "transfer_asr_same_category"), (m, "transfer_asr_cross_category"), joint=" / ")),
        (m, "… same category / other category (random experts)",
         figure((m, "transfer_asr_random_same_category"), (m, "transfer_asr_random_cross_category"), joint=" / ")),
        (m, "ASR aligned from the start: route / random experts",
         figure((m, "transfer_asr_start"), (m, "transfer_asr_random_start"), joint=" / ")),
        (m, "mean target log-prob gain of a route: end / start",
         figure((m, "transfer_logprob_gain"), (m, "transfer_logprob_gain_start"), joint=" / ")),
        (m, "mean slots forced on the other prompt: end / start",
         " / ".join(f"{r['mean']:.1f}" for r in slots) or "not measured"),
    ]


def monitor_rows(figure: MetricFigures, root: str, where: str) -> list[Row]:
    m = "route_monitor"
    per_slot = {r["group"]: r for r in query(
        f"select \"group\", cast(sum(off_natural) as double) as off, cast(sum(len(route)) as integer) as slots "
        f"from route_monitor {where} "
        f"and \"group\" in ('fsour', 'adaptive') group by \"group\"", root)}

    def off_per_slot(group: str) -> str:
        r = per_slot.get(group)
        return f"{r['off'] / r['slots']:.2f} ({r['slots']} slots)" if r and r["slots"] else "–"

    return [
        (m, "mean monitor score: benign / harmful / F-SOUR route / adaptive route",
         figure(*[(m, f"monitor_score_mean_{g}") for g in ("benign", "harmful", "fsour", "adaptive")], joint=" / ")),
        (m, "F-SOUR: AUROC / detection at 1% false positives",
         figure((m, "monitor_auroc"), (m, "monitor_detection_at_fpr"), joint=" / ")),
        (m, "adaptive attacker (router's own top 2k): AUROC / detection at 1% false positives",
         figure((m, "monitor_auroc_adaptive"), (m, "monitor_detection_at_fpr_adaptive"), joint=" / ")),
        (m, "ASR: F-SOUR / adaptive attacker", figure((m, "asr_fsour"), (m, "asr_adaptive"), joint=" / ")),
        (m, "forced experts outside the router's own top-k per forced slot: F-SOUR / adaptive",
         f"{off_per_slot('fsour')} / {off_per_slot('adaptive')}"),
    ]


SECTIONS: list[Callable[[MetricFigures, str, str], list[Row]]] = [transfer_rows, monitor_rows]


def figures_block(root: str, run: dict) -> str:
    where = f"where run_id = '{run['run_id']}'"
    figure = MetricFigures(query(f"select * from metrics {where}", root))
    rows = [row for section in SECTIONS for row in section(figure, root, where)]
    return "\n".join([BEGIN, "", "| method | figure | value |", "|---|---|---|",
                      *[f"| {method} | {name} | {value} |" for method, name, value in rows], "",
                      units_line(root, run), "", END])


def main(argv: list[str] | None = None) -> int:
    return figures_cli(argv, doc=__doc__, script="beyond_figures", manifest=MANIFEST, blocks=[
        (universal_figures.BEGIN, universal_figures.END, universal_figures.figures_block),
        (BEGIN, END, figures_block)])


if __name__ == "__main__":
    sys.exit(main())
