"""Batches, folders and student contexts shared by the hf package's tests."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.engine.hf.runtime import HuggingFaceTeacher, load_huggingface
from worker.engine.hf.student import build_hf_encoder
from worker.engine.hf.wrapper import HFEncoder
from worker.engine.spec import StudentSpec
from worker.engine.students import StudentContext

SENTENCES = [
    "the cat sat on the mat",
    "a good movie",
    "i liked it not",
    "the dog is very bad and awful",
    "great film",
]
CPU = torch.device("cpu")


def text_batch(tokenizer: Any, texts: list[str] = SENTENCES) -> dict[str, torch.Tensor]:
    """``texts`` tokenized and padded into one batch of tensors."""
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


def copy_classifier(models: dict[str, Any], name: str) -> Path:
    """A copy of the tiny classifier's folder, free to edit."""
    destination = models["root"] / name
    shutil.copytree(models["classifier_dir"], destination)
    return destination


def sentence_transformer(
    models: dict[str, Any], name: str, pooling: Any, dense: bool, normalize: bool
) -> tuple[Any, Path]:
    """A sentence-transformers model over the tiny encoder, and the folder it is saved in."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as sentence_modules

    transformer = sentence_modules.Transformer(str(models["encoder_dir"]))
    modules = [transformer, sentence_modules.Pooling(32, pooling)]
    if dense:
        modules.append(sentence_modules.Dense(modules[1].get_embedding_dimension(), 16))
    if normalize:
        modules.append(sentence_modules.Normalize())
    torch.manual_seed(1)
    model = SentenceTransformer(modules=modules, device="cpu")
    folder = models["root"] / name
    model.save(str(folder))
    return model, folder


def student_context(teacher: Any, task: str = "classification") -> StudentContext:
    """What the pipeline tells a student builder about ``teacher`` and a text dataset."""
    return StudentContext(
        task=task,
        modality="text",
        input_shape=(8,),
        input_names=["input_ids", "token_type_ids", "attention_mask"],
        output_dim=teacher.signature.output_dim,
        teacher_parameters=teacher.signature.parameters,
        teacher_bytes=teacher.signature.bytes,
        vocab_size=len(teacher.tokenizer),
        teacher=teacher,
        sample_inputs={
            name: value.numpy() for name, value in text_batch(teacher.tokenizer).items()
        },
    )


def build_student(spec: StudentSpec, context: StudentContext) -> HFEncoder:
    """``build_hf_encoder``, typed as the encoder it returns (the registry types it loosely)."""
    student = build_hf_encoder(spec, context)
    assert isinstance(student, HFEncoder)
    return student


def load_on_cpu(path: Path, work_dir: Path) -> HuggingFaceTeacher:
    """``load_huggingface`` on the CPU, typed as the runtime it returns."""
    runtime = load_huggingface(path, device=CPU, work_dir=work_dir)
    assert isinstance(runtime, HuggingFaceTeacher)
    return runtime


def export_and_compare(student: HFEncoder, tokenizer: Any, path: Path) -> None:
    """The TorchScript exporter, the engine exporter's fallback, on an unpadded example."""
    import onnxruntime as ort

    student.eval()
    names = student.config["input_names"]
    # Unpadded: the exported graph must still honour padding masks.
    example = text_batch(tokenizer, ["the cat sat on the mat", "the dog sat on a mat"])
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    torch.onnx.export(
        student,
        tuple(example[name] for name in names),
        str(path),
        input_names=names,
        output_names=["output"],
        dynamic_axes={**axes, "output": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [graph_input.name for graph_input in session.get_inputs()] == names
    for texts in (SENTENCES, ["bad"]):
        batch = text_batch(tokenizer, texts)
        exported = session.run(None, {name: batch[name].numpy() for name in names})[0]
        with torch.no_grad():
            expected = student(**batch).numpy()
        np.testing.assert_allclose(exported, expected, atol=1e-4, rtol=0)
