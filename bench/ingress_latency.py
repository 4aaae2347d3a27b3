"""The latency deployerd's ingress proxy adds, for a Docker and a systemd service: a request through the public
port (HAProxy, as deployerd configures it) next to the same request straight to the instance's private port, and
next to the same proxy with the config of before the last latency change ("before"), all in one run.

deployerd deploys a small busybox service (Docker) and a stdlib Python service (systemd, HTTP/1.1 keep-alive) on
sbx-2 with ``ingress: haproxy``; each instance listens on a private port of the host's 127.0.0.1, so the direct
path exists only on the host itself. The client therefore runs on the host (a Python script started over SSH: no
network, no SSH in the measured path). Every 20 ms it sends one request on each path of the method, in a shuffled
order (50 requests/s per path, so a stall of the machine hits every path alike):
- ``direct``: to the private port, a new connection per request (busybox closes each one anyway);
- ``proxy``: through the public port, a new connection per request (HAProxy then opens one to the instance too);
- ``before``: the same through a second HAProxy the bench runs beside it (``systemd-run``, its own port, the same
  instance) with deployerd's config minus the ``BEFORE_DROPPED`` lines, i.e. the config before this change;
- ``proxy_keepalive``: through the public port on one kept connection (what a browser does);
- systemd only, ``direct_keepalive``: to the private port on one kept connection;
- Docker only, ``container``: to the container's own address and port, a new connection each (the private port
  on 127.0.0.1 is Docker's userland proxy, one more process hop; an outside client of an ``ingress: none`` host
  reaches the container through the kernel's NAT instead, so this is the instance without any hop).
Each proxy's CPU time, run-queue wait and context switches per request are read from /proc/PID/task/*/schedstat
(the kernel's scheduler accounting) around each round: what the extra hop costs, and how long it waits for a CPU.

Bounded: BENCH_REQUESTS (default 1500, at most 6000) ticks per round, BENCH_ROUNDS (default 3) rounds per method,
to 127.0.0.1 of the sandbox host only; plus a run from this machine to the host's address through the Docker
service's public port (the path a client takes; no direct path to compare it with from here).

Printed per method: p50 / p90 / p99 / max of each path, p50 and p99 added (proxy minus direct, before minus
direct) over all rounds and per round, and each proxy's per-request scheduler figures.

Run: DEPLOYERD_BENCH_SANDBOX=<state dir of a running 2-host sandbox> .venv/bin/python bench/ingress_latency.py
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "bench"))

from daemon_harness import DesiredRepo, settings_for  # noqa: E402
from load_gen import run_load  # noqa: E402
from test_ingress_systemd import service as systemd_service  # noqa: E402
from test_systemd import systemd_daemon  # noqa: E402

from deployerd import sandbox as sbx  # noqa: E402
from deployerd.ingress.config import HAPROXY, UNIT_NAME, Route, render_config  # noqa: E402

TICKS = min(int(os.environ.get("BENCH_REQUESTS", "1500")), 6000)
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
PORTS = {"docker": 8331, "systemd": 8332}  # public ports; the "before" proxy binds them + 1000
BEFORE_UNIT = "deployerd-bench-before.service"
BEFORE_CONFIG = "/tmp/deployerd-bench-before.cfg"
BEFORE_DROPPED = ("    nbthread 1",)  # what this change added to the config (the "before" proxy runs without)

CLIENT = r"""
import glob, json, random, socket, sys, time
spec = json.loads(sys.argv[1])  # {"paths": {name: [port, keepalive]}, "pids": {proxy: [pid, paths]}, "ticks": n}
REQ = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: %s\r\n\r\n"

def once(port, sock=None):
    t0 = time.perf_counter()
    s = sock or socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(REQ % (b"keep-alive" if sock else b"close"))
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise OSError("closed before the headers")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    if b" 200 " not in head[:16]:
        raise OSError(f"answered {head[:40]!r}")
    length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    took = time.perf_counter() - t0
    if sock is None:
        s.close()
    return took

def tasks(pid):  # the process and its children (HAProxy's master and its worker), every thread
    pids, out = [pid], []
    for p in pids:
        for t in glob.glob(f"/proc/{p}/task/*"):
            out.append(t)
            try:
                pids += [int(c) for c in open(t + "/children").read().split()]
            except OSError:
                pass
    return out

