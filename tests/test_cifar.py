"""Tests for rankbench.data.cifar: reading the python batches (safely), splits, normalisation,
layouts, archive extraction, download and the crop-and-flip augmentation."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_one_line_error, make_tiny_cifar10
from rankbench.cli import main
from rankbench.data import cifar
from rankbench.data.cifar import load_cifar10, random_crop_flip
from rankbench.errors import RankbenchError

PER_BATCH, N_TEST = 24, 24
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


def batches_dir(root: Path) -> Path:
    return root / "cifar10" / "cifar-10-batches-py"


def raw_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    batch = pickle.loads(path.read_bytes(), encoding="bytes")
    return batch[b"data"], batch[b"labels"]


def raw_training(root: Path, folder: Path | None = None) -> tuple[np.ndarray, list[int]]:
    folder = folder or batches_dir(root)
    parts = [raw_batch(folder / name) for name in TRAIN_FILES]
    return np.concatenate([p[0] for p in parts]), [y for p in parts for y in p[1]]


def pixels(x: torch.Tensor) -> list[bytes]:
    """Un-normalise a split back to its uint8 rows, one ``bytes`` per image."""
    values = torch.round((x * STD + MEAN) * 255.0)
    assert values.min() >= 0 and values.max() <= 255
    return [row.tobytes() for row in values.to(torch.uint8).reshape(len(x), -1).numpy()]


def rows(split) -> Counter:
    return Counter(zip(pixels(split.x), split.y.tolist()))


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return make_tiny_cifar10(tmp_path)


def rewrite(path: Path, **changes) -> None:
    """Re-pickle a batch file with some entries replaced."""
    batch = pickle.loads(path.read_bytes(), encoding="bytes")
    batch.update({k.encode(): v for k, v in changes.items()})
    path.write_bytes(pickle.dumps(batch, protocol=2))


# ---------------------------------------------------------------------------- loading and splits


def test_shapes_dtypes_and_sizes(tiny: Path) -> None:
    ds = load_cifar10(tiny, val_size=30)
    assert ds.name == "cifar10" and ds.num_classes == 10 and not ds.embedded
    assert ds.source == str(batches_dir(tiny))
    assert (len(ds.train), len(ds.val), len(ds.test)) == (5 * PER_BATCH - 30, 30, N_TEST)
    for split in (ds.train, ds.val, ds.test):
        assert split.x.dtype == torch.float32 and split.x.shape == (len(split), 3, 32, 32)
        assert split.y.dtype == torch.int64 and int(split.y.min()) >= 0 and int(split.y.max()) <= 9


def test_train_and_val_are_disjoint_and_together_the_training_batches(tiny: Path) -> None:
    ds = load_cifar10(tiny, val_size=40)
    data, labels = raw_training(tiny)
    everything = Counter(zip([r.tobytes() for r in data], labels))
    assert len(everything) == 5 * PER_BATCH  # random images: all distinct
    train, val = rows(ds.train), rows(ds.val)
    assert not set(train) & set(val)
    assert train + val == everything
    test_data, test_labels = raw_batch(batches_dir(tiny) / "test_batch")
    assert pixels(ds.test.x) == [r.tobytes() for r in test_data]  # file order
    assert ds.test.y.tolist() == test_labels


def test_split_seed(tiny: Path) -> None:
    a = load_cifar10(tiny, split_seed=3, val_size=20)
    b = load_cifar10(tiny, split_seed=3, val_size=20)
    c = load_cifar10(tiny, split_seed=4, val_size=20)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.val.x, b.val.x) and torch.equal(a.val.y, b.val.y)
    assert set(rows(a.val)) != set(rows(c.val))
    assert rows(a.train) + rows(a.val) == rows(c.train) + rows(c.val)
    assert torch.equal(a.test.x, c.test.x)


def test_per_channel_normalisation(tiny: Path) -> None:
    ds = load_cifar10(tiny, val_size=1)
    data, _ = raw_batch(batches_dir(tiny) / "test_batch")
    image = data[5].reshape(3, 32, 32)  # the batch layout: 1024 red, 1024 green, 1024 blue, row-major
    for c, (mean, std) in enumerate([(0.4914, 0.2470), (0.4822, 0.2435), (0.4465, 0.2616)]):
        for y, x in ((0, 0), (7, 19), (31, 31)):
            expected = (image[c, y, x] / 255.0 - mean) / std
            assert float(ds.test.x[5, c, y, x]) == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_torchvision_layout(tiny: Path) -> None:
    shutil.move(str(batches_dir(tiny)), str(tiny / "cifar-10-batches-py"))
    shutil.rmtree(tiny / "cifar10")
    ds = load_cifar10(tiny, val_size=10)
    assert ds.source == str(tiny / "cifar-10-batches-py")
    assert len(ds.train) == 5 * PER_BATCH - 10
    assert not (tiny / "cifar10").exists()


def make_archive(source: Path, archive: Path, extra: dict[str, bytes] | None = None) -> bytes:
    """``cifar-10-python.tar.gz`` holding ``cifar-10-batches-py/<files of source>`` (plus ``extra``)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(source.iterdir()):
            tar.add(path, arcname=f"cifar-10-batches-py/{path.name}")
        for name, payload in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return archive.read_bytes()


