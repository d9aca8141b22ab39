"""Translation corpora (rankbench.data.translation): the synthetic language, the padded id
layout, subword round trips, BLEU, and IWSLT'14 from fairseq-style text files. No network."""

from __future__ import annotations

import pytest
import torch

from rankbench.data.translation import (
    _VERBS,
    BOS,
    EOS,
    PAD,
    TRANSLATION_DATASETS,
    UNK,
    _lexicon,
    corpus_bleu,
    decode,
    load_translation,
    synthetic_corpus,
    train_subword_model,
)
from rankbench.errors import RankbenchError

SMALL = (300, 40, 30)


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def synthetic(synthetic_dir):
    """The default synthetic dataset, loaded once (about 0.3 s)."""
    return load_translation("synthetic", synthetic_dir, False, vocab_size=1000, max_tokens=64)


# ---------------------------------------------------------------- the synthetic corpus


def test_synthetic_corpus_is_deterministic_by_seed_and_sized():
    first, again, other = synthetic_corpus(3, SMALL), synthetic_corpus(3, SMALL), synthetic_corpus(4, SMALL)
    assert first == again
    assert first["train"] != other["train"]
    for split, size in zip(("train", "valid", "test"), SMALL):
        sources, targets = first[split]
        assert len(sources) == len(targets) == size
    everything = [t for split in first.values() for t in split[1]]
    assert len(set(everything)) == len(everything), "sentences are split by generated sentence, no repeats"
    assert all(4 <= len(t.split()) <= 12 for t in everything)


def test_synthetic_source_is_the_word_by_word_translation_with_the_verb_last():
    lexicon = _lexicon()
    assert len(set(lexicon.values())) == len(lexicon) >= 200, "a bijection of a few hundred words"
    verbs = set(_VERBS)
    sources, targets = synthetic_corpus(0, SMALL)["train"]
    for source, target in zip(sources[:100], targets[:100]):
        words = target.split()
        verb_at = [i for i, w in enumerate(words) if w in verbs]
        assert len(verb_at) == 1
        verb = words.pop(verb_at[0])
        assert source.split() == [lexicon[w] for w in [*words, verb]]


def test_synthetic_corpus_rejects_bad_sizes():
    with pytest.raises(RankbenchError, match="sizes"):
        synthetic_corpus(0, (0, 10, 10))


# ---------------------------------------------------------------- the padded layout


def test_synthetic_layout(synthetic):
    data = synthetic
    assert data.name == "synthetic-translation" and "not IWSLT" in data.note and "seed=0" in data.source
    assert len(data.digest) == 64
    assert data.vocabulary[:4] == ("<pad>", "<unk>", "<s>", "</s>") and (PAD, UNK, BOS, EOS) == (0, 1, 2, 3)
    assert data.num_classes == len(data.vocabulary) <= 1000
    assert (len(data.train), len(data.val), len(data.test)) == (4000, 500, 500)
    length = data.train.x.shape[-1]
    assert length <= 64
    for split in (data.train, data.val, data.test):
        x, y = split.x, split.y
        assert x.dtype == y.dtype == torch.int64
        assert x.shape == (len(split), 2, length) and y.shape == (len(split), length)
        _check_rows(x, y)
    # L is the longest encoded sentence + 1: some source or target row uses the last position.
    rows = torch.cat([t for s in (data.train, data.val, data.test) for t in (s.x[:, 0], s.y)])
    assert (rows[:, -1] == EOS).any()


def _check_rows(x: torch.Tensor, y: torch.Tensor) -> None:
    """One EOS ending the source and the target output, BOS starting the target input, PAD after."""
    source, target_in = x[:, 0], x[:, 1]
    assert (target_in[:, 0] == BOS).all()
    for seq in (source, y):
        assert ((seq == EOS).sum(1) == 1).all()
        eos_at = (seq == EOS).int().argmax(1)
        positions = torch.arange(seq.shape[1])
        after = positions[None] > eos_at[:, None]
        assert (seq[after] == PAD).all() and (seq[~after] != PAD).all()
        assert not ((seq == BOS) | (seq == PAD))[~after].any()
    # Teacher forcing: the target input shifted by one is the target output, where not padded.
    shifted = target_in[:, 1:]
    real = shifted != PAD
    assert torch.equal(shifted[real], y[:, :-1][real])
    # Same length of target input and output content: BOS + n ids vs n ids + EOS.
    assert torch.equal((target_in != PAD).sum(1), (y != PAD).sum(1))


