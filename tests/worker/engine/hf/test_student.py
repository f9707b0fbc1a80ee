"""The hf_encoder student: seeded from teacher layers, sized to a budget, rebuilt, exported."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.worker.engine.hf.factories import (
    SENTENCES,
    build_student,
    export_and_compare,
    load_on_cpu,
    sentence_transformer,
    student_context,
    text_batch,
)
from worker.engine.errors import SpecInvalid
from worker.engine.hf.runtime import HuggingFaceTeacher
from worker.engine.hf.wrapper import HFEncoder
from worker.engine.spec import StudentSpec
from worker.engine.students import StudentContext, rebuild_student

TWO_LAYERS = StudentSpec(num_layers=2, compression=None)


def _parameter_count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def test_student_takes_evenly_spaced_teacher_layers(teacher: HuggingFaceTeacher) -> None:
    student = build_student(TWO_LAYERS, student_context(teacher))
    assert student.config["initialised_from_teacher_layers"] == [0, 3]
    assert _parameter_count(student) < teacher.signature.parameters
    teacher_state = teacher.module.state_dict()
    student_state = student.state_dict()
    # Teacher layers 1 and 2 are skipped: student layer 1 takes its input through a bridge.
    assert student.config["bridges"] == [1]
    for student_index, teacher_index in enumerate([0, 3]):
        prefix = f"model.bert.encoder.layer.{student_index}."
        if student_index == 1:
            prefix += "layer."
        keys = [key for key in student_state if key.startswith(prefix)]
        assert keys
        for key in keys:
            teacher_key = key.replace(prefix, f"model.bert.encoder.layer.{teacher_index}.")
            assert torch.equal(student_state[key], teacher_state[teacher_key]), key
    for key in ("model.bert.embeddings.word_embeddings.weight", "model.classifier.weight"):
        assert torch.equal(student_state[key], teacher_state[key])
    assert student.hint_layer == "feature" and student.feature_dim == 32

    batch = text_batch(teacher.tokenizer)
    captured: list[torch.Tensor] = []
    handle = student.get_submodule(student.hint_layer).register_forward_hook(
        lambda _module, _args, feature: captured.append(feature)
    )
    outputs = student(**batch)
    handle.remove()
    assert outputs.shape == (len(SENTENCES), 3)
    assert captured[0].shape == (len(SENTENCES), 32)


def test_student_config_rebuilds_without_teacher(teacher: HuggingFaceTeacher) -> None:
    student = build_student(TWO_LAYERS, student_context(teacher))
    config = json.loads(json.dumps(student.config))
    assert config["architecture"] == "hf_encoder"
    rebuilt = rebuild_student(config)
    assert isinstance(rebuilt, HFEncoder)
    assert {key: value.shape for key, value in rebuilt.state_dict().items()} == {
        key: value.shape for key, value in student.state_dict().items()
    }
    rebuilt.load_state_dict(student.state_dict())
    batch = text_batch(teacher.tokenizer)
    student.eval(), rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(**batch), student(**batch))


def test_student_trains_with_the_specs_dropout_not_the_teachers(
    teacher: HuggingFaceTeacher,
) -> None:
    # The tiny teacher was built with transformers' default rates (0.1).
    assert teacher.module.hf_config.hidden_dropout_prob > 0
    batch = text_batch(teacher.tokenizer)
    for rate in (0.0, 0.5):
        student = build_student(
            TWO_LAYERS.model_copy(update={"dropout": rate}), student_context(teacher)
        )
        config = student.config["hf_config"]
        assert config["hidden_dropout_prob"] == config["attention_probs_dropout_prob"] == rate
        student.train()
        torch.manual_seed(0)
        first = student(**batch)
        second = student(**batch)
        # In training mode, two passes differ only where units are dropped.
        assert torch.equal(first, second) == (rate == 0.0)
        rebuilt = rebuild_student(json.loads(json.dumps(student.config)))
        assert isinstance(rebuilt, HFEncoder)
        assert rebuilt.hf_config.hidden_dropout_prob == rate


def test_student_size_follows_the_budget(teacher: HuggingFaceTeacher) -> None:
    context = student_context(teacher)
    # Fewer layers at the teacher's width meet a mild compression.
    mild = build_student(StudentSpec(compression=1.3), context)
    assert mild.config["hf_config"]["hidden_size"] == 32
    assert mild.config["initialised_from_teacher_layers"] is not None
    # A stronger one needs a narrower model, cut from the teacher's layers.
    strong = build_student(StudentSpec(compression=2.5), context)
    assert strong.config["hf_config"]["hidden_size"] < 32
    assert strong.config["initialised_from_teacher_layers"] is not None
    assert _parameter_count(strong) <= teacher.signature.parameters / 2.5
    # Stronger still, even one head's width cut from the teacher leaves no room for word
    # embeddings of rank 16: the student starts from scratch.
    scratch = build_student(StudentSpec(compression=6), context)
    assert scratch.config["initialised_from_teacher_layers"] is None
    assert _parameter_count(scratch) <= teacher.signature.parameters / 6
    with pytest.raises(SpecInvalid) as error:
        build_student(StudentSpec(compression=1000), context)
    assert error.value.field == "student.compression"


def _rebuildexport_and_compare(student: HFEncoder, tokenizer: Any, path: Path) -> None:
    """The student rebuilt from its config alone gives its outputs, and so does its export."""
    rebuilt = rebuild_student(json.loads(json.dumps(student.config)))
    rebuilt.load_state_dict(student.state_dict())
    batch = text_batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(**batch), student.eval()(**batch))
    export_and_compare(student, tokenizer, path)


def test_classifier_student_exports_through_the_engine_exporter(
    teacher: HuggingFaceTeacher, tmp_path: Path
) -> None:
    import onnxruntime as ort

    from worker.engine import export

    student = build_student(TWO_LAYERS, student_context(teacher))
    example = text_batch(teacher.tokenizer, ["the cat sat on the mat", "the dog sat on a mat"])
    path = export.export_onnx(student, example, tmp_path / "student.onnx")
    assert export.onnx_export_info(path)["distillery.exporter"] == "dynamo"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [graph_input.name for graph_input in session.get_inputs()]
    batch = text_batch(teacher.tokenizer)
    exported = session.run(None, {name: batch[name].numpy() for name in names})[0]
    with torch.no_grad():
        expected = student.eval()(**batch).numpy()
    np.testing.assert_allclose(exported, expected, atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore")  # the TorchScript exporter's deprecation and tracer notes
def test_embedding_student_exports_to_onnx(models: dict[str, Any], tmp_path: Path) -> None:
    _, folder = sentence_transformer(models, "st-export", "mean", True, True)
    runtime = load_on_cpu(folder, tmp_path)
    student = build_student(
        StudentSpec(num_layers=1, compression=None), student_context(runtime, task="embedding")
    )
    assert student.config["normalize"] and student.config["output_dim"] == 16
    with torch.no_grad():
        norms = student(**text_batch(runtime.tokenizer)).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    export_and_compare(student, runtime.tokenizer, tmp_path / "student.onnx")


def _minilm_config() -> Any:
    """all-MiniLM-L6-v2's shape: 6 layers, 384 wide, 12 heads, a 30,522-token vocabulary."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
    )


