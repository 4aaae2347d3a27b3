"""The reconcile loop: fetch -> load desired -> observe -> plan -> run jobs. A thin join of the stages.

One reconcile works on one pinned commit. Jobs run concurrently (bounded), one per service at a time; a
reconcile that finds a job in flight for a service records the newer desired release, and the job stops
at its next phase boundary (superseded) so the newer commit is not kept waiting behind a health timeout.
Transient failures (host or Registry unreachable) are retried with exponential backoff per service.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from deployerd import memory
from deployerd.config import Settings
from deployerd.desired import DesiredState, ServiceSpec, load_desired, source_release
from deployerd.connection import HostUnreachable
from deployerd.locks import HostLocks
from deployerd.metrics import Metrics
from deployerd.observe import Hosts, observe
from deployerd.observed import ObservedState, RegistryEntry, RunState
from deployerd.phases import Deployer
from deployerd.plan import Action, ActionKind, plan
from deployerd.registry_client import RegistryClient
from deployerd.runtimes import ReleaseContext
from deployerd.secrets import SecretError, Secrets
from deployerd.source import GitSource, Kick, SourceError, start_polling
from deployerd.store import Job, JobStatus, Store, utcnow
from deployerd.tree import DirTree, GitTree, Tree

log = logging.getLogger(__name__)

# A failed job's service waits 5 s, doubling to 60 s, before its next try (a new commit skips the wait): an
# outage is not hammered, and a part that comes back is retried within a minute, like a resync.
BACKOFF_MIN_S, BACKOFF_MAX_S = 5.0, 60.0
_NO_ENTRY = RegistryEntry(id=0, name="", endpoint="", status="")


class Conflict(Exception):
    """The request conflicts with what git manages (HTTP 409)."""


@dataclass
class ReconcileRecord:
    at: str
    revision: str | None
    trigger: list[str]
    duration_s: float
    actions: int
    error: str | None = None
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage: where a slow reconcile waits


@dataclass
class _Backoff:
    failures: int = 0
    until: float = 0.0
    error: str = ""  # the last failure's, shown by /health when it was an outage (transient)
    transient: bool = False

    def fail(self, error: str, transient: bool) -> None:
        self.failures += 1
        self.error, self.transient = error, transient
        self.until = time.monotonic() + min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** (self.failures - 1))


@dataclass
class ServiceStatus:
    name: str
    host: str
    method: str
    managed_by: str
    sync_status: str  # Synced | OutOfSync | Unknown
    health_status: str  # Healthy | Progressing | Degraded | Missing | Unknown
    release: str | None  # desired
    running_release: str | None
    commit: str | None
    reasons: list[str] = field(default_factory=list)
    url: str | None = None
    last_job: str | None = None


class Engine:
    def __init__(self, settings: Settings, store: Store, registry: RegistryClient, metrics: Metrics | None = None):
        self.settings = settings
        self.store = store
        self.registry = registry
        self.metrics = metrics or Metrics()
        self.source = GitSource(settings.repo_url, settings.branch, settings.repo_cache)
        self.hosts = Hosts(settings.ssh_key, settings.known_hosts, settings.ssh_connect_timeout_s, settings.instance)
        self.metrics.watch_hosts(self.hosts.pool.stats)
        locks = HostLocks(settings.state_dir, ttl_s=settings.lock_ttl_s, wait_s=settings.lock_wait_s,
                          instance=settings.instance, on_event=lambda e: self.metrics.host_locks.labels(event=e).inc())
        self.secrets = Secrets(settings.secrets_file, settings.age_identity_file, settings.state_dir)
        self.deployer = Deployer(store, registry, self.metrics, settings.keep_releases, tree_at=self._tree_at,
                                 locks=locks, secret_env=self._current_secrets)
        self.hosts.on_back = lambda name: self.kick.set(f"host {name} back")
        self.kick = Kick()
        self.started_at = time.time()
        self.last_reconcile: ReconcileRecord | None = None
        self.desired: DesiredState | None = None
        self._loaded: DesiredState | None = None  # as validated from git, before secrets are resolved
        self._secret_env: dict[str, dict[str, str]] = {}  # service -> secret values the last plan used
        self.observed: ObservedState | None = None
        self.services: dict[str, ServiceStatus] = {}
        self._inflight: dict[str, asyncio.Task[Job]] = {}
        self._wanted: dict[str, str] = {}  # service -> release the latest reconcile wants
        self._interrupted: dict[str, str] = {}  # service -> release whose deploy the last stop cut short
        self._backoff: dict[str, _Backoff] = {}
        self._job_ended: dict[str, float] = {}  # service -> monotonic time its last job ended
        self._slots = asyncio.Semaphore(settings.max_parallel)
        self._reconcile_lock = asyncio.Lock()
        self._last_revision: str | None = None
        self._tree: GitTree | None = None  # the pinned commit's files, shared by the jobs it starts
        self._retired: list[GitTree] = []  # older commits' trees, closed once no job may read them
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stages: dict[str, float] = {}
        self._stage_t0 = 0.0

    # ------------------------------------------------------------------ lifecycle
    async def run(self, stop: asyncio.Event) -> None:
        """The daemon's loop until ``stop`` is set: triggers are the git watch, the poller and the resync."""
        interrupted = await self.store.mark_interrupted()
        if interrupted:
            log.warning("jobs interrupted by the last stop: %s", ", ".join(interrupted))
        await self.recall_interrupted()
        scheduler = AsyncIOScheduler()
        start_polling(scheduler, self.settings.poll_interval_s, lambda: self.kick.set("poll"),
                      jitter_s=self.settings.poll_interval_s / 10)
        scheduler.add_job(self._resync_tick, "interval", seconds=self.settings.resync_interval_s,
                          id="deployerd-resync", coalesce=True, max_instances=1)
        scheduler.start()
        watcher = None
        if self.source.is_local:
            watcher = asyncio.create_task(self.source.watch(lambda: self.kick.set("git watch"), stop))
        self.kick.set("start")
        try:
            while not stop.is_set():
                waiter = asyncio.create_task(self.kick.wait())
                stopper = asyncio.create_task(stop.wait())
                done, _ = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if waiter not in done:
                    waiter.cancel()
                    break
                stopper.cancel()
                await self.reconcile(waiter.result())
                memory.trim()  # what the pass freed goes back to the kernel, not to malloc's reserve
        finally:
            scheduler.shutdown(wait=False)
            if watcher is not None:
                watcher.cancel()
            await self.drain()

    async def recall_interrupted(self) -> None:
        """Read from the store the deploys a stop or crash cut short: the planner deploys them again."""
        self._interrupted = await self.store.interrupted_deploys()

    async def _resync_tick(self) -> None:
        self.kick.set("resync")

    async def drain(self) -> None:
        """Wait for the jobs in flight (used at shutdown and by tests)."""
        while self._inflight:
            await asyncio.gather(*list(self._inflight.values()), return_exceptions=True)

    def _close_retired(self) -> None:
        """Close older commits' trees (ending their git helper processes) once no job can read them."""
        if not self._inflight and self._retired:
            trees, self._retired = self._retired, []
            self._background(asyncio.to_thread(lambda: [t.close() for t in trees]))

    def _background(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        await self.drain()
        if self._tree is not None:
            self._retired.append(self._tree)
            self._tree = None
        self._close_retired()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.hosts.close()
        await self.deployer.aclose()

    # ------------------------------------------------------------------ one reconcile
    async def reconcile(self, trigger: list[str] | None = None, force: set[str] | None = None) -> list[Action]:
        """Fetch, load, observe, plan, and launch a job for every action; returns the plan.

        ``force`` names services to deploy despite a quarantine (an empty set: every service).
        """
        async with self._reconcile_lock:
            t0 = time.monotonic()
            error = None
            actions: list[Action] = []
            self._stages = {}
            try:
                actions = await self._reconcile(force)
                self.metrics.reconciles.labels(result="ok").inc()
            except Exception as e:
                error = str(e)
                log.error("reconcile failed: %s", e)
                self.metrics.reconciles.labels(result="error").inc()
            finally:
                duration = time.monotonic() - t0
                self.metrics.reconcile_duration.observe(duration)
                self.last_reconcile = ReconcileRecord(
                    at=utcnow(), revision=self.source.revision, trigger=trigger or [],
                    duration_s=round(duration, 4), actions=len(actions), error=error, stages=self._stages,
                )
            return actions

    async def _reconcile(self, force: set[str] | None) -> list[Action]:
        looked_at = time.monotonic()
        desired, observed, actions = await self.preview(force)
        revision_changed = desired.revision != self._last_revision
        self._last_revision = desired.revision
        kind = "git" if revision_changed else "resync"
        tree = self._tree
        assert tree is not None
        secret_env = self._secret_env  # the values this plan's release ids were computed from
        now = time.monotonic()
        # A service moving host is deployed on the new host first; the old one is pruned by a later
        # reconcile, once the new one serves (never a window with neither).
        deploying = {a.service for a in actions if a.kind is ActionKind.DEPLOY}
        for action in actions:
            if action.release:
                self._wanted[action.service] = action.release
            if action.kind not in (ActionKind.DEPLOY, ActionKind.RESTORE, ActionKind.REGISTER, ActionKind.PRUNE):
                continue
            if action.service in self._inflight:
                continue  # the running job sees the newer wanted release at its next phase boundary
            if self._job_ended.get(action.service, 0.0) > looked_at:
                continue  # its job ended after we looked (e.g. a rollback): the job's kick reconciles on fresh facts
            if action.kind is ActionKind.PRUNE and action.service in deploying:
                continue
            backoff = self._backoff.get(action.service)
            if backoff and backoff.until > now and not revision_changed and force is None:
                continue
            job = self._job_for(action, desired, observed, kind)
            self._launch(job, self._run_action(job, action, desired, observed, tree,
                                               secret_env.get(action.service, {})))
        self._update_status(desired, observed, actions)
        self._stage("launch")
        return actions

    def _stage(self, name: str | None) -> None:
        """Record the seconds since the previous stage ended under ``name`` (None: start the clock)."""
        now = time.monotonic()
        if name is not None:
            self._stages[name] = round(now - self._stage_t0, 4)
        self._stage_t0 = now

    async def preview(self, force: set[str] | None = None) -> tuple[DesiredState, ObservedState, list[Action]]:
        """Fetch, load and observe, and plan without acting (``deployerd plan``)."""
        self._stage(None)
        try:
            revision = await self.source.fetch()
        except SourceError as e:
            self.metrics.fetch_errors.inc()
            if self.source.revision is None:
                raise
            revision = self.source.revision  # keep reconciling the last good revision while git is down
            log.warning("git fetch failed, using %s: %s", revision[:12], e)
        self._stage("fetch")
        if self._tree is None or self._tree.revision != revision:
            if self._tree is not None:
                self._retired.append(self._tree)
            self._tree = await asyncio.to_thread(GitTree, self.source.repo_path, revision)
            self._close_retired()
        tree = self._tree
        if self._loaded is not None and self._loaded.revision == revision:
            loaded = self._loaded  # same commit, same files: validation and release ids cannot differ
        else:
            loaded = self._loaded = await asyncio.to_thread(load_desired, tree, revision)
        # secrets are resolved every time: a value rotated in the secrets file needs no commit
        desired, self._secret_env = await self.secrets.apply(loaded, tree)
        self._stage("load")  # desired state and secrets
        self.metrics.last_applied_commit.set(tree.committed_date)
        observed = await observe(self.hosts, desired.hosts, self.registry)
        self._stage("observe")
        for name, facts in observed.hosts.items():
            self.metrics.host_up.labels(host=name).set(1 if facts.reachable else 0)
        quarantined = {
            s: q.release for s, q in (await self.store.quarantined()).items()
            if force is None or (force and s not in force)
        }
        self._stage("store")
        actions = plan(desired, observed, quarantined, instance=self.settings.instance, interrupted=self._interrupted)
        self._stage("plan")
        self.desired, self.observed = desired, observed
        return desired, observed, actions

    def _job_for(self, action: Action, desired: DesiredState, observed: ObservedState, trigger: str) -> Job:
        spec = desired.services.get(action.service)
        method = spec.method if spec else _observed_method(observed, action)
        job = Job(
            service=action.service, host=action.host, method=method, kind=action.kind.value, trigger=trigger,
            commit=desired.revision, release=action.release or "", previous_release=action.current_release,
            reasons=action.reasons,
        )
        if spec is not None and action.host in desired.hosts:
            host = desired.hosts[action.host]
            job.service_port, job.droplet_id = spec.port, spec.droplet_id
            job.service_url = f"http://{host.public_address or host.address}:{spec.port}"
            job.service_path = f"{host.base_dir}/{spec.name}/releases/{action.release}"
        return job

    def _launch(self, job: Job, work: Any) -> None:
        async def runner() -> Job:
            async with self._slots:
                try:
                    return await work
                except Exception as e:  # a job must always end recorded, whatever broke
                    if not isinstance(e, HostUnreachable):
                        log.exception("job %s crashed", job.id)
                    job.status, job.error = JobStatus.FAILED, self.deployer.crashed(job, f"{type(e).__name__}: {e}")
                    job.transient = isinstance(e, HostUnreachable)
                    job.completed_at = utcnow()
                    await self.store.save_job(job)
                    return job
                finally:
                    self._inflight.pop(job.service, None)
                    self._job_ended[job.service] = time.monotonic()
                    self._close_retired()
                    self._after_job(job)

        self._inflight[job.service] = asyncio.create_task(runner(), name=f"job {job.id} {job.service}")

    def _after_job(self, job: Job) -> None:
        # Any failure backs the service off (5 s doubling to 60 s; a new commit skips the wait): an outage
        # is retried without hammering the host, and a job that keeps failing never spins in a loop.
        failed = job.status is JobStatus.FAILED
        if job.kind == ActionKind.DEPLOY.value and not job.transient:
            self._interrupted.pop(job.service, None)  # a deploy of the service ran to its end
        if failed:
            self._backoff.setdefault(job.service, _Backoff()).fail(job.error or "failed", job.transient)
        else:
            self._backoff.pop(job.service, None)
        if job.status is not JobStatus.SUPERSEDED and not job.transient:
            status = self.services.get(job.service)
            if status is not None:
                status.last_job = job.id
        self.kick.set(f"job {job.id} {job.status.value}")

    async def _run_action(
        self, job: Job, action: Action, desired: DesiredState, observed: ObservedState, tree: Tree,
        secret_env: dict[str, str],
    ) -> Job:
        if action.kind is ActionKind.PRUNE:
            facts = observed.hosts.get(action.host)
            method = _observed_method(observed, action) if facts and facts.reachable else None
            handle = await self.hosts.handle(desired.hosts[action.host]) if method else None
            # a service that moved host keeps its Registry entry: the new host's deploy wrote it
            owned = action.service not in desired.services and _owned(observed, action.service, self.settings.instance)
            return await self.deployer.prune(job, handle, method, deregister=owned)
        if action.kind is ActionKind.RESTORE:
            return await self._restore(job, action, desired)
        spec = desired.services[action.service]
        host = desired.hosts[action.host]
        ctx = ReleaseContext(spec=spec, host=host, release=desired.releases[spec.name], commit=desired.revision,
                             instance=self.settings.instance, env={**spec.env, **secret_env})
        if action.kind is ActionKind.REGISTER:
            return await self.deployer.register_only(job, ctx)
        handle = await self.hosts.handle(host)
        release = ctx.release.id
        return await self.deployer.deploy(
            job, ctx, handle, tree, previous=action.current_release,
            superseded=lambda: self._wanted.get(spec.name, release) != release,
        )

    async def _current_secrets(self, spec: ServiceSpec) -> dict[str, str]:
        """A past release's secrets, resolved again from the current sources (the secrets file now, the age file
        at the commit the daemon follows): a rollback never brings back a value that was rotated away."""
        return await self.secrets.resolve(spec, self._tree)

    async def _tree_at(self, commit: str) -> GitTree:
        """The files of any fetched commit (the caller closes it)."""
        return await asyncio.to_thread(GitTree, self.source.repo_path, commit)

    async def _fail_unstarted(self, job: Job, error: str) -> Job:
        """End a job that fails before its first phase (nothing ran on the host)."""
        job.status, job.error = JobStatus.FAILED, error
        await self.store.save_job(job)
        return job

    async def _restore(self, job: Job, action: Action, desired: DesiredState) -> Job:
        """Deploy a past release again from its record (its kept artifact, or its own commit's files)."""
        record = next((r for r in await self.store.releases(action.service) if r.release == action.release), None)
        if record is None:
            return await self._fail_unstarted(job, f"no record of release {action.release}")
        if not record.commit:
            return await self._fail_unstarted(job, f"release {action.release} has no commit to restore from")
        try:
            ctx = await self.deployer.context_for(record)
        except (SecretError, OSError) as e:
            return await self._fail_unstarted(job, str(e))
        job.commit = record.commit
        tree = await self._tree_at(record.commit)
        try:
            handle = await self.hosts.handle(desired.hosts[action.host])
            return await self.deployer.deploy(job, ctx, handle, tree, previous=None)
        finally:
            await asyncio.to_thread(tree.close)

    # ------------------------------------------------------------------ out-of-band deploys (older API)
    async def deploy_out_of_band(self, spec: ServiceSpec, root: Path) -> Job:
        """Deploy ``spec.source`` under ``root`` (a folder of the daemon's machine) as a service git does not
        manage (the older ``POST /deploy``). Raises Conflict, or ValueError for a source the rules refuse."""
        if self.desired is not None and (spec.name in self.desired.services or spec.name in self.desired.broken):
            raise Conflict(f"service {spec.name} is managed by git; commit to the desired-state repository instead")
        if self.desired is None or spec.host not in self.desired.hosts:
            raise Conflict(f"host {spec.host} is not in hosts.yaml")
        if spec.name in self._inflight:
            raise Conflict(f"a job for {spec.name} is already running")
        host = self.desired.hosts[spec.host]
        tree = DirTree(root)
        release = await asyncio.to_thread(source_release, tree, spec, host, f"POST /deploy {spec.source}")
        try:  # no repository here: only the secrets file
            secret_env = await self.secrets.resolve(spec, None)
        except (SecretError, OSError) as e:
            raise ValueError(str(e)) from None
        if spec.secrets:
            release = release.with_input("secrets", await self.secrets.digest(secret_env))
        ctx = ReleaseContext(spec=spec, host=host, release=release, commit="", managed_by="api",
                             instance=self.settings.instance, env={**spec.env, **secret_env})
        job = Job(service=spec.name, host=host.name, method=spec.method, trigger="api", managed_by="api",
                  release=release.id, reasons=["POST /deploy"], service_port=spec.port, droplet_id=spec.droplet_id,
                  service_url=ctx.endpoint, service_path=ctx.release_dir)
        await self.store.save_job(job)
        handle = await self.hosts.handle(host)
        self._launch(job, self.deployer.deploy(job, ctx, handle, tree, previous=None))
        return job

    # ------------------------------------------------------------------ status
    def _update_status(self, desired: DesiredState, observed: ObservedState, actions: list[Action]) -> None:
        rows: dict[str, ServiceStatus] = {}
        for a in actions:
            spec = desired.services.get(a.service)
            facts = observed.hosts.get(a.host)
            inst = facts.current(a.service) if facts and facts.reachable else None
            if a.kind is ActionKind.NOOP:
                sync = "Synced"
            elif facts is None or not facts.reachable:
                sync = "Unknown"
            else:
                sync = "OutOfSync"
            if facts is None or not facts.reachable:
                health = "Unknown"
            elif a.service in self._inflight:
                health = "Progressing"
            elif inst is None:
                health = "Missing"
            elif inst.state is RunState.RUNNING and inst.healthy is not False:
                health = "Healthy"
            else:
                health = "Degraded"
            host = desired.hosts.get(a.host)
            prev = self.services.get(a.service)
            rows[a.service] = ServiceStatus(
                name=a.service, host=a.host, method=spec.method if spec else (inst.method if inst else "docker"),
                managed_by="git", sync_status=sync, health_status=health, release=a.release,
                running_release=inst.release if inst else None, commit=inst.commit if inst else None,
                reasons=a.reasons,
                url=f"http://{host.public_address or host.address}:{spec.port}" if spec and host else None,
                last_job=prev.last_job if prev else None,
            )
        for name, facts in observed.hosts.items():
            for inst in facts.instances:
                if inst.managed_by == "api" and inst.current and inst.service not in rows:
                    running = inst.state is RunState.RUNNING
                    rows[inst.service] = ServiceStatus(
                        name=inst.service, host=name, method=inst.method, managed_by="api", sync_status="Unknown",
                        health_status="Healthy" if running else "Degraded", release=inst.release,
                        running_release=inst.release, commit=None, reasons=["deployed out of band (POST /deploy)"],
                    )
        self.services = rows
        self.metrics.set_services([
            {"service": r.name, "host": r.host, "method": r.method, "sync_status": r.sync_status,
             "health_status": r.health_status, "release": r.running_release or "", "commit": (r.commit or "")[:12]}
            for r in rows.values()
        ])

    def health(self) -> dict[str, Any]:
        """What /health says: computed from what the loop last saw, never from a remote call."""
        hosts = {}
        if self.observed is not None:
            hosts = {n: {"reachable": f.reachable, "error": f.error} for n, f in self.observed.hosts.items()}
        for n, down in self.hosts.down.items():  # failed hosts are retried backing off: say since when, and when next
            if n in hosts and not hosts[n]["reachable"]:
                hosts[n].update(since=down.since, attempts=down.attempts, last_attempt_at=down.last_attempt_at,
                                next_attempt_in_s=down.retry_in_s)
        registry_ok = self.observed is not None and self.observed.registry is not None
        last = self.last_reconcile
        degraded = []
        if self.source.last_error:
            degraded.append(f"git: {self.source.last_error}")
        for n, h in hosts.items():
            if not h["reachable"]:
                error = str(h["error"])
                line = error if error.startswith(f"host {n}") else f"host {n}: {error}"
                if "attempts" in h:
                    line += f" ({h['attempts']} attempts since {h['since']}, next in {h['next_attempt_in_s']:g} s)"
                degraded.append(line)
        if self.observed is not None and not registry_ok:
            degraded.append(f"registry: {self.observed.registry_error}")
        if last and last.error:
            degraded.append(f"reconcile: {last.error}")
        now = time.monotonic()
        for name, b in sorted(self._backoff.items()):  # e.g. Registrations failing while the Registry lists fine
            if b.transient:
                degraded.append(f"service {name}: {b.failures} failed attempts, next in "
                                f"{max(0.0, b.until - now):.0f} s: {b.error}")
        return {
            "status": "degraded" if degraded else ("active" if last else "starting"),
            "degraded": degraded,
            "uptime_seconds": int(time.time() - self.started_at),
            "last_reconcile": last.__dict__ if last else None,
            "git": {"url": self.source.display_url, "branch": self.settings.branch, "revision": self.source.revision,
                    "last_fetch_at": self.source.last_fetch_at.isoformat() if self.source.last_fetch_at else None,
                    "error": self.source.last_error},
            "hosts": hosts,
            "registry": {"url": self.registry.base_url, "reachable": registry_ok,
                         "error": self.observed.registry_error if self.observed else None},
            "jobs_in_flight": sorted(self._inflight),
        }


def _observed_method(observed: ObservedState, action: Action) -> str:
    facts = observed.hosts.get(action.host)
    for inst in facts.instances if facts else []:
        if inst.service == action.service:
            return inst.method
    return "docker"


def _owned(observed: ObservedState, service: str, instance: str) -> bool:
    meta = ((observed.registry or {}).get(service) or _NO_ENTRY).metadata or {}
    return meta.get("managed_by") == "deployerd" and meta.get("instance", "default") == instance

