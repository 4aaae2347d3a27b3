"""Host locks end to end: real OpenSSH/SFTP on the sandbox hosts, then two real daemons on the same hosts.

The protocol tests run each contender on its own SSH connection and its own daemon id, as separate daemons
would; they check what is on the host (the lock file, its token), not only our return values. The daemon
tests read both daemons' job records: the phases of deploys of one service on one host never overlap.
Figures (takeover time, round trips per deploy) are printed, never asserted (run with -s to see them).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiodocker
import pytest
from daemon_harness import DesiredRepo, http_get, running_daemon, settings_for

from deployerd.connection import Connection, HostAddress
from deployerd.locks import (
    HostLocks,
    LockBusy,
    LockRecord,
    load_daemon_id,
    lock_path,
    parse,
)
from deployerd.sandbox import SandboxInfo
from deployerd.store import Job, JobStatus

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

SERVICE_BASE = "/opt/fpai/services"  # hosts.yaml default base_dir (the daemon tests)


def address(h: Any) -> HostAddress:
    return HostAddress(name=h.name, address=h.address, port=h.ssh_port, user=h.user, key_path=h.key_path,
                       known_hosts=h.known_hosts)


async def connect(sandbox: SandboxInfo, i: int = 0) -> Connection:
    return await Connection.open(address(sandbox.hosts[i]), connect_timeout=30)


@pytest.fixture
async def base(sandbox: SandboxInfo) -> AsyncIterator[str]:
    """A fresh base_dir on sbx-1, so no leftover lock from another run can make a check pass or fail."""
    conn = await connect(sandbox)
    d = (await conn.run(["mktemp", "-d", "/tmp/deployerd-locks-XXXXXX"])).stdout.strip()
    yield d
    await conn.run(["rm", "-rf", "--", d], check=False)
    await conn.close()


def contender(tmp: Path, name: str, **kw: Any) -> HostLocks:
    """One daemon's lock side: its own state dir, hence its own id."""
    kw.setdefault("poll_s", 0.1)
    return HostLocks(tmp / name, instance="default", **kw)


def planted(holder: str, expires_in: float, service: str = "web") -> LockRecord:
    now = datetime.now(UTC)
    return LockRecord(holder=holder, hostname="gone.example", pid=4242, instance="default", service=service,
                      job="j-planted", token=secrets.token_hex(8), acquired_at=now - timedelta(seconds=300),
                      expires_at=now + timedelta(seconds=expires_in))


async def plant(conn: Connection, base_dir: str, name: str, rec: LockRecord) -> None:
    await conn.makedirs(f"{base_dir}/.locks")
    await conn.put_bytes(lock_path(base_dir, name), rec.encode())


async def on_host(conn: Connection, base_dir: str, name: str) -> LockRecord | None:
    """The lock as the host has it (None: no lock file)."""
    done = await conn.run(["cat", "--", lock_path(base_dir, name)], check=False)
    return parse(done.stdout.encode()) if done.ok else None


# ------------------------------------------------------------------------------------- the protocol


async def test_exclusive_busy_names_holder_and_release(sandbox: SandboxInfo, base: str, tmp_path: Path) -> None:
    ca, cb = await connect(sandbox), await connect(sandbox)
    a = contender(tmp_path, "a").lock(ca, base, "web", "job-a")
    b = contender(tmp_path, "b", wait_s=0.5).lock(cb, base, "web", "job-b")
    got = await a.acquire()
    held = await on_host(ca, base, "web")
    assert held is not None and held.holder == got["holder"] and held.job == "job-a" and a.record is not None
    assert held.token == a.record.token and held.expires_at > datetime.now(UTC)
    with pytest.raises(LockBusy) as busy:
        await b.acquire()
    for part in (sandbox.hosts[0].name, "web", got["holder"], "job-a", held.expires_at.isoformat(timespec="seconds")):
        assert part in str(busy.value)
    assert (await on_host(ca, base, "web")) == held  # the loser changed nothing

    rt = ca.stats.round_trips
    await a.release()
    release_rt = ca.stats.round_trips - rt
    assert await on_host(ca, base, "web") is None
    got_b = await b.acquire()
    assert (await on_host(cb, base, "web")).job == "job-b"  # type: ignore[union-attr]
    await b.release()
    leftovers = (await ca.run(["ls", "-A", "--", f"{base}/.locks"])).stdout.split()
    assert leftovers == []  # no temp or moved-aside file stays behind
    print(f"\nlock round trips: acquire {got['round_trips']} (first on the host, makes .locks), "
          f"{got_b['round_trips']} (next), release {release_rt}")
    await ca.close()
    await cb.close()


