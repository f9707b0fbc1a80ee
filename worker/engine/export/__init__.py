"""The student's artifacts: ONNX (checked in onnxruntime), safetensors plus its config.

``onnx`` writes ``student.onnx`` and proves it reproduces the torch student,
``safetensors`` writes and reloads ``student.safetensors`` with
``student_config.json``, and ``digests`` hashes artifact files.
"""

from worker.engine.export.digests import sha256_file
from worker.engine.export.onnx import (
    OnnxCheck,
    check_onnx,
    export_onnx,
    onnx_export_info,
    sequence_keys,
)
from worker.engine.export.safetensors import export_safetensors, load_student

# The model card and the curves moved to worker.engine.report; kept here until every
# importer uses that package.
from worker.engine.report import plot_training_curves, write_model_card

__all__ = [
    "OnnxCheck",
    "check_onnx",
    "export_onnx",
    "export_safetensors",
    "load_student",
    "onnx_export_info",
    "plot_training_curves",
    "sequence_keys",
    "sha256_file",
    "write_model_card",
]
