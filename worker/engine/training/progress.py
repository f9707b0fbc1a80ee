"""Progress reporting: the loss terms and samples seen since the last progress row."""

from __future__ import annotations

import time
from typing import Any

import torch

from worker.engine.errors import NonFiniteLoss


class ProgressWindow:
    """The steps since the last progress row: their loss terms, samples and start time.

    Loss terms stay on the device until a row is due, so a step never waits for
    the device just to report; the same window checks them for non-finite values.
    """

    def __init__(self) -> None:
        self.terms: list[dict[str, torch.Tensor]] = []
        self.samples = 0
        self.started = time.monotonic()

    @property
    def pending(self) -> bool:
        """Whether steps were taken since the last row."""
        return bool(self.terms)

    def add(self, terms: dict[str, torch.Tensor], samples: int) -> None:
        """Record one step's loss terms and batch size."""
        self.terms.append(terms)
        self.samples += samples

    def check_finite(self, step: int) -> None:
        """Raise NonFiniteLoss naming the first step in the window whose loss is not finite.

        ``step`` is the number of steps taken so far, the window's last included.
        """
        for offset, terms in enumerate(self.terms):
            total_loss = torch.stack([term.float() for term in terms.values()]).sum()
            if not torch.isfinite(total_loss).all():
                bad_step = step - len(self.terms) + offset + 1
                detail = ", ".join(f"{name}={value.item():.4g}" for name, value in terms.items())
                raise NonFiniteLoss(
                    f"loss became non-finite at step {bad_step} ({detail}); lower "
                    "training.learning_rate or check the transfer set for extreme values",
                    field="training.learning_rate",
                )

    def close(
        self, *, step: int, total_steps: int, epoch: int, lr: float, batch_size: int
    ) -> dict[str, Any]:
        """The progress row for the window (mean of each term, rate, eta); starts a new window."""
        now = time.monotonic()
        rate = self.samples / max(now - self.started, 1e-9)
        # A term can be missing from some steps (no labelled row in the batch): each term is
        # the mean over the steps that had it.
        names = list(dict.fromkeys(name for terms in self.terms for name in terms))
        mean_terms = {
            f"loss/{name}": float(
                torch.stack([t[name].detach() for t in self.terms if name in t]).mean().item()
            )
            for name in names
        }
        row = {
            "step": step,
            "total_steps": total_steps,
            "epoch": epoch,
            "loss": sum(mean_terms.values()),
            **mean_terms,
            "lr": lr,
            "samples_per_s": rate,
            "eta_s": (total_steps - step) * batch_size / rate if rate > 0 else None,
        }
        self.terms = []
        self.samples = 0
        self.started = now
        return row
