"""Batches that shrink to fit: run a batched computation, and where a batch runs out of memory,
run it again in halves.

Batch sizes in this project (generation batches, F-SOUR's `candidate_batch`) bound memory only:
a row's result does not depend on the rows beside it (up to floating-point rounding), so a
smaller batch is always a correct retry.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence, TypeVar

import torch

log = logging.getLogger(__name__)
R = TypeVar("R")


def split_on_oom(run: Callable[[Sequence], R], items: Sequence, batch_size: int) -> list[R]:
    """`run` over `items` in consecutive batches of at most `batch_size`: one result per batch, in order.

    A batch that raises `torch.OutOfMemoryError` (`torch.cuda.OutOfMemoryError` is the same class)
    is halved and tried again from its start, and the smaller size holds for the rest of `items`,
    whose batches would most likely fail the same way. A single item that does not fit re-raises.
    `items` is anything with a length that slices (a list, a tensor's rows).
    """
    results: list[R] = []
    start, size = 0, batch_size
    while start < len(items):
        batch = items[start:start + size]
        try:
            results.append(run(batch))
            start += len(batch)
            continue
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                raise
        # Out here, not in the except block: the failed attempt's tensors, held by the exception's
        # traceback, are released by now, so the cache can hand their memory back.
        size = len(batch) // 2
        log.warning("out of memory on a batch of %d; retrying in batches of %d", len(batch), size)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results
