"""The allowlisted encoder families: each loads as a teacher and seeds a student."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.worker.engine.factories import tiny_bert_config
from tests.worker.engine.hf.factories import (
    build_student,
    copy_classifier,
    load_on_cpu,
    student_context,
    text_batch,
)
from worker.engine.errors import TeacherIncompatible
from worker.engine.hf.bridges import LayerBridge
from worker.engine.spec import StudentSpec


def test_model_type_off_the_allowlist_is_refused(models: dict[str, Any], tmp_path: Path) -> None:
    folder = copy_classifier(models, "gpt")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(TeacherIncompatible) as error:
        load_on_cpu(folder, tmp_path)
    assert "gpt2" in error.value.message


FAMILY_OPTIONS = {
    "distilbert": {"dim": 32, "n_layers": 4, "n_heads": 4, "hidden_dim": 64},
    "roberta": {},
    "albert": {"embedding_size": 16},
    "deberta-v2": {"pooler_hidden_size": 32, "relative_attention": True, "position_buckets": 8},
}


@pytest.mark.parametrize("model_type", sorted(FAMILY_OPTIONS))
def test_other_families_load_and_seed_students(
    models: dict[str, Any], tmp_path: Path, model_type: str
) -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    config = CONFIG_MAPPING[model_type](
        **{**tiny_bert_config(num_labels=2, pad_token_id=0).to_dict(), **FAMILY_OPTIONS[model_type]}
    )
    torch.manual_seed(0)
    classifier_class: Any = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]
    model = classifier_class(config).eval()
    model.save_pretrained(tmp_path / "m")
    models["tokenizer"].save_pretrained(tmp_path / "m")
    runtime = load_on_cpu(tmp_path / "m", tmp_path)
    batch = text_batch(runtime.tokenizer)
    inputs = {name: tensor for name, tensor in batch.items() if name in runtime.module.input_names}
    with torch.no_grad():
        torch.testing.assert_close(runtime.predict(batch), model(**inputs).logits)
    assert runtime.predict_with_features(batch, runtime.hint_layers()[0])[1].shape == (5, 32)

    spec = StudentSpec(num_layers=2, compression=None)
    student = build_student(spec, student_context(runtime))
    # ALBERT has one shared layer group, copied whole.
    chosen = [0] if model_type == "albert" else [0, 3]
    teacher_layers = runtime.module.layer_names()
    for student_layer, teacher_index in zip(student.layer_names(), chosen, strict=True):
        layer = student.get_submodule(student_layer)
        # The skipped teacher layers are bridged; the layer behind the bridge is the teacher's.
        student_state = (layer.layer if isinstance(layer, LayerBridge) else layer).state_dict()
        teacher_state = runtime.module.get_submodule(teacher_layers[teacher_index]).state_dict()
        assert all(torch.equal(value, teacher_state[key]) for key, value in student_state.items())
    assert student(**batch).shape == (5, 2)
