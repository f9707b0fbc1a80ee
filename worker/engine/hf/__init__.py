"""Hugging Face transformers teachers and the ``hf_encoder`` student.

A teacher is a zip of a transformers folder (``config.json``, safetensors
weights, tokenizer files), optionally a sentence-transformers folder
(``modules.json``); nothing from the upload is ever executed. The package
reads in this order:

- :mod:`~worker.engine.hf.pooling`: sentence-transformers pooling of token states.
- :mod:`~worker.engine.hf.families`: the allowlisted encoder families and their
  built-in transformers classes (never a class named by ``auto_map``).
- :mod:`~worker.engine.hf.wrapper`: :class:`HFEncoder`, the module shared by the
  teacher and the student, so both compute their output the same way.
- :mod:`~worker.engine.hf.tokenizer` and :mod:`~worker.engine.hf.loading`: a
  folder read into a frozen :class:`HFEncoder` and its tokenizer.
- :mod:`~worker.engine.hf.runtime`: the ``huggingface`` teacher runtime.
- :mod:`~worker.engine.hf.sizing` and :mod:`~worker.engine.hf.student`: the
  ``hf_encoder`` student, sized to a budget and seeded from the teacher's layers.

The runtime and the student add to registries defined in
:mod:`worker.engine.teachers` and :mod:`worker.engine.students`, which never
import this package: :mod:`worker.engine.components` does.
"""

from worker.engine.hf.families import ALLOWED_MODEL_TYPES, LAYER_STACKS
from worker.engine.hf.loading import load_folder
from worker.engine.hf.pooling import POOLING_MODES, masked_mean, pool
from worker.engine.hf.runtime import HuggingFaceTeacher, load_huggingface
from worker.engine.hf.student import build_hf_encoder, choose_layers, rebuild_hf_encoder
from worker.engine.hf.tokenizer import LowercasingTokenizer
from worker.engine.hf.wrapper import TEXT_INPUTS, HFEncoder

__all__ = [
    "ALLOWED_MODEL_TYPES",
    "LAYER_STACKS",
    "POOLING_MODES",
    "TEXT_INPUTS",
    "HFEncoder",
    "HuggingFaceTeacher",
    "LowercasingTokenizer",
    "build_hf_encoder",
    "choose_layers",
    "load_folder",
    "load_huggingface",
    "masked_mean",
    "pool",
    "rebuild_hf_encoder",
]
