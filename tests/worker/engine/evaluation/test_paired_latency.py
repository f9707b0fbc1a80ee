"""Teacher and student timed in turn: the heavier file is the slower, whichever goes first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from worker.engine.evaluation import OnnxFile, paired_latency_ms


def _chain(path: Path, width: int, depth: int) -> OnnxFile:
    """``depth`` (width x width) MatMuls on a ``(batch, width)`` input named ``input``."""
    rng = np.random.default_rng(0)
    nodes, weights, previous = [], [], "input"
    for index in range(depth):
        weight = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        weights.append(numpy_helper.from_array(weight, f"w{index}"))
        output = "output" if index == depth - 1 else f"h{index}"
        nodes.append(helper.make_node("MatMul", [previous, f"w{index}"], [output]))
        previous = output
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", width])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return OnnxFile(path)


def test_the_heavier_file_is_the_slower_in_either_order(tmp_path: Path) -> None:
    light = _chain(tmp_path / "light.onnx", 512, 1)
    heavy = _chain(tmp_path / "heavy.onnx", 512, 24)
    arrays = {"input": np.ones((4, 512), dtype=np.float32)}
    light_ms, heavy_ms = paired_latency_ms([light, heavy], arrays, budget_s=0.5)
    heavy_first, light_second = paired_latency_ms([heavy, light], arrays, budget_s=0.5)
    assert 0 < light_ms < heavy_ms and 0 < light_second < heavy_first
    # 24 MatMuls against one: the ratio holds well apart from the order they ran in.
    assert heavy_ms / light_ms > 4 and heavy_first / light_second > 4


def test_torch_callables_timed_in_turn_keep_the_heavier_the_slower_in_either_order() -> None:
    import torch

    from worker.engine.evaluation import paired_torch_latency_ms

    torch.manual_seed(0)
    light = torch.nn.Linear(512, 512)
    heavy = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(24)])
    batch = {"inputs": torch.ones(4, 512)}
    fns = [lambda b: light(b["inputs"]), lambda b: heavy(b["inputs"])]
    light_ms, heavy_ms = paired_torch_latency_ms(fns, batch, "cpu", budget_s=0.5)
    heavy_first, light_second = paired_torch_latency_ms(fns[::-1], batch, "cpu", budget_s=0.5)
    assert 0 < light_ms < heavy_ms and 0 < light_second < heavy_first
    assert heavy_ms / light_ms > 4 and heavy_first / light_second > 4


def test_a_row_of_tokens_is_timed_as_long_as_it_is() -> None:
    import torch

    from worker.engine.evaluation import first_row

    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    ids = torch.arange(12).view(2, 6)
    tensors = {"input_ids": ids, "attention_mask": mask, "label_like": torch.tensor([[7], [8]])}
    one = first_row(tensors, torch.device("cpu"))
    # The padding the transfer set gave the row is gone; arrays of another shape are kept.
    assert one["input_ids"].tolist() == [[0, 1, 2]]
    assert one["attention_mask"].tolist() == [[1, 1, 1]]
    assert one["label_like"].tolist() == [[7]]
    # Rows that are not tokens are only cut to their first row.
    table = first_row({"inputs": torch.ones(5, 3)}, torch.device("cpu"))
    assert table["inputs"].shape == (1, 3)
