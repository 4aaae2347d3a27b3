"""The latency deployerd's ingress proxy adds: a request through the public port (HAProxy, as deployerd configures
it) next to the same request straight to the instance's private port, in one run.

deployerd deploys one small busybox service on sbx-2 with ``ingress: haproxy``; the instance listens on a private
port of the host's 127.0.0.1, so the direct path exists only on the host itself. The client therefore runs on
the host (a Python script started over SSH: no network, no SSH in the measured path), and sends pairs: every
20 ms one request to the private port and one to the public port (50 requests/s on each path, the pair's order
alternating), so a stall of the machine hits both alike. busybox httpd closes each connection, so every request
opens a new one on both paths; a third series goes through the proxy on one keep-alive connection (what a
browser does; HAProxy still opens a new connection to busybox each time). Bounded: BENCH_REQUESTS (default 1500,
at most 6000) pairs, BENCH_ROUNDS (default 3) runs of them, to 127.0.0.1 of the sandbox host only; plus a run
from this machine to the host's address through the public port (the path a client takes; no direct path
to compare it with from here).

Printed: p50 / p90 / p99 / max of each path, p50 and p99 added (proxy minus direct), and the median and p99 of
the per-pair differences.

Run: DEPLOYERD_BENCH_SANDBOX=<state dir of a running 2-host sandbox> .venv/bin/python bench/ingress_latency.py
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "bench"))

from daemon_harness import DesiredRepo, running_daemon, settings_for  # noqa: E402
from load_gen import run_load  # noqa: E402

from deployerd import sandbox as sbx  # noqa: E402

PAIRS = min(int(os.environ.get("BENCH_REQUESTS", "1500")), 6000)
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
PORT = 8331

CLIENT = r"""
import json, socket, sys, time
direct, public, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
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

keep = socket.create_connection(("127.0.0.1", public), timeout=5)
out = {"direct": [], "proxy": [], "proxy_keepalive": []}
start = time.monotonic()
for i in range(n):
    time.sleep(max(0.0, start + i / 50 - time.monotonic()))
    order = (("direct", direct), ("proxy", public)) if i % 2 else (("proxy", public), ("direct", direct))
    for name, port in order:
        out[name].append(once(port))
    out["proxy_keepalive"].append(once(public, keep))
print(json.dumps(out))
"""


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return 1000 * s[min(len(s) - 1, int(p / 100 * len(s)))]


def row(name: str, xs: list[float]) -> str:
    return (f"{name}: p50 {pct(xs, 50):.3f} ms, p90 {pct(xs, 90):.3f}, p99 {pct(xs, 99):.3f}, "
            f"max {1000 * max(xs):.3f} ({len(xs)} requests)")


async def main() -> None:
    state = os.environ.get("DEPLOYERD_BENCH_SANDBOX")
    info = sbx.load_info(Path(state)) if state else None
    if info is None or len(info.hosts) < 2:
        raise SystemExit("set DEPLOYERD_BENCH_SANDBOX to a running sandbox of at least 2 hosts")
    host = info.hosts[1]
    with tempfile.TemporaryDirectory(prefix="ingress-latency-") as tmp:
        repo = DesiredRepo(Path(tmp) / "repo", info)
        hosts = yaml.safe_load((repo.path / "hosts.yaml").read_text())
        hosts["hosts"][host.name]["ingress"] = "haproxy"
        repo.write("hosts.yaml", yaml.safe_dump(hosts))
        repo.service("lat-web", PORT, host=host.name, health_timeout_s=10)
        repo.commit("lat-web behind HAProxy")
        async with running_daemon(settings_for(Path(tmp), info, repo)) as d:
            await d.reconcile()
            job = await d.last_job("lat-web")
            assert job.status.value == "succeeded", (job.status, job.error)
            private = int(job.phase("Verify Health").details["switch"]["private_port"])
            conn = (await d.engine.hosts.handle(d.engine.desired.hosts[host.name])).conn
            series: dict[str, list[float]] = {"direct": [], "proxy": [], "proxy_keepalive": []}
            await conn.run(["python3", "-c", CLIENT, str(private), str(PORT), "50"], timeout=60)  # warm
            for _ in range(ROUNDS):
                done = await conn.run(["python3", "-c", CLIENT, str(private), str(PORT), str(PAIRS)],
                                      timeout=60 + PAIRS / 25)
                for k, v in json.loads(done.stdout).items():
                    series[k] += v
            outside = await run_load(host.internal_address, PORT, rate=50, seconds=min(PAIRS / 50, 60),
                                     max_requests=PAIRS)
    print(f"on host {host.name} (loopback, {ROUNDS} x {PAIRS} pairs at 50 requests/s per path):")
    for name, xs in series.items():
        print("  " + row(name, xs))
    d, p, k = series["direct"], series["proxy"], series["proxy_keepalive"]
    pairs = [b - a for a, b in zip(d, p, strict=True)]
    print(f"  added by the proxy (new connection each): p50 {pct(p, 50) - pct(d, 50):+.3f} ms, "
          f"p99 {pct(p, 99) - pct(d, 99):+.3f} ms (goal <= 1 ms); per pair: median {pct(pairs, 50):+.3f} ms, "
          f"p99 {pct(pairs, 99):+.3f} ms")
    print(f"  added, client keep-alive to the proxy: p50 {pct(k, 50) - pct(d, 50):+.3f} ms, "
          f"p99 {pct(k, 99) - pct(d, 99):+.3f} ms")
    print(f"from this machine to {host.internal_address}:{PORT} (public port, keep-alive): {outside.summary()}")


if __name__ == "__main__":
    asyncio.run(main())
