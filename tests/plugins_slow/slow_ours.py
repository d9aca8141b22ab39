"""``ours`` with a pause in every training step, so a test can kill a run in the middle of an epoch."""

import time
from typing import ClassVar

from rankbench.methods.ours import ProbabilisticL0


class SlowOurs(ProbabilisticL0):
    name: ClassVar[str] = "slow_ours"
    description: ClassVar[str] = "ours, 50 ms slower per training step (for the kill -9 resume test)"
    checks_tasks: ClassVar[bool] = False

    def loss(self, model, batch, task_loss):
        time.sleep(0.05)
        return super().loss(model, batch, task_loss)
