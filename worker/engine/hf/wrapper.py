"""HFEncoder: a transformers encoder behind the engine's batch interface.

The same wrapper serves as the teacher's frozen module and as the student, so
both compute their output (logits or pooled embedding) the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.engine.errors import TeacherIncompatible
from worker.engine.hf.families import LAYER_STACKS, Head
from worker.engine.hf.pooling import masked_mean, pool

#: Batch keys a text encoder can take, in the order of :meth:`HFEncoder.forward`.
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

#: Activations a sentence-transformers Dense module may name; anything else is refused.
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "torch.nn.modules.activation.Tanh": nn.Tanh,
    "torch.nn.modules.activation.ReLU": nn.ReLU,
    "torch.nn.modules.activation.GELU": nn.GELU,
    "torch.nn.modules.activation.Sigmoid": nn.Sigmoid,
    "torch.nn.modules.linear.Identity": nn.Identity,
}


class HFEncoder(nn.Module):
    """A transformers encoder behind the engine's batch interface.

    ``forward(input_ids, attention_mask, token_type_ids)`` returns the
    classifier's logits (``head == "classification"``) or the pooled token
    states, passed through the Dense layers and L2-normalised when configured.
    ``feature`` sees the mask-averaged last hidden state (N, hidden) on every
    call: that is the student's hint layer.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        model_type: str,
        head: Head,
        pooling: list[str],
        normalize: bool,
        dense: list[dict[str, Any]],
        input_names: list[str],
    ) -> None:
        super().__init__()
        self.model = model
        self.model_type = model_type
        self.head = head
        self.pooling = list(pooling)
        self.normalize = normalize
        self.dense_config = [dict(layer) for layer in dense]
        self.dense = nn.ModuleList(
            nn.Sequential(
                nn.Linear(
                    layer["in_features"], layer["out_features"], bias=layer.get("bias", True)
                ),
                _activation(layer.get("activation_function")),
            )
            for layer in dense
        )
        self.feature = nn.Identity()
        # A frozen teacher skips the feature (and, for classifiers, all hidden states).
        self.emit_features = True
        self.input_names = [name for name in TEXT_INPUTS if name in input_names]
        # The student contract: rebuildable config, hint layer and its width.
        self.config: dict[str, Any] = {}
        self.hint_layer = "feature"
        self.feature_dim = self.hidden_size

    @property
    def hf_config(self) -> Any:
        """The wrapped model's transformers config."""
        return self.model.config

    @property
    def hidden_size(self) -> int:
        """Width of the token states (and of ``feature``)."""
        return int(self.hf_config.hidden_size)

    @property
    def output_dim(self) -> int:
        """Width of ``forward``'s output: labels, or the pooled (and projected) embedding."""
        if self.head == "classification":
            return int(self.hf_config.num_labels)
        if self.dense_config:
            return int(self.dense_config[-1]["out_features"])
        return self.hidden_size * len(self.pooling)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        """Logits or the pooled embedding (N, output_dim), float32."""
        inputs = self.model_inputs(
            input_ids,
            attention_mask,
            token_type_ids,
            trim=self.training or not self.emit_features,
        )
        attention_mask = inputs["attention_mask"]
        if self.head == "classification":
            outputs = self.model(**inputs, output_hidden_states=self.emit_features)
            if self.emit_features:
                self.feature(masked_mean(outputs.hidden_states[-1], attention_mask))
            return outputs.logits.float()
        # Pool in fp32: bf16 sums over long sequences lose the precision cosine losses need.
        hidden = self.model(**inputs).last_hidden_state.float()
        if self.emit_features:
            self.feature(masked_mean(hidden, attention_mask))
        pooled = pool(hidden, attention_mask, self.pooling)
        for layer in self.dense:
            pooled = layer(pooled)
        if self.normalize:
            pooled = F.normalize(pooled, p=2.0, dim=-1)
        return pooled.float()

    def model_inputs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        token_type_ids: Tensor | None,
        *,
        trim: bool,
    ) -> dict[str, Tensor]:
        """The wrapped model's keyword inputs: a mask of ones where none is given, token
        types only where this encoder takes them, and, with ``trim``, the trailing columns
        no row attends to dropped (:func:`trim_padding`)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if trim:
            input_ids, attention_mask, token_type_ids = trim_padding(
                input_ids, attention_mask, token_type_ids
            )
        inputs: dict[str, Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and "token_type_ids" in self.input_names:
            inputs["token_type_ids"] = token_type_ids
        return inputs

    def layer_stack(self) -> str:
        """Dotted name (within this module) of the transformer's list of layers."""
        prefix = "model."
        base = self.model.base_model
        if base is not self.model:
            prefix += f"{self.model.base_model_prefix}."
        return prefix + LAYER_STACKS[self.model_type]

    def layer_names(self) -> list[str]:
        """Dotted names of the encoder layers, first to last."""
        stack = self.get_submodule(self.layer_stack())
        return [f"{self.layer_stack()}.{index}" for index in range(len(stack))]  # type: ignore[arg-type]


def row_batches(
    encoder: HFEncoder, rows: dict[str, Tensor], limit: int, size: int
) -> Iterator[dict[str, Tensor]]:
    """The first ``limit`` of ``rows``, ``size`` at a time, as ``encoder``'s model inputs on
    its device (padding columns no row attends to trimmed)."""
    device = next(encoder.parameters()).device
    limit = min(len(rows.get("input_ids", ())), limit)
    for start in range(0, limit, size):
        batch = {
            name: value[start : min(start + size, limit)].to(device) for name, value in rows.items()
        }
        yield encoder.model_inputs(
            batch["input_ids"],
            batch.get("attention_mask"),
            batch.get("token_type_ids"),
            trim=True,
        )


def trim_padding(
    input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The batch without its trailing columns that no row attends to.

    A transfer set is tokenised to ``data.max_length`` while most sentences are
    far shorter; those columns are masked out of attention and pooling alike, so
    dropping them changes no output and saves most of a training step. Used in
    training and by the frozen teacher only: the exported student keeps a plain
    graph (no data-dependent shapes) and takes any padding.
    """
    used = attention_mask.ne(0).any(dim=0)
    if bool(used.all()):
        return input_ids, attention_mask, token_type_ids
    length = int(used.nonzero().max()) + 1 if bool(used.any()) else 1
    return (
        input_ids[:, :length],
        attention_mask[:, :length],
        token_type_ids[:, :length] if token_type_ids is not None else None,
    )


def _activation(name: str | None) -> nn.Module:
    """The activation a Dense config names by class path, from the allowlist only."""
    if name is None:
        # sentence-transformers' Dense default.
        return nn.Tanh()
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        known = ", ".join(sorted(_ACTIVATIONS))
        raise TeacherIncompatible(
            f"Dense activation {name!r} is not supported; known: {known}"
        ) from None
