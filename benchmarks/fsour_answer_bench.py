"""F-SOUR's routed answers: N searched restarts answered in one batch vs one at a time, same run.

An `fsour_answer` unit answers the searches of up to `prompts_per_unit` restarts (several prompts,
several restarts of one prompt) in one generate call, each row under its own route; before, each
restart was answered alone (batch 1) right after its search. This times both on the same routes:
N restarts of the first held-out harmful sandbox prompts (searched once, untimed; `--restarts`
per prompt), answered and judged by the sandbox judge as the unit does (`answer_searches`), in
one batch of N rows and as N batches of one, interleaved, the least of `--repeats` tries each.
Prints the seconds of each, their ratio, and whether the answers are the same.

    python benchmarks/fsour_answer_bench.py                 # 8 restarts (the quickstart's prompts_per_unit)
    python benchmarks/fsour_answer_bench.py --json
    python benchmarks/fsour_answer_bench.py --prompts 4 --restarts 2 --max-new-tokens 64
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core.datasets import PromptRecord  # noqa: E402
from core.fsour import FsourParams, answer_searches, search_row  # noqa: E402
from core.judges import SandboxJudge  # noqa: E402
from core.models import load_model  # noqa: E402
from core.sandbox import build_sandbox, prompt_sets  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: the sandbox model, built if needed)")
    ap.add_argument("--dtype", default="float32", help="the quickstart's dtype")
    ap.add_argument("--prompts", type=int, default=4, help="held-out harmful sandbox prompts")
    ap.add_argument("--restarts", type=int, default=2, help="restarts searched per prompt (rows: prompts x restarts)")
    ap.add_argument("--candidates", type=int, default=100, help="N of the searches that find the routes")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="answer length (the quickstart's)")
    ap.add_argument("--repeats", type=int, default=3, help="tries of each way, interleaved; the least counts")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (Ray actors get one)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    lm = load_model(args.model or str(build_sandbox()), dtype=args.dtype)
    prompts = [PromptRecord(p["id"], p["prompt"], p["target"], p["category"], "sandbox-heldout-regular")
               for p in prompt_sets("heldout")["regular"][: args.prompts]]
    params = FsourParams(candidates=args.candidates, max_new_tokens=args.max_new_tokens)
    items = [item for item in prompts for _ in range(args.restarts)]
    searches = [search_row(lm, item, restart, params) for item in prompts for restart in range(args.restarts)]
    judge = SandboxJudge()
    n = len(items)

    def batched():
        return answer_searches(lm, items, searches, judge, params, batch_size=n).answers

    def one_at_a_time():
        return [answer_searches(lm, [item], [search], judge, params, batch_size=1).answers[0]
                for item, search in zip(items, searches)]

    seconds = {"batched": [], "one_at_a_time": []}
    answers = {}
    load_before = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, run in (("batched", batched), ("one_at_a_time", one_at_a_time)):
            start = time.perf_counter()
            answers[name] = run()
            seconds[name].append(time.perf_counter() - start)
    best = {name: min(times) for name, times in seconds.items()}
    result = {
        "rows": n, "prompts": len(prompts), "restarts_per_prompt": args.restarts,
        "routed_rows": sum(bool(s["route"]) for s in searches), "max_new_tokens": args.max_new_tokens,
        "one_at_a_time_s": round(best["one_at_a_time"], 3), "batched_s": round(best["batched"], 3),
        "speedup": round(best["one_at_a_time"] / best["batched"], 2),
        "same_answers": answers["batched"] == answers["one_at_a_time"],
        "same_answers_rows": sum(a == b for a, b in zip(answers["batched"], answers["one_at_a_time"])),
        "dtype": args.dtype, "model": args.model or "sandbox", "device": str(lm.device),
        "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}",
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>18}: {value}")


if __name__ == "__main__":
    main()