def test_factorised_embedding_is_exact_for_frequent_tokens() -> None:
    from worker.engine.hf.embeddings import FactorisedEmbedding, factorised_parameters

    torch.manual_seed(0)
    table = torch.randn(200, 16)
    counts = torch.zeros(200, dtype=torch.int64)
    counts[:30] = torch.arange(30, 0, -1)
    embedding = FactorisedEmbedding(200, 4, 16, 10)
    embedding.initialise(table, counts)
    assert _parameter_count(embedding) == factorised_parameters(200, 16, 4, 10)
    ids = torch.arange(200).view(2, 100)
    with torch.no_grad():
        rows = embedding(ids).view(200, 16)
        torch.testing.assert_close(rows[:10], table[:10])
        # Every other token keeps its projection on the basis the weighted SVD chose.
        basis = embedding.projection.weight.T
        torch.testing.assert_close(rows[10:], table[10:] @ basis.T @ basis, atol=1e-5, rtol=0)
        torch.testing.assert_close(embedding.weight, rows)


def test_minilm_sized_student_keeps_width_and_factorises_embeddings() -> None:
    from worker.engine.hf.embeddings import factorised_parameters
    from worker.engine.hf.sizing import choose_factorised_size, choose_size

    config = _minilm_config()
    teacher_parameters = 22_713_216
    spec = StudentSpec(compression=4)
    # Full embeddings at the teacher's width do not fit: the plain sizing narrows the model.
    assert choose_size(spec, config, "base", teacher_parameters, 0)[1] < 384
    size = choose_factorised_size(spec, config, "base", teacher_parameters, 0, used_tokens=5000)
    assert size is not None
    rank, frequent = size.rank, size.frequent_tokens
    assert size.layers == 2 and rank >= 16 and 0 < frequent <= 5000
    # Two whole layers fit: their feed-forward layers are the teacher's.
    assert size.feed_forward == 1536
    # Two layers, position and token-type embeddings, their LayerNorm, and the bridge over
    # the four teacher layers left out.
    rest = 2 * 1_774_464 + 512 * 384 + 2 * 384 + 2 * 384 + 384 * 385
    assert rest + factorised_parameters(30522, 384, rank, frequent) <= teacher_parameters / 4
    assert (
        choose_factorised_size(
            StudentSpec(compression=20), config, "base", teacher_parameters, 0, 5000
        )
        is None
    )


