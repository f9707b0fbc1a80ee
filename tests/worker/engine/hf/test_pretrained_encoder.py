"""A real pretrained sentence encoder, distilled 4x through the CLI and scored by hand.

all-MiniLM-L6-v2 (22.7M parameters, half of them word embeddings), zipped as a
user uploads it, distilled with ``student.compression: 4`` and otherwise the
defaults, except that ``training.max_steps`` caps the run so the test stays
short (and, unlike a time cap, trains as many steps on a busy machine as on a free
one); ``bench/encoder_student.py`` runs the same job at full length. See
:mod:`tests.worker.engine.hf.encoder_job` for how the student is scored.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.worker.engine.hf.encoder_job import Scored, run_job, score, split_sentences

HELD_OUT_SENTENCES = 300
TRANSFER_SENTENCES = 1500
#: A cap on the job (teacher pass and training); MAX_STEPS ends the run sooner.
MAX_MINUTES = 10.0
#: Optimizer steps the short run takes (the auto plan wants thousands): 2,048 sentences in
#: batches of 32, the default for text.
MAX_STEPS = 64
#: The held-out cosine a run this short reaches (0.800 on the development machine; 0.759
#: before the student's layers were bridged, see :mod:`worker.engine.hf.bridges`; the full
#: run: see the bench).
MIN_COSINE = 0.77


@pytest.mark.filterwarnings("ignore")  # the TorchScript exporter's deprecation and tracer notes
def test_minilm_distils_to_a_quarter_of_its_parameters(tmp_path: Path) -> None:
    held_out, transfer = split_sentences(HELD_OUT_SENTENCES, TRANSFER_SENTENCES)
    assert not set(held_out) & set(transfer)
    out = run_job(tmp_path, transfer, {"max_minutes": MAX_MINUTES, "max_steps": MAX_STEPS})
    scored = score(out, held_out, tmp_path, baseline_texts=transfer[:1000])
    print(json.dumps(scored.figures()))
    metrics, config = scored.metrics, scored.config

    assert metrics["task"] == "embedding"
    # The design: the teacher's width, its first and last layers, factorised word embeddings.
    assert config["architecture"] == "hf_encoder"
    assert config["hf_config"]["hidden_size"] == 384
    assert config["initialised_from_teacher_layers"] == [0, 5]
    assert config["word_embeddings"]["rank"] >= 16
    # A bridge over the four teacher layers left out, and the smaller step such a start takes.
    assert config["bridges"] == [1]
    assert metrics["training"]["plan"]["learning_rate"] == 3e-4
    # 1,500 sentences are few for a text student, and the run says so (the bench's 21k are not).
    warned = {w["code"]: w["field"] for w in metrics["training"]["plan"]["warnings"]}
    assert warned.get("small_transfer_set") == "dataset_id", warned
    assert "warned before training (small_transfer_set" in (out / "model_card.md").read_text()
    # A drop-in for the teacher's tokenizer output: its names, int64.
    assert set(scored.student_inputs) <= {"input_ids", "attention_mask", "token_type_ids"}
    assert set(scored.student_inputs.values()) == {"tensor(int64)"}

    assert scored.teacher_check > 0.9999
    assert scored.cosine >= MIN_COSINE, scored.figures()
    assert scored.teacher_parameters / scored.student_parameters >= 4
    assert metrics["compression"] >= 4
    assert metrics["student"]["parameters"] == scored.student_parameters
    assert metrics["teacher"]["parameters"] == scored.teacher_parameters
    # The engine's test split is other sentences from the same sources: its figure agrees.
    assert abs(metrics["student"]["cosine"] - scored.cosine) < 0.05
    assert scored.latency_ms["student"] < scored.latency_ms["teacher"], scored.latency_ms
    # The same architecture from random weights, trained as many steps, is far behind.
    assert scored.baseline_cosine is not None
    assert scored.baseline_cosine < scored.cosine - 0.2, scored.figures()


#: Steps of the run at the default compression: its one-layer student trains fast.
DEFAULT_COMPRESSION_STEPS = 256
#: The held-out cosine that run reaches (0.736 on the development machine; 0.632 when a
#: one-layer student was the teacher's first layer, unbridged).
MIN_COSINE_AT_DEFAULT_COMPRESSION = 0.70


@pytest.mark.filterwarnings("ignore")  # the TorchScript exporter's deprecation and tracer notes
def test_minilm_at_the_default_compression_keeps_its_last_layer_behind_a_bridge(
    tmp_path: Path,
) -> None:
    scored = _distil_and_score(tmp_path, compression=None)
    config, metrics = scored.config, scored.metrics

    # A tenth of the teacher leaves room for one layer of its width: its last, fed what the
    # embeddings give out through a bridge fitted to what that layer took in the teacher.
    assert metrics["compression"] >= 10
    assert config["hf_config"]["hidden_size"] == 384
    assert config["initialised_from_teacher_layers"] == [5]
    assert config["bridges"] == [0]
    assert config["word_embeddings"]["rank"] >= 16
    assert scored.teacher_parameters / scored.student_parameters >= 10
    _assert_kept_and_ahead(scored, MIN_COSINE_AT_DEFAULT_COMPRESSION, baseline_behind=0.2)


#: A compression past the largest a student of the teacher's width fits (14.3).
CUT_COMPRESSION = 20.0
#: The held-out cosine the student cut from the teacher reaches in DEFAULT_COMPRESSION_STEPS
#: (0.597 on the development machine; 0.351 for the 32-wide student from random weights
#: that this compression got before students were cut from the teacher).
MIN_COSINE_CUT = 0.55


@pytest.mark.filterwarnings("ignore")  # the TorchScript exporter's deprecation and tracer notes
def test_minilm_past_the_width_limit_is_cut_to_its_most_important_heads_and_channels(
    tmp_path: Path,
) -> None:
    scored = _distil_and_score(tmp_path, compression=CUT_COMPRESSION)
    config = scored.config

    # A twentieth of the teacher has no room for one layer of its width: the student is
    # narrower, whole heads of it, and starts from the teacher's last layer cut to them.
    assert scored.teacher_parameters / scored.student_parameters >= CUT_COMPRESSION
    hf_config = config["hf_config"]
    assert hf_config["hidden_size"] < 384
    assert hf_config["hidden_size"] == 32 * hf_config["num_attention_heads"]
    assert config["initialised_from_teacher_layers"] == [5]
    # The job did not warn that its student starts from random weights.
    assert '"student_from_scratch"' not in (tmp_path / "engine.log").read_text()
    _assert_kept_and_ahead(scored, MIN_COSINE_CUT, baseline_behind=0.15)


def _distil_and_score(tmp_path: Path, compression: float | None) -> Scored:
    """A run of DEFAULT_COMPRESSION_STEPS at ``compression``, scored with a baseline."""
    held_out, transfer = split_sentences(HELD_OUT_SENTENCES, TRANSFER_SENTENCES)
    out = run_job(
        tmp_path,
        transfer,
        {"max_minutes": MAX_MINUTES, "max_steps": DEFAULT_COMPRESSION_STEPS},
        compression=compression,
    )
    scored = score(out, held_out, tmp_path, baseline_texts=transfer[:1000])
    print(json.dumps(scored.figures()))
    return scored


def _assert_kept_and_ahead(scored: Scored, min_cosine: float, baseline_behind: float) -> None:
    """At least ``min_cosine`` held out, as the engine reported, faster than the teacher, and
    ``baseline_behind`` ahead of the same architecture from random weights."""
    assert scored.cosine >= min_cosine, scored.figures()
    assert abs(scored.metrics["student"]["cosine"] - scored.cosine) < 0.05
    assert scored.latency_ms["student"] < scored.latency_ms["teacher"], scored.latency_ms
    # The same architecture from random weights, trained as many steps, is far behind.
    assert scored.baseline_cosine is not None
    assert scored.baseline_cosine < scored.cosine - baseline_behind, scored.figures()