def test_same_call_gives_identical_tensors(synthetic, synthetic_dir):
    assert not any(synthetic_dir.iterdir()), "the synthetic subword model is trained in memory, nothing cached"
    again = load_translation("synthetic", synthetic_dir, False, vocab_size=1000, max_tokens=64)
    assert again.vocabulary == synthetic.vocabulary and again.digest == synthetic.digest
    for a, b in ((synthetic.train, again.train), (synthetic.test, again.test)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    other = load_translation("synthetic", synthetic_dir, False, vocab_size=1000, max_tokens=64, corpus_seed=1)
    assert other.digest != synthetic.digest


def test_max_tokens_truncates_but_keeps_eos_and_bos(synthetic, tmp_path):
    short = load_translation("synthetic", tmp_path, False, vocab_size=1000, max_tokens=6)
    assert short.train.x.shape[-1] == short.train.y.shape[-1] == 6
    _check_rows(short.train.x, short.train.y)
    # Long sentences are cut: the first 5 ids are the untruncated ones.
    full = synthetic.train
    assert torch.equal(short.train.y[:, :5][short.train.y[:, :5] != EOS], full.y[:, :5][short.train.y[:, :5] != EOS])
    assert (short.train.y[:, -1] == EOS).any()
    with pytest.raises(RankbenchError, match="max_tokens"):
        load_translation("synthetic", tmp_path, False, vocab_size=1000, max_tokens=1)


def test_smaller_vocabulary_is_a_cap_and_too_small_one_errors(tmp_path):
    small = load_translation("synthetic", tmp_path, False, vocab_size=100, max_tokens=64)
    assert small.num_classes == len(small.vocabulary) <= 100
    with pytest.raises(RankbenchError, match="larger vocab_size") as info:
        load_translation("synthetic", tmp_path, False, vocab_size=10, max_tokens=64)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- decoding and BLEU


def test_decode_round_trips_through_the_subword_model(synthetic):
    sources, targets = synthetic_corpus(0)["test"]
    for i in range(0, 500, 25):
        assert decode(synthetic.test.y[i].tolist(), synthetic.vocabulary) == targets[i]
        assert decode(synthetic.test.x[i, 0], synthetic.vocabulary) == sources[i]
        assert decode(synthetic.test.x[i, 1], synthetic.vocabulary) == targets[i]  # BOS and PAD skipped


def test_decode_stops_at_eos_and_normalises_whitespace():
    vocabulary = ("<pad>", "<unk>", "<s>", "</s>", "\u2581the", "\u2581do", "g", "\u2581", "\u2581cat")
    assert decode([BOS, 4, 5, 6, 7, 7, EOS, 8, PAD], vocabulary) == "the dog"
    assert decode([], vocabulary) == ""


def test_train_subword_model_writes_a_deterministic_model(tmp_path):
    sentences = ["der hund sah die katze", "the dog saw the cat"] * 20
    first = train_subword_model(sentences, 40, tmp_path / "a" / "spm")
    second = train_subword_model(iter(sentences), 40, tmp_path / "b")
    assert first == tmp_path / "a" / "spm.model"
    assert first.read_bytes() == second.read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["spm.model"], "no temp file left behind"


def test_corpus_bleu():
    references = ["the dog saw the cat today", "a small bird sang a song", "my friend built a wooden house"]
    assert corpus_bleu(references, references) == pytest.approx(100.0)
    perturbed = ["the dog saw the hat today", "a small bird sang a song", "my friend built a house"]
    assert 0.0 < corpus_bleu(perturbed, references) < 100.0
    with pytest.raises(ValueError):
        corpus_bleu(references[:2], references)


# ---------------------------------------------------------------- IWSLT'14 files

_DE = ["ich sah den hund", "wir haben das haus gebaut", "danke", "das ist ein klein@@ es Beispiel",
       "sie lesen ein buch", "er trinkt wasser"]
_EN = ["i saw the dog", "we built the house", "thank you", "this is a sm@@ all example",
       "they read a book", "he drinks water"]


def _write_iwslt(folder, sizes=(30, 6, 6), skip=()):
    """Six parallel files in fairseq's layout; some lines carry "@@ " continuation markers."""
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for split, size in zip(("train", "valid", "test"), sizes):
        for lang, pool in (("de", _DE), ("en", _EN)):
            lines = [f"{pool[(start + i) % len(pool)]} nummer{start + i}" for i in range(size)]
            if split == "train" and lang == "en":
                lines[0] = "a tra@@ iling mark@@"
            if f"{split}.{lang}" not in skip:
                (folder / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
        start += size


def test_iwslt14_loads_fairseq_files_and_reuses_the_cached_model(tmp_path):
    _write_iwslt(tmp_path / "iwslt14-de-en" / "iwslt14.tokenized.de-en")
    data = load_translation("iwslt14-de-en", tmp_path, False, vocab_size=120, max_tokens=64)
    assert data.name == "iwslt14-de-en" and "iwslt14.tokenized.de-en" in data.source
    assert (len(data.train), len(data.val), len(data.test)) == (30, 6, 6)
    assert data.num_classes == len(data.vocabulary) <= 120
    _check_rows(data.train.x, data.train.y)
    texts = [decode(row, data.vocabulary) for row in data.train.y]
    assert texts[0] == "a trailing mark"
    assert "this is a small example nummer3" in texts
    assert not any("@@" in t for t in texts) and not any("@@" in p for p in data.vocabulary)
    assert decode(data.train.x[3, 0], data.vocabulary) == "das ist ein kleines Beispiel nummer3"

    models = list((tmp_path / "iwslt14-de-en" / "iwslt14.tokenized.de-en").glob("*.model"))
    assert len(models) == 1 and "120" in models[0].name
    stamp = models[0].stat().st_mtime_ns
    inode = models[0].stat().st_ino  # a rewrite (temp file + rename) would bring a new inode
    again = load_translation("iwslt14-de-en", tmp_path, False, vocab_size=120, max_tokens=64)
    assert models[0].stat().st_mtime_ns == stamp and models[0].stat().st_ino == inode
    assert again.vocabulary == data.vocabulary and torch.equal(again.train.x, data.train.x)

    # Another vocabulary size trains (and caches) another model.
    load_translation("iwslt14-de-en", tmp_path, False, vocab_size=90, max_tokens=64)
    assert len(list(models[0].parent.glob("*.model"))) == 2


def test_iwslt14_in_the_dataset_folder_itself(tmp_path):
    _write_iwslt(tmp_path / "iwslt14-de-en")
    data = load_translation("iwslt14-de-en", tmp_path, False, vocab_size=100, max_tokens=8)
    assert data.train.x.shape == (30, 2, 8)
    _check_rows(data.test.x, data.test.y)


def test_iwslt14_missing_files_and_download_give_one_line_errors(tmp_path):
    with pytest.raises(RankbenchError) as info:
        load_translation("iwslt14-de-en", tmp_path, False, vocab_size=100, max_tokens=64)
    message = str(info.value)
    assert "\n" not in message and "prepare-iwslt14.sh" in message and str(tmp_path / "iwslt14-de-en") in message
    assert all(name in message for name in ("train.de", "train.en", "valid.de", "valid.en", "test.de", "test.en"))

    with pytest.raises(RankbenchError, match="cannot be downloaded.*--data-dir") as info:
        load_translation("iwslt14-de-en", tmp_path, True, vocab_size=100, max_tokens=64)
    assert "\n" not in str(info.value)

    _write_iwslt(tmp_path / "iwslt14-de-en", skip=("test.en",))
    with pytest.raises(RankbenchError, match="missing test.en") as info:
        load_translation("iwslt14-de-en", tmp_path, False, vocab_size=100, max_tokens=64)
    assert "\n" not in str(info.value)


def test_iwslt14_rejects_files_that_are_not_parallel(tmp_path):
    _write_iwslt(tmp_path / "iwslt14-de-en")
    (tmp_path / "iwslt14-de-en" / "valid.en").write_text("one line\n", encoding="utf-8")
    with pytest.raises(RankbenchError, match="parallel"):
        load_translation("iwslt14-de-en", tmp_path, False, vocab_size=100, max_tokens=64)


def test_unknown_dataset_lists_the_known_ones(tmp_path):
    assert set(TRANSLATION_DATASETS) == {"synthetic", "iwslt14-de-en"}
    with pytest.raises(RankbenchError, match="synthetic, iwslt14-de-en"):
        load_translation("wmt14", tmp_path, False, vocab_size=100, max_tokens=64)