def test_vocabulary_cut_keeps_the_teachers_rows_of_used_tokens() -> None:
    from worker.engine.hf.embeddings import VocabularyCut, cut_parameters

    torch.manual_seed(0)
    table = torch.randn(50, 8)
    counts = torch.zeros(50, dtype=torch.int64)
    counts[[3, 7, 11]] = torch.tensor([5, 9, 1])
    cut = VocabularyCut(50, 8, 3)
    cut.initialise(table, counts)
    assert _parameter_count(cut) == cut_parameters(8, 3) == 32
    with torch.no_grad():
        ids = torch.tensor([[3, 7], [11, 3]])
        torch.testing.assert_close(cut(ids), table[ids])
        others = [index for index in range(50) if index not in (3, 7, 11)]
        shared = table[others].mean(0)
        # Every id still has a row: the unused ones share the mean of their teacher rows.
        torch.testing.assert_close(cut(torch.tensor([0, 49])), torch.stack([shared, shared]))
        torch.testing.assert_close(cut.weight[[3, 7, 11]], table[[3, 7, 11]])


def test_a_student_with_the_transfer_sets_vocabulary_exports_and_rebuilds(
    teacher: HuggingFaceTeacher, tmp_path: Path
) -> None:
    from worker.engine.hf.embeddings import VocabularyCut
    from worker.engine.hf.student import input_embeddings

    batch = text_batch(teacher.tokenizer)
    ids = batch["input_ids"][batch["attention_mask"] > 0]
    counts = np.bincount(ids.numpy(), minlength=len(teacher.tokenizer))
    context = student_context(teacher)
    context.token_counts = counts
    spec = StudentSpec(num_layers=2, compression=None, vocabulary="transfer")
    student = build_student(spec, context)
    used = int((counts > 0).sum())
    assert student.config["word_embeddings"] == {"kind": "cut", "kept_tokens": used}
    embeddings = input_embeddings(student.model)
    assert isinstance(embeddings, VocabularyCut)
    # Far fewer parameters than the teacher's table, and the layers are the teacher's.
    table = input_embeddings(teacher.module.model).get_parameter("weight")
    assert _parameter_count(embeddings) == (used + 1) * table.shape[1] < table.numel()
    assert student.config["initialised_from_teacher_layers"] == [0, 3]
    # On the transfer set's own tokens the cut student is the 2-layer student with full rows.
    full = build_student(StudentSpec(num_layers=2, compression=None), student_context(teacher))
    with torch.no_grad():
        torch.testing.assert_close(student.eval()(**batch), full.eval()(**batch))
    rebuilt = rebuild_student(json.loads(json.dumps(student.config)))
    rebuilt.load_state_dict(student.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(**batch), student(**batch))
    export_and_compare(student, teacher.tokenizer, tmp_path / "cut.onnx")


