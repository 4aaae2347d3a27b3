"""Figures of the reconcile loop on a real sandbox host, each next to a baseline measured in the same run.

1. commit -> healthy with the local-repository watch (deployerd's loop), vs the same release done by hand
   over one SSH connection (docker build + run + health poll: the floor a careful script reaches);
2. a reconcile that finds nothing to do for the bundled example services, and its SSH round trips per host;
3. failed health verdict -> the old release serving again (the rollback), vs a plain `docker start` of it.

Run: `make bench` (or `.venv/bin/python bench/reconcile_bench.py`). Uses the sandbox in
$DEPLOYERD_BENCH_SANDBOX, or brings one up (1 host) and takes it down at the end.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "bench"))

from _common import wait_job  # noqa: E402
from daemon_harness import DesiredRepo, running_daemon, settings_for  # noqa: E402

from deployerd import sandbox as sbx  # noqa: E402
from deployerd.store import JobStatus  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))


async def baseline_deploy(conn, version: int, port: int) -> float:  # type: ignore[no-untyped-def]
    """The same work by hand: files over SFTP, docker build, stop old, run new, poll health via SSH."""
    t0 = time.monotonic()
    d = f"/tmp/bench-base/{version}"
    await conn.makedirs(f"{d}/www")
    await conn.put_bytes(f"{d}/Dockerfile", (
        f'FROM busybox:latest\nCOPY www /www\nCMD ["busybox", "httpd", "-f", "-p", "{port}", "-h", "/www"]\n'
    ).encode())
    await conn.put_bytes(f"{d}/www/health", b'{"status": "active"}')
    await conn.put_bytes(f"{d}/www/index.html", f"v{version}".encode())
    await conn.run(["docker", "build", "-q", "-t", f"bench-base:{version}", d])
    await conn.run(["docker", "rm", "-f", "bench-base"], check=False)
    await conn.run(["docker", "run", "-d", "--name", "bench-base", "-p", f"{port}:{port}", f"bench-base:{version}"])
    for _ in range(600):
        done = await conn.run(["busybox", "wget", "-q", "-O", "/dev/null", f"http://127.0.0.1:{port}/health"],
                              check=False)
        if done.exit_status == 0:
            return time.monotonic() - t0
        await asyncio.sleep(0.05)
    raise TimeoutError("baseline never healthy")


async def main() -> None:
    state = os.environ.get("DEPLOYERD_BENCH_SANDBOX")
    own = state is None
    tmp = Path(tempfile.mkdtemp(prefix="deployerd-bench-"))
    info = sbx.load_info(Path(state)) if state else await sbx.up_async(1, tmp / "sandbox")
    assert info is not None
    try:
        repo = DesiredRepo(tmp / "repo", info)
        for entry in (ROOT / "desired_state" / "services").iterdir():
            dest = repo.path / "services" / entry.name
            shutil.copytree(entry, dest) if entry.is_dir() else shutil.copy(entry, dest)
        repo.service("bench-web", 8201, health_timeout_s=5)
        repo.commit("example services + bench-web")
        settings = settings_for(tmp / "daemon", info, repo)
        async with running_daemon(settings, loop=True) as d:
            first = await wait_job(d, "bench-web", None)
            assert first.status is JobStatus.SUCCEEDED, first.error
            for name in ("hello-web", "hello-api"):
                await wait_job(d, name, None)

            # 1. commit -> healthy (watch), rounds with a source change each
            ours, last = [], first.id
            for i in range(2, 2 + ROUNDS):
                repo.write("services/bench-web/www/index.html", f"<h1>v{i}</h1>\n")
                t0 = time.monotonic()
                repo.commit(f"bench v{i}")
                job = await wait_job(d, "bench-web", last)
                assert job.status is JobStatus.SUCCEEDED, job.error
                ours.append(time.monotonic() - t0)
                last = job.id
            conn = (await d.engine.hosts.handle(d.engine.desired.hosts["sbx-1"])).conn
            base = [await baseline_deploy(conn, i, 8299) for i in range(ROUNDS)]
            await conn.run(["docker", "rm", "-f", "bench-base"], check=False)
            mo, mb = statistics.median(ours), statistics.median(base)
            print(f"commit->healthy (watch): median {mo:.2f} s over {ROUNDS} commits; by hand over SSH "
                  f"{mb:.2f} s; ratio {mo / mb:.2f}x")
            print("  phases of the last job: " + ", ".join(
                f"{p.phase} {p.duration_seconds:.2f}s" for p in job.phases))

            # 2. a reconcile that finds nothing to do, and its round trips per host
            await asyncio.sleep(0.5)
            durations, trips = [], []
            for _ in range(20):
                before = d.engine.hosts.pool.stats()["sbx-1"].round_trips
                t0 = time.monotonic()
                actions = await d.engine.reconcile(["bench"])
                durations.append(time.monotonic() - t0)
                trips.append(d.engine.hosts.pool.stats()["sbx-1"].round_trips - before)
                assert all(a.kind.value == "noop" for a in actions), [(a.service, a.kind, a.reasons) for a in actions]
            n = len(actions)
            print(f"no-op reconcile of {n} services: median {statistics.median(durations) * 1000:.1f} ms, "
                  f"max {max(durations) * 1000:.1f} ms; SSH commands per host per reconcile: {max(trips)} "
                  f"(the engine is read through the forwarded socket)")

            # 3. failed health -> old release serving again
            rollbacks = []
            for i in range(3):
                repo.remove("services/bench-web/www/health")
                repo.commit(f"broken {i}")
                job = await wait_job(d, "bench-web", last)
                assert job.status is JobStatus.ROLLED_BACK, (job.status, job.error)
                rollbacks.append(job.rollback["seconds"])
                last = job.id
                repo.write("services/bench-web/www/health", '{"status": "active"}')
                repo.write("services/bench-web/www/index.html", f"<h1>fixed {i}</h1>\n")
                repo.commit(f"fixed {i}")
                last = (await wait_job(d, "bench-web", last)).id
            handle = await d.engine.hosts.handle(d.engine.desired.hosts["sbx-1"])
            restart = []
            for _ in range(3):
                await handle.conn.run(["docker", "stop", "-t", "1", f"deployerd-{settings.instance}-bench-web-{job.previous_release}"], check=False)
                t0 = time.monotonic()
                await handle.conn.run(["docker", "start", f"deployerd-{settings.instance}-bench-web-{job.previous_release}"], check=False)
                restart.append(time.monotonic() - t0)
            await d.reconcile()
            mr = statistics.median(rollbacks)
            print(f"failed health -> old release serving: median {mr:.2f} s over {len(rollbacks)} rollbacks "
                  f"(stop failed, start kept container, health verified, re-registered); plain docker start "
                  f"{statistics.median(restart):.2f} s; ratio {mr / statistics.median(restart):.2f}x")
    finally:
        if own:
            await sbx.down_async(tmp / "sandbox")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
