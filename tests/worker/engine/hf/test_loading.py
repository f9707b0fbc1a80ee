"""Reading a transformers folder: no remote code, no pickles, heads and options as saved."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.worker.engine.factories import tiny_bert_config, tiny_bert_tokenizer, zip_folder
from tests.worker.engine.hf.factories import (
    copy_classifier,
    load_on_cpu,
    sentence_transformer,
    text_batch,
)
from worker.engine.errors import ArchiveUnsafe, TeacherIncompatible, UnsupportedFormat
from worker.engine.hf.tokenizer import LowercasingTokenizer
from worker.engine.inspection import inspect as inspect_teacher


def test_remote_code_is_never_run(models: dict[str, Any], tmp_path: Path) -> None:
    folder = copy_classifier(models, "evil")
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('x')\n"
    (folder / "modeling_evil.py").write_text(code)
    (folder / "configuration_evil.py").write_text(code)
    (folder / "tokenization_evil.py").write_text(code)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModel": "modeling_evil.EvilModel",
        "AutoModelForSequenceClassification": "modeling_evil.EvilModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {
        "AutoTokenizer": ["tokenization_evil.Evil", "tokenization_evil.Evil"]
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    archive = zip_folder(folder, tmp_path / "evil.zip")

    # A built-in family: the auto_map is ignored and the built-in class loads.
    runtime = load_on_cpu(archive, tmp_path / "w1")
    assert type(runtime.module.model).__module__.startswith("transformers.models.bert")
    # An unknown family that only remote code could run is refused.
    config["model_type"] = "evil"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(TeacherIncompatible):
        load_on_cpu(folder, tmp_path / "w2")
    assert not marker.exists()


def test_pickle_only_weights_are_refused(models: dict[str, Any], tmp_path: Path) -> None:
    folder = copy_classifier(models, "pickled")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not unpickled")
    with pytest.raises(UnsupportedFormat) as error:
        load_on_cpu(zip_folder(folder, tmp_path / "p.zip"), tmp_path)
    assert "safetensors" in error.value.message and "pytorch_model.bin" in error.value.message


def test_sentence_transformers_options_and_refusals(models: dict[str, Any], tmp_path: Path) -> None:
    _, saved = sentence_transformer(models, "st-options", "mean", False, True)
    folder = tmp_path / "st"
    shutil.copytree(saved, folder)
    sentence_config = json.loads((folder / "sentence_bert_config.json").read_text())
    sentence_config.update(do_lower_case=True, max_seq_length=16)
    (folder / "sentence_bert_config.json").write_text(json.dumps(sentence_config))
    # A cased tokenizer: only the lowercasing wrapper maps "The CAT" onto the vocabulary.
    tiny_bert_tokenizer(tmp_path, lowercase=False).save_pretrained(folder)
    runtime = load_on_cpu(folder, tmp_path)
    assert isinstance(runtime.tokenizer, LowercasingTokenizer)
    assert runtime.signature.extra["max_length"] == 16 and len(runtime.tokenizer) == 24
    upper = runtime.tokenizer(["The CAT sat"])["input_ids"]
    assert upper == models["tokenizer"](["the cat sat"])["input_ids"]
    assert upper != runtime.tokenizer.tokenizer(["The CAT sat"])["input_ids"]

    modules = json.loads((folder / "modules.json").read_text())
    for entry, refusal in (
        ({"idx": 1, "path": "1_Pooling", "type": "evil.Pooling"}, TeacherIncompatible),
        (
            {"idx": 1, "path": "../outside", "type": "sentence_transformers.models.Pooling"},
            ArchiveUnsafe,
        ),
    ):
        (folder / "modules.json").write_text(json.dumps([modules[0], entry]))
        with pytest.raises(refusal):
            load_on_cpu(folder, tmp_path)


def test_single_output_classifier_is_a_regressor(models: dict[str, Any], tmp_path: Path) -> None:
    from transformers import BertForSequenceClassification

    folder = tmp_path / "reg"
    BertForSequenceClassification(tiny_bert_config(num_labels=1)).save_pretrained(folder)
    models["tokenizer"].save_pretrained(folder)
    signature = load_on_cpu(folder, tmp_path).signature
    assert (
        signature.task,
        signature.output_kind,
        signature.output_dim,
        signature.num_classes,
    ) == ("regression", "values", 1, None)


def test_multi_label_classifier_is_read_as_values_on_upload_and_at_run_time(
    models: dict[str, Any], tmp_path: Path
) -> None:
    from transformers import BertForSequenceClassification

    folder = tmp_path / "multi"
    config = tiny_bert_config(num_labels=4, problem_type="multi_label_classification")
    BertForSequenceClassification(config).save_pretrained(folder)
    models["tokenizer"].save_pretrained(folder)
    bundle = zip_folder(folder, tmp_path / "multi.zip")
    at_run_time = load_on_cpu(bundle, tmp_path / "work").signature
    on_upload = inspect_teacher(bundle)
    # Independent sigmoid logits: never distilled through a softmax.
    for signature in (at_run_time, on_upload):
        assert (signature.task, signature.output_kind, signature.output_dim) == (
            "regression",
            "values",
            4,
        )


def test_bare_encoder_uses_mean_pooling(models: dict[str, Any], tmp_path: Path) -> None:
    from transformers import BertModel

    runtime = load_on_cpu(models["encoder_dir"], tmp_path)
    assert runtime.signature.task == "embedding"
    assert runtime.signature.extra["pooling"] == ["mean"]
    batch = text_batch(runtime.tokenizer)
    with torch.no_grad():
        states = BertModel.from_pretrained(models["encoder_dir"]).eval()(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = (states * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(runtime.predict(batch), expected, atol=1e-5, rtol=0)
