"""A GPU (or CPU) Ray actor holding one replica of one model.

It loads the model once, installs route control once (load_model does both), and then runs work
units for that model, writing each unit's rows to the result store itself, so results stream to
storage and the driver only sees a small status. If the actor's process dies, Ray restarts it and
re-runs the unit in flight (`max_restarts`, `max_task_retries`); a unit that raises is reported
back and the scheduler decides whether to try it again.

Task retries are unlimited and restarts bounded: while a lost node is being detected (seconds),
its actor is "temporarily unavailable" and every retry fails at once, so a finite retry count is
used up before the actor can restart elsewhere. A unit that kills its process every time still
ends, when the restarts run out.

A model with `shards: S` is a replica of S shard actors (actors/shard_worker.py) driven from here
through the model's `transport` (plain actor calls, or a Ray Compiled Graph); this actor then holds
no weights and asks for no resources of its own, and `close` releases the shards before it goes.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

import ray

from actors.judge_worker import JudgeActor
from core.judges import make_judge
from core.models import load_model, resolve_model_path
from core.store import ResultStore
from core.method import WorkUnit
from jobs.execute import execute_unit


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:2000]


@ray.remote(num_cpus=1, num_gpus=0, max_restarts=3, max_task_retries=-1, max_concurrency=1)
class ModelWorker:
    """One model replica; resources and its placement group bundle are set per replica with
    `.options(num_gpus=..., num_cpus=..., scheduling_strategy=...)` (jobs.runner)."""

    def __init__(self, model: Mapping[str, Any], judges: Mapping[str, Any], store_root: str, run_id: str,
                 store_answers: str, placement_group=None):
        path = resolve_model_path(model["path"], model.get("weights_sha256"))
        self.stages = None  # a sharded replica's shard actors (actors/shard_worker.py)
        if model.get("shards", 1) > 1:
            from actors.shard_worker import TRANSPORTS, start_shards
            from core.sharding import sharded_loaded_model

            # the replica's placement group holds one bundle per shard (jobs/runner.py)
            transport = TRANSPORTS[model.get("transport") or "actors"]
            # each shard resolves the model on its own node (the sandbox: that node's build, checked)
            self.stages = transport(lambda: start_shards(model, model["path"], placement_group))
            self.lm = sharded_loaded_model(path, self.stages, name=model["name"],
                                           trust_remote_code=model.get("trust_remote_code", False))
            if not model.get("num_gpus") or model.get("device") == "cpu":
                # on CPU a decode step of a small model is shorter than a Ray round trip: splitting
                # generation into micro-batches measured 0.66x on the sandbox idle, 0.47x loaded (BENCHMARKS.md)
                self.lm.model.generate_micro_batches = 1
        else:
            self.lm = load_model(path, name=model["name"], dtype=model["dtype"], device_map=model.get("device_map"),
                                 experts_implementation=model.get("experts_implementation"),
                                 trust_remote_code=model.get("trust_remote_code", False),
                                 revision=model.get("revision"), device=model.get("device", "auto"))
        # judges: name -> a JudgeActor (the judge runs on its own actor) or settings to build one here
        self.judges = {name: RemoteJudge(j.handle()) if isinstance(j, JudgeActor) else make_judge(**j)
                       for name, j in judges.items()}
        self.store = ResultStore(store_root)
        self.run_id, self.store_answers = run_id, store_answers

    def run(self, unit: WorkUnit, attempt: int) -> dict[str, Any]:
        """Run one unit and commit its rows; returns {"status", "seconds", "error"}."""
        start = time.perf_counter()
        try:
            tables = self._execute(unit)
            seconds = time.perf_counter() - start
            self.store.write_unit(self.run_id, unit.model, unit.unit_id, tables, {
                "method": unit.method, "kind": unit.kind, "status": "ok", "attempts": attempt,
                "seconds": seconds, "error": None})
            return {"status": "ok", "seconds": seconds, "error": None}
        except Exception as e:  # reported to the scheduler, which bounds the attempts
            return {"status": "failed", "seconds": time.perf_counter() - start, "error": error_text(e)}

    def _execute(self, unit: WorkUnit) -> dict:
        """The unit's rows. A shard that dies takes its replica down: rebuilt, the unit runs again
        from the start (no rows were written for the failed try)."""
        try:
            return execute_unit(unit, self.lm, self.judges, self.store_answers)
        except self.stages.lost if self.stages is not None else ():
            self.stages.rebuild()
            return execute_unit(unit, self.lm, self.judges, self.store_answers)

    def close(self) -> None:
        """Release a sharded replica's shard actors before this actor is killed: a compiled graph
        is torn down (its loops, channels and threads), not left to die with its owner."""
        if self.stages is not None:
            self.stages.close()


class RemoteJudge:
    """A judge running on a JudgeWorker actor, with the judge interface."""

    def __init__(self, handle):
        self.handle = handle
        self.name, self.settings = ray.get(handle.describe.remote())

    def judge(self, prompts, answers):
        return ray.get(self.handle.judge.remote(list(prompts), list(answers)))
