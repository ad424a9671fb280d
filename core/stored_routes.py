"""Stored F-SOUR routes put back to work on batches of prompts (fsour_transfer, route_monitor).

A stored route is its steps, `[{"layer", "token", "experts"}]` (the `route` column of
`fsour_routes`): at MoE layer `layer` and prompt position `token` exactly `experts` are allowed.
Here routes are re-indexed onto another prompt (`align_steps`), placed per row in one left-padded
batch (`place_routes`), and run: answers with the routing monitor's counts (`routed_answers`), or
the target reply's joint log-probability teacher-forced (`target_logprobs`). Every row of a
batch carries its own route; nothing loops over tokens or candidates in Python.

Shapes: B = rows, W = padded width, P = a prompt's own length, L = MoE layers, E = experts, k = top-k.
"""
from __future__ import annotations

import zlib
from typing import Mapping, Sequence

import torch

from core.batching import split_on_oom
from core.chat import encode_chat, ensure_pad_token, render_chat
from core.routing import Route, Scope, mask_allowing

Steps = Sequence[Mapping]  # [{"layer", "token", "experts"}]
ALIGNMENTS: tuple[str, ...] = ("end", "start")


def align_steps(steps: Steps, src_tokens: int, dst_tokens: int, alignment: str) -> list[dict]:
    """`steps` of a route found on a prompt of `src_tokens` tokens, re-indexed onto one of
    `dst_tokens`: "end" keeps each step's distance from the prompt's end (t - P_src + P_dst: the
    chat template's closing tokens meet the same experts), "start" keeps its index t. Steps that
    fall outside the destination prompt are dropped."""
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    shift = dst_tokens - src_tokens if alignment == "end" else 0
    return [{**step, "token": step["token"] + shift} for step in steps
            if 0 <= step["token"] + shift < dst_tokens]


def random_steps(steps: Steps, num_experts: int, k: int, seed: int, *key: object) -> list[dict]:
    """The control of a route: the same (position, layer) slots, each with k experts drawn at random.
    The draw depends only on `seed` and `key` (e.g. source, destination, alignment, draw), so it
    is the same however the rows are split into units."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(repr(key).encode()))
    drawn = torch.rand(len(steps), num_experts, generator=generator).argsort(dim=-1)[:, :k]  # (n, k)
    return [{**step, "experts": sorted(experts)} for step, experts in zip(steps, drawn.tolist())]


def place_routes(steps: Sequence[Steps], offsets: torch.Tensor, width: int, num_layers: int,
                 num_experts: int, scope: Scope = "prompt") -> Route:
    """One Route for a left-padded batch: row i's step at prompt position t is forced at column
    offsets[i] + t. Layers no row forces carry no mask; rows without a step there stay unforced."""
    rows = [i for i, route in enumerate(steps) for _ in route]
    flat = [step for route in steps for step in route]
    if not flat:
        return Route(scope=scope)
    layer = torch.tensor([s["layer"] for s in flat])
    column = offsets.cpu()[rows] + torch.tensor([s["token"] for s in flat])
    experts = torch.tensor([list(s["experts"]) for s in flat])  # (n, k)
    masks = torch.zeros(num_layers, len(steps), width, num_experts)  # (L, B, W, E) additive
    masks[layer, torch.tensor(rows), column] = mask_allowing(experts, num_experts)
    return Route(masks={int(l): masks[l] for l in layer.unique()}, scope=scope)


def prompt_lengths(tokenizer, prompts: Sequence[str]) -> list[int]:
    """P of each prompt: its tokens in the chat template, as the methods encode it."""
    ensure_pad_token(tokenizer)
    return [len(ids) for ids in tokenizer(render_chat(tokenizer, prompts), add_special_tokens=False)["input_ids"]]


def routed_answers(lm, prompts: Sequence[str], steps: Sequence[Steps], scope: Scope, max_new_tokens: int,
                   batch_size: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Greedy answers to `prompts`, row i under route `steps[i]` (empty: unrouted), in batches of
    `batch_size` rows of similar length (split further if memory runs out). Returns (answers,
    off_natural (B,) selected experts outside the router's own top-k, decisions (B,) selections
    made: counted tokens x L x k), the routing monitor's numerator and denominator per row."""
    control, tokenizer = lm.control, lm.tokenizer
    lengths = prompt_lengths(tokenizer, prompts)
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    answers: list[str] = [""] * len(prompts)
    off = torch.zeros(len(prompts), dtype=torch.long)
    decisions = torch.zeros(len(prompts), dtype=torch.long)

    @torch.inference_mode()
    def run(rows: Sequence[int]) -> None:
        batch = encode_chat(tokenizer, [prompts[i] for i in rows]).to(lm.device)
        width = batch["input_ids"].shape[1]
        offsets = width - batch["attention_mask"].sum(1)  # (B,) left padding of each row
        route = place_routes([steps[i] for i in rows], offsets, width, control.num_layers, control.num_experts, scope)
        with control.apply(route), control.record() as rec:
            out = lm.model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                    pad_token_id=tokenizer.pad_token_id)  # (B, W + new)
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        counted = rec.tokens().sum(1).cpu() * control.num_layers * control.top_k  # (B,)
        for j, i in enumerate(rows):
            answers[i] = texts[j]
        index = torch.tensor(list(rows))
        off[index] = rec.off_natural().sum((1, 2))
        decisions[index] = counted

    split_on_oom(run, order, batch_size)
    return answers, off, decisions


