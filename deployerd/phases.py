"""The six phases of one deploy, their record, and the automatic rollback.

Validation -> Transfer -> Build -> Start Service -> Verify Health -> Register with Registry.
Each phase is recorded (status, start, end, duration, details, error) and the job is saved at every phase
boundary. The kind of failure decides what follows:

- a terminal failure in Build, Start, Verify Health or Register restores the last good release, verifies its
  health, re-registers it, and quarantines the failed release until the service's desired state changes;
- a transient failure (host or Registry unreachable) never rolls back: the job fails, nothing is
  quarantined, and the next reconcile tries again;
- a newer commit for the same service stops the job at the next phase boundary (``superseded``).

Secret values travel only in ``ReleaseContext.env``: release records keep the names (the manifest), a past
release's values are resolved again from the current sources when it is restored, and every error and log
line of a job is scrubbed of the values before it is stored (a service may echo its own env).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from deployerd.connection import HostUnreachable
from deployerd.desired import HostSpec, Release, ServiceSpec, expected_registry_entry
from deployerd.events import EventBus
from deployerd.failpoints import failpoint
from deployerd.health import HealthInterrupted, probe_client, wait_healthy
from deployerd.locks import HostLocks, LockBusy
from deployerd.metrics import Metrics
from deployerd.registry_client import RegistryClient, RegistryError
from deployerd.runtimes import HostHandle, ReleaseContext, Runtime, StartError
from deployerd.secrets import redact, secret_values
from deployerd.store import (
    PHASES,
    Job,
    JobStatus,
    PhaseRecord,
    PhaseStatus,
    Quarantine,
    ReleaseRecord,
    Store,
    utcnow,
)
from deployerd.transfer import transfer
from deployerd.tree import GitTree, Tree

log = logging.getLogger(__name__)

VALIDATION, TRANSFER, BUILD, START, HEALTH, REGISTER = PHASES
ROLLBACK_PHASES = {BUILD, START, HEALTH, REGISTER}


class PhaseFailed(Exception):
    def __init__(self, phase: str, cause: BaseException) -> None:
        super().__init__(f"{phase}: {cause}")
        self.phase = phase
        self.cause = cause
        self.logs: list[str] = getattr(cause, "logs", [])

    @property
    def transient(self) -> bool:
        if isinstance(self.cause, (HostUnreachable, LockBusy)):
            return True
        return isinstance(self.cause, RegistryError) and self.cause.transient


class Superseded(Exception):
    pass


def release_record(ctx: ReleaseContext, status: str) -> ReleaseRecord:
    now = utcnow()
    return ReleaseRecord(
        service=ctx.spec.name,
        release=ctx.release.id,
        host=ctx.host.name,
        method=ctx.spec.method,
        commit=ctx.commit,
        status=status,
        created_at=now,
        last_good_at=now if status == "good" else None,
        spec={
            "service": ctx.spec.model_dump(mode="json"),
            "host": ctx.host.model_dump(mode="json"),
            "inputs": ctx.release.inputs,
            "managed_by": ctx.managed_by,
            "instance": ctx.instance,
        },
    )


def context_from_record(rec: ReleaseRecord) -> ReleaseContext:
    """Rebuild a past release's context from the store, to restore it without git (secrets not resolved:
    `Deployer.context_for` adds them)."""
    spec = ServiceSpec.model_validate(rec.spec["service"])
    return ReleaseContext(
        spec=spec,
        host=HostSpec.model_validate(rec.spec["host"]),
        release=Release(id=rec.release, inputs=rec.spec.get("inputs", {})),
        commit=rec.commit,
        managed_by=rec.spec.get("managed_by", "git"),
        instance=rec.spec.get("instance", "default"),
        env=dict(spec.env),
    )


class Deployer:
    """Runs jobs. Holds no per-service state: everything durable goes through the store."""

    def __init__(
        self,
        store: Store,
        registry: RegistryClient,
        metrics: Metrics,
        keep_releases: int = 3,
        tree_at: Callable[[str], Awaitable[GitTree]] | None = None,
        locks: HostLocks | None = None,
        secret_env: Callable[[ServiceSpec], Awaitable[dict[str, str]]] | None = None,
        events: EventBus | None = None,
    ) -> None:
        self.store = store
        self.events = events or EventBus()  # jobs, phases, rollbacks and quarantines are published here
        self.registry = registry
        self.metrics = metrics
        self.keep_releases = keep_releases
        self.tree_at = tree_at  # a past commit's files, to rebuild a release whose artifact is gone
        self.locks = locks or HostLocks(None)  # one job per service and host at a time, across daemons
        self.secret_env = secret_env  # a service's secret values from the current sources
        self._hidden: dict[str, set[str]] = {}  # job id -> secret values its records must never hold
        self.http = probe_client()  # every health wait's client: built once (it costs ~90 ms of CPU)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def context_for(self, rec: ReleaseRecord) -> ReleaseContext:
        """A past release's context with its secrets resolved again (from the current sources)."""
        ctx = context_from_record(rec)
        if not ctx.spec.secrets:
            return ctx
        if self.secret_env is None:
            raise StartError(f"release {rec.release} of {rec.service} names secrets and no resolver is set")
        return dataclasses.replace(ctx, env={**ctx.env, **await self.secret_env(ctx.spec)})

    def _hide(self, job: Job, ctx: ReleaseContext) -> None:
        if values := secret_values(ctx.spec, ctx.env):
            self._hidden.setdefault(job.id, set()).update(values)

    def _scrub(self, job: Job, text: str) -> str:
        return redact(text, self._hidden.get(job.id, ()))

    def crashed(self, job: Job, error: str) -> str:
        """``error`` of a job that ended by an unexpected exception, scrubbed; the job's values are dropped."""
        text = self._scrub(job, error)
        self._hidden.pop(job.id, None)
        return text

    def _scrub_job(self, job: Job) -> None:
        """Redact secret values from everything of ``job`` that is stored, logged or served."""
        if job.id not in self._hidden:
            return
        job.error = self._scrub(job, job.error) if job.error else job.error
        job.logs = [self._scrub(job, line) for line in job.logs]
        if job.rollback:
            job.rollback = {k: self._scrub(job, v) if isinstance(v, str) else v for k, v in job.rollback.items()}
        for rec in job.phases:
            rec.error = self._scrub(job, rec.error) if rec.error else rec.error

    @asynccontextmanager
    async def _phase(self, job: Job, name: str) -> AsyncIterator[PhaseRecord]:
        rec = job.phase(name)
        rec.status, rec.started_at, rec.error = PhaseStatus.RUNNING, utcnow(), None
        t0 = time.monotonic()
        await self.store.save_job(job)
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
            self.metrics.phase_duration.labels(phase=name, method=job.method).observe(rec.duration_seconds)
            await self.store.save_job(job)

    @staticmethod
    def _skip(rec: PhaseRecord, why: str) -> None:
        rec.status = PhaseStatus.SKIPPED
        rec.details["skipped"] = why

    async def _begin(self, job: Job, phases: tuple[str, ...]) -> float:
        job.status, job.started_at = JobStatus.RUNNING, utcnow()
        for name in phases:
            job.phase(name)
        await self.store.save_job(job)
        return time.monotonic()

    async def _finish(self, job: Job, t0: float) -> Job:
        self._scrub_job(job)
        self._hidden.pop(job.id, None)
        job.completed_at = utcnow()
        job.duration_seconds = round(time.monotonic() - t0, 3)
        await self.store.save_job(job)
        self.metrics.jobs.labels(kind=job.kind, status=job.status.value).inc()
        log.info("job %s %s %s: %s%s", job.id, job.kind, job.service, job.status.value,
                 f" ({job.error})" if job.error else "")
        return job

    async def deploy(
        self,
        job: Job,
        ctx: ReleaseContext,
        handle: HostHandle,
        tree: Tree,
        previous: str | None,
        superseded: Callable[[], bool] = lambda: False,
    ) -> Job:
        """Run the six phases for ``ctx``; roll back on a terminal failure after the build started."""
        runtime = handle.runtime(ctx.spec.method)
        self._hide(job, ctx)
        t0 = await self._begin(job, PHASES)

        def boundary() -> None:
            if superseded():
                raise Superseded()

        lock = self.locks.lock(handle.conn, ctx.host.base_dir, ctx.qualified_name, job.id)
        try:  # the host lock is held from Validation to the end of any rollback, released in ``finally``
            async with self._phase(job, VALIDATION) as rec:
                rec.details.update(release=ctx.release.id, inputs=ctx.release.inputs, reasons=job.reasons,
                                   commit=ctx.commit, previous_release=previous)
                rec.details["lock"] = await lock.acquire()
                await handle.conn.makedirs(ctx.service_dir)
                await failpoint(VALIDATION)  # test-only: crash tests kill the daemon here
            boundary()
            built = await runtime.has_artifact(ctx)
            async with self._phase(job, TRANSFER) as rec:
                if built:
                    self._skip(rec, "release already built on the host (kept release, no rebuild)")
                else:
                    rec.details.update(await transfer(handle.conn, tree, ctx, previous))
            boundary()
            async with self._phase(job, BUILD) as rec:
                if built:
                    self._skip(rec, "image already on the host")
                else:
                    rec.details.update(await runtime.build(ctx))
            boundary()
            async with self._phase(job, START) as rec:
                rec.details.update(await runtime.start(ctx))
            boundary()
            async with self._phase(job, HEALTH) as rec:
                result = await wait_healthy(self.http, handle.conn, runtime, ctx.spec, ctx.release.id, stop=superseded)
                rec.details.update(url=result.url, status_code=result.status_code, attempts=result.attempts,
                                   seconds=result.seconds)
            await self.store.save_release(release_record(ctx, "good"))
            # a forced retry that works ends its quarantine; restoring the last good release does not
            await self.store.lift_quarantine(ctx.spec.name, ctx.release.id)
            async with self._phase(job, REGISTER) as rec:
                if ctx.spec.register:
                    job.registration = await self._register(ctx)
                    rec.details.update(job.registration)
                else:
                    self._skip(rec, "register: false in the manifest")
            job.status = JobStatus.SUCCEEDED
            await self._retain(runtime, ctx)
        except Superseded:
            job.status, job.error = JobStatus.SUPERSEDED, "a newer commit changed this service; stopped at a phase boundary"
        except PhaseFailed as failure:
            job.error = str(failure)
            job.logs = failure.logs
            if failure.transient:
                job.status, job.transient = JobStatus.FAILED, True  # an outage: retried by the next reconcile, never rolled back
            else:
                await self._quarantine(job, ctx, failure)
                if failure.phase in ROLLBACK_PHASES:
                    await self._rollback(job, ctx, handle, failure)
                    # a run of broken commits must not pile up one image and release dir each: the failed
                    # release stays (a forced retry reuses it), earlier failed ones go, within keep_releases
                    await self._retain(runtime, ctx)
                else:
                    job.status = JobStatus.FAILED
        finally:
            if previous is None and job.kind == "deploy" and not job.transient \
                    and job.status in (JobStatus.SUPERSEDED, JobStatus.FAILED):
                await self._clear_unserved(runtime, ctx)  # under the lock: it removes the service's files
            await lock.release()
        return await self._finish(job, t0)

    async def _clear_unserved(self, runtime: Runtime, ctx: ReleaseContext) -> None:
        """A service's first release on a host that never came to serve (superseded, or failed with nothing to
        roll back to) leaves files and an image but no instance there, and prune only finds services by their
        instances: if the service then moves away or leaves git, they would stay forever. Remove them now."""
        try:
            instances, _ = await runtime.observe()
            if not any(i.service == ctx.spec.name for i in instances):
                await runtime.remove_service(ctx.spec.name)
        except Exception as e:  # housekeeping: never turns the job's outcome into a crash
            log.warning("clearing %s from %s failed: %s", ctx.spec.name, ctx.host.name, e)

    async def _register(self, ctx: ReleaseContext) -> dict[str, Any]:
        want = expected_registry_entry(ctx.spec, ctx.host, ctx.release, ctx.instance)
        if ctx.managed_by != "git":  # out-of-band: never counted as git's, so never pruned by a reconcile
            want["metadata"]["managed_by"] = f"deployerd-{ctx.managed_by}"
        entry = await self.registry.register(ctx.spec.name, want["endpoint"], want["metadata"], ctx.spec.droplet_id)
        return {
            "droplet_id": entry.id,
            "service_name": entry.name,
            "endpoint": entry.endpoint,
            "registered_at": utcnow(),
        }

    async def _quarantine(self, job: Job, ctx: ReleaseContext, failure: PhaseFailed) -> None:
        await self.store.save_release(release_record(ctx, "failed"))
        await self.store.quarantine(
            Quarantine(service=ctx.spec.name, release=ctx.release.id, job_id=job.id,
                       reason=self._scrub(job, f"{failure.phase} failed: {failure.cause}"), created_at=utcnow())
        )

    async def _rollback(self, job: Job, ctx: ReleaseContext, handle: HostHandle, failure: PhaseFailed) -> None:
        """Restore the last good release (its kept container or unit), verify it, register it again."""
        runtime = handle.runtime(ctx.spec.method)
        t0 = time.monotonic()
        await runtime.discard(ctx.spec.name, ctx.release.id)
        prev = await self.store.last_good(ctx.spec.name, exclude=ctx.release.id)
        if prev is None or prev.host != ctx.host.name:
            job.status = JobStatus.FAILED
            job.rollback = {"release": None, "reason": "no earlier good release of this service on this host"}
            return
        try:
            prev_ctx = await self.context_for(prev)
            self._hide(job, prev_ctx)
            rebuilt = False
            if not await runtime.has_artifact(prev_ctx):  # removed by hand: rebuild it from its own commit
                if self.tree_at is None or not prev.commit:
                    raise StartError(f"release {prev.release} is no longer on {ctx.host.name} and has no commit")
                tree = await self.tree_at(prev.commit)
                try:
                    await transfer(handle.conn, tree, prev_ctx, previous=None)
                    await runtime.build(prev_ctx)
                finally:
                    await asyncio.to_thread(tree.close)
                rebuilt = True
            started = await runtime.start(prev_ctx)
            health = await wait_healthy(self.http, handle.conn, runtime, prev_ctx.spec, prev.release)
            registration = await self._register(prev_ctx) if prev_ctx.spec.register else None
        except Exception as e:  # the rollback itself failed: say so, keep the job's original error too
            job.status = JobStatus.FAILED
            job.rollback = {"release": prev.release, "error": str(e)}
            return
        await self.store.save_release(release_record(prev_ctx, "good"))
        job.status = JobStatus.ROLLED_BACK
        job.registration = registration
        job.rollback = {
            "release": prev.release,
            "commit": prev.commit,
            "reason": str(failure),
            "seconds": round(time.monotonic() - t0, 3),
            "health_seconds": health.seconds,
            "container_reused": started.get("reused_container"),
            "rebuilt": rebuilt,
        }
        self.metrics.rollbacks.labels(service=ctx.spec.name, reason=failure.phase).inc()

    async def _retain(self, runtime: Runtime, ctx: ReleaseContext) -> None:
        good = [r.release for r in await self.store.releases(ctx.spec.name) if r.status == "good"]
        keep = [ctx.release.id] + [r for r in good if r != ctx.release.id][: self.keep_releases - 1]
        try:
            await runtime.retain(ctx.spec.name, keep)
        except Exception as e:  # retention is housekeeping: a failure here must not fail a good deploy
            log.warning("retention for %s on %s failed: %s", ctx.spec.name, ctx.host.name, e)

    async def register_only(self, job: Job, ctx: ReleaseContext) -> Job:
        """Register the running release again. No host lock: it touches only the Registry, never the host."""
        t0 = await self._begin(job, (REGISTER,))
        try:
            async with self._phase(job, REGISTER) as rec:
                job.registration = await self._register(ctx)
                rec.details.update(job.registration)
            job.status = JobStatus.SUCCEEDED
        except PhaseFailed as failure:
            job.status, job.error, job.transient = JobStatus.FAILED, str(failure), failure.transient
        return await self._finish(job, t0)

    async def prune(self, job: Job, handle: HostHandle | None, method: str | None, deregister: bool) -> Job:
        """Remove a service that left git: its instances, artifacts and files, then its Registry entry."""
        t0 = await self._begin(job, ("Stop and Remove", "Deregister"))
        lock = None
        try:
            async with self._phase(job, "Stop and Remove") as rec:
                if handle is None or method is None:
                    self._skip(rec, "nothing deployed")
                else:
                    runtime = handle.runtime(method)
                    lock = self.locks.lock(handle.conn, handle.spec.base_dir, runtime.qualified(job.service), job.id)
                    rec.details["lock"] = await lock.acquire()
                    rec.details.update(await runtime.remove_service(job.service))
            async with self._phase(job, "Deregister") as rec:
                if deregister:
                    rec.details["deregistered"] = await self.registry.deregister(job.service)
                else:
                    self._skip(rec, "no deployerd-managed Registry entry")
            await self.store.lift_quarantine(job.service)
            job.status = JobStatus.SUCCEEDED
        except PhaseFailed as failure:
            job.status, job.error, job.transient = JobStatus.FAILED, str(failure), failure.transient
        finally:
            if lock is not None:
                await lock.release()
        return await self._finish(job, t0)
