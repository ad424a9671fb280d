"""Per-family router rules: every supported MoE family's selection, written once.

In transformers 5.x each router returns `(router_logits, top_k_weights, top_k_indices)` and the
selection happens inside the router. Route control therefore re-runs the family's selection on
*masked* logits. Each `select_*` below reproduces the router's own arithmetic exactly, so that a
zero mask gives bit-identical weights and indices (tests/test_routing.py checks this per family).

Shapes: N = tokens in the call (batch × sequence), E = routed experts, k = experts per token.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

# select(router, logits (N, E), choice_bias (N, E) or None) -> (weights (N, k), indices (N, k))
Selection = Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Family:
    """One MoE family: where its routers are and how they select experts."""

    model_type: str
    router_class: str  # "<transformers module>.<class>"; MoE layers are found by this type
    select: Selection
    # Biases are added to the logits, except for families that choose on another score (deepseek_v3
    # chooses on sigmoid + correction bias): there `bias_on_choice` routes the mask to that score.
    bias_on_choice: bool = False

    def choice_scores(self, router: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
        """(N, E) the scores whose order the family's top-k follows, before any group limit: the
        logits themselves, or for a family that chooses on another score (deepseek_v3) that score."""
        if self.bias_on_choice:
            return logits.sigmoid() + router.e_score_correction_bias
        return logits

    def router_type(self) -> type:
        module, _, name = self.router_class.rpartition(".")
        return getattr(importlib.import_module(module), name)


def _limit_to_groups(choice: torch.Tensor, n_group: int, topk_group: int, group_score: str,
                     fill: float, k: int) -> torch.Tensor:
    """Group-limited choice: keep the experts of the best `topk_group` groups.

    A route that forces experts from more groups than the limit allows cannot be honoured inside
    the limit; for those tokens (fewer than k allowed experts left) the limit is lifted, so that a
    forced set is always the set used. Unmasked tokens keep the family rule exactly.
    choice: (N, E), blocked experts at `fill` (0 after a softmax, -inf for sigmoid choice scores).
    """
    n, e = choice.shape
    grouped = choice.view(n, n_group, e // n_group)
    if group_score == "max":  # deepseek_v2 group_limited_greedy
        group_scores = grouped.max(dim=-1).values
    else:  # deepseek_v3: sum of the two best
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, e // n_group).reshape(n, e).bool()
    limited = choice.masked_fill(~score_mask, fill)
    allowed_left = (limited > fill).sum(dim=-1, keepdim=True)
    return torch.where(allowed_left >= k, limited, choice)


def select_softmax_topk(router: torch.nn.Module, logits: torch.Tensor):
    """mixtral, qwen2_moe, qwen3_moe, olmoe: softmax -> top-k -> renormalise (if norm_topk_prob)."""
    probs = F.softmax(logits, dtype=torch.float, dim=-1)
    top_value, top_index = torch.topk(probs, router.top_k, dim=-1)
    if getattr(router, "norm_topk_prob", True):  # Mixtral always renormalises
        top_value /= top_value.sum(dim=-1, keepdim=True)
    if hasattr(router, "norm_topk_prob"):  # Qwen/OLMoE routers cast back; Mixtral keeps float32
        top_value = top_value.to(logits.dtype)
    return top_value, top_index


def select_deepseek_v2(router: torch.nn.Module, logits: torch.Tensor):
    """softmax -> greedy or group-limited top-k -> x routed_scaling_factor."""
    scores = logits.softmax(dim=-1, dtype=torch.float32)
    if router.topk_method == "group_limited_greedy":
        scores = _limit_to_groups(scores, router.num_group, router.topk_group, "max", 0.0, router.top_k)
    weights, indices = torch.topk(scores, k=router.top_k, dim=-1, sorted=False)
    return weights * router.routed_scaling_factor, indices


def select_deepseek_v3(router: torch.nn.Module, logits: torch.Tensor, choice_bias=None):
    """sigmoid + e_score_correction_bias for choice, group-limited top-k; weights = raw sigmoid,
    renormalised if norm_topk_prob, x routed_scaling_factor."""
    scores = logits.sigmoid()
    choice = scores + router.e_score_correction_bias
    if choice_bias is not None:
        choice = choice + choice_bias
    choice = _limit_to_groups(choice, router.num_group, router.topk_group, "top2sum", float("-inf"),
                              router.top_k)
    indices = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, indices)
    if router.norm_topk_prob:
        weights /= weights.sum(dim=-1, keepdim=True) + 1e-20
    return weights * router.routed_scaling_factor, indices


def select_gpt_oss(router: torch.nn.Module, logits: torch.Tensor):
    """top-k on logits (bias included) -> softmax over the k."""
    top_value, top_index = torch.topk(logits, router.top_k, dim=-1)
    return F.softmax(top_value, dim=1, dtype=top_value.dtype), top_index


def select_phimoe(router: torch.nn.Module, logits: torch.Tensor):
    """sparsemixer top-2 in inference mode (the family's own function)."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    return sparsemixer(logits, jitter_eps=router.router_jitter_noise, training=False, top_k=router.top_k)


_M = "transformers.models"
FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("mixtral", f"{_M}.mixtral.modeling_mixtral.MixtralTopKRouter", select_softmax_topk),
    Family("qwen2_moe", f"{_M}.qwen2_moe.modeling_qwen2_moe.Qwen2MoeTopKRouter", select_softmax_topk),
    Family("qwen3_moe", f"{_M}.qwen3_moe.modeling_qwen3_moe.Qwen3MoeTopKRouter", select_softmax_topk),
    Family("olmoe", f"{_M}.olmoe.modeling_olmoe.OlmoeTopKRouter", select_softmax_topk),
    Family("deepseek_v2", f"{_M}.deepseek_v2.modeling_deepseek_v2.DeepseekV2TopkRouter", select_deepseek_v2),
    Family("deepseek_v3", f"{_M}.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter", select_deepseek_v3,
           bias_on_choice=True),
    Family("gpt_oss", f"{_M}.gpt_oss.modeling_gpt_oss.GptOssTopKRouter", select_gpt_oss),
    Family("phimoe", f"{_M}.phimoe.modeling_phimoe.PhimoeTopKRouter", select_phimoe),
)}


class UnsupportedModelError(ValueError):
    pass


def family_for(model_type: str) -> Family:
    """The family for a config's `model_type`, or an error listing the supported ones."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not a supported MoE family; supported: "
            f"{', '.join(sorted(FAMILIES))}") from None
