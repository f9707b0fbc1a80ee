"""Hugging Face teachers and the hf_encoder student, on tiny models built here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.worker.engine.factories import tiny_bert_config, tiny_bert_tokenizer, zip_folder
from worker.engine import hf
from worker.engine.errors import SpecInvalid, TeacherIncompatible, UnsupportedFormat
from worker.engine.inspection import inspect as inspect_teacher
from worker.engine.spec import StudentSpec
from worker.engine.students import StudentContext, rebuild_student
from worker.engine.teachers import load_teacher

SENTENCES = [
    "the cat sat on the mat",
    "a good movie",
    "i liked it not",
    "the dog is very bad and awful",
    "great film",
]
CPU = torch.device("cpu")


def _batch(tokenizer, texts=SENTENCES) -> dict[str, torch.Tensor]:
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny BERT classifier and a tiny sentence-transformers model, saved and zipped."""
    from transformers import BertForSequenceClassification, BertModel

    root = tmp_path_factory.mktemp("hf")
    tok = tiny_bert_tokenizer(root)
    torch.manual_seed(0)
    clf = BertForSequenceClassification(tiny_bert_config(num_labels=3)).eval()
    clf_dir = root / "clf"
    clf.save_pretrained(clf_dir, safe_serialization=True)
    tok.save_pretrained(clf_dir)
    encoder_dir = root / "encoder"
    BertModel(tiny_bert_config()).save_pretrained(encoder_dir, safe_serialization=True)
    tok.save_pretrained(encoder_dir)
    return {
        "root": root,
        "tokenizer": tok,
        "clf": clf,
        "clf_dir": clf_dir,
        "clf_zip": zip_folder(clf_dir, root / "clf.zip"),
        "encoder_dir": encoder_dir,
    }


@pytest.fixture(scope="module")
def teacher(models, tmp_path_factory):
    return load_teacher(models["clf_zip"], device=CPU, work_dir=tmp_path_factory.mktemp("work"))


def _copy(models, name: str) -> Path:
    dest = models["root"] / name
    shutil.copytree(models["clf_dir"], dest)
    return dest


# --------------------------------------------------------------------------- teacher


