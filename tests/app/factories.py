"""Small teachers and upload bodies for the service tests, built here (nothing downloaded)."""

from __future__ import annotations

import pickle

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def tiny_onnx_classifier(features: int = 4, classes: int = 3, seed: int = 0) -> bytes:
    """A linear classifier (Gemm then Softmax) as serialized ONNX, dynamic batch."""
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(
        rng.standard_normal((features, classes)).astype(np.float32), "weight"
    )
    bias = numpy_helper.from_array(np.zeros(classes, np.float32), "bias")
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["input", "weight", "bias"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "tiny_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])],
        initializer=[weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def pickled_checkpoint() -> bytes:
    """What ``torch.save`` of a state dict starts as: a pickle (protocol 2+)."""
    return pickle.dumps({"weight": [[0.0, 1.0]], "bias": [0.0]}, protocol=4)
