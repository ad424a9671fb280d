"""A Ray actor holding one judge model (the `classifier` judge runs here, on its own GPU)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import ray

from core.judges import make_judge


@dataclass(frozen=True)
class JudgeActor:
    """Where a model actor finds a JudgeWorker: its name, looked up with ray.get_actor.

    Model actors are given this rather than the handle: a handle among an actor's constructor
    arguments makes Ray keep those arguments in the object store, from where a restarted actor
    may not get them back (and Ray says so at error level). A name is looked up again on restart."""

    name: str
    namespace: str

    def handle(self):
        return ray.get_actor(self.name, namespace=self.namespace)


@ray.remote(num_cpus=1, num_gpus=0, max_restarts=3, max_task_retries=-1)  # why -1: see model_worker.py
class JudgeWorker:
    """Resources and placement group bundle per judge via `.options(...)` (jobs.runner)."""

    def __init__(self, settings: Mapping[str, Any]):
        self.judge_impl = make_judge(**settings)

    def check(self) -> None:
        """The preflight: load the judge model here, where it will judge (JudgeError if unusable)."""
        self.judge_impl.check()

    def describe(self) -> tuple[str, dict]:
        return self.judge_impl.name, self.judge_impl.settings

    def judge(self, prompts: list[str], answers: list[str]):
        return self.judge_impl.judge(prompts, answers)
