"""Every name a run records in MLflow, declared once: params and metrics, with what each means.

A name is a ``str`` (use it as a dict key or an MLflow key as it is) that also
carries its declaration: whether a metric is logged per epoch or once at the
end, which direction is better, its unit. The trainer, the run, studies,
reports, figures and export all name quantities through this module, so one
quantity has one name (``compression`` per epoch and at the end alike).
"""

from __future__ import annotations

from typing import Literal

Kind = Literal["param", "epoch", "final"]
Direction = Literal["maximize", "minimize", ""]


class Record(str):
    """A recorded name and its declaration.

    A ``str`` (use it as a dict key or an MLflow key as it is) that also carries what
    it means. A task declares its extra final metrics as records in ``Task.metrics``,
    e.g. ``Record("test_bleu", "final", "sacreBLEU of the test split", direction="maximize")``;
    ``run`` and ``report`` then show each as a column.

    Built as ``Record(name, kind, help, *, direction="", unit="")``; the record is the
    string ``name``.

    Attributes:
        kind: ``"param"``, ``"epoch"`` (logged every epoch) or ``"final"`` (once, at the end).
        direction: ``"maximize"``, ``"minimize"`` or ``""`` (neither).
        unit: Its unit (``"%"``, ``"x"``, ``"s"``, or ``""``).
        help: What it means.
    """

    kind: Kind
    direction: Direction
    unit: str
    help: str

    def __new__(cls, name: str, kind: Kind, help: str, *, direction: Direction = "", unit: str = "") -> Record:
        record = super().__new__(cls, name)
        record.kind, record.direction, record.unit, record.help = kind, direction, unit, help
        return record

    def __reduce__(self) -> tuple:
        return (str, (str(self),))  # pickles (checkpoints, worker processes) as the plain name


def _param(name: str, help: str) -> Record:
    return Record(name, "param", help)


# ---------------------------------------------------------------------------- params (besides every hyperparameter)
TASK = _param("task", "task plugin name")
METHOD = _param("method", "method plugin name")
SEED = _param("seed", "the run's seed (model init, data order, gate noise)")
RECIPE = _param("recipe", "paper, or embedded when the embedded-data recipe or method defaults apply")
BUDGET_STEPS = _param("budget_steps", "--budget steps=N, or none")
STEPS_PER_EPOCH = _param("steps_per_epoch", "optimizer steps per epoch")
DATA_NAME = _param("data_name", "name of the data actually used (a task's dataset hyperparameter names what was asked)")
LEGACY_DATA_NAME = "dataset"
"""Where runs before rankbench 0.2.0 recorded the data's name, over a task's ``dataset`` hyperparameter."""
DATASET_SOURCE = _param("dataset_source", "where the data came from (folder and files, or package)")
DATASET_DIGEST = _param("dataset_digest", "SHA-256 of the data files (or arrays) the splits were made from")
TRAIN_SIZE = _param("train_size", "training examples")
VAL_SIZE_USED = _param("val_size_used", "validation examples")
TEST_SIZE = _param("test_size", "test examples")
INITIAL_RANKS = _param("initial_ranks", "bond sizes per tensorized layer before training (JSON)")
CONTRACTION = _param("contraction", "training contraction per tensorized layer at the batch size (JSON)")
INITIAL_PARAMETERS = _param("initial_parameters", "trainable parameters before training")
DENSE_PARAMETERS = _param("dense_parameters", "trainable parameters of the task's dense reference model")
DEVICE = _param("device", "torch device")
COMPILE = _param("compile", "whether training ran torch.compile'd (on/off, --compile auto resolved for the device)")
THREADS = _param("threads", "torch CPU threads")
RANKBENCH_VERSION = _param("rankbench_version", "rankbench version")
TORCH_VERSION = _param("torch_version", "torch version")
GIT_COMMIT = _param("git_commit", "commit of the rankbench checkout, or unknown")

# ---------------------------------------------------------------------------- metrics per epoch
TRAIN_LOSS = Record("train_loss", "epoch", "mean task loss over the epoch's training batches", direction="minimize")
PENALTY = Record("penalty", "epoch", "mean penalty (λ applied) over the epoch's batches", direction="minimize")
VAL_LOSS = Record("val_loss", "epoch", "validation loss of the eval-mode model", direction="minimize")
VAL_ACCURACY = Record("val_accuracy", "epoch", "validation top-1 accuracy", direction="maximize", unit="%")
COMPRESSION = Record("compression", "epoch",
                     "dense reference parameters / parameters of the pruned model (per epoch; the last is final)",
                     direction="maximize", unit="x")
TOTAL_RANK = Record("total_rank", "epoch", "sum of all eval-mode bond sizes", direction="minimize")
TRAIN_SECONDS_PER_BATCH = Record("train_seconds_per_batch", "epoch", "mean wall time of one training step",
                                 direction="minimize", unit="s")

# ---------------------------------------------------------------------------- metrics once, at the end
TEST_ACCURACY = Record("test_accuracy", "final", "test top-1 accuracy (reported, never optimised)",
                       direction="maximize", unit="%")
TEST_TOP5 = Record("test_top5", "final", "test top-5 accuracy", direction="maximize", unit="%")
TEST_LOSS = Record("test_loss", "final", "test loss", direction="minimize")
TENSORIZED_COMPRESSION = Record(
    "tensorized_compression", "final",
    "dense parameters of the layers the model tensorizes / their parameters after pruning (1 for a dense model): "
    "the paper's compression for the text tasks, whose embedding alone is tensorized", direction="maximize", unit="x")
"""``tensorized_compression``: the compression of the tensorized layers alone, (dense reference parameters −
every parameter outside the tensorized layers) / the tensorized layers' parameters after pruning. Every
run records it; list it in ``Task.metrics`` to show it as a column of ``run`` and ``report`` (the text
tasks do)."""
PARAMETERS = Record("parameters", "final", "trainable parameters of the pruned model", direction="minimize")
INFERENCE_SECONDS = Record("inference_seconds", "final", "wall time of one eval pass over the test set",
                           direction="minimize", unit="s")
WALL_SECONDS = Record("wall_seconds", "final", "wall time of training and measuring (every attempt of a resumed run)",
                      direction="minimize", unit="s")
TRAIN_SECONDS = Record("train_seconds", "final", "wall time of the training loop (every attempt of a resumed run)",
                       direction="minimize", unit="s")

PARAMS: tuple[Record, ...] = tuple(v for v in dict(globals()).values() if isinstance(v, Record) and v.kind == "param")
EPOCH_METRICS: tuple[Record, ...] = tuple(v for v in dict(globals()).values()
                                          if isinstance(v, Record) and v.kind == "epoch")
FINAL_METRICS: tuple[Record, ...] = tuple(v for v in dict(globals()).values()
                                          if isinstance(v, Record) and v.kind == "final")
METRICS: dict[str, Record] = {str(m): m for m in EPOCH_METRICS + FINAL_METRICS}

LEGACY_NAMES: dict[str, Record] = {"compression_ratio": COMPRESSION}
"""Names older stores used → today's name (runs before 0.2 logged the final compression as compression_ratio)."""


def metric(metrics: dict[str, float], name: Record) -> float | None:
    """``name``'s value in a run's metrics, read under a legacy name where an older store used one."""
    if name in metrics:
        return metrics[name]
    for old, new in LEGACY_NAMES.items():
        if new == name and old in metrics:
            return metrics[old]
    return None
