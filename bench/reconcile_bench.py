"""Figures of the reconcile loop on a real sandbox host, each next to a baseline measured in the same run.

1. commit -> healthy with the local-repository watch (deployerd's loop), stop-first on sbx-1 (``ingress: none``)
   and behind HAProxy on sbx-2 (``ingress: haproxy``), each next to the same release done by hand over one SSH
   connection (docker build + run + health poll: the floor a careful script reaches) and the plain
   rsync+ssh+docker script (bench/peers.py's) on the same host, rounds interleaved; with the job's time per
   phase, and with BENCH_TRACE=1 every remote call of the last round (bench/_trace.py);
2. a reconcile that finds nothing to do for the bundled example services, and its SSH round trips per host;
3. failed health verdict -> the old release serving again (the rollback), vs a plain `docker start` of it;
4. scale: the daemon as its own process (`python -m deployerd run`) with 50, 200, 500 (BENCH_SCALES) small
   FROM-scratch services over 3 hosts: per idle reconcile (POST /sync, nothing to do) its wall time (its own
   `last_reconcile.duration_s`), its CPU (/proc utime+stime delta), its RSS, and round trips per host (its
   /metrics `deployerd_host_operations_total`: SSH commands, SFTP calls, Docker API requests).

Run: `make bench` (or `.venv/bin/python bench/reconcile_bench.py`). Uses the sandbox in
$DEPLOYERD_BENCH_SANDBOX (parts 1-3 need 2 hosts), or brings one up (3 hosts) and takes it down at the end. BENCH_ONLY=1,2,3,4 picks
parts (parts 1-3 share one daemon); BENCH_PARALLEL (default 16) is the scale daemon's max_parallel;
BENCH_PROFILE=PREFIX writes py-spy samples of each size's idle reconciles to PREFIX-N.txt (needs .bench-venv).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "bench"))

from _common import SCRATCH_DOCKERFILE, cpu_s, med, peer_tool, rss_kib, scale_service, wait_job  # noqa: E402
from _trace import Trace  # noqa: E402
from daemon_harness import DaemonProcess, DesiredRepo, remove_deployment, running_daemon, settings_for  # noqa: E402
from peers import plain_deploy, write_source  # noqa: E402

from deployerd import sandbox as sbx  # noqa: E402
from deployerd.sandbox import SandboxInfo  # noqa: E402
from deployerd.store import JobStatus  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
ONLY = set(os.environ.get("BENCH_ONLY", "1,2,3,4").split(","))
SCALES = [int(x) for x in os.environ.get("BENCH_SCALES", "50,200,500").split(",") if x.strip()]
IDLE_ROUNDS = int(os.environ.get("BENCH_IDLE_ROUNDS", "10"))
PARALLEL = int(os.environ.get("BENCH_PARALLEL", "16"))
KEEP = os.environ.get("BENCH_KEEP") == "1"  # leave the scale set deployed (to study a daemon over it)
PROFILE = os.environ.get("BENCH_PROFILE")
TRACE = Trace.install() if os.environ.get("BENCH_TRACE") == "1" else None  # part 1: each remote call, timed  # a path prefix: py-spy raw samples of the idle reconciles per size


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


def _at(iso: str | None) -> float:
    """A job record's timestamp (ISO 8601 UTC) as epoch seconds."""
    return datetime.fromisoformat((iso or "").replace("Z", "+00:00")).timestamp()


def _breakdown(job, committed: float) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Where one commit's time went: before the job (git watch, fetch, observe, plan, launch), each phase, and
    the job's own bookkeeping after its last phase (store, retention of old releases)."""
    out = {"before the job": _at(job.started_at) - committed}
    for ph in job.phases:
        out[ph.phase] = ph.duration_seconds or 0.0
        if ph.phase == "Verify Health" and isinstance(ph.details.get("switch"), dict):
            sw = ph.details["switch"]
            out["  of which health wait"] = float(ph.details.get("seconds") or 0.0)
            out["  of which switch"] = float(sw.get("switch_seconds") or 0.0)
            out["  of which drain"] = float(sw.get("drain_seconds") or 0.0)
    last_phase = max(_at(ph.completed_at) for ph in job.phases if ph.completed_at)
    out["after the phases"] = _at(job.completed_at) - last_phase
    return out


