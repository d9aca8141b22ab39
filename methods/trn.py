"""Uniform-rank tensor ring/train (Wang et al. 2018 style baseline)."""

from typing import ClassVar

from rankbench.plugin import Hyper, Knob, Method, Search


class UniformRank(Method):
    """Every bond has the same rank r; no selector, no penalty. Sweeping r gives
    the uniform-rank trade-off curve the other methods are compared against."""

    name: ClassVar[str] = "trn"
    description: ClassVar[str] = "uniform-rank tensor ring/train, every bond rank r, no selection"
    role: ClassVar[str] = "uniform"
    checks_tasks: ClassVar[bool] = True
    compression_knob: ClassVar[Knob | None] = Knob("rank", increases_compression=False, found_by="model")
    hyperparameters: ClassVar[dict[str, Hyper]] = {
        "rank": Hyper(10, "rank of every bond", minimum=1, search=Search(2, 30), label=True),
    }

    def initial_rank(self, task_rank: int) -> int:
        return self.params["rank"]
