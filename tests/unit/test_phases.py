"""The phase runner behind its interfaces: deploy, rollback, quarantine, supersede, transient and terminal
failures, and the one place a job ends, on a fake host (tests/unit/fakes.py) with a real store. No sandbox."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fakes import INGRESS_HOST, TREE, FakeHost, FakeRegistry, context

from deployerd.connection import CommandError, HostUnreachable, RemoteFileError
from deployerd.desired import HostSpec
from deployerd.events import Event, EventBus, JobEnded, JobStarted, PhaseChanged, Quarantined, RolledBack, Switched
from deployerd.locks import LockBusy, LockRecord
from deployerd.phases import Deployer, is_transient
from deployerd.registry_client import RegistryError
from deployerd.runtimes.base import ReleaseContext
from deployerd.store import PHASES, Job, JobStatus, PhaseStatus, Store

pytestmark = pytest.mark.asyncio(loop_scope="function")


class Rig:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.host = FakeHost()
        self.registry = FakeRegistry()
        self.bus = EventBus()
        self.events: list[Event] = []
        self.bus.subscribe(self.events.append)
        self.deployer = Deployer(store, self.registry, events=self.bus)  # type: ignore[arg-type]

    async def deploy(self, ctx: ReleaseContext, previous: str | None = None, **kw: Any) -> Job:
        job = Job(service=ctx.spec.name, host=ctx.host.name, release=ctx.release.id, previous_release=previous)
        return await self.deployer.deploy(job, ctx, self.host, TREE, previous, **kw)

    def kinds(self, cls: type[Event]) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls)]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    store = await Store.open(tmp_path / "state.db")
    r = Rig(store)
    yield r
    await r.deployer.aclose()
    await store.close()


def statuses(records: list[Any]) -> dict[str, PhaseStatus]:
    return {p.phase: p.status for p in records}


async def test_a_deploy_runs_six_phases_and_ends_once(rig: Rig) -> None:
    ctx = context()
    job = await rig.deploy(ctx)
    assert job.status is JobStatus.SUCCEEDED, job.error
    assert statuses(job.phases) == dict.fromkeys(PHASES, PhaseStatus.SUCCEEDED)
    assert rig.host.running == {"web": ctx.release.id} and rig.host.locked == 0
    assert job.completed_at and job.duration_seconds is not None
    assert (await rig.store.last_good("web")).release == ctx.release.id  # type: ignore[union-attr]
    assert "web" in rig.registry.entries
    assert [type(e) for e in rig.events if not isinstance(e, PhaseChanged)] == [JobStarted, JobEnded]
    changes = [(e.phase, e.status) for e in rig.kinds(PhaseChanged)]
    assert changes == [x for p in PHASES for x in ((p, "running"), (p, "succeeded"))]
    assert (await rig.store.job(job.id)) == job  # what ended is what is stored


async def test_a_terminal_failure_rolls_back_through_the_same_phases(rig: Rig) -> None:
    good, bad = context(version="1"), context(version="2")
    await rig.deploy(good)
    rig.host.unhealthy.add(bad.release.id)
    job = await rig.deploy(bad, previous=good.release.id)
    assert job.status is JobStatus.ROLLED_BACK, job.error
    assert job.error and job.error.startswith("Verify Health:") and job.logs == ["boom"]
    assert rig.host.running == {"web": good.release.id}
    assert job.rollback and job.rollback["release"] == good.release.id and job.rollback["container_reused"] is True
    assert job.rollback["rebuilt"] is False
    rb = statuses(job.rollback_phases)
    assert rb["Transfer"] is rb["Build"] is PhaseStatus.SKIPPED
    assert rb["Start Service"] is rb["Verify Health"] is rb["Register with Registry"] is PhaseStatus.SUCCEEDED
    assert (await rig.store.quarantined())["web"].release == bad.release.id
    assert [e.release for e in rig.kinds(Quarantined)] == [bad.release.id]
    [rolled] = rig.kinds(RolledBack)
    assert rolled.ok and rolled.restored_release == good.release.id and rolled.phase == "Verify Health"
    assert any(e.rollback for e in rig.kinds(PhaseChanged))
    assert rig.registry.entries["web"].metadata["release"] == good.release.id  # type: ignore[index]


async def test_a_first_release_that_fails_is_quarantined_with_nothing_to_restore(rig: Rig) -> None:
    ctx = context()
    rig.host.fail[(ctx.release.id, "Build")] = CommandError("fake-1", "docker", 1, "no such base image")
    job = await rig.deploy(ctx)
    assert job.status is JobStatus.FAILED and not job.transient
    assert job.rollback == {"release": None, "reason": "no earlier good release of this service on this host"}
    assert (await rig.store.quarantined())["web"].release == ctx.release.id
    assert statuses(job.phases)["Start Service"] is PhaseStatus.PENDING
    assert ("remove_service", "web") in rig.host.calls  # a first release that never served leaves nothing


async def test_a_rollback_rebuilds_a_release_whose_artifact_is_gone(rig: Rig) -> None:
    good, bad = context(version="1"), context(version="2")
    await rig.deploy(good)
    rig.host.built.discard(good.release.id)
    opened: list[str] = []

    async def tree_at(commit: str) -> Any:
        opened.append(commit)
        return TREE

    rig.deployer.tree_at = tree_at
    rig.host.fail[(bad.release.id, "Start Service")] = CommandError("fake-1", "docker", 1, "port taken")
    job = await rig.deploy(bad, previous=good.release.id)
    assert job.status is JobStatus.ROLLED_BACK and job.rollback and job.rollback["rebuilt"] is True
    assert opened == [good.commit] and ("build", good.release.id) in rig.host.calls
    assert statuses(job.rollback_phases)["Transfer"] is PhaseStatus.SUCCEEDED


async def test_superseded_after_start_restores_the_last_good_release(rig: Rig) -> None:
    """Bug 1 of issue 11: a deploy cut short after Start Service left its unverified release serving."""
    good, new = context(version="1"), context(version="2")
    await rig.deploy(good)
    rig.host.unhealthy.add(new.release.id)
    wanted = {"release": new.release.id}
    rig.host.on_health = lambda ctx: wanted.update(release="newer") if ctx.release.id == new.release.id else None
    job = await rig.deploy(new, previous=good.release.id, superseded=lambda: wanted["release"] != new.release.id)
    assert job.status is JobStatus.SUPERSEDED
    assert "superseded" in (job.phase("Verify Health").error or "")
    assert rig.host.running == {"web": good.release.id}  # verified: the last good one serves again
    assert job.rollback and job.rollback["release"] == good.release.id
    assert "web" not in await rig.store.quarantined()  # not a failure of the release


async def test_superseded_before_start_changes_nothing_on_the_host(rig: Rig) -> None:
    good, new = context(version="1"), context(version="2")
    await rig.deploy(good)
    job = await rig.deploy(new, previous=good.release.id, superseded=lambda: True)
    assert job.status is JobStatus.SUPERSEDED and job.rollback is None
    assert statuses(job.phases)["Transfer"] is PhaseStatus.PENDING
    assert rig.host.running == {"web": good.release.id}


@pytest.mark.parametrize("error", [
    HostUnreachable("fake-1", "connection lost"),
    LockBusy("fake-1", "web", "/x.lock", LockRecord(holder="d1", token="t", acquired_at="2026-01-01T00:00:00Z",
                                                      expires_at="2026-01-01T00:01:00Z"), 1.0),
    RegistryError("registry unreachable", transient=True),
])
async def test_a_transient_failure_is_retried_never_quarantined(rig: Rig, error: Exception) -> None:
    good, new = context(version="1"), context(version="2")
    await rig.deploy(good)
    phase = "Register with Registry" if isinstance(error, RegistryError) else "Transfer"
    if isinstance(error, RegistryError):
        rig.registry.fail = error
    else:
        rig.host.fail[(new.release.id, phase)] = error
    job = await rig.deploy(new, previous=good.release.id)
    assert job.status is JobStatus.FAILED and job.transient, job.error
    assert job.rollback is None and not await rig.store.quarantined()
    assert not rig.kinds(RolledBack) and not rig.kinds(Quarantined)


@pytest.mark.parametrize("error", [
    RemoteFileError("fake-1", "put", "/x", 3, "permission denied"),
    CommandError("fake-1", "cp", 1, "no space left on device"),
    RegistryError("422 invalid endpoint", transient=False),
])
async def test_a_terminal_failure_is_quarantined(rig: Rig, error: Exception) -> None:
    good, new = context(version="1"), context(version="2")
    await rig.deploy(good)
    if isinstance(error, RegistryError):
        rig.registry.fail = error
    else:
        rig.host.fail[(new.release.id, "Transfer")] = error
    job = await rig.deploy(new, previous=good.release.id)
    assert not job.transient
    assert (await rig.store.quarantined())["web"].release == new.release.id
    # Transfer failed before anything changed on the host: nothing to roll back; a Register failure rolls back
    assert job.status is (JobStatus.ROLLED_BACK if isinstance(error, RegistryError) else JobStatus.FAILED)


async def test_transience_is_the_errors_own_word() -> None:
    assert is_transient(HostUnreachable("h", "x")) and not is_transient(CommandError("h", "x", 1, ""))
    assert not is_transient(RuntimeError("x")) and not is_transient(RegistryError("x", transient=False))


async def test_jobs_that_crash_or_never_start_end_in_the_same_place(rig: Rig) -> None:
    job = Job(service="web", host="fake-1")
    await rig.deployer.begin(job, PHASES)
    ended = await rig.deployer.end_crashed(job, HostUnreachable("fake-1", "reset"))
    assert ended.status is JobStatus.FAILED and ended.transient and ended.completed_at
    assert ended.duration_seconds is not None and ended.error == "HostUnreachable: host fake-1 unreachable: reset"
    never = await rig.deployer.end_unstarted(Job(service="web", host="fake-1"), "no record of release x")
    assert never.status is JobStatus.FAILED and never.completed_at and never.duration_seconds == 0.0
    assert [e.job.id for e in rig.kinds(JobEnded)] == [job.id, never.id]
    assert (await rig.store.job(never.id)).error == "no record of release x"  # type: ignore[union-attr]


def gate_on_register(rig: Rig) -> None:
    """The old release's retirement waits until Register has run: it cannot finish first unless they overlap."""
    gate = rig.host.retire_gate = asyncio.Event()
    register = rig.registry.register

    async def registering(*a: Any, **kw: Any) -> Any:
        rig.host.calls.append(("register", a[0]))
        gate.set()
        return await register(*a, **kw)

    rig.registry.register = registering  # type: ignore[method-assign]


