"""Export a tracked run's trained model, pruned: closed slices removed, gate values
folded into the cores, optionally materialised as plain dense layers."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rankbench import records
from rankbench.errors import RankbenchError
from rankbench.layers.tensorized import count_parameters, learned_ranks, prune_model, tensorized_layers
from rankbench.plugins.method import MethodContext
from rankbench.plugins.registry import Registry
from rankbench.plugins.task import Task


@dataclass
class Exported:
    model: nn.Module
    parameters: int
    ranks: dict[str, list[int]]
    max_abs_difference: float


def rebuild(run_id: str, registry: Registry, tracking_uri: str | None = None) -> tuple[nn.Module, Task]:
    """The run's trained model (selectors included), in eval mode on the CPU."""
    from rankbench.run.config import make_config
    from rankbench.run.prepare import build_model
    from rankbench.run.tracking import Tracker

    tracker = Tracker(tracking_uri, create=False)
    stored = tracker.get_run(run_id)
    params = stored.data.params
    if "task" not in params or "method" not in params:
        raise RankbenchError(f"run {run_id} is not a rankbench training run")
    if stored.info.status != "FINISHED":
        study = stored.data.tags.get("study")
        how = (f"run its study file again (study {study})" if study
               else f"resume it with its own command line and --resume {run_id}")
        raise RankbenchError(f"run {run_id} did not finish (status {stored.info.status}): only finished runs have "
                             f"weights: {how}, then export it")
    task_cls, method_cls = registry.task(params["task"]), registry.method(params["method"])
    legacy = records.DATA_NAME not in params  # before 0.2.0 the data's name was recorded over ``dataset``
    values = {key: params[key] for declared in (task_cls.hyperparameters, method_cls.hyperparameters)
              for key in declared if key in params and not (legacy and key == records.LEGACY_DATA_NAME)}
    config = make_config(registry, params["task"], params["method"], values)
    task, method = task_cls(config.task_params), method_cls(config.method_params)
    context = MethodContext(num_train=int(params.get("train_size", 1)), device=torch.device("cpu"))
    model = build_model(task, method, int(params.get("seed", 0)), context)
    try:
        path = tracker.download_artifact(run_id, "model/state_dict.pt")
    except RankbenchError:
        raise RankbenchError(f"run {run_id} has no model/state_dict.pt artifact (runs before rankbench 0.1 "
                             "did not save weights): train it again") from None
    model.load_state_dict(torch.load(path, map_location="cpu"))
    return model.eval(), task


def materialise(model: nn.Module) -> nn.Module:
    """Replace each tensorized layer by its dense twin (``layer.to_dense()``: the plain
    ``nn.Linear``/``nn.Conv2d``/``nn.Embedding`` of its weight)."""
    for name, layer in list(tensorized_layers(model)):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.to_dense())
    return model


@torch.no_grad()
def export(model: nn.Module, example: torch.Tensor, materialised: bool = False) -> Exported:
    """Prune ``model`` (eval mode) and check the pruned outputs against the gated ones.

    The check runs on float64 copies, so it measures the export, not the forward passes'
    float32 rounding (which alone differed by 1.2e-5 on LeNet-5): what remains is the one
    rounding of the folded cores to float32, about 1e-6. The exported model keeps its dtype."""
    model.eval()
    pruned = prune_model(model).eval()
    parameters = count_parameters(pruned)
    ranks = learned_ranks(pruned)
    if materialised:
        pruned = materialise(pruned)
    exact = example.double() if example.is_floating_point() else example
    difference = float((copy.deepcopy(pruned).double()(exact) - copy.deepcopy(model).double()(exact)).abs().max())
    return Exported(pruned, parameters, ranks, difference)


def export_run(run_id: str, out: Path, registry: Registry, tracking_uri: str | None = None,
               materialised: bool = False) -> Exported:
    """``rankbench export``: rebuild, prune, verify, save ``{"model", "run_id", "parameters", "ranks"}``.
    ``out`` is a file path (its folder is made); a folder or an unwritable path is a one-line error,
    a folder found before any work."""
    out = Path(out)
    if out.is_dir():
        raise RankbenchError(f"--out {out}: is a folder: name the file to write, e.g. --out {out / f'{run_id}.pt'}")
    model, task = rebuild(run_id, registry, tracking_uri)
    example = task.example_input(8, torch.Generator().manual_seed(0))
    result = export(model, example, materialised)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "wb") as fh:
            torch.save({"model": result.model, "run_id": run_id, "parameters": result.parameters,
                        "ranks": result.ranks, "materialised": materialised}, fh)
    except OSError as exc:
        blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker is not None else exc.strerror or type(exc).__name__
        raise RankbenchError(f"--out {out}: cannot write it ({why}): name a file in a folder you can write") from None
    return result