@pytest.mark.parametrize("where", ["cifar10", "root"])
def test_archive_is_unpacked(tmp_path: Path, where: str) -> None:
    source = batches_dir(make_tiny_cifar10(tmp_path / "made"))
    root = tmp_path / "data"
    archive = root / "cifar10" / cifar.ARCHIVE if where == "cifar10" else root / cifar.ARCHIVE
    make_archive(source, archive, extra={"readme.html": b"<p>not a batch</p>"})
    ds = load_cifar10(root, val_size=10)
    assert ds.source == str(batches_dir(root))
    assert sorted(p.name for p in batches_dir(root).iterdir()) == sorted([*TRAIN_FILES, "test_batch"])
    assert not (root / "cifar10" / "readme.html").exists()  # only the batches are unpacked
    assert rows(ds.train) + rows(ds.val) == rows(load_cifar10(tmp_path / "made", val_size=10).train) + rows(
        load_cifar10(tmp_path / "made", val_size=10).val)
    assert archive.is_file()  # kept
    assert len(load_cifar10(root, val_size=10).test) == N_TEST  # a second load reads the unpacked folder


def test_archive_member_escaping_the_folder_is_refused(tmp_path: Path) -> None:
    source = batches_dir(make_tiny_cifar10(tmp_path / "made"))
    root = tmp_path / "data"
    make_archive(source, root / "cifar10" / cifar.ARCHIVE, extra={"cifar-10-batches-py/../../escaped": b"x"})
    with pytest.raises(RankbenchError, match="could not unpack"):
        load_cifar10(root, val_size=10)
    assert not (tmp_path / "escaped").exists() and not (root / "escaped").exists()


def test_broken_archive_is_an_error(tmp_path: Path) -> None:
    archive = tmp_path / "cifar10" / cifar.ARCHIVE
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"not a gzip file")
    with pytest.raises(RankbenchError, match="could not unpack") as info:
        load_cifar10(tmp_path)
    assert str(archive) in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------- errors


def test_no_data_names_download(tmp_path: Path) -> None:
    with pytest.raises(RankbenchError, match="--download") as info:
        load_cifar10(tmp_path)
    assert str(tmp_path / "cifar10") in str(info.value)
    assert not (tmp_path / "cifar10").exists()


def test_missing_batch_file_is_named(tiny: Path) -> None:
    (batches_dir(tiny) / "data_batch_3").unlink()
    with pytest.raises(RankbenchError, match="missing data_batch_3") as info:
        load_cifar10(tiny)
    assert "data_batch_1" not in str(info.value) and "test_batch" not in str(info.value)


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def corrupt_cases(tmp_path: Path) -> dict[str, bytes | None]:
    marker = tmp_path / "MARKER"
    good = pickle.loads((batches_dir(tmp_path) / "data_batch_2").read_bytes(), encoding="bytes")

    def with_(**changes) -> bytes:
        return pickle.dumps({**good, **{k.encode(): v for k, v in changes.items()}}, protocol=2)

    return {
        "truncated": (batches_dir(tmp_path) / "data_batch_2").read_bytes()[:500],
        "garbage": b"this is not a pickle at all",
        "forbidden-global": pickle.dumps({b"data": Evil(marker), b"labels": [0]}, protocol=2),
        "forbidden-global-top-level": pickle.dumps(Evil(marker), protocol=2),
        "not-a-dict": pickle.dumps([1, 2, 3], protocol=2),
        "no-labels": pickle.dumps({b"data": good[b"data"]}, protocol=2),
        "wrong-shape": with_(data=good[b"data"][:, :3000]),
        "wrong-dtype": with_(data=good[b"data"].astype(np.float32)),
        "label-10": with_(labels=[10] * PER_BATCH),
        "label-negative": with_(labels=[-1] + good[b"labels"][1:]),
        "count-mismatch": with_(labels=good[b"labels"][:-1]),
    }