async def settled(d) -> None:  # type: ignore[no-untyped-def]
    """Wait until the daemon is idle: no reconcile running or asked for (the one each finished job asks for), so a
    commit meets the daemon as it would between commits, not behind the previous round's reconcile."""
    for _ in range(200):
        if not d.engine._reconcile_lock.locked() and not d.engine.kick.is_set() and not d.engine.queue.in_flight:
            await asyncio.sleep(0.1)
            if not d.engine._reconcile_lock.locked() and not d.engine.kick.is_set():
                return
        await asyncio.sleep(0.05)


async def commit_to_healthy(d, repo: DesiredRepo, info: SandboxInfo) -> None:  # type: ignore[no-untyped-def]
    """Part 1: commit -> healthy and registered, for deployerd stop-first (sbx-1, ``ingress: none``) and behind
    HAProxy (sbx-2, ``ingress: haproxy``), next to the floor (the same steps by hand over one kept SSH
    connection) and the plain rsync+ssh+docker script, on the same host, rounds interleaved."""
    hosts = {h.name: h for h in info.hosts}
    modes = {"stop-first": ("bench-web", "sbx-1"), "proxy": ("bench-px", "sbx-2")}
    times: dict[str, list[float]] = {m: [] for m in modes}
    registered: dict[str, list[float]] = {m: [] for m in modes}  # the new release serves, proven and registered
    phases: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    floor: dict[str, list[float]] = {h: [] for _, h in modes.values()}
    plain: dict[str, list[float]] = {h: [] for _, h in modes.values()}
    last = {m: (await d.last_job(name)).id for m, (name, _) in modes.items()}
    traces: dict[str, str] = {}
    conns = {h: (await d.engine.hosts.handle(d.engine.desired.hosts[h])).conn for _, h in modes.values()}
    src = Path(tempfile.mkdtemp(prefix="bench-plain-"))
    try:
        for i in range(ROUNDS):
            for mode, (name, _) in modes.items():
                repo.write(f"services/{name}/www/index.html", f"<h1>v{i}</h1>\n")
                await settled(d)
                committed, mark = time.time(), time.monotonic()
                repo.commit(f"{name} v{i}")
                job = await wait_job(d, name, last[mode])
                assert job.status is JobStatus.SUCCEEDED, (mode, job.status, job.error)
                last[mode] = job.id
                times[mode].append(_at(job.completed_at) - committed)
                registered[mode].append(_at(job.phase("Register with Registry").completed_at) - committed)
                phases[mode].append(_breakdown(job, committed))
                if TRACE is not None and i == ROUNDS - 1:
                    traces[mode] = TRACE.report(mark, time.monotonic())
            for host in floor:
                floor[host].append(await baseline_deploy(conns[host], i, 8299))
                write_source(src, "bench-plain", 8298, str(i))
                plain[host].append((await asyncio.to_thread(plain_deploy, hosts[host], src, "bench-plain", 8298,
                                                            str(i)))["seconds"])
    finally:
        shutil.rmtree(src, ignore_errors=True)
        for conn in conns.values():
            await conn.run(["docker", "rm", "-f", "bench-base", "bench-plain-bench-plain"], check=False)
    print(f"1. commit -> healthy and registered, one small Docker service, warm cache, {ROUNDS} rounds (medians; "
          "deployerd from `git commit` to its job's completed_at, by its local-repository watch)")
    for mode, (_, host) in modes.items():
        mo, mr, mf, mp = med(times[mode]), med(registered[mode]), med(floor[host]), med(plain[host])
        print(f"  deployerd {mode} on {host}: job ended {mo:.2f} s (registered {mr:.2f} s); floor (by hand over "
              f"one SSH connection) {mf:.2f} s; plain rsync+ssh+docker script {mp:.2f} s")
        print(f"    deployerd/plain {mo / mp:.2f}x (goal <= 1.0x), deployerd/floor {mo / mf:.2f}x (goal <= 1.1x); "
              f"to registered: /plain {mr / mp:.2f}x, /floor {mr / mf:.2f}x")
        print("    rounds: deployerd " + " ".join(f"{x:.2f}" for x in times[mode]) + "; registered "
              + " ".join(f"{x:.2f}" for x in registered[mode]) + "; floor "
              + " ".join(f"{x:.2f}" for x in floor[host]) + "; plain " + " ".join(f"{x:.2f}" for x in plain[host]))
        keys = list(phases[mode][-1])
        print("    median s: " + ", ".join(f"{k.strip()} {med([p.get(k, 0.0) for p in phases[mode]]):.3f}"
                                        for k in keys))
        if mode in traces:
            print("    the last round's remote calls (BENCH_TRACE=1): offset from `git commit`, duration, kind\n"
                  + traces[mode])


