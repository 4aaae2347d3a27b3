"""A fleet service's rollout: its hosts in waves behind a canary, and the fleet's rollback when a host fails.

One rollout is one job (kind ``rollout``) with a child job per host; a child is a normal six-phase deploy (the
same runner, lock and zero-downtime switch as a one-host service). The executor here only orders them, behind
the small `Steps` interface the engine implements (so its rules are unit-tested with fakes):

- waves run in order, the hosts of a wave at once; wave N+1 starts when every host of wave N succeeded and
  ``pause_s`` has passed (a wait a newer commit ends);
- a host failing for good (more than ``max_failed_hosts`` of them) ends the rollout: its own deploy rolled it
  back already; every other host this rollout switched is deployed back to the release it ran before
  (``Action.current_release``), the release stays quarantined and is marked failed: ``rolled_back``;
- a host that could not be reached (a transient failure) pauses the rollout: the job fails transient, nothing
  rolls back, nothing is quarantined, and the next reconcile plans the rest (paused while the host is down);
- a newer commit stops it at the next wave boundary (or a child's phase boundary): ``superseded``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from deployerd.desired import HostSpec
from deployerd.failpoints import failpoint
from deployerd.jobrecord import JobRecorder
from deployerd.plan import Action
from deployerd.runtimes import ReleaseContext
from deployerd.store import Job, JobStatus

log = logging.getLogger(__name__)

SUPERSEDED = "a newer commit changed this service; the rollout stopped at a wave boundary"


class Steps(Protocol):
    """What a rollout asks of the engine, per host."""

    def child(self, action: Action, parent: Job, release: str, reasons: list[str]) -> Job:
        """A new per-host job of ``parent`` for ``action.host``, deploying ``release`` (not yet saved)."""

    async def deploy(self, child: Job, action: Action) -> Job:
        """Run ``child``: ``action``'s release on its host, six phases; returns the ended job."""

    async def roll_back(self, child: Job, action: Action, release: str) -> Job:
        """Run ``child``: ``action.host`` back to ``release`` (kept there), six phases; returns the ended job."""

    def superseded(self) -> bool:
        """Whether a newer commit wants another release of the service."""

    async def pause(self, seconds: float) -> bool:
        """Wait ``seconds`` between waves; True if a newer commit came meanwhile (the wait ends at once)."""


@dataclass(frozen=True)
class Policy:
    pause_s: float = 0.0
    max_failed_hosts: int = 0


@dataclass
class Outcome:
    """What one wave did."""

    switched: list[Action]
    failed: list[Job]
    transient: list[Job]
    superseded: bool