def test_classifier_zip_loads_and_matches_transformers(models, teacher):
    assert isinstance(teacher, hf.HuggingFaceTeacher)
    sig = teacher.signature
    assert (sig.format, sig.task, sig.output_kind, sig.num_classes) == (
        "huggingface",
        "classification",
        "logits",
        3,
    )
    assert [t.name for t in sig.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert sig.parameters == sum(p.numel() for p in models["clf"].parameters())
    assert teacher.backend == "torch"
    assert all(not p.requires_grad for p in teacher.module.parameters())
    assert len(teacher.digest) == 64
    # The upload-time signature (read without torch) says the same.
    inspected = inspect_teacher(models["clf_zip"])
    fields = ("format", "task", "output_kind", "output_dim", "num_classes", "parameters", "bytes")
    assert [getattr(inspected, f) for f in fields] == [getattr(sig, f) for f in fields]
    assert inspected.inputs == sig.inputs and inspected.architecture == sig.architecture

    batch = _batch(teacher.tokenizer)
    assert batch["input_ids"][0, 0].item() == teacher.tokenizer.cls_token_id
    out = teacher.predict(batch)
    with torch.no_grad():
        expected = models["clf"](**batch).logits
    assert out.dtype == torch.float32 and out.shape == (len(SENTENCES), 3)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_hint_layers_and_features(teacher):
    layers = teacher.hint_layers()
    assert layers[0].endswith("encoder.layer.3") and len(layers) == 4
    batch = _batch(teacher.tokenizer)
    out, feats = teacher.predict_with_features(batch, layers[0])
    assert feats.shape == (len(SENTENCES), 32)
    torch.testing.assert_close(out, teacher.predict(batch))
    # A short name resolves to the one layer it ends.
    _, same = teacher.predict_with_features(batch, "encoder.layer.3")
    torch.testing.assert_close(same, feats)
    with pytest.raises(TeacherIncompatible):
        teacher.predict_with_features(batch, "encoder.layer.9")


def test_remote_code_is_never_run(models, tmp_path):
    folder = _copy(models, "evil")
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
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.Evil", "tokenization_evil.Evil"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    archive = zip_folder(folder, tmp_path / "evil.zip")

    # A built-in family: the auto_map is ignored and the built-in class loads.
    runtime = hf.load_huggingface(archive, device=CPU, work_dir=tmp_path / "w1")
    assert type(runtime.module.model).__module__.startswith("transformers.models.bert")
    # An unknown family that only remote code could run is refused.
    config["model_type"] = "evil"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(TeacherIncompatible):
        hf.load_huggingface(folder, device=CPU, work_dir=tmp_path / "w2")
    assert not marker.exists()


def test_pickle_only_weights_are_refused(models, tmp_path):
    folder = _copy(models, "pickled")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not unpickled")
    with pytest.raises(UnsupportedFormat) as err:
        hf.load_huggingface(zip_folder(folder, tmp_path / "p.zip"), device=CPU, work_dir=tmp_path)
    assert "safetensors" in err.value.message and "pytorch_model.bin" in err.value.message


def test_model_type_off_the_allowlist_is_refused(models, tmp_path):
    folder = _copy(models, "gpt")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(TeacherIncompatible) as err:
        hf.load_huggingface(folder, device=CPU, work_dir=tmp_path)
    assert "gpt2" in err.value.message


def _sentence_transformer(models, name: str, pooling, dense: bool, normalize: bool):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as st_models

    transformer = st_models.Transformer(str(models["encoder_dir"]))
    modules = [transformer, st_models.Pooling(32, pooling)]
    if dense:
        modules.append(st_models.Dense(modules[1].get_embedding_dimension(), 16))
    if normalize:
        modules.append(st_models.Normalize())
    torch.manual_seed(1)
    model = SentenceTransformer(modules=modules, device="cpu")
    folder = models["root"] / name
    model.save(str(folder))
    return model, folder


@pytest.mark.parametrize(
    ("pooling", "dense", "normalize"),
    [("mean", True, True), (("cls", "max"), False, False), ("weightedmean", False, True)],
)
def test_sentence_transformers_embedding_equals_encode(models, tmp_path, pooling, dense, normalize):
    name = f"st-{'-'.join([pooling] if isinstance(pooling, str) else pooling)}"
    model, folder = _sentence_transformer(models, name, pooling, dense, normalize)
    runtime = hf.load_huggingface(
        zip_folder(folder, tmp_path / "st.zip"), device=CPU, work_dir=tmp_path
    )
    sig = runtime.signature
    assert (sig.task, sig.output_kind, sig.extra["normalize"]) == (
        "embedding",
        "embedding",
        normalize,
    )
    expected = model.encode(SENTENCES, convert_to_numpy=True)
    assert sig.output_dim == expected.shape[1]
    got = runtime.predict(_batch(runtime.tokenizer)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_sentence_transformers_options_and_refusals(models, tmp_path):
    from worker.engine.errors import ArchiveUnsafe

    _, saved = _sentence_transformer(models, "st-options", "mean", False, True)
    folder = tmp_path / "st"
    shutil.copytree(saved, folder)
    st_config = json.loads((folder / "sentence_bert_config.json").read_text())
    st_config.update(do_lower_case=True, max_seq_length=16)
    (folder / "sentence_bert_config.json").write_text(json.dumps(st_config))
    # A cased tokenizer: only the lowercasing wrapper maps "The CAT" onto the vocabulary.
    tiny_bert_tokenizer(tmp_path, lowercase=False).save_pretrained(folder)
    runtime = hf.load_huggingface(folder, device=CPU, work_dir=tmp_path)
    assert isinstance(runtime.tokenizer, hf.LowercasingTokenizer)
    assert runtime.signature.extra["max_length"] == 16 and len(runtime.tokenizer) == 24
    upper = runtime.tokenizer(["The CAT sat"])["input_ids"]
    assert upper == models["tokenizer"](["the cat sat"])["input_ids"]
    assert upper != runtime.tokenizer.tokenizer(["The CAT sat"])["input_ids"]

    modules = json.loads((folder / "modules.json").read_text())
    for entry, error in (
        ({"idx": 1, "path": "1_Pooling", "type": "evil.Pooling"}, TeacherIncompatible),
        (
            {"idx": 1, "path": "../outside", "type": "sentence_transformers.models.Pooling"},
            ArchiveUnsafe,
        ),
    ):
        (folder / "modules.json").write_text(json.dumps([modules[0], entry]))
        with pytest.raises(error):
            hf.load_huggingface(folder, device=CPU, work_dir=tmp_path)


def test_single_output_classifier_is_a_regressor(models, tmp_path):
    from transformers import BertForSequenceClassification

    folder = tmp_path / "reg"
    BertForSequenceClassification(tiny_bert_config(num_labels=1)).save_pretrained(folder)
    models["tokenizer"].save_pretrained(folder)
    sig = hf.load_huggingface(folder, device=CPU, work_dir=tmp_path).signature
    assert (sig.task, sig.output_kind, sig.output_dim, sig.num_classes) == (
        "regression",
        "values",
        1,
        None,
    )


def test_multi_label_classifier_is_read_as_values_on_upload_and_at_run_time(models, tmp_path):
    from transformers import BertForSequenceClassification

    folder = tmp_path / "multi"
    config = tiny_bert_config(num_labels=4, problem_type="multi_label_classification")
    BertForSequenceClassification(config).save_pretrained(folder)
    models["tokenizer"].save_pretrained(folder)
    bundle = zip_folder(folder, tmp_path / "multi.zip")
    runtime = hf.load_huggingface(bundle, device=CPU, work_dir=tmp_path / "work").signature
    inspected = inspect_teacher(bundle)
    # Independent sigmoid logits: never distilled through a softmax.
    for sig in (runtime, inspected):
        assert (sig.task, sig.output_kind, sig.output_dim) == ("regression", "values", 4)


def test_bare_encoder_uses_mean_pooling(models, tmp_path):
    from transformers import BertModel

    runtime = hf.load_huggingface(models["encoder_dir"], device=CPU, work_dir=tmp_path)
    assert runtime.signature.task == "embedding" and runtime.signature.extra["pooling"] == ["mean"]
    batch = _batch(runtime.tokenizer)
    with torch.no_grad():
        states = BertModel.from_pretrained(models["encoder_dir"]).eval()(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = (states * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(runtime.predict(batch), expected, atol=1e-5, rtol=0)


FAMILY_OPTIONS = {
    "distilbert": {"dim": 32, "n_layers": 4, "n_heads": 4, "hidden_dim": 64},
    "roberta": {},
    "albert": {"embedding_size": 16},
    "deberta-v2": {"pooler_hidden_size": 32, "relative_attention": True, "position_buckets": 8},
}


@pytest.mark.parametrize("model_type", sorted(FAMILY_OPTIONS))
def test_other_families_load_and_seed_students(models, tmp_path, model_type):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    config = CONFIG_MAPPING[model_type](
        **{**tiny_bert_config(num_labels=2, pad_token_id=0).to_dict(), **FAMILY_OPTIONS[model_type]}
    )
    torch.manual_seed(0)
    model = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)](config).eval()
    model.save_pretrained(tmp_path / "m")
    models["tokenizer"].save_pretrained(tmp_path / "m")
    runtime = hf.load_huggingface(tmp_path / "m", device=CPU, work_dir=tmp_path)
    batch = _batch(runtime.tokenizer)
    inputs = {k: v for k, v in batch.items() if k in runtime.module.input_names}
    with torch.no_grad():
        torch.testing.assert_close(runtime.predict(batch), model(**inputs).logits)
    assert runtime.predict_with_features(batch, runtime.hint_layers()[0])[1].shape == (5, 32)

    student = hf.build_hf_encoder(StudentSpec(num_layers=2, compression=None), _context(runtime))
    layers = student.layer_names()
    # ALBERT has one shared layer group, copied whole.
    chosen = [0] if model_type == "albert" else [0, 3]
    for s_layer, t_index in zip(layers, chosen, strict=True):
        t_layer = runtime.module.layer_names()[t_index]
        s_state = student.get_submodule(s_layer).state_dict()
        t_state = runtime.module.get_submodule(t_layer).state_dict()
        assert all(torch.equal(v, t_state[k]) for k, v in s_state.items())
    assert student(**batch).shape == (5, 2)


# --------------------------------------------------------------------------- student


def _context(teacher, task="classification") -> StudentContext:
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
    )


def test_student_takes_evenly_spaced_teacher_layers(teacher):
    student = hf.build_hf_encoder(StudentSpec(num_layers=2, compression=None), _context(teacher))
    assert student.config["initialised_from_teacher_layers"] == [0, 3]
    assert sum(p.numel() for p in student.parameters()) < teacher.signature.parameters
    t_state = teacher.module.state_dict()
    s_state = student.state_dict()
    for s_index, t_index in enumerate([0, 3]):
        prefix = f"model.bert.encoder.layer.{s_index}."
        keys = [k for k in s_state if k.startswith(prefix)]
        assert keys
        for key in keys:
            t_key = key.replace(prefix, f"model.bert.encoder.layer.{t_index}.")
            assert torch.equal(s_state[key], t_state[t_key]), key
    for key in ("model.bert.embeddings.word_embeddings.weight", "model.classifier.weight"):
        assert torch.equal(s_state[key], t_state[key])
    assert student.hint_layer == "feature" and student.feature_dim == 32

    batch = _batch(teacher.tokenizer)
    captured = []
    handle = student.get_submodule(student.hint_layer).register_forward_hook(
        lambda _m, _i, out: captured.append(out)
    )
    out = student(**batch)
    handle.remove()
    assert out.shape == (len(SENTENCES), 3) and captured[0].shape == (len(SENTENCES), 32)


def test_student_config_rebuilds_without_teacher(teacher):
    student = hf.build_hf_encoder(StudentSpec(num_layers=2, compression=None), _context(teacher))
    config = json.loads(json.dumps(student.config))
    assert config["architecture"] == "hf_encoder"
    rebuilt = rebuild_student(config)
    assert isinstance(rebuilt, hf.HFEncoder)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in student.state_dict().items()
    }
    rebuilt.load_state_dict(student.state_dict())
    batch = _batch(teacher.tokenizer)
    student.eval(), rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**batch), student(**batch))


