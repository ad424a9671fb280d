"""SAFEx bootstrap speed: rounds per second on stored counts of a Qwen3-30B-A3B-sized model.

48 MoE layers x 128 experts, a group of 500 prompts with random decode counts (up to 128 tokens
each, top-8 routing). The bootstrap never runs the model, so this is the whole cost of step 2.

    PYTHONPATH=. python benchmarks/safex_bench.py [--rounds 5000] [--prompts 500] [--device cpu]
"""
from __future__ import annotations

import argparse
import time

import torch

from core.safex import bootstrap_selection


def random_counts(prompts: int, layers: int, experts: int, top_k: int, max_tokens: int,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts (P, L, E) and tokens (P,) shaped like real ones: each token adds k experts per layer."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, max_tokens + 1, (prompts,), generator=g)  # (P,)
    # Expert popularity differs per layer; each prompt spreads k * T_i selections over it.
    popularity = torch.rand(layers, experts, generator=g) ** 3  # (L, E)
    shares = popularity / popularity.sum(-1, keepdim=True)
    draws = (tokens * top_k)[:, None, None] * shares[None]  # (P, L, E) expected selections
    counts = torch.poisson(draws, generator=g).long().clamp(max=int(tokens.max()))
    return counts, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5000)
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    counts, tokens = random_counts(args.prompts, args.layers, args.experts, top_k=8, max_tokens=128)
    counts, tokens = counts.to(args.device), tokens.to(args.device)
    print(f"group {args.prompts} prompts, {args.layers} layers x {args.experts} experts, "
          f"{torch.get_num_threads()} CPU threads, device {args.device}")
    bootstrap_selection(counts, tokens, 10)  # warm-up
    for per_layer in (True, False):
        started = time.perf_counter()
        selected = bootstrap_selection(counts, tokens, args.rounds, alpha=0.05, per_layer=per_layer)
        if args.device != "cpu":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        print(f"per_layer={per_layer!s:5}  {args.rounds} rounds in {seconds:.2f} s = "
              f"{args.rounds / seconds:,.0f} rounds/s  (experts ever selected: {int((selected > 0).sum())})")


if __name__ == "__main__":
    main()