def sched(pid):
    total = [0, 0, 0]
    for t in tasks(pid):
        try:
            total = [a + int(b) for a, b in zip(total, open(t + "/schedstat").read().split())]
        except OSError:
            pass
    return total

paths, n = spec["paths"], spec["ticks"]
def address(port):
    return tuple(port) if isinstance(port, list) else ("127.0.0.1", port)

def once(port, sock=None, _once=once):
    if isinstance(port, list):  # [address, port]: a new connection to that address
        t0 = time.perf_counter()
        with socket.create_connection(tuple(port), timeout=5) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(REQ % b"close")
            buf = b""
            while chunk := s.recv(65536):
                buf += chunk
        if b" 200 " not in buf[:16]:
            raise OSError(f"answered {buf[:40]!r}")
        return time.perf_counter() - t0
    return _once(port, sock)

kept = {k: socket.create_connection(address(p), timeout=5) for k, (p, ka) in paths.items() if ka}
out = {k: [] for k in paths}
s0 = {k: sched(p) for k, (p, _) in spec["pids"].items()}
start = time.monotonic()
for i in range(n):
    time.sleep(max(0.0, start + i / 50 - time.monotonic()))
    order = list(paths.items())
    random.shuffle(order)
    for k, (port, ka) in order:
        out[k].append(once(port, kept.get(k)))
s1 = {k: sched(p) for k, (p, _) in spec["pids"].items()}
out["sched"] = {k: [(b - a) / (n * spec["pids"][k][1]) for a, b in zip(s0[k], s1[k])] for k in s0}  # per request
print(json.dumps(out))
"""


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return 1000 * s[min(len(s) - 1, int(p / 100 * len(s)))]


def row(name: str, xs: list[float]) -> str:
    return (f"{name}: p50 {pct(xs, 50):.3f} ms, p90 {pct(xs, 90):.3f}, p99 {pct(xs, 99):.3f}, "
            f"max {1000 * max(xs):.3f} ({len(xs)} requests)")


def added(path: list[float], direct: list[float]) -> str:
    return f"p50 {pct(path, 50) - pct(direct, 50):+.3f} ms, p99 {pct(path, 99) - pct(direct, 99):+.3f} ms"


def before_config(routes: list[Route]) -> str:
    """deployerd's config for ``routes`` as it was before this change, without an admin socket (not needed)."""
    text = render_config(routes)
    for line in BEFORE_DROPPED:
        assert f"\n{line}\n" in text, f"{line!r} is no longer in the config: update BEFORE_DROPPED"
        text = text.replace(f"\n{line}\n", "\n")
    return "\n".join(ln for ln in text.splitlines() if "stats socket" not in ln) + "\n"