CASES = ["truncated", "garbage", "forbidden-global", "forbidden-global-top-level", "not-a-dict", "no-labels",
         "wrong-shape", "wrong-dtype", "label-10", "label-negative", "count-mismatch"]


@pytest.mark.parametrize("case", CASES)
def test_corrupt_batch_is_a_clear_error_and_runs_no_code(tmp_path: Path, case: str) -> None:
    make_tiny_cifar10(tmp_path)
    path = batches_dir(tmp_path) / "data_batch_2"
    path.write_bytes(corrupt_cases(tmp_path)[case])
    with pytest.raises(RankbenchError, match="corrupt") as info:
        load_cifar10(tmp_path, val_size=10)
    message = str(info.value)
    assert str(path) in message and "--download" in message and "\n" not in message
    if case.startswith("forbidden"):
        assert "forbidden global" in message
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("change", [{"labels": [b"cat"] * PER_BATCH}, {"labels": None}, {"data": [[1, 2], [3]]},
                                    {"labels": [1.7] * PER_BATCH}],
                         ids=["bytes-labels", "none-labels", "ragged-data", "float-labels"])
def test_malformed_contents_are_corrupt_errors(tiny: Path, change: dict) -> None:
    rewrite(batches_dir(tiny) / "data_batch_4", **change)
    with pytest.raises(RankbenchError, match="corrupt"):
        load_cifar10(tiny, val_size=10)


def test_val_size_too_large(tiny: Path) -> None:
    with pytest.raises(RankbenchError, match=f"val_size {5 * PER_BATCH} does not fit"):
        load_cifar10(tiny, val_size=5 * PER_BATCH)
    assert len(load_cifar10(tiny, val_size=5 * PER_BATCH - 1).train) == 1


# ---------------------------------------------------------------------------- CLI errors


def cli_run(data_dir: Path, uri: str, *extra: str) -> int:
    return main(["run", "--task", "resnet32", "--method", "dense", "--data-dir", str(data_dir), "--tracking-uri", uri,
                 "--epochs", "1", "--no-progress", "--device", "cpu", *extra])


def no_runs(uri: str) -> bool:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return not ids or not client.search_runs(ids, run_view_type=ViewType.ALL)


@pytest.mark.parametrize("case", ["absent", "missing-file", "truncated", "forbidden-global", "label-10", "val-size"])
def test_cli_data_errors_exit_2_with_one_line(tmp_path: Path, uri: str, capsys, case: str) -> None:
    root = tmp_path / "data"
    extra: tuple[str, ...] = ()
    if case != "absent":
        make_tiny_cifar10(root)
    root.mkdir(exist_ok=True)  # a data folder without CIFAR-10 (a missing folder is its own error)
    folder = batches_dir(root)
    if case == "missing-file":
        (folder / "test_batch").unlink()
    elif case in ("truncated", "forbidden-global", "label-10"):
        payload = corrupt_cases(root)[case]
        (folder / "data_batch_5").write_bytes(payload)
    elif case == "val-size":
        extra = ("--set", "val_size=500")
    assert cli_run(root, uri, *extra) == 2
    line = assert_one_line_error(capsys.readouterr().err)
    expected = {
        "absent": ["CIFAR-10 not found", "--download"],
        "missing-file": ["missing test_batch"],
        "truncated": ["corrupt", str(folder / "data_batch_5")],
        "forbidden-global": ["corrupt", "forbidden global"],
        "label-10": ["corrupt", "label outside 0..9"],
        "val-size": ["val_size 500", "120"],
    }[case]
    for text in expected:
        assert text in line, line
    assert not (root / "MARKER").exists()
    assert no_runs(uri)


# ---------------------------------------------------------------------------- download


