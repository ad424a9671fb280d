"""Route control on tiny models of all eight families, saved and loaded back through load_model."""
from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from core.configs import TINY_MODELS, save_tiny_model, tiny_config
from core.families import FAMILIES
from core.models import ModelLoadError, load_model
from core.routing import Route

VOCAB = 128


@pytest.fixture(scope="module", params=TINY_MODELS)
def tiny(request, tmp_path_factory):
    """(family, model directory, model loaded in float64 with route control); every family, and
    the variants that take a family's other code paths."""
    path = save_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    loaded = load_model(str(path), dtype="float64")
    return loaded.control.family.model_type, path, loaded


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(7, VOCAB, (batch, length), generator=g)


class RouterTap:
    """Records what each router finally returns (after route control's hook)."""

    def __init__(self, control):
        self.calls: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self.handles = [l.router.register_forward_hook(self._hook(l.ordinal)) for l in control.layers]

    def _hook(self, layer):
        def hook(module, args, output):
            logits, weights, indices = output
            self.calls.setdefault(layer, []).append((logits.detach(), weights.detach(), indices.detach()))
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def test_no_intervention_gives_identical_logits(tiny):
    family, path, loaded = tiny
    plain = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float64,
                                                 experts_implementation="eager").eval()
    ids = _ids(2, 9)
    c = loaded.control
    zero_route = Route(masks={l: torch.zeros(1, c.num_experts, dtype=torch.float64) for l in range(c.num_layers)})
    with torch.no_grad():
        reference = plain(ids).logits
        assert torch.equal(loaded.model(ids).logits, reference)
        with c.record():
            assert torch.equal(loaded.model(ids).logits, reference)
        # a zero mask goes through the family's re-implemented selection: it must be bit-identical
        with c.apply(zero_route):
            assert torch.equal(loaded.model(ids).logits, reference)
        gen_ref = plain.generate(ids, max_new_tokens=4, do_sample=False)
        with c.apply(Route(masks=zero_route.masks, scope="all")):
            assert torch.equal(loaded.model.generate(ids, max_new_tokens=4, do_sample=False), gen_ref)