def test_the_transfer_sets_vocabulary_leaves_the_budget_to_layers() -> None:
    from worker.engine.hf.sizing import choose_cut_depth

    config = _minilm_config()
    teacher_parameters = 22_713_216
    spec = StudentSpec(compression=4, vocabulary="transfer")
    # The 30,522-row table alone is over half the budget: 4,000 used tokens leave room for
    # two full layers and the bridge over the four between them, 8,000 for one. Three
    # layers would need two bridges, which no cut table leaves room for.
    assert choose_cut_depth(spec, config, "base", teacher_parameters, 0, 300) == 2
    assert choose_cut_depth(spec, config, "base", teacher_parameters, 0, 4000) == 2
    assert choose_cut_depth(spec, config, "base", teacher_parameters, 0, 8000) == 1
    with pytest.raises(SpecInvalid) as raised:
        choose_cut_depth(
            StudentSpec(compression=20, vocabulary="transfer"),
            config,
            "base",
            teacher_parameters,
            0,
            8000,
        )
    assert raised.value.field == "student.compression"


def test_the_largest_compression_that_starts_from_the_teacher_is_the_factorised_limit() -> None:
    from worker.engine.hf.sizing import choose_factorised_size, largest_compression_from_teacher

    config = _minilm_config()
    teacher_parameters = 22_713_216
    largest = largest_compression_from_teacher(config, "base", teacher_parameters, 0, 5000)

    def design(compression: float) -> Any:
        spec = StudentSpec(compression=compression)
        return choose_factorised_size(spec, config, "base", teacher_parameters, 0, 5000)

    # all-MiniLM-L6-v2 at the default compression of 10 starts from its last layer (behind
    # a bridge from the embeddings), whose feed-forward layer keeps the least share of its
    # units allowed, half the width.
    at_default = design(10)
    assert at_default is not None and at_default.layers == 1
    assert at_default.feed_forward == 192
    # Past that, the frequent-token rows give way until the rank would fall below 16.
    assert 14 < largest < 15
    at_largest = design(largest)
    assert at_largest is not None and at_largest.feed_forward == 192
    assert at_largest.rank == 16 and at_largest.frequent_tokens < at_default.frequent_tokens
    assert design(largest + 0.1) is None
    # Up to 6x the teacher's whole last layer fits, and it is kept whole.
    assert design(6).feed_forward == 1536 and design(8).feed_forward < 1536
    # Past that, one layer keeps most of its units rather than two layers fewer each: at
    # 7x two would keep 304 units each.
    assert design(7).layers == 1 and 1000 < design(7).feed_forward < 1536


def test_pruned_feed_forward_units_are_those_that_carry_the_output() -> None:
    from worker.engine.hf.student import _prune_feed_forward

    torch.manual_seed(0)
    w_in, b_in, w_out = torch.randn(8, 4), torch.randn(8), torch.randn(4, 8)
    # Three units write nothing to the layer's output: pruning them changes nothing.
    w_out[:, [1, 5, 6]] = 0
    teacher = {"in.weight": w_in, "in.bias": b_in, "out.weight": w_out}
    student = {"in.weight": w_in[:5], "in.bias": b_in[:5], "out.weight": w_out[:, :5]}
    pruned = _prune_feed_forward(teacher, student)
    assert {key: value.shape for key, value in pruned.items()} == {
        key: value.shape for key, value in student.items()
    }
    # The units kept are the other five, in the teacher's order.
    torch.testing.assert_close(pruned["in.bias"], b_in[[0, 2, 3, 4, 7]])
    x = torch.randn(10, 4)

    def feed_forward(weights: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = torch.nn.functional.gelu(x @ weights["in.weight"].T + weights["in.bias"])
        return hidden @ weights["out.weight"].T

    torch.testing.assert_close(feed_forward(pruned), feed_forward(teacher))


def test_a_budget_below_a_whole_layer_prunes_the_teachers_feed_forward_units(
    teacher: HuggingFaceTeacher, tmp_path: Path
) -> None:
    # The tiny teacher's last layer with its 64-unit feed-forward layer, the bridge from
    # the embeddings and the least factorised embeddings take over 27k parameters: the
    # units are pruned, not the width.
    student = build_student(StudentSpec(max_parameters=27_000), student_context(teacher))
    assert _parameter_count(student) <= 27_000
    assert student.config["initialised_from_teacher_layers"] == [3]
    assert student.config["bridges"] == [0]
    assert student.config["hf_config"]["hidden_size"] == 32
    units = student.config["hf_config"]["intermediate_size"]
    assert 16 <= units < 64 and units % 8 == 0
    mine = student.state_dict()
    theirs = teacher.module.state_dict()
    # The student's layer 0 (inside its bridge) is the teacher's layer 3.
    layer, source = "model.bert.encoder.layer.0.layer.", "model.bert.encoder.layer.3."
    w_in = theirs[source + "intermediate.dense.weight"]
    w_out = theirs[source + "output.dense.weight"]
    kept = (w_in.norm(dim=1) * w_out.norm(dim=0)).topk(units).indices.sort().values
    torch.testing.assert_close(mine[layer + "intermediate.dense.weight"], w_in[kept])
    torch.testing.assert_close(
        mine[layer + "intermediate.dense.bias"], theirs[source + "intermediate.dense.bias"][kept]
    )
    torch.testing.assert_close(mine[layer + "output.dense.weight"], w_out[:, kept])
    # Attention is the teacher's whole.
    key = "attention.self.query.weight"
    torch.testing.assert_close(mine[layer + key], theirs[source + key])
    _rebuildexport_and_compare(student, teacher.tokenizer, tmp_path / "pruned.onnx")


def _rows_to_fit_bridges_on(
    teacher: HuggingFaceTeacher, seed: int
) -> tuple[dict[str, torch.Tensor], StudentContext]:
    """48 sentences of the test words, tokenised, and a student context that holds them."""
    words = " ".join(SENTENCES).split()
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 9)))) for _ in range(48)]
    rows = text_batch(teacher.tokenizer, texts)
    context = replace(
        student_context(teacher),
        sample_inputs={name: value.numpy() for name, value in rows.items()},
    )
    return rows, context


