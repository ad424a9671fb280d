"""Layer-sharded models (core/sharding.py): a model split 2 and 3 ways over in-process stages gives
exactly the unsharded model's logits, answers, routes and recordings in float64, and each shard
holds only its share of the weights."""
from __future__ import annotations

import contextlib
import copy
import glob
from pathlib import Path

import pytest
import torch

from core.configs import TINY_FAMILIES, save_tiny_model
from core.fsour import FsourParams, fsour_search
from core.models import load_model
from core.rosais import RosaisParams, rosais_scores
from core.routing import Route
from core.sharding import ModelShard, layer_ranges, load_sharded

VOCAB = 128


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def tiny(request, tmp_path_factory):
    """(family, path, unsharded model, {2: 2-shard model, 3: 3-shard model}), all float64."""
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
    family, path, full, sharded = tiny
    ids = _ids(2, 9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        want = full.model(ids, attention_mask=mask).logits
    full_bytes = sum(t.numel() * t.element_size() for t in [*full.model.parameters(), *full.model.buffers()])
    for shards, lm in sharded.items():
        assert torch.equal(lm.model(ids, attention_mask=mask).logits, want), f"{family} in {shards}"
        held = [s.param_bytes() for s in lm.model.stages.shards]
        assert max(held) < 0.75 * full_bytes, f"{family}: a shard of {shards} holds {held} of {full_bytes}"
        # nothing held twice but the rotary frequencies, which every shard computes
        rotary = sum(b.numel() * b.element_size() for b in full.model.get_decoder().rotary_emb.buffers())
        assert sum(held) == full_bytes + (shards - 1) * rotary


def test_shard_reads_only_its_tensors(tiny):
    family, path, _, sharded = tiny
    shards = sharded[3].model.stages.shards
    from safetensors import safe_open

    names = set()
    for f in glob.glob(f"{path}/*.safetensors"):
        with safe_open(f, "pt") as h:
            names |= set(h.keys())
    assert sum(s.checkpoint_tensors for s in shards) == len(names)
    assert shards[1].model.get_decoder().embed_tokens is None
    assert isinstance(shards[0].model.lm_head, torch.nn.Identity)


def test_greedy_answers_identical(tiny):
    """Generation splits the rows into one micro-batch per stage, each with its rows of a per-row
    route; rows and micro-batches that end early (EOS) are padded as transformers pads them."""
    family, _, full, sharded = tiny
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
        rec = scope.enter_context(lm.control.record(keep_indices=True))
        return lm.model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), rec


def test_route_control_identical_on_shards(tiny):
    """force, disable and steer on every layer (nested), recorded counts and indices: as unsharded."""
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
        for layer in range(c.num_layers):
            assert torch.equal(rec.indices(layer), want_rec.indices(layer))


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2"])
def test_fsour_and_rosais_identical_on_shards(family, tmp_path):
    """F-SOUR's candidates expand at the shard owning the layer, RoSais's masks likewise: same results."""
    path = str(save_tiny_model(family, tmp_path / family))
    full = load_model(path, dtype="float64")
    params = FsourParams(candidates=6, threshold=0.999)
    prompt, target = "w10 w11 w12", "w20 w21 w22"
    want = fsour_search(full, prompt, target, restart=1, params=params)
    assert want.route, "the search should accept some candidates on a random model"

    class P:
        id, prompt, dataset = "p0", "w10 w11 w12 w13", "toy"
    want_scores = rosais_scores(full, [P], params=RosaisParams(s1=5, affirmative=("w5", "w6")))
    for shards in (2, 3):
        lm = load_sharded(path, shards, dtype="float64")
        got = fsour_search(lm, prompt, target, restart=1, params=params)
        assert (got.route, got.joint_logprob, got.forwards) == (want.route, want.joint_logprob, want.forwards)
        assert rosais_scores(lm, [P], params=RosaisParams(s1=5, affirmative=("w5", "w6"))) == want_scores


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
