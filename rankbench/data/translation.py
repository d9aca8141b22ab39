"""Translation corpora as ``DataSplits`` of padded token ids, with a shared subword vocabulary.

Two datasets: ``synthetic``, a seeded, generated parallel corpus that a small Transformer learns in
a few CPU minutes (so the translation task runs offline), and ``iwslt14-de-en``, the standard IWSLT'14
German-English text files as fairseq's ``examples/translation/prepare-iwslt14.sh`` leaves them.
Both languages share one sentencepiece **BPE** model (as in the standard IWSLT'14 recipe;
pieces = the vocabulary, index = id), trained deterministically on the training split; BLEU is
sacreBLEU's corpus BLEU.

A split is ``Split(x, y)``: ``x`` int64 (N, 2, L) holds the source ids followed by EOS
(``x[:, 0]``) and the target input, BOS followed by the target ids (``x[:, 1]``); ``y`` int64
(N, L) is the target output, the target ids followed by EOS, so ``x[:, 1, 1:]`` is ``y[:, :-1]``
shifted for teacher forcing. Everything is right-padded with PAD to one length L per dataset.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np
import torch

from rankbench.data.splits import DataSplits, Split, dataset_folders, file_digest
from rankbench.errors import RankbenchError

if TYPE_CHECKING:
    import sentencepiece as spm

__all__ = ["BOS", "EOS", "PAD", "TRANSLATION_DATASETS", "UNK", "corpus_bleu", "decode", "load_translation",
           "synthetic_corpus", "train_subword_model"]

PAD, UNK, BOS, EOS = 0, 1, 2, 3
"""Token ids every translation vocabulary reserves, for pieces ``<pad> <unk> <s> </s>``."""

TRANSLATION_DATASETS: Mapping[str, str] = MappingProxyType({
    "synthetic": "generated German-like to English corpus (verb-final source), offline; not IWSLT",
    "iwslt14-de-en": "IWSLT'14 German-English, the text files of fairseq's prepare-iwslt14.sh",
})
"""Dataset name -> one-line description (read-only)."""

SYNTHETIC_NAME = "synthetic-translation"
IWSLT14_NAME = "iwslt14-de-en"
IWSLT14_FILES: tuple[str, ...] = ("train.de", "train.en", "valid.de", "valid.en", "test.de", "test.en")
IWSLT14_FAIRSEQ_FOLDER = "iwslt14.tokenized.de-en"
"""The folder fairseq's prepare-iwslt14.sh writes; accepted inside ``DATA_DIR/iwslt14-de-en/``."""

_SPLITS = ("train", "valid", "test")
_MODEL_TYPE = "bpe"
_BPE_MARKER = "@@"

# ---------------------------------------------------------------- the synthetic language
# English side: a fixed lexicon by part of speech. The source side gets one made-up,
# German-looking word per English word (seed-independent, so every corpus seed speaks the
# same language); the seed only chooses the sentences.

_DETERMINERS = {"the": "der", "a": "ein", "every": "jeder", "this": "dieser", "that": "jener",
                "my": "mein", "your": "dein", "our": "unser"}
_PREPOSITIONS = {"in": "in", "on": "auf", "with": "mit", "under": "unter", "near": "bei", "behind": "hinter",
                 "before": "vor", "after": "nach", "without": "ohne", "for": "fuer"}
