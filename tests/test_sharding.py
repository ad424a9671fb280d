"""Layer-sharded models (core/sharding.py): a model split 2 and 3 ways over in-process stages gives
exactly the unsharded model's logits, answers, routes and recordings in float64, and each shard
holds only its share of the weights."""
from __future__ import annotations

import collections
import contextlib
import copy
import glob
import itertools
import re
from pathlib import Path

import pytest
import torch
from transformers.cache_utils import DummyLayer

from core.configs import TINY_FAMILIES, save_tiny_model
from core.fsour import FsourParams, fsour_search
from core.models import load_model
from core.rosais import RosaisParams, rosais_scores
from core.routing import Route
from core.sharding import ModelShard, layer_ranges, load_sharded

VOCAB = 128


@pytest.fixture(scope="module", params=("sandbox", *TINY_FAMILIES))
def tiny(request, tmp_path_factory):
    """(family, path, unsharded model, {2: 2-shard model, 3: 3-shard model}), all float64: the
    sandbox model (trained, 4 layers, its LM head tied to the embeddings) and a tiny model of
    every family."""
    if request.param == "sandbox":
        path = str(request.getfixturevalue("sandbox_dir"))
    else:
        path = str(save_tiny_model(request.param, tmp_path_factory.mktemp(request.param)))
    return (request.param, path, load_model(path, dtype="float64"),
            {s: load_sharded(path, s, dtype="float64") for s in (2, 3)})


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(7, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_layer_ranges_are_contiguous_and_balanced():
    assert layer_ranges(3, 2) == [range(0, 2), range(2, 3)]
    assert layer_ranges(61, 4) == [range(0, 16), range(16, 31), range(31, 46), range(46, 61)]
    with pytest.raises(ValueError, match="between 1 and the model's 3 decoder layers"):
        layer_ranges(3, 4)


def test_logits_identical_and_memory_is_a_share(tiny):
    """Each shard holds exactly the bytes of the unsharded model's tensors it owns: its layers (the
    first also the embeddings, the last the final norm and LM head, a tied one as a copy of the
    embeddings), plus the rotary frequencies every shard computes."""
    family, path, full, sharded = tiny
    ids = _ids(2, 9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        want = full.model(ids, attention_mask=mask).logits
    tensors = dict(itertools.chain(full.model.named_parameters(), full.model.named_buffers()))  # tied: once
    full_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    tied = full.model.config.tie_word_embeddings
    for count, lm in sharded.items():
        assert torch.equal(lm.model(ids, attention_mask=mask).logits, want), f"{family} in {count}"
        shards = lm.model.stages.shards
        share = [0] * count
        for name, t in tensors.items():
            for i in (range(count) if "rotary_emb" in name else _owner(name, shards, tied)):
                share[i] += t.numel() * t.element_size()
        held = [s.param_bytes() for s in shards]
        assert held == share, f"{family} in {count}"
        assert max(held) < 0.75 * full_bytes, f"{family}: a shard of {count} holds {held} of {full_bytes}"


def _owner(name: str, shards: list[ModelShard], tied: bool) -> set[int]:
    """Which shards should hold tensor `name` (of the checkpoint or the model): the one holding its
    decoder layer; the first the embeddings (and the last too when the LM head is tied to them); the
    last the final norm and the LM head."""
    layer = re.search(r"\.layers\.(\d+)\.", name)
    if layer:
        return {s.index for s in shards if int(layer[1]) in s.layers}
    if "embed_tokens" in name:
        return {0, len(shards) - 1} if tied else {0}
    assert re.search(r"(^lm_head|\.norm)\.", name), f"unexpected checkpoint tensor {name}"
    return {len(shards) - 1}


def test_shard_reads_only_its_tensors(tiny):
    """Each checkpoint tensor is read by the shard that holds it and by no other."""
    family, path, _, sharded = tiny
    from safetensors import safe_open

    names = set()
    for f in glob.glob(f"{path}/*.safetensors"):
        with safe_open(f, "pt") as h:
            names |= set(h.keys())
    tied = sharded[2].model.config.tie_word_embeddings
    for count, lm in sharded.items():
        shards = lm.model.stages.shards
        for name in names:
            readers = {s.index for s in shards if name in s.checkpoint_tensors}
            assert readers == _owner(name, shards, tied), f"{family} in {count}: {name} read by shards {readers}"
        assert all(s.checkpoint_tensors <= names for s in shards)
        assert shards[1].model.get_decoder().embed_tokens is None
        assert isinstance(shards[0].model.lm_head, torch.nn.Identity)


def _caches_hold_own_layers(shard: ModelShard, run):
    """`shard.run`, checking after each forward with a KV cache that the shard's cache has entries
    for its own decoder layers only (the others are dummies that hold nothing)."""
    def checked(msg):
        out = run(msg)
        if msg.cache is not None:
            layers = shard._caches[msg.cache].layers
            held = [i for i, layer in enumerate(layers) if not isinstance(layer, DummyLayer)]
            assert held == list(shard.layers) and all(layers[i].keys is not None for i in held)
        return out
    return checked


def test_greedy_answers_identical(tiny, monkeypatch):
    """Generation splits the rows into one micro-batch per stage, each with its rows of a per-row
    route; rows and micro-batches that end early (EOS) are padded as transformers pads them. Each
    shard's KV cache holds its own layers."""
    family, _, full, sharded = tiny
    for lm in sharded.values():
        for shard in lm.model.stages.shards:
            monkeypatch.setattr(shard, "run", _caches_hold_own_layers(shard, shard.run))
    c = full.control
    ids = _ids(3, 6, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    g = torch.Generator().manual_seed(6)
    per_row = torch.stack([torch.randperm(c.num_experts, generator=g)[: c.top_k] for _ in range(3)])  # (3, k)
    route = Route.force({c.num_layers - 1: per_row}, c.num_experts, scope="all")
    gen = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}

    def unsharded(eos):
        with torch.no_grad(), c.apply(route):
            return full.model.generate(ids, eos_token_id=eos, **gen)

    free = unsharded(-1)  # no row ends
    eos = int(free[2, 7])  # the last row's second new token: its micro-batch ends before the others
    want = unsharded(eos)
    assert want.shape[1] > 8 and int(want[2, -1]) == 0, "the last row should end early, padded"
    for shards, lm in sharded.items():
        config, lm.model.generation_config = lm.model.generation_config, copy.deepcopy(lm.model.generation_config)
        lm.model.generation_config.eos_token_id = eos
        try:
            with lm.control.apply(route):
                assert torch.equal(lm.model.generate(ids, **gen), want), f"{family} in {shards}"
        finally:
            lm.model.generation_config = config


def _routed_generation(lm, ids, routes):
    with torch.no_grad(), contextlib.ExitStack() as scope:
        for route in routes:
            scope.enter_context(lm.control.apply(route))
        rec = scope.enter_context(lm.control.record(keep_indices=True, keep_logits=True))
        return lm.model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), rec


def test_route_control_identical_on_shards(tiny):
    """force, disable and steer on every layer (nested), recorded counts, indices, router logits
    and experts selected off the router's own top-k: as unsharded."""
    family, _, full, sharded = tiny
    c = full.control
    ids = _ids(2, 6, seed=4)
    g = torch.Generator().manual_seed(5)
    last = c.num_layers - 1
    forced = torch.stack([torch.randperm(c.num_experts, generator=g)[: c.top_k] for _ in range(6)])[None]
    routes = [Route.force({0: forced}, c.num_experts),
              Route.disable({last: [1, 2]}, c.num_experts),
              Route.steering({last: [3]}, {0: [4]}, c.num_experts)]
    want, want_rec = _routed_generation(full, ids, routes)
    for shards, lm in sharded.items():
        got, rec = _routed_generation(lm, ids, routes)
        assert torch.equal(got, want), f"{family} in {shards}"
        assert torch.equal(rec.counts(), want_rec.counts())
        assert torch.equal(rec.tokens(), want_rec.tokens())
        assert torch.equal(rec.off_natural(), want_rec.off_natural()) and want_rec.off_natural().sum() > 0
        for layer in range(c.num_layers):
            assert torch.equal(rec.indices(layer), want_rec.indices(layer))
            assert torch.equal(rec.logits(layer), want_rec.logits(layer))


@contextlib.contextmanager
def _layer_inputs(lm):
    """{decoder layer: [(rows, positions) of the hidden states entering it, per call]} while open,
    after any expansion at that layer; over a sharded model, each shard's own layers."""
    stages = getattr(lm.model, "stages", None)
    held = ([(s.model.get_decoder().layers[i], i) for s in stages.shards for i in s.layers] if stages
            else [(layer, i) for i, layer in enumerate(lm.model.get_decoder().layers)])
    seen = collections.defaultdict(list)

    def hook(index):
        def record(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]  # (B, S, H)
            seen[index].append(tuple(hidden.shape[:2]))
        return record

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for layer, i in held]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def test_fsour_and_rosais_identical_on_shards(tiny):
    """F-SOUR's candidates expand at the shard owning the changed layer, RoSais's masks likewise:
    the same routes and scores, and every decoder layer runs on the same rows and positions as on
    the unsharded model (the layers before the expansion once on the prompt's rows, the positions
    in the cached prefix not again)."""
    family, _, full, sharded = tiny
    words = full.tokenizer.decode  # token ids -> text (word-level tokenizers: one word per id)
    params = FsourParams(candidates=6, threshold=0.999)
    prompt, target = words([17, 18, 19]), words([27, 28, 29])
    rosais = RosaisParams(s1=5, affirmative=(words([12]), words([13])))

    class P:
        id, prompt, dataset = "p0", words([17, 18, 19, 20]), "toy"
    with _layer_inputs(full) as want_inputs:
        want = fsour_search(full, prompt, target, restart=1, params=params)
        want_scores = rosais_scores(full, [P], params=rosais)
    assert want.route, "the search should accept some candidates"
    # not vacuous: some forward enters the first layer with fewer rows than the last (every forward
    # runs every layer once, so their calls pair up)
    last = max(want_inputs)
    assert any(first < final for (first, _), (final, _) in zip(want_inputs[0], want_inputs[last], strict=True))
    for shards, lm in sharded.items():
        with _layer_inputs(lm) as inputs:
            got = fsour_search(lm, prompt, target, restart=1, params=params)
            scores = rosais_scores(lm, [P], params=rosais)
        assert (got.route, got.joint_logprob, got.forwards) == (want.route, want.joint_logprob, want.forwards)
        assert scores == want_scores
        assert inputs == want_inputs, f"{family} in {shards}"


def test_shard_refuses_a_checkpoint_without_safetensors(tmp_path):
    from core.models import ModelLoadError

    path = Path(save_tiny_model("mixtral", tmp_path / "m"))
    for f in path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="no .safetensors files"):
        ModelShard(str(path), 0, 2)


def test_manifest_shards_field():
    from jobs.manifest import ManifestError, load_manifest

    text = """
models:
  - {name: m, path: sandbox, dtype: float32, num_cpus: 1, shards: SHARDS}
datasets:
  harmful: {source: sandbox, split: regular, limit: 2}
methods:
  - {method: rosais, dataset: harmful}
"""
    entry = load_manifest(text.replace("SHARDS", "2")).models[0]
    assert (entry.shards, entry.replica_cpus) == (2, 2)
    with pytest.raises(ManifestError, match="shards"):
        load_manifest(text.replace("SHARDS", "0"))
    with pytest.raises(ManifestError, match="use `shards` or `device_map: auto`"):
        load_manifest(text.replace("SHARDS", "2, device_map: auto"))
