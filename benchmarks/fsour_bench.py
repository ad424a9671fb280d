"""F-SOUR candidate throughput: our batched search vs the serial reference, same model, same run.

Both run the same search (same seed, same candidates, same acceptance rule) on the same prompts;
the serial one is the reference semantics (batch 1, one full forward per candidate, nothing
reused). Prints candidate evaluations per second for each, their ratio, and whether the routes
are identical.

    python benchmarks/fsour_bench.py                   # the sandbox model, float64 on CPU
    python benchmarks/fsour_bench.py --json
    python benchmarks/fsour_bench.py --model /path/to/moe --dtype bfloat16 --prompts 1 --threads 8
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core.fsour import FsourParams, fsour_search  # noqa: E402
from core.models import load_model  # noqa: E402
from core.sandbox import build_sandbox, prompt_sets  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: the sandbox model, built if needed)")
    ap.add_argument("--dtype", default="float64", help="float64 makes batched and serial agree exactly")
    ap.add_argument("--prompts", type=int, default=2, help="held-out harmful sandbox prompts to attack")
    ap.add_argument("--candidates", type=int, default=100, help="N per coordinate (the paper's default: 100)")
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads; tiny models run fastest on one (more oversubscribe a shared CPU)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    lm = load_model(args.model or str(build_sandbox()), dtype=args.dtype)
    items = prompt_sets("heldout")["regular"][: args.prompts]
    params = FsourParams(candidates=args.candidates, threshold=args.threshold)
    totals = {"batched": [0, 0.0], "serial": [0, 0.0]}
    same_route = True
    for item in items:
        routes = {}
        for scorer in ("batched", "serial"):
            run = fsour_search(lm, item["prompt"], item["target"], 0, params, scorer=scorer)
            totals[scorer][0] += run.candidates
            totals[scorer][1] += run.seconds
            routes[scorer] = run.route
        same_route &= routes["batched"] == routes["serial"]
    batched_cps = totals["batched"][0] / totals["batched"][1]
    serial_cps = totals["serial"][0] / totals["serial"][1]
    result = {
        "serial_cps": round(serial_cps, 1), "batched_cps": round(batched_cps, 1),
        "speedup": round(batched_cps / serial_cps, 2), "same_route": same_route,
        "candidates": totals["batched"][0], "prompts": len(items), "dtype": args.dtype,
        "model": args.model or "sandbox", "device": str(lm.device),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>12}: {value}")


if __name__ == "__main__":
    main()
