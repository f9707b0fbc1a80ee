"""The job runner: claim a job, hold its lease, run the engine, store its artifacts, finish it.

Called by the Celery task with the job id only. The claim is a conditional
update (``queued`` to ``running``, ``attempt`` + 1), so a message delivered
twice runs the job once. Every later write is fenced by that attempt. The
engine's torch side is imported inside :meth:`JobRun.run`, in the forked child
that runs the job.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings, get_settings
from app.datasets.models import Dataset
from app.db import after_rollback, utcnow
from app.jobs import service
from app.jobs.models import (
    CANCELLED,
    CANCELLING,
    FAILED,
    LEASED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Job,
)
from app.jobs.repository import JobRepository
from app.models.models import TeacherModel
from app.storage import LocalStorage
from worker.engine.errors import Cancelled, EngineError
from worker.engine.spec import JobSpec
from worker.lifecycle import (
    DEADLINE_MARGIN_S,
    arm_process_deadline,
    disarm_process_deadline,
    end_pool_process,
    handback_requested,
)
from worker.sessions import worker_sessions

log = logging.getLogger(__name__)


def release_locks_when_idle(session: Session, seconds: float) -> None:
    """On PostgreSQL, end this session if it sits idle inside its current transaction for
    ``seconds`` (``SET LOCAL``: only this transaction), releasing what it locked."""
    if session.get_bind().dialect.name == "postgresql":
        milliseconds = max(1, int(seconds * 1000))
        session.execute(text(f"SET LOCAL idle_in_transaction_session_timeout = {milliseconds}"))


#: A renewal later than this share of the lease after the last one is logged: it is renewed
#: every third of the lease, so a host this busy is close to losing the job.
LATE_RENEWAL = 0.6
#: Seconds between progress writes (the first and the last step are always written).
PROGRESS_INTERVAL_S = 1.0
#: Seconds between checks for a cancellation request.
CANCEL_CHECK_S = 1.0
#: Engine stages after training: they ask for a cancellation a few times in all, and each
#: time it is read from the database.
UNTHROTTLED_STAGES = frozenset({"export", "evaluation"})


def capped_spec(spec: JobSpec, settings: Settings) -> JobSpec:
    """A copy of ``spec`` with its time budget capped by the server's ceiling."""
    spec = spec.model_copy(deep=True)
    ceiling = settings.max_job_minutes
    if ceiling is not None and spec.training.max_minutes > ceiling:
        spec.training.max_minutes = ceiling
    return spec


def hard_time_limit_s(spec: JobSpec, settings: Settings) -> float:
    """Seconds one attempt of a job may run: its (capped) time budget plus the server's grace."""
    minutes = capped_spec(spec, settings).training.max_minutes
    return minutes * 60.0 + settings.job_time_limit_grace_s


class JobLost(Exception):
    """Another attempt owns the job now: this run must stop without writing."""


@dataclass(frozen=True)
class Claim:
    """What a claimed run needs: the job, its attempt, and its input files."""

    job_id: uuid.UUID
    attempt: int
    spec: JobSpec
    teacher_path: Path
    dataset_path: Path
    #: The dataset reported on instead of a test split, if the spec names one.
    test_dataset_path: Path | None = None


