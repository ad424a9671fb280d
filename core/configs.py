"""Model configs built from scratch: tiny ones of every family (tests, CPU benchmarks) and the real
architectures of the published models (`moesafe models`; random-weight GPU benchmarks). No hub access needed."""
from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

_TINY_COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# Each family at toy size but with its distinctive routing features kept: shared experts,
# norm_topk_prob off, dense first layers, group-limited choice, router bias, sparsemixer.
_TINY: dict[str, dict] = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, norm_topk_prob=False),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=8,
                      norm_topk_prob=True),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                        first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1,
                        routed_scaling_factor=1.0, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=4,
                        qk_nope_head_dim=4, v_head_dim=8, num_key_value_heads=4),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                        first_k_dense_replace=1, n_group=4, topk_group=2, norm_topk_prob=True,
                        routed_scaling_factor=2.5, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
                        qk_nope_head_dim=4, v_head_dim=8, num_key_value_heads=4),
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, head_dim=8, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "phimoe": dict(num_local_experts=8, num_experts_per_tok=2),
}
# Variants for the code paths a family's default skips: name -> (model_type, config overrides).
# deepseek_v2_grouped takes `group_limited_greedy`; with k = 3 over 2 of 4 groups of 2 experts,
# a forced set can span more groups than the limit allows.
_TINY_VARIANTS: dict[str, tuple[str, dict]] = {
    "deepseek_v2_grouped": ("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                                num_experts_per_tok=3)),
}
# A trained deepseek_v3 has a non-zero e_score_correction_bias; the init's zero one would make the
# choice score (sigmoid + bias) and the weights (raw sigmoid) the same thing, hiding which is used.
# Its router weights are widened too (logits ~ N(0, 1.5²) instead of ~0.1²), so that the sigmoid
# scores spread over (0, 1) and the bias shifts the choice without deciding it alone.
CORRECTION_BIAS_STD = 0.5
CORRECTION_ROUTER_STD = 0.25


def tiny_config(name: str, **overrides) -> PretrainedConfig:
    """A few-layer, few-expert config of a family (or a variant's name) with random-init-friendly sizes."""
    model_type, variant = _TINY_VARIANTS.get(name, (name, {}))
    if model_type not in _TINY:
        raise ValueError(f"no tiny config for {name!r}; known: {', '.join(sorted(TINY_MODELS))}")
    return AutoConfig.for_model(model_type, **{**_TINY_COMMON, **_TINY[model_type], **variant, **overrides})


TINY_FAMILIES: tuple[str, ...] = tuple(_TINY)
TINY_MODELS: tuple[str, ...] = TINY_FAMILIES + tuple(_TINY_VARIANTS)  # every family, then the variants


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 128):
    """A word-level tokenizer over `w0 .. wN` plus chat markers, for tiny random models."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", chat_template=TINY_CHAT_TEMPLATE)


def save_tiny_model(name: str, path, seed: int = 0, tokenizer=None, **overrides):
    """Build a random tiny model `name` (a family or a variant, see `tiny_config`), save it with a
    tokenizer to `path`, return path.

    `tokenizer` (e.g. the sandbox's, to read real prompts) replaces the `w0 .. wN` one and sets
    the vocabulary size."""
    import torch
    from transformers import AutoModelForCausalLM

    if tokenizer is not None:
        overrides["vocab_size"] = len(tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(name, **overrides))
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if bias is not None:
                bias.normal_(0.0, CORRECTION_BIAS_STD)
                module.weight.normal_(0.0, CORRECTION_ROUTER_STD)
    model.save_pretrained(path)
    (tokenizer or tiny_tokenizer(model.config.vocab_size)).save_pretrained(path)
    return path
