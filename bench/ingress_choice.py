"""Caddy (admin API) or HAProxy (runtime API) as the per-host ingress proxy: measured on one sandbox host.

For each proxy, on the same host and the same two upstreams (a small HTTP server on 127.0.0.1 ports A, B;
A is also reached directly for the baseline):
1. latency added: 50 req/s (keep-alive) direct to A vs through the proxy to A, p50/p99, runs interleaved;
2. switch atomicity: 50 req/s through the proxy while the upstream is switched A<->B every 0.5 s (SWITCHES
   times), with keep-alive connections and with a new connection per request: failed requests, longest gap;
3. drain: a request that takes 2 s is in flight on A when the switch to B happens: does it finish (200), how
   long until the proxy reports nothing in flight on A, and do new requests reach B at once;
4. cost of one switch (the admin call, over the SSH-forwarded unix socket) and of a reload that adds a listener;
5. memory: the proxy's RSS (all its processes) after the runs.

Run: `.venv/bin/python bench/ingress_choice.py` with DEPLOYERD_BENCH_SANDBOX=<state dir of a running sandbox>.
Traffic goes to the sandbox host's own address only, bounded (run_load's rate, count and time limits).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "bench"))

from _common import bench_host  # noqa: E402
from load_gen import LoadResult, run_load  # noqa: E402

from deployerd.connection import Connection  # noqa: E402

SWITCHES = int(os.environ.get("BENCH_SWITCHES", "20"))
LAT_SECONDS = float(os.environ.get("BENCH_LAT_SECONDS", "10"))
A, B, FRONT = 19001, 19002, 18080
DIR = "/run/bench-ingress"

APP = r"""
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
name, port = sys.argv[1], int(sys.argv[2])
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def do_GET(self):
        if self.path.startswith("/slow"):
            time.sleep(2)
        body = name.encode()  # one write: headers and body apart would meet Nagle and delayed ACKs (40 ms)
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-App: %s\r\n\r\n%s" % (len(body), body, body))
    def log_message(self, *a):
        pass
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("0.0.0.0", port), H).serve_forever()
"""


def caddy_config(upstream: int, extra_port: int | None = None) -> dict:
    def server(port: int, up: int) -> dict:
        return {"listen": [f":{port}"], "automatic_https": {"disable": True},
                "routes": [{"handle": [{"handler": "reverse_proxy", "upstreams": [{"dial": f"127.0.0.1:{up}"}],
                                        "headers": {"response": {"set": {"X-Deployerd-Upstream": [str(up)]}}}}]}]}
    servers = {"svc": server(FRONT, upstream)}
    if extra_port:
        servers["extra"] = server(extra_port, upstream)
    return {"admin": {"listen": f"unix/{DIR}/caddy.sock", "origins": ["localhost"]}, "logging": {"logs": {"default": {"level": "ERROR"}}},
            "storage": {"module": "file_system", "root": f"{DIR}/caddy-data"},
            "apps": {"http": {"grace_period": "30s", "servers": servers}}}


HAPROXY_CFG = f"""global
    stats socket {DIR}/haproxy.sock mode 600 level admin expose-fd listeners
    log stdout format raw local0 err
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend svc
    bind :{FRONT}
    default_backend svc
    http-response set-header X-Deployerd-Upstream %[srv_name]
backend svc
    server blue 127.0.0.1:{A}
    server green 127.0.0.1:{B} disabled
