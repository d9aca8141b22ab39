"""The ``rankbench`` command line: listing, input errors, failing runs, plugins.

Every test that may train passes ``--tracking-uri`` into ``tmp_path`` and runs
with ``tmp_path`` as the working directory (MLflow puts the artifacts of an
explicit sqlite store under ``./mlruns``), so nothing is written into the repo.
Training runs use a tiny random IDX dataset (``--data-dir``) unless the test is
about the embedded data, to keep the whole file fast.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_one_line_error, make_tiny_mnist
from rankbench.cli import main
from rankbench.errors import RankbenchError
from rankbench.layers.tensorized import TensorizedLinear
from rankbench.plugins.registry import Registry

PLUGINS = Path(__file__).parent / "plugins_example"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


# ---------------------------------------------------------------------------- helpers


@pytest.fixture
def tiny(tmp_path, uri):
    """(data_dir, tracking_uri): a tiny dataset and a fresh store, working inside tmp_path."""
    return make_tiny_mnist(tmp_path / "data"), uri


TINY_SETTINGS = ["--epochs", "1", "--set", "initial_rank=3", "--set", "val_size=40", "--no-progress"]


def all_runs(uri: str):
    """Every run of every experiment (active or deleted) in a sqlite store; none if the file does not exist."""
    assert uri.startswith("sqlite:///")
    if not Path(uri[len("sqlite:///"):]).exists():
        return []
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(ids, run_view_type=ViewType.ALL) if ids else []


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("rankbench: error:")]


# ---------------------------------------------------------------------------- list


def parse_list(out: str) -> dict[str, dict[str, tuple[str, list[str]]]]:
    """``rankbench list`` output → {"methods"|"tasks": {name: (description, detail lines)}}."""
    sections: dict[str, dict[str, tuple[str, list[str]]]] = {}
    current = entry = None
    for line in out.splitlines():
        if re.fullmatch(r"(methods|tasks):", line):
            current = sections.setdefault(line[:-1], {})
        elif (m := re.fullmatch(r"  (\S+)\s+(.*)", line)) and current is not None:
            entry = m.group(1)
            current[entry] = (m.group(2).strip(), [])
        elif line.startswith("      ") and entry is not None:
            current[entry][1].append(line.strip())
    return sections


def test_list_prints_every_plugin_with_description_and_hyperparameter_defaults(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    listed = parse_list(out)
    assert {"dense", "trn", "ours", "reinforce_l0", "mars"} <= set(listed["methods"])
    assert "lenet5" in listed["tasks"]

    registry = Registry.discover()
    for title, table in (("methods", registry.methods), ("tasks", registry.tasks)):
        assert set(listed[title]) == set(table)
        for name, plugin in table.items():
            description, details = listed[title][name]
            assert description == plugin.description
            for key, hyper in plugin.hyperparameters.items():
                assert any(d.startswith(f"{key} = {hyper.describe()} ") or d == f"{key} = {hyper.describe()}"
                           for d in details), (name, key, details)

    ours = listed["methods"]["ours"][1]
    assert any(re.match(r"lambda = 1\.0\s+weight", d) for d in ours)
    assert any(re.match(r"sigma = 0\.5\s", d) for d in ours)
    assert any(re.match(r"rank = 10\s+rank of every bond", d) for d in listed["methods"]["trn"][1])
    assert listed["methods"]["dense"][1] == []  # no hyperparameters
    lenet = listed["tasks"]["lenet5"][1]
    assert any(re.match(r"epochs = 150\s", d) for d in lenet)
    assert any(re.match(r"initial_rank = 25\s", d) for d in lenet)
    assert any(d.startswith("(recipe embedded, chosen on the embedded default data: lr=0.001;") for d in lenet)
    assert "(defaults on lenet5: lambda=1.0, sigma=0.5)" in ours


def test_console_script_list_subprocess(tmp_path):
    exe = shutil.which("rankbench") or str(Path(sys.executable).parent / "rankbench")
    assert Path(exe).exists(), "the rankbench console script is not installed"
    proc = subprocess.run([exe, "list"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    listed = parse_list(proc.stdout)
    assert {"dense", "trn", "ours", "reinforce_l0", "mars"} <= set(listed["methods"])
    assert "lenet5" in listed["tasks"]
    assert list(tmp_path.iterdir()) == []  # listing writes nothing


# ---------------------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--method", "nope", "--task", "lenet5"], ["unknown method 'nope'", "dense", "ours", "trn"]),
        (["--method", "ours", "--task", "nope"], ["unknown task 'nope'", "lenet5"]),
        (["--method", "ours", "--task", "lenet5", "--set", "foo=1"], ["'foo'", "lambda", "epochs"]),
        (["--method", "ours", "--task", "lenet5", "--set", "lambda=abc"], ["lambda=abc", "float"]),
        (["--method", "ours", "--task", "lenet5", "--set", "lambda=-1"], ["lambda", ">= 0"]),
        (["--method", "ours", "--task", "lenet5", "--set", "sigma=-0.5"], ["sigma", ">="]),
        (["--method", "ours", "--task", "lenet5", "--set", "foo"], ["'foo'", "key=value"]),
        (["--method", "trn", "--task", "lenet5", "--set", "rank=0"], ["rank", ">= 1"]),
        (["--method", "ours", "--task", "lenet5", "--epochs", "0"], ["--epochs"]),
        (["--method", "ours", "--task", "lenet5", "--seeds", "0,-1"], ["--seeds"]),
        (["--method", "ours", "--task", "lenet5", "--data-dir", "/nonexistent/rankbench"],
         ["--data-dir /nonexistent/rankbench", "no such folder"]),
        (["--method", "ours", "--task", "lenet5", "--threads", "0"], ["--threads"]),
        (["--method", "ours", "--task", "lenet5", "--epochs", "2", "--budget", "steps=10"],
         ["--budget sets the epochs"]),
    ],
    ids=["unknown-method", "unknown-task", "unknown-key", "ill-typed", "negative-lambda", "negative-sigma",
         "no-equals", "zero-rank", "zero-epochs", "negative-seed", "missing-data-dir", "zero-threads",
         "budget-and-epochs"],
)
def test_bad_input_exits_2_with_one_line_and_no_run(argv, expected, uri, capsys):
    assert main(["run", *argv, "--tracking-uri", uri, "--no-progress"]) == 2
    line = assert_one_line_error(capsys.readouterr().err)
    for text in expected:
        assert text in line
    assert all_runs(uri) == []


@NO_CUDA
def test_device_cuda_without_cuda_exits_2_and_creates_no_run(uri, capsys):
    rc = main(["run", "--method", "ours", "--task", "lenet5", "--device", "cuda", "--tracking-uri", uri,
               "--no-progress"])
    assert rc == 2
    line = assert_one_line_error(capsys.readouterr().err)
    assert "--device cuda" in line and "cpu" in line
    assert all_runs(uri) == []


@pytest.mark.parametrize("device", [pytest.param("cuda:0", marks=NO_CUDA), "cuda:x"])
def test_device_cuda_index_without_cuda_exits_2(device, uri, capsys):
    rc = main(["run", "--method", "ours", "--task", "lenet5", "--device", device, "--tracking-uri", uri,
               "--no-progress"])
    assert rc == 2
    assert_one_line_error(capsys.readouterr().err)
    assert all_runs(uri) == []


def test_corrupt_data_file_exits_2_naming_the_file_and_creates_no_run(tmp_path, uri, capsys):
    make_tiny_mnist(tmp_path, bad_magic="t10k-labels-idx1-ubyte")
    rc = main(["run", "--method", "ours", "--task", "lenet5", "--data-dir", str(tmp_path), "--tracking-uri", uri,
               *TINY_SETTINGS])
    assert rc == 2
    line = assert_one_line_error(capsys.readouterr().err)
    assert str(tmp_path / "mnist" / "t10k-labels-idx1-ubyte") in line
    assert "magic" in line
    assert all_runs(uri) == []


# ---------------------------------------------------------------------------- bad tensorization


def test_tensorized_linear_with_wrong_modes_raises_naming_the_modes():
    with pytest.raises(RankbenchError) as info:
        TensorizedLinear(10, 6, (2, 4), (2, 3), 2)
    message = str(info.value)
    assert "(2, 4)" in message and "8" in message and "10" in message
    with pytest.raises(RankbenchError, match=r"\(2, 2\).*4.*not 6"):
        TensorizedLinear(8, 6, (2, 4), (2, 2), 2)


def test_plugin_task_with_wrong_tensorization_exits_2_and_leaves_no_finished_or_running_run(tiny, capsys):
    data_dir, uri = tiny
    rc = main(["run", "--method", "ours", "--task", "badtask", "--plugin-dir", str(PLUGINS),
               "--data-dir", str(data_dir), "--tracking-uri", uri, *TINY_SETTINGS])
    assert rc == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = error_lines(err)
    assert "(2, 4)" in line and "10" in line
    statuses = [r.info.status for r in all_runs(uri)]
    assert "FINISHED" not in statuses and "RUNNING" not in statuses, statuses


# ---------------------------------------------------------------------------- failing runs


def test_nan_loss_exits_2_naming_the_fix_and_marks_the_run_failed(tiny, capsys):
    data_dir, uri = tiny
    rc = main(["run", "--method", "nanmethod", "--task", "lenet5", "--plugin-dir", str(PLUGINS),
               "--data-dir", str(data_dir), "--tracking-uri", uri, *TINY_SETTINGS])
    assert rc == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = error_lines(err)
    assert "nan" in line and "lower the learning rate" in line
    (run,) = all_runs(uri)
    assert run.info.status == "FAILED"
    assert "nan" in run.data.tags["failure_reason"]
    assert run.data.tags["method"] == "nanmethod"


def test_failure_of_a_later_seed_keeps_earlier_runs_finished(tiny, capsys):
    data_dir, uri = tiny
    rc = main(["run", "--method", "nanmethod", "--task", "lenet5", "--plugin-dir", str(PLUGINS),
               "--data-dir", str(data_dir), "--tracking-uri", uri, "--seeds", "0,1", "--set", "fail_seed=1",
               *TINY_SETTINGS])
    assert rc == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "lower the learning rate" in line
    by_seed = {r.data.params["seed"]: r for r in all_runs(uri)}
    assert set(by_seed) == {"0", "1"}
    assert by_seed["0"].info.status == "FINISHED"
    assert "failure_reason" not in by_seed["0"].data.tags
    assert "test_accuracy" in by_seed["0"].data.metrics
    assert by_seed["1"].info.status == "FAILED"
    assert "TrainingDiverged" in by_seed["1"].data.tags["failure_reason"]


def test_ctrl_c_exits_130_and_marks_the_run_killed(tiny, tmp_path, capsys):
    data_dir, uri = tiny
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "interrupting.py").write_text(
        "from rankbench.plugins.method import Method\n"
        "class Interrupting(Method):\n"
        "    name = 'interrupting'\n"
        "    def penalty(self, model):\n"
        "        raise KeyboardInterrupt\n"
    )
    rc = main(["run", "--method", "interrupting", "--task", "lenet5", "--plugin-dir", str(plugins),
               "--data-dir", str(data_dir), "--tracking-uri", uri, *TINY_SETTINGS])
    assert rc == 130
    assert "interrupted" in capsys.readouterr().err
    (run,) = all_runs(uri)
    assert run.info.status == "KILLED"
    assert run.data.tags["failure_reason"] == "interrupted"


# ---------------------------------------------------------------------------- plugins


def test_plugin_method_is_listed_and_runnable_by_name(tiny, capsys):
    data_dir, uri = tiny
    assert main(["list", "--plugin-dir", str(PLUGINS)]) == 0
    listed = parse_list(capsys.readouterr().out)
    assert listed["methods"]["constant_gate"][0] == "test plugin: an all-ones selector on every bond"
    assert "nanmethod" in listed["methods"] and "badtask" in listed["tasks"]
    assert {"dense", "trn", "ours", "reinforce_l0", "mars"} <= set(listed["methods"])

    rc = main(["run", "--method", "constant_gate", "--task", "lenet5", "--plugin-dir", str(PLUGINS),
               "--data-dir", str(data_dir), "--tracking-uri", uri, *TINY_SETTINGS])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "constant_gate" in out
    (run,) = all_runs(uri)
    assert run.info.status == "FINISHED"
    assert run.data.tags["method"] == "constant_gate"
    # all-ones multipliers keep every slice: every bond keeps its initial rank 3
    ranks = json.loads(run.data.params["initial_ranks"])
    assert ranks and all(r == 3 for layer in ranks.values() for r in layer)
    assert run.data.metrics["total_rank"] == sum(len(layer) * 3 for layer in ranks.values())


def test_plugin_dir_listing_without_plugins_is_unchanged(tmp_path, capsys):
    (tmp_path / "_private.py").write_text("raise RuntimeError('underscore files are not plugins')\n")
    (tmp_path / "notes.txt").write_text("not python\n")
    assert main(["list"]) == 0
    plain = capsys.readouterr().out
    assert main(["list", "--plugin-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == plain


def test_plugin_file_that_fails_to_import_is_listed_broken_and_running_it_exits_2(tmp_path, capsys):
    (tmp_path / "broken.py").write_text("import rankbench_no_such_module_xyz\n")
    assert main(["list", "--plugin-dir", str(tmp_path)]) == 0
    assert "rankbench_no_such_module_xyz" in capsys.readouterr().out.split("broken (cannot be used")[1]
    assert main(["run", "--method", "broken", "--task", "mlp2", "--plugin-dir", str(tmp_path)]) == 2
    line = assert_one_line_error(capsys.readouterr().err)
    assert "broken.py" in line and "rankbench_no_such_module_xyz" in line


def test_missing_plugin_dir_exits_2(tmp_path, capsys):
    assert main(["list", "--plugin-dir", str(tmp_path / "absent")]) == 2
    line = assert_one_line_error(capsys.readouterr().err)
    assert "absent" in line


PLUGIN_TEMPLATE = (
    "from rankbench.plugins.method import Method\n"
    "class {cls}(Method):\n"
    "    name = {name!r}\n"
    "    description = 'duplicate'\n"
)


def test_a_second_plugin_with_a_taken_name_is_listed_broken_naming_both_files(tmp_path, capsys):
    (tmp_path / "first.py").write_text(PLUGIN_TEMPLATE.format(cls="A", name="twin"))
    (tmp_path / "second.py").write_text(PLUGIN_TEMPLATE.format(cls="B", name="twin"))
    assert main(["list", "--plugin-dir", str(tmp_path)]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  second ")]
    assert "'twin'" in line and "first.py" in line and "second.py" in line and "rename one" in line


def test_a_plugin_named_like_a_built_in_is_broken_and_the_built_in_runs(tmp_path, capsys):
    (tmp_path / "shadow.py").write_text(PLUGIN_TEMPLATE.format(cls="Shadow", name="ours"))
    from rankbench.plugins.registry import Registry

    registry = Registry.discover(plugin_dirs=[tmp_path])
    assert "'ours'" in registry.broken["shadow"] and "shadow.py" in registry.broken["shadow"]
    assert registry.origins["method:ours"] == "built-in rankbench.methods.ours"


def test_a_closed_pipe_is_not_an_error(tmp_path):
    exe = shutil.which("rankbench") or str(Path(sys.executable).parent / "rankbench")
    proc = subprocess.run(f"'{exe}' list | head -1", shell=True, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.stdout == "methods:\n"
    assert proc.stderr == "", proc.stderr
