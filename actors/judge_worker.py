"""A Ray actor holding one judge model (the `classifier` judge runs here, on its own GPU)."""
from __future__ import annotations

from typing import Any, Mapping

import ray

from core.judges import make_judge


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
