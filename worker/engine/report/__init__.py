"""The human-readable report of a run: the model card and the training curves."""

from worker.engine.report.curves import plot_training_curves
from worker.engine.report.model_card import write_model_card

__all__ = ["plot_training_curves", "write_model_card"]
