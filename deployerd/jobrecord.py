"""How a job is recorded: its phases, their errors (scrubbed of secret values), its beginning and its end.

``JobRecorder.end`` is the one place a job ends, however it ran, crashed or never started: status, error,
``completed_at``, duration, the store, the log line, and ``JobEnded`` on the event bus. Every phase change
is saved and published (``PhaseChanged``). The kind of an error is decided here once (``is_transient``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from deployerd.events import EventBus, JobEnded, JobStarted, PhaseChanged
from deployerd.health import HealthInterrupted
from deployerd.runtimes import ReleaseContext
from deployerd.secrets import redact, secret_values
from deployerd.store import Job, JobStatus, PhaseRecord, PhaseStatus, Store, utcnow

log = logging.getLogger(__name__)


def is_transient(error: BaseException) -> bool:
    """The one rule: an error is transient (retry later, never quarantine) when it says so itself.

    ``HostUnreachable`` (and every SFTP or channel error the connection translates to it), ``LockBusy`` and a
    ``RegistryError`` that could not reach the Registry carry ``transient = True``; a command that ran and
    failed, a health check that never passed, anything else, is terminal."""
    return getattr(error, "transient", False) is True


class PhaseFailed(Exception):
    def __init__(self, phase: str, cause: BaseException) -> None:
        super().__init__(f"{phase}: {cause}")
        self.phase = phase
        self.cause = cause
        self.logs: list[str] = getattr(cause, "logs", [])
        self.transient = is_transient(cause)


class Superseded(Exception):
    pass


class JobRecorder:
    """Records jobs in the store and publishes their changes on the bus."""

    def __init__(self, store: Store, events: EventBus) -> None:
        self.store = store
        self.events = events
        self._hidden: dict[str, set[str]] = {}  # job id -> secret values its records must never hold
        self._t0: dict[str, float] = {}  # job id -> monotonic time it began

    # -- secrets in records
    def _hide(self, job: Job, ctx: ReleaseContext) -> None:
        if values := secret_values(ctx.spec, ctx.env):
            self._hidden.setdefault(job.id, set()).update(values)

    def _scrub(self, job: Job, text: str) -> str:
        return redact(text, self._hidden.get(job.id, ()))

    def _scrub_job(self, job: Job) -> None:
        """Redact secret values from everything of ``job`` that is stored, logged or served."""
        if job.id not in self._hidden:
            return
        job.error = self._scrub(job, job.error) if job.error else job.error
        job.logs = [self._scrub(job, line) for line in job.logs]
        if job.rollback:
            job.rollback = {k: self._scrub(job, v) if isinstance(v, str) else v for k, v in job.rollback.items()}
        for rec in [*job.phases, *job.rollback_phases]:
            rec.error = self._scrub(job, rec.error) if rec.error else rec.error

    # ------------------------------------------------------------------ a job's beginning and end
    async def begin(self, job: Job, phases: tuple[str, ...]) -> None:
        job.status, job.started_at = JobStatus.RUNNING, utcnow()
        self._t0[job.id] = time.monotonic()
        for name in phases:
            job.phase(name)
        await self.store.save_job(job)
        self.events.publish(JobStarted(job=job))

    async def end(self, job: Job, status: JobStatus | None = None, error: str | None = None,
                  transient: bool | None = None) -> Job:
        """The one place a job ends, however it ran (or crashed, or never started): status, error (scrubbed),
        ``completed_at``, duration, the store, the log line and ``JobEnded`` on the bus."""
        if status is not None:
            job.status = status
        if error is not None:
            job.error = error
        if transient is not None:
            job.transient = transient
        self._scrub_job(job)
        self._hidden.pop(job.id, None)
        t0 = self._t0.pop(job.id, None)
        job.completed_at = utcnow()
        job.duration_seconds = round(time.monotonic() - t0, 3) if t0 is not None else 0.0
        await self.store.save_job(job)
        self.events.publish(JobEnded(job=job))
        log.info("job %s %s %s: %s%s", job.id, job.kind, job.service, job.status.value,
                 f" ({job.error})" if job.error else "")
        return job

    async def end_crashed(self, job: Job, error: BaseException) -> Job:
        """End a job that an unexpected exception cut short (the engine's last resort)."""
        return await self.end(job, JobStatus.FAILED, f"{type(error).__name__}: {error}", is_transient(error))

    async def end_unstarted(self, job: Job, error: str) -> Job:
        """End a job that fails before its first phase (nothing ran on the host)."""
        return await self.end(job, JobStatus.FAILED, error)

    # -- phases
    @asynccontextmanager
    async def _phase(self, job: Job, name: str, records: list[PhaseRecord] | None = None,
                     rollback: bool = False) -> AsyncIterator[PhaseRecord]:
        """Record one phase of ``job`` (in ``records``, default ``job.phases``): saved and published when it
        starts and ends; a failure leaves as PhaseFailed, a newer commit as Superseded."""
        rec = _record(job.phases if records is None else records, name)
        rec.status, rec.started_at, rec.error = PhaseStatus.RUNNING, utcnow(), None
        t0 = time.monotonic()
        await self.store.save_job(job)
        self.events.publish(PhaseChanged(job=job, phase=name, status=rec.status.value, rollback=rollback))
        try:
            yield rec
        except HealthInterrupted as e:  # a newer commit: not a failure of this release
            rec.status, rec.error = PhaseStatus.FAILED, f"superseded: {e}"
            raise Superseded() from e
        except Exception as e:
            rec.status, rec.error = PhaseStatus.FAILED, self._scrub(job, str(e))
            raise PhaseFailed(name, e) from e
        else:
            if rec.status is PhaseStatus.RUNNING:
                rec.status = PhaseStatus.SUCCEEDED
        finally:
            rec.completed_at = utcnow()
            rec.duration_seconds = round(time.monotonic() - t0, 3)
            await self.store.save_job(job)
            self.events.publish(PhaseChanged(job=job, phase=name, status=rec.status.value,
                                             duration_s=rec.duration_seconds, rollback=rollback))

    @staticmethod
    def _skip(rec: PhaseRecord, why: str) -> None:
        rec.status = PhaseStatus.SKIPPED
        rec.details["skipped"] = why



def _record(records: list[PhaseRecord], name: str) -> PhaseRecord:
    for rec in records:
        if rec.phase == name:
            return rec
    rec = PhaseRecord(phase=name)
    records.append(rec)
    return rec