async def test_behind_an_ingress_the_old_release_retires_while_the_new_one_registers(rig: Rig) -> None:
    old, new = context(version="1", host=INGRESS_HOST), context(version="2", host=INGRESS_HOST)
    await rig.deploy(old)
    gate_on_register(rig)
    rig.host.calls.clear()
    job = await rig.deploy(new, previous=old.release.id)
    assert job.status is JobStatus.SUCCEEDED, job.error
    order = [c for c in rig.host.calls if c[0] in ("switch", "retire", "register", "retired")]
    assert order == [("switch", new.release.id), ("retire", old.release.id), ("register", "web"),
                     ("retired", old.release.id)]
    switched = job.phase("Verify Health").details["switch"]
    assert switched["upstream_before"] == old.release.id and switched["stopped"] == [old.release.id]
    assert switched["drain_seconds"] == 0.02  # recorded with the switch once the drain ended
    assert [(e.release, e.drain_s) for e in rig.kinds(Switched)][-1] == (new.release.id, 0.02)


@pytest.mark.parametrize("error, status", [(HostUnreachable("fake-1", "connection lost"), JobStatus.FAILED),
                                           (CommandError("fake-1", "docker", 1, "no"), JobStatus.ROLLED_BACK)])
async def test_a_failed_retirement_fails_verify_health_as_before(rig: Rig, error: Exception,
                                                                 status: JobStatus) -> None:
    """The drain and stop run beside Register, but their failure is still Verify Health's: transient, the job
    fails and is retried; terminal, the release is quarantined and the old one restored."""
    old, new = context(version="1", host=INGRESS_HOST), context(version="2", host=INGRESS_HOST)
    await rig.deploy(old)
    gate_on_register(rig)
    rig.host.retire_fail = error
    job = await rig.deploy(new, previous=old.release.id)
    assert job.status is status, (job.status, job.error)
    assert job.error and job.error.startswith("Verify Health:"), job.error
    assert job.phase("Verify Health").status is PhaseStatus.FAILED
    assert job.transient is (status is JobStatus.FAILED)
    if status is JobStatus.ROLLED_BACK:
        assert rig.host.serves == {"web": old.release.id} and job.rollback["release"] == old.release.id
        assert rig.registry.entries["web"].metadata["release"] == old.release.id