"""


class Caddy:
    name = "caddy"
    unit = "bench-caddy"

    def __init__(self, conn: Connection) -> None:
        self.conn, self.http, self.current = conn, None, A

    async def start(self) -> None:
        await self.conn.put_bytes(f"{DIR}/caddy.json", json.dumps(caddy_config(A)).encode())
        await self.conn.run(["systemd-run", f"--unit={self.unit}", "caddy", "run", "--config", f"{DIR}/caddy.json"])
        await wait_socket(self.conn, f"{DIR}/caddy.sock")
        sock = await self.conn.forwarded_socket(f"{DIR}/caddy.sock")
        self.http = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=sock), base_url="http://localhost")

    async def switch(self, to: int) -> None:
        assert self.http is not None
        r = await self.http.patch("/config/apps/http/servers/svc/routes/0/handle/0",
                                  json=caddy_config(to)["apps"]["http"]["servers"]["svc"]["routes"][0]["handle"][0])
        if r.status_code != 200:
            raise RuntimeError(f"caddy: HTTP {r.status_code} {r.text}")
        self.current = to

    async def in_flight(self, port: int) -> int:
        assert self.http is not None
        r = await self.http.get("/reverse_proxy/upstreams")
        return sum(u["num_requests"] for u in r.json() if u["address"] == f"127.0.0.1:{port}")

    async def reload_with_listener(self) -> None:
        assert self.http is not None
        (await self.http.post("/load", json=caddy_config(self.current, extra_port=18090))).raise_for_status()

    async def stop(self) -> None:
        if self.http:
            await self.http.aclose()
        await self.conn.run(["systemctl", "stop", self.unit], check=False)


class HAProxy:
    name = "haproxy"
    unit = "bench-haproxy"

    def __init__(self, conn: Connection) -> None:
        self.conn, self.sock, self.current = conn, "", A

    async def start(self) -> None:
        await self.conn.put_bytes(f"{DIR}/haproxy.cfg", HAPROXY_CFG.encode())
        await self.conn.run(["systemd-run", f"--unit={self.unit}", "-p", "Type=notify", "-p", "ExecReload=/bin/kill -USR2 $MAINPID",
                             "haproxy", "-Ws", "-f", f"{DIR}/haproxy.cfg"])
        await wait_socket(self.conn, f"{DIR}/haproxy.sock")
        self.sock = await self.conn.forwarded_socket(f"{DIR}/haproxy.sock")

    async def cmd(self, line: str) -> str:
        reader, writer = await asyncio.open_unix_connection(self.sock)
        writer.write(line.encode() + b"\n")
        await writer.drain()
        out = await reader.read()
        writer.close()
        return out.decode()

    async def switch(self, to: int) -> None:
        new, old = ("green", "blue") if to == B else ("blue", "green")
        out = await self.cmd(f"set server svc/{new} state ready; set server svc/{old} state drain")
        if out.strip():
            raise RuntimeError(out)
        self.current = to

    async def in_flight(self, port: int) -> int:
        srv = "blue" if port == A else "green"
        for line in (await self.cmd("show stat")).splitlines():
            f = line.split(",")
            if len(f) > 4 and f[0] == "svc" and f[1] == srv:
                return int(f[4])  # scur
        return -1

    async def reload_with_listener(self) -> None:
        await self.conn.put_bytes(f"{DIR}/haproxy.cfg", (HAPROXY_CFG + "frontend extra\n    bind :18090\n"
                                                         "    default_backend svc\n").encode())
        await self.conn.run(["systemctl", "reload", self.unit])

    async def stop(self) -> None:
        await self.conn.run(["systemctl", "stop", self.unit], check=False)


async def wait_socket(conn: Connection, path: str) -> None:
    for _ in range(100):
        if (await conn.run(["test", "-S", path], check=False)).ok:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{path} never appeared")


async def rss_kib(conn: Connection, unit: str) -> int:
    pids = (await conn.run(["systemctl", "show", "-p", "MainPID", "--value", unit])).stdout.split()
    out = (await conn.run(["ps", "-o", "rss=", "--ppid", pids[0], "-p", pids[0]])).stdout.split()
    return sum(int(x) for x in out)


ON_HOST_CLIENT = r"""
import http.client, sys, time
port, n, rate = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
lat = []
start = time.monotonic()
for i in range(n):
    time.sleep(max(0.0, start + i / rate - time.monotonic()))
    t0 = time.perf_counter()
    c.request("GET", "/")
    r = c.getresponse(); r.read()
    lat.append(time.perf_counter() - t0)