_DETERMINER_WORDS = tuple(_DETERMINERS)
_PREPOSITION_WORDS = tuple(_PREPOSITIONS)
_NOUNS = tuple((
    "dog cat bird horse cow fish mouse lion tiger bear wolf fox rabbit snake frog duck goat sheep pig deer "
    "owl eagle whale shark bee ant spider teacher doctor farmer baker painter singer dancer driver writer "
    "student child woman man girl boy king queen soldier sailor pilot nurse judge lawyer friend neighbor "
    "stranger house garden river mountain forest city village street bridge tower castle church school "
    "market station harbor island lake field road door window table chair bed lamp clock mirror book letter "
    "key box bag coat hat shoe ring cup bottle plate knife spoon apple bread cake cheese egg flower tree "
    "stone cloud star moon sun storm song story picture map ship train car boat bicycle wagon ticket coin "
    "gift candle basket blanket"
).split())
_VERBS = tuple((
    "saw found took gave built painted cleaned carried opened closed washed watched followed visited helped "
    "called loved hated wanted needed sold bought lost kept held broke fixed moved pushed pulled counted "
    "cooked ate drank read wrote drew heard touched hid chased caught threw kicked noticed remembered forgot "
    "met left showed"
).split())
_ADJECTIVES = tuple((
    "big small old young red blue green black white yellow happy sad quiet loud fast slow cold warm hot dark "
    "bright heavy light strong weak rich poor clever brave tired hungry angry kind strange famous empty full "
    "clean dirty new broken wooden golden little tall short round soft hard sweet"
).split())
_ADVERBS = tuple(("today yesterday again often quickly slowly quietly carefully happily sadly early late suddenly "
            "gladly rarely").split())

_LEXICON_SEED = 14
_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "w", "z", "sch", "st", "sp", "pf",
           "kr", "gr", "br", "tr", "fl", "kl", "schw", "zw")
_VOWELS = ("a", "e", "i", "o", "u", "ei", "au", "ie", "eu", "aa", "oe", "ue")
_CODAS = ("", "", "n", "r", "l", "m", "s", "t", "ck", "ch", "ng", "nd", "rt", "lz", "mp")
_SUFFIXES = {"noun": ("ung", "heit", "er", "el", "chen", "ling", "e"), "verb": ("te", "ete", "t"),
             "adjective": ("ig", "lich", "isch", "sam", "bar"), "adverb": ("weise", "lings", "ens")}

_MIN_WORDS, _MAX_WORDS = 4, 12
_DEFAULT_SIZES = (4000, 500, 500)


def _lexicon() -> dict[str, str]:
    """English word -> source word: a bijection, the same for every corpus seed.

    Determiners and prepositions are real German; nouns, verbs, adjectives and adverbs get
    made-up stems with a suffix that marks their part of speech (as German endings do), so
    subword pieces carry part of speech and a model can learn the mapping from a few thousand sentences.
    """
    rng = np.random.default_rng(_LEXICON_SEED)
    mapping = {**_DETERMINERS, **_PREPOSITIONS}
    taken = set(mapping.values()) | set(mapping)
    for pos, words in (("noun", _NOUNS), ("verb", _VERBS), ("adjective", _ADJECTIVES), ("adverb", _ADVERBS)):
        for english in words:
            while True:
                stem = "".join(
                    _ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                    + _CODAS[rng.integers(len(_CODAS))]
                    for _ in range(1 + int(rng.random() < 0.3))
                )
                word = stem + _SUFFIXES[pos][rng.integers(len(_SUFFIXES[pos]))]
                if word not in taken:
                    break
            taken.add(word)
            mapping[english] = word
    return mapping


def _pick(rng: np.random.Generator, words: Sequence[str]) -> str:
    """One of ``words``, uniformly (``rng.choice`` converts the list to an array each call: slow)."""
    return words[int(rng.integers(len(words)))]


def _noun_phrase(rng: np.random.Generator) -> list[str]:
    """determiner, 0-2 adjectives (probabilities 0.5/0.35/0.15), noun."""
    draw = rng.random()
    n_adjectives = 0 if draw < 0.5 else 1 if draw < 0.85 else 2
    return [_pick(rng, _DETERMINER_WORDS), *(_pick(rng, _ADJECTIVES) for _ in range(n_adjectives)), _pick(rng, _NOUNS)]


def _english_sentence(rng: np.random.Generator) -> tuple[list[str], int]:
    """Subject, verb, optional object, optional prepositional phrase, optional adverb, of
    ``_MIN_WORDS`` to ``_MAX_WORDS`` words; returns the words and the verb's index."""
    while True:
        words = _noun_phrase(rng)
        verb_at = len(words)
        words.append(_pick(rng, _VERBS))
        if rng.random() < 0.7:
            words += _noun_phrase(rng)
        if rng.random() < 0.4:
            words += [_pick(rng, _PREPOSITION_WORDS), *_noun_phrase(rng)]
        if rng.random() < 0.3:
            words.append(_pick(rng, _ADVERBS))
        if _MIN_WORDS <= len(words) <= _MAX_WORDS:
            return words, verb_at


