"""Training: a student learns from teacher outputs.

Teacher outputs are computed once over the transfer set and cached (the
default), or computed every step (``online``). The loop keeps the whole
training set as tensors and draws batches by index from a seeded permutation,
so a run is deterministic on CPU and a resumed run continues exactly where the
interrupted one stopped. Checkpoints are atomic folders of safetensors files
plus a JSON state; nothing is pickled.

The modules, in the order a run meets them:

- ``callbacks``: the hooks a caller gives a run (progress, events, cancellation);
- ``devices``: the device, autocast, tensors and batches;
- ``teacher_outputs``: the teacher's outputs over the transfer set, cached on disk;
- ``batches``: the training set as tensors and the batch of one step;
- ``schedules``: the step plan, the optimizer and the learning-rate schedule;
- ``step``: one optimisation step;
- ``progress``: progress rows and the non-finite loss check;
- ``validation``: batched prediction and the fidelity score between epochs;
- ``checkpoints``: atomic checkpoints and resuming from them;
- ``loop``: :func:`train` and the :class:`Trainer` that runs the epochs.
"""

from worker.engine.training.batches import TrainingData, keep_on_device_if_small
from worker.engine.training.callbacks import Callbacks
from worker.engine.training.checkpoints import (
    LoopState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from worker.engine.training.devices import (
    Batch,
    autocast,
    autocast_dtype,
    iter_batches,
    resolve_device,
    to_tensors,
)
from worker.engine.training.loop import Trainer, TrainResult, plan_for_data, train
from worker.engine.training.schedules import lr_factor, make_optimizer
from worker.engine.training.step import forward_with_features
from worker.engine.training.teacher_outputs import (
    CACHE_VERSION,
    cache_key,
    cached_teacher_outputs,
    compute_teacher_outputs,
)
from worker.engine.training.validation import predict

__all__ = [
    "CACHE_VERSION",
    "Batch",
    "Callbacks",
    "LoopState",
    "TrainResult",
    "Trainer",
    "TrainingData",
    "autocast",
    "autocast_dtype",
    "cache_key",
    "cached_teacher_outputs",
    "compute_teacher_outputs",
    "forward_with_features",
    "iter_batches",
    "keep_on_device_if_small",
    "latest_checkpoint",
    "load_checkpoint",
    "lr_factor",
    "make_optimizer",
    "plan_for_data",
    "predict",
    "resolve_device",
    "save_checkpoint",
    "to_tensors",
    "train",
]
