"""The loop: determinism, learning, stops (cancellation, time budget, early stopping), precision."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.worker.engine.training.factories import SoftLoss, Student, make_data, run, spec, weights
from worker.engine.errors import Cancelled
from worker.engine.training import Callbacks, train


def test_same_seed_same_student() -> None:
    a = run(make_data(), spec())
    b = run(make_data(), spec())
    for k, v in weights(a.student).items():
        assert torch.equal(v, b.student.state_dict()[k])
    c = run(make_data(), spec(seed=1))
    assert any(not torch.equal(v, c.student.state_dict()[k]) for k, v in weights(a.student).items())


def test_training_reduces_the_loss() -> None:
    result = run(make_data(), spec(epochs=20))
    losses = [row["loss"] for row in result.history]
    assert losses[-1] < 0.25 * losses[0]
    assert result.stop_reason == "completed"
    assert result.steps == 20 * 5


def test_max_steps_ends_the_run_mid_epoch() -> None:
    result = run(make_data(), spec(max_steps=7))
    assert result.stop_reason == "max_steps"
    assert result.steps == 7
    assert result.best_step == 7


def test_cancellation_is_checked_every_step() -> None:
    calls = {"n": 0}

    def cancel() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(Cancelled, match="step 2"):
        run(make_data(), spec(), callbacks=Callbacks(should_cancel=cancel))


def test_time_budget_stops_and_keeps_a_student() -> None:
    result = run(make_data(), spec(epochs=10_000, max_minutes=0.002))
    assert result.stop_reason == "time_budget"
    assert result.steps < 10_000 * 5


def test_early_stopping_on_validation_fidelity() -> None:
    data = make_data()
    # A teacher of pure noise on validation: fidelity cannot keep improving.
    data.val_teacher = torch.randn_like(data.val_teacher) * 100
    result = run(data, spec(epochs=50, early_stopping_patience=2))
    assert result.stop_reason == "early_stopping"
    assert result.steps < 50 * 5


def test_a_tied_validation_score_keeps_the_later_student_and_does_not_reset_patience(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Agreement on a small validation split ties from the first epochs on; the first
    # top score used to be kept, a barely trained student.
    monkeypatch.setattr(
        "worker.engine.training.loop.validation_score",
        lambda *_: {"val/agreement": 1.0, "score": 1.0},
    )
    result = run(make_data(), spec(epochs=4))
    assert result.best_step == result.steps == 4 * 5
    stopped = run(make_data(), spec(epochs=50, early_stopping_patience=2))
    assert stopped.stop_reason == "early_stopping"
    assert stopped.best_step == stopped.steps == 3 * 5


def test_sgd_with_warmup_linear_schedule_and_clipping_trains() -> None:
    rows: list[dict[str, Any]] = []
    result = run(
        make_data(),
        spec(
            optimizer="sgd",
            scheduler="linear",
            warmup_steps=5,
            grad_clip_norm=0.5,
            learning_rate=5e-2,
            epochs=20,
        ),
        callbacks=Callbacks(on_progress=rows.append),
    )
    losses = [row["loss"] for row in result.history]
    assert losses[-1] < 0.5 * losses[0]
    # Warmup: the first logged rate is below the peak; the linear schedule ends near zero.
    assert rows[0]["lr"] <= 5e-2
    assert rows[-1]["lr"] < 5e-2 * 0.05


def test_bf16_autocast_keeps_loss_terms_in_fp32() -> None:
    seen: list[torch.dtype] = []

    class Recording(SoftLoss):
        def forward(
            self,
            student_out: torch.Tensor,
            teacher_out: torch.Tensor,
            labels: torch.Tensor | None = None,
            **kw: Any,
        ) -> dict[str, torch.Tensor]:
            terms = super().forward(student_out, teacher_out, labels, **kw)
            seen.extend(t.dtype for t in terms.values())
            return terms

    torch.manual_seed(0)
    result = train(
        student=Student(),
        loss_fn=Recording(),
        data=make_data(),
        spec=spec(precision="bf16", epochs=10),
        task="regression",
        teacher_output_kind="values",
        device=torch.device("cpu"),
    )
    assert seen and set(seen) == {torch.float32}
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_timing_steps_leaves_the_student_as_it_was() -> None:
    from tests.worker.engine.training.factories import weights
    from worker.engine.training.step import time_steps

    class Normed(Student):
        def __init__(self) -> None:
            super().__init__()
            self.norm = torch.nn.BatchNorm1d(16)

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return super().forward(self.norm(inputs))

    torch.manual_seed(0)
    student = Normed().eval()
    before, rng = weights(student), torch.get_rng_state()
    seconds = time_steps(
        student,
        SoftLoss(),
        make_data(),
        torch.device("cpu"),
        batch_size=32,
        amp_dtype=None,
        clip_norm=1.0,
        seed=0,
    )
    assert 0 < seconds < 5
    assert not student.training
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in student.parameters())
    assert torch.equal(rng, torch.get_rng_state())


@pytest.mark.parametrize(("bridges", "rate"), [([], 1e-3), ([1], 3e-4)])
def test_an_auto_learning_rate_is_the_one_the_optimizer_steps_with(
    bridges: list[int], rate: float
) -> None:
    # A transformers student bridged over the teacher layers it skips says so in its config.
    student = Student()
    student.config = {"bridges": bridges}  # type: ignore[assignment]
    rows: list[dict[str, Any]] = []
    torch.manual_seed(0)
    result = train(
        student=student,
        loss_fn=SoftLoss(),
        data=make_data(),
        spec=spec(learning_rate="auto", scheduler="constant", epochs=2),
        task="regression",
        teacher_output_kind="values",
        device=torch.device("cpu"),
        callbacks=Callbacks(on_progress=rows.append),
    )
    assert result.plan is not None and result.plan.learning_rate == rate
    assert rows and all(row["lr"] == pytest.approx(rate) for row in rows)
