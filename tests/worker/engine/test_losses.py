"""Distillation losses against values computed independently in numpy (torchdistill style)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from worker.engine.errors import DatasetInvalid, SpecInvalid, TeacherIncompatible
from worker.engine.losses import LOSSES, LabelsOnlyLoss, build_loss, teacher_log_probs
from worker.engine.spec import DistillationSpec

N, K = 6, 5
RNG = np.random.default_rng(1234)
STUDENT = RNG.normal(size=(N, K)).astype(np.float32) * 2
TEACHER = RNG.normal(size=(N, K)).astype(np.float32) * 3
LABELS = np.array([0, 3, 1, 4, 2, 2], dtype=np.int64)


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_kl_batchmean(student: np.ndarray, teacher: np.ndarray, t: float) -> float:
    """KL(teacher_T || student_T) summed over classes, averaged over rows."""
    log_p = np_log_softmax(teacher / t)
    log_q = np_log_softmax(student / t)
    return float((np.exp(log_p) * (log_p - log_q)).sum() / student.shape[0])


def np_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(-np_log_softmax(logits)[np.arange(len(labels)), labels].mean())


def kd_loss(has_labels: bool = True, kind: str = "logits", **method: Any) -> Any:
    spec = job_spec({"name": "kd", **method})
    return build_loss(spec, "classification", kind, has_labels, 8, None)


def job_spec(method: dict[str, Any] | None = None) -> DistillationSpec:
    return DistillationSpec.model_validate({"method": method or {}})


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a)


def test_registry_names() -> None:
    assert LOSSES.names() == ["cosine", "hint", "kd", "mae", "mse"]


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_without_labels_is_full_weight_t2_kl(temperature: float) -> None:
    loss = kd_loss(has_labels=False, temperature=temperature, alpha=0.7)
    terms = loss(t(STUDENT), t(TEACHER))
    assert set(terms) == {"soft"}
    # No labels at all: weight 1, not alpha.
    expected = temperature**2 * np_kl_batchmean(STUDENT, TEACHER, temperature)
    assert terms["soft"].item() == pytest.approx(expected, rel=1e-5)


def test_kd_batchmean_divides_by_rows_not_elements() -> None:
    terms = kd_loss(has_labels=False, temperature=1.0)(t(STUDENT), t(TEACHER))
    log_p, log_q = np_log_softmax(TEACHER), np_log_softmax(STUDENT)
    pointwise = np.exp(log_p) * (log_p - log_q)
    assert terms["soft"].item() == pytest.approx(pointwise.sum() / N, rel=1e-5)
    assert terms["soft"].item() != pytest.approx(pointwise.mean(), rel=1e-2)


def test_kd_with_labels_weights_soft_and_hard() -> None:
    loss = kd_loss(temperature=3.0, alpha=0.6)
    terms = loss(t(STUDENT), t(TEACHER), labels=t(LABELS))
    assert terms["soft"].item() == pytest.approx(
        0.6 * 9.0 * np_kl_batchmean(STUDENT, TEACHER, 3.0), rel=1e-5
    )
    assert terms["hard"].item() == pytest.approx(0.4 * np_cross_entropy(STUDENT, LABELS), rel=1e-5)


def test_kd_partial_labels_average_over_labeled_rows() -> None:
    labels = LABELS.copy()
    labels[[1, 4]] = -1
    terms = kd_loss(alpha=0.5)(t(STUDENT), t(TEACHER), labels=t(labels))
    keep = labels >= 0
    expected = 0.5 * np_cross_entropy(STUDENT[keep], labels[keep])
    assert terms["hard"].item() == pytest.approx(expected, rel=1e-5)


def test_kd_batch_without_labeled_rows_omits_hard_term() -> None:
    labels = np.full(N, -1, dtype=np.int64)
    terms = kd_loss(alpha=0.5, temperature=2.0)(t(STUDENT), t(TEACHER), labels=t(labels))
    assert set(terms) == {"soft"}
    # The dataset has labels, so the soft weight stays alpha from batch to batch.
    expected = 0.5 * 4.0 * np_kl_batchmean(STUDENT, TEACHER, 2.0)
    assert terms["soft"].item() == pytest.approx(expected, rel=1e-5)


def test_kd_labels_none_gives_soft_full_weight() -> None:
    terms = kd_loss(alpha=0.5, temperature=2.0)(t(STUDENT), t(TEACHER), labels=None)
    assert terms["soft"].item() == pytest.approx(
        4.0 * np_kl_batchmean(STUDENT, TEACHER, 2.0), rel=1e-5
    )


def test_without_teacher_outputs_only_labels_train() -> None:
    # Baseline training on labels alone: no teacher, cross-entropy at full weight.
    terms = kd_loss(alpha=0.9)(t(STUDENT), None, labels=t(LABELS))
    assert set(terms) == {"hard"}
    assert terms["hard"].item() == pytest.approx(np_cross_entropy(STUDENT, LABELS), rel=1e-5)


def test_t_squared_keeps_gradient_size_across_temperatures() -> None:
    small = torch.from_numpy(STUDENT * 0.25)
    teacher = torch.from_numpy(TEACHER * 0.25)
    norms = []
    for temperature in (2.0, 4.0, 8.0):
        s = small.clone().requires_grad_(True)
        kd_loss(has_labels=False, temperature=temperature)(s, teacher)["soft"].backward()
        assert s.grad is not None
        norms.append(s.grad.norm().item())
    # Without T² the norms would shrink by ~T² (16x from T=2 to T=8).
    assert max(norms) / min(norms) < 1.5


def test_teacher_log_probs_logits() -> None:
    out = teacher_log_probs(t(TEACHER), "logits", 4.0)
    np.testing.assert_allclose(out.numpy(), np_log_softmax(TEACHER / 4.0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_probability_teacher_matches_equivalent_logits_teacher(temperature: float) -> None:
    probs = np.exp(np_log_softmax(TEACHER)).astype(np.float32)
    from_probs = teacher_log_probs(t(probs), "probabilities", temperature)
    np.testing.assert_allclose(
        from_probs.numpy(), np_log_softmax(TEACHER / temperature), rtol=1e-4, atol=1e-5
    )
    loss_p = kd_loss(has_labels=False, kind="probabilities", temperature=temperature)
    loss_z = kd_loss(has_labels=False, kind="logits", temperature=temperature)
    assert loss_p(t(STUDENT), t(probs))["soft"].item() == pytest.approx(
        loss_z(t(STUDENT), t(TEACHER))["soft"].item(), rel=1e-4
    )
    # Softmaxing probabilities as if they were logits would flatten them: not this.
    wrong = np_log_softmax(probs / temperature)
    assert not np.allclose(from_probs.numpy(), wrong, atol=1e-2)


def test_auto_temperature_takes_probabilities_as_they_are_and_tempers_logits() -> None:
    probs = np.exp(np_log_softmax(TEACHER)).astype(np.float32)
    for kind, teacher, expected in (("probabilities", probs, 1.0), ("logits", TEACHER, 4.0)):
        loss = kd_loss(has_labels=False, kind=kind)  # the default: temperature "auto"
        assert loss.parts[0].temperature == expected, kind
        want = expected**2 * np_kl_batchmean(STUDENT, TEACHER, expected)
        assert loss(t(STUDENT), t(teacher))["soft"].item() == pytest.approx(want, rel=1e-4)
    # A number is kept whatever the teacher gives.
    fixed = kd_loss(has_labels=False, kind="probabilities", temperature=3.0)
    assert fixed.parts[0].temperature == 3.0
    assert DistillationSpec.model_validate({"method": {"temperature": 2}}).method.temperature == 2


def test_probability_teacher_with_zero_probabilities_stays_finite() -> None:
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    out = teacher_log_probs(probs, "probabilities", 2.0)
    assert torch.isfinite(out).all()
    student = torch.zeros(2, 3)
    assert torch.isfinite(kd_loss(has_labels=False, kind="probabilities")(student, probs)["soft"])


def test_kd_refuses_value_teacher() -> None:
    with pytest.raises(TeacherIncompatible) as err:
        kd_loss(kind="values")
    assert err.value.field == "method.name"


def test_mse_and_mae_match_numpy() -> None:
    for name, distance in (("mse", np.square), ("mae", np.abs)):
        spec = job_spec({"name": name})
        loss = build_loss(spec, "regression", "values", False, 8, None)
        terms = loss(t(STUDENT), t(TEACHER))
        assert set(terms) == {name}
        expected = float(distance(STUDENT.astype(np.float64) - TEACHER).mean())
        assert terms[name].item() == pytest.approx(expected, rel=1e-5)


def test_regression_labels_add_weighted_hard_term_over_labeled_rows() -> None:
    student = STUDENT[:, :1]
    teacher = TEACHER[:, :1]
    labels = RNG.normal(size=N).astype(np.float32)
    labels[2] = np.nan  # unlabeled row
    spec = job_spec({"name": "mse", "alpha": 0.75})
    terms = build_loss(spec, "regression", "values", True, 8, None)(
        t(student), t(teacher), labels=t(labels)
    )
    keep = np.isfinite(labels)
    assert terms["mse"].item() == pytest.approx(
        0.75 * float(((student - teacher) ** 2).mean()), rel=1e-5
    )
    assert terms["hard"].item() == pytest.approx(
        0.25 * float(((student[keep, 0] - labels[keep]) ** 2).mean()), rel=1e-5
    )


def test_regression_label_width_must_match_outputs() -> None:
    spec = job_spec({"name": "mse"})
    loss = build_loss(spec, "regression", "values", True, 8, None)
    with pytest.raises(DatasetInvalid):
        loss(t(STUDENT), t(TEACHER), labels=t(TEACHER[:, 0]))


def test_cosine_matches_numpy() -> None:
    spec = job_spec({"name": "cosine"})
    terms = build_loss(spec, "embedding", "embedding", False, 8, None)(t(STUDENT), t(TEACHER))
    s, te = STUDENT.astype(np.float64), TEACHER.astype(np.float64)
    cos = (s * te).sum(1) / (np.linalg.norm(s, axis=1) * np.linalg.norm(te, axis=1))
    assert terms["cosine"].item() == pytest.approx(float((1 - cos).mean()), rel=1e-5)


def test_hint_projection_learns() -> None:
    torch.manual_seed(0)
    spec = job_spec({"name": "kd", "extra_terms": [{"name": "hint"}]})
    loss = build_loss(spec, "classification", "logits", False, 8, 12)
    assert loss.needs_features
    params = list(loss.parameters())
    assert params, "the hint projection must be trainable through loss.parameters()"
    student_feat = torch.randn(64, 8)
    teacher_feat = student_feat @ torch.randn(8, 12)
    optimizer = torch.optim.Adam(params, lr=0.05)

    def hint() -> torch.Tensor:
        terms = loss(
            t(STUDENT), t(TEACHER), student_features=student_feat, teacher_features=teacher_feat
        )
        return terms["hint"]

    first = hint().item()
    for _ in range(300):
        value = hint()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    assert hint().item() < 0.01 * first


def test_hint_without_feature_dims_names_hint_layer() -> None:
    spec = job_spec({"name": "hint"})
    with pytest.raises(SpecInvalid) as err:
        build_loss(spec, "classification", "logits", False, 8, None)
    assert err.value.field == "method.hint_layer"


def test_extra_terms_are_weighted_and_combined() -> None:
    spec = job_spec({"name": "kd", "alpha": 0.5, "extra_terms": [{"name": "hint", "weight": 0.25}]})
    loss = build_loss(spec, "classification", "logits", True, 4, 3)
    sf, tf = torch.randn(N, 4), torch.randn(N, 3)
    terms = loss(t(STUDENT), t(TEACHER), labels=t(LABELS), student_features=sf, teacher_features=tf)
    assert set(terms) == {"soft", "hard", "hint"}
    hint_part: Any = loss.parts[1]
    expected = 0.25 * torch.nn.functional.mse_loss(hint_part.projection(sf), tf)
    assert terms["hint"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_main_hint_also_trains_the_outputs() -> None:
    spec = job_spec({"name": "hint"})
    loss = build_loss(spec, "classification", "logits", False, 4, 3)
    sf, tf = torch.randn(N, 4), torch.randn(N, 3)
    terms = loss(t(STUDENT), t(TEACHER), student_features=sf, teacher_features=tf)
    assert set(terms) == {"hint", "soft"}


def test_repeated_terms_are_refused() -> None:
    spec = job_spec({"name": "kd", "extra_terms": [{"name": "kd"}]})
    with pytest.raises(SpecInvalid) as err:
        build_loss(spec, "classification", "logits", False, 4, None)
    assert err.value.field == "method.extra_terms"


def test_method_must_fit_inferred_task() -> None:
    with pytest.raises(SpecInvalid):
        build_loss(job_spec({"name": "mse"}), "classification", "logits", False, 4, None)


def test_default_methods_per_task() -> None:
    assert set(
        build_loss(job_spec(), "classification", "logits", False, 4, None)(t(STUDENT), t(TEACHER))
    ) == {"soft"}
    assert set(
        build_loss(job_spec(), "regression", "values", False, 4, None)(t(STUDENT), t(TEACHER))
    ) == {"mse"}
    assert set(
        build_loss(job_spec(), "embedding", "embedding", False, 4, None)(t(STUDENT), t(TEACHER))
    ) == {"cosine"}


@pytest.mark.parametrize(
    ("method", "task", "kind"),
    [
        ({"name": "kd", "extra_terms": [{"name": "hint"}]}, "classification", "logits"),
        ({"name": "kd"}, "classification", "probabilities"),
        ({"name": "mse"}, "regression", "values"),
        ({"name": "mae"}, "regression", "values"),
        ({"name": "cosine"}, "embedding", "embedding"),
    ],
)
def test_losses_are_fp32_under_bf16_autocast(method: dict[str, Any], task: str, kind: str) -> None:
    loss = build_loss(job_spec(method), task, kind, True, 4, 3)
    width = 1 if task == "regression" else K
    student = t(STUDENT[:, :width]).to(torch.bfloat16)
    teacher_np = TEACHER[:, :width]
    if kind == "probabilities":
        teacher_np = np.exp(np_log_softmax(TEACHER)).astype(np.float32)
    teacher = t(teacher_np).to(torch.bfloat16)
    labels = t(LABELS) if task == "classification" else t(TEACHER[:, 0])
    features = {
        "student_features": torch.randn(N, 4, dtype=torch.bfloat16),
        "teacher_features": torch.randn(N, 3, dtype=torch.bfloat16),
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = loss(student, teacher, labels=labels, **features)
    assert terms
    for name, value in terms.items():
        assert value.dtype == torch.float32, name
    # Same value as an fp32 computation on the same (bf16-rounded) inputs.
    ref = loss(
        student.float(),
        teacher.float(),
        labels=labels,
        **{k: v.float() for k, v in features.items()},
    )
    for name, value in terms.items():
        assert value.item() == pytest.approx(ref[name].item(), rel=1e-5), name


def test_labels_only_loss_ignores_unlabeled_rows_and_fits_regression_targets() -> None:
    out = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, -1])
    hard = LabelsOnlyLoss("classification")(out, None, labels=labels)["hard"]
    expected = torch.nn.functional.cross_entropy(out[:2], labels[:2])
    torch.testing.assert_close(hard, expected)
    targets = torch.tensor([[1.0], [2.0], [3.0]])
    regression = LabelsOnlyLoss("regression")(targets + 1, None, labels=targets.reshape(-1))
    torch.testing.assert_close(regression["hard"], torch.tensor(1.0))