def worker_identity() -> str:
    """Who holds a lease: this host and process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def execute_job(job_id: str, settings: Settings | None = None) -> None:
    """Run job ``job_id`` to a terminal state, if it is still queued (else do nothing)."""
    settings = settings or get_settings()
    factory = worker_sessions(settings)
    storage = LocalStorage(settings.storage_root())
    claim = _claim(factory, storage, job_id, settings)
    if claim is None:
        return
    JobRun(factory, storage, settings, claim).run()


def _claim(
    factory: sessionmaker[Session], storage: LocalStorage, job_id: str, settings: Settings
) -> Claim | None:
    try:
        ident = uuid.UUID(job_id)
    except ValueError:
        log.error("job message with a malformed id %r dropped", job_id)
        return None
    with factory() as session, session.begin():
        job = session.get(Job, ident)
        if job is None or job.status != QUEUED:
            log.info("job %s is %s: nothing to run", job_id, job and job.status)
            return None
        teacher, dataset = service.job_inputs(session, job)
        test_set = service.job_test_set(session, job)
        if teacher is None or dataset is None or service.lost_test_set(job, test_set):
            service.fail_queued(
                session,
                job,
                code="input_missing",
                message="the teacher, dataset or test dataset was deleted",
            )
            return None
        inputs: list[tuple[TeacherModel | Dataset, str]] = [
            (teacher, "model"),
            (dataset, "dataset"),
        ]
        if test_set is not None:
            inputs.append((test_set, "dataset"))
        for row, what in inputs:
            if row.status == "invalid":
                reason = service.invalid_reason(row)
                service.fail_queued(
                    session, job, code=f"{what}_invalid", message=f"the {what} is invalid: {reason}"
                )
                return None
        if any(row.status == "processing" for row, _ in inputs):
            # Sent again once all are inspected.
            return None
        claimed = service.change_status(
            session,
            job,
            RUNNING,
            from_statuses=[QUEUED],
            event={"attempt": job.attempt + 1},
            attempt=job.attempt + 1,
            started_at=job.started_at or utcnow(),
            lease_owner=worker_identity(),
            lease_expires_at=utcnow() + timedelta(seconds=settings.lease_seconds),
        )
        if not claimed:
            return None
        return Claim(
            job_id=job.id,
            attempt=job.attempt,
            spec=JobSpec.model_validate(job.spec),
            teacher_path=storage.path(teacher.storage_key),
            dataset_path=storage.path(dataset.storage_key),
            test_dataset_path=storage.path(test_set.storage_key) if test_set else None,
        )


def _stopped_by_cancellation(result: Any) -> bool:
    """Whether the engine ended the run on a cancellation and still returned its best student."""
    return bool(result.stop_reason == "cancelled")


def _import_export_and_report_modules() -> None:
    """Import, before the run starts, what exporting a student and drawing its curves load.

    They take seconds to import in a fresh worker child; loaded up front, a run
    cancelled mid-training exports its best student and ends within seconds of the
    request, and a finished run takes no longer in all.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot
    import onnxscript  # noqa: F401


