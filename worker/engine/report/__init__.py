"""The human-readable report of a run: the model card, the training curves, the ladder."""

from worker.engine.report.curves import plot_training_curves
from worker.engine.report.ladder import plot_student_ladder
from worker.engine.report.model_card import write_model_card

__all__ = ["plot_student_ladder", "plot_training_curves", "write_model_card"]