async def idle_reconciles(d: DaemonProcess, count: int) -> dict:
    """``count`` reconciles that find nothing to do, each by POST /sync: the daemon's own figures."""
    walls, cpus, trips, stages = [], [], [], []
    n = 0
    for _ in range(count):
        m0, c0 = await d.metrics(), cpu_s(d.pid)
        answer = await d.sync()
        c1 = cpu_s(d.pid)
        m1 = await d.metrics()
        record = (await d.get("/health"))["last_reconcile"]
        walls.append(record["duration_s"])
        stages.append(record.get("stages") or {})
        cpus.append(c1 - c0)
        per_host: dict[str, dict[str, int]] = {}
        for (name, labels), value in m1.items():
            if name == "deployerd_host_operations_total":
                lab = dict(labels)
                if lab["kind"] != "connect":
                    delta = int(value - m0.get((name, labels), 0))
                    per_host.setdefault(lab["host"], {})[lab["kind"]] = delta
        trips.append(per_host)
        bad = [(a["service"], a["kind"], a["reasons"]) for a in answer["actions"] if a["kind"] != "noop"]
        assert not bad, bad[:5]
        n = len(answer["actions"])
    return {"services": n, "wall_median_s": round(med(walls), 4), "wall_max_s": round(max(walls), 4),
            "cpu_median_s": round(med(cpus), 4), "cpu_max_s": round(max(cpus), 4),
            "stages_median_s": {k: round(med([s.get(k, 0.0) for s in stages]), 4) for k in stages[-1]},
            "rss_mib": round(rss_kib(d.pid) / 1024, 1), "rss_anon_mib": round(rss_kib(d.pid, "RssAnon") / 1024, 1),
            "round_trips_per_host": {h: sum(k.values()) for h, k in sorted(trips[-1].items())},
            "by_kind_per_host": dict(sorted(trips[-1].items())),
            "round_trips_max_any_reconcile": max(sum(k.values()) for t in trips for k in t.values())}


