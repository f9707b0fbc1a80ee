"""The training curves: a PNG with loss and validation panels, and one with no data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.engine.report import plot_training_curves
from worker.engine.report.curves import panels


def test_training_curves_png(tmp_path: Path) -> None:
    history: list[dict[str, Any]] = []
    for step in range(10, 210, 10):
        row: dict[str, Any] = {"step": step, "epoch": step // 50, "lr": 1e-3}
        row |= {"loss": 2.0 / step**0.5, "loss/soft": 1.5 / step**0.5, "loss/hard": 0.5 / step}
        if step % 50 == 0:
            row["val/agreement"] = 1 - 1 / step
        history.append(row)
    path = plot_training_curves(tmp_path / "training_curves.png", history)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1024
    marked = plot_training_curves(
        tmp_path / "marked.png", history, best_step=150, teacher_reference={"val/agreement": 1.0}
    )
    # The best-step and teacher lines are drawn: the image differs from the unmarked one.
    assert marked.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and marked.read_bytes() != data

    empty = plot_training_curves(tmp_path / "empty.png", [])
    assert empty.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_validation_divergence_is_drawn_with_the_losses_and_agreement_apart() -> None:
    history = [
        {"step": 10, "loss": 1.0, "loss/soft": 0.9, "lr": 1e-3},
        {"step": 20, "loss": 0.5, "val/agreement": 0.9, "val/kl_divergence": 0.2},
    ]
    assert panels(history) == (["loss", "loss/soft", "val/kl_divergence"], ["val/agreement"])
