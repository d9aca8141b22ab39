"""A method plugin for tests/test_matched_study.py: it keeps a fraction ``keep`` of the task's rank.

Its compression is known only once its run has been built, as a learned method's is after training,
so a matched study searches ``keep`` with runs (``found_by="training"``); it moves monotonically
(in steps of one rank) and needs one epoch to measure.
"""

from __future__ import annotations

from typing import ClassVar

from rankbench.plugin import Hyper, Knob, Method, Search


class KeepFraction(Method):
    name: ClassVar[str] = "keep_fraction"
    description: ClassVar[str] = "test plugin: every bond at round(keep x the task's rank), no selection"
    compression_knob: ClassVar[Knob | None] = Knob("keep", increases_compression=False)
    hyperparameters: ClassVar[dict[str, Hyper]] = {
        "keep": Hyper(1.0, "fraction of the task's rank kept", minimum=0.01, maximum=1.0,
                      search=Search(0.05, 1.0, log=True)),
    }

    def initial_rank(self, task_rank: int) -> int:
        return max(1, round(self.params["keep"] * task_rank))
