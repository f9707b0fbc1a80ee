"""The teacher-output cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from worker.engine.training import cache_key, cached_teacher_outputs


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


def test_text_runs_in_order_of_length_and_comes_back_in_the_rows_order() -> None:
    from worker.engine.training import compute_teacher_outputs

    class Widths:
        device = torch.device("cpu")

        def __init__(self) -> None:
            self.batches: list[int] = []

        def predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            mask = batch["attention_mask"]
            self.batches.append(int(mask.sum(1).max()))
            return batch["input_ids"][:, :1].float()

    lengths = np.array([5, 1, 4, 2, 5, 1, 3, 2])
    mask = (np.arange(6)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.arange(8)[:, None].repeat(6, axis=1).astype(np.int64)
    teacher = Widths()
    outputs, _ = compute_teacher_outputs(
        teacher, {"input_ids": ids, "attention_mask": mask}, batch_size=2
    )
    np.testing.assert_array_equal(outputs[:, 0], np.arange(8))
    assert teacher.batches == [1, 2, 4, 5]