def test_a_bridge_over_skipped_layers_is_fitted_to_what_the_next_layer_takes(
    teacher: HuggingFaceTeacher,
) -> None:
    from worker.engine.hf.bridges import LayerBridge

    rows, context = _rows_to_fit_bridges_on(teacher, seed=0)
    student = build_student(TWO_LAYERS, context)
    bridge = student.get_submodule("model.bert.encoder.layer.1")
    assert isinstance(bridge, LayerBridge)
    # It is counted: the student is its two layers and embeddings, and the bridge.
    assert student.config["bridges"] == [1]

    # The bridge maps what teacher layer 0 gives out to what teacher layer 3 takes in
    # (the output of layer 2, which the student lacks) closer than passing it on does.
    with torch.no_grad():
        states = teacher.module.model(**rows, output_hidden_states=True).hidden_states
        attended = rows["attention_mask"].bool()
        source, target = states[1][attended], states[3][attended]
        bridged = bridge.bridge(source)
    assert torch.mean((bridged - target) ** 2) < 0.8 * torch.mean((source - target) ** 2)

    # Without rows to fit on, the bridge passes its input on unchanged.
    unfitted = build_student(TWO_LAYERS, replace(context, sample_inputs=None))
    passed = unfitted.get_submodule("model.bert.encoder.layer.1.bridge")
    assert isinstance(passed, torch.nn.Linear)
    torch.testing.assert_close(passed.weight, torch.eye(32))
    assert not passed.bias.any()


def test_a_one_layer_student_is_the_teachers_last_layer_fed_by_a_bridge_from_the_embeddings(
    teacher: HuggingFaceTeacher, tmp_path: Path
) -> None:
    from worker.engine.hf.bridges import LayerBridge

    rows, context = _rows_to_fit_bridges_on(teacher, seed=1)
    student = build_student(StudentSpec(num_layers=1, compression=None), context)
    assert student.config["initialised_from_teacher_layers"] == [3]
    assert student.config["bridges"] == [0]
    layer = student.get_submodule("model.bert.encoder.layer.0")
    assert isinstance(layer, LayerBridge)

    # The bridge maps what the embeddings give out to what teacher layer 3 takes in (the
    # output of layer 2) closer than passing it on does.
    with torch.no_grad():
        states = teacher.module.model(**rows, output_hidden_states=True).hidden_states
        attended = rows["attention_mask"].bool()
        source, target = states[0][attended], states[3][attended]
        bridged = layer.bridge(source)
    assert torch.mean((bridged - target) ** 2) < 0.8 * torch.mean((source - target) ** 2)
    # The bridge is in the student's config and its exported file.
    _rebuildexport_and_compare(student, teacher.tokenizer, tmp_path / "one_layer.onnx")


