"""Rows of tokens are scored and timed without the padding no row attends to."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from worker.engine.data.text import token_lengths
from worker.engine.evaluation import OnnxFile, paired_latency_ms

WIDTH, VOCABULARY, PADDED = 4, 50, 16


def _masked_mean(path: Path, positions: int | str) -> OnnxFile:
    """Mean of the attended tokens' embeddings, then the number of positions it was fed."""
    table = np.random.default_rng(0).standard_normal((VOCABULARY, WIDTH)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["embedded"]),
        helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask", "last"], ["weights"]),
        helper.make_node("Mul", ["embedded", "weights"], ["kept"]),
        helper.make_node("ReduceSum", ["kept", "second"], ["total"], keepdims=0),
        helper.make_node("ReduceSum", ["mask", "second"], ["count"], keepdims=1),
        helper.make_node("Div", ["total", "count"], ["mean"]),
        helper.make_node("Shape", ["input_ids"], ["shape"]),
        helper.make_node("Slice", ["shape", "second", "third"], ["fed"]),
        helper.make_node("Cast", ["fed"], ["fed_float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["count", "zero"], ["zeros"]),
        helper.make_node("Add", ["zeros", "fed_float"], ["fed_column"]),
        helper.make_node("Concat", ["mean", "fed_column"], ["output"], axis=1),
    ]
    constants = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array(np.array([-1], np.int64), "last"),
        numpy_helper.from_array(np.array([1], np.int64), "second"),
        numpy_helper.from_array(np.array([2], np.int64), "third"),
        numpy_helper.from_array(np.zeros((1,), np.float32), "zero"),
    ]
    inputs = [
        helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", positions])
        for name in ("input_ids", "attention_mask")
    ]
    output = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", WIDTH + 1])
    graph = helper.make_graph(nodes, "masked_mean", inputs, [output], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return OnnxFile(path)


def _rows(lengths: list[int]) -> dict[str, np.ndarray]:
    """Right-padded rows of tokens of ``lengths``, to :data:`PADDED` positions."""
    rng = np.random.default_rng(1)
    ids = np.zeros((len(lengths), PADDED), np.int64)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(1, VOCABULARY, length)
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_rows_run_by_length_without_padding_and_come_back_in_their_order(tmp_path: Path) -> None:
    lengths = [12, 2, 7, 3, 16, 2, 5, 9, 1, 4]
    arrays = _rows(lengths)
    free = _masked_mean(tmp_path / "free.onnx", "positions")
    fixed = _masked_mean(tmp_path / "fixed.onnx", PADDED)
    assert free.free_positions and not fixed.free_positions
    found = token_lengths(arrays)
    assert found is not None and list(found) == lengths

    trimmed = free.predict(arrays, batch_size=3)
    padded = fixed.predict(arrays, batch_size=3)
    # The same outputs, row for row: the padding was masked out of the mean anyway.
    np.testing.assert_allclose(trimmed[:, :WIDTH], padded[:, :WIDTH], atol=1e-6)
    # The fixed file was fed every position; the free one only its batch's longest row,
    # batches of like length: the three shortest rows (1, 2, 2) in a batch of 2 positions.
    assert set(padded[:, WIDTH]) == {PADDED}
    fed = dict(zip(lengths, trimmed[:, WIDTH], strict=False))
    assert fed[1] == fed[2] == 2 and fed[16] == 16
    assert all(length <= fed[length] < PADDED or length == PADDED for length in lengths)


def test_a_row_is_timed_as_long_as_it_is(tmp_path: Path) -> None:
    free = _masked_mean(tmp_path / "free.onnx", "positions")
    fixed = _masked_mean(tmp_path / "fixed.onnx", PADDED)
    arrays = _rows([3, 16])
    seen: list[int] = []
    original = free.session.run

    def recording(outputs: object, feeds: dict[str, np.ndarray]) -> object:
        seen.append(feeds["input_ids"].shape[1])
        return original(outputs, feeds)

    free.session.run = recording
    paired_latency_ms([free], arrays, budget_s=0.05)
    free.throughput(arrays, min_seconds=0.01)
    # Batch 1 on the first row (3 tokens), throughput on both rows (the longest, 16).
    assert seen and set(seen) == {3, 16} and seen[0] == 3
    # Beside a file that takes only padded rows, the row is fed padded to both.
    seen.clear()
    paired_latency_ms([free, fixed], arrays, budget_s=0.05)
    assert set(seen) == {PADDED}
