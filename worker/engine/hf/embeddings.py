"""Word embeddings that keep the teacher's vocabulary in a fraction of its parameters.

A small encoder's word embeddings dominate its size: all-MiniLM-L6-v2 keeps 11.7M
of its 22.7M parameters in a 30,522 x 384 table. A student that keeps the
teacher's width (so it can start from the teacher's layers) shrinks that table
instead of narrowing the model.

:class:`FactorisedEmbedding` replaces the table by ``tokens`` (vocab x rank) times
``projection`` (rank x hidden), initialised from the teacher's table by an SVD
weighted by how often the transfer set uses each token, plus full-width
``frequent`` rows (a correction to the low-rank row) for the tokens the transfer
set uses most, found through an integer ``slots`` table.

Why not cut the vocabulary to the transfer set's tokens instead: the student
must take the teacher's ``input_ids`` unchanged (the drop-in contract of
:mod:`worker.engine.export.dropin`), and a token the transfer set never used
would have no row at all. Here every id of the teacher's vocabulary keeps a
row (low-rank for rare ones), the lookup exports to ONNX as plain ``Gather``,
``MatMul`` and ``Add`` nodes, and the student's inputs stay the teacher's
names and int64 dtypes. ``slots`` is an integer buffer, not a parameter: it is
saved and exported with the weights, and counted in the student's bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FactorisedEmbedding(nn.Module):
    """Token ids (any shape) -> (..., hidden) from a low-rank table plus frequent-token rows.

    ``frequent_tokens`` rows of full width add to the low-rank row of the tokens
    that ``slots`` maps to them (slot 0 is a zero row for every other token).
    """

    def __init__(self, vocab_size: int, rank: int, hidden: int, frequent_tokens: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.rank = rank
        self.hidden = hidden
        self.frequent_tokens = frequent_tokens
        self.tokens = nn.Embedding(vocab_size, rank)
        self.projection = nn.Linear(rank, hidden, bias=False)
        self.frequent = nn.Embedding(frequent_tokens + 1, hidden)
        self.register_buffer("slots", torch.zeros(vocab_size, dtype=torch.int64))
        with torch.no_grad():
            self.frequent.weight.zero_()

    def forward(self, input_ids: Tensor) -> Tensor:
        """The rows of ``input_ids``: low-rank, corrected for the frequent tokens."""
        low_rank = self.projection(self.tokens(input_ids))
        return low_rank + self.frequent(self.get_buffer("slots")[input_ids])

    @property
    def weight(self) -> Tensor:
        """The whole (vocab, hidden) table it stands for (what transformers' helpers read)."""
        return self.projection(self.tokens.weight) + self.frequent(self.get_buffer("slots"))

    @torch.no_grad()
    def initialise(self, table: Tensor, token_counts: Tensor | None) -> None:
        """Approximate the teacher's ``table`` (vocab, hidden), best where tokens are frequent.

        The projection is the top right singular vectors of the table with each
        row weighted by the square root of its count (+1), so the rank is spent
        on what the transfer set reads; each token's low-rank row is then its own
        row projected on them. The most counted tokens get their residual as a
        ``frequent`` row, which makes them exact.
        """
        table = table.detach().float()
        counts = torch.zeros(table.shape[0], dtype=torch.float32)
        if token_counts is not None:
            # Ids past the vocabulary cannot occur; a short count leaves the rest at zero.
            given = token_counts.detach().float().ravel()[: table.shape[0]]
            counts[: len(given)] = given
        weights = (counts + 1.0).sqrt().unsqueeze(1)
        basis = torch.linalg.svd(table * weights, full_matrices=False)[2][: self.rank]
        self.tokens.weight.copy_(table @ basis.T)
        self.projection.weight.copy_(basis.T)
        table_of_slots = self.get_buffer("slots")
        table_of_slots.zero_()
        self.frequent.weight.zero_()
        if self.frequent_tokens:
            used = int((counts > 0).sum())
            chosen = torch.argsort(counts, descending=True, stable=True)[
                : min(self.frequent_tokens, used)
            ]
            slots = torch.arange(1, len(chosen) + 1, dtype=torch.int64)
            table_of_slots[chosen] = slots
            self.frequent.weight[slots] = table[chosen] - self.tokens.weight[chosen] @ basis


def factorised_parameters(vocab_size: int, hidden: int, rank: int, frequent_tokens: int) -> int:
    """Parameters of a :class:`FactorisedEmbedding` of this shape."""
    return vocab_size * rank + rank * hidden + (frequent_tokens + 1) * hidden


class VocabularyCut(nn.Module):
    """Token ids (any shape) -> (..., hidden) from rows kept for the transfer set's tokens.

    ``student.vocabulary: "transfer"``: the word embeddings keep a row for each of
    the ``kept_tokens`` ids the transfer set uses; every other id of the teacher's
    vocabulary reads one shared row (slot 0). The student still takes the
    teacher's ``input_ids`` unchanged: ``slots`` (an integer buffer, saved and
    exported with the weights) maps each id to its row, a plain ``Gather`` in ONNX.
    A text the transfer set did not cover loses the meaning of its unseen tokens,
    which is why this is an option and :class:`FactorisedEmbedding` the default.
    """

    def __init__(self, vocab_size: int, hidden: int, kept_tokens: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden = hidden
        self.kept_tokens = kept_tokens
        self.rows = nn.Embedding(kept_tokens + 1, hidden)
        self.register_buffer("slots", torch.zeros(vocab_size, dtype=torch.int64))

    def forward(self, input_ids: Tensor) -> Tensor:
        """The kept row of each id, the shared row for the others."""
        return self.rows(self.get_buffer("slots")[input_ids])

    @property
    def weight(self) -> Tensor:
        """The whole (vocab, hidden) table it stands for (what transformers' helpers read)."""
        return self.rows(self.get_buffer("slots"))

    @torch.no_grad()
    def initialise(self, table: Tensor, token_counts: Tensor | None) -> None:
        """The teacher's rows of the ``kept_tokens`` most counted ids; the mean of the rest.

        The shared row starts as the mean of the teacher's rows it stands for.
        """
        table = table.detach().float()
        counts = torch.zeros(table.shape[0], dtype=torch.float32)
        if token_counts is not None:
            given = token_counts.detach().float().ravel()[: table.shape[0]]
            counts[: len(given)] = given
        chosen = torch.argsort(counts, descending=True, stable=True)[: self.kept_tokens]
        slots = self.get_buffer("slots")
        slots.zero_()
        slots[chosen] = torch.arange(1, len(chosen) + 1, dtype=torch.int64)
        others = slots == 0
        self.rows.weight[0] = table[others].mean(0) if bool(others.any()) else 0.0
        self.rows.weight[1 : len(chosen) + 1] = table[chosen]


def cut_parameters(hidden: int, kept_tokens: int) -> int:
    """Parameters of a :class:`VocabularyCut` keeping ``kept_tokens`` rows."""
    return (kept_tokens + 1) * hidden
