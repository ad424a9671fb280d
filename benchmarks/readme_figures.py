"""The README's measured quickstart figures, generated from a quickstart run instead of typed.

Reads the run of manifests/quickstart.yaml (its default run id, so the run of the file as it is
now) from a result root, running the quickstart first when that root does not hold it finished,
and rewrites the block of README.md between the two marker comments below with the figures, the
commit and the machine.

    python benchmarks/readme_figures.py                      # results/ (where `make quickstart` writes)
    python benchmarks/readme_figures.py --out /tmp/qs --run  # run the quickstart there if needed
    python benchmarks/readme_figures.py --print              # print the block, README untouched

Tables are read by column name, so columns added later change nothing; when `metrics` has a
`judge` column, each figure gets one value per judge.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.query import run_query  # noqa: E402
from core.store import ResultStore  # noqa: E402
from jobs.manifest import load_manifest  # noqa: E402

QUICKSTART = REPO / "manifests" / "quickstart.yaml"
BEGIN = "<!-- quickstart figures: begin (written by `make figures`; edits here are overwritten) -->"
END = "<!-- quickstart figures: end -->"
NO_JUDGE = ""  # metrics rows without a judge column (or with a null judge)


class FiguresError(RuntimeError):
    """The result root or the README cannot give the figures; the message says how to fix it."""


def main(argv: list[str] | None = None) -> int:
    return figures_cli(argv, doc=__doc__, script="readme_figures", manifest=QUICKSTART,
                       blocks=[(BEGIN, END, figures_block)],
                       missing="run `make quickstart`, or pass --run to run it into --out")


# a README block: its begin and end markers, and how to build it from its source (for a manifest's
# run: the result root and the `runs` row; for a script without a manifest: nothing)
Block = tuple[str, str, Callable[..., str]]


def figures_cli(argv: list[str] | None, *, doc: str, script: str, blocks: list[Block], manifest: Path | None = None,
                missing: str = "pass --run to run it into --out") -> int:
    """The command line every figures script shares: rewrite each block of the README (or --print it).
    With a `manifest`, the blocks are built from its finished run (its own run id unless --run-id)
    in --out, which --run runs first; without one, from what each block's function reads itself."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readme", default=str(REPO / "README.md"), help="the file whose marked blocks are rewritten")
    ap.add_argument("--print", action="store_true", help="print the blocks instead of writing the README")
    if manifest is not None:
        ap.add_argument("--out", default="results", help="result root holding the run (default: results)")
        ap.add_argument("--run", action="store_true",
                        help=f"run (or finish) {manifest.name} into --out first unless it is there, finished")
        ap.add_argument("--run-id", help="read this run instead of the manifest's own (e.g. one stored before the "
                                         "manifest changed)")
    args = ap.parse_args(argv)
    try:
        source, origin = (), ""
        if manifest is not None:
            run = manifest_run(manifest, args.out, args.run_id, args.run, missing)
            source, origin = (args.out, run), f" from run {run['run_id']} in {args.out}"
        built = [(begin, end, build(*source)) for begin, end, build in blocks]  # before the README changes
        for begin, end, block in built:
            if args.print:
                print(block)
            else:
                replace_block(Path(args.readme), block, begin, end)
        if not args.print:
            print(f"rewrote {len(blocks)} figures block(s) in {args.readme}{origin}")
    except FiguresError as error:
        print(f"{script}: {error}", file=sys.stderr)
        return 2
    return 0


def manifest_run(manifest: Path, root: str, run_id: str | None, run_it: bool, missing: str) -> dict:
    """The `runs` row of the finished run `run_id` (default: the manifest's own) in `root`, running
    the manifest there first when `run_it`."""
    run_id = run_id or load_manifest(manifest).run_id
    run = finished_run(root, run_id)
    if run is None and run_it:
        subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(manifest), "--out", root], cwd=REPO, check=True)
        run = finished_run(root, run_id)
    if run is None:
        raise FiguresError(f"{root} holds no finished run {run_id} of {manifest.name}: {missing}")
    return run


def finished_run(root: str, run_id: str) -> dict | None:
    """The `runs` row of `run_id` under `root` if that run finished with every unit ok, else None."""
    if not ResultStore(root, read_only=True).has_files("runs"):
        return None
    runs = query(f"select * from runs where run_id = '{run_id}'", root)
    units = query(f"select status, count(*) as n from units where run_id = '{run_id}' group by status", root)
    if not runs or runs[0]["status"] != "finished" or any(u["status"] != "ok" for u in units):
        return None
    return runs[0]


def query(sql: str, root: str) -> list[dict]:
    return json.loads(run_query(sql, root, "json"))


class MetricFigures:
    """A run's metrics as README cells: figures(*keys, joint=" → ") writes the metrics `keys`
    ((method, metric); SAFEx's metric with ":<dataset>") as "a → b (n)", one per judge, named when
    there are several."""

    def __init__(self, metrics: list[dict]):
        self.by_judge: dict[tuple[str, str], dict[str, tuple[float, int]]] = defaultdict(dict)
        judges: list[str] = []
        for m in metrics:
            judge = m.get("judge") or NO_JUDGE
            if judge not in judges:
                judges.append(judge)
            key = (m["method"], m["metric"] if m["method"] != "safex" else f"{m['metric']}:{m['dataset']}")
            self.by_judge[key][judge] = (m["value"], m["n"])
        self.judges = sorted(judges)

    def keys(self):
        return self.by_judge.keys()

    def __call__(self, *keys: tuple[str, str], joint: str = " → ") -> str:
        parts = []
        for judge in self.judges:
            cells = [self.by_judge.get(key, {}).get(judge) for key in keys]
            if all(c is None for c in cells):
                continue
            values = joint.join("–" if c is None else f"{c[0]:.2f}" for c in cells)
            n = "/".join(dict.fromkeys(str(c[1]) for c in cells if c is not None))  # distinct, in the cells' order
            named = judge and len(self.judges) > 1  # a single judge needs no name
            parts.append(f"{judge + ': ' if named else ''}{values} (n = {n})")
        return "; ".join(parts) or "not measured"


