"""``training_curves.png``: the loss terms and the validation fidelity against steps.

The chosen (best) step is marked on both panels, and the teacher's own score on each
validation series is drawn as a reference line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

History = Sequence[Mapping[str, Any]]


def _series(history: History, key: str) -> tuple[list[float], list[float]]:
    """Steps and values of ``key``, skipping rows without either."""
    points = [
        (float(row["step"]), float(row[key]))
        for row in history
        if row.get(key) is not None and row.get("step") is not None
    ]
    return [step for step, _ in points], [value for _, value in points]


#: Validation figures that are losses (lower is better, near zero at the end): drawn with the
#: training loss, on its log scale, not beside agreement on a scale of 0 to 1.
VALIDATION_LOSSES = ("val/kl_divergence",)


def panels(history: History) -> tuple[list[str], list[str]]:
    """The keys of ``history`` drawn in the loss panel and in the validation panel."""
    keys = list(dict.fromkeys(key for row in history for key in row))
    losses = [
        key for key in keys if key == "loss" or key.startswith("loss/") or key in VALIDATION_LOSSES
    ]
    validation = [key for key in keys if key.startswith("val/") and key not in VALIDATION_LOSSES]
    return losses, validation


def _plot_losses(axes: Any, history: History, keys: list[str]) -> None:
    for key in keys:
        steps, values = _series(history, key)
        axes.plot(steps, values, label=key, linewidth=2 if key == "loss" else 1)
    axes.set_title("loss")
    axes.set_xlabel("step")
    # Losses fall over orders of magnitude; a log scale needs every value positive.
    if keys and all(value > 0 for key in keys for value in _series(history, key)[1]):
        axes.set_yscale("log")


def _plot_validation(
    axes: Any, history: History, keys: list[str], teacher_reference: Mapping[str, float]
) -> None:
    for key in keys:
        steps, values = _series(history, key)
        (line,) = axes.plot(steps, values, marker="o", label=key)
        if key in teacher_reference:
            axes.axhline(
                teacher_reference[key],
                color=line.get_color(),
                linestyle=":",
                label=f"teacher ({key})",
            )
    axes.set_title("validation fidelity to the teacher")
    axes.set_xlabel("step")


def _finish(axes: Any, has_series: bool) -> None:
    """A legend and grid on a panel with series; a "no data" note on an empty one."""
    if has_series:
        axes.legend(loc="best", fontsize="small")
        axes.grid(True, alpha=0.3)
    else:
        axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes)


def plot_training_curves(
    path: str | Path,
    history: History,
    best_step: int | None = None,
    teacher_reference: Mapping[str, float] | None = None,
) -> Path:
    """Write ``training_curves.png``: loss terms and validation fidelity against steps.

    Loss series are ``loss``, every ``loss/<term>`` key and the validation losses
    (:data:`VALIDATION_LOSSES`); validation series every other ``val/<name>`` key (e.g.
    ``val/agreement``); rows without a key are skipped.
    ``best_step`` (the step the student was kept from) is marked with a vertical line;
    ``teacher_reference`` maps a validation key to the teacher's value, drawn dotted.
    """
    import matplotlib

    # Workers have no display; Agg renders straight to files.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss_keys, validation_keys = panels(history)

    figure, (loss_axes, validation_axes) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    try:
        _plot_losses(loss_axes, history, loss_keys)
        _plot_validation(validation_axes, history, validation_keys, teacher_reference or {})
        if best_step is not None:
            for axes in (loss_axes, validation_axes):
                axes.axvline(
                    best_step, color="black", linestyle="--", label=f"best step {best_step}"
                )
        _finish(loss_axes, bool(loss_keys))
        _finish(validation_axes, bool(validation_keys))
        figure.tight_layout()
        path = Path(path)
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)
    return path