async def test_contenders_never_overlap(sandbox: SandboxInfo, base: str, tmp_path: Path) -> None:
    """Four daemons (four connections, four ids) take one lock three times each; held intervals are disjoint."""
    intervals: list[tuple[float, float, str]] = []
    conns = [await connect(sandbox) for _ in range(4)]

    async def run(i: int) -> None:
        locks = contender(tmp_path, f"c{i}", wait_s=120)
        for r in range(3):
            lock = locks.lock(conns[i], base, "web", f"c{i}-r{r}")
            await lock.acquire()
            t0 = time.monotonic()
            seen = await on_host(conns[i], base, "web")
            assert seen is not None and lock.record is not None and seen.token == lock.record.token
            await asyncio.sleep(0.05)
            intervals.append((t0, time.monotonic(), f"c{i}-r{r}"))
            await lock.release()

    await asyncio.gather(*(run(i) for i in range(4)))
    assert len(intervals) == 12
    intervals.sort()
    for (_, end, who), (start, _, nxt) in itertools.pairwise(intervals):
        assert end <= start, f"{who} and {nxt} held the lock at the same time"
    for c in conns:
        await c.close()


async def test_expired_foreign_lock_is_taken_over_by_exactly_one(sandbox: SandboxInfo, base: str,
                                                                 tmp_path: Path) -> None:
    conn = await connect(sandbox)
    await plant(conn, base, "web", planted("ddead", expires_in=-5))
    conns = [await connect(sandbox) for _ in range(4)]
    results: list[dict[str, Any]] = []
    intervals: list[tuple[float, float]] = []

    async def take(i: int) -> None:
        lock = contender(tmp_path, f"t{i}", wait_s=60).lock(conns[i], base, "web", f"t{i}")
        t0 = time.monotonic()
        results.append(await lock.acquire())
        t1 = time.monotonic()
        await asyncio.sleep(0.05)
        intervals.append((t1, time.monotonic()))
        if i == 0:
            print(f"\ntakeover of an expired lock (4 contenders): first holder after {t1 - t0:.3f}s")
        await lock.release()

    await asyncio.gather(*(take(i) for i in range(4)))
    took = [r["took_over"] for r in results if r["took_over"]]
    assert len(took) == 1 and "ddead" in took[0][0] and took[0][0].startswith("expired")
    intervals.sort()
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(intervals))
    assert await on_host(conn, base, "web") is None
    for c in [conn, *conns]:
        await c.close()


async def test_own_stale_lock_is_taken_over_at_once(sandbox: SandboxInfo, base: str, tmp_path: Path) -> None:
    """A daemon SIGKILLed and restarted on the same state dir finds its own live-looking lock: no waiting."""
    conn = await connect(sandbox)
    me = load_daemon_id(tmp_path / "me")
    await plant(conn, base, "web", planted(me, expires_in=3600))
    lock = HostLocks(tmp_path / "me", wait_s=0).lock(conn, base, "web", "after-restart")
    t0 = time.monotonic()
    got = await lock.acquire()  # wait_s=0: any wait would raise LockBusy
    print(f"\ntakeover of our own lock after a restart: {time.monotonic() - t0:.3f}s, {got['round_trips']} round trips")
    assert got["took_over"] and got["took_over"][0].startswith("own_stale") and got["waited_for"] is None
    assert (await on_host(conn, base, "web")).job == "after-restart"  # type: ignore[union-attr]
    # Control: the same record under another daemon's id is waited for, not taken.
    await lock.release()
    await plant(conn, base, "web", planted("dsomeoneelse", expires_in=3600))
    with pytest.raises(LockBusy, match="dsomeoneelse"):
        await HostLocks(tmp_path / "me", wait_s=0).lock(conn, base, "web", "x").acquire()
    await conn.close()


