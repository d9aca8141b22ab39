"""Translation with tensorized embeddings: the paper's IWSLT'14 De→En experiment.

A Transformer (``torch.nn.Transformer``'s post-norm layers, as fairseq's
``transformer_iwslt_de_en``) whose source and target embeddings are TR
embeddings over one shared subword vocabulary; the output projection is tied to
the target embedding, so the model has two tables (the paper's 65.13M
parameters at 6/6 layers, d_model 512, FFN 1024, vocabulary 32,768). Only the
embeddings are tensorized: the paper's compression is theirs
(``tensorized_compression``). The test split is translated greedily and scored
with sacreBLEU (``test_bleu``); validation accuracy is teacher-forced token
accuracy. Embeddings keep ``nn.Embedding``'s N(0, 1) initialisation (tensorized
ones match its variance) and the tied projection divides by sqrt(d_model): the
same model as fairseq's N(0, 1/d_model) table scaled up by sqrt(d_model).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankbench.plugin import (
    TENSORIZED_COMPRESSION,
    DataSplits,
    Hyper,
    Recipe,
    Record,
    Task,
    TensorizedEmbedding,
    balanced_modes,
    corpus_bleu,
    decode,
    iterate_batches,
    load_translation,
    padded_modes,
)

PAD, BOS, EOS = 0, 2, 3
TEST_BLEU = Record("test_bleu", "final", "sacreBLEU of greedy translations of the test split",
                   direction="maximize")


def _table(embedding: nn.Module) -> Tensor:
    """The embedding's (rows, dim) table: a tensorized one reconstructs it (gated)."""
    return embedding.weight() if isinstance(embedding, TensorizedEmbedding) else embedding.weight


class Translator(nn.Module):
    """(batch, 2, length) token ids — source, target input — → (batch, length, vocabulary) scores."""

    def __init__(self, source_embedding: nn.Module, target_embedding: nn.Module, vocab_size: int, d_model: int,
                 heads: int, layers: int, ffn: int, dropout: float, max_tokens: int) -> None:
        super().__init__()
        self.source_embedding, self.target_embedding = source_embedding, target_embedding
        self.vocab_size, self.d_model = vocab_size, d_model
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d_model, heads, ffn, dropout, batch_first=True), layers,
            norm=nn.LayerNorm(d_model), enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(d_model, heads, ffn, dropout, batch_first=True), layers,
            norm=nn.LayerNorm(d_model))
        self.dropout = nn.Dropout(dropout)
        position = torch.arange(max_tokens + 1, dtype=torch.float32)[:, None]
        frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        table = torch.zeros(max_tokens + 1, d_model)
        table[:, 0::2] = torch.sin(position * frequency)
        table[:, 1::2] = torch.cos(position * frequency[: d_model // 2])
        self.register_buffer("positions", table, persistent=False)

    def embed(self, embedding: nn.Module, tokens: Tensor) -> Tensor:
        return self.dropout(embedding(tokens) + self.positions[: tokens.shape[1]])

    def encode(self, source: Tensor) -> tuple[Tensor, Tensor]:
        padding = source == PAD
        return self.encoder(self.embed(self.source_embedding, source),
                                        src_key_padding_mask=padding), padding

    def decode_step(self, memory: Tensor, source_padding: Tensor, target_input: Tensor) -> Tensor:
        length = target_input.shape[1]
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=target_input.device), 1)
        hidden = self.decoder(
            self.embed(self.target_embedding, target_input), memory, tgt_mask=causal,
            tgt_key_padding_mask=target_input == PAD, memory_key_padding_mask=source_padding)
        return hidden @ _table(self.target_embedding)[: self.vocab_size].t() / math.sqrt(self.d_model)

    def forward(self, pair: Tensor) -> Tensor:
        memory, padding = self.encode(pair[:, 0])
        return self.decode_step(memory, padding, pair[:, 1])

    @torch.no_grad()
    def translate(self, source: Tensor, max_length: int) -> Tensor:
        """Greedy decoding: (batch, ≤ max_length) target ids, each row ending at its first EOS (then PAD)."""
        memory, padding = self.encode(source)
        out = torch.full((len(source), 1), BOS, dtype=torch.long, device=source.device)
        done = torch.zeros(len(source), dtype=torch.bool, device=source.device)
        for _ in range(max_length):
            scores = self.decode_step(memory, padding, out)[:, -1]
            scores[:, PAD] = -math.inf
            scores[:, BOS] = -math.inf
            token = scores.argmax(1).masked_fill(done, PAD)
            out = torch.cat([out, token[:, None]], dim=1)
            done |= token == EOS
            if bool(done.all()):
                break
        return out[:, 1:]


