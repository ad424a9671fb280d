"""Sharded replicas: pipelined micro-batches vs one at a time, memory per shard, idle route-control cost.

1. Pipeline: the model split over S shard actors (Ray, one thread each); M micro-batches of B rows x
   T tokens go through the stages, all submitted ahead (pipelined) or one after another (sequential,
   the same actors and threads). `identical`: the pipelined logits equal the unsharded model's.
2. Memory: bytes of parameters and buffers each shard holds, against the whole model.
3. Idle hooks: route control installed but with nothing applied, against the same checkpoint loaded
   without it: forward and greedy generate, on the sandbox and on the largest tiny config (CPU time
   of the calling thread, so that a shared machine's waits do not count).

    python benchmarks/pipeline_bench.py --json
    python benchmarks/pipeline_bench.py --shards 2 --micro-batches 16 --rows 32 --tokens 128
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core.configs import TINY_FAMILIES, save_tiny_model, tiny_config  # noqa: E402
from core.models import load_model  # noqa: E402
from core.sandbox import build_sandbox  # noqa: E402


def pipeline(path: str, shards: int, micro: int, rows: int, tokens: int, dtype: str, repeats: int) -> dict:
    import ray

    from actors.shard_worker import RayStages, start_shards
    from core.sharding import sharded_loaded_model

    for attempt in range(3):  # on a loaded machine Ray's fixed 30 s node-startup wait can run out
        try:
            ray.init(address="local", num_cpus=shards, include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            if attempt == 2:
                raise
    try:
        entry = {"shards": shards, "dtype": dtype, "num_cpus": 1}
        stages = RayStages(lambda: start_shards(entry, path))
        lm = sharded_loaded_model(path, stages)
        vocab = lm.model.config.vocab_size
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(4, vocab, (rows, tokens), generator=g) for _ in range(micro)]
        # last-position logits, as RoSais scores: the stages then hold equal work (2 layers each on
        # the sandbox) rather than the last one also projecting every position onto the vocabulary
        msgs = [lm.model.message(ids, logits_to_keep=1)[0] for ids in batches]
        stages.forward_many(msgs[:shards])  # warm up every stage
        sequential, pipelined = [], []
        for _ in range(repeats):  # interleaved, so load from elsewhere hits both alike
            start = time.perf_counter()
            seq_out = [stages.forward(m).hidden for m in msgs]
            sequential.append(time.perf_counter() - start)
            start = time.perf_counter()
            pipe_out = lm.model.forward_many(msgs)
            pipelined.append(time.perf_counter() - start)
        full = load_model(path, dtype=dtype)
        with torch.inference_mode():
            reference = [full.model(ids, logits_to_keep=1).logits for ids in batches]
        identical = all(torch.equal(p, r) for p, r in zip(pipe_out, reference)) and \
            all(torch.equal(s, r) for s, r in zip(seq_out, reference))
        whole = sum(t.numel() * t.element_size() for t in [*full.model.parameters(), *full.model.buffers()])
        t_seq, t_pipe = min(sequential), min(pipelined)  # the least disturbed try of each
        return {"identical": identical, "shards": shards, "micro_batches": micro, "rows": rows, "tokens": tokens,
                "dtype": dtype, "sequential_s": t_seq, "pipelined_s": t_pipe, "speedup_vs_sequential": t_seq / t_pipe,
                "bytes_per_shard": stages.param_bytes(), "bytes_unsharded": whole}
    finally:
        ray.shutdown()


def idle_overhead(path: str, label: str, rows: int, tokens: int, new_tokens: int, repeats: int) -> dict:
    """CPU seconds of forward and generate: route control installed and idle (load_model) vs the
    same checkpoint loaded plainly, timed call by call in alternation; the ratio is idle / plain."""
    from transformers import AutoModelForCausalLM

    lm = load_model(path, dtype="float32")
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(4, lm.model.config.vocab_size, (rows, tokens), generator=torch.Generator().manual_seed(1))
    pad = lm.tokenizer.pad_token_id

    def forward(model):
        with torch.inference_mode():
            model(ids)

    def generate(model):
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=pad)

    result = {"model": label}
    for name, fn, calls in (("forward", forward, 10 * repeats), ("generate", generate, 2 * repeats)):
        fn(lm.model), fn(plain)  # warm-up
        idle, bare = [], []
        for _ in range(calls):  # call by call in alternation: a load spike hits both sides alike
            for model, times in ((lm.model, idle), (plain, bare)):
                start = time.thread_time()
                fn(model)
                times.append(time.thread_time() - start)
        # CPU time of this thread (torch runs on it alone, one intra-op thread): waiting for a core on a
        # shared machine does not count; the least of many calls is the model's own cost
        result[f"{name}_plain_cpu_s"], result[f"{name}_idle_cpu_s"] = min(bare), min(idle)
        result[f"{name}_ratio"] = min(idle) / min(bare)
    return result


def largest_tiny() -> str:
    sizes = {}
    for family in TINY_FAMILIES:
        with torch.device("meta"):
            from transformers import AutoModelForCausalLM

            sizes[family] = sum(p.numel() for p in AutoModelForCausalLM.from_config(tiny_config(family)).parameters())
    return max(sizes, key=sizes.get)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: the sandbox model, built if needed)")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, default=16)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    path = args.model or str(build_sandbox())
    result = pipeline(path, args.shards, args.micro_batches, args.rows, args.tokens, args.dtype, args.repeats)
    family = largest_tiny()
    with tempfile.TemporaryDirectory() as tmp:
        tiny = str(save_tiny_model(family, Path(tmp) / family))
        overhead = [idle_overhead(path, "sandbox" if not args.model else path, 8, 64, 32, 5),
                    idle_overhead(tiny, f"tiny {family}", 8, 64, 32, 5)]
    result["idle_hooks"] = overhead
    result["idle_hook_overhead_ratio"] = max(max(o["forward_ratio"], o["generate_ratio"]) for o in overhead)
    result["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch " \
                        f"{torch.__version__}, one thread per shard, no GPU"
    if args.json:
        print(json.dumps(result))
        return
    print(f"pipelined {args.shards}-shard replica: {result['speedup_vs_sequential']:.2f}x vs sequential "
          f"({result['sequential_s']:.2f} s -> {result['pipelined_s']:.2f} s), identical: {result['identical']}")
    print(f"bytes per shard: {result['bytes_per_shard']} of {result['bytes_unsharded']}")
    for o in overhead:
        print(f"idle route control on {o['model']}: forward x{o['forward_ratio']:.3f}, generate x{o['generate_ratio']:.3f}")


if __name__ == "__main__":
    main()
