"""The step plan and the learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch

from tests.worker.engine.training.factories import spec
from worker.engine.planning import plan_run
from worker.engine.training import lr_factor
from worker.engine.training.schedules import StepPlan


def test_schedules() -> None:
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(99, 100, 0, "constant") == 1.0
    assert math.isclose(lr_factor(0, 100, 0, "cosine"), 1.0)


def test_step_plan_folds_a_single_leftover_row_into_the_last_batch() -> None:
    plan = StepPlan.for_run(
        plan_run(spec(epochs=2, batch_size=32), rows=65, student_parameters=100), None
    )
    assert (plan.steps_per_epoch, plan.total_steps, plan.capped) == (2, 4, False)
    order = torch.arange(65)
    assert len(plan.batch_rows(order, 0)) == 32
    assert len(plan.batch_rows(order, 1)) == 33


def test_step_plan_keeps_a_short_last_batch_and_caps_at_max_steps() -> None:
    plan = StepPlan.for_run(
        plan_run(spec(epochs=3, batch_size=32, max_steps=5), rows=70, student_parameters=100), None
    )
    assert (plan.steps_per_epoch, plan.total_steps, plan.capped) == (3, 5, True)
    assert len(plan.batch_rows(torch.arange(70), 2)) == 6
    assert plan.log_every == 3
