"""Where a sharded replica's actors go, on a real local Ray cluster of two 1-CPU worker nodes (and a
head that runs nothing): one placement group per replica with one bundle per shard (its `num_cpus`
and `num_gpus`), packed on as few nodes as hold it, so a replica that no node can hold spans nodes;
shard i runs in bundle i, and the hidden states crossing nodes give the unsharded model's logits."""
from __future__ import annotations

import pytest
import ray
import torch
from ray.util.placement_group import placement_group_table

from actors.model_worker import ModelWorker
from core.models import load_model
from core.store import ResultStore
from jobs.manifest import load_manifest
from jobs.runner import Scheduler

MANIFEST = """
run_id: placed
models:
  - {name: sandbox, path: sandbox, dtype: float64, shards: 2, num_cpus: 1}
  - {name: big, path: sandbox, dtype: float64, shards: 3, num_cpus: 1, num_gpus: 0.5}
datasets:
  harmful: {source: sandbox, split: regular, limit: 2}
methods:
  - {method: rosais, dataset: harmful}
"""


def _shard_nodes(worker) -> list[tuple[int, str]]:
    """(shard index, node id) of each shard actor a model actor drives, in stage order."""
    def placed(self):
        return ray.get([a.__ray_call__.remote(lambda s: (s.shard.index, ray.get_runtime_context().get_node_id()))
                        for a in self.stages.actors])
    return ray.get(worker.__ray_call__.remote(placed))


def test_a_replica_no_node_can_hold_spans_nodes(two_worker_cluster, sandbox_dir, tmp_path):
    manifest = load_manifest(MANIFEST)
    scheduler = Scheduler(manifest, ResultStore(str(tmp_path / "out")), "placed", progress=False)
    try:
        sharded, big = (scheduler._model(entry) for entry in manifest.models)
        for model in (sharded, big):
            scheduler._add_replica(model)
        # resources per shard: one bundle each, in one PACK group per replica
        wanted = placement_group_table(big.replicas[0].group)
        assert wanted["strategy"] == "PACK"
        assert list(wanted["bundles"].values()) == [{"CPU": 1.0, "GPU": 0.5}] * 3
        group = sharded.replicas[0].group
        assert group.wait(120), "two 1-CPU nodes can hold a replica of two 1-CPU shards between them"
        table = placement_group_table(group)
        assert table["strategy"] == "PACK" and list(table["bundles"].values()) == [{"CPU": 1.0}] * 2
        worker = scheduler._model_worker(ModelWorker, sharded.entry, group)
        placed = _shard_nodes(worker)
        assert [i for i, _ in placed] == [0, 1]
        assert [node for _, node in placed] == [table["bundles_to_node_id"][i] for i in (0, 1)]
        assert len({node for _, node in placed}) == 2, "the replica should span both nodes"
        ids = torch.randint(4, 300, (2, 7), generator=torch.Generator().manual_seed(0))
        got = ray.get(worker.__ray_call__.remote(lambda self: self.lm.model(ids).logits))
        with torch.no_grad():
            assert torch.equal(got, load_model(str(sandbox_dir), dtype="float64").model(ids).logits)
        ray.kill(worker)
    finally:
        scheduler._remove_groups()
