"""The run's progress bar: what is planned, which stage each (model, method) is in, what is done.

A plan yields its stages one at a time, and a later stage's size depends on the results of the
one before (F-SOUR's restarts run only for prompts not yet jailbroken), so the number of units is
final only once every plan has yielded its last stage. Until then the bar shows units done of
units planned so far as `n/total+`, with no percentage or ETA (they would fall back as stages
are added); once final, the usual bar with its ETA. Units done by an earlier attempt count as
done at once.

    progress = RunProgress("nightly", enabled=True)
    progress.planned("sandbox/fsour", stage=1, units=8)   # a plan yielded its first stage
    progress.done()                                       # a unit finished (or was done earlier)
    progress.final()                                      # every plan has yielded its last stage
"""
from __future__ import annotations

from tqdm import tqdm

_OPEN_FORMAT = "{desc}: {n_fmt}/{total_fmt}+ units planned so far [{elapsed}{postfix}]"


class RunProgress:
    def __init__(self, run_id: str, enabled: bool = True):
        self.bar = tqdm(total=0, unit="unit", desc=run_id, disable=not enabled, dynamic_ncols=True,
                        bar_format=_OPEN_FORMAT)
        self.stages: dict[str, int] = {}  # "model/method" -> the stage it is in (1-based)
        self.wait = ""  # what the run waits for (replicas not yet placed), or ""
        self.total_final = False

    def planned(self, plan: str, stage: int, units: int) -> None:
        """`plan` ("model/method") yielded its stage number `stage` with `units` units."""
        self.stages[plan] = stage
        self.bar.total += units
        self._show_stages()

    def finished(self, plan: str) -> None:
        """`plan` has no more stages."""
        self.stages.pop(plan, None)
        self._show_stages()

    def waiting(self, line: str) -> None:
        """What the run waits for ("waiting for 2 x {GPU: 1}: autoscaler pending, 3 min"), or "" once placed."""
        if line != self.wait:
            self.wait = line
            self._show_stages()

    def done(self) -> None:
        """One unit finished: run now, done by an earlier attempt, or failed."""
        self.bar.update(1)

    def final(self) -> None:
        """Every plan has yielded its last stage: the total is the run's, and the ETA means something."""
        if not self.total_final:
            self.total_final = True
            self.bar.bar_format = None  # tqdm's default: percentage, bar and ETA
            self.bar.refresh()

    def write(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()

    def _show_stages(self) -> None:
        shown = ", ".join([f"{plan} stage {stage}" for plan, stage in self.stages.items()] + [self.wait] * bool(self.wait))
        self.bar.set_postfix_str(shown, refresh=True)
