"""Prune and retention remove only what deployerd created: a service dir carries deployerd's marker
(``.deployerd.json``), and one without it (a folder deployerd finds) is refused with nothing removed."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from deployerd.connection import Connection
from deployerd.desired import HostSpec
from deployerd.runtimes import RUNTIMES, Runtime
from deployerd.runtimes.base import MARKER_FILE, ForeignDirectory

pytestmark = pytest.mark.e2e


@pytest_asyncio.fixture(loop_scope="session")
async def base(conn: Connection) -> AsyncIterator[str]:
    path = f"/opt/deployerd-test-own-{secrets.token_hex(4)}"
    try:
        yield path
    finally:
        await conn.run(["rm", "-rf", "--", path])


_opened: list[Runtime] = []


def runtime(method: str, conn: Connection, base: str) -> Runtime:
    rt = RUNTIMES[method](conn, HostSpec(name=conn.host.name, address="127.0.0.1", base_dir=base))
    _opened.append(rt)
    return rt


@pytest_asyncio.fixture(loop_scope="session", autouse=True)
async def _close_runtimes() -> AsyncIterator[None]:
    yield
    while _opened:
        await _opened.pop().close()


async def exists(conn: Connection, path: str) -> bool:
    return (await conn.run(["test", "-e", path], check=False)).ok


@pytest.mark.parametrize("method", ["docker", "systemd"])
async def test_folder_without_marker_is_never_removed(conn: Connection, base: str, method: str) -> None:
    rt = runtime(method, conn, base)
    keep = f"{base}/ssh/sshd_config"  # what a service named like a system folder would have taken
    await conn.makedirs(f"{base}/ssh/releases/r1")
    await conn.put_bytes(keep, b"PermitRootLogin no\n")
    with pytest.raises(ForeignDirectory, match=r"ssh.*deployerd removes only what it created"):
        await rt.remove_service("ssh")
    with pytest.raises(ForeignDirectory):
        await rt.retain("ssh", keep=[])
    assert await exists(conn, keep) and await exists(conn, f"{base}/ssh/releases/r1")
    with pytest.raises(ForeignDirectory, match="was not created by deployerd"):
        await rt.claim("ssh")  # a deploy does not move into it either
    assert not await exists(conn, f"{base}/ssh/{MARKER_FILE}")


@pytest.mark.parametrize("method", ["docker", "systemd"])
async def test_marker_of_another_instance_is_refused(conn: Connection, base: str, method: str) -> None:
    await conn.makedirs(f"{base}/web")
    await conn.put_bytes(f"{base}/web/{MARKER_FILE}", json.dumps({"instance": "blue", "service": "web"}).encode())
    with pytest.raises(ForeignDirectory, match="'blue'"):
        await runtime(method, conn, base).remove_service("web")
    assert await exists(conn, f"{base}/web/{MARKER_FILE}")


@pytest.mark.parametrize("method", ["docker", "systemd"])
async def test_claimed_dir_is_marked_and_removed_by_prune(conn: Connection, base: str, method: str) -> None:
    rt = runtime(method, conn, base)
    name = f"own-{method}"
    await rt.claim(name)
    marker = json.loads(await conn.read_bytes(f"{base}/{name}/{MARKER_FILE}"))
    assert marker == {"created_by": "deployerd", "instance": "default", "service": name}
    await rt.claim(name)  # a second deploy finds it ours
    await conn.makedirs(f"{base}/{name}/releases/r1")
    assert (await rt.retain(name, keep=[])).releases == ["r1"]
    await rt.remove_service(name)
    assert not await exists(conn, f"{base}/{name}")


async def test_dir_from_before_markers_is_adopted_by_its_traces(conn: Connection, base: str) -> None:
    """A service deployed before markers existed: Transfer's release manifest proves it is deployerd's."""
    rt = runtime("docker", conn, base)
    await conn.makedirs(f"{base}/old/releases/r1")
    await conn.put_bytes(f"{base}/old/releases/r1.manifest.json", b"{}")
    await rt.remove_service("old")
    assert not await exists(conn, f"{base}/old")
