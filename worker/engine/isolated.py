"""Teacher inspection in a child process, under a memory and a time budget.

Parsing a protobuf costs far more memory than its bytes when they encode
millions of tiny messages: a 10 MB ONNX file of empty nodes takes about
750 MiB to parse, and the node caps of :mod:`worker.engine.onnx_graph` only
apply once the parse is done. A file of at least :data:`ISOLATE_FROM_BYTES`
is therefore read by ``python -m worker.engine.isolated``, a child that caps
its own data segment (``RLIMIT_DATA``) before it imports onnx and is killed
past its time budget; the caller's memory holds only the signature it prints.
Smaller files are read in the calling process (their worst case is bounded).

Run as a program, the module prints the signature (or the engine error) as one
JSON line. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from worker.engine import errors
from worker.engine.signature import TeacherSignature

#: Files under this many bytes are inspected in the calling process.
ISOLATE_FROM_BYTES = 1 * 2**20
#: The child's data segment cap: the parse of a 256 MiB teacher (the inline upload cap)
#: of real weights needs well under this.
MEMORY_BYTES = 2 * 2**30
#: The child's wall-clock budget.
TIMEOUT_S = 120.0
#: Exit status of a child that reports an engine error (as JSON).
_ENGINE_ERROR = 3

_ERRORS: dict[str, type[errors.EngineError]] = {
    cls.code: cls
    for cls in (
        errors.TeacherInvalid,
        errors.UnsupportedFormat,
        errors.TeacherIncompatible,
        errors.ArchiveUnsafe,
        errors.SpecInvalid,
    )
}


def inspect_isolated(
    path: str | Path,
    *,
    memory_bytes: int = MEMORY_BYTES,
    timeout_s: float = TIMEOUT_S,
    isolate_from_bytes: int = ISOLATE_FROM_BYTES,
) -> TeacherSignature:
    """The teacher's signature, as :func:`worker.engine.inspection.inspect` reads it.

    Raises what ``inspect`` raises, and :class:`~worker.engine.errors.TeacherInvalid`
    when reading the file needs more than ``memory_bytes`` or ``timeout_s``.
    """
    path = Path(path)
    if path.stat().st_size < isolate_from_bytes:
        from worker.engine.inspection import inspect

        return inspect(path)
    return _in_child(path, memory_bytes, timeout_s)


def _in_child(path: Path, memory_bytes: int, timeout_s: float) -> TeacherSignature:
    root = str(Path(__file__).resolve().parents[2])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
        # One BLAS thread: its per-thread buffers would count against the cap.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
    }
    command = [sys.executable, "-m", "worker.engine.isolated", str(path), str(memory_bytes)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        raise errors.TeacherInvalid(
            f"reading the teacher took longer than {timeout_s:.0f} s", field="teacher"
        ) from None
    reply = _reply(done.stdout)
    if done.returncode == 0 and "signature" in reply:
        return TeacherSignature.from_dict(reply["signature"])
    if done.returncode == _ENGINE_ERROR and "error" in reply:
        found = reply["error"]
        cls = _ERRORS.get(found.get("code", ""), errors.TeacherInvalid)
        raise cls(str(found.get("message", "")), field=found.get("field"))
    if "memory" in reply or done.returncode < 0:
        # Out of memory: MemoryError, or protobuf's allocator aborting the process.
        raise errors.TeacherInvalid(
            f"reading the teacher needs more than {memory_bytes // 2**20} MiB of memory "
            "(a graph of millions of tiny nodes or values)",
            field="teacher",
        )
    raise errors.TeacherInvalid("the file could not be read as a teacher model", field="teacher")


def _reply(stdout: str) -> dict[str, Any]:
    lines = stdout.strip().splitlines()
    try:
        reply = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        return {}
    return reply if isinstance(reply, dict) else {}


def main(argv: list[str]) -> int:
    """The child: cap the data segment, inspect ``argv[0]``, print one JSON line."""
    import resource

    path, memory_bytes = argv[0], int(argv[1])
    resource.setrlimit(resource.RLIMIT_DATA, (memory_bytes, memory_bytes))
    try:
        from worker.engine.inspection import inspect

        signature = inspect(path)
    except MemoryError:
        print(json.dumps({"memory": True}))
        return 1
    except errors.EngineError as exc:
        if "alloc failed" in exc.message:  # protobuf's arena, refused by the cap
            print(json.dumps({"memory": True}))
            return 1
        print(json.dumps({"error": exc.to_dict()}))
        return _ENGINE_ERROR
    print(json.dumps({"signature": signature.to_dict()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
