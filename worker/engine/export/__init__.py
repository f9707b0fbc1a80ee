"""The student's artifacts: ONNX (checked in onnxruntime), safetensors plus its config.

``onnx`` writes ``student.onnx`` and proves it reproduces the torch student,
``dropin`` rewrites ``student.onnx`` to take and give what an ONNX teacher does
and measures their parity, ``safetensors`` writes and reloads ``student.safetensors`` with
``student_config.json``, ``quantize`` writes ``student.int8.onnx`` from ``student.onnx``,
and ``digests`` hashes artifact files.
"""

from worker.engine.export.digests import sha256_file
from worker.engine.export.dropin import (
    check_dropin,
    class_labels,
    make_dropin,
    parity,
    teacher_feed,
)
from worker.engine.export.onnx import (
    OnnxCheck,
    check_onnx,
    export_onnx,
    onnx_export_info,
    sequence_keys,
)
from worker.engine.export.quantize import (
    CALIBRATION_ROWS,
    INT8_NAME,
    Quantized,
    onnx_file_bytes,
    onnx_weight_bytes,
    quantize_int8,
)
from worker.engine.export.safetensors import export_safetensors, load_student

__all__ = [
    "CALIBRATION_ROWS",
    "INT8_NAME",
    "OnnxCheck",
    "Quantized",
    "check_dropin",
    "check_onnx",
    "class_labels",
    "export_onnx",
    "export_safetensors",
    "load_student",
    "make_dropin",
    "onnx_export_info",
    "onnx_file_bytes",
    "onnx_weight_bytes",
    "parity",
    "quantize_int8",
    "sequence_keys",
    "sha256_file",
    "teacher_feed",
]
