"""Shard actors: one model replica as S Ray actors, each holding a contiguous range of its layers.

`RayStages` is the Ray transport for core/sharding.py: a forward is S actor calls chained by
ObjectRefs (hidden states go stage to stage through the object store, never via the driver), and
`forward_many` submits every micro-batch before waiting, so stage i works on micro-batch m while
stage i+1 works on m-1. The methods drive it through `sharded_loaded_model`, unchanged.
`CompiledStages` is the same replica driven through a Ray Compiled Graph (channels between the
stage actors set up once, instead of a task per call); benchmarks/pipeline_bench.py measures both.
A manifest model's `transport` picks one of `TRANSPORTS` for its sharded replicas.

Shard actors do not restart on their own: a shard that dies has lost its KV caches and the
replica's state with it, so the whole replica is rebuilt (`rebuild`: for a compiled graph, torn
down and compiled anew over the new actors) and the unit in flight is run again by its owner
(actors/model_worker.py); its rows are written only once the unit has finished, so nothing is
lost or written twice. Each transport names the errors that mean a shard died (`lost`).
"""
from __future__ import annotations

import collections
from dataclasses import replace
from typing import Any, Mapping, Sequence

import ray
import torch

from core.models import resolve_model_path
from core.sharding import ModelShard, StageMessage


@ray.remote(num_cpus=1, num_gpus=0, max_restarts=0, max_concurrency=1)
class ShardWorker:
    """Shard `index` of `count` of a model; resources per shard via `.options(num_gpus=..., num_cpus=...)`."""

    def __init__(self, path: str, index: int, count: int, dtype: str = "auto",
                 experts_implementation: str | None = None, trust_remote_code: bool = False,
                 weights_sha256: str | None = None):
        self.shard = ModelShard(resolve_model_path(path, weights_sha256), index, count, dtype=dtype, experts_implementation=experts_implementation,
                                trust_remote_code=trust_remote_code)

    def param_bytes(self) -> int:
        return self.shard.param_bytes()

    def pid(self) -> int:
        import os

        return os.getpid()

    def run(self, msg: StageMessage) -> StageMessage:
        # What leaves a shard is read by the next shard (its own GPU) or by the replica's driver (no GPU):
        # host tensors deserialise in either, device tensors only where that device is visible.
        out = self.shard.run(msg)
        return replace(out, hidden=out.hidden.cpu(), recorded=[_on_host(part) for part in out.recorded])

    def branch_cache(self, source: int, target: int, moe_layer: int, rows: int) -> None:
        self.shard.branch_cache(source, target, moe_layer, rows)

    def free_caches(self, ids: Sequence[int]) -> None:
        self.shard.free_caches(ids)


def _on_host(part):
    """A recording's tensors (nested in dicts, lists and named tuples) moved to the CPU."""
    if isinstance(part, torch.Tensor):
        return part.cpu()
    if isinstance(part, dict):
        return {key: _on_host(value) for key, value in part.items()}
    if isinstance(part, list):
        return [_on_host(value) for value in part]
    if isinstance(part, tuple) and hasattr(part, "_fields"):
        return type(part)(*map(_on_host, part))
    return part


def start_shards(model: Mapping[str, Any], path: str, placement_group=None) -> list:
    """The S shard actors of one replica of manifest model entry `model` (`shards`, and `num_gpus`
    and `num_cpus` per shard). With `placement_group` (S bundles, one per shard; PACK keeps a
    replica on as few nodes as fit), shard i goes to bundle i."""
    count = model.get("shards", 1)
    actors = []
    for i in range(count):
        options: dict[str, Any] = {"num_gpus": model.get("num_gpus", 0) or 0, "num_cpus": model.get("num_cpus", 1)}
        if placement_group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=placement_group, placement_group_bundle_index=i)
        actors.append(ShardWorker.options(**options).remote(
            path, i, count, model.get("dtype", "auto"), model.get("experts_implementation"),
            model.get("trust_remote_code", False), model.get("weights_sha256")))
    ray.get([a.param_bytes.remote() for a in actors])  # loaded, or the load error raised here
    return actors