def test_student_size_follows_the_budget(teacher):
    ctx = _context(teacher)
    # Fewer layers at the teacher's width meet a mild compression.
    mild = hf.build_hf_encoder(StudentSpec(compression=1.3), ctx)
    assert mild.config["hf_config"]["hidden_size"] == 32
    assert mild.config["initialised_from_teacher_layers"] is not None
    # A stronger one needs a narrower model, which starts from scratch.
    strong = hf.build_hf_encoder(StudentSpec(compression=2.5), ctx)
    assert strong.config["hf_config"]["hidden_size"] < 32
    assert strong.config["initialised_from_teacher_layers"] is None
    assert sum(p.numel() for p in strong.parameters()) <= teacher.signature.parameters / 2.5
    with pytest.raises(SpecInvalid) as err:
        hf.build_hf_encoder(StudentSpec(compression=1000), ctx)
    assert err.value.field == "student.compression"


def _export_and_compare(student, tokenizer, path: Path) -> None:
    """The TorchScript exporter, the engine exporter's fallback, on an unpadded example."""
    import onnxruntime as ort

    student.eval()
    names = student.config["input_names"]
    # Unpadded: the exported graph must still honour padding masks.
    example = _batch(tokenizer, ["the cat sat on the mat", "the dog sat on a mat"])
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    torch.onnx.export(
        student,
        tuple(example[n] for n in names),
        str(path),
        input_names=names,
        output_names=["output"],
        dynamic_axes={**axes, "output": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == names
    for texts in (SENTENCES, ["bad"]):
        batch = _batch(tokenizer, texts)
        got = session.run(None, {n: batch[n].numpy() for n in names})[0]
        with torch.no_grad():
            expected = student(**batch).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_classifier_student_exports_through_the_engine_exporter(teacher, tmp_path):
    import onnxruntime as ort

    from worker.engine import export

    student = hf.build_hf_encoder(StudentSpec(num_layers=2, compression=None), _context(teacher))
    example = _batch(teacher.tokenizer, ["the cat sat on the mat", "the dog sat on a mat"])
    path = export.export_onnx(student, example, tmp_path / "student.onnx")
    assert export.onnx_export_info(path)["distillery.exporter"] == "dynamo"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    batch = _batch(teacher.tokenizer)
    got = session.run(None, {n: batch[n].numpy() for n in names})[0]
    with torch.no_grad():
        expected = student.eval()(**batch).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore")  # the TorchScript exporter's deprecation and tracer notes
def test_embedding_student_exports_to_onnx(models, tmp_path):
    _, folder = _sentence_transformer(models, "st-export", "mean", True, True)
    runtime = hf.load_huggingface(folder, device=CPU, work_dir=tmp_path)
    student = hf.build_hf_encoder(
        StudentSpec(num_layers=1, compression=None), _context(runtime, task="embedding")
    )
    assert student.config["normalize"] and student.config["output_dim"] == 16
    with torch.no_grad():
        norms = student(**_batch(runtime.tokenizer)).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    _export_and_compare(student, runtime.tokenizer, tmp_path / "student.onnx")
