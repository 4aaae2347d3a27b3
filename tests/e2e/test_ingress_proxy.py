"""The ingress proxy driver on a real sandbox host: HAProxy as deployerd's unit, driven over SSH.

A route is created, switched between two real upstreams under a bounded load (no request may fail), drained;
the proxy is SIGKILLed (systemd restarts it and it serves what was switched to); a public port held by
another process is refused with an error naming the host and the port, and what served keeps serving.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from load_gen import run_load

from deployerd.connection import Connection, HostAddress
from deployerd.health import probe_client
from deployerd.ingress import IngressError, IngressProxy
from deployerd.ingress.config import UNIT_NAME
from deployerd.sandbox import SandboxInfo

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

A, B, TAKEN = 20901, 20902, 18502
FRONT = 18501
UNITS = ("t-ingress-a", "t-ingress-b", "t-ingress-squatter")


@pytest.fixture
async def conn(sandbox: SandboxInfo) -> AsyncIterator[Connection]:
    h = sandbox.hosts[0]
    c = await Connection.open(HostAddress(name=h.name, address=h.address, port=h.ssh_port, user=h.user,
                                          key_path=h.key_path, known_hosts=h.known_hosts), connect_timeout=30)
    for u in UNITS:
        await c.run(["systemctl", "stop", u], check=False)
        await c.run(["systemctl", "reset-failed", u], check=False)
    for name, port in (("a", A), ("b", B)):
        await c.run(["mkdir", "-p", f"/tmp/t-ingress/{name}"])
        await c.put_bytes(f"/tmp/t-ingress/{name}/index.html", name.encode())
        await c.run(["systemd-run", f"--unit=t-ingress-{name}", "busybox", "httpd", "-f", "-p",
                     f"127.0.0.1:{port}", "-h", f"/tmp/t-ingress/{name}"])
    yield c
    proxy = IngressProxy(c, h.name)
    for service in ("t-web", "t-api"):
        try:
            await proxy.remove_route(service)
        except IngressError:
            pass
    for u in UNITS:
        await c.run(["systemctl", "stop", u], check=False)
    await c.run(["rm", "-rf", "/tmp/t-ingress"], check=False)
    await c.close()


async def test_switch_drain_restart_and_a_taken_port(conn: Connection, sandbox: SandboxInfo) -> None:
    h = sandbox.hosts[0]
    proxy = IngressProxy(conn, h.name, drain_timeout_s=5)
    http = probe_client()
    try:
        await proxy.ensure_route("t-web", FRONT)
        assert await proxy.running()
        first = await proxy.switch("t-web", "r1", A)
        assert (first.before, first.after) == (None, "r1")
        assert await proxy.front_door(http, FRONT, "/") == "r1"

        stop = asyncio.Event()
        load = asyncio.create_task(run_load(h.internal_address, FRONT, rate=50, seconds=20, stop=stop))
        await asyncio.sleep(0.5)
        for release, port in (("r2", B), ("r1", A), ("r2", B)):  # back to r1 while it drains: enabled again
            done = await proxy.switch("t-web", release, port)
            assert done.after == release
            await asyncio.sleep(0.3)
        await proxy.drain("t-web", "r1")
        await asyncio.sleep(0.3)
        stop.set()
        result = await load
        assert result.failed == 0, result.summary()
        assert set(result.upstreams()) == {"r1", "r2"}
        state = await proxy.state()
        assert [s.name for s in state.servers["t-web"]] == ["r2"]  # r1 drained and removed

        await conn.run(["systemctl", "kill", "--signal=KILL", UNIT_NAME])
        for _ in range(100):  # Restart=always: back within ~1 s, from the config written before the switch
            await asyncio.sleep(0.1)
            try:
                if await proxy.front_door(http, FRONT, "/") == "r2":
                    break
            except IngressError:
                continue
        assert await proxy.front_door(http, FRONT, "/") == "r2"

        await conn.run(["systemd-run", "--unit=t-ingress-squatter", "busybox", "httpd", "-f", "-p",
                        f"0.0.0.0:{TAKEN}", "-h", "/tmp/t-ingress/a"])
        await asyncio.sleep(0.3)
        with pytest.raises(IngressError, match=rf"host {h.name}: .*port {TAKEN} of t-api is taken"):
            await proxy.ensure_route("t-api", TAKEN)
        assert await proxy.front_door(http, FRONT, "/") == "r2"  # what served keeps serving
        assert "t-api" not in {r.service for r in await proxy.routes()}
    finally:
        await http.aclose()


async def test_a_dead_proxy_is_named_and_started_again(conn: Connection, sandbox: SandboxInfo) -> None:
    h = sandbox.hosts[0]
    proxy = IngressProxy(conn, h.name)
    await proxy.ensure_route("t-web", FRONT)
    await proxy.switch("t-web", "r1", A)
    await conn.run(["systemctl", "stop", UNIT_NAME])
    with pytest.raises(IngressError, match=rf"host {h.name}: ingress proxy: its admin socket does not answer"):
        await proxy.state()
    assert not await proxy.running()
    await proxy.ensure_route("t-web", FRONT)  # what a deploy does first: the proxy runs again, serving r1
    assert (await proxy.state()).active("t-web").name == "r1"  # type: ignore[union-attr]
