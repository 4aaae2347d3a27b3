"""The reconcile loop: fetch -> load desired -> observe -> plan -> run jobs. A thin join of the stages.

One reconcile works on one ``Snapshot`` (one pinned commit), which the planner returns and launching reads.
Jobs run in the ``JobQueue``, one per work key (a service) at a time; a reconcile that finds a job in flight
for a service records the newer desired release, and the job stops at its next phase boundary (superseded)
so the newer commit is not kept waiting behind a health timeout. Failed jobs are retried with exponential
backoff per service. The status read model (``status.Board``) is updated from each reconcile's snapshot, and
what happened is published on ``events`` (metrics are its first subscriber).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from deployerd import fleet, memory
from deployerd.config import Settings
from deployerd.connection import Connection
from deployerd.desired import DesiredState, HostSpec, ServiceSpec, endpoint_url
from deployerd.events import EventBus, ReconcileDone
from deployerd.heal import Healer
from deployerd.hostwatch import HostWatchers
from deployerd.jobqueue import BACKOFF_MAX_S, BACKOFF_MIN_S, JobQueue
from deployerd.liveness import Liveness
from deployerd.locks import HostLocks
from deployerd.metrics import Metrics
from deployerd.observe import Hosts
from deployerd.observed import ObservedState
from deployerd.outofband import Conflict, OutOfBand
from deployerd.phases import Deployer, is_transient
from deployerd.plan import Action, ActionKind
from deployerd.registry_client import RegistryClient
from deployerd.restore import Restorer
from deployerd.runtimes import RUNTIMES, ReleaseContext, reports_events
from deployerd.runtimes.base import qualified_name
from deployerd.secrets import Secrets
from deployerd.snapshot import Planner, Snapshot
from deployerd.source import GitSource, Kick, SourceError, job_trigger, start_polling
from deployerd.status import Board, ReconcileRecord, ServiceStatus, health
from deployerd.store import Job, JobStatus, Store, utcnow

__all__ = ["BACKOFF_MAX_S", "BACKOFF_MIN_S", "Conflict", "Engine", "ReconcileRecord", "ServiceStatus"]

log = logging.getLogger(__name__)

_LAUNCHED = (ActionKind.DEPLOY, ActionKind.RESTORE, ActionKind.REGISTER, ActionKind.PRUNE)
_HEALS = (ActionKind.DEPLOY, ActionKind.RESTORE)  # what a host's event may start: an instance serving again


class Engine:
    def __init__(self, settings: Settings, store: Store, registry: RegistryClient, metrics: Metrics | None = None):
        self.settings = settings
        self.store = store
        self.registry = registry
        self.events = EventBus()  # what happened, for metrics, notifications and the status page
        self.metrics = metrics or Metrics()
        self.metrics.subscribe(self.events)
        self.source = GitSource(settings.repo_url, settings.branch, settings.repo_cache)
        self.hosts = Hosts(settings.ssh_key, settings.known_hosts, settings.ssh_connect_timeout_s, settings.instance,
                           bus=self.events)
        self.metrics.watch_hosts(self.hosts.pool.stats)
        self.secrets = Secrets(settings.secrets_file, settings.age_identity_file, settings.state_dir)
        self.queue = JobQueue(settings.max_parallel)
        self.planner = Planner(self.source, self.secrets, self.hosts, registry, store, settings.instance,
                               idle=lambda: not self.queue.in_flight,
                               out_of_band=lambda desired: self.out_of_band.wanted(desired))
        locks = HostLocks(settings.state_dir, ttl_s=settings.lock_ttl_s, wait_s=settings.lock_wait_s,
                          instance=settings.instance, on_event=self.metrics.lock_event)
        self.deployer = Deployer(store, registry, settings.keep_releases, tree_at=self.planner.tree_at,
                                 locks=locks, secret_env=self._current_secrets, events=self.events)
        self.restorer = Restorer(store, self.deployer, self.hosts, self.planner.tree_at)
        self.out_of_band = OutOfBand(self.secrets, store, self.hosts, self.deployer, settings.instance,
                                     busy=self.queue.busy, launch=self._launch, source_root=settings.api_source_root)
        self.board = Board()
        # manual drift healed from the hosts' own events (see heal, hostwatch); watched while ``run`` runs
        self.healer = Healer(self.heal_check, busy=self.queue.busy, on_note=self.board.note)
        self.watchers = HostWatchers(self.hosts, self.healer.drift, self.events)
        self._watching = False
        # "Healthy" is the manifest's probe passing: checked at start and at every resync, off the reconcile
        self.liveness = Liveness(self.deployer.http, self._connection)
        self._probing: asyncio.Task[None] | None = None
        self.metrics.watch_services(self.board.metric_rows)
        self.kick = Kick()
        self.hosts.on_back = lambda name: self.kick.set(f"host {name} back")
        self.started_at = time.time()
        self.seen: Snapshot | None = None  # the latest snapshot taken, by a reconcile or a preview
        self._acted: Snapshot | None = None  # the latest snapshot a reconcile launched from (heals plan on it)
        self._interrupted: dict[str, str] = {}  # service -> release whose deploy the last stop cut short
        self._reconcile_lock = asyncio.Lock()
        self._last_revision: str | None = None

    # ------------------------------------------------------------------ read side
    @property
    def desired(self) -> DesiredState | None:
        """What git wanted at the latest snapshot (hosts, services)."""
        return self.seen.desired if self.seen else None

    @property
    def observed(self) -> ObservedState | None:
        return self.seen.observed if self.seen else None

    @property
    def services(self) -> dict[str, ServiceStatus]:
        return self.board.services

    @property
    def last_reconcile(self) -> ReconcileRecord | None:
        return self.board.last_reconcile

    def health(self) -> dict[str, Any]:
        """What /health says: computed from what the loop last saw, never from a remote call."""
        out = health(board=self.board, desired=self.desired, observed=self.observed, source=self.source,
                      branch=self.settings.branch,
                      registry_url=self.registry.base_url, hosts_down=self.hosts.down, failing=self.queue.failing,
                      in_flight=self.queue.in_flight, started_at=self.started_at)
        for host, method in sorted(self.watchers.listening):  # whose own events heal drift at once
            if host in out["hosts"]:
                out["hosts"][host].setdefault("events", []).append(method)
        return out

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
        self._watching = self.settings.heal_on_events
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
            await self._stop_watching()
            await self.drain()

    async def recall_interrupted(self) -> None:
        """Read from the store the deploys a stop or crash cut short: the planner deploys them again."""
        self._interrupted = await self.store.interrupted_deploys()

    async def _resync_tick(self) -> None:
        self.kick.set("resync")

    async def drain(self) -> None:
        """Wait for the jobs in flight and the health probes (used at shutdown and by tests)."""
        await self.queue.drain()
        if self._probing is not None:
            await asyncio.gather(self._probing, return_exceptions=True)

    async def _stop_watching(self) -> None:
        """No heal from an event after this (a stop, or a test removing what it deployed)."""
        self._watching = False
        await self.watchers.close()
        await self.healer.close()

    async def close(self) -> None:
        await self._stop_watching()
        await self.drain()
        await self.planner.close()
        await self.hosts.close()
        await self.deployer.aclose()

    # ------------------------------------------------------------------ one reconcile
    async def preview(self, force: set[str] | None = None, prune_all: bool = False) -> Snapshot:
        """Fetch, load, observe and plan without acting (``deployerd plan``)."""
        snap = await self.planner.snapshot(force, self._interrupted, prune_all)
        self.seen = snap
        return snap

    async def reconcile(self, trigger: list[str] | None = None, force: set[str] | None = None,
                        prune_all: bool = False) -> list[Action]:
        """Fetch, load, observe, plan, and launch a job for every action; returns the plan.

        ``force`` names services to deploy despite a quarantine (an empty set: every service); ``prune_all``
        lets this one reconcile prune a commit that removes every service (see `plan.plan`).
        """
        async with self._reconcile_lock:
            t0 = time.monotonic()
            snap: Snapshot | None = None
            error = fetch_error = None
            stages: dict[str, float] = {}
            try:
                snap = await self.preview(force, prune_all)
                stages.update(snap.stages)
                launch_t0 = time.monotonic()
                self._launch_all(snap, force, looked_at=t0, reasons=trigger or [])
                stages["launch"] = round(time.monotonic() - launch_t0, 4)
            except Exception as e:
                error = str(e)
                fetch_error = error if isinstance(e, SourceError) else None
                log.error("reconcile failed: %s", e)
            duration = time.monotonic() - t0
            actions = snap.actions if snap else []
            self.board.last_reconcile = ReconcileRecord(
                at=utcnow(), revision=self.source.revision, trigger=trigger or [], duration_s=round(duration, 4),
                actions=len(actions), error=error, stages=stages,
            )
            self.events.publish(ReconcileDone(
                revision=self.source.revision, trigger=tuple(trigger or ()), duration_s=duration,
                actions=len(actions), error=error, fetch_error=snap.fetch_error if snap else fetch_error,
                commit_time=snap.tree.committed_date if snap else None,
            ))
            return actions

    def _launch_all(self, snap: Snapshot, force: set[str] | None, looked_at: float, reasons: list[str]) -> None:
        """A job for every action of ``snap`` that needs one and may start now; then the statuses."""
        self._acted = snap
        revision_changed = snap.desired.revision != self._last_revision
        self._last_revision = snap.desired.revision
        kind = job_trigger(reasons, revision_changed)
        now = time.monotonic()
        # A service moving host is deployed on the new host first; the old one is pruned by a later
        # reconcile, once the new one serves (never a window with neither).
        deploying = {a.service for a in snap.actions if a.kind is ActionKind.DEPLOY}
        rollouts: dict[str, list[Action]] = {}  # a fleet service: its hosts' actions, one rollout job
        for action in snap.actions:
            if fleet.is_fleet(snap, action.service) and action.kind in fleet.LAUNCHED:
                rollouts.setdefault(action.service, []).append(action)
        for action in snap.actions:
            self._want(action, snap)
            if action.service in rollouts and action.kind is not ActionKind.PRUNE:
                continue  # in its rollout (a REGISTER too: the rollout's hosts register the fleet)
            if action.kind is ActionKind.PRUNE and action.service in deploying:
                continue
            if not self._launchable(action, looked_at, now, retry_now=revision_changed or force is not None):
                continue
            self._start([action], snap, kind)
        for actions in rollouts.values():
            if self._launchable(actions[0], looked_at, now, retry_now=revision_changed or force is not None):
                self._start(actions, snap, kind)
        self.board.update(snap, self.queue.in_flight, self.liveness.probes)
        if self._watching:
            self.watchers.sync(_watchable(snap))
        if any(r in ("start", "resync") for r in reasons) and (self._probing is None or self._probing.done()):
            self._probing = asyncio.create_task(self._check_health(snap), name="health probes")

    def _launchable(self, action: Action, looked_at: float, now: float, retry_now: bool) -> bool:
        """May a job start now for ``action``, planned on facts read at ``looked_at``? ``retry_now``: git changed
        or a sync asked, so a failing service's backoff (and a flapping one's) is not waited for."""
        if action.kind not in _LAUNCHED:
            return False
        if self.queue.busy(action.service):
            return False  # the running job sees the newer wanted release at its next phase boundary
        if self.queue.ended_after(action.service, looked_at):
            return False  # its job ended after we looked (e.g. a rollback): the job's kick reconciles on fresh facts
        if retry_now:
            return True
        return not (self.queue.backing_off(action.service, now)
                    or (action.kind in _HEALS and self.healer.holding(action.service, now)))

    async def heal_check(self, host: str, services: set[str] | None, reasons: list[str]) -> set[str]:
        """After ``host``'s own event: look at ``services`` there again (None: every one) and launch the jobs the
        planner finds for them (trigger ``heal``), with a reconcile's plan, guards and job code; returns the
        services a job started for. A service with a job in flight is not even looked at: the event is that
        job's own doing, or the reconcile its end starts sees it."""
        snap = self._acted  # never a preview's (``deployerd plan``): a heal acts on what the reconciles act on
        if snap is None or not self._watching or host not in snap.desired.hosts:
            return set()
        ours = set(snap.desired.services) | set(snap.out_of_band)
        wanted = {s for s in (ours if services is None else services & ours) if not self.queue.busy(s)}
        if not wanted:
            return set()
        looked_at = time.monotonic()
        fresh = await self.planner.look_again(snap, host, self._interrupted)
        now = time.monotonic()
        launched: set[str] = set()
        for action in fresh.actions:
            if action.host != host or action.service not in wanted or action.kind not in _HEALS:
                continue
            if not self._watching or not self._launchable(action, looked_at, now, retry_now=False):
                continue
            self._want(action, fresh)  # what the reconcile of ``snap`` wants too (a newer one supersedes this job)
            job = self._start([action], fresh, "heal")
            job.reasons = [*reasons, *job.reasons]
            log.info("healing %s on %s: %s", action.service, host, "; ".join(job.reasons))
            launched.add(action.service)
        if launched and self.seen is not None:
            self.board.update(self.seen, self.queue.in_flight, self.liveness.probes)
        return launched

    async def _connection(self, host: HostSpec) -> Connection:
        return (await self.hosts.handle(host)).conn

    async def _check_health(self, snap: Snapshot) -> None:
        """Probe what ``snap`` saw running, then show the verdicts on the latest look."""
        try:
            await self.liveness.check(snap)
        except Exception as e:  # a status read-out: never fails the loop
            log.warning("health probes failed: %s", e)
        if self.seen is not None:
            self.board.update(self.seen, self.queue.in_flight, self.liveness.probes)

    def _job_for(self, action: Action, snap: Snapshot, trigger: str) -> Job:
        desired = snap.desired
        oob = snap.out_of_band_context(action)
        spec = oob.spec if oob else desired.services.get(action.service)
        method = spec.method if spec else snap.observed.method_of(action.host, action.service)
        job = Job(
            service=action.service, host=action.host, method=method, kind=action.kind.value, trigger=trigger,
            commit="" if oob else desired.revision, release=action.release or "",
            previous_release=action.current_release, reasons=action.reasons, managed_by="api" if oob else "git",
        )
        if spec is not None and action.host in desired.hosts:
            host = desired.hosts[action.host]
            job.service_port, job.droplet_id = spec.port, spec.droplet_id
            job.service_url = endpoint_url(host, spec.port)
            qualified = qualified_name(spec.name, self.settings.instance)
            job.service_path = f"{host.base_dir}/{qualified}/releases/{action.release}"
        return job

    def _want(self, action: Action, snap: Snapshot) -> None:
        """The release ``action``'s service should end on (a fleet's: git's, even on a host restoring another)."""
        release = snap.desired.releases[action.service].id if fleet.is_fleet(snap, action.service) else action.release
        if release:
            self.queue.want(action.service, release)

    def _start(self, actions: list[Action], snap: Snapshot, trigger: str) -> Job:
        """Launch the job of one action, or a fleet service's rollout of its hosts' ``actions``."""
        action = actions[0]
        if fleet.is_fleet(snap, action.service) and action.kind in fleet.LAUNCHED:
            job = fleet.rollout_job(snap, actions, trigger)
            self._launch(job, fleet.run_rollout(job, actions, self._fleet_steps(snap, action.service)))
        else:
            job = self._job_for(action, snap, trigger)
            self._launch(job, self._run_action(job, action, snap))
        return job

    def _fleet_steps(self, snap: Snapshot, service: str) -> fleet.FleetSteps:
        return fleet.FleetSteps(snap, snap.desired.services[service], deployer=self.deployer, restorer=self.restorer,
                                hosts=self.hosts, queue=self.queue, instance=self.settings.instance,
                                job_for=self._job_for)

    def _launch(self, job: Job, work: Awaitable[Job]) -> None:
        self.queue.launch(job.service, job, work, crashed=self._crashed, ended=self._ended)

    async def _crashed(self, job: Job, e: Exception) -> Job:
        """End a job whose work raised (a host lost mid-job is transient: retried, never quarantined)."""
        if not is_transient(e):
            log.exception("job %s crashed", job.id, exc_info=e)
        return await self.deployer.end_crashed(job, e)

    def _ended(self, job: Job) -> None:
        self.planner.close_retired()
        if job.kind in (ActionKind.DEPLOY.value, "rollout") and not job.transient:
            self._interrupted.pop(job.service, None)  # a deploy of the service ran to its end
        if job.status is not JobStatus.SUPERSEDED and not job.transient:
            self.board.job_ended(job.service, job.id)
        self.kick.set(f"job {job.id} {job.status.value}")

    async def _run_action(self, job: Job, action: Action, snap: Snapshot) -> Job:
        desired, observed = snap.desired, snap.observed
        if action.kind is ActionKind.PRUNE:
            facts = observed.hosts.get(action.host)
            method = observed.method_of(action.host, action.service) if facts and facts.reachable else None
            handle = await self.hosts.handle(desired.hosts[action.host]) if method else None
            # a service that moved host keeps its Registry entry: the new host's deploy wrote it
            owned = action.service not in desired.services and observed.owns_entry(action.service,
                                                                                   self.settings.instance)
            return await self.deployer.prune(job, handle, method, deregister=owned)
        if (oob := snap.out_of_band_context(action)) is not None:
            if action.kind is ActionKind.REGISTER:
                return await self.deployer.register_only(job, oob)
            return await self.out_of_band.heal(job, action, oob)
        if action.kind is ActionKind.RESTORE:
            return await self.restorer.restore(job, action, desired)
        spec = desired.services[action.service]
        host = desired.hosts[action.host]
        ctx = ReleaseContext(spec=spec, host=host, release=desired.releases[spec.name], commit=desired.revision,
                             instance=self.settings.instance, env={**spec.env, **snap.secrets.get(spec.name, {})})
        if action.kind is ActionKind.REGISTER:
            if spec.fleet:
                return await fleet.register_fleet(job, action, self._fleet_steps(snap, spec.name), None)
            return await self.deployer.register_only(job, ctx, observed.node_of(action.host, action.service))
        handle = await self.hosts.handle(host)
        return await self.deployer.deploy(job, ctx, handle, snap.tree, previous=action.current_release,
                                          superseded=self.queue.superseded(spec.name, ctx.release.id))

    async def _current_secrets(self, spec: ServiceSpec) -> dict[str, str]:
        """A past release's secrets, resolved again from the current sources (the secrets file now, the age file
        at the commit the daemon follows): a rollback never brings back a value that was rotated away."""
        return await self.secrets.resolve(spec, self.planner.tree)

    # ------------------------------------------------------------------ out-of-band deploys (older API)
    async def deploy_out_of_band(self, spec: ServiceSpec, root: Path, request: dict[str, Any] | None = None) -> Job:
        """The older ``POST /deploy`` (see ``outofband``; ``request`` is kept on the job as sent): raises
        Conflict, or ValueError."""
        previous = self.seen.out_of_band.get(spec.name) if self.seen else None
        return await self.out_of_band.deploy(spec, root, self.desired, request,
                                             previous=previous.release.id if previous else None)

    async def remove_out_of_band(self, name: str) -> Job:
        """``DELETE /deploy/services/{name}`` (see ``outofband``): raises Conflict, or KeyError."""
        return await self.out_of_band.remove(name, self.desired, self.observed)


def _watchable(snap: Snapshot) -> dict[str, tuple[HostSpec, list[str]]]:
    """host -> its spec and the runtimes that answered there: what the host watchers follow."""
    out = {}
    for name, spec in snap.desired.hosts.items():
        facts = snap.observed.hosts.get(name)
        if facts is not None and facts.reachable:
            methods = [m for m in RUNTIMES if facts.unknown(m) is None and reports_events(m)]
            if methods:
                out[name] = (spec, methods)
    return out