class FakeUrlopen:
    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.calls: list[tuple[str, float | None]] = []

    def __call__(self, url: str, timeout: float | None = None) -> io.BytesIO:
        self.calls.append((url, timeout))
        return io.BytesIO(self.payload)


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[FakeUrlopen, bytes]:
    payload = make_archive(batches_dir(make_tiny_cifar10(tmp_path / "made")), tmp_path / "made" / "archive.tar.gz")
    fake = FakeUrlopen(payload)
    monkeypatch.setattr(urllib.request, "urlopen", fake)
    return fake, payload


def test_download_with_a_wrong_md5_leaves_nothing(tmp_path: Path, served) -> None:
    fake, payload = served
    root = tmp_path / "data"
    with pytest.raises(RankbenchError, match="MD5") as info:
        load_cifar10(root, download=True)
    assert hashlib.md5(payload).hexdigest() in str(info.value) and cifar.ARCHIVE_MD5 in str(info.value)
    assert fake.calls == [(cifar.ARCHIVE_URL, 60)]
    assert list((root / "cifar10").iterdir()) == []  # no archive, no partial file


def test_download_with_the_right_md5_loads(tmp_path: Path, served, monkeypatch: pytest.MonkeyPatch) -> None:
    fake, payload = served
    monkeypatch.setattr(cifar, "ARCHIVE_MD5", hashlib.md5(payload).hexdigest())
    root = tmp_path / "data"
    ds = load_cifar10(root, val_size=20, download=True)
    assert fake.calls == [(cifar.ARCHIVE_URL, 60)]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (5 * PER_BATCH - 20, 20, N_TEST)
    assert (root / "cifar10" / cifar.ARCHIVE).read_bytes() == payload
    assert sorted(p.name for p in (root / "cifar10").iterdir()) == sorted([cifar.ARCHIVE, "cifar-10-batches-py"])
    load_cifar10(root, val_size=20, download=True)  # already there: no second download
    assert len(fake.calls) == 1


def test_download_failure_is_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, timeout: float | None = None) -> None:
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(RankbenchError, match=r"could not download .*no route to host.*by hand"):
        load_cifar10(tmp_path, download=True)
    assert list((tmp_path / "cifar10").iterdir()) == []


def test_download_not_used_when_the_batches_are_there(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("should not download")

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    assert len(load_cifar10(tiny, val_size=4, download=True).test) == N_TEST


# ---------------------------------------------------------------------------- augmentation


def find_window(image: torch.Tensor, padded: torch.Tensor) -> list[tuple[int, int, bool]]:
    """Every (dy, dx, flipped) whose window of ``padded`` equals ``image``."""
    h, w = image.shape[-2:]
    found = []
    for dy in range(padded.shape[-2] - h + 1):
        for dx in range(padded.shape[-1] - w + 1):
            window = padded[:, dy:dy + h, dx:dx + w]
            for flipped in (False, True):
                if torch.equal(window.flip(-1) if flipped else window, image):
                    found.append((dy, dx, flipped))
    return found


def test_random_crop_flip_is_a_window_of_the_padded_input() -> None:
    x = torch.rand(24, 3, 32, 32, generator=torch.Generator().manual_seed(0)) + 0.5  # no zeros inside
    out = random_crop_flip(x, 4, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    draws = [find_window(o, p) for o, p in zip(out, padded)]
    assert all(len(d) == 1 for d in draws), draws
    offsets = {d[0][:2] for d in draws}
    assert len(offsets) > 5 and all(0 <= dy <= 8 and 0 <= dx <= 8 for dy, dx in offsets)
    assert {d[0][2] for d in draws} == {False, True}


def test_random_crop_flip_follows_its_generator() -> None:
    x = torch.rand(16, 3, 32, 32)
    a = random_crop_flip(x, 4, torch.Generator().manual_seed(7))
    b = random_crop_flip(x, 4, torch.Generator().manual_seed(7))
    c = random_crop_flip(x, 4, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    state = torch.get_rng_state()
    random_crop_flip(x, 4, torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)


def test_random_crop_flip_without_padding_only_flips() -> None:
    x = torch.rand(200, 3, 32, 32)
    out = random_crop_flip(x, 0, torch.Generator().manual_seed(2))
    same = [torch.equal(o, i) for o, i in zip(out, x)]
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x)]
    assert all(s != f for s, f in zip(same, flipped))  # exactly one of the two, per image
    assert 0 < sum(flipped) < 200
    assert 60 < sum(flipped) < 140  # probability ½