async def test_live_foreign_lock_is_waited_for_until_it_expires(sandbox: SandboxInfo, base: str,
                                                                tmp_path: Path) -> None:
    conn = await connect(sandbox)
    await plant(conn, base, "web", planted("dforeign", expires_in=3))
    lock = contender(tmp_path, "w", wait_s=30, poll_s=0.25).lock(conn, base, "web", "waiter")
    got = await lock.acquire()
    assert got["waited_for"] and "dforeign" in got["waited_for"]
    assert got["took_over"] and got["took_over"][0].startswith("expired")
    print(f"\nwaited {got['waited_s']:.2f}s for a lock expiring 3 s after planting")
    await lock.release()
    await conn.close()


async def test_renewal_keeps_a_long_job_locked(sandbox: SandboxInfo, base: str, tmp_path: Path) -> None:
    ca, cb = await connect(sandbox), await connect(sandbox)
    a = contender(tmp_path, "a", ttl_s=3).lock(ca, base, "web", "long")
    await a.acquire()
    first = await on_host(ca, base, "web")
    await asyncio.sleep(4.5)  # past the first expiry: only renewals keep it
    later = await on_host(ca, base, "web")
    assert first is not None and later is not None and later.token == first.token
    assert later.expires_at > first.expires_at and not a.lost
    with pytest.raises(LockBusy):
        await contender(tmp_path, "b", wait_s=0).lock(cb, base, "web", "b").acquire()
    await a.release()
    assert await on_host(ca, base, "web") is None
    await ca.close()
    await cb.close()


async def test_a_lock_no_longer_ours_is_neither_renewed_nor_released(sandbox: SandboxInfo, base: str,
                                                                     tmp_path: Path) -> None:
    conn = await connect(sandbox)
    a = contender(tmp_path, "a", ttl_s=3).lock(conn, base, "web", "slow")
    await a.acquire()
    other = planted("dother", expires_in=3600)
    await conn.put_bytes(lock_path(base, "web"), other.encode())  # as if taken over while we were stalled
    for _ in range(40):  # the renewer looks every ttl/3 = 1 s
        if a.lost:
            break
        await asyncio.sleep(0.1)
    assert a.lost
    await a.release()
    assert await on_host(conn, base, "web") == other  # the new holder's lock is left alone
    await conn.close()


# ------------------------------------------------------------------------------------------ daemons


def interval(job: Job) -> tuple[str, str]:
    """From the end of Validation (the lock is held by then) to the last phase's end (it is still held)."""
    validation = next(p for p in job.phases if p.phase == "Validation")
    ends = [p.completed_at for p in job.phases if p.completed_at]
    assert validation.completed_at and ends, job
    return validation.completed_at, max(ends)


async def running_containers(d: Any, host: str, qualified: str) -> list[dict[str, Any]]:
    handle = await d.engine.hosts.handle(d.engine.desired.hosts[host])
    sock = await handle.conn.docker_socket()
    async with aiodocker.Docker(url=f"unix://{sock}") as docker:
        found = await docker.containers.list(filters=json.dumps({"name": [f"^/deployerd-{qualified}-"]}))
        return [c._container for c in found]


async def test_two_daemons_never_interleave_deploys(sandbox: SandboxInfo, tmp_path: Path) -> None:
    """Same instance, same repository, same hosts, separate state dirs: each deploy of a service runs alone."""
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    services = {"lk-a": ("sbx-1", 8711), "lk-b": ("sbx-2", 8712)}
    for name, (host, port) in services.items():
        repo.service(name, port, host=host)
    repo.commit("two services")
    instance = f"t{secrets.token_hex(3)}"
    sa = settings_for(tmp_path / "a", sandbox, repo, instance=instance)
    sb = settings_for(tmp_path / "b", sandbox, repo, instance=instance)
    async with running_daemon(sa) as da, running_daemon(sb) as db:
        for version in ("1", "2"):
            if version != "1":
                for name, (host, port) in services.items():
                    repo.service(name, port, host=host, version=version)
                repo.commit(f"v{version}")
            await asyncio.gather(da.reconcile(), db.reconcile())
        jobs = [j for d in (da, db) for name in services for j in await d.jobs(name) if j.kind == "deploy"]
        assert len(jobs) >= 4  # both daemons deployed both services at least once
        for j in jobs:
            assert j.status is JobStatus.SUCCEEDED, (j.service, j.status, j.error)
        waited = [j for j in jobs if j.phase("Validation").details["lock"]["waited_for"]]
        assert waited, "no deploy ever met the other daemon's lock: the test did not contend"
        for name, (host, _) in services.items():
            spans = sorted(interval(j) for j in jobs if j.service == name and j.host == host)
            for (_, end), (start, _) in itertools.pairwise(spans):
                assert end <= start, f"{name}: deploys overlapped on {host}: {spans}"
            running = await running_containers(da, host, f"{instance}-{name}")
            assert len(running) == 1, running
            assert "v2" in (await http_get(f"http://{sandbox.hosts[int(host[-1]) - 1].internal_address}:"
                                           f"{services[name][1]}/")).text
        rts = [j.phase("Validation").details["lock"]["round_trips"] for j in jobs]
        print(f"\ntwo daemons: {len(jobs)} deploys, {len(waited)} waited for the other's lock; "
              f"acquire round trips {sorted(rts)}")