def units_line(root: str, run: dict) -> str:
    """How long the run's units took, the versions, the commit and the machine."""
    run_id = run["run_id"]
    # From the units, not the runs row: a resumed run rewrites started_at, and a unit knows when it ran.
    units = query(f"select count(*) as n, sum(seconds) as seconds, "
                  f"epoch(max(finished_at)) - min(epoch(finished_at) - seconds) as span from units "
                  f"where run_id = '{run_id}'", root)[0]
    versions = json.loads(run["versions"]) if isinstance(run["versions"], str) else run["versions"]
    return (f"Run `{run_id}`: {units['n']} units, {units['span']:.0f} s from the first unit's start to the last "
            f"one's end ({units['seconds']:.0f} s summed over units); torch {versions.get('torch')}, transformers "
            f"{versions.get('transformers')}, ray {versions.get('ray')}. Written by `make figures` at commit "
            f"{commit()} on {machine()}.")


def figures_block(root: str, run: dict) -> str:
    run_id = run["run_id"]
    where = f"where run_id = '{run_id}'"
    figure = MetricFigures(query(f"select * from metrics {where}", root))

    rosais_L = sorted((k for k in figure.keys() if k[0] == "rosais" and k[1].startswith("asr_at_L")),
                      key=lambda k: int(k[1].removeprefix("asr_at_L")))
    ranking = query(f"select layer, avg(score) as mean from rosais_scores {where} group by layer "
                    f"order by mean desc, layer", root)
    safex_groups = sorted({k[1].split(":", 1)[1] for k in figure.keys() if k[0] == "safex"})
    rows = [
        ("F-SOUR", "ASR unattacked → attacked", figure(("fsour", "asr_baseline"), ("fsour", "asr"))),
        ("F-SOUR", "searched prompts whose reported route reached the threshold", figure(("fsour", "converged"))),
        ("RoSais", "ASR(L), L = " + ", ".join(k[1].removeprefix("asr_at_L") for k in rosais_L),
         figure(*rosais_L, joint=", ")),
        ("RoSais", "layers by mean score (highest first)",
         ", ".join(f"{r['layer']} ({r['mean']:.2f})" for r in ranking) or "not measured"),
        ("SAFEx", "HCDG / HRCG (layer:expert)", f"{expert_set(root, where, 'HCDG')} / {expert_set(root, where, 'HRCG')}"),
        *[("SAFEx", f"refusal on {group}: before → HRCG off → as many random off",
           figure(*[("safex", f"refusal_{c}:{group}") for c in ("before", "after", "after_random")]))
          for group in safex_groups],
        ("SteerMoE", "ASR unsteered → steered", figure(("steermoe", "asr_unsteered"), ("steermoe", "asr_steered"))),
    ]
    lines = [BEGIN, "",
             "| method | figure | value |", "|---|---|---|",
             *[f"| {method} | {name} | {value} |" for method, name, value in rows], "",
             units_line(root, run),
             "", END]
    return "\n".join(lines)


def expert_set(root: str, where: str, name: str) -> str:
    rows = query(f"select layer, expert from safex_experts {where} and expert_set = '{name}' "
                 f"order by layer, expert", root)
    members = [r for r in rows if r["expert"] is not None]
    if not members:
        # A row with a null expert says the set was computed and is empty; schema version 1 wrote no
        # row for an empty set, so there the sets were computed if any set has rows.
        computed = rows or query(f"select 1 from safex_experts {where} and schema_version = 1 limit 1", root)
        return "**empty**" if computed else "not computed"
    return f"{len(members)} (" + ", ".join(f"{r['layer']}:{r['expert']}" for r in members) + ")"


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short=10", "HEAD") or "unknown"
    # the README's own figure blocks are what these scripts write: an edit there is not a code change
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)README.md")
    return f"{head}{' (with uncommitted changes)' if dirty else ''}"


# CPU features whose presence changes which float kernels torch and its BLAS run, and so the last
# bits of a result (a sandbox trained on another CPU is another model)
SIMD_FLAGS = ("avx2", "avx512f", "amx_tile")


def machine() -> str:
    """The CPU (model, the SIMD level torch's kernels use, the SIMD flags that matter), cores and OS."""
    import torch

    model, flags = platform.processor() or platform.machine(), None
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        flags = set(re.search(r"^(?:flags|Features)\s*:\s*(.*)$", cpuinfo, re.M).group(1).split())
        model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M).group(1).strip()
    except (OSError, AttributeError):
        pass
    simd = f"torch CPU kernels {torch.backends.cpu.get_cpu_capability()}"
    if flags is not None:
        simd += ", " + ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in SIMD_FLAGS)
    return (f"{os.cpu_count()} cores ({model}; {simd}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def replace_block(readme: Path, block: str, begin: str = BEGIN, end: str = END) -> None:
    """Rewrite the block of `readme` from the `begin` marker to the `end` marker with `block`."""
    text = readme.read_text(encoding="utf-8")
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise FiguresError(f"{readme} needs exactly one block between {begin!r} and {end!r} (in that order) "
                           f"for the figures to go in")
    before, rest = text.split(begin)
    after = rest.split(end, 1)[1]
    readme.write_text(before + block + after, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