class Iwslt14Task(Task):
    """IWSLT'14 De→En with TR source and target embeddings (tied output projection).

    d_model splits into three balanced modes ((8, 8, 8) for 512), the shared
    vocabulary into three modes padded up where it does not factor ((32, 32, 32)
    for 32,768). Paper recipe (supplement Table 3): 6/6 layers, FFN 1024, 4
    heads, dropout 0.1, label smoothing 0.1, at most 128 tokens, batch 100
    sentence pairs, Adam (0.9, 0.98) lr 2e-4 eps 1e-8 weight decay 1e-4, cosine
    schedule after 100 linear warm-up steps, 30 epochs, greedy decoding, λ 0.01.

    Default data: a generated word-order translation corpus (``synthetic``), on
    which the embedded recipe scales the model down for a CPU (2/2 layers,
    d_model 64, FFN 256, 10 epochs of batch 32 at lr 1e-3); real BLEU needs the
    IWSLT'14 files (``dataset=iwslt14-de-en``).
    """

    name: ClassVar[str] = "iwslt14"
    description: ClassVar[str] = ("Transformer translation with TR source/target embeddings (IWSLT'14 De-En in "
                                  "the paper; a synthetic corpus offline)")
    metrics: ClassVar[tuple[Record, ...]] = (TEST_BLEU, TENSORIZED_COMPRESSION)
    scheduler_interval: ClassVar[str] = "step"
    hyperparameters: ClassVar[dict[str, Hyper]] = {
        "dataset": Hyper("synthetic", "parallel corpus: synthetic (generated, offline) or iwslt14 (fairseq's "
                         "prepare-iwslt14.sh files in DATA_DIR/iwslt14-de-en/)",
                         choices=("synthetic", "iwslt14-de-en")),
        "corpus_seed": Hyper(0, "seed of the synthetic corpus", minimum=0),
        "vocab_size": Hyper(32768, "shared subword vocabulary (a cap: the run records the trained size)",
                            minimum=8),
        "max_tokens": Hyper(128, "tokens per sentence (longer ones are cut)", minimum=2),
        "d_model": Hyper(512, "model width (split into three embedding modes)", minimum=8),
        "heads": Hyper(4, "attention heads", minimum=1),
        "layers": Hyper(6, "encoder and decoder layers (each)", minimum=1),
        "ffn": Hyper(1024, "feed-forward width", minimum=1),
        "dropout": Hyper(0.1, "dropout", minimum=0.0, maximum=0.99),
        "label_smoothing": Hyper(0.1, "label smoothing of the token loss", minimum=0.0, maximum=0.99),
        "epochs": Hyper(30, "training epochs", minimum=1),
        "batch_size": Hyper(100, "sentence pairs per batch", minimum=1),
        "lr": Hyper(2e-4, "Adam learning rate", minimum=0.0),
        "weight_decay": Hyper(1e-4, "Adam weight decay", minimum=0.0),
        "warmup_steps": Hyper(100, "linear warm-up steps before the cosine schedule", minimum=0),
        "initial_rank": Hyper(32, "initial rank of every embedding bond (trn sets its own)", minimum=1),
        "decomposition": Hyper("tr", "tensor ring (the paper's) or tensor train", choices=("tr", "tt")),
    }
    recipe_keys: ClassVar[tuple[str, ...]] = ("epochs", "batch_size", "lr", "layers", "d_model", "ffn")
    recipes: ClassVar[dict[str, Recipe]] = {"embedded": Recipe(
        task={"layers": 2, "d_model": 64, "ffn": 256, "epochs": 10, "batch_size": 32, "lr": 1e-3, "initial_rank": 16},
        on_embedded_data=True,
        why="the synthetic corpus runs a scaled-down model a 2-core CPU trains in minutes: 2/2 layers, d_model 64, "
            "FFN 256, 10 epochs of batch 32 at lr 1e-3, rank 16; real BLEU needs the IWSLT'14 files and the "
            "paper's recipe")}

    def load_data(self, data_dir: Path | None, download: bool) -> DataSplits:
        p = self.params
        return load_translation(p["dataset"], data_dir, download, vocab_size=p["vocab_size"],
                                max_tokens=p["max_tokens"], corpus_seed=p["corpus_seed"])

    @classmethod
    def adapt_to_data(cls, data: DataSplits, params: Mapping[str, Any]) -> dict[str, Any]:
        """``vocab_size`` set to the trained subword vocabulary's size."""
        resolved = dict(params)
        if data.vocabulary:
            resolved["vocab_size"] = len(data.vocabulary)
        return resolved

    def _model(self, source: nn.Module, target: nn.Module) -> Translator:
        p = self.params
        return Translator(source, target, p["vocab_size"], p["d_model"], p["heads"], p["layers"], p["ffn"],
                          p["dropout"], p["max_tokens"])

    def dense_model(self) -> nn.Module:
        p = self.params
        return self._model(nn.Embedding(p["vocab_size"], p["d_model"]), nn.Embedding(p["vocab_size"], p["d_model"]))

    def tensorized_model(self, rank: int) -> nn.Module:
        p = self.params
        vocab_modes, dim_modes = padded_modes(p["vocab_size"], 3), balanced_modes(p["d_model"], 3)

        def embedding(name: str) -> TensorizedEmbedding:
            return TensorizedEmbedding(math.prod(vocab_modes), p["d_model"], vocab_modes, dim_modes, rank,
                                       p["decomposition"], name=name, layout="matrix")

        return self._model(embedding("source_embedding"), embedding("target_embedding"))

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs.flatten(0, 1), targets.flatten(), ignore_index=PAD,
                               label_smoothing=self.params["label_smoothing"])

    def correct(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, int]:
        """Teacher-forced token hits over the non-padding target tokens."""
        scored = targets != PAD
        k = min(5, outputs.shape[-1])
        top1 = ((outputs.argmax(-1) == targets) & scored).sum()
        top5 = ((outputs.topk(k, dim=-1).indices == targets[..., None]).any(-1) & scored).sum()
        return top1, top5, int(scored.sum())

    def expected_output_shape(self, x: Tensor, data: DataSplits) -> tuple[int, ...]:
        return (len(x), x.shape[-1], self.params["vocab_size"])

    def optimizer(self, param_groups) -> torch.optim.Optimizer:
        return torch.optim.Adam(param_groups, lr=self.params["lr"], betas=(0.9, 0.98), eps=1e-8,
                                weight_decay=self.params["weight_decay"])

    def scheduler(self, optimizer: torch.optim.Optimizer, steps: int):
        """Linear warm-up over ``warmup_steps`` optimizer steps, then cosine to 0 (stepped every step)."""
        warmup = min(self.params["warmup_steps"], max(steps - 1, 0))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def final_metrics(self, model: nn.Module, data: DataSplits, device: torch.device) -> dict[str, float]:
        was_training = model.training
        model.eval()
        hypotheses, references = [], []
        for x, y in iterate_batches(data.test, self.params["batch_size"], shuffle=False):
            translated = model.translate(x[:, 0].to(device), x.shape[-1])
            hypotheses += [decode(row.tolist(), data.vocabulary) for row in translated.cpu()]
            references += [decode(row.tolist(), data.vocabulary) for row in y]
        model.train(was_training)
        return {TEST_BLEU: corpus_bleu(hypotheses, references)}

    def example_input(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Random (source, target input) pairs of up to 16 tokens."""
        length = min(16, self.params["max_tokens"])
        tokens = torch.randint(4, self.params["vocab_size"], (batch_size, 2, length), generator=generator)
        tokens[:, 1, 0] = BOS
        keep = torch.randint(2, length + 1, (batch_size, 2, 1), generator=generator)
        return tokens * (torch.arange(length)[None, None, :] < keep)