async def container_address(conn: Any, private: int) -> str:
    """The address of the container publishing ``private`` (its port inside is the service's port)."""
    found = await conn.run(["docker", "ps", "-q", "--filter", f"publish={private}"])
    shown = await conn.run(["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                            found.stdout.split()[0]])
    return str(shown.stdout.strip())


def report(method: str, rounds: list[dict[str, Any]]) -> None:
    series: dict[str, list[float]] = {}
    for r in rounds:
        for k, v in r.items():
            if k != "sched":
                series.setdefault(k, []).extend(v)
    print(f"{method} on the host (loopback, {len(rounds)} x {TICKS} requests per path at 50 requests/s):")
    for name, xs in series.items():
        print("  " + row(name, xs))
    d = series["direct"]
    print(f"  added by the proxy, new connection each: {added(series['proxy'], d)} (goal: p99 <= 1 ms)")
    print(f"  added by the proxy before this change:   {added(series['before'], d)}")
    print(f"  added, client keep-alive to the proxy:   {added(series['proxy_keepalive'], d)}")
    if "container" in series:
        print(f"  the private port (Docker's userland proxy) vs the container's address: "
              f"{added(d, series['container'])}; through HAProxy vs the container's address: "
              f"{added(series['proxy'], series['container'])}")
    if "direct_keepalive" in series:
        print(f"  keep-alive through the proxy vs keep-alive direct: "
              f"{added(series['proxy_keepalive'], series['direct_keepalive'])}")
    for i, r in enumerate(rounds, 1):
        sched = "; ".join(f"{k} cpu {v[0] / 1000:.0f} us, run-queue wait {v[1] / 1000:.0f} us, "
                          f"{v[2]:.2f} switches" for k, v in r["sched"].items())
        print(f"  round {i}: added now {added(r['proxy'], r['direct'])}; before {added(r['before'], r['direct'])}; "
              f"per request: {sched}")


async def main() -> None:
    state = os.environ.get("DEPLOYERD_BENCH_SANDBOX")
    info = sbx.load_info(Path(state)) if state else None
    if info is None or len(info.hosts) < 2:
        raise SystemExit("set DEPLOYERD_BENCH_SANDBOX to a running sandbox of at least 2 hosts")
    host = info.hosts[1]
    results: dict[str, list[dict[str, Any]]] = {"docker": [], "systemd": []}
    with tempfile.TemporaryDirectory(prefix="ingress-latency-") as tmp:
        repo = DesiredRepo(Path(tmp) / "repo", info)
        hosts = yaml.safe_load((repo.path / "hosts.yaml").read_text())
        hosts["hosts"][host.name]["ingress"] = "haproxy"
        repo.write("hosts.yaml", yaml.safe_dump(hosts))
        repo.service("lat-web", PORTS["docker"], host=host.name, health_timeout_s=10)
        systemd_service(repo, "lat-py", PORTS["systemd"], "1", host=host.name)
        repo.commit("lat-web and lat-py behind HAProxy")
        async with systemd_daemon(settings_for(Path(tmp), info, repo)) as d:
            await d.reconcile()
            private = {}
            for method, name in (("docker", "lat-web"), ("systemd", "lat-py")):
                job = await d.last_job(name)
                assert job.status.value == "succeeded", (name, job.status, job.error)
                private[method] = int(job.phase("Verify Health").details["switch"]["private_port"])
            conn = (await d.engine.hosts.handle(d.engine.desired.hosts[host.name])).conn
            routes = [Route(f"before_{m}", PORTS[m] + 1000, "r", private[m]) for m in PORTS]
            await conn.put_bytes(BEFORE_CONFIG, before_config(routes).encode(), mode=0o600)
            await conn.run(["systemd-run", f"--unit={BEFORE_UNIT}", "--collect", HAPROXY, "-db", "-f", BEFORE_CONFIG])
            try:
                pids = {}
                for key, unit in (("proxy", UNIT_NAME), ("before", BEFORE_UNIT)):
                    shown = await conn.run(["systemctl", "show", "--value", "--property=MainPID", unit])
                    pids[key] = int(shown.stdout.strip())
                specs = {}
                for m in PORTS:
                    paths = {"direct": [private[m], False], "proxy": [PORTS[m], False],
                             "before": [PORTS[m] + 1000, False], "proxy_keepalive": [PORTS[m], True]}
                    if m == "systemd":
                        paths["direct_keepalive"] = [private[m], True]
                    else:
                        paths["container"] = [[await container_address(conn, private[m]), PORTS[m]], False]
                    through = {"proxy": sum(p == PORTS[m] for p, _ in paths.values()), "before": 1}
                    specs[m] = {"paths": paths, "pids": {k: [pid, through[k]] for k, pid in pids.items()}}
                await asyncio.sleep(1.0)  # the before proxy binds
                for m in PORTS:  # warm both paths
                    await conn.run(["python3", "-c", CLIENT, json.dumps({**specs[m], "ticks": 50})], timeout=60)
                for _ in range(ROUNDS):
                    for m in PORTS:  # the methods alternate, so the machine's load hits both alike
                        done = await conn.run(["python3", "-c", CLIENT, json.dumps({**specs[m], "ticks": TICKS})],
                                              timeout=60 + TICKS / 10)
                        results[m].append(json.loads(done.stdout))
            finally:
                await conn.run(["systemctl", "stop", BEFORE_UNIT], check=False)
                await conn.run(["rm", "-f", BEFORE_CONFIG], check=False)
            outside = await run_load(host.internal_address, PORTS["docker"], rate=50, seconds=min(TICKS / 50, 60),
                                     max_requests=TICKS)
    load = os.getloadavg()
    print(f"host {host.name}; this machine's load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    for m in PORTS:
        report(m, results[m])
    print(f"from this machine to {host.internal_address}:{PORTS['docker']} (Docker service's public port, "
          f"keep-alive): {outside.summary()}")


if __name__ == "__main__":
    asyncio.run(main())
