"""Run options as one object: ``rankbench run`` and ``rankbench study`` take the same ones, built once
into a ``RunOptions`` that every run and trial carries whole."""

from __future__ import annotations

import pytest

from helpers import assert_one_line_error, make_tiny_mnist
from rankbench.cli import build_parser, main, run_options
from rankbench.plugins.registry import Registry
from rankbench.run.config import RunOptions, make_config

OPTIONS = ("--device", "--threads", "--compile", "--contraction", "--budget", "--data-dir", "--download",
           "--tracking-uri")


def option_strings(command: str) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {s for action in sub._actions for s in action.option_strings}


def test_run_and_study_take_the_same_run_options():
    assert set(OPTIONS) <= option_strings("run")
    assert set(OPTIONS) <= option_strings("study")


def test_the_run_options_are_one_object_built_once_from_the_command_line(tmp_path):
    args = build_parser().parse_args(["study", "x.toml", "--threads", "3", "--contraction", "weight", "--budget",
                                      "steps=40", "--download", "--data-dir", str(tmp_path), "--device", "cpu"])
    assert run_options(args) == RunOptions(device="cpu", threads=3, contraction="weight", budget_steps=40,
                                           data_dir=tmp_path, download=True)


def test_make_config_takes_only_run_options_by_name():
    registry = Registry.discover(entry_point_groups=False)
    config = make_config(registry, "mlp2", "trn", options=RunOptions(threads=2), device="cpu")
    assert config.options == RunOptions(device="cpu", threads=2) and config.threads == 2
    with pytest.raises(TypeError, match="devise"):
        make_config(registry, "mlp2", "trn", devise="cpu")


def test_a_study_runs_its_trials_with_the_run_options_of_its_command_line(tmp_path, monkeypatch, capsys):
    """``--threads``, ``--contraction`` and ``--budget`` reach every trial's run, as with ``rankbench run``."""
    from mlflow.tracking import MlflowClient

    data = make_tiny_mnist(tmp_path / "data")
    (tmp_path / "s.toml").write_text(
        'name = "options"\ntask = "mlp2"\nmethods = ["trn"]\nseeds = [0]\n[fixed]\nval_size = 40\nrank = 2\n'
        '[objectives]\nval_accuracy = "maximize"\n[sampler]\nname = "grid"\n')
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    argv = ["study", str(tmp_path / "s.toml"), "--storage", f"sqlite:///{tmp_path / 'o.db'}", "--tracking-uri", uri,
            "--data-dir", str(data), "--threads", "1", "--contraction", "weight", "--budget", "steps=6"]
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    client = MlflowClient(tracking_uri=uri)
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("mlp2").experiment_id])
              if r.data.tags.get("rankbench.role") != "study"]
    assert run.data.params["threads"] == "1" and run.data.params["budget_steps"] == "6"
    assert run.data.params["epochs"] == "3"  # 6 steps, 2 per epoch (160 examples in batches of 128)
    assert set(__import__("json").loads(run.data.params["contraction"]).values()) == {"weight"}
    assert main([*argv[:-1], "steps=12"]) == 2  # another budget trains other runs: another study
    assert "different study file" in assert_one_line_error(capsys.readouterr().err)