def synthetic_corpus(seed: int, sizes: tuple[int, int, int] = _DEFAULT_SIZES) -> dict[str, tuple[list[str], list[str]]]:
    """A seeded parallel corpus ``{"train": (sources, targets), "valid": ..., "test": ...}``.

    Why: the translation task needs data that runs offline and that a small Transformer learns
    in a few CPU minutes. The source language translates English word by word (a fixed
    bijection of ~250 words per side, see ``_lexicon``) with one reordering rule: **the verb
    moves to the end of the source sentence** (German verb-final order). Sentences have 4-12
    words. All sentences are distinct, so no test sentence occurs in training; splits take
    consecutive generated sentences. Same seed -> identical corpus.
    """
    if len(sizes) != 3 or any(int(s) != s or s < 0 for s in sizes) or sizes[0] < 1:
        raise RankbenchError(
            f"synthetic corpus sizes {sizes} are invalid: give three non-negative integers (train, valid, test) "
            f"with train >= 1"
        )
    lexicon = _lexicon()
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    sources: list[str] = []
    targets: list[str] = []
    while len(targets) < sum(sizes):
        words, verb_at = _english_sentence(rng)
        target = " ".join(words)
        if target in seen:
            continue
        seen.add(target)
        translated = [lexicon[w] for w in words]
        sources.append(" ".join(translated[:verb_at] + translated[verb_at + 1:] + [translated[verb_at]]))
        targets.append(target)
    corpus = {}
    start = 0
    for split, size in zip(_SPLITS, sizes):
        corpus[split] = (sources[start:start + size], targets[start:start + size])
        start += size
    return corpus


# ---------------------------------------------------------------- subword model


def _train_proto(sentences: Iterable[str], vocab_size: int, what: str) -> bytes:
    """A serialized sentencepiece BPE model, trained deterministically in memory."""
    if int(vocab_size) != vocab_size or vocab_size < 8:
        raise RankbenchError(f"vocab_size must be an integer of at least 8, got {vocab_size}: pass a larger vocab_size")
    model = io.BytesIO()
    try:
        import sentencepiece as spm  # imported on use: rankbench runs where only image tasks are needed without it

        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, model_type=_MODEL_TYPE, vocab_size=int(vocab_size),
            hard_vocab_limit=False,  # vocab_size is a cap: a small corpus yields fewer pieces instead of failing
            pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
            pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
            character_coverage=1.0, num_threads=1, shuffle_input_sentence=False, input_sentence_size=0,
            minloglevel=2,
        )
    except RuntimeError as exc:
        reason = " ".join(str(exc).split()).rpartition("] ")[2]  # drop sentencepiece's "INTERNAL: file(line) [check]"
        raise RankbenchError(
            f"could not train a {vocab_size}-piece sentencepiece model on {what} ({reason}): "
            f"choose a larger vocab_size, or check the training text"
        ) from exc
    return model.getvalue()


