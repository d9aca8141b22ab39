"""``ours`` that is slow on a run's first attempt, for tests/test_slurm.py: so a worker can be stopped mid-trial.

Each training step from the second epoch on sleeps ``RANKBENCH_TEST_STEP_DELAY`` seconds (default 0:
as fast as ``ours``), but only in a run's first attempt: not once the run was resumed from a checkpoint
(``load_state_dict``), nor in a Slurm job that was requeued (``SLURM_RESTART_COUNT`` > 0). The first epoch
is fast, so a checkpoint exists early; a resumed run finishes fast. The pause changes no number: the
run's metrics are those of ``ours`` with the same settings, bit for bit.
"""

import os
import time
from collections.abc import Mapping
from typing import Any, ClassVar

from rankbench.methods.ours import ProbabilisticL0


class SlurmSlow(ProbabilisticL0):
    name: ClassVar[str] = "slurm_slow"
    description: ClassVar[str] = "ours, slow from its second epoch in a first attempt (tests/test_slurm.py)"
    checks_tasks: ClassVar[bool] = False

    def __init__(self, params):
        super().__init__(params)
        self._epochs_done = 0
        self._resumed = False

    def _delay(self) -> float:
        if self._resumed or self._epochs_done < 1 or os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0"):
            return 0.0
        return float(os.environ.get("RANKBENCH_TEST_STEP_DELAY") or 0)

    def loss(self, model, batch, task_loss):
        delay = self._delay()
        if delay:
            time.sleep(delay)
        return super().loss(model, batch, task_loss)

    def on_epoch_end(self, model, epoch: int, metrics: Mapping[str, float]) -> None:
        super().on_epoch_end(model, epoch, metrics)
        self._epochs_done = epoch

    def load_state_dict(self, model, state: Mapping[str, Any]) -> None:
        super().load_state_dict(model, state)
        self._resumed = True
