"""A fleet service's jobs as the engine runs them: the per-host steps behind `rollout.Steps`, on one snapshot.

Every host's job is a normal six-phase job (`Deployer.deploy`, or `Restorer` for a release that ran before),
whose Register writes the fleet's one Registry entry (`rollout.FleetEntry`): the hosts' serving releases start
from what the snapshot observed and follow each switch. The rollout job holds the service's queue key, so
the newer commit a later reconcile wants supersedes it (`JobQueue.superseded`, `JobQueue.wait_superseded`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from deployerd.desired import HostSpec, ServiceSpec
from deployerd.jobqueue import JobQueue
from deployerd.observe import Hosts
from deployerd.phases import Deployer
from deployerd.plan import Action, ActionKind
from deployerd.plan_fleet import serving
from deployerd.restore import Restorer
from deployerd.rollout import FleetEntry, Policy, Rollout, waves_of
from deployerd.runtimes import ReleaseContext
from deployerd.snapshot import Snapshot
from deployerd.store import Job

LAUNCHED = (ActionKind.DEPLOY, ActionKind.RESTORE)  # a fleet's actions that go into its rollout


def is_fleet(snap: Snapshot, service: str) -> bool:
    spec = snap.desired.services.get(service)
    return spec is not None and bool(spec.fleet)


class FleetSteps:
    """`rollout.Steps` of one fleet service on one snapshot."""

    def __init__(self, snap: Snapshot, spec: ServiceSpec, *, deployer: Deployer, restorer: Restorer, hosts: Hosts,
                 queue: JobQueue, instance: str, job_for: Callable[[Action, Snapshot, str], Job]) -> None:
        self.snap, self.spec, self.deployer, self.restorer, self.hosts = snap, spec, deployer, restorer, hosts
        self.queue, self.instance, self.job_for = queue, instance, job_for
        self.release = snap.desired.releases[spec.name].id  # what the service's rollout brings
        self.entry = entry(snap, spec, deployer)

    def child(self, action: Action, parent: Job, release: str, reasons: list[str]) -> Job:
        job = self.job_for(action, self.snap, parent.trigger)
        job.release, job.reasons = release, reasons
        if release != action.release:  # a fleet's rollback: this host back to the release it ran before
            job.kind, job.previous_release = ActionKind.DEPLOY.value, self.release
        return job

    def context(self, host: str) -> ReleaseContext:
        """The desired release's context on ``host`` (its own host inputs)."""
        desired, spec = self.snap.desired, self.spec
        return ReleaseContext(spec=spec, host=desired.hosts[host], release=desired.release_on(spec.name, host),
                              commit=desired.revision, instance=self.instance,
                              env={**spec.env, **self.snap.secrets.get(spec.name, {})})

    async def deploy(self, child: Job, action: Action) -> Job:
        if action.kind is ActionKind.RESTORE:
            return await self.restorer.restore(child, action, self.snap.desired, register=self.entry.register)
        ctx = self.context(action.host)
        handle = await self.hosts.handle(ctx.host)
        return await self.deployer.deploy(child, ctx, handle, self.snap.tree, previous=action.current_release,
                                          superseded=self.queue.superseded(self.spec.name, self.release),
                                          register=self.entry.register)

    async def roll_back(self, child: Job, action: Action, release: str) -> Job:
        return await self.restorer.release_on(child, self.spec.name, self.snap.desired.hosts[action.host], release,
                                              register=self.entry.register)

    def superseded(self) -> bool:
        return self.queue.superseded(self.spec.name, self.release)()

    async def pause(self, seconds: float) -> bool:
        return await self.queue.wait_superseded(self.spec.name, self.release, seconds)


def entry(snap: Snapshot, spec: ServiceSpec, deployer: Deployer) -> FleetEntry:
    """The fleet's Registry entry, starting from the releases ``snap`` saw serving."""
    async def write(ctx: ReleaseContext, node: str | None,
                    fleet: Mapping[str, tuple[HostSpec, str]]) -> dict[str, Any]:
        return await deployer.registration(ctx, node, fleet)

    hosts = {h: snap.desired.hosts[h] for h in spec.fleet if h in snap.desired.hosts}
    return FleetEntry(hosts, serving(snap.observed, spec), write)


def rollout_job(snap: Snapshot, actions: Sequence[Action], trigger: str) -> Job:
    """The one job of a fleet service's rollout (its per-host jobs are its children)."""
    first = actions[0]
    desired = snap.desired
    reasons = [f"{a.host}: {r}" for a in actions for r in a.reasons]
    return Job(service=first.service, host=first.host, method=desired.services[first.service].method,
               kind="rollout", trigger=trigger, commit=desired.revision, release=desired.releases[first.service].id,
               reasons=reasons)


async def run_rollout(job: Job, actions: Sequence[Action], steps: FleetSteps) -> Job:
    rollout = steps.spec.rollout
    policy = Policy(pause_s=rollout.pause_s, max_failed_hosts=rollout.max_failed_hosts)
    return await Rollout(steps.deployer, steps, policy).run(job, waves_of(actions))


async def register_fleet(job: Job, action: Action, steps: FleetSteps, node: str | None) -> Job:
    """A fleet's Registry entry written again (wrong or missing while every host is in sync)."""
    return await steps.deployer.register_only(job, steps.context(action.host), node, register=steps.entry.register)