def _write_atomically(path: Path, data: bytes) -> None:
    """Write via a temp file + rename, so a crash never leaves a half-written model that looks complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def train_subword_model(sentences: Iterable[str], vocab_size: int, model_prefix: Path) -> Path:
    """Train one shared sentencepiece BPE model and write it to ``model_prefix.model``.

    Why one model for both languages: shared pieces (names, numbers, cognates) get one id, and
    the model has one embedding table. Deterministic (one thread, input in order), ids
    PAD/UNK/BOS/EOS = 0/1/2/3; ``vocab_size`` is a cap (``hard_vocab_limit=False``), so a
    small corpus gets fewer pieces rather than an error. Written via a temp file + rename.
    """
    path = Path(f"{model_prefix}.model")
    proto = _train_proto(sentences, vocab_size, "the given sentences")
    try:
        _write_atomically(path, proto)
    except OSError as exc:
        raise RankbenchError(
            f"could not write {path} ({exc.strerror or exc}): choose a writable folder or set RANKBENCH_DATA_DIR"
        ) from exc
    return path


def _processor(proto: bytes) -> spm.SentencePieceProcessor:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=proto)


# ---------------------------------------------------------------- loading


def load_translation(
    dataset: str,
    data_dir: Path | None,
    download: bool,
    *,
    vocab_size: int,
    max_tokens: int,
    corpus_seed: int = 0,
) -> DataSplits:
    """A translation dataset as padded id tensors (see the module docstring for the layout).

    ``L = min(max_tokens, longest encoded sentence + 1)`` over all splits; longer sentences are
    truncated so that the source and the target output still end in EOS and the target input
    starts with BOS. ``synthetic`` is ``synthetic_corpus(corpus_seed)`` with its subword model
    retrained in memory each call (about 0.1 s, nothing written; ``data_dir``/``download`` unused);
    ``iwslt14-de-en`` reads fairseq's six text files and caches its subword model next to them.

    A split's ``x`` is int64 ``(N, 2, L)``: the source ids followed by EOS (``x[:, 0]``)
    and the target input, BOS followed by the target ids (``x[:, 1]``); ``y`` is int64
    ``(N, L)``, the target ids followed by EOS. Everything is right-padded with PAD (0).

    Args:
        dataset: ``synthetic`` or ``iwslt14-de-en``.
        data_dir: The data folder (``--data-dir``), or ``None``.
        download: ``--download``; IWSLT'14 cannot be downloaded (no stable mirror),
            so with missing files it is an error naming how to prepare them.
        vocab_size: Cap of the shared sentencepiece BPE vocabulary.
        max_tokens: Tokens per sentence, EOS/BOS included (at least 2).
        corpus_seed: Seed of the synthetic corpus.

    Returns:
        The splits, with ``vocabulary`` the subword pieces (index = id).

    Raises:
        RankbenchError: An unknown dataset, a ``max_tokens`` below 2 or not an integer,
            or missing IWSLT'14 files.
    """
    if dataset not in TRANSLATION_DATASETS:
        raise RankbenchError(
            f"unknown translation dataset {dataset!r}: use one of {', '.join(TRANSLATION_DATASETS)}"
        )
    if int(max_tokens) != max_tokens or max_tokens < 2:
        raise RankbenchError(f"max_tokens must be an integer of at least 2, got {max_tokens}: pass a larger max_tokens")
    if dataset == "synthetic":
        return _load_synthetic(corpus_seed, vocab_size, int(max_tokens))
    return _load_iwslt14(data_dir, download, vocab_size, int(max_tokens))


def _load_synthetic(seed: int, vocab_size: int, max_tokens: int) -> DataSplits:
    corpus = synthetic_corpus(seed)
    digest = hashlib.sha256()
    for split in _SPLITS:
        for side in corpus[split]:
            digest.update(("\n".join(side) + "\n\x00").encode())
    train_sources, train_targets = corpus["train"]
    proto = _train_proto([*train_sources, *train_targets], vocab_size, "the synthetic training split")
    processor = _processor(proto)
    splits, vocabulary = _encode_splits(processor, corpus, max_tokens)
    return DataSplits(
        name=SYNTHETIC_NAME,
        source=f"generated by rankbench.data.translation.synthetic_corpus(seed={seed})",
        note=f"generated word-order translation corpus, seed {seed}; not IWSLT: real BLEU needs the IWSLT'14 files; "
             f"{len(vocabulary)} shared sentencepiece {_MODEL_TYPE} pieces",
        train=splits[0], val=splits[1], test=splits[2],
        num_classes=len(vocabulary),
        digest=digest.hexdigest(),
        vocabulary=vocabulary,
        embedded=True,  # the offline default: a task's embedded recipe (a CPU-sized model) applies to it
    )


def _find_iwslt14(data_dir: Path | None, download: bool) -> Path:
    """The folder holding all six files: each of ``dataset_folders(data_dir, "iwslt14-de-en")``, or the
    ``iwslt14.tokenized.de-en/`` fairseq output folder inside it."""
    folders = dataset_folders(data_dir, IWSLT14_NAME)
    candidates = [c for folder in folders for c in (folder, folder / IWSLT14_FAIRSEQ_FOLDER)]
    for candidate in candidates:
        if all((candidate / name).is_file() for name in IWSLT14_FILES):
            return candidate
    partial = next((c for c in candidates if any((c / name).is_file() for name in IWSLT14_FILES)), None)
    fix = (f"run fairseq's examples/translation/prepare-iwslt14.sh and copy the six files it writes "
           f"({', '.join(IWSLT14_FILES)}), or its {IWSLT14_FAIRSEQ_FOLDER}/ folder, to DATA_DIR/iwslt14-de-en/ "
           f"(here {folders[0]}/), passing --data-dir DATA_DIR")
    if download:
        raise RankbenchError(f"IWSLT'14 cannot be downloaded (no stable mirror): {fix}")
    if partial is not None:
        missing = [name for name in IWSLT14_FILES if not (partial / name).is_file()]
        raise RankbenchError(f"dataset 'iwslt14-de-en' is incomplete under {partial}: "
                             f"missing {', '.join(missing)}: {fix}")
    raise RankbenchError(f"dataset 'iwslt14-de-en' not found under {' or '.join(map(str, candidates))}: {fix}")


def _read_lines(path: Path) -> list[str]:
    """One sentence per line, fairseq's BPE continuation markers ("@@ ") removed.

    Splits on "\\n" only: ``str.splitlines`` also breaks at Unicode separators that may occur
    inside a sentence, which would misalign the parallel files."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RankbenchError(f"could not read {path} ({exc.strerror or exc}): check the file's permissions") from exc
    except UnicodeDecodeError as exc:
        raise RankbenchError(
            f"{path} is not UTF-8 text ({exc.reason}): copy the original prepare-iwslt14.sh output"
        ) from exc
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    cleaned = []
    for line in lines:
        line = line.rstrip("\r").replace(f"{_BPE_MARKER} ", "")
        if line.endswith(_BPE_MARKER):
            line = line[: -len(_BPE_MARKER)]
        cleaned.append(line.strip())
    return cleaned


