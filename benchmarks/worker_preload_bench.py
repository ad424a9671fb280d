"""Ray's worker preload: seconds to the first committed unit of `moesafe run`, with the local
cluster's worker processes importing nothing ahead, torch and transformers, or the model actor's
own module (and so everything it imports), through Ray's `preload_python_modules` system config.

Each try is a fresh process: it starts the local Ray cluster as `moesafe run` does (plus the
preload), runs a tiny manifest (F-SOUR, 2 sandbox prompts, one unit per prompt) through the CLI,
and reports, from its own start, when ray.init returned, when the driver asked for the model
actor, and when the first unit started and was committed. The settings take turns within each
repeat, so a shared machine's load falls on all of them alike.

    python benchmarks/worker_preload_bench.py --repeats 3
"""
from __future__ import annotations

import time

START = time.time()  # before the imports: the driver's own imports count towards the first unit

import argparse  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MANIFEST = """
chunking: {prompts_per_unit: 1}
models:
  - {name: sandbox, path: sandbox, dtype: float32}
datasets:
  harmful: {source: sandbox, split: regular, limit: 2}
methods:
  - {method: fsour, dataset: harmful, params: {candidates: 4, restarts: 1, max_new_tokens: 8}}
"""
SETTINGS = {"none": [], "torch,transformers": ["torch", "transformers"], "model actor": ["actors.model_worker"]}


def one_try(setting: str, work: Path) -> str:
    """One run under `setting`, in this process; the line of figures it prints."""
    import ray

    import jobs.runner
    from core.store import ResultStore
    from jobs.cli import main

    manifest, out = work / "tiny.yaml", work / "out"
    manifest.write_text(MANIFEST)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             _system_config={"preload_python_modules": SETTINGS[setting]} if SETTINGS[setting] else None)
    initialised = time.time()
    asked = []  # when the driver asked for each model actor
    model_worker = jobs.runner.Scheduler._model_worker

    def timed_model_worker(self, *args, **kwargs):
        asked.append(time.time())
        return model_worker(self, *args, **kwargs)

    jobs.runner.Scheduler._model_worker = timed_model_worker
    assert main(["run", str(manifest), "--out", str(out)]) == 0
    ray.shutdown()
    first = min(ResultStore(str(out), read_only=True).read_table("units").to_pylist(), key=lambda u: u["finished_at"])
    committed = first["finished_at"].timestamp()
    return (f"{setting} | {initialised - START:.1f} | {asked[0] - START:.1f} | "
            f"{committed - first['seconds'] - START:.1f} | **{committed - START:.1f}**")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", choices=list(SETTINGS), help=argparse.SUPPRESS)  # a try, in its own process
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("TRY", one_try(args.one, Path(args.work)), flush=True)
        return
    print("| repeat | load avg | preloaded | ray.init returned | model actor asked | first unit started | "
          "first unit committed (s from start) |\n|---|---|---|---|---|---|---|")
    for repeat in range(1, args.repeats + 1):
        for setting in SETTINGS:
            load = os.getloadavg()[0]
            with tempfile.TemporaryDirectory() as work:
                done = subprocess.run([sys.executable, __file__, "--one", setting, "--work", work],
                                      capture_output=True, text=True, check=True)
            (line,) = [line.removeprefix("TRY ") for line in done.stdout.splitlines() if line.startswith("TRY ")]
            print(f"| {repeat} | {load:.1f} | {line} |", flush=True)


if __name__ == "__main__":
    main()
