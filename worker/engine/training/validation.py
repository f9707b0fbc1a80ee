"""How the loop judges the student between epochs: its fidelity on the validation split."""

from __future__ import annotations

import torch
from torch import nn

from worker.engine.losses import teacher_log_probs
from worker.engine.training.devices import Batch, autocast, iter_batches


@torch.no_grad()
def predict(
    module: nn.Module, tensors: Batch, batch_size: int, amp_dtype: torch.dtype | None
) -> torch.Tensor:
    """Run ``module`` over ``tensors`` in batches, in eval mode; float32 outputs."""
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    outputs = []
    for _, batch in iter_batches(tensors, batch_size):
        batch = {name: value.to(device, non_blocking=True) for name, value in batch.items()}
        with autocast(device, amp_dtype):
            outputs.append(module(**batch).float())
    module.train(was_training)
    return torch.cat(outputs)


#: What ``score`` is, by task: a checkpoint records it beside the best score, so a run
#: resumed from one written under another basis scores its best weights again.
SCORE_BASIS = {
    "classification": "-val/kl_divergence",
    "embedding": "val/cosine",
    "regression": "-val/output_mse",
}


def validation_score(
    student_outputs: torch.Tensor,
    teacher_outputs: torch.Tensor,
    task: str,
    teacher_output_kind: str = "logits",
) -> dict[str, float]:
    """Validation fidelity by task, plus ``score``: higher is better.

    Classification is scored on the KL divergence from the teacher's probabilities (read
    as ``teacher_output_kind`` says) to the student's, at T = 1; agreement is reported
    beside it. Agreement on a small validation split moves a row at a time (one row is
    2.5% of 40) and can peak by chance within a few epochs, so choosing the best step on
    it kept barely trained students; the divergence moves with every row's probabilities.
    """
    student = student_outputs.float()
    teacher = teacher_outputs.float()
    if task == "classification":
        agreement = (student.argmax(-1) == teacher.argmax(-1)).float().mean().item()
        student_log = nn.functional.log_softmax(student, dim=-1)
        teacher_log = teacher_log_probs(teacher, teacher_output_kind, 1.0)
        kl = nn.functional.kl_div(
            student_log, teacher_log, reduction="batchmean", log_target=True
        ).item()
        return {"val/agreement": agreement, "val/kl_divergence": kl, "score": -kl}
    if task == "embedding":
        cosine = nn.functional.cosine_similarity(student, teacher, dim=-1).mean().item()
        return {"val/cosine": cosine, "score": cosine}
    mse = ((student - teacher) ** 2).mean().item()
    return {"val/output_mse": mse, "score": -mse}
