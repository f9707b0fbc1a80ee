"""sentence-transformers pooling of token states, shared by the teacher and the student."""

from __future__ import annotations

import torch
from torch import Tensor

from worker.engine.errors import TeacherIncompatible

#: sentence-transformers pooling modes, in the order it concatenates them.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``hidden`` (N, L, H) over the positions where ``mask`` (N, L) is set."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def pool(hidden: Tensor, mask: Tensor, modes: list[str]) -> Tensor:
    """sentence-transformers pooling of token states (N, L, H), modes concatenated.

    Follows ``sentence_transformers`` Pooling on padded input, so an embedding
    distilled here equals ``SentenceTransformer.encode`` of the same folder.
    """
    pooled: list[Tensor] = []
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    for mode in modes:
        if mode == "cls":
            # The first attended token, which also handles left padding.
            first = mask.to(torch.int32).argmax(dim=1)
            index = first.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
            pooled.append(torch.gather(hidden, 1, index).squeeze(1))
        elif mode == "max":
            pooled.append(hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            total = (hidden * weights).sum(1)
            count = weights.sum(1).clamp(min=1e-9)
            pooled.append(total / (count if mode == "mean" else count.sqrt()))
        elif mode == "weightedmean":
            positions = torch.arange(
                1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype
            )
            left_pad = mask.to(torch.int32).argmax(dim=1).to(hidden.dtype)
            position_weights = weights * (positions.view(1, -1, 1) - left_pad.view(-1, 1, 1))
            total = (hidden * position_weights).sum(1)
            pooled.append(total / position_weights.sum(1).clamp(min=1e-9))
        elif mode == "lasttoken":
            length = hidden.shape[1]
            values, flipped = mask.to(torch.int32).flip(1).max(1)
            flipped = torch.where(values == 0, length - 1, flipped)
            index = (length - flipped - 1).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
            pooled.append(torch.gather(hidden * weights, 1, index).squeeze(1))
        else:
            raise TeacherIncompatible(f"unknown pooling mode {mode!r}")
    return torch.cat(pooled, dim=-1)