def target_logprobs(lm, prompts: Sequence[str], targets: Sequence[str], steps: Sequence[Steps], scope: Scope,
                    batch_size: int) -> torch.Tensor:
    """(B,) Σ log p(target_i | chat(prompt_i)) teacher-forced, row i under route `steps[i]`: rows
    left-padded to a common width, so every target ends in the last column."""
    control, tokenizer = lm.control, lm.tokenizer
    ensure_pad_token(tokenizer)
    prompt_ids = tokenizer(render_chat(tokenizer, prompts), add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(list(targets), add_special_tokens=False)["input_ids"]
    result = torch.zeros(len(prompts), dtype=torch.float64)

    @torch.inference_mode()
    def run(rows: Sequence[int]) -> None:
        seqs = [prompt_ids[i] + target_ids[i] for i in rows]
        width = max(map(len, seqs))
        y_max = max(len(target_ids[i]) for i in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros(len(rows), width, dtype=torch.long)
        target = torch.zeros(len(rows), y_max, dtype=torch.long)  # right-aligned, like the targets
        keep = torch.zeros(len(rows), y_max, dtype=torch.bool)
        for j, (i, seq) in enumerate(zip(rows, seqs)):  # marshalling token lists into tensors
            ids[j, width - len(seq):] = torch.tensor(seq)
            attention[j, width - len(seq):] = 1
            y = len(target_ids[i])
            target[j, y_max - y:] = torch.tensor(target_ids[i])
            keep[j, y_max - y:] = True
        offsets = width - attention.sum(1)  # (B,)
        prompt_end = offsets + torch.tensor([len(prompt_ids[i]) for i in rows])  # (B,) where each prompt ends
        route = place_routes([steps[i] for i in rows], offsets, width, control.num_layers, control.num_experts, scope)
        with control.prompt_length(prompt_end.to(lm.device)), control.apply(route):
            logits = lm.model(ids.to(lm.device), attention_mask=attention.to(lm.device),
                              position_ids=(attention.cumsum(-1) - 1).clamp(min=0).to(lm.device),
                              logits_to_keep=y_max + 1).logits  # (B, Y + 1, V)
        logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)  # (B, Y, V): predicts the last Y columns
        picked = logp.gather(-1, target.to(lm.device)[..., None]).squeeze(-1)  # (B, Y)
        result[torch.tensor(list(rows))] = (picked * keep.to(lm.device)).sum(-1).cpu()

    split_on_oom(run, list(range(len(prompts))), batch_size)
    return result
