"""Sharded replicas: pipelined micro-batches vs one at a time, memory per shard, idle route-control cost.

1. Pipeline: the model split over S shard actors (Ray, one thread each); M micro-batches of B rows x
   T tokens go through the stages, all submitted ahead (pipelined) or one after another (sequential,
   the same actors and threads); and greedy generation of B prompts, as one whole batch or as one
   micro-batch per stage decoded in turn. Each transport in turn: plain actor calls (`actors`, the
   runtime's default) and a Ray Compiled Graph (`compiled`); a manifest model's `transport` picks one. `identical`: the logits and answers of
   every transport and mode equal the unsharded model's. Load averages are printed with the figures:
   on a shared machine, two stage processes cannot both get a core.
2. Memory: bytes of parameters and buffers each shard holds, against the whole model.
3. Idle hooks: route control installed but with nothing applied, against the same checkpoint loaded
   without it: forward and greedy generate, on the sandbox and on the largest tiny config (CPU time
   of the calling thread, so that a shared machine's waits do not count).

    python benchmarks/pipeline_bench.py --json                     # about a minute and a half
    python benchmarks/pipeline_bench.py --parts pipeline --transports actors --repeats 2   # quicker
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


def _stage_cpu(stages) -> list[float]:
    """CPU seconds each stage process has used so far."""
    import ray

    return ray.get([a.__ray_call__.remote(lambda self: time.process_time()) for a in stages.actors])


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def transport_figures(stages, lm, batches, prompts, new_tokens: int, repeats: int) -> dict:
    """One transport: forwards one micro-batch at a time vs all submitted ahead; generation as
    one whole batch vs one micro-batch per stage decoded in turn. The least of `repeats` tries each
    (interleaved, so load from elsewhere hits both alike); CPU seconds each stage spent."""
    msgs = [lm.model.message(ids, logits_to_keep=1)[0] for ids in batches]
    stages.forward_many(msgs[:len(stages)])  # warm up every stage
    sequential, pipelined, gen_whole, gen_piped, cpu, answers = [], [], [], [], [], []
    for _ in range(repeats):
        t, seq_out = _timed(lambda: [stages.forward(m).hidden for m in msgs])
        sequential.append(t)
        before, driver = _stage_cpu(stages), time.process_time()
        t, pipe_out = _timed(lambda: lm.model.forward_many(msgs))
        driver = time.process_time() - driver
        pipelined.append(t)
        cpu.append([b - a for a, b in zip(before, _stage_cpu(stages))] + [driver])
        for micro, times in ((1, gen_whole), (None, gen_piped)):
            lm.model.generate_micro_batches = micro
            t, out = _timed(lambda: lm.model.generate(prompts, max_new_tokens=new_tokens, pad_token_id=0))
            times.append(t)
            answers.append(out)
    t_seq, t_pipe = min(sequential), min(pipelined)
    *stage_cpu, driver_cpu = cpu[pipelined.index(t_pipe)]
    # cores_used: CPU seconds the stages and the driver got per second of the pipelined run; on S idle
    # cores it approaches S when the stages overlap, on a shared machine it shows the share they got
    return {"sequential_s": t_seq, "pipelined_s": t_pipe, "speedup_vs_sequential": t_seq / t_pipe,
            "stage_cpu_s": stage_cpu, "driver_cpu_s": driver_cpu, "cores_used": (sum(stage_cpu) + driver_cpu) / t_pipe,
            "generate_whole_batch_s": min(gen_whole),
            "generate_pipelined_s": min(gen_piped), "generate_speedup": min(gen_whole) / min(gen_piped),
            "load_average": os.getloadavg()[0], "_outputs": (seq_out, pipe_out, answers)}


def pipeline(path: str, shards: int, micro: int, rows: int, tokens: int, dtype: str, repeats: int,
             transports: list[str], new_tokens: int) -> dict:
    """Every transport in turn on the same shard count, inputs and cluster (one CPU per shard)."""
    import ray

    from actors.shard_worker import CompiledStages, RayStages, start_shards
    from core.sharding import sharded_loaded_model

    for attempt in range(3):  # on a loaded machine Ray's fixed 30 s node-startup wait can run out
        try:
            ray.init(address="local", num_cpus=shards, include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            if attempt == 2:
                raise
    kinds = {"actors": RayStages, "compiled": lambda start: CompiledStages(start, in_flight=micro)}
    entry = {"shards": shards, "dtype": dtype, "num_cpus": 1}
    full = load_model(path, dtype=dtype)
    vocab = full.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(4, vocab, (rows, tokens), generator=g) for _ in range(micro)]
    # generation: `rows` prompts of 16 tokens, one micro-batch per stage
    prompts = torch.randint(4, vocab, (rows, 16), generator=g)
    with torch.inference_mode():
        # last-position logits, as RoSais scores: the stages then hold equal work (2 layers each on
        # the sandbox) rather than the last one also projecting every position onto the vocabulary
        reference = [full.model(ids, logits_to_keep=1).logits for ids in batches]
        answers = full.model.generate(prompts, max_new_tokens=new_tokens, eos_token_id=-1, do_sample=False,
                                      pad_token_id=0)  # no end token: every answer runs its full length
    whole = sum(t.numel() * t.element_size() for t in [*full.model.parameters(), *full.model.buffers()])
    result: dict = {"shards": shards, "micro_batches": micro, "rows": rows, "tokens": tokens, "dtype": dtype,
                    "new_tokens": new_tokens, "bytes_unsharded": whole, "transports": {}}
    identical = True
    try:
        shards_up = start_shards(entry, path)  # one set of shard processes for every transport
        # plain calls first: a compiled graph, once built, keeps a loop running on its actors
        for kind in sorted(transports, key=["actors", "compiled"].index):
            stages = kinds[kind](lambda: shards_up)
            lm = sharded_loaded_model(path, stages)
            lm.model.generation_config.eos_token_id = -1  # as the reference: no end token
            figures = transport_figures(stages, lm, batches, prompts, new_tokens, repeats)
            result["bytes_per_shard"] = stages.param_bytes()
            seq_out, pipe_out, got = figures.pop("_outputs")
            identical &= all(torch.equal(p, r) and torch.equal(s, r) for p, s, r in zip(pipe_out, seq_out, reference))
            identical &= all(torch.equal(a, answers) for a in got)
            result["transports"][kind] = figures
            if kind == "compiled":
                stages.close()
    finally:
        ray.shutdown()
    result["identical"] = identical
    # the headline: the runtime's default transport (plain actor calls), else the first measured
    head = result["transports"].get("actors") or next(iter(result["transports"].values()))
    result["speedup_vs_sequential"] = head["speedup_vs_sequential"]
    return result


def idle_overhead(path: str, label: str, rows: int, tokens: int, new_tokens: int, repeats: int) -> dict:
    """CPU seconds of forward and generate with route control installed and idle vs the plain
    model: the same model object, its hooks installed before each idle call and removed before
    each plain one (so weights, memory layout and kernels are the same on both sides), timed call
    by call in alternation; the ratio is idle / plain."""
    from core.routing import RouteControl

    lm = load_model(path, dtype="float32")
    lm.control.remove()  # the bare model; each idle call installs a control of its own
    model = lm.model
    ids = torch.randint(4, model.config.vocab_size, (rows, tokens), generator=torch.Generator().manual_seed(1))

    def forward():
        with torch.inference_mode():
            model(ids)

    def generate():
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def timed(fn, hooked: bool) -> float:
        control = RouteControl(model) if hooked else None  # installs its hooks; remove() takes them off
        start = time.thread_time()
        fn()
        elapsed = time.thread_time() - start
        if control is not None:
            control.remove()
        return elapsed

    result = {"model": label}
    for name, fn, calls in (("forward", forward, 10 * repeats), ("generate", generate, 2 * repeats)):
        timed(fn, True), timed(fn, False)  # warm-up
        idle, bare = [], []
        for _ in range(calls):  # call by call in alternation: a load spike hits both sides alike
            idle.append(timed(fn, True))
            bare.append(timed(fn, False))
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
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens generated per answer")
    ap.add_argument("--transports", default="actors,compiled",
                    help="comma-separated: actors (plain actor calls), compiled (Ray Compiled Graph)")
    ap.add_argument("--parts", default="pipeline,idle", help="comma-separated: pipeline, idle")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    path = args.model or str(build_sandbox())
    result: dict = {"load_average_start": os.getloadavg()}
    if "pipeline" in args.parts:
        result |= pipeline(path, args.shards, args.micro_batches, args.rows, args.tokens, args.dtype, args.repeats,
                           args.transports.split(","), args.new_tokens)
    if "idle" in args.parts:
        family = largest_tiny()
        with tempfile.TemporaryDirectory() as tmp:
            tiny = str(save_tiny_model(family, Path(tmp) / family))
            overhead = [idle_overhead(path, "sandbox" if not args.model else path, 8, 64, 32, 5),
                        idle_overhead(tiny, f"tiny {family}", 8, 64, 32, 5)]
        result["idle_hooks"] = overhead
        result["idle_hook_overhead_ratio"] = max(max(o["forward_ratio"], o["generate_ratio"]) for o in overhead)
    result["load_average_end"] = os.getloadavg()
    result["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch " \
                        f"{torch.__version__}, one thread per shard, no GPU"
    if args.json:
        print(json.dumps(result))
        return
    print(f"load average (1, 5, 15 min) at start {result['load_average_start']}, end {result['load_average_end']}")
    for kind, f in result.get("transports", {}).items():
        print(f"{kind}: pipelined {args.shards}-shard replica {f['speedup_vs_sequential']:.2f}x vs sequential "
              f"({f['sequential_s']:.2f} s -> {f['pipelined_s']:.2f} s; stage CPU {f['stage_cpu_s']}, cores used "
              f"{f['cores_used']:.2f}), generation "
              f"{f['generate_speedup']:.2f}x ({f['generate_whole_batch_s']:.2f} s -> {f['generate_pipelined_s']:.2f} s)")
    if "identical" in result:
        print(f"identical: {result['identical']}; bytes per shard: {result['bytes_per_shard']} of "
              f"{result['bytes_unsharded']}")
    for o in result.get("idle_hooks", []):
        print(f"idle route control on {o['model']}: forward x{o['forward_ratio']:.3f}, generate x{o['generate_ratio']:.3f}")

if __name__ == "__main__":
    main()
