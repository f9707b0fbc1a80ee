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
    export_and_compare,
    load_on_cpu,
    student_context,
    text_batch,
)
from worker.engine.errors import TeacherIncompatible
from worker.engine.hf.bridges import LayerBridge
from worker.engine.hf.runtime import HuggingFaceTeacher
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
    model, runtime = _family_teacher(models, tmp_path, model_type, FAMILY_OPTIONS[model_type])
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


def _family_teacher(
    models: dict[str, Any], tmp_path: Path, model_type: str, options: dict[str, Any]
) -> tuple[Any, HuggingFaceTeacher]:
    """A tiny random-weight sequence classifier of ``model_type``, and it loaded as a teacher."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    config = CONFIG_MAPPING[model_type](
        **{**tiny_bert_config(num_labels=2, pad_token_id=0).to_dict(), **options}
    )
    torch.manual_seed(0)
    classifier_class: Any = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]
    model = classifier_class(config).eval()
    model.save_pretrained(tmp_path / "m")
    models["tokenizer"].save_pretrained(tmp_path / "m")
    return model, load_on_cpu(tmp_path / "m", tmp_path)


#: Families a narrower student is cut from, besides BERT (see test_student.py): BERT's
#: parameter names (RoBERTa; an ELECTRA whose word embeddings are as wide as its layers),
#: DistilBERT's, MPNet's and DeBERTa-v2's.
CUT_FAMILIES: dict[str, dict[str, Any]] = {
    "distilbert": FAMILY_OPTIONS["distilbert"],
    "roberta": {},
    "electra": {"embedding_size": 32},
    "mpnet": {},
    # Relative attention with its own position projections in each layer.
    "deberta-v2": {**FAMILY_OPTIONS["deberta-v2"], "pos_att_type": ["p2c", "c2p"]},
}
#: (a query weight, a feed-forward output weight, a LayerNorm scale) in a layer, by naming.
LAYER_KEYS = {
    "distilbert": ("attention.q_lin.weight", "ffn.lin2.weight", "sa_layer_norm.weight"),
    "mpnet": ("attention.attn.q.weight", "output.dense.weight", "attention.LayerNorm.weight"),
    "deberta-v2": (
        "attention.self.pos_key_proj.weight",
        "output.dense.weight",
        "attention.output.LayerNorm.weight",
    ),
    "bert": (
        "attention.self.query.weight",
        "output.dense.weight",
        "attention.output.LayerNorm.weight",
    ),
}


@pytest.mark.parametrize("model_type", sorted(CUT_FAMILIES))
def test_a_narrower_student_is_cut_from_the_layers_of_other_families(
    models: dict[str, Any], tmp_path: Path, model_type: str
) -> None:
    from worker.engine.hf.pruning import kept_parts, rank_parts
    from worker.engine.students import rebuild_student

    _, runtime = _family_teacher(models, tmp_path, model_type, CUT_FAMILIES[model_type])
    context = student_context(runtime)
    spec = StudentSpec(hidden_size=16, num_layers=2, compression=None)
    student = build_student(spec, context)
    assert (student.hf_config.hidden_size, student.hf_config.num_attention_heads) == (16, 2)
    assert student.config["initialised_from_teacher_layers"] == [0, 3]
    assert context.sample_inputs is not None
    rows = {name: torch.as_tensor(value) for name, value in context.sample_inputs.items()}
    shared = model_type == "mpnet"
    channels, dims, units = kept_parts(
        rank_parts(runtime.module, rows),
        [0, 3],
        width=16,
        heads=2,
        units=32,
        head_dim=8,
        shared_heads=shared,
    )
    if shared:
        # MPNet's relative-position bias has a column per head, for every layer: each layer
        # keeps the same heads, and the table their columns.
        assert torch.equal(dims[0], dims[1])
        key = "model.mpnet.encoder.relative_attention_bias.weight"
        heads = dims[0].reshape(2, 8)[:, 0] // 8
        assert torch.equal(student.state_dict()[key], runtime.module.state_dict()[key][:, heads])
    if model_type == "deberta-v2":
        # The relative-position embeddings live in the residual stream: its kept channels.
        key = "model.deberta.encoder.rel_embeddings.weight"
        theirs = runtime.module.state_dict()[key]
        assert torch.equal(student.state_dict()[key], theirs[:, channels])
    query, output, norm = LAYER_KEYS.get(model_type, LAYER_KEYS["bert"])
    mine = student.get_submodule(student.layer_names()[0]).state_dict()
    theirs = runtime.module.get_submodule(runtime.module.layer_names()[0]).state_dict()
    assert torch.equal(mine[query], theirs[query][dims[0]][:, channels])
    assert torch.equal(mine[output], theirs[output][channels][:, units[0]])
    assert torch.equal(mine[norm], theirs[norm][channels])
    # Rebuilt from its config alone, it computes what it computes.
    batch = text_batch(runtime.tokenizer)
    inputs = {name: tensor for name, tensor in batch.items() if name in student.input_names}
    rebuilt = rebuild_student(json.loads(json.dumps(student.config)))
    rebuilt.load_state_dict(student.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(**inputs), student.eval()(**inputs))
    assert student(**inputs).shape == (5, 2)
    export_and_compare(student, runtime.tokenizer, tmp_path / "cut.onnx")
    # Where no student of the teacher's width fits the budget, auto cuts one too.
    budgeted = build_student(StudentSpec(compression=3), context)
    assert budgeted.hf_config.hidden_size < 32
    assert budgeted.config["initialised_from_teacher_layers"] is not None
    assert sum(p.numel() for p in budgeted.parameters()) <= runtime.signature.parameters / 3
    assert budgeted(**inputs).shape == (5, 2)
