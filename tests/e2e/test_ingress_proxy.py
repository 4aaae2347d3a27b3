"""The ingress proxy driver on a real sandbox host: HAProxy as deployerd's unit, driven over SSH.

A route is created, switched between two real upstreams under a bounded load (no request may fail), drained;
the proxy is SIGKILLed (systemd restarts it and it serves what was switched to); a public port held by
another process is refused with an error naming the host and the port, and what served keeps serving; a change
waits while another process (another daemon) holds the host's proxy lock, and goes through once that process is
SIGKILLed.
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import AsyncIterator

import pytest
from daemon_harness import ssh_opts
from load_gen import run_load

from deployerd.connection import Connection, HostAddress
from deployerd.health import probe_client
from deployerd.ingress import IngressError, IngressProxy
from deployerd.ingress import config as config_module
from deployerd.ingress import proxy as proxy_module
from deployerd.ingress.config import LOCK_PATH, UNIT_NAME, lock_command
from deployerd.sandbox import HostInfo, SandboxInfo

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

A, B, TAKEN, OTHER = 20901, 20902, 18502, 18503
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


async def hold_host_lock(h: HostInfo) -> asyncio.subprocess.Process:
    """Another process holding the host's proxy lock, as another daemon's change would: OpenSSH's client on its own
    connection, running deployerd's lock holder (verified host key), once it says it holds the lock."""
    holder = await asyncio.create_subprocess_exec(
        "ssh", *ssh_opts(h), f"{h.user}@{h.address}", shlex.join(lock_command()),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert holder.stdout is not None
    assert await asyncio.wait_for(holder.stdout.readline(), 30) == b"held\n"
    return holder


async def test_a_change_waits_for_the_lock_another_daemon_holds(conn: Connection, sandbox: SandboxInfo,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    h = sandbox.hosts[0]
    proxy = IngressProxy(conn, h.name)
    await proxy.ensure_route("t-web", FRONT)
    holder = await hold_host_lock(h)
    try:
        change = asyncio.create_task(proxy.ensure_route("t-api", OTHER))
        await asyncio.sleep(2)
        assert not change.done()  # it waits for the other holder: no read-change-write of the config meanwhile
        assert "t-api" not in {r.service for r in await proxy.routes()}
    finally:
        holder.kill()  # SIGKILL, as a daemon dies: its connection closes, the host's holder exits, the lock goes
        await holder.wait()
    await asyncio.wait_for(change, 30)
    assert {r.service for r in await proxy.routes()} >= {"t-web", "t-api"}  # neither change lost the other's route

    monkeypatch.setattr(proxy_module, "LOCK_WAIT_S", 1)
    holder = await hold_host_lock(h)
    try:
        with pytest.raises(IngressError, match=rf"host {h.name}: ingress proxy: could not take its lock "
                                               rf"{LOCK_PATH}: held by another process for over 1s"):
            await proxy.remove_route("t-api")
    finally:
        holder.kill()
        await holder.wait()
    assert "t-api" in {r.service for r in await proxy.routes()}  # a change that could not lock changed nothing

    monkeypatch.setattr(config_module, "LOCK_PATH", "/nonexistent-dir/deployerd-ingress.lock")
    with pytest.raises(IngressError, match=rf"host {h.name}: ingress proxy: could not take its lock .*: cannot open"):
        await proxy.remove_route("t-api")
    assert "t-api" in {r.service for r in await proxy.routes()}
