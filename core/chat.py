"""Chat helpers shared by the methods: one user turn, no system prompt, the model's own chat template
(generation defaults), left padding, greedy decoding.

They work for any Hugging Face chat model: the template is rendered to text first and tokenised
without extra special tokens, so templates that write their own BOS are not doubled.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from typing import Any, Callable, ContextManager, Mapping, Sequence

import torch
from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase

from core.batching import split_on_oom


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Batched prompts need a pad token; chat models without one pad with EOS (masked out anyway)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def render_chat(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                add_generation_prompt: bool = True) -> list[str]:
    """Each prompt as one user turn through the tokenizer's chat template, as text."""
    conversations = [[{"role": "user", "content": prompt}] for prompt in prompts]
    return tokenizer.apply_chat_template(conversations, add_generation_prompt=add_generation_prompt,
                                         tokenize=False)


def encode_chat(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                add_generation_prompt: bool = True) -> BatchEncoding:
    """Chat-formatted prompts as left-padded tensors.

    Returns a `BatchEncoding` with `input_ids` and `attention_mask`, both (batch, max_len); left
    padding puts every prompt's last token in the last column, where generation continues.
    """
    ensure_pad_token(tokenizer)
    texts = render_chat(tokenizer, prompts, add_generation_prompt)
    return tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left",
                     return_token_type_ids=False, return_tensors="pt")


@torch.inference_mode()
def generate_batch(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                   max_new_tokens: int = 128, around: Callable[[int], ContextManager] | None = None) -> list[str]:
    """Greedy answers to `prompts` as ONE left-padded batch, rows in the order given.

    Use this inside `RouteControl.record()` or per-row routes: batch row i is prompts[i].
    `around(width)`, given the padded prompt width, is a context entered around the generation
    (e.g. a route on every prompt's last positions, which left padding puts in the last columns).
    """
    batch = encode_chat(tokenizer, prompts).to(model.device)
    with around(batch["input_ids"].shape[1]) if around is not None else contextlib.nullcontext():
        output_ids = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                                    pad_token_id=tokenizer.pad_token_id)  # (rows, prompt_len + new)
    new_ids = output_ids[:, batch["input_ids"].shape[1]:]  # (rows, new)
    return tokenizer.batch_decode(new_ids, skip_special_tokens=True)


def generate_greedy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                    max_new_tokens: int = 128, batch_size: int = 16,
                    around: Callable[[int], ContextManager] | None = None) -> list[str]:
    """Greedy answers to `prompts` (one user turn each), without the prompt and special tokens.

    Prompts are batched by length (longest first, so a batch that does not fit in memory fails
    early) to keep padding small; a batch that runs out of memory is split (core.batching).
    Answers come back in the order of `prompts`. `around`: as in `generate_batch`, per batch.
    """
    ensure_pad_token(tokenizer)
    texts = render_chat(tokenizer, prompts)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])

    def answer(rows: Sequence[int]) -> list[tuple[int, str]]:
        return list(zip(rows, generate_batch(model, tokenizer, [prompts[i] for i in rows], max_new_tokens, around)))

    answers: list[str] = [""] * len(prompts)
    for batch in split_on_oom(answer, order, batch_size):
        for row, text in batch:
            answers[row] = text
    return answers


class JudgePanel:
    """Several judges under their manifest names, in order: the first decides wherever a method
    must decide (F-SOUR's pre-check and restarts, the stored `jailbroken`/`refused` columns), and
    every judge's verdict goes to `generations`. Verdicts carry the manifest name as `judge`."""

    def __init__(self, judges: Mapping[str, Any]):
        if not judges:
            raise ValueError("a judge panel needs at least one judge")
        self.judges = dict(judges)
        self.name = next(iter(self.judges))

    @classmethod
    def of(cls, judge) -> JudgePanel:
        """`judge` itself if it is a panel, else a panel of that one judge under its own name."""
        return judge if isinstance(judge, JudgePanel) else cls({judge.name: judge})

    def judge_all(self, prompts: Sequence[str], answers: Sequence[str]) -> list[list]:
        """Per answer, every judge's verdict, the deciding judge's first."""
        per_judge = [[dataclasses.replace(v, judge=name) for v in judge.judge(prompts, answers)]
                     for name, judge in self.judges.items()]
        return [list(verdicts) for verdicts in zip(*per_judge)]


def judged_answers(lm, prompts: Sequence, route, judge, max_new_tokens: int,
                   batch_size: int) -> tuple[list[str], list[list]]:
    """Greedy answers to `prompts` (records with `.prompt`) under `route` (None: the unrouted model),
    and every verdict of `judge` (a judge or a JudgePanel) on each: verdicts[i][0] decides."""
    texts = [p.prompt for p in prompts]
    with lm.control.apply(route) if route is not None else contextlib.nullcontext():
        answers = generate_greedy(lm.model, lm.tokenizer, texts, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size)
    return answers, JudgePanel.of(judge).judge_all(texts, answers)


def generation_rows(prompts: Sequence, answers: Sequence[str], verdicts: Sequence[Sequence], method: str,
                    condition: str, route, params: str) -> list[dict]:
    """Rows of `generations`, one per answer with all its verdicts (the runtime adds the answer
    hash and the store_answers policy)."""
    scope = route.scope if route is not None else None
    return [{"prompt_id": p.id, "dataset": p.dataset, "method": method, "condition": condition,
             "prompt": p.prompt, "answer": answer, "verdicts": list(verdict_list), "scope": scope, "params": params}
            for p, answer, verdict_list in zip(prompts, answers, verdicts)]


def stored_answer(row: dict, store_answers: str) -> dict:
    """A generations row as stored under the manifest's `store_answers` policy (core.schemas.STORE_ANSWERS)."""
    answer = row["answer"]
    return {**row, "answer": answer if store_answers == "full" else None,
            "answer_sha256": "" if store_answers == "none" else hashlib.sha256(answer.encode()).hexdigest(),
            "store_answers": store_answers}
