"""The public surface for plugin authors: everything a method or task file needs.

A method subclasses :class:`Method` (and usually a :class:`RankSelector`); a task
subclasses :class:`Task` and builds its models from the tensorized layers. Import
from here, not from the modules behind it: they may move, this list stays.
"""

from rankbench.contract import Check, check_method, check_task
from rankbench.data import DataSplits, Split, default_data_dir, download_file, holdout_split, iterate_batches
from rankbench.data.cifar import load_cifar10, random_crop_flip
from rankbench.data.mnist import (
    DATASETS,
    load_mnist_family,
    load_mnist_family_from,
    mnist_family_hyperparameters,
    pixel_normalisation,
)
from rankbench.data.text import load_text_classification
from rankbench.data.translation import corpus_bleu, decode, load_translation
from rankbench.errors import RankbenchError
from rankbench.hyper import Hyper, Search
from rankbench.layers.batched import CoreBank
from rankbench.layers.modes import balanced_modes, padded_modes
from rankbench.layers.rounding import (
    TruncationMask,
    bond_spectrum,
    current_cores,
    energy_ranks,
    nuclear_subgradient,
    truncate_bond,
    value_ranks,
    write_back,
)
from rankbench.layers.tensorized import (
    Bond,
    RankSelector,
    StaticInput,
    TensorizedConv2d,
    TensorizedEmbedding,
    TensorizedLayer,
    TensorizedLinear,
    TensorRingConv2d,
    TensorRingEmbedding,
    TensorRingLinear,
    TensorTrainConv2d,
    TensorTrainEmbedding,
    TensorTrainLinear,
    bonds,
    selectors,
    tensorized_layers,
)
from rankbench.plugins.defaults import MethodDefaults, Recipe
from rankbench.plugins.method import SELECTOR_HYPERPARAMETERS, Knob, Method, MethodContext, StepLoss, TaskLoss
from rankbench.plugins.registry import Registry
from rankbench.plugins.task import Task
from rankbench.records import TENSORIZED_COMPRESSION, Record
from rankbench.run.metrics import recalibrate_batchnorm

__all__ = [
    # method interface
    "Method", "MethodContext", "StepLoss", "TaskLoss", "SELECTOR_HYPERPARAMETERS", "RankSelector", "StaticInput",
    "Bond", "Knob",
    # declared hyperparameters and defaults
    "Hyper", "Search", "Recipe", "MethodDefaults",
    # task interface and data
    "Task", "Record", "TENSORIZED_COMPRESSION", "DataSplits", "Split", "DATASETS", "default_data_dir",
    "download_file", "holdout_split", "iterate_batches", "load_mnist_family", "load_mnist_family_from",
    "mnist_family_hyperparameters", "pixel_normalisation",
    "load_cifar10", "random_crop_flip", "recalibrate_batchnorm", "load_text_classification", "load_translation",
    "decode", "corpus_bleu",
    # tensorized layers and model helpers
    "TensorizedLayer", "TensorizedLinear", "TensorizedConv2d", "TensorizedEmbedding",
    "TensorRingLinear", "TensorTrainLinear", "TensorRingConv2d", "TensorTrainConv2d",
    "TensorRingEmbedding", "TensorTrainEmbedding", "bonds", "selectors", "tensorized_layers", "CoreBank",
    "balanced_modes", "padded_modes",
    # rounding trained cores (truncating methods)
    "TruncationMask", "current_cores", "bond_spectrum", "energy_ranks", "value_ranks", "truncate_bond",
    "nuclear_subgradient", "write_back",
    "RankbenchError",
    # discovery and the contract suite (for a plugin package's own tests)
    "Registry", "Check", "check_method", "check_task",
]