async def test_a_fleet_host_rolls_back_to_the_release_it_ran_though_another_host_saved_it_last(rig: Rig) -> None:
    one = context(version="1")
    two = dataclasses.replace(one, host=HostSpec(name="fake-2", address="10.0.0.2"))  # one id on every host
    await rig.deploy(one)
    await rig.deploy(two)  # the record's last saver is fake-2 now
    bad = context(version="2")
    rig.host.unhealthy.add(bad.release.id)
    job = await rig.deploy(bad, previous=one.release.id)
    assert job.status is JobStatus.ROLLED_BACK, job.error
    assert job.rollback and job.rollback["release"] == one.release.id
    assert rig.registry.entries["web"].endpoint == "http://10.0.0.1:8080"  # restored as on fake-1, not fake-2


async def test_a_fleet_register_writes_what_the_rollout_gives(rig: Rig) -> None:
    seen: list[tuple[str, str]] = []

    async def fleet(ctx: ReleaseContext, node: str | None) -> dict[str, Any]:
        seen.append((ctx.host.name, ctx.release.id))
        return {"droplet_id": 7, "service_name": "web", "endpoint": "http://lb", "registered_at": "now"}

    good, bad = context(version="1"), context(version="2")
    await rig.deploy(good)
    rig.host.unhealthy.add(bad.release.id)
    job = await rig.deploy(bad, previous=good.release.id, register=fleet)
    assert job.status is JobStatus.ROLLED_BACK
    assert seen == [("fake-1", good.release.id)]  # its own rollback registered through the fleet's entry too
    assert job.registration is not None and job.registration["endpoint"] == "http://lb"
