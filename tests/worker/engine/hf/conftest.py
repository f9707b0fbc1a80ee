"""Tiny transformers teachers, built once for the hf package's tests."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import worker.engine.components  # noqa: F401  (load_teacher finds the huggingface runtime)
from tests.worker.engine.factories import tiny_bert_config, tiny_bert_tokenizer, zip_folder
from tests.worker.engine.hf.factories import CPU
from worker.engine.teachers import TeacherRuntime, load_teacher


@pytest.fixture(scope="package")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny BERT classifier and a tiny bare BERT encoder, saved (the classifier also zipped)."""
    from transformers import BertForSequenceClassification, BertModel

    root = tmp_path_factory.mktemp("hf")
    tokenizer = tiny_bert_tokenizer(root)
    torch.manual_seed(0)
    classifier = BertForSequenceClassification(tiny_bert_config(num_labels=3)).eval()
    classifier_dir = root / "clf"
    classifier.save_pretrained(classifier_dir, safe_serialization=True)
    tokenizer.save_pretrained(classifier_dir)
    encoder_dir = root / "encoder"
    BertModel(tiny_bert_config()).save_pretrained(encoder_dir, safe_serialization=True)
    tokenizer.save_pretrained(encoder_dir)
    return {
        "root": root,
        "tokenizer": tokenizer,
        "classifier": classifier,
        "classifier_dir": classifier_dir,
        "classifier_zip": zip_folder(classifier_dir, root / "clf.zip"),
        "encoder_dir": encoder_dir,
    }


@pytest.fixture(scope="package")
def teacher(models: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> TeacherRuntime:
    """The zipped classifier, loaded the way a job loads its teacher."""
    return load_teacher(
        models["classifier_zip"], device=CPU, work_dir=tmp_path_factory.mktemp("work")
    )
