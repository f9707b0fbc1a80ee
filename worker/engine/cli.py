"""``python -m worker.engine``: run one distillation job, or inspect a teacher, without the service.

    python -m worker.engine run SPEC --out DIR [--device auto] [--cache-dir DIR]
                                [--checkpoint-dir DIR] [--quiet]
    python -m worker.engine inspect TEACHER

Exit codes: 0 done, 1 failed, 2 bad input (spec, teacher or data), 3 stopped by
the time budget with a partial (still evaluated and exported) student.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from worker.engine.errors import (
    ArchiveUnsafe,
    DatasetInvalid,
    EngineError,
    SpecInvalid,
    TeacherIncompatible,
    TeacherInvalid,
    UnsupportedFormat,
)

BAD_INPUT = (
    SpecInvalid,
    UnsupportedFormat,
    TeacherInvalid,
    TeacherIncompatible,
    DatasetInvalid,
    ArchiveUnsafe,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m worker.engine", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one job spec and write its artifacts")
    run.add_argument(
        "spec", help="job spec JSON with teacher.path, dataset.path and optional test_dataset.path"
    )
    run.add_argument("--out", required=True, help="folder that receives the artifacts")
    run.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    run.add_argument("--cache-dir", help="reuse teacher outputs across runs from this folder")
    run.add_argument("--checkpoint-dir", help="write checkpoints here and resume from the latest")
    run.add_argument("--quiet", action="store_true", help="print only the final summary")
    inspect = commands.add_parser("inspect", help="print a teacher's signature as JSON")
    inspect.add_argument("teacher")
    return parser


def _print_progress(row: dict[str, Any]) -> None:
    eta = row.get("eta_s")
    print(
        f"step {row['step']}/{row['total_steps']} epoch {row['epoch']} "
        f"loss {row['loss']:.4f} lr {row['lr']:.2e} {row['samples_per_s']:.0f} samples/s"
        + (f" eta {eta:.0f}s" if eta is not None else ""),
        file=sys.stderr,
        flush=True,
    )


def _print_event(kind: str, data: dict[str, Any]) -> None:
    if kind == "evaluation" and not data.get("final"):
        shown = {k: round(v, 4) for k, v in data.items() if isinstance(v, float)}
        print(f"validation at step {data.get('step')}: {shown}", file=sys.stderr, flush=True)
    elif kind in ("stage", "resumed", "warning"):
        print(f"{kind}: {json.dumps(data, default=str)}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the command in ``argv``; returns the exit code (see the module docstring)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "inspect":
            from worker.engine.inspection import inspect

            print(json.dumps(inspect(args.teacher).to_dict(), indent=2))
            return 0
        return _run(args)
    except BAD_INPUT as exc:
        print(
            f"error [{exc.code}]" + (f" {exc.field}:" if exc.field else ":") + f" {exc.message}",
            file=sys.stderr,
        )
        return 2
    except EngineError as exc:
        print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from worker.engine.pipeline import run
    from worker.engine.spec import load_local_spec
    from worker.engine.training import Callbacks

    spec = load_local_spec(args.spec)
    callbacks = (
        Callbacks() if args.quiet else Callbacks(on_progress=_print_progress, on_event=_print_event)
    )
    result = run(
        spec,
        teacher_path=spec.teacher.path,
        dataset_path=spec.dataset.path,
        out_dir=args.out,
        device=args.device,
        cache_dir=args.cache_dir,
        checkpoint_dir=args.checkpoint_dir,
        callbacks=callbacks,
        test_dataset_path=spec.test_dataset.path if spec.test_dataset else None,
    )
    summary = {
        "task": result.task,
        "stop_reason": result.stop_reason,
        "teacher": result.metrics["teacher"],
        "student": result.metrics["student"],
        "fidelity": result.metrics.get("fidelity"),
        "compression": result.metrics.get("compression"),
        "verdict": result.metrics.get("verdict"),
        "deployed_file": result.metrics.get("deployed_file"),
        "split": result.metrics.get("split"),
        "artifacts": [a.to_dict() for a in result.artifacts],
    }
    print(json.dumps(summary, indent=2))
    return 3 if result.partial else 0
