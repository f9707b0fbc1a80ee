"""Linear bridges over the teacher layers a student skips, fitted in closed form.

A student seeded with teacher layers [0, 5] of six feeds layer 5 what layer 0
gives out, where the teacher fed it what layer 4 gave out: untrained, such a
student's all-MiniLM-L6-v2 embeddings have mean cosine 0.39 to the teacher's on
held-out sentences. A linear map from the first to the second, fitted by ridge
regression on the teacher's token states over transfer-set sentences (no
gradient step, a few seconds), brings that to 0.76 with factorised word
embeddings, and training goes on from there. Each student layer whose teacher
layer does not follow the previous one's takes its input through a
:class:`LayerBridge`; it costs ``width * (width + 1)`` parameters, counted in
the budget (:func:`bridge_parameters`). A one-layer student keeps the teacher's
last layer, fed the embeddings' output through a bridge: untrained, 0.76 for
all-MiniLM-L6-v2 (full word embeddings), where its layer 0 alone gives 0.21.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from worker.engine.hf.wrapper import HFEncoder, row_batches

#: Ridge penalty on the bridge's weights, as a share of the mean squared token state.
RIDGE = 1e-3
#: Training rows whose token states the bridges are fitted on, at most.
FIT_ROWS = 1024
#: Rows a teacher pass of the fit takes at once.
FIT_BATCH = 64


class LayerBridge(nn.Module):
    """A transformer layer that takes its input through ``bridge``, a width-to-width Linear.

    Passes every other argument through, so the family's encoder calls it as it calls
    its own layers.
    """

    def __init__(self, layer: nn.Module, width: int) -> None:
        super().__init__()
        self.bridge = nn.Linear(width, width)
        with torch.no_grad():
            self.bridge.weight.copy_(torch.eye(width))
            self.bridge.bias.zero_()
        self.layer = layer

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.layer(self.bridge(hidden_states), *args, **kwargs)


def bridged_layers(chosen: list[int]) -> list[int]:
    """Student layers (indices) whose teacher layer does not follow the previous one's (the
    first layer's "previous" is the embeddings, teacher layer -1)."""
    return [index for index in range(len(chosen)) if chosen[index] - _previous(chosen, index) > 1]


def _previous(chosen: list[int], index: int) -> int:
    """The teacher layer whose output student layer ``index`` is fed: -1 for the embeddings."""
    return chosen[index - 1] if index > 0 else -1


def bridge_parameters(chosen: list[int], width: int) -> int:
    """Parameters the bridges of a student seeded with teacher layers ``chosen`` take."""
    return len(bridged_layers(chosen)) * width * (width + 1)


def insert_bridges(stack: nn.ModuleList, indices: Iterable[int], width: int) -> None:
    """Wrap the layers at ``indices`` of ``stack`` in identity :class:`LayerBridge`\\ s."""
    for index in indices:
        stack[index] = LayerBridge(stack[index], width)


@torch.no_grad()
def fit_bridges(
    stack: nn.ModuleList,
    chosen: list[int],
    teacher: HFEncoder,
    rows: dict[str, Tensor],
    *,
    channels: Tensor | None = None,
) -> int:
    """Fit each bridge of ``stack`` on the teacher's token states over ``rows``.

    Student layer ``k`` (teacher layer ``chosen[k]``) gets the least-squares map, with a
    small ridge penalty, from what teacher layer ``chosen[k - 1]`` (for the first layer, the
    embeddings) gives out to what teacher layer ``chosen[k]`` takes in, over every attended
    token of the first :data:`FIT_ROWS` of ``rows``. The normal equations are summed batch
    by batch, so memory does not grow with the rows. A student cut to some of the teacher's
    ``channels`` (:mod:`~worker.engine.hf.pruning`) is fitted on those channels of the
    token states. Returns the tokens fitted on; with none (or no rows), the bridges stay
    the identity.
    """
    bridges = {
        index: layer.bridge for index, layer in enumerate(stack) if isinstance(layer, LayerBridge)
    }
    if not bridges or "input_ids" not in rows:
        return 0
    indices = list(bridges)
    width = int(bridges[indices[0]].in_features)
    gram = {index: torch.zeros(width + 1, width + 1, dtype=torch.float64) for index in indices}
    cross = {index: torch.zeros(width + 1, width, dtype=torch.float64) for index in indices}
    tokens = 0
    for inputs in row_batches(teacher, rows, FIT_ROWS, FIT_BATCH):
        states = teacher.model(**inputs, output_hidden_states=True).hidden_states
        attended = inputs["attention_mask"].ne(0)
        tokens += int(attended.sum())
        for index in indices:
            # hidden_states[i] is the input of teacher layer i (and the output of i - 1).
            source = states[_previous(chosen, index) + 1][attended].double().cpu()
            target = states[chosen[index]][attended].double().cpu()
            if channels is not None:
                source, target = source[:, channels], target[:, channels]
            source = torch.cat([source, torch.ones(len(source), 1, dtype=torch.float64)], 1)
            gram[index] += source.T @ source
            cross[index] += source.T @ target
    if tokens == 0:
        return 0
    for index in indices:
        set_ridge_solution(bridges[index], gram[index], cross[index], RIDGE)
    return tokens


def set_ridge_solution(linear: nn.Linear, gram: Tensor, cross: Tensor, ridge: float) -> None:
    """Set ``linear`` to the ridge solution of its normal equations.

    ``gram`` is X'X and ``cross`` X'Y for inputs X with a column of ones last (the bias,
    not penalised); the penalty is ``ridge`` times the mean of X'X's diagonal.
    """
    features = linear.in_features
    penalty = torch.eye(features + 1, dtype=gram.dtype)
    penalty[features, features] = 0.0
    scale = ridge * float(gram.diagonal()[:features].mean())
    solution = torch.linalg.solve(gram + scale * penalty, cross)
    linear.weight.copy_(solution[:features].T.to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias.copy_(solution[features].to(linear.bias.dtype))