lat.sort()
print(f"{1000 * lat[len(lat) // 2]:.3f} {1000 * lat[int(0.99 * len(lat))]:.3f}")
"""


async def on_host_latency(conn: Connection, port: int, n: int = 500) -> tuple[float, float]:
    """p50 and p99 (ms) of ``n`` keep-alive requests at 50/s from the host itself: no network, no SSH."""
    out = (await conn.run(["python3", "-c", ON_HOST_CLIENT, str(port), str(n), "50"], timeout=120)).stdout.split()
    return float(out[0]), float(out[1])


async def measure(proxy: Caddy | HAProxy, conn: Connection, addr: str) -> dict:
    await proxy.start()
    res: dict = {"proxy": proxy.name}
    await run_load(addr, FRONT, seconds=1)  # warm
    direct, through = LoadResult(), LoadResult()
    for _ in range(2):  # interleaved, so a noisy neighbour hits both alike
        direct.samples += (await run_load(addr, A, seconds=LAT_SECONDS / 2)).samples
        through.samples += (await run_load(addr, FRONT, seconds=LAT_SECONDS / 2)).samples
    res["direct"] = direct.summary()
    res["proxy_path"] = through.summary()
    res["added_p50_ms"] = round(through.percentile_ms(50) - direct.percentile_ms(50), 3)
    res["added_p99_ms"] = round(through.percentile_ms(99) - direct.percentile_ms(99), 3)
    d50, d99 = await on_host_latency(conn, A)
    p50, p99 = await on_host_latency(conn, FRONT)
    res["on_host_direct_p50_p99_ms"], res["on_host_proxy_p50_p99_ms"] = (d50, d99), (p50, p99)
    res["on_host_added_p50_ms"], res["on_host_added_p99_ms"] = round(p50 - d50, 3), round(p99 - d99, 3)

    switch_s: list[float] = []
    for keepalive in (True, False):
        stop = asyncio.Event()
        load = asyncio.create_task(run_load(addr, FRONT, seconds=SWITCHES * 0.5 + 3, stop=stop, keepalive=keepalive))
        await asyncio.sleep(1)
        for i in range(SWITCHES):
            t0 = time.monotonic()
            await proxy.switch(B if proxy.current == A else A)
            switch_s.append(time.monotonic() - t0)
            await asyncio.sleep(0.5)
        await asyncio.sleep(1)
        stop.set()
        r = await load
        res[f"switching_{'keepalive' if keepalive else 'new_conn'}"] = (
            f"{len(r.samples)} requests over {SWITCHES} switches: {r.failed} failed, longest gap {r.longest_gap_s():.3f} s, "
            f"upstreams seen {r.upstreams()}")
    res["switch_call_ms_median"] = round(1000 * statistics.median(switch_s), 2)

    if proxy.current != A:
        await proxy.switch(A)
    slow = asyncio.create_task(run_load(addr, FRONT, path="/slow", seconds=10, max_requests=1))
    await asyncio.sleep(0.5)
    t0 = time.monotonic()
    await proxy.switch(B)
    after = await run_load(addr, FRONT, seconds=0.2)
    drained_at = None
    while time.monotonic() - t0 < 10:
        if await proxy.in_flight(A) == 0:
            drained_at = time.monotonic() - t0
            break
        await asyncio.sleep(0.05)
    s = (await slow).samples[0]
    res["drain"] = (f"slow request on the old upstream: {'ok' if s.ok else 'FAILED ' + s.error} ({s.upstream}) "
                    f"in {s.latency_s:.2f} s; old upstream idle {drained_at and round(drained_at, 2)} s after the "
                    f"switch; requests after the switch went to {after.upstreams()} ({after.failed} failed)")

    stop = asyncio.Event()
    load = asyncio.create_task(run_load(addr, FRONT, seconds=8, stop=stop))
    await asyncio.sleep(1)
    t0 = time.monotonic()
    await proxy.reload_with_listener()
    res["reload_new_listener_s"] = round(time.monotonic() - t0, 3)
    await asyncio.sleep(2)
    stop.set()
    r = await load
    res["during_reload"] = f"{len(r.samples)} requests, {r.failed} failed, longest gap {r.longest_gap_s():.3f} s"
    res["rss_mib"] = round(await rss_kib(conn, proxy.unit) / 1024, 1)
    await proxy.stop()
    return res


async def main() -> None:
    h, conn = await bench_host()
    try:
        for u in ("bench-caddy", "bench-haproxy", "bench-app-a", "bench-app-b"):
            await conn.run(["systemctl", "stop", u], check=False)
            await conn.run(["systemctl", "reset-failed", u], check=False)
        await conn.run(["mkdir", "-p", DIR])
        await conn.put_bytes(f"{DIR}/app.py", APP.encode())
        for name, port in (("a", A), ("b", B)):
            await conn.run(["systemd-run", f"--unit=bench-app-{name}", "python3", f"{DIR}/app.py", str(port), str(port)])
        await asyncio.sleep(1)
        for proxy in (Caddy(conn), HAProxy(conn)):
            print(json.dumps(await measure(proxy, conn, h.internal_address), indent=1), flush=True)
    finally:
        for u in ("bench-caddy", "bench-haproxy", "bench-app-a", "bench-app-b"):
            await conn.run(["systemctl", "stop", u], check=False)
        await conn.run(["rm", "-rf", DIR], check=False)
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