def _iwslt14_processor(folder: Path, data_dir: Path | None, vocab_size: int,
                       corpus: dict[str, tuple[list[str], list[str]]]) -> tuple[spm.SentencePieceProcessor, Path]:
    """The cached shared model, named by vocab size and the train files' digest so a different
    corpus or size retrains; kept next to the files, or in ``DATA_DIR/iwslt14-de-en/`` when that
    folder is read-only (e.g. a system-installed copy)."""
    train_digest = file_digest([folder / "train.de", folder / "train.en"])
    name = f"spm-{_MODEL_TYPE}-v{vocab_size}-{train_digest[:16]}.model"
    homes = list(dict.fromkeys([folder, dataset_folders(data_dir, IWSLT14_NAME)[0]]))
    for home in homes:
        if (home / name).is_file():
            try:
                return _processor((home / name).read_bytes()), home / name
            except (OSError, RuntimeError):
                pass  # unreadable or corrupt: retrain and overwrite below
    proto = _train_proto([*corpus["train"][0], *corpus["train"][1]], vocab_size, "IWSLT'14 train.de + train.en")
    errors = []
    for home in homes:
        try:
            _write_atomically(home / name, proto)
            return _processor(proto), home / name
        except OSError as exc:
            errors.append(f"{home}: {exc.strerror or exc}")
    raise RankbenchError(
        f"could not cache the subword model {name} ({'; '.join(errors)}): make {homes[-1]} writable or set --data-dir"
    )


