"""The rollout executor behind its `Steps` interface (fake per-host steps, a real store and job recorder):
waves in order, a wave's hosts at once, the pause, max_failed_hosts, the fleet's rollback, a transient failure
that pauses, a newer commit at a wave boundary; the fleet's Registry entry under one lock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fakes import context

from deployerd.connection import HostUnreachable
from deployerd.desired import HostSpec
from deployerd.events import EventBus
from deployerd.jobqueue import JobQueue
from deployerd.jobrecord import JobRecorder
from deployerd.plan import Action, ActionKind
from deployerd.rollout import FleetEntry, Policy, Rollout, waves_of
from deployerd.runtimes import ReleaseContext
from deployerd.store import Job, JobStatus, Quarantine, Store, utcnow

pytestmark = pytest.mark.asyncio(loop_scope="function")

OLD, NEW = "r-old", "r-new"


class FakeSteps:
    """Per-host outcomes set by the test: ``fail`` (terminal: its own deploy rolled it back and quarantined the
    release), ``down`` (transient), ``supersede`` (the child stopped at a phase boundary)."""

    def __init__(self, recorder: JobRecorder) -> None:
        self.recorder = recorder
        self.serving: dict[str, str] = {}
        self.log: list[tuple[str, str, str]] = []  # (step, host, release), in the order they started/ended
        self.fail: set[str] = set()
        self.down: set[str] = set()
        self.supersede: set[str] = set()
        self.crash: set[str] = set()
        self.newer = False  # a newer commit is wanted
        self.newer_after: str | None = None  # the newer commit comes once this host has deployed
        self.pauses: list[float] = []
        self.active = self.most_at_once = 0
        self.wave_of: dict[str, list[str]] = {}  # host -> the hosts of its wave (from the rollout's record)
        self.started: set[str] = set()

    def child(self, action: Action, parent: Job, release: str, reasons: list[str]) -> Job:
        self.wave_of.update({h: wave for wave in parent.waves for h in wave})
        return Job(service=parent.service, host=action.host, release=release, reasons=reasons,
                   previous_release=action.current_release)

    async def _run(self, step: str, child: Job, outcome: tuple[JobStatus, str | None, bool]) -> Job:
        await self.recorder.begin(child, ())
        self.log.append((f"{step} start", child.host, child.release))
        self.active += 1
        self.most_at_once = max(self.most_at_once, self.active)
        self.started.add(child.host)
        if step == "deploy":  # every host of the wave runs at once: each waits here for the others to start
            async with asyncio.timeout(5):
                while not self.started >= set(self.wave_of[child.host]):
                    await asyncio.sleep(0.001)
        self.active -= 1
        if child.host in self.crash:
            raise HostUnreachable(child.host, "connection lost")
        status, error, transient = outcome
        if status is JobStatus.SUCCEEDED:
            self.serving[child.host] = child.release
        self.log.append((f"{step} end", child.host, child.release))
        if child.host == self.newer_after:
            self.newer = True
        return await self.recorder.end(child, status, error, transient)

    async def deploy(self, child: Job, action: Action) -> Job:
        host = child.host
        if host in self.fail:
            await self.recorder.store.quarantine(Quarantine(service=child.service, release=child.release,
                                                            job_id=child.id, reason="health", created_at=utcnow()))
            return await self._run("deploy", child, (JobStatus.ROLLED_BACK, "Verify Health: never healthy", False))
        if host in self.down:
            return await self._run("deploy", child, (JobStatus.FAILED, f"host {host} unreachable", True))
        if host in self.supersede:
            return await self._run("deploy", child, (JobStatus.SUPERSEDED, "superseded", False))
        return await self._run("deploy", child, (JobStatus.SUCCEEDED, None, False))

    async def roll_back(self, child: Job, action: Action, release: str) -> Job:
        assert release == child.release
        return await self._run("roll back", child, (JobStatus.SUCCEEDED, None, False))

    def superseded(self) -> bool:
        return self.newer

    async def pause(self, seconds: float) -> bool:
        self.pauses.append(seconds)
        return self.newer

    def deployed(self) -> list[str]:
        return [h for step, h, _ in self.log if step == "deploy start"]


class Rig:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.recorder = JobRecorder(store, EventBus())
        self.steps = FakeSteps(self.recorder)

    async def run(self, waves: list[list[str]], policy: Policy | None = None,
                  current: dict[str, str | None] | None = None) -> Job:
        current = current or {}
        actions = [[Action(service="web", host=h, kind=ActionKind.DEPLOY, release=NEW, wave=n,
                           current_release=current.get(h, OLD)) for h in wave] for n, wave in enumerate(waves)]
        for wave in actions:
            for a in wave:
                if a.current_release:
                    self.steps.serving[a.host] = a.current_release
        job = Job(service="web", host=waves[0][0], release=NEW)
        return await Rollout(self.recorder, self.steps, policy or Policy()).run(job, actions)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    store = await Store.open(tmp_path / "state.db")
    yield Rig(store)
    await store.close()


WAVES = [["h1"], ["h2", "h3"], ["h4", "h5"]]


async def test_waves_run_in_order_a_waves_hosts_at_once(rig: Rig) -> None:
    job = await rig.run(WAVES)
    assert job.status is JobStatus.SUCCEEDED, job.error
    assert job.kind == "rollout" and job.waves == WAVES
    assert rig.steps.serving == dict.fromkeys(["h1", "h2", "h3", "h4", "h5"], NEW)
    # every host of wave N ended before any host of wave N+1 started; a wave's hosts overlapped
    order = [(step, h) for step, h, _ in rig.steps.log]
    for earlier, later in zip(WAVES, WAVES[1:], strict=False):
        last_end = max(order.index(("deploy end", h)) for h in earlier)
        first_start = min(order.index(("deploy start", h)) for h in later)
        assert last_end < first_start
    assert rig.steps.most_at_once == 2
    assert rig.steps.pauses == []  # pause_s 0: no wait
    stored = await rig.store.job(job.id)
    assert stored is not None and len(stored.children) == 5 and stored.waves == WAVES
    kids = [await rig.store.job(c) for c in stored.children]
    assert all(k is not None and k.parent == job.id and k.status is JobStatus.SUCCEEDED for k in kids)
    assert kids[0] is not None and kids[0].reasons[0] == f"rollout {job.id}: canary"
    assert kids[2] is not None and kids[2].reasons[0] == f"rollout {job.id}: wave 1"


async def test_pause_between_waves_only(rig: Rig) -> None:
    job = await rig.run(WAVES, Policy(pause_s=2.5))
    assert job.status is JobStatus.SUCCEEDED and rig.steps.pauses == [2.5, 2.5]


async def test_a_failed_canary_means_no_other_host_runs_the_release(rig: Rig) -> None:
    rig.steps.fail.add("h1")
    job = await rig.run(WAVES)
    assert job.status is JobStatus.ROLLED_BACK, job.error
    assert rig.steps.deployed() == ["h1"]
    assert set(rig.steps.serving.values()) == {OLD}
    assert (await rig.store.quarantined())["web"].release == NEW
    assert job.error and "host h1 failed: Verify Health" in job.error
    assert job.rollback is not None and job.rollback["failed_hosts"] == ["h1"] and job.rollback["hosts"] == {}


async def test_wave_2_fails_on_host_3_every_switched_host_goes_back(rig: Rig) -> None:
    rig.steps.fail.add("h3")
    job = await rig.run(WAVES, current={"h1": "r-a", "h2": "r-b"})
    assert job.status is JobStatus.ROLLED_BACK, job.error
    assert "h4" not in rig.steps.deployed() and "h5" not in rig.steps.deployed()
    # each host back to the release it ran before this rollout, none left on the rejected one
    assert rig.steps.serving == {"h1": "r-a", "h2": "r-b", "h3": OLD, "h4": OLD, "h5": OLD}
    assert job.rollback is not None and job.rollback["hosts"] == {"h1": "r-a", "h2": "r-b"}
    assert job.rollback["release"] in ("r-a", "r-b")
    assert (await rig.store.quarantined())["web"].release == NEW
    stored = await rig.store.job(job.id)
    assert stored is not None and len(stored.children) == 3 + 2  # three deploys, two roll-backs
    backs = [await rig.store.job(c) for c in stored.children[3:]]
    assert all(b is not None and b.parent == job.id and b.reasons[0].startswith("fleet rollback: host h3")
               for b in backs)


async def test_a_host_new_to_the_fleet_goes_back_to_what_most_hosts_ran(rig: Rig) -> None:
    rig.steps.fail.add("h3")
    job = await rig.run(WAVES, current={"h1": None})
    assert job.status is JobStatus.ROLLED_BACK, job.error
    assert rig.steps.serving["h1"] == OLD and rig.steps.serving["h2"] == OLD


async def test_nothing_to_go_back_to_is_said_and_the_job_failed(rig: Rig) -> None:
    rig.steps.fail.add("h2")
    job = await rig.run([["h1"], ["h2"]], current={"h1": None, "h2": None})
    assert job.status is JobStatus.FAILED
    assert job.rollback is not None and job.rollback["not_rolled_back"] == ["h1"]


async def test_failures_within_max_failed_hosts_go_on(rig: Rig) -> None:
    rig.steps.fail.add("h2")
    job = await rig.run(WAVES, Policy(max_failed_hosts=1))
    assert job.status is JobStatus.FAILED and not job.transient
    assert sorted(rig.steps.deployed()) == ["h1", "h2", "h3", "h4", "h5"]
    assert sorted(h for h, r in rig.steps.serving.items() if r == NEW) == ["h1", "h3", "h4", "h5"]
    assert "web" not in await rig.store.quarantined()  # the others serve it: not rejected
    assert job.error and "tolerated: max_failed_hosts 1" in job.error


async def test_one_more_failure_than_allowed_rolls_the_fleet_back(rig: Rig) -> None:
    rig.steps.fail.update({"h2", "h4"})
    job = await rig.run(WAVES, Policy(max_failed_hosts=1))
    assert job.status is JobStatus.ROLLED_BACK
    assert set(rig.steps.serving.values()) == {OLD}
    assert (await rig.store.quarantined())["web"].release == NEW


async def test_a_host_unreachable_pauses_no_rollback_no_quarantine(rig: Rig) -> None:
    rig.steps.down.add("h2")
    job = await rig.run(WAVES)
    assert job.status is JobStatus.FAILED and job.transient
    assert job.error and job.error.startswith("rollout paused at wave 1: host h2 unreachable")
    assert "h4" not in rig.steps.deployed() and not any(s == "roll back start" for s, _, _ in rig.steps.log)
    assert rig.steps.serving["h1"] == NEW and rig.steps.serving["h3"] == NEW  # left as they are
    assert "web" not in await rig.store.quarantined()


async def test_a_child_that_raises_a_host_error_pauses_too(rig: Rig) -> None:
    rig.steps.crash.add("h2")
    job = await rig.run(WAVES)
    assert job.status is JobStatus.FAILED and job.transient
    stored = await rig.store.job(job.id)
    assert stored is not None
    kids = [await rig.store.job(c) for c in stored.children]
    assert [k.status for k in kids if k is not None] == [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.SUCCEEDED]


async def test_a_newer_commit_stops_it_at_the_wave_boundary(rig: Rig) -> None:
    rig.steps.newer_after = "h1"
    job = await rig.run(WAVES)
    assert job.status is JobStatus.SUPERSEDED
    assert rig.steps.deployed() == ["h1"]
    assert not any(s == "roll back start" for s, _, _ in rig.steps.log)


async def test_a_newer_commit_during_the_pause_ends_the_wait(rig: Rig) -> None:
    rig.steps.newer_after = "h1"
    job = await rig.run(WAVES, Policy(pause_s=600))
    assert job.status is JobStatus.SUPERSEDED and rig.steps.pauses == [600]
    assert rig.steps.deployed() == ["h1"]


async def test_a_child_superseded_mid_wave_ends_the_rollout(rig: Rig) -> None:
    rig.steps.supersede.add("h2")
    job = await rig.run(WAVES)
    assert job.status is JobStatus.SUPERSEDED
    assert sorted(rig.steps.deployed()) == ["h1", "h2", "h3"]


async def test_waves_of_groups_by_wave_and_a_restore_joins_the_first() -> None:
    a = [Action(service="s", host=h, kind=ActionKind.DEPLOY, wave=w) for h, w in (("h1", 2), ("h2", 0), ("h3", 2))]
    restore = Action(service="s", host="h4", kind=ActionKind.RESTORE)
    assert waves_of([*a, restore]) == [[a[1], restore], [a[0], a[2]]]
    assert waves_of([restore]) == [[restore]]


# ---------------------------------------------------------------------------- the queue's wait


async def test_the_pause_ends_at_once_when_a_newer_release_is_wanted() -> None:
    q = JobQueue(1)
    q.want("web", NEW)
    assert await q.wait_superseded("web", NEW, 0.01) is False
    waiting = asyncio.create_task(q.wait_superseded("web", NEW, 600))
    await asyncio.sleep(0)
    q.want("web", NEW)  # the same release again: still waiting
    await asyncio.sleep(0)
    assert not waiting.done()
    q.want("web", "r-newer")
    assert await asyncio.wait_for(waiting, 5) is True
    assert await q.wait_superseded("web", NEW, 600) is True  # already superseded: no wait


# ---------------------------------------------------------------------------- the fleet's Registry entry


async def test_concurrent_registers_each_write_every_hosts_release() -> None:
    hosts = {h: HostSpec(name=h, address=f"10.0.0.{i}") for i, h in enumerate(("h1", "h2", "h3"), 1)}
    written: list[dict[str, str]] = []

    async def write(ctx: ReleaseContext, node: str | None, fleet: Any) -> dict[str, Any]:
        await asyncio.sleep(0)  # a write in flight: another host's must wait for it
        written.append({h: r for h, (_, r) in fleet.items()})
        return {"endpoint": ctx.host.name}

    entry = FleetEntry(hosts, {"h1": OLD, "h2": OLD, "elsewhere": OLD}, write)
    ctxs = [context(version="2", host=hosts[h]) for h in ("h2", "h3")]
    await asyncio.gather(*(entry.register(c, None) for c in ctxs))
    r2, r3 = (c.release.id for c in ctxs)
    assert written == [{"h1": OLD, "h2": r2}, {"h1": OLD, "h2": r2, "h3": r3}]
    assert list(entry.fleet()) == ["h1", "h2", "h3"]  # fleet order, not the order they switched
