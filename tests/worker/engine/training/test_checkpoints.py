"""Checkpoints: complete, pruned, and a resumed run ends exactly where an uninterrupted one ends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.worker.engine.training.factories import make_data, run, spec, weights
from worker.engine.errors import Cancelled
from worker.engine.training import Callbacks, TrainResult, latest_checkpoint


def _interrupted_at_13(folder: Path) -> Path:
    """A run with checkpoints every 4 steps, cancelled at step 13; its last checkpoint."""
    steps = {"n": 0}

    def cancel_at_13() -> bool:
        steps["n"] += 1
        return steps["n"] > 13

    with pytest.raises(Cancelled, match="step 13"):
        run(
            make_data(),
            spec(checkpoint_every_steps=4),
            checkpoint_dir=folder,
            callbacks=Callbacks(should_cancel=cancel_at_13),
        )
    checkpoint = latest_checkpoint(folder)
    assert checkpoint is not None and checkpoint.name == "step-000000013"
    return checkpoint


def _resumed(folder: Path) -> tuple[TrainResult, list[tuple[str, dict[str, Any]]]]:
    """The run resumed from ``folder``'s checkpoint, and its events."""
    events: list[tuple[str, dict[str, Any]]] = []
    resumed = run(
        make_data(),
        spec(checkpoint_every_steps=4),
        checkpoint_dir=folder,
        callbacks=Callbacks(on_event=lambda k, d: events.append((k, d))),
    )
    return resumed, events


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path: Path) -> None:
    full = run(make_data(), spec(checkpoint_every_steps=4), checkpoint_dir=tmp_path / "a")
    _interrupted_at_13(tmp_path / "b")
    resumed, events = _resumed(tmp_path / "b")
    assert resumed.resumed_from == 13
    assert ("resumed", {"step": 13, "checkpoint": "step-000000013"}) in events
    assert resumed.steps == full.steps
    for k, v in weights(full.student).items():
        assert torch.equal(v, resumed.student.state_dict()[k]), k
    assert resumed.best_score == full.best_score


def test_a_checkpoint_scored_on_another_basis_has_its_best_weights_scored_again(
    tmp_path: Path,
) -> None:
    full = run(make_data(), spec(checkpoint_every_steps=4), checkpoint_dir=tmp_path / "a")
    checkpoint = _interrupted_at_13(tmp_path / "b")
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["best_score_basis"] == "-val/output_mse" and state["best_score"] <= 0
    # As a checkpoint written before the basis was recorded, when the best step was chosen
    # on a figure of 0 to 1 that no negative error could beat.
    del state["best_score_basis"]
    state["best_score"] = 0.97
    (checkpoint / "state.json").write_text(json.dumps(state))
    resumed, events = _resumed(tmp_path / "b")
    assert ("resumed", {"step": 13, "checkpoint": checkpoint.name,
                        "rescored_best": "-val/output_mse"}) in events  # fmt: skip
    # The best weights were scored again, so the run chose as an uninterrupted one did.
    assert resumed.best_score == pytest.approx(full.best_score)
    assert full.best_step is not None and full.best_step > 13
    assert resumed.best_step == full.best_step
    for k, v in weights(full.student).items():
        assert torch.equal(v, resumed.student.state_dict()[k]), k


def test_resume_off_starts_afresh(tmp_path: Path) -> None:
    run(make_data(), spec(epochs=1, checkpoint_every_steps=2), checkpoint_dir=tmp_path)
    again = run(make_data(), spec(epochs=1), checkpoint_dir=tmp_path, resume=False)
    assert again.resumed_from is None and again.steps == 5


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
