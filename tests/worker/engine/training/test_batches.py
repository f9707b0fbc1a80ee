"""Text batches drawn by length: every row once an epoch, similar lengths in a batch."""

from __future__ import annotations

import torch

from worker.engine.training.batches import TrainingData, length_bucketed


def _lengths(rows: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (rows,), generator=generator)


def test_every_row_is_visited_once_an_epoch() -> None:
    lengths = _lengths(1000)
    generator = torch.Generator().manual_seed(1)
    order = length_bucketed(torch.randperm(1000, generator=generator), lengths, 32, generator)
    assert sorted(order.tolist()) == list(range(1000))


def test_batches_pad_far_less_than_random_ones() -> None:
    rows, batch = 4096, 64
    lengths = _lengths(rows)
    generator = torch.Generator().manual_seed(2)
    shuffled = torch.randperm(rows, generator=generator)
    bucketed = length_bucketed(shuffled, lengths, batch, generator)

    def padded_tokens(order: torch.Tensor) -> int:
        return sum(
            int(lengths[order[start : start + batch]].max()) * len(order[start : start + batch])
            for start in range(0, rows, batch)
        )

    real = int(lengths.sum())
    # Random batches pay for their longest row: about twice the real tokens here.
    assert padded_tokens(shuffled) > 1.6 * real
    assert padded_tokens(bucketed) < 1.15 * real


def test_batches_are_shuffled_and_the_same_seed_gives_the_same_epoch() -> None:
    lengths = _lengths(2048)

    def epoch(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return length_bucketed(torch.randperm(2048, generator=generator), lengths, 16, generator)

    assert torch.equal(epoch(3), epoch(3))
    assert not torch.equal(epoch(3), epoch(4))
    # Not one long sort: batch lengths go up and down through the epoch.
    first_lengths = lengths[epoch(3)].view(-1, 16)[:, 0]
    assert (first_lengths.diff() < 0).any() and (first_lengths.diff() > 0).any()


def test_lengths_come_from_the_attention_mask_and_only_for_text() -> None:
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    text = TrainingData(
        train={"input_ids": mask * 7, "attention_mask": mask},
        train_teacher=None,
        train_labels=None,
        val={},
        val_teacher=torch.zeros(0),
    )
    table = TrainingData(
        train={"inputs": torch.zeros(3, 4)},
        train_teacher=None,
        train_labels=None,
        val={},
        val_teacher=torch.zeros(0),
    )
    lengths = text.lengths()
    assert lengths is not None and lengths.tolist() == [2, 4, 1]
    assert table.lengths() is None