class RayStages:
    """The stages of one replica as Ray actors (core.sharding.Stages)."""

    lost: tuple[type[BaseException], ...] = (ray.exceptions.RayActorError,)  # a shard died

    def __init__(self, start):
        self._start = start  # () -> list of ShardWorker handles, also used to rebuild
        self.actors = start()

    def __len__(self) -> int:
        return len(self.actors)

    def submit(self, msg: StageMessage) -> ray.ObjectRef:
        ref = msg
        for actor in self.actors:
            ref = actor.run.remote(ref)  # an ObjectRef argument is resolved on the actor's node
        return ref

    def result(self, ticket: ray.ObjectRef) -> StageMessage:
        return ray.get(ticket)

    def forward(self, msg: StageMessage) -> StageMessage:
        return self.result(self.submit(msg))

    def forward_many(self, msgs: Sequence[StageMessage]) -> list[StageMessage]:
        return ray.get([self.submit(m) for m in msgs])  # all submitted ahead: the stages overlap

    def branch_cache(self, source: int, target: int, moe_layer: int, rows: int) -> None:
        ray.get([a.branch_cache.remote(source, target, moe_layer, rows) for a in self.actors])

    def free_caches(self, ids: Sequence[int]) -> None:
        for actor in self.actors:
            try:
                actor.free_caches.remote(ids)  # in order after the forwards that used them
            except Exception:  # a replica being rebuilt or shut down: its caches are gone anyway
                pass

    def rebuild(self) -> None:
        """A shard died: take the whole replica down and start it again (caches and all)."""
        self.close()
        self.actors = self._start()

    def close(self) -> None:
        """Stop the shard actors (a replica being rebuilt or released)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)

    def param_bytes(self) -> list[int]:
        return ray.get([a.param_bytes.remote() for a in self.actors])


# One forward of one micro-batch through every stage takes far less than this even for a large
# model; only a stage that hangs reaches it (its replica is then rebuilt). Ray's own default (10 s)
# is short enough for a loaded 2-core machine, or a long prefill, to run past.
COMPILED_TIMEOUT_S = 600.0


class CompiledStages(RayStages):
    """The stages of one replica driven through a Ray Compiled Graph: stage i's `run` output goes
    to stage i+1 over a channel set up once, with no task submitted per call. At most `in_flight`
    messages are on their way at once (the graph's buffers); `forward_many` keeps that many going.
    Cache calls (`branch_cache`, `free_caches`) stay plain actor calls.

    A shard that dies makes Ray tear the graph down: its channels close, and a message sent or
    awaited then raises RayChannelError (or the shard's RayActorError), both meaning the replica
    is lost. Sending or awaiting one message waits at most `timeout_s`."""

    lost = (ray.exceptions.RayActorError, ray.exceptions.RayChannelError)

    def __init__(self, start, in_flight: int = 8, timeout_s: float = COMPILED_TIMEOUT_S):
        super().__init__(start)
        # generation keeps one micro-batch per stage on its way at once
        self.in_flight, self.timeout_s = max(in_flight, len(self.actors)), timeout_s
        self._compile()

    def _compile(self) -> None:
        from ray.dag import InputNode

        with InputNode() as message:
            node = message
            for actor in self.actors:
                node = actor.run.bind(node)
        self._graph = node.experimental_compile(_max_inflight_executions=self.in_flight,
                                                _submit_timeout=self.timeout_s)

    def submit(self, msg: StageMessage):
        return self._graph.execute(msg)

    def result(self, ticket) -> StageMessage:
        return ray.get(ticket, timeout=self.timeout_s)

    def forward_many(self, msgs: Sequence[StageMessage]) -> list[StageMessage]:
        out, pending = [], collections.deque()
        for msg in msgs:
            if len(pending) == self.in_flight:
                out.append(self.result(pending.popleft()))
            pending.append(self.submit(msg))
        return out + [self.result(ref) for ref in pending]

    def rebuild(self) -> None:
        super().rebuild()  # the old graph torn down (close), new actors started
        self._compile()

    def close(self) -> None:
        """Tear the graph down (its execution loops on the actors, its channels, its monitor
        thread here), then stop the actors. Safe to call again, and after Ray tore it down."""
        self._graph.teardown(kill_actors=True)
        super().close()


TRANSPORTS = {"actors": RayStages, "compiled": CompiledStages}  # a manifest model's `transport`