def _load_iwslt14(data_dir: Path | None, download: bool, vocab_size: int, max_tokens: int) -> DataSplits:
    folder = _find_iwslt14(data_dir, download)
    corpus = {}
    for split in _SPLITS:
        de, en = _read_lines(folder / f"{split}.de"), _read_lines(folder / f"{split}.en")
        if len(de) != len(en):
            raise RankbenchError(
                f"{folder / f'{split}.de'} has {len(de):,} lines but {folder / f'{split}.en'} has {len(en):,}: "
                f"the files must be parallel; copy the original prepare-iwslt14.sh output"
            )
        corpus[split] = (de, en)
    processor, model_path = _iwslt14_processor(folder, data_dir, vocab_size, corpus)
    splits, vocabulary = _encode_splits(processor, corpus, max_tokens)
    return DataSplits(
        name=IWSLT14_NAME,
        source=f"{folder} ({', '.join(IWSLT14_FILES)})",
        note=f"IWSLT'14 German->English, fairseq BPE markers removed; {len(vocabulary)} shared sentencepiece "
             f"{_MODEL_TYPE} pieces ({model_path.name})",
        train=splits[0], val=splits[1], test=splits[2],
        num_classes=len(vocabulary),
        digest=file_digest(folder / name for name in IWSLT14_FILES),
        vocabulary=vocabulary,
    )


def _encode_splits(
    processor: spm.SentencePieceProcessor, corpus: dict[str, tuple[list[str], list[str]]], max_tokens: int
) -> tuple[list[Split], tuple[str, ...]]:
    """Encode every split and pack them to one length L (shared by all splits, so a model
    trained on one sees the same shapes on the others)."""
    encoded = [(processor.encode(corpus[s][0], out_type=int), processor.encode(corpus[s][1], out_type=int))
               for s in _SPLITS]
    longest = max((len(ids) for sides in encoded for side in sides for ids in side), default=0)
    length = min(max_tokens, longest + 1)
    vocabulary = tuple(processor.id_to_piece(i) for i in range(processor.get_piece_size()))
    return [_pack(sources, targets, length) for sources, targets in encoded], vocabulary


def _pack(sources: list[list[int]], targets: list[list[int]], length: int) -> Split:
    """(source + EOS, BOS + target) and target + EOS, truncated to keep EOS/BOS, PAD-padded."""
    n = len(sources)
    x = np.full((n, 2, length), PAD, dtype=np.int64)
    y = np.full((n, length), PAD, dtype=np.int64)
    keep = length - 1
    for i, (source, target) in enumerate(zip(sources, targets)):
        source, target = source[:keep], target[:keep]
        x[i, 0, : len(source)] = source
        x[i, 0, len(source)] = EOS
        x[i, 1, 0] = BOS
        x[i, 1, 1 : len(target) + 1] = target
        y[i, : len(target)] = target
        y[i, len(target)] = EOS
    return Split(x=torch.from_numpy(x), y=torch.from_numpy(y))


# ---------------------------------------------------------------- decoding and scoring


def decode(ids: Sequence[int], vocabulary: Sequence[str]) -> str:
    """Text of a model's output ids: stops at EOS, skips PAD and BOS, joins the pieces and turns
    sentencepiece's word-start mark "▁" into spaces (whitespace runs collapsed, ends stripped),
    so BLEU compares words, not pieces. Needs only the vocabulary, not the model file.

    Args:
        ids: Token ids, e.g. one row of greedy decoding's output.
        vocabulary: The pieces, index = id (``DataSplits.vocabulary``).

    Returns:
        The detokenized text.

    Raises:
        ValueError: An id outside the vocabulary.
    """
    pieces = []
    for raw in ids:
        token = int(raw)
        if token == EOS:
            break
        if token in (PAD, BOS):
            continue
        if not 0 <= token < len(vocabulary):
            raise ValueError(f"token id {token} is outside the vocabulary of {len(vocabulary)} pieces")
        pieces.append(vocabulary[token])
    return " ".join("".join(pieces).replace("\u2581", " ").split())


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacreBLEU corpus BLEU (0-100) of detokenized hypotheses against one reference each,
    with sacreBLEU's default 13a tokenisation, so scores are comparable across papers' tools.

    Args:
        hypotheses: Detokenized translations (``decode``'s output), one per sentence.
        references: One reference per hypothesis.

    Returns:
        BLEU in 0..100.

    Raises:
        ValueError: The two lists differ in length.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references: give one reference each")
    import sacrebleu  # imported here: it pulls in lxml and regex, which loading data does not need

    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)
