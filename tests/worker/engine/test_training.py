"""The training loop: determinism, exact resume, guards, budgets, callbacks and the output cache."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from worker.engine.errors import Cancelled, NonFiniteLoss
from worker.engine.spec import TrainingSpec
from worker.engine.training import (
    Callbacks,
    TrainingData,
    cache_key,
    cached_teacher_outputs,
    latest_checkpoint,
    lr_factor,
    train,
)


class Student(nn.Module):
    """A small student with dropout, so resuming must restore the RNG too."""

    hint_layer = "body"
    feature_dim = 32

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Linear(32, 4)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(inputs))


class SoftLoss(nn.Module):
    def forward(self, student_out, teacher_out, labels=None, **_: Any) -> dict[str, torch.Tensor]:
        return {"soft": nn.functional.mse_loss(student_out.float(), teacher_out.float())}


def make_data(n: int = 200, seed: int = 0) -> TrainingData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    w = torch.randn(16, 4, generator=g)
    t = x @ w
    return TrainingData(
        train={"inputs": x[:160]},
        train_teacher=t[:160],
        train_labels=None,
        val={"inputs": x[160:]},
        val_teacher=t[160:],
    )


def spec(**kw: Any) -> TrainingSpec:
    base = {"epochs": 6, "batch_size": 32, "learning_rate": 1e-2, "checkpoint_every_minutes": None}
    return TrainingSpec(**{**base, **kw})


def run(data: TrainingData, training: TrainingSpec, **kw: Any):
    torch.manual_seed(training.seed)
    return train(
        student=Student(),
        loss_fn=SoftLoss(),
        data=data,
        spec=training,
        task="regression",
        teacher_output_kind="values",
        device=torch.device("cpu"),
        **kw,
    )


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


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


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path: Path) -> None:
    full = run(make_data(), spec(checkpoint_every_steps=4), checkpoint_dir=tmp_path / "a")
    steps = {"n": 0}

    def cancel_at_13() -> bool:
        steps["n"] += 1
        return steps["n"] > 13

    with pytest.raises(Cancelled, match="step 13"):
        run(
            make_data(),
            spec(checkpoint_every_steps=4),
            checkpoint_dir=tmp_path / "b",
            callbacks=Callbacks(should_cancel=cancel_at_13),
        )
    ckpt = latest_checkpoint(tmp_path / "b")
    assert ckpt is not None and ckpt.name == "step-000000013"
    events: list[tuple[str, dict]] = []
    resumed = run(
        make_data(),
        spec(checkpoint_every_steps=4),
        checkpoint_dir=tmp_path / "b",
        callbacks=Callbacks(on_event=lambda k, d: events.append((k, d))),
    )
    assert resumed.resumed_from == 13
    assert ("resumed", {"step": 13, "checkpoint": "step-000000013"}) in events
    assert resumed.steps == full.steps
    for k, v in weights(full.student).items():
        assert torch.equal(v, resumed.student.state_dict()[k]), k
    assert resumed.best_score == full.best_score


def test_checkpoints_are_complete_and_pruned(tmp_path: Path) -> None:
    run(make_data(), spec(checkpoint_every_steps=3), checkpoint_dir=tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "latest" in names
    assert not [n for n in names if n.endswith(".tmp")]
    assert len([n for n in names if n.startswith("step-")]) == 2
    latest = latest_checkpoint(tmp_path)
    assert latest is not None
    for part in ("student.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"):
        assert (latest / part).exists()


def test_first_non_finite_loss_stops_the_run_naming_the_step() -> None:
    data = make_data()
    data.train["inputs"][100:] = float("nan")
    with pytest.raises(NonFiniteLoss, match=r"non-finite at step \d+") as info:
        run(data, spec(batch_size=160, epochs=3))
    assert "step 1 " in info.value.message
    assert info.value.field == "training.learning_rate"


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


def test_progress_reports_every_term_rate_and_eta() -> None:
    rows: list[dict] = []
    run(make_data(), spec(epochs=2), callbacks=Callbacks(on_progress=rows.append))
    assert rows
    row = rows[0]
    for key in (
        "step",
        "total_steps",
        "epoch",
        "loss",
        "loss/soft",
        "lr",
        "samples_per_s",
        "eta_s",
    ):
        assert key in row
    assert row["total_steps"] == 10 and row["samples_per_s"] > 0
    assert rows[-1]["step"] == 10


def test_early_stopping_on_validation_fidelity() -> None:
    data = make_data()
    # A teacher of pure noise on validation: fidelity cannot keep improving.
    data.val_teacher = torch.randn_like(data.val_teacher) * 100
    result = run(data, spec(epochs=50, early_stopping_patience=2))
    assert result.stop_reason == "early_stopping"
    assert result.steps < 50 * 5


def test_schedules() -> None:
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(99, 100, 0, "constant") == 1.0
    assert math.isclose(lr_factor(0, 100, 0, "cosine"), 1.0)


class CountingTeacher:
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.calls = 0

    def predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.calls += 1
        return batch["inputs"].sum(1, keepdim=True)


def test_teacher_outputs_are_cached_by_teacher_data_and_preprocessing(tmp_path: Path) -> None:
    arrays = {"inputs": np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)}
    teacher = CountingTeacher()
    key = cache_key("t1", "d1", {"max_length": 128})
    first, _ = cached_teacher_outputs(teacher, arrays, key=key, cache_dir=tmp_path, batch_size=16)
    assert teacher.calls == 4
    second, _ = cached_teacher_outputs(teacher, arrays, key=key, cache_dir=tmp_path, batch_size=16)
    assert teacher.calls == 4
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first[:, 0], arrays["inputs"].sum(1), rtol=1e-6)
    assert cache_key("t2", "d1", {"max_length": 128}) != key
    assert cache_key("t1", "d2", {"max_length": 128}) != key
    assert cache_key("t1", "d1", {"max_length": 64}) != key
    assert not list(tmp_path.glob(".*tmp"))


def test_sgd_with_warmup_linear_schedule_and_clipping_trains() -> None:
    rows: list[dict] = []
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
        def forward(self, student_out, teacher_out, labels=None, **kw: Any):
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