class JobRun:
    """One attempt of a claimed job: the engine's callbacks write to the job's row and log."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        storage: LocalStorage,
        settings: Settings,
        claim: Claim,
    ) -> None:
        self.factory = factory
        self.storage = storage
        self.settings = settings
        self.claim = claim
        self.folder = settings.work_dir / "jobs" / claim.job_id.hex
        self._last_progress = 0.0
        self._last_cancel_check = 0.0
        self._cancel_requested = False
        self._stage = ""
        self._lost = threading.Event()
        self._stop_heartbeat = threading.Event()
        # What the heartbeat reads to tell a working run from a stalled one.
        self._engine_thread: threading.Thread | None = None
        self._last_sign_of_life = time.monotonic()

    # ------------------------------------------------------------------ the lease

    def _heartbeat(self) -> None:
        """Renew the lease every third of its length; a refused or failing renewal stops the run.

        A renewal the database refuses means another attempt owns the job. One
        that cannot reach the database is retried until the lease would have
        expired: past that point another worker may own the job.
        """
        lease = self.settings.lease_seconds
        renewed_at = time.monotonic()
        while not self._stop_heartbeat.wait(lease / 3):
            if self._stalled():
                # Let the lease lapse: the reconciler requeues the job, and this run, should
                # it ever wake, stops at its next write.
                log.warning("job %s: no progress; the lease is left to expire", self.claim.job_id)
                self._lost.set()
                return
            try:
                with self.factory() as session, session.begin():
                    held = self._fenced_update(
                        session, lease_expires_at=utcnow() + timedelta(seconds=lease)
                    )
            except Exception:
                log.warning("job %s: lease renewal failed", self.claim.job_id, exc_info=True)
                held = time.monotonic() - renewed_at < lease
            else:
                now = time.monotonic()
                if now - renewed_at > LATE_RENEWAL * lease:
                    log.warning(
                        "job %s: the lease was renewed %.1f s after the last renewal, of a "
                        "%.0f s lease: on a host this busy, raise DISTILL_LEASE_SECONDS or the "
                        "job may be requeued while it runs",
                        self.claim.job_id,
                        now - renewed_at,
                        lease,
                    )
                renewed_at = now
            if not held:
                log.warning("job %s: lease lost; stopping", self.claim.job_id)
                self._lost.set()
                return

    def _stalled(self) -> bool:
        """Whether the engine has shown no sign of life for ``stalled_run_s``."""
        return time.monotonic() - self._last_sign_of_life > self.settings.stalled_run_s

    def _note_sign_of_life(self) -> None:
        # Only the engine's own thread counts: a watcher polling on its behalf is no progress.
        if threading.current_thread() is self._engine_thread:
            self._last_sign_of_life = time.monotonic()

    # ------------------------------------------------------------------ the time limit

    def _time_limit_s(self) -> float:
        """Seconds this attempt may run: its time budget plus the server's grace."""
        return hard_time_limit_s(self.claim.spec, self.settings)

    def _enforce_time_limit(self) -> None:
        """At the hard limit, fail the job (fenced by attempt) and end the process running it.

        The engine checks its own budget, but a stage can block in native code for
        ever; only ending the process frees the worker for the next job.
        """
        limit = self._time_limit_s()
        if self._stop_heartbeat.wait(limit):
            return
        log.error("job %s: past its hard time limit of %.0f s; ending it", self.claim.job_id, limit)
        try:
            self._fail(
                "time_budget_exceeded",
                f"the job ran past the worker's hard time limit ({limit:.0f} s: "
                "training.max_minutes plus the server's grace) and was stopped",
                "training.max_minutes",
            )
        except JobLost:
            return  # the run ended the job itself meanwhile
        except Exception:
            log.exception("job %s: could not record the time limit", self.claim.job_id)
        self._lost.set()
        shutil.rmtree(self.folder, ignore_errors=True)
        end_pool_process()

    # ------------------------------------------------------------------ writes

    def _fenced_update(self, session: Session, **values: Any) -> bool:
        """Set ``values`` on the job if this attempt still owns it; whether it did.

        The row stays locked until the transaction ends. Should this process stop inside
        it (paused, swapped out, cut off), PostgreSQL ends the session once it has been
        idle in the transaction for a lease, so the lock does not keep the reconciler,
        which skips locked rows, from handing the job to another worker.
        """
        release_locks_when_idle(session, self.settings.lease_seconds)
        return JobRepository(session).transition(
            self.claim.job_id, from_statuses=LEASED, fence=self.claim.attempt, **values
        )

    def _write(self, type: str, data: dict[str, Any], **values: Any) -> None:
        """Update the job (fenced by attempt) and log an event, in one transaction."""
        with self.factory() as session, session.begin():
            if not self._fenced_update(session, **values):
                raise JobLost(f"job {self.claim.job_id} attempt {self.claim.attempt} was fenced")
            JobRepository(session).add_event(
                self.claim.job_id, type, data, attempt=self.claim.attempt
            )

    def on_progress(self, data: dict[str, Any]) -> None:
        """Engine progress: written at most every second, and always at the last step."""
        total = data.get("total_steps") or 0
        step = int(data.get("step", 0))
        now = time.monotonic()
        self._note_sign_of_life()
        if now - self._last_progress < PROGRESS_INTERVAL_S and step < total:
            return
        self._last_progress = now
        progress = {**data, "step": step, "fraction": min(1.0, step / total) if total else 0.0}
        self._write("progress", progress, progress=progress)

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        """Engine events go to the log; evaluations also become the job's latest metrics."""
        self._note_sign_of_life()
        if kind == "stage":
            self._stage = str(data.get("stage", ""))
        values = {"metrics": {"validation": data}} if kind == "evaluation" else {}
        self._write(kind, data, **values)

    def should_cancel(self) -> bool:
        """Whether the run must stop at this step: the lease is lost, the worker is shutting
        down, or the job was cancelled (read from the database at most once a second while
        the engine asks every step, and at every ask in the export and evaluation)."""
        self._note_sign_of_life()
        if self._lost.is_set():
            raise JobLost(f"job {self.claim.job_id} attempt {self.claim.attempt} lost its lease")
        if handback_requested.is_set():
            return True
        now = time.monotonic()
        throttled = self._stage not in UNTHROTTLED_STAGES
        if self._cancel_requested or (throttled and now - self._last_cancel_check < CANCEL_CHECK_S):
            return self._cancel_requested
        self._last_cancel_check = now
        with self.factory() as session:
            job = session.get(Job, self.claim.job_id)
            if job is None or job.attempt != self.claim.attempt or job.status not in LEASED:
                raise JobLost(f"job {self.claim.job_id} is no longer this attempt's")
            self._cancel_requested = job.status == CANCELLING
        return self._cancel_requested

    # ------------------------------------------------------------------ the run

    def run(self) -> None:
        """Run the engine and record the outcome.

        The job's work folder goes only once this run ended the job for good and
        nothing in it is worth keeping; checkpoints stay for a cancelled or
        time-limited job, for a hand-back, and whenever the run is cut short
        (another attempt may be resuming from them).
        """
        out = self.folder / f"attempt-{self.claim.attempt}"
        spent = False  # the job ended and its checkpoints are of no further use
        # The lease is renewed from the claim on: importing the engine (torch) and
        # copying the last checkpoint can take longer than a short lease.
        heartbeat = threading.Thread(target=self._heartbeat, name="lease", daemon=True)
        heartbeat.start()
        self._engine_thread = threading.current_thread()
        threading.Thread(target=self._enforce_time_limit, name="time-limit", daemon=True).start()
        arm_process_deadline(self._time_limit_s() + DEADLINE_MARGIN_S)
        try:
            try:
                result = self._run_engine(out)
            except Cancelled as exc:
                if handback_requested.is_set():
                    self._hand_back(str(exc))
                else:
                    self._finish(CANCELLED, event={"message": str(exc)})
            except EngineError as exc:
                self._fail(exc.code, exc.message, exc.field)
                spent = True
            except JobLost:
                raise
            except Exception as exc:
                log.exception("job %s failed unexpectedly", self.claim.job_id)
                self._fail(
                    "internal_error", f"the worker failed: {type(exc).__name__}: {exc}", None
                )
                spent = True
            else:
                if _stopped_by_cancellation(result) and handback_requested.is_set():
                    self._hand_back("the worker is shutting down")
                else:
                    self._succeed(result)
                    spent = not result.partial
        except JobLost as exc:
            log.warning("%s; stopping without further writes", exc)
        finally:
            disarm_process_deadline()
            self._stop_heartbeat.set()
            heartbeat.join()
            shutil.rmtree(out, ignore_errors=True)
            if spent:
                shutil.rmtree(self.folder, ignore_errors=True)

    def _run_engine(self, out: Path) -> Any:
        """The engine's pipeline on the claimed inputs, from the latest checkpoint; its result."""
        # Imported here: torch loads in the child that runs the job, never in the parent.
        from worker.engine import pipeline
        from worker.engine.training import Callbacks

        _import_export_and_report_modules()
        return pipeline.run(
            self._spec(),
            teacher_path=self.claim.teacher_path,
            dataset_path=self.claim.dataset_path,
            out_dir=out,
            device=self.settings.device,
            cache_dir=self.settings.work_dir / "cache",
            checkpoint_dir=self._checkpoints(),
            test_dataset_path=self.claim.test_dataset_path,
            callbacks=Callbacks(
                on_progress=self.on_progress,
                on_event=self.on_event,
                should_cancel=self.should_cancel,
                # A cancelled job keeps its best student; a hand-back stops to be resumed.
                cancel_keeps_student=lambda: not handback_requested.is_set(),
            ),
        )

    def _spec(self) -> JobSpec:
        """The claimed spec, its time budget capped by the server's ceiling."""
        return capped_spec(self.claim.spec, self.settings)

    def _checkpoints(self) -> Path:
        """This attempt's own checkpoint folder, starting from the latest earlier checkpoint.

        Each attempt writes only its own folder, so a stale attempt that wakes up
        (a paused worker) can never overwrite the checkpoints of the one that
        replaced it.
        """
        own = self.folder / "checkpoints" / f"attempt-{self.claim.attempt}"
        if own.exists():
            return own
        for earlier in range(self.claim.attempt - 1, 0, -1):
            previous = self.folder / "checkpoints" / f"attempt-{earlier}"
            latest = previous / "latest"
            if latest.is_file() and (previous / latest.read_text().strip()).is_dir():
                name = latest.read_text().strip()
                own.mkdir(parents=True)
                shutil.copytree(previous / name, own / name)
                (own / "latest").write_text(name)
                break
        return own

    def _hand_back(self, reason: str) -> None:
        """Put the job back in the queue after its checkpoint (the worker is shutting down).

        No message is sent from here: a worker in its warm shutdown may still
        take one and be killed with it. The reconciler sends the job again once
        no message for it is left in the broker.
        """
        with self.factory() as session, session.begin():
            job = session.get(Job, self.claim.job_id)
            if job is not None and job.status == CANCELLING:
                # A cancellation arrived meanwhile: it wins.
                service.change_status(
                    session,
                    job,
                    CANCELLED,
                    from_statuses=LEASED,
                    fence=self.claim.attempt,
                    event={"message": reason},
                )
                return
            if job is None or not service.change_status(
                session,
                job,
                QUEUED,
                from_statuses=LEASED,
                fence=self.claim.attempt,
                event={"reason": "worker_shutdown", "message": reason},
                lease_owner=None,
                lease_expires_at=None,
            ):
                raise JobLost(f"job {self.claim.job_id}: the hand-back was fenced")

    def _fail(self, code: str, message: str, field: str | None) -> None:
        error = {"code": code, "message": message, "field": field}
        self._finish(FAILED, error=error, event={"error": error})

    def _finish(self, status: str, *, event: dict[str, Any], **values: Any) -> None:
        with self.factory() as session, session.begin():
            job = session.get(Job, self.claim.job_id)
            if job is None or not service.change_status(
                session,
                job,
                status,
                from_statuses=LEASED,
                fence=self.claim.attempt,
                event=event,
                **values,
            ):
                raise JobLost(f"job {self.claim.job_id}: the final write was fenced")

    def _succeed(self, result: Any) -> None:
        """Store every artifact with its sha256, then finish, all or nothing."""
        with self.factory() as session, session.begin():
            job = session.get(Job, self.claim.job_id)
            assert job is not None
            for artifact in result.artifacts:
                key = service.artifact_key(job, artifact.name)
                stored = self.storage.put_file(key, artifact.path)
                after_rollback(session, partial(self.storage.delete, key))
                if stored.sha256 != artifact.sha256:
                    raise RuntimeError(f"artifact {artifact.name} changed while it was stored")
                service.add_artifact(
                    session, job, stored, name=artifact.name, media=artifact.media_type
                )
            outcome: dict[str, Any] = {
                "metrics": result.metrics,
                "stop_reason": result.stop_reason,
                "partial": result.partial,
            }
            status = SUCCEEDED
            event: dict[str, Any] = {"stop_reason": result.stop_reason, "partial": result.partial}
            verdict = (result.metrics or {}).get("verdict")
            if isinstance(verdict, dict):
                event["verdict"] = verdict
            if _stopped_by_cancellation(result):
                # Cancelled, with the best student found before it kept (partial): during the
                # export or the evaluation, it is unevaluated and the terminal event says so.
                status = CANCELLED
                stage = (result.metrics or {}).get("cancelled_during")
                if stage is not None:
                    event["cancelled_during"] = stage
                if (result.metrics or {}).get("evaluated") is False:
                    event["evaluated"] = False
            elif result.partial:
                # The best student before the time limit is kept, but the job did not finish.
                status = FAILED
                error = {
                    "code": "time_budget_exceeded",
                    "message": "training.max_minutes ran out; the artifacts hold the best "
                    "student found before it",
                    "field": "training.max_minutes",
                }
                outcome["error"] = error
                event["error"] = error
            if job.progress is not None:
                outcome["progress"] = {**job.progress, "fraction": 1.0, "eta_s": 0.0}
            changed = service.change_status(
                session,
                job,
                status,
                from_statuses=LEASED,
                fence=self.claim.attempt,
                event={**event, "artifacts": [a.name for a in result.artifacts]},
                **outcome,
            )
            if not changed:
                raise JobLost(f"job {self.claim.job_id}: the final write was fenced")
