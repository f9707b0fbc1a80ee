"""How good the student is: task metrics, fidelity, intervals, speed, the verdict, metrics.json.

- :mod:`.metrics`: task metrics and fidelity, pure functions on numpy arrays;
- :mod:`.intervals`: bootstrap 95% intervals of the task metric and fidelity;
- :mod:`.onnx_files`: the exported files run and timed in onnxruntime;
- :mod:`.speed`: latency and throughput of torch callables;
- :mod:`.verdict`: acceptance criteria, and whether the student is deployable;
- :mod:`.schema`: :func:`build_metrics` and :data:`METRICS_SCHEMA` of ``metrics.json``.
"""

from worker.engine.evaluation.intervals import (
    bootstrap_interval,
    fidelity_interval,
    task_metric_interval,
)
from worker.engine.evaluation.metrics import (
    FIDELITY_KEYS,
    TASK_METRICS,
    TASKS,
    classification_metrics,
    embedding_metrics,
    f1_macro,
    fidelity,
    regression_metrics,
    task_metrics,
)
from worker.engine.evaluation.onnx_files import THREADS, OnnxFile, paired_latency_ms
from worker.engine.evaluation.schema import (
    METRICS_SCHEMA,
    PRIMARY_METRIC,
    build_metrics,
    validate_metrics,
)
from worker.engine.evaluation.speed import (
    first_row,
    measure_latency,
    measure_speed,
    measure_throughput,
    module_bytes,
    paired_torch_latency_ms,
)
from worker.engine.evaluation.verdict import decide, not_evaluated, withhold

__all__ = [
    "FIDELITY_KEYS",
    "METRICS_SCHEMA",
    "PRIMARY_METRIC",
    "TASKS",
    "TASK_METRICS",
    "THREADS",
    "OnnxFile",
    "bootstrap_interval",
    "build_metrics",
    "classification_metrics",
    "decide",
    "embedding_metrics",
    "f1_macro",
    "fidelity",
    "fidelity_interval",
    "first_row",
    "measure_latency",
    "measure_speed",
    "measure_throughput",
    "module_bytes",
    "not_evaluated",
    "paired_latency_ms",
    "paired_torch_latency_ms",
    "regression_metrics",
    "task_metric_interval",
    "task_metrics",
    "validate_metrics",
    "withhold",
]