def test_the_parts_kept_are_those_that_carry_the_teachers_states(
    teacher: HuggingFaceTeacher,
) -> None:
    import copy

    from worker.engine.hf.pruning import kept_parts, rank_parts

    rows, _ = _rows_to_fit_bridges_on(teacher, seed=3)
    module = copy.deepcopy(teacher.module)
    with torch.no_grad():
        for name, norm in module.named_modules():
            if name.endswith("LayerNorm"):
                # Channels 0 to 15 are zero after every LayerNorm: nothing flows through them.
                norm.weight[:16] = 0
                norm.bias[:16] = 0
        for index in range(4):
            layer = f"{module.layer_stack()}.{index}"
            # Heads 1 and 3 (dims 8-15, 24-31) and units 0 to 31 write nothing out.
            attention = module.get_parameter(f"{layer}.attention.output.dense.weight")
            attention[:, 8:16] = 0
            attention[:, 24:32] = 0
            module.get_parameter(f"{layer}.output.dense.weight")[:, :32] = 0
    channels, dims, units = kept_parts(
        rank_parts(module, rows), [0, 3], width=16, heads=2, units=32, head_dim=8
    )
    assert channels.tolist() == list(range(16, 32))
    for layer_dims, layer_units in zip(dims, units, strict=True):
        assert layer_dims.tolist() == [*range(0, 8), *range(16, 24)]
        assert layer_units.tolist() == list(range(32, 64))
    # Without rows to run, the weights alone rank them, to the same effect.
    channels, dims, units = kept_parts(
        rank_parts(module, {}), [0, 3], width=16, heads=2, units=32, head_dim=8
    )
    assert channels.tolist() == list(range(16, 32))
    assert dims[1].tolist() == [*range(0, 8), *range(16, 24)]
    assert units[1].tolist() == list(range(32, 64))


def test_a_narrower_student_is_cut_from_the_teachers_heads_channels_and_units(
    teacher: HuggingFaceTeacher, tmp_path: Path
) -> None:
    from worker.engine.hf.embeddings import FactorisedEmbedding
    from worker.engine.hf.pruning import kept_parts, rank_parts

    rows, context = _rows_to_fit_bridges_on(teacher, seed=2)
    # No student of the teacher's width fits a third of it: 2 of its 4 heads, 16 wide.
    student = build_student(StudentSpec(compression=3), context)
    assert (student.hf_config.hidden_size, student.hf_config.num_attention_heads) == (16, 2)
    assert student.config["initialised_from_teacher_layers"] == [0, 2, 3]
    assert student.config["bridges"] == [1]
    assert isinstance(
        student.get_submodule("model.bert.embeddings.word_embeddings"), FactorisedEmbedding
    )
    assert _parameter_count(student) <= teacher.signature.parameters / 3

    channels, dims, units = kept_parts(
        rank_parts(teacher.module, rows), [0, 2, 3], width=16, heads=2, units=32, head_dim=8
    )
    mine, theirs = student.state_dict(), teacher.module.state_dict()
    for index, (source, prefix) in enumerate(
        [
            (0, "model.bert.encoder.layer.0."),
            (2, "model.bert.encoder.layer.1.layer."),
            (3, "model.bert.encoder.layer.2."),
        ]
    ):
        teacher_prefix = f"model.bert.encoder.layer.{source}."
        query = theirs[teacher_prefix + "attention.self.query.weight"]
        assert torch.equal(
            mine[prefix + "attention.self.query.weight"], query[dims[index]][:, channels]
        )
        output = theirs[teacher_prefix + "output.dense.weight"]
        assert torch.equal(mine[prefix + "output.dense.weight"], output[channels][:, units[index]])
        norm = theirs[teacher_prefix + "output.LayerNorm.weight"]
        assert torch.equal(mine[prefix + "output.LayerNorm.weight"], norm[channels])
    classifier = theirs["model.classifier.weight"]
    assert torch.equal(mine["model.classifier.weight"], classifier[:, channels])
    positions = theirs["model.bert.embeddings.position_embeddings.weight"]
    assert torch.equal(
        mine["model.bert.embeddings.position_embeddings.weight"], positions[:, channels]
    )

    _rebuildexport_and_compare(student, teacher.tokenizer, tmp_path / "cut.onnx")