class Rollout:
    """Runs one rollout job to its end (see the module's docstring)."""

    def __init__(self, recorder: JobRecorder, steps: Steps, policy: Policy) -> None:
        self.recorder, self.steps, self.policy = recorder, steps, policy

    async def run(self, job: Job, waves: Sequence[Sequence[Action]]) -> Job:
        job.kind = "rollout"
        job.waves = [[a.host for a in wave] for wave in waves]
        await self.recorder.begin(job, ())
        before = Counter(a.current_release for wave in waves for a in wave
                         if a.current_release and a.current_release != job.release)
        fallback = before.most_common(1)[0][0] if before else None  # a host new to the fleet goes back to it
        switched: list[Action] = []
        failed: list[Job] = []
        for n, wave in enumerate(waves):
            if n and self.policy.pause_s > 0 and await self.steps.pause(self.policy.pause_s):
                return await self._end(job, failed, JobStatus.SUPERSEDED, f"{SUPERSEDED} (before wave {n})")
            if n:
                await failpoint("Between Waves")  # test-only: the crash test kills the daemon here
            if self.steps.superseded():
                return await self._end(job, failed, JobStatus.SUPERSEDED, f"{SUPERSEDED} (before wave {n})")
            out = await self._wave(job, wave, n)
            switched += out.switched
            failed += out.failed
            if len(failed) > self.policy.max_failed_hosts:
                return await self._roll_back(job, switched, failed, fallback)
            if out.transient:
                hosts = ", ".join(c.host for c in out.transient)
                why = "; ".join(c.error or "unreachable" for c in out.transient)
                return await self._end(job, failed, JobStatus.FAILED,
                                       f"rollout paused at wave {n}: host {hosts} unreachable: {why}", True)
            if out.superseded:
                return await self._end(job, failed, JobStatus.SUPERSEDED, f"{SUPERSEDED} (in wave {n})")
        return await self._end(job, failed, JobStatus.SUCCEEDED)

    async def _end(self, job: Job, failed: list[Job], status: JobStatus, error: str | None = None,
                   transient: bool = False) -> Job:
        """End a rollout that was not rolled back. Hosts that failed within ``max_failed_hosts`` are told (and
        retried later): their own deploys quarantined the release, which the others serve, so it is lifted."""
        if failed:
            await self.recorder.store.lift_quarantine(job.service, job.release)
            tolerated = f"{_failures(failed)} (tolerated: max_failed_hosts {self.policy.max_failed_hosts})"
            error = f"{error}; {tolerated}" if error else f"{tolerated}; the other hosts serve {job.release}"
            status = JobStatus.FAILED if status is JobStatus.SUCCEEDED else status
        return await self.recorder.end(job, status, error, transient)

    async def _wave(self, job: Job, wave: Sequence[Action], n: int) -> Outcome:
        label = _label(wave, n)
        children = [self.steps.child(a, job, a.release or job.release, [f"rollout {job.id}: {label}", *a.reasons])
                    for a in wave]
        await self._adopt(job, children)
        ended = await asyncio.gather(*(self._run_child(c, self.steps.deploy(c, a)) for c, a in zip(children, wave,
                                                                                                   strict=True)))
        out = Outcome([], [], [], False)
        for action, child in zip(wave, ended, strict=True):
            if child.status is JobStatus.SUCCEEDED:
                out.switched.append(action)
            elif child.status is JobStatus.SUPERSEDED:
                out.superseded = True
            elif child.transient:
                out.transient.append(child)
            else:
                out.failed.append(child)
        return out

    async def _roll_back(self, job: Job, switched: list[Action], failed: list[Job], fallback: str | None) -> Job:
        """Every host this rollout switched goes back to what it ran before (a host new to the fleet: to what
        most hosts ran); the release is rejected (quarantined by the failed host's deploy, marked failed)."""
        cause = _failures(failed)
        targets = {a.host: a.current_release if a.current_release not in (None, job.release) else fallback
                   for a in switched}
        back = [a for a in switched if targets[a.host]]
        left = [a.host for a in switched if not targets[a.host]]
        # rejected first: a host whose roll-back fails must not take the rejected release for its last good
        await self.recorder.store.set_release_status(job.service, job.release, "failed")
        children = [self.steps.child(a, job, targets[a.host] or "", [f"fleet rollback: {cause}"]) for a in back]
        await self._adopt(job, children)
        ended = await asyncio.gather(*(self._run_child(c, self.steps.roll_back(c, a, c.release))
                                       for c, a in zip(children, back, strict=True)))
        broken = [c for c in ended if c.status is not JobStatus.SUCCEEDED]
        back_to = Counter([c.release for c in ended if c.status is JobStatus.SUCCEEDED]
                          + [r for c in failed if (r := (c.rollback or {}).get("release"))]).most_common(1)
        job.rollback = {"release": back_to[0][0] if back_to else None,  # what most hosts went back to
                        "hosts": {c.host: c.release for c in ended if c.status is JobStatus.SUCCEEDED},
                        "failed_hosts": [c.host for c in failed], "reason": cause,
                        **({"error": _failures(broken)} if broken else {}),
                        **({"not_rolled_back": left, "why": "no earlier release to go back to"} if left else {})}
        status = JobStatus.FAILED if broken or left else JobStatus.ROLLED_BACK
        return await self.recorder.end(job, status, f"{cause}; fleet rolled back", transient=False)

    async def _adopt(self, job: Job, children: list[Job]) -> None:
        for child in children:
            child.parent = job.id
            job.children.append(child.id)
        await self.recorder.store.save_job(job)

    async def _run_child(self, child: Job, work: Awaitable[Job]) -> Job:
        """A child's work; one that raises is ended as crashed (a host lost mid-job: transient)."""
        try:
            return await work
        except Exception as e:
            log.warning("rollout child %s on %s crashed: %s", child.id, child.host, e)
            return await self.recorder.end_crashed(child, e)


def _label(wave: Sequence[Action], n: int) -> str:
    """How a host's job names its wave: the planner's number (0: the canary); none: a restore of every host."""
    w = next((a.wave for a in wave if a.wave is not None), None)
    return "every host at once" if w is None else "canary" if w == 0 else f"wave {w}"


def _failures(failed: Sequence[Job]) -> str:
    return "; ".join(f"host {c.host} failed: {c.error or c.status.value}" for c in failed)


def waves_of(actions: Sequence[Action]) -> list[list[Action]]:
    """A fleet service's launchable actions grouped by ``Action.wave``, in wave order (a RESTORE of a rejected
    release, wave None, runs in the first)."""
    numbered = sorted({a.wave for a in actions if a.wave is not None})
    first = numbered[0] if numbered else 0
    groups: dict[int, list[Action]] = {}
    for a in actions:
        groups.setdefault(first if a.wave is None else a.wave, []).append(a)
    return [groups[w] for w in sorted(groups)]


class FleetEntry:
    """The fleet's one Registry entry: every host's serving release, kept as hosts switch, written under one
    lock (hosts of a wave register at once; each write carries every host's release, never a stale map)."""

    def __init__(self, hosts: Mapping[str, HostSpec], serving: Mapping[str, str],
                 write: Callable[[ReleaseContext, str | None, Mapping[str, tuple[HostSpec, str]]],
                                 Awaitable[dict[str, Any]]]) -> None:
        self.hosts = dict(hosts)  # in fleet order
        self.serving = {h: r for h, r in serving.items() if h in self.hosts}
        self._write = write
        self._lock = asyncio.Lock()

    def fleet(self) -> dict[str, tuple[HostSpec, str]]:
        return {h: (spec, self.serving[h]) for h, spec in self.hosts.items() if h in self.serving}

    async def register(self, ctx: ReleaseContext, node: str | None) -> dict[str, Any]:
        """The `phases.Registrar` of every host of the rollout (and of each host's own rollback)."""
        async with self._lock:
            self.serving[ctx.host.name] = ctx.release.id
            return await self._write(ctx, node, self.fleet())
