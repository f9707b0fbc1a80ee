"""Progress rows and the non-finite loss guard."""

from __future__ import annotations

from typing import Any

import pytest

from tests.worker.engine.training.factories import make_data, run, spec
from worker.engine.errors import NonFiniteLoss
from worker.engine.training import Callbacks


def test_progress_reports_every_term_rate_and_eta() -> None:
    rows: list[dict[str, Any]] = []
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


def test_first_non_finite_loss_stops_the_run_naming_the_step() -> None:
    data = make_data()
    data.train["inputs"][100:] = float("nan")
    with pytest.raises(NonFiniteLoss, match=r"non-finite at step \d+") as info:
        run(data, spec(batch_size=160, epochs=3))
    assert "step 1 " in info.value.message
    assert info.value.field == "training.learning_rate"


def test_a_term_some_steps_lack_is_the_mean_of_the_steps_that_have_it() -> None:
    import torch

    from worker.engine.training.progress import ProgressWindow

    window = ProgressWindow()
    # The hard (labels) term is missing where a batch held no labelled row.
    for terms in ({"soft": 1.0, "hard": 4.0}, {"soft": 3.0}, {"soft": 2.0, "hard": 2.0}):
        window.add({name: torch.tensor(value) for name, value in terms.items()}, samples=8)
    row = window.close(step=3, total_steps=9, epoch=1, lr=0.1, batch_size=8)
    assert row["loss/soft"] == pytest.approx(2.0) and row["loss/hard"] == pytest.approx(3.0)