async def test_foreign_lock_fails_transiently_then_deploy_proceeds(sandbox: SandboxInfo, tmp_path: Path) -> None:
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("lk-c", 8713)
    repo.commit("one service")
    settings = settings_for(tmp_path, sandbox, repo, lock_wait_s=0.5)
    conn = await connect(sandbox)
    async with running_daemon(settings) as d:
        # long enough to outlast a slow reconcile on a busy machine; the second deploy waits it out
        await plant(conn, SERVICE_BASE, f"{settings.instance}-lk-c", planted("dforeign", expires_in=15, service="lk-c"))
        await d.reconcile()
        job = await d.last_job("lk-c")
        assert job.status is JobStatus.FAILED and job.transient, job
        assert "dforeign" in (job.error or "") and "sbx-1" in (job.error or "") and "lk-c" in (job.error or "")
        assert job.rollback is None and not await d.engine.store.quarantined()
        assert [p.status.value for p in job.phases][:2] == ["failed", "pending"]  # nothing ran past Validation
        assert 'deployerd_host_locks_total{event="busy"} 1.0' in (await d.http.get("/metrics")).text

        d.engine.deployer.locks.wait_s = 60  # now wait for it to expire
        await d.reconcile(force=set())  # force: skip the backoff the failure set
        job = await d.last_job("lk-c")
        assert job.status is JobStatus.SUCCEEDED, job.error
        lock = job.phase("Validation").details["lock"]
        assert "dforeign" in lock["waited_for"] and lock["took_over"][0].startswith("expired")
        assert await on_host(conn, SERVICE_BASE, f"{settings.instance}-lk-c") is None  # released
    await conn.close()


async def test_restarted_daemon_and_dead_holder(sandbox: SandboxInfo, tmp_path: Path) -> None:
    """After SIGKILL: the daemon's own lock (expiry far ahead) is taken at once; a dead stranger's expired one too."""
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("lk-d", 8714)
    repo.service("lk-e", 8715)
    repo.commit("two services")
    settings = settings_for(tmp_path, sandbox, repo, lock_wait_s=0)  # any wait would fail the job
    me = load_daemon_id(settings.state_dir)  # the id its earlier life used
    conn = await connect(sandbox)
    await plant(conn, SERVICE_BASE, f"{settings.instance}-lk-d", planted(me, expires_in=3600, service="lk-d"))
    await plant(conn, SERVICE_BASE, f"{settings.instance}-lk-e", planted("ddead", expires_in=-1, service="lk-e"))
    async with running_daemon(settings) as d:
        await d.reconcile()
        rts = d.engine.hosts.pool.stats()["sbx-1"].round_trips
        own, dead = await d.last_job("lk-d"), await d.last_job("lk-e")
        assert own.status is JobStatus.SUCCEEDED and dead.status is JobStatus.SUCCEEDED, (own.error, dead.error)
        own_lock, dead_lock = own.phase("Validation").details["lock"], dead.phase("Validation").details["lock"]
        assert own_lock["holder"] == me and own_lock["took_over"][0].startswith("own_stale")
        assert dead_lock["took_over"][0].startswith("expired") and "ddead" in dead_lock["took_over"][0]
        print(f"\nrestart takeover: own lock {own_lock['waited_s']:.3f}s, dead holder's {dead_lock['waited_s']:.3f}s; "
              f"the reconcile (observe + 2 deploys with takeovers) took {rts} round trips on sbx-1, the locks "
              f"{own_lock['round_trips'] + dead_lock['round_trips']} to acquire + 2 x 3 to release")
    await conn.close()
