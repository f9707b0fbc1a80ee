"""The huggingface teacher runtime: outputs, hint features and the upload's signature."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.worker.engine.factories import zip_folder
from tests.worker.engine.hf.factories import (
    SENTENCES,
    load_on_cpu,
    sentence_transformer,
    text_batch,
)
from worker.engine.errors import TeacherIncompatible
from worker.engine.hf.runtime import HuggingFaceTeacher
from worker.engine.inspection import inspect as inspect_teacher


def test_classifier_zip_loads_and_matches_transformers(
    models: dict[str, Any], teacher: HuggingFaceTeacher
) -> None:
    assert isinstance(teacher, HuggingFaceTeacher)
    signature = teacher.signature
    assert (
        signature.format,
        signature.task,
        signature.output_kind,
        signature.num_classes,
    ) == ("huggingface", "classification", "logits", 3)
    assert [spec.name for spec in signature.inputs] == [
        "input_ids",
        "attention_mask",
        "token_type_ids",
    ]
    classifier = models["classifier"]
    assert signature.parameters == sum(parameter.numel() for parameter in classifier.parameters())
    assert teacher.backend == "torch"
    assert all(not parameter.requires_grad for parameter in teacher.module.parameters())
    assert len(teacher.digest) == 64
    # The upload-time signature (read without torch) says the same.
    inspected = inspect_teacher(models["classifier_zip"])
    fields = ("format", "task", "output_kind", "output_dim", "num_classes", "parameters", "bytes")
    assert [getattr(inspected, name) for name in fields] == [
        getattr(signature, name) for name in fields
    ]
    assert inspected.inputs == signature.inputs
    assert inspected.architecture == signature.architecture

    batch = text_batch(teacher.tokenizer)
    assert batch["input_ids"][0, 0].item() == teacher.tokenizer.cls_token_id
    outputs = teacher.predict(batch)
    with torch.no_grad():
        expected = classifier(**batch).logits
    assert outputs.dtype == torch.float32 and outputs.shape == (len(SENTENCES), 3)
    torch.testing.assert_close(outputs, expected, atol=1e-6, rtol=0)


def test_hint_layers_and_features(teacher: HuggingFaceTeacher) -> None:
    layers = teacher.hint_layers()
    assert layers[0].endswith("encoder.layer.3") and len(layers) == 4
    batch = text_batch(teacher.tokenizer)
    outputs, features = teacher.predict_with_features(batch, layers[0])
    assert features.shape == (len(SENTENCES), 32)
    torch.testing.assert_close(outputs, teacher.predict(batch))
    # A short name resolves to the one layer it ends.
    _, same = teacher.predict_with_features(batch, "encoder.layer.3")
    torch.testing.assert_close(same, features)
    with pytest.raises(TeacherIncompatible):
        teacher.predict_with_features(batch, "encoder.layer.9")


@pytest.mark.parametrize(
    ("pooling", "dense", "normalize"),
    [("mean", True, True), (("cls", "max"), False, False), ("weightedmean", False, True)],
)
def test_sentence_transformers_embedding_equals_encode(
    models: dict[str, Any], tmp_path: Path, pooling: Any, dense: bool, normalize: bool
) -> None:
    name = f"st-{'-'.join([pooling] if isinstance(pooling, str) else pooling)}"
    model, folder = sentence_transformer(models, name, pooling, dense, normalize)
    runtime = load_on_cpu(zip_folder(folder, tmp_path / "st.zip"), tmp_path)
    signature = runtime.signature
    assert (signature.task, signature.output_kind, signature.extra["normalize"]) == (
        "embedding",
        "embedding",
        normalize,
    )
    expected = model.encode(SENTENCES, convert_to_numpy=True)
    assert signature.output_dim == expected.shape[1]
    embeddings = runtime.predict(text_batch(runtime.tokenizer)).numpy()
    np.testing.assert_allclose(embeddings, expected, atol=1e-5, rtol=0)