async def profiler(pid: int, out: str) -> asyncio.subprocess.Process:
    """py-spy (from .bench-venv) sampling the daemon, without pausing it, until interrupted."""
    spy = peer_tool("py-spy")
    proc = await asyncio.create_subprocess_exec(str(spy), "record", "--nonblocking", "--pid", str(pid), "-r", "100",
                                                "-f", "raw", "-o", out, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    await asyncio.sleep(1)  # attached
    return proc


async def measured(d: DaemonProcess, profile: str | None) -> dict:
    """Idle reconciles, sampled by py-spy into ``profile`` when given."""
    spy = await profiler(d.pid, profile) if profile else None
    try:
        return await idle_reconciles(d, IDLE_ROUNDS)
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its samples when interrupted
            await spy.wait()


async def scale(info: SandboxInfo, tmp: Path) -> None:
    """Part 4: the daemon in its own process, idle reconciles at each size of BENCH_SCALES."""
    repo = DesiredRepo(tmp / "scale-repo", info)
    repo.commit("hosts only")
    settings = settings_for(tmp / "scale-daemon", info, repo, max_parallel=PARALLEL)
    d = DaemonProcess(settings, tmp / "scale-daemon")
    await d.start()
    print(f"scale: daemon pid {d.pid}, RSS at start {rss_kib(d.pid) / 1024:.1f} MiB, max_parallel {PARALLEL}, "
          f"log {d.log}", flush=True)
    n = 0
    try:
        for target in SCALES:
            for i in range(n, target):
                name, host, port = scale_service(i)
                repo.service(name, port, host=host, health_timeout_s=120,
                             dockerfile=SCRATCH_DOCKERFILE.format(port=port))
            repo.commit(f"scale set: {target}")
            await d.sync()  # the git watch would notice too; this starts at once
            took = await d.wait_services({scale_service(i)[0] for i in range(target)}, limit_s=3600)
            print(f"scale: {target - n} services deployed in {took:.1f} s (max_parallel {PARALLEL})", flush=True)
            n = target
            await asyncio.sleep(2)  # the reconcile each finished job asks for is over
            r = await measured(d, f"{PROFILE}-{target}.txt" if PROFILE else None)
            print(f"scale: idle reconcile at {r['services']} services ({IDLE_ROUNDS} rounds): {r}", flush=True)
        # the same deployment under a daemon that did not deploy it: memory without the deploys' history
        await d.close()
        d = DaemonProcess(settings, tmp / "scale-daemon")
        await d.start()
        print(f"scale: fresh daemon pid {d.pid}, RSS at start {rss_kib(d.pid) / 1024:.1f} MiB", flush=True)
        await d.wait_services({scale_service(i)[0] for i in range(n)}, limit_s=3600)
        await asyncio.sleep(2)
        r = await measured(d, f"{PROFILE}-{n}-fresh.txt" if PROFILE else None)
        print(f"scale: fresh daemon, idle reconcile at {r['services']} services: {r}", flush=True)
    finally:
        await d.close()
        if KEEP:
            print(f"scale: kept the deployment (BENCH_KEEP): config {d.config}", flush=True)
        else:  # leave the hosts and the Registry as found: the same clean-up as the e2e tests
            await remove_deployment(settings)


async def main() -> None:
    state = os.environ.get("DEPLOYERD_BENCH_SANDBOX")
    own = state is None
    tmp = Path(tempfile.mkdtemp(prefix="deployerd-bench-"))
    info = sbx.load_info(Path(state)) if state else await sbx.up_async(3, tmp / "sandbox")
    assert info is not None
    try:
        if "4" in ONLY:
            await scale(info, tmp)
        if not ONLY & {"1", "2", "3"}:
            return
        repo = DesiredRepo(tmp / "repo", info)
        for entry in (ROOT / "desired_state" / "services").iterdir():
            dest = repo.path / "services" / entry.name
            shutil.copytree(entry, dest) if entry.is_dir() else shutil.copy(entry, dest)
        repo.service("bench-web", 8201, health_timeout_s=5)
        repo.service("bench-px", 8202, host="sbx-2", health_timeout_s=5)
        hosts = yaml.safe_load((repo.path / "hosts.yaml").read_text())
        hosts["hosts"]["sbx-2"]["ingress"] = "haproxy"  # part 1: the proxy mode next to stop-first
        repo.write("hosts.yaml", yaml.safe_dump(hosts))
        repo.commit("example services + bench-web (stop-first) + bench-px (behind HAProxy)")
        settings = settings_for(tmp / "daemon", info, repo)
        async with running_daemon(settings, loop=True) as d:
            first = await wait_job(d, "bench-web", None)
            assert first.status is JobStatus.SUCCEEDED, first.error
            for name in ("bench-px", "hello-web", "hello-api", "hello-py"):  # none fails in the background
                job = await wait_job(d, name, None)
                assert job.status is JobStatus.SUCCEEDED, (name, job.status, job.error)

            if "1" in ONLY:
                await commit_to_healthy(d, repo, info)

            if "2" in ONLY:
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

            if "3" in ONLY:
                last = (await d.last_job("bench-web")).id
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