def test_a_width_the_spec_asks_for_is_cut_from_the_teacher_when_it_is_whole_heads(
    teacher: HuggingFaceTeacher, tmp_path: Path
) -> None:
    from worker.engine.hf.pruning import kept_parts, rank_parts

    rows, context = _rows_to_fit_bridges_on(teacher, seed=4)
    # 16 wide is two of the teacher's 8-wide heads: cut from its layers, its word embeddings
    # the teacher's table cut to the kept channels (no budget asks them to be factorised).
    student = build_student(StudentSpec(hidden_size=16, num_layers=2, compression=None), context)
    assert (student.hf_config.hidden_size, student.hf_config.num_attention_heads) == (16, 2)
    assert student.config["initialised_from_teacher_layers"] == [0, 3]
    assert student.config["word_embeddings"] is None
    channels, dims, _ = kept_parts(
        rank_parts(teacher.module, rows), [0, 3], width=16, heads=2, units=32, head_dim=8
    )
    mine, theirs = student.state_dict(), teacher.module.state_dict()
    words = "model.bert.embeddings.word_embeddings.weight"
    assert torch.equal(mine[words], theirs[words][:, channels])
    key = "attention.self.value.weight"
    assert torch.equal(
        mine[f"model.bert.encoder.layer.1.layer.{key}"],
        theirs[f"model.bert.encoder.layer.3.{key}"][dims[1]][:, channels],
    )
    _rebuildexport_and_compare(student, teacher.tokenizer, tmp_path / "asked.onnx")
    # Under a budget, the bridge over the skipped layers counts in it.
    budget = _parameter_count(student)
    fitted = build_student(StudentSpec(hidden_size=16, max_parameters=budget), context)
    assert fitted.config["initialised_from_teacher_layers"] is not None
    assert _parameter_count(fitted) <= budget
    # A width that is not whole teacher heads, or a student asked to start from random
    # weights, is not cut.
    for spec in (
        StudentSpec(hidden_size=12, num_layers=2, compression=None),
        StudentSpec(hidden_size=16, num_layers=2, compression=None, init_from_teacher=False),
    ):
        assert build_student(spec, context).config["initialised_from_teacher_layers"] is None


@pytest.mark.parametrize("dense", [False, True], ids=["projection", "dense"])
def test_a_narrower_embedding_student_gives_the_teachers_width_back(
    models: dict[str, Any], tmp_path: Path, dense: bool
) -> None:
    from worker.engine.hf.pruning import fit_projection

    _, folder = sentence_transformer(models, f"st_{dense}", "mean", dense, True)
    teacher = load_on_cpu(folder, tmp_path / "work")
    rows, context = _rows_to_fit_bridges_on(teacher, seed=4)
    context = replace(context, task="embedding")
    student = build_student(StudentSpec(compression=3), context)
    assert student.hf_config.hidden_size < 32
    assert student.config["initialised_from_teacher_layers"] is not None
    projection = student.get_submodule("dense.0.0")
    assert isinstance(projection, torch.nn.Linear)
    assert projection.out_features == (16 if dense else 32)
    width = student.hf_config.hidden_size
    assert projection.in_features == width
    if dense:
        # The teacher's Dense layer keeps the columns of the channels the student kept.
        teacher_dense = teacher.module.get_parameter("dense.0.0.weight")
        columns = [
            column
            for column in range(32)
            if any(torch.equal(teacher_dense[:, column], mine) for mine in projection.weight.T)
        ]
        assert len(columns) == width
    else:
        # The projection was fitted on the rows: fitting it again changes nothing.
        fitted = projection.weight.detach().clone()
        assert fit_projection(student, teacher.module, projection, rows) == len(rows["input_ids"])
        torch.testing.assert_close(projection.weight, fitted)
    export_and_compare(student, teacher.tokenizer, tmp_path / "cut.onnx")


def test_a_narrower_embedding_student_counts_its_projection_in_the_budget(
    models: dict[str, Any], tmp_path: Path
) -> None:
    _, folder = sentence_transformer(models, "st_budget", "mean", False, True)
    teacher = load_on_cpu(folder, tmp_path / "work")
    context = replace(student_context(teacher), task="embedding")
    # An eighth of this teacher is past what a student cut from it fits: 8 wide, from random
    # weights, ending in a projection to the teacher's 32-wide embedding, which the budget
    # counts (it took the student 148 parameters over it when only Dense layers were).
    student = build_student(StudentSpec(compression=8), context)
    assert student.config["initialised_from_teacher_layers"] is None
    assert student.get_submodule("dense.0.0").out_features == 32
    assert _parameter_count(student) <= teacher.signature.parameters / 8
