"""The README's sandbox figures, generated from the sandbox build on this machine instead of typed.

Builds the sandbox model (or reuses the cached build: `MOESAFE_CACHE`, default ~/.cache/moesafe),
evaluates it as `moesafe sandbox` does (a few seconds), and rewrites the block of README.md between
the two marker comments below with its rates, the weights' sha256, the versions, the commit and the
machine. The build is byte-identical only on one CPU and library versions: another CPU's float
kernels train another model, so the block always names the machine and the weights.

    python benchmarks/sandbox_figures.py            # rewrite the block (`make figures` runs this)
    python benchmarks/sandbox_figures.py --print    # print the block, README untouched
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.readme_figures import commit, figures_cli, machine  # noqa: E402
from core.sandbox import METADATA_FILE, build_sandbox, evaluate_sandbox  # noqa: E402

BEGIN = "<!-- sandbox figures: begin (written by `make figures`; edits here are overwritten) -->"
END = "<!-- sandbox figures: end -->"


def figures_block(model_dir: Path | None = None) -> str:
    """The block for the sandbox build in `model_dir` (default: the cached build, built if missing)."""
    model_dir = Path(model_dir or build_sandbox())
    report = evaluate_sandbox(model_dir)
    build = json.loads((model_dir / METADATA_FILE).read_text())
    regular, jailbreak, benign = report["n_regular"], report["n_jailbreak"], report["n_benign"]
    rows = [
        ("refusal, harmful (regular wordings)", f"{report['refusal_rate_harmful']:.2f} (n = {regular})"),
        (f"refusal, jailbreak (the {len(report['refusal_rate_jailbreak_by_wording'])} wordings alignment never saw)",
         f"{report['refusal_rate_jailbreak']:.2f} (n = {jailbreak})"),
        *[(f"… wording “{wording}”", f"{rate:.2f}")
          for wording, rate in report["refusal_rate_jailbreak_by_wording"].items()],
        ("compliance, benign", f"{report['compliance_rate_benign']:.2f} (n = {benign})"),
        ("benign answers that restate the task exactly", f"{report['target_match_rate_benign']:.2f} (n = {benign})"),
        ("knowledge, harmful", f"{report['knowledge_rate_harmful']:.2f} (n = {regular})"),
        ("training (when this build was made)",
         f"{report['train_seconds']:.0f} s ({report['train_cpu_seconds']:.0f} CPU-s), one thread"),
    ]
    return "\n".join([
        BEGIN, "", f"| figure ({report['split']} split, `{report['judge']}` judge) | value |", "|---|---|",
        *[f"| {name} | {value} |" for name, value in rows], "",
        f"Weights `model.safetensors` sha256 `{report['weights_sha256'][:12]}` (sandbox version {build['version']}, "
        f"seed {build['config']['seed']}, cache key `{model_dir.name}`), trained with torch {build['torch']}, "
        f"transformers {build['transformers']}; greedy answers up to {report['max_new_tokens']} tokens. Written by "
        f"`make figures` at commit {commit()} on {machine()}.",
        "", END])


def main(argv: list[str] | None = None) -> int:
    return figures_cli(argv, doc=__doc__, script="sandbox_figures", blocks=[(BEGIN, END, figures_block)])


if __name__ == "__main__":
    sys.exit(main())
