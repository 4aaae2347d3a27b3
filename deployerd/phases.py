"""The six phases of one release on one host, run by one runner for deploy, restore and rollback alike.

Validation -> Transfer -> Build -> Start Service -> Verify Health -> Register with Registry.
Each phase is recorded (status, start, end, duration, details, error), the job is saved at every phase
boundary and each change is published on the event bus. A rollback is a second pass of the same runner for
the last good release (its phases are recorded in ``Job.rollback_phases``). The kind of failure decides
what follows:

- a terminal failure in Build, Start, Verify Health or Register restores the last good release, verifies its
  health, re-registers it, and quarantines the failed release until the service's desired state changes;
- a transient failure (the error's own ``transient``: host unreachable, connection lost, lock busy, Registry
  unreachable) never rolls back: the job fails, nothing is quarantined, and the next reconcile tries again;
- a newer commit for the same service stops the job at the next phase boundary (``superseded``); when the
  new release had already been started (so it serves unverified), the last good release is restored first.

Secret values travel only in ``ReleaseContext.env``: release records keep the names (the manifest), a past
release's values are resolved again from the current sources when it is restored, and every error and log
line of a job is scrubbed of the values before it is stored (a service may echo its own env).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from deployerd.desired import HostSpec, ServiceSpec, expected_registry_entry
from deployerd.events import EventBus, Quarantined, RolledBack, Switched
from deployerd.failpoints import failpoint
from deployerd.health import HealthResult, probe_client
from deployerd.hostport import HostPort, port_of
from deployerd.jobrecord import JobRecorder, PhaseFailed, Superseded, is_transient
from deployerd.locks import HostLocks
from deployerd.registry_client import RegistryClient
from deployerd.release_record import context_from_record, release_record
from deployerd.runtimes import HostHandle, ReleaseContext, Runtime, StartError
from deployerd.store import PHASES, Job, JobStatus, PhaseRecord, PhaseStatus, Quarantine, ReleaseRecord, Store, utcnow
from deployerd.tree import GitTree, Tree

log = logging.getLogger(__name__)

VALIDATION, TRANSFER, BUILD, START, HEALTH, REGISTER = PHASES
ROLLBACK_PHASES = {BUILD, START, HEALTH, REGISTER}
SUPERSEDED = "a newer commit changed this service; stopped at a phase boundary"

__all__ = ["Deployer", "PhaseFailed", "Superseded", "context_from_record", "is_transient", "release_record"]


Source = Tree | Callable[[], Awaitable[GitTree]]  # a release's files: a tree, or a way to open its commit's
# Register for a fleet host: writes the fleet's one entry with every host's release (rollout.FleetEntry)
Registrar = Callable[[ReleaseContext, str | None], Awaitable[dict[str, Any]]]


@dataclass
class Pass:
    """One run of the phases for one release on one host: where its records go and what it may read."""

    ctx: ReleaseContext
    records: list[PhaseRecord]
    source: Source | None  # None: the release must already be built on the host
    previous: str | None = None  # the release Transfer sends a delta against
    stop: Callable[[], bool] = lambda: False
    rollback: bool = False
    register: Registrar | None = None  # a fleet host's Register (rollout.FleetEntry); None: the one-host entry


class Deployer(JobRecorder):
    """Runs jobs. Holds no per-service state: everything durable goes through the store."""

    def __init__(
        self,
        store: Store,
        registry: RegistryClient,
        keep_releases: int = 3,
        tree_at: Callable[[str], Awaitable[GitTree]] | None = None,
        locks: HostLocks | None = None,
        secret_env: Callable[[ServiceSpec], Awaitable[dict[str, str]]] | None = None,
        events: EventBus | None = None,
    ) -> None:
        super().__init__(store, events or EventBus())  # metrics, the status page and notifications subscribe
        self.registry = registry
        self.keep_releases = keep_releases
        self.tree_at = tree_at  # a past commit's files, to rebuild a release whose artifact is gone
        self.locks = locks or HostLocks(None)  # one job per service and host at a time, across daemons
        self.secret_env = secret_env  # a service's secret values from the current sources
        self.http = probe_client()  # every health wait's client: built once (it costs ~90 ms of CPU)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def context_for(self, rec: ReleaseRecord, host: str | None = None) -> ReleaseContext:
        """A past release's context (on ``host``, for a fleet's) with its secrets resolved again (from the
        current sources)."""
        ctx = context_from_record(rec, host)
        if not ctx.spec.secrets:
            return ctx
        if self.secret_env is None:
            raise StartError(f"release {rec.release} of {rec.service} names secrets and no resolver is set")
        return ctx.with_env({**ctx.env, **await self.secret_env(ctx.spec)})

    async def _run(self, job: Job, run: Pass, port: HostPort, runtime: Runtime,
                   validation: Callable[[PhaseRecord], Awaitable[None]]) -> dict[str, Any]:
        """The six phases for ``run.ctx``; raises PhaseFailed or Superseded. Returns what rollback reports."""
        ctx = run.ctx

        def boundary() -> None:
            if run.stop():
                raise Superseded()

        async with self._phase(job, VALIDATION, run.records, run.rollback) as rec:
            rec.details.update(release=ctx.release.id, inputs=ctx.release.inputs, reasons=job.reasons,
                               commit=ctx.commit, previous_release=run.previous)
            await validation(rec)
            await port.prepare(ctx)
            await failpoint(VALIDATION)  # test-only: crash tests kill the daemon here
        boundary()
        built = await runtime.has_artifact(ctx)
        async with self._phase(job, TRANSFER, run.records, run.rollback) as rec:
            if built:
                self._skip(rec, "release already built on the host (kept release, no rebuild)")
            else:
                rec.details.update(await self._transfer(port, ctx, run))
        boundary()
        async with self._phase(job, BUILD, run.records, run.rollback) as rec:
            if built:
                self._skip(rec, "image already on the host")
            else:
                rec.details.update((await runtime.build(ctx)).record())
        boundary()
        async with self._phase(job, START, run.records, run.rollback) as rec:
            started = await runtime.start(ctx)
            rec.details.update(started.record())
        boundary()
        async with self._phase(job, HEALTH, run.records, run.rollback) as proved:
            health, switched = await self._prove(proved, port, runtime, ctx, started.private_port, run.stop)
        # behind an ingress the old release drains and stops while the proven one registers (see switch.py)
        retiring = asyncio.create_task(port.retire(runtime, ctx, switched["upstream_before"])) if switched else None
        try:
            await self.store.save_release(release_record(ctx, "good"))
            async with self._phase(job, REGISTER, run.records, run.rollback) as rec:
                if ctx.spec.register:
                    job.registration = await (run.register or self.registration)(ctx, await runtime.registry_node(ctx))
                    rec.details.update(job.registration)
                else:
                    self._skip(rec, "register: false in the manifest")
        finally:
            if retiring is not None:
                await self._retired(job, ctx, proved, switched, retiring)
        return {"health_seconds": health.seconds, "container_reused": started.reused, "rebuilt": not built,
                **({"switch": switched} if switched else {})}

    async def _prove(self, rec: PhaseRecord, port: HostPort, runtime: Runtime, ctx: ReleaseContext,
                     private: int | None, stop: Callable[[], bool]) -> tuple[HealthResult, dict[str, Any]]:
        """Verify Health: the new instance answers on its port; behind an ingress (its private port), then the
        proxy switches to it and the front door proves it (``switch.switch_to``); the old one drains and stops
        while Register runs (``_retired``)."""
        health = await port.wait_healthy(self.http, runtime, ctx, stop, private)
        rec.details.update(url=health.url, status_code=health.status_code, attempts=health.attempts,
                           seconds=health.seconds)
        if not ctx.behind_ingress or private is None:
            return health, {}
        switched = await port.switch(runtime, ctx, self.http, private)
        rec.details["switch"] = switched
        return health, switched

    async def _retired(self, job: Job, ctx: ReleaseContext, rec: PhaseRecord, switched: dict[str, Any],
                       retiring: asyncio.Task[dict[str, Any]]) -> None:
        """The old release's drain and stop, awaited after Register: recorded with the switch; a failure fails
        Verify Health, as when it ran inside that phase."""
        try:
            switched.update(await retiring)
        except Exception as e:
            rec.status, rec.error = PhaseStatus.FAILED, self._scrub(job, str(e))
            await self.store.save_job(job)
            raise PhaseFailed(HEALTH, e) from e
        self.events.publish(Switched(service=ctx.spec.name, host=ctx.host.name, release=ctx.release.id,
                                     switch_s=switched["switch_seconds"], drain_s=switched["drain_seconds"]))

    async def _transfer(self, port: HostPort, ctx: ReleaseContext, run: Pass) -> dict[str, Any]:
        if run.source is None:
            raise StartError(f"release {ctx.release.id} is no longer on {port.name} and has no commit")
        if not callable(run.source):
            return await port.transfer(run.source, ctx, run.previous)
        tree = await run.source()
        try:
            return await port.transfer(tree, ctx, run.previous)
        finally:
            await asyncio.to_thread(tree.close)

    # ------------------------------------------------------------------ deploy
    async def deploy(
        self,
        job: Job,
        ctx: ReleaseContext,
        handle: HostHandle | HostPort,
        tree: Tree,
        previous: str | None,
        superseded: Callable[[], bool] = lambda: False,
        register: Registrar | None = None,
    ) -> Job:
        """Run the six phases for ``ctx``; roll back on a terminal failure after the build started.
        ``register``: a fleet host's Register (its rollback's too), instead of the one-host entry."""
        port = port_of(handle)
        runtime = port.runtime(ctx.spec.method)
        self._hide(job, ctx)
        await self.begin(job, PHASES)
        lock = port.lock(self.locks, ctx.qualified_name, job.id)

        async def take_lock(rec: PhaseRecord) -> None:
            rec.details["lock"] = await lock.acquire()

        run = Pass(ctx, job.phases, tree, previous, superseded, register=register)
        try:  # the host lock is held from Validation to the end of any rollback, released in ``finally``
            try:
                await self._run(job, run, port, runtime, take_lock)
                # a forced retry that works ends its quarantine; restoring the last good release does not
                await self.store.lift_quarantine(ctx.spec.name, ctx.release.id)
                job.status = JobStatus.SUCCEEDED
                await self._retain(runtime, ctx)
            except Superseded:
                job.status, job.error = JobStatus.SUPERSEDED, SUPERSEDED
                if job.phase(START).status is PhaseStatus.PENDING:
                    pass  # nothing changed on the host
                elif ctx.behind_ingress:  # the proxy never sent it a request: the proven one still serves
                    await self._discard_unserving(port, runtime, ctx)
                else:  # it may serve, unverified: bring back the last good one
                    await self._restore_good(job, port, runtime, ctx, register, "superseded after Start Service",
                                             _cut_short(job))
            except PhaseFailed as failure:
                await self._failed(job, port, runtime, ctx, register, failure)
        finally:
            if previous is None and job.kind == "deploy" and not job.transient \
                    and job.status in (JobStatus.SUPERSEDED, JobStatus.FAILED):
                await self._clear_unserved(runtime, ctx)  # under the lock: it removes the service's files
            await lock.release()
        return await self.end(job)

    async def _failed(self, job: Job, port: HostPort, runtime: Runtime, ctx: ReleaseContext,
                      register: Registrar | None, failure: PhaseFailed) -> None:
        job.error = str(failure)
        job.logs = failure.logs
        if failure.transient:
            job.status, job.transient = JobStatus.FAILED, True  # an outage: retried by the next reconcile
            return
        await self._quarantine(job, ctx, failure)
        if failure.phase not in ROLLBACK_PHASES:
            job.status = JobStatus.FAILED
            return
        ok = await self._restore_good(job, port, runtime, ctx, register, str(failure), failure.phase)
        job.status = JobStatus.ROLLED_BACK if ok else JobStatus.FAILED
        # a run of broken commits must not pile up one image and release dir each: the failed release stays
        # (a forced retry reuses it), earlier failed ones go, within keep_releases
        await self._retain(runtime, ctx)

    async def _restore_good(self, job: Job, port: HostPort, runtime: Runtime, ctx: ReleaseContext,
                            register: Registrar | None, reason: str, phase: str) -> bool:
        """Stop ``ctx``'s release and bring back the last good one through the same phases (its kept container
        or unit; else rebuilt from its own commit); True once it is verified and registered again."""
        ok = await self._restore(job, port, runtime, ctx, register, reason)
        self.events.publish(RolledBack(service=ctx.spec.name, host=ctx.host.name, failed_release=ctx.release.id,
                                       restored_release=(job.rollback or {}).get("release"), phase=phase, ok=ok))
        return ok

    async def _restore(self, job: Job, port: HostPort, runtime: Runtime, ctx: ReleaseContext,
                       register: Registrar | None, reason: str) -> bool:
        """The last good release's pass (its Register the failed one's: a fleet host writes the fleet's entry)."""
        t0 = time.monotonic()
        if not ctx.behind_ingress:  # behind an ingress the failed one goes once the proxy serves the good one
            await runtime.discard(ctx)
        prev = await self.store.last_good(ctx.spec.name, exclude=ctx.release.id)
        if prev is None or ctx.host.name not in prev.ran_on:
            if ctx.behind_ingress:
                await self._discard_unserving(port, runtime, ctx)
            job.rollback = {"release": None, "reason": "no earlier good release of this service on this host"}
            return False
        try:
            prev_ctx = await self.context_for(prev, ctx.host.name)
        except Exception as e:  # its secrets cannot be resolved: it cannot be restored
            job.rollback = {"release": prev.release, "error": str(e)}
            return False
        self._hide(job, prev_ctx)
        tree_at = self.tree_at
        source = (lambda: tree_at(prev.commit)) if tree_at is not None and prev.commit else None

        async def held(rec: PhaseRecord) -> None:
            rec.details["lock"] = "held by this job"

        run = Pass(prev_ctx, job.rollback_phases, source, rollback=True, register=register)
        job.registration = None
        try:
            done = await self._run(job, run, port, runtime, held)
        except (PhaseFailed, Superseded) as e:  # the rollback itself failed: say so, keep the job's error too
            job.rollback = {"release": prev.release, "error": str(getattr(e, "cause", e))}
            return False
        if ctx.behind_ingress:
            await runtime.discard(ctx)
        job.rollback = {"release": prev.release, "commit": prev.commit, "reason": reason,
                        "seconds": round(time.monotonic() - t0, 3), **done}
        return True

    async def _discard_unserving(self, port: HostPort, runtime: Runtime, ctx: ReleaseContext) -> None:
        """Behind an ingress: remove ``ctx``'s instance unless the proxy sends it requests (it never does before
        its switch)."""
        if await port.serving(ctx) != ctx.release.id:
            await runtime.discard(ctx)

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

    async def registration(self, ctx: ReleaseContext, node: str | None = None,
                           fleet: Mapping[str, tuple[HostSpec, str]] | None = None) -> dict[str, Any]:
        """Write ``ctx``'s Registry entry (``fleet``: every host of a fleet and the release it serves)."""
        extra: dict[str, Any] = {"fleet": fleet} if fleet is not None else {}
        want = expected_registry_entry(ctx.spec, ctx.host, ctx.release, ctx.instance, ctx.managed_by, node,
                                       **extra)
        entry = await self.registry.register(ctx.spec.name, want["endpoint"], want["metadata"], ctx.spec.droplet_id)
        return {
            "droplet_id": entry.id,
            "service_name": entry.name,
            "endpoint": entry.endpoint,
            "registered_at": utcnow(),
        }

    async def _quarantine(self, job: Job, ctx: ReleaseContext, failure: PhaseFailed) -> None:
        await self.store.save_release(release_record(ctx, "failed"))
        reason = self._scrub(job, f"{failure.phase} failed: {failure.cause}")
        await self.store.quarantine(
            Quarantine(service=ctx.spec.name, release=ctx.release.id, job_id=job.id, reason=reason,
                       created_at=utcnow()))
        self.events.publish(Quarantined(service=ctx.spec.name, release=ctx.release.id, reason=reason))

    async def _retain(self, runtime: Runtime, ctx: ReleaseContext) -> None:
        good = [r.release for r in await self.store.releases(ctx.spec.name) if r.status == "good"]
        keep = [ctx.release.id] + [r for r in good if r != ctx.release.id][: self.keep_releases - 1]
        try:
            await runtime.retain(ctx.spec.name, keep)
        except Exception as e:  # retention is housekeeping: a failure here must not fail a good deploy
            log.warning("retention for %s on %s failed: %s", ctx.spec.name, ctx.host.name, e)

    # ------------------------------------------------------------------ register, prune
    async def register_only(self, job: Job, ctx: ReleaseContext, node: str | None = None,
                            register: Registrar | None = None) -> Job:
        """Register the running release again (``node``: where it was observed answering, for a Swarm service;
        ``register``: a fleet's). No host lock: it touches only the Registry, never the host."""
        await self.begin(job, (REGISTER,))
        try:
            async with self._phase(job, REGISTER) as rec:
                job.registration = await (register or self.registration)(ctx, node)
                rec.details.update(job.registration)
            job.status = JobStatus.SUCCEEDED
        except PhaseFailed as failure:
            job.status, job.error, job.transient = JobStatus.FAILED, str(failure), failure.transient
        return await self.end(job)

    async def prune(self, job: Job, handle: HostHandle | HostPort | None, method: str | None,
                    deregister: bool) -> Job:
        """Remove a service that left git: its instances, artifacts and files, then its Registry entry."""
        await self.begin(job, ("Stop and Remove", "Deregister"))
        lock = None
        try:
            async with self._phase(job, "Stop and Remove") as rec:
                if handle is None or method is None:
                    self._skip(rec, "nothing deployed")
                else:
                    port = port_of(handle)
                    runtime = port.runtime(method)
                    lock = port.lock(self.locks, runtime.qualified(job.service), job.id)
                    rec.details["lock"] = await lock.acquire()
                    rec.details.update((await runtime.remove_service(job.service)).record())
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
        return await self.end(job)


def _cut_short(job: Job) -> str:
    """The phase a superseded job stopped in or after."""
    return next((p.phase for p in reversed(job.phases) if p.status is not PhaseStatus.PENDING), START)