def _expected_forced_weights(family: str, router, logits: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """The weight rule on a forced set, computed independently: logits (E,), forced (k,)."""
    z = logits[forced]
    if family == "deepseek_v3":
        w = z.sigmoid()
        w = w / w.sum() if router.norm_topk_prob else w
        return w * router.routed_scaling_factor
    w = torch.softmax(z.double(), -1)  # renormalised over the allowed set
    return w * getattr(router, "routed_scaling_factor", 1.0)


def test_forced_set_is_the_set_used(tiny):
    family, _, loaded = tiny
    c = loaded.control
    ids = _ids(1, 8, seed=1)
    g = torch.Generator().manual_seed(3)
    layer = c.num_layers - 1
    # per-position forced sets on positions 0..5 (6 and 7 stay free)
    forced = torch.stack([torch.randperm(c.num_experts, generator=g)[: c.top_k] for _ in range(6)])[None]
    tap = RouterTap(c)
    with torch.no_grad():
        loaded.model(ids)
        free_run = tap.calls[layer][-1]
        with c.apply(Route.force({layer: forced}, c.num_experts)):
            loaded.model(ids)
    tap.close()
    logits, weights, indices = tap.calls[layer][-1]
    for t in range(6):
        assert set(indices[t].tolist()) == set(forced[0, t].tolist()), f"{family} token {t}"
        if family != "phimoe":  # sparsemixer's weights are its own rule; its set is checked above
            order = indices[t]
            expected = _expected_forced_weights(family, c.layers[layer].router, logits[t], order)
            torch.testing.assert_close(weights[t].double(), expected.double())
            if family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v2"):
                assert weights[t].sum().item() == pytest.approx(1.0)  # even where norm_topk_prob is off
    # the layer's input is unchanged, so tokens without a forced set route as before
    assert torch.equal(indices[6:], free_run[2][6:])
    assert torch.equal(weights[6:], free_run[1][6:])


def test_disabled_expert_is_never_selected_and_topk_refills(tiny):
    family, _, loaded = tiny
    c = loaded.control
    ids = _ids(2, 6, seed=2)
    with torch.no_grad(), c.record(keep_indices=True) as free:
        loaded.model.generate(ids, max_new_tokens=5, do_sample=False)
    # disable the expert the unmasked run used most at every layer
    busiest = free.counts().sum(dim=(0, 2)).argmax(-1)  # (L,)
    disabled = {l: [int(busiest[l])] for l in range(c.num_layers)}
    with torch.no_grad(), c.apply(Route.disable(disabled, c.num_experts)), c.record(keep_indices=True) as rec:
        loaded.model.generate(ids, max_new_tokens=5, do_sample=False)
    for l in range(c.num_layers):
        idx = rec.indices(l)
        assert not (idx == disabled[l][0]).any(), f"{family} layer {l} used a disabled expert"
        assert idx.shape[-1] == c.top_k
        assert (idx.sort(-1).values.diff(dim=-1) != 0).all(), "top-k must refill with distinct experts"


FLOAT32_ROUTERS = {"deepseek_v2", "deepseek_v3"}


def test_rows_with_different_routes_match_separate_forwards(tiny):
    family, _, loaded = tiny
    c = loaded.control
    b, s = 3, 7
    ids = _ids(1, s, seed=4).expand(b, s)
    g = torch.Generator().manual_seed(5)
    experts = {l: torch.stack([torch.stack([torch.randperm(c.num_experts, generator=g)[: c.top_k]
                                            for _ in range(s)]) for _ in range(b)])
               for l in range(c.num_layers)}  # (B, T, k) per layer
    with torch.no_grad():
        with c.apply(Route.force(experts, c.num_experts)):
            batched = loaded.model(ids).logits
        for row in range(b):
            one = {l: e[row: row + 1] for l, e in experts.items()}
            with c.apply(Route.force(one, c.num_experts)):
                single = loaded.model(ids[row: row + 1]).logits
            # DeepSeek routers compute in float32 even in a float64 model, and a float32 matmul may sum in
            # another order for another batch size on some CPUs: ~1e-8 there; a route leaking between rows is O(1)
            tol = 1e-6 if family in FLOAT32_ROUTERS else 1e-10
            torch.testing.assert_close(batched[row: row + 1], single, rtol=tol, atol=tol)
    assert not torch.allclose(batched[0], batched[1]), "different routes should give different logits"


def test_scope_prompt_leaves_decode_untouched(tiny):
    family, _, loaded = tiny
    c = loaded.control
    ids = _ids(1, 6, seed=6)
    layer = c.num_layers - 1
    with torch.no_grad(), c.record(keep_indices=True) as free:
        loaded.model.generate(ids, max_new_tokens=6, do_sample=False)
    used_in_decode = free.indices(layer)[0, 6:].flatten()
    target = int(used_in_decode.mode().values)  # an expert the free decode steps really use
    for scope in ("prompt", "all"):
        tap = RouterTap(c)
        with torch.no_grad(), c.apply(Route.disable({layer: [target]}, c.num_experts, scope=scope)):
            loaded.model.generate(ids, max_new_tokens=6, do_sample=False)
        tap.close()
        prefill, *decode = tap.calls[layer]
        assert not (prefill[2] == target).any()
        spec = FAMILIES[family]
        router = c.layers[layer].router
        for logits, weights, indices in decode:
            raw = spec.select(router, logits) if not spec.bias_on_choice else spec.select(router, logits, None)
            if scope == "prompt":  # decode steps route by the family rule on unmasked logits
                assert torch.equal(indices, raw[1]) and torch.equal(weights, raw[0])
            else:
                assert not (indices == target).any()
        if scope == "all":
            assert any(not torch.equal(ind, spec.select(router, lg, *( [None] if spec.bias_on_choice else []))[1])
                       for lg, _, ind in decode), "scope all should change some decode step"


def _counts_by_hand(tap: RouterTap, control, out, prompt_mask, eos):
    """Counts from the routers' own outputs: real prompt tokens, and generated tokens before EOS."""
    rows, prompt_len = prompt_mask.shape
    expected = torch.zeros(rows, control.num_layers, 2, control.num_experts, dtype=torch.long)
    for l, calls in tap.calls.items():
        pos = 0
        for _, _, indices in calls:
            s = indices.shape[0] // rows
            per_row = indices.view(rows, s, -1)
            for row in range(rows):
                for j in range(s):
                    p = pos + j
                    generated = p >= prompt_len
                    if not generated and not prompt_mask[row, p]:
                        continue  # padding
                    if generated and eos in out[row, prompt_len: p + 1].tolist():
                        continue  # EOS itself, and what generate feeds a finished row
                    for e in per_row[row, j].tolist():
                        expected[row, l, int(generated), e] += 1
            pos += s
    return expected


def test_recorded_counts_match_router_outputs(tiny):
    family, _, loaded = tiny
    c = loaded.control
    batch = loaded.tokenizer(["w1 w2 w3 w4 w5 w6", "w9 w8 w7"], return_tensors="pt", padding=True)  # left padded
    tap = RouterTap(c)
    with torch.no_grad(), c.record() as rec:
        out = loaded.model.generate(**batch, max_new_tokens=4, do_sample=False)
    tap.close()
    expected = _counts_by_hand(tap, c, out, batch["attention_mask"], loaded.model.generation_config.eos_token_id)
    assert torch.equal(rec.counts(), expected)
    assert rec.tokens()[:, 0].tolist() == batch["attention_mask"].sum(1).tolist()


def test_recording_stops_at_each_rows_eos(tiny):
    family, _, loaded = tiny
    c, model = loaded.control, loaded.model
    batch = loaded.tokenizer(["w1 w2 w3 w4 w5 w6", "w9 w8 w7"], return_tensors="pt", padding=True)
    prompt_len = batch["input_ids"].shape[1]
    saved = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = None
        with torch.no_grad():
            free = model.generate(**batch, max_new_tokens=6, do_sample=False)
        eos = int(free[0, prompt_len + 1])  # make row 0's second answer token its EOS
        before_eos = int((free[0, prompt_len:] == eos).nonzero()[0])
        model.generation_config.eos_token_id = eos
        tap = RouterTap(c)
        with torch.no_grad(), c.record() as rec:
            out = model.generate(**batch, max_new_tokens=6, do_sample=False)
        tap.close()
    finally:
        model.generation_config.eos_token_id = saved
    assert torch.equal(rec.counts(), _counts_by_hand(tap, c, out, batch["attention_mask"], eos))
    generated_tokens_row0 = rec.counts()[0, 0, 1].sum() // c.top_k
    assert generated_tokens_row0 == before_eos, "only the answer tokens before EOS count"


def test_expand_at_reuses_prefix_and_matches_full_batch(tiny):
    """Candidates share layers below l and a KV prefix; results equal the plain batched forward."""
    family, _, loaded = tiny
    c = loaded.control
    n, s, t = 4, 9, 5  # candidates, sequence, first changed position
    ids = _ids(1, s, seed=7)
    layer = c.num_layers - 1
    g = torch.Generator().manual_seed(8)
    cand = torch.stack([torch.randperm(c.num_experts, generator=g)[: c.top_k] for _ in range(n)])  # (N, k)
    per_pos = torch.stack([torch.randperm(c.num_experts, generator=g)[: c.top_k] for _ in range(t + 1)])[None]
    per_pos = per_pos.expand(n, -1, -1).clone()
    per_pos[:, t] = cand  # rows differ only at (layer, t)
    route = Route.force({layer: per_pos}, c.num_experts)
    with torch.no_grad(), c.prompt_length(s):  # teacher forced: declare where the prompt ends
        with c.apply(route):
            full = loaded.model(ids.expand(n, s)).logits[:, t:]
        with c.apply(Route.force({layer: per_pos[:1, :t]}, c.num_experts)):
            prefix = loaded.model(ids[:, :t], use_cache=True).past_key_values
        with c.apply(route), c.expand_at(layer, n):
            branched = loaded.model(ids[:, t:], past_key_values=c.branch_cache(prefix, layer, n)).logits
    torch.testing.assert_close(branched, full, rtol=1e-6, atol=1e-6)  # deepseek routers compute in float32
    assert prefix.get_seq_length() == t, "branching must not modify the shared prefix cache"


def test_remove_restores_the_model(tiny):
    family, path, _ = tiny
    loaded = load_model(str(path), dtype="float64")
    ids = _ids(1, 5)
    with torch.no_grad():
        before = loaded.model(ids).logits
        loaded.control.remove()
        with loaded.control.apply(Route.disable({0: [0, 1]}, loaded.control.num_experts)):
            assert torch.equal(loaded.model(ids).logits, before)


def test_unsupported_family_is_named(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'llama' is not a supported MoE family; supported: deepseek_v2.*mixtral"):
        load_model(str(tmp_path))


def test_missing_path_and_offline_hub_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    import requests

    def no_network(url, timeout):
        raise requests.ConnectionError("Name or service not known")

    monkeypatch.setattr(requests, "head", no_network)  # fails at once, not after the hub client's retries
    with pytest.raises(ModelLoadError, match="unreachable \\(no network\\?\\): point `path` at a local copy"):
        load_model("some-org/some-moe-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline mode: the cache only, and it has no copy
    with pytest.raises(ModelLoadError, match="no network.*point `path` at a local"):
        load_model("some-org/some-moe-model")


def test_route_rejects_unknown_layer(tiny):
    _, _, loaded = tiny
    c = loaded.control
    with pytest.raises(ValueError, match="MoE layers"):
        with c.apply(Route.disable({c.num_layers: [0]}, c.num_experts)):
            pass


def test_tiny_configs_keep_family_features():
    assert tiny_config("deepseek_v2").first_k_dense_replace == 1
    assert tiny_config("qwen2_moe").norm_topk_prob is False
    assert tiny_config("deepseek_v2_grouped").topk_method == "group_limited_greedy"


# --- deepseek: the choice score vs the weights, and the group-limited path -------------------------

@pytest.fixture(scope="module")
def deepseek_v3(tmp_path_factory):
    return load_model(str(save_tiny_model("deepseek_v3", tmp_path_factory.mktemp("dsv3"))), dtype="float64")


@pytest.fixture(scope="module")
def deepseek_v2_grouped(tmp_path_factory):
    path = save_tiny_model("deepseek_v2_grouped", tmp_path_factory.mktemp("dsv2g"))
    return load_model(str(path), dtype="float64")


def _tapped_forward(loaded, ids, route: Route | None = None):
    """The routers' final (logits, weights, indices) per MoE layer for one forward."""
    tap = RouterTap(loaded.control)
    with torch.no_grad(), (loaded.control.apply(route) if route else contextlib.nullcontext()):
        loaded.model(ids)
    tap.close()
    return {l: calls[-1] for l, calls in tap.calls.items()}


def _groups_used(indices: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) number of distinct expert groups in each token's top-k: indices (N, k)."""
    return (indices // group_size).sort(-1).values.diff(dim=-1).ne(0).sum(-1) + 1


def test_deepseek_v3_bias_moves_the_choice_but_not_the_weights(deepseek_v3):
    """The fixture can tell choice score from weights: its bias changes which experts win, and
    the model's own router weights the winners by the raw sigmoid, not by sigmoid + bias."""
    c = deepseek_v3.control
    for l, (logits, weights, indices) in _tapped_forward(deepseek_v3, _ids(1, 16, seed=11)).items():
        router = c.layers[l].router
        assert router.e_score_correction_bias.abs().max() > 0.5, "the tiny deepseek_v3 bias must be sizeable"
        scores = logits.sigmoid()
        unbiased = scores.topk(c.top_k, dim=-1).indices.sort(-1).values
        assert not torch.equal(unbiased, indices.sort(-1).values), f"layer {l}: the bias should change some choice"
        raw = scores.gather(1, indices)
        biased = (scores + router.e_score_correction_bias).gather(1, indices).to(weights.dtype)
        scale = router.routed_scaling_factor
        torch.testing.assert_close(weights, raw / raw.sum(-1, keepdim=True) * scale)
        assert not torch.allclose(weights, biased / biased.sum(-1, keepdim=True) * scale)


def test_deepseek_v3_mask_goes_to_the_choice_score(deepseek_v3):
    """Blocking the expert with the largest correction bias: a mask on the raw logits would leave
    that expert its bias (sigmoid(-inf) + bias = bias) and it would still win; a mask on the
    choice score removes it. Winners are weighted by the raw sigmoid, renormalised, x scale."""
    c = deepseek_v3.control
    ids = _ids(1, 16, seed=12)
    favourite = {l: int(layer.router.e_score_correction_bias.argmax()) for l, layer in enumerate(c.layers)}
    free = _tapped_forward(deepseek_v3, ids)
    blocked = Route.disable({l: [e] for l, e in favourite.items()}, c.num_experts)
    masked = _tapped_forward(deepseek_v3, ids, blocked)
    for l, (logits, weights, indices) in masked.items():
        router = c.layers[l].router
        assert (free[l][2] == favourite[l]).any(), f"layer {l}: the favourite should win unmasked"
        assert not (indices == favourite[l]).any(), f"layer {l}: a blocked expert was chosen"
        # the family rule by hand: sigmoid + bias, favourite blocked, best topk_group groups (sum of top 2)
        choice = (logits.sigmoid() + router.e_score_correction_bias).index_fill(1, torch.tensor([favourite[l]]),
                                                                                 float("-inf"))
        groups = choice.view(len(choice), router.num_group, -1)
        keep = groups.topk(2, dim=-1).values.sum(-1).topk(router.topk_group, dim=-1).indices
        allowed = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter(1, keep, True)
        limited = groups.masked_fill(~allowed[..., None], float("-inf")).view_as(choice)
        expected = limited.topk(c.top_k, dim=-1).indices
        assert torch.equal(indices.sort(-1).values, expected.sort(-1).values), f"layer {l}"
        raw = logits.sigmoid().gather(1, indices)
        torch.testing.assert_close(weights, raw / raw.sum(-1, keepdim=True) * router.routed_scaling_factor)


def test_deepseek_v2_group_limited_path_is_taken(deepseek_v2_grouped):
    """Unmasked tokens keep to topk_group groups, which greedy top-k would not always do."""
    c = deepseek_v2_grouped.control
    free = _tapped_forward(deepseek_v2_grouped, _ids(1, 16, seed=13))
    for l, (logits, weights, indices) in free.items():
        router = c.layers[l].router
        assert router.topk_method == "group_limited_greedy"
        group_size = c.num_experts // router.num_group
        assert (_groups_used(indices, group_size) <= router.topk_group).all()
        greedy = logits.softmax(-1).topk(c.top_k, dim=-1).indices
        assert (_groups_used(greedy, group_size) > router.topk_group).any(), "the limit should bite"


def test_deepseek_v2_grouped_forced_set_across_groups_and_disabled_group(deepseek_v2_grouped):
    """A forced set spanning more groups than the limit is the set used (the limit is lifted
    for those tokens), weighted by the softmax over the set; disabling a whole group routes
    within the other groups, still inside the limit."""
    c = deepseek_v2_grouped.control
    router = c.layers[0].router
    group_size = c.num_experts // router.num_group
    ids = _ids(1, 10, seed=14)
    spanning = torch.tensor([0, group_size, 2 * group_size])  # one expert in each of 3 groups
    assert len(spanning) == c.top_k and router.topk_group < 3
    forced = _tapped_forward(deepseek_v2_grouped, ids, Route.force({0: spanning[None]}, c.num_experts))
    logits, weights, indices = forced[0]
    assert (indices.sort(-1).values == spanning).all()
    torch.testing.assert_close(weights, logits.gather(1, indices).softmax(-1) * router.routed_scaling_factor)
    # disable the group the free run uses most
    free = _tapped_forward(deepseek_v2_grouped, ids)
    busiest = int((free[0][2] // group_size).flatten().mode().values)
    group = list(range(busiest * group_size, (busiest + 1) * group_size))
    _, weights, indices = _tapped_forward(deepseek_v2_grouped, ids, Route.disable({0: group}, c.num_experts))[0]
    assert not torch.isin(indices, torch.tensor(group)).any()
    assert (_groups_used(indices, group_size) <= router.topk_group).all()
    assert (weights > 0).all()


def test_model_loads_from_s3_once(tmp_path, s3_bucket, monkeypatch):
    """An s3:// prefix is downloaded once into the cache, then loaded like a local directory."""
    import s3fs

    local = save_tiny_model("mixtral", tmp_path / "tiny")
    fs = s3fs.S3FileSystem()
    fs.put(str(local) + "/", f"{s3_bucket}/models/tiny/", recursive=True)
    monkeypatch.setenv("MOESAFE_CACHE", str(tmp_path / "cache"))
    prefix = f"s3://{s3_bucket}/models/tiny"
    loaded = load_model(prefix, dtype="float64")
    reference = load_model(str(local), dtype="float64")
    ids = _ids(1, 5)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, reference.model(ids).logits)
    fs.rm(f"{s3_bucket}/models/tiny", recursive=True)  # a second load must not need S3
    assert load_model(prefix, dtype="float64").control.num_layers == reference.control.num_layers
    with pytest.raises(ModelLoadError, match="does not exist on S3"):
        load_model(f"s3://{s3_bucket}/models/absent")
