"""End-to-end tests of the SSH connection seam against real OpenSSH on the sandbox hosts.

Each test checks an observable effect on the host (files, modes, inodes, processes) rather than
trusting our own return values, and each has a control that proves the check could fail.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import asyncssh
import httpx
import pytest

from deployerd.connection import (
    AuthenticationRejected,
    CommandError,
    CommandTimeout,
    Connection,
    ConnectionPool,
    HostAddress,
    HostKeyRejected,
    HostUnreachable,
    RemoteFileError,
)

pytestmark = pytest.mark.e2e

# Prints the pids of the sshd processes serving the connection this runs on (the per-connection
# session child and its privileged monitor), stopping below the listener (whose parent is init).
_SSHD_PIDS = r"""
import os
def stat(pid):
    s = open(f"/proc/{pid}/stat").read()
    return s[s.index("(") + 1:s.rindex(")")], int(s[s.rindex(")") + 2:].split()[1])
pid, out = os.getppid(), []
while pid > 1:
    comm, ppid = stat(pid)
    if comm.startswith("sshd") and ppid > 1:
        out.append(pid)
    pid = ppid
print(" ".join(map(str, out)))
"""


def _address(h: Any) -> HostAddress:
    return HostAddress(
        name=str(h.name),
        address=str(h.address),
        port=int(h.ssh_port),
        user=str(h.user),
        key_path=str(h.key_path),
        known_hosts=str(h.known_hosts),
    )


@pytest.fixture
def host(sandbox: Any) -> HostAddress:
    return _address(sandbox.hosts[0])


@pytest.fixture
async def pool() -> AsyncIterator[ConnectionPool]:
    p = ConnectionPool(connect_timeout=20, keepalive_interval=5)
    yield p
    await p.close_all()


@pytest.fixture
async def conn(pool: ConnectionPool, host: HostAddress) -> Connection:
    return await pool.get(host)


@pytest.fixture
async def scratch(conn: Connection) -> AsyncIterator[str]:
    """A fresh remote directory, so no leftover from an earlier run can make a check pass or fail."""
    d = (await conn.run(["mktemp", "-d", "/tmp/deployerd-conn-XXXXXX"])).stdout.strip()
    yield d
    await conn.run(["rm", "-rf", "--", d], check=False)


def _free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _listing(conn: Connection, d: str) -> list[str]:
    return sorted((await conn.run(["ls", "-A", "--", d])).stdout.split())


# ------------------------------------------------------------------------------------------ commands


async def test_argv_arrives_literally_and_nothing_is_executed(conn: Connection, scratch: str) -> None:
    args = [
        f"; touch {scratch}/pwned",
        f"$(touch {scratch}/pwned2)",
        f"`touch {scratch}/pwned3`",
        f"a b && touch {scratch}/pwned4 | x > y",
        "it's \"quoted\" \\ $HOME *",
        "",
    ]
    done = await conn.run(["printf", "%s\\n", *args])
    assert done.stdout.split("\n")[:-1] == args
    assert await _listing(conn, scratch) == []
    # Control: a file touched on purpose does show up, so the listing above could have failed.
    await conn.run(["touch", f"{scratch}/control"])
    assert await _listing(conn, scratch) == ["control"]


async def test_stdin_carries_bytes(conn: Connection) -> None:
    payload = b"secret\x00value\nline2\xff"
    done = await conn.run(["sha256sum"], input=payload)
    assert done.stdout.split()[0] == hashlib.sha256(payload).hexdigest()


async def test_exit_status_and_command_error(conn: Connection, host: HostAddress) -> None:
    done = await conn.run(["sh", "-c", "echo out; echo oops >&2; exit 3"], check=False)
    assert (done.exit_status, done.stdout, done.stderr, done.ok) == (3, "out\n", "oops\n", False)
    with pytest.raises(CommandError) as info:
        await conn.run(["sh", "-c", "echo 'it broke here' >&2; exit 7"])
    err = info.value
    assert (err.host, err.command, err.exit_status) == (host.name, "sh", 7)
    assert host.name in str(err) and "sh" in str(err) and "it broke here" in str(err)
    assert (await conn.run(["true"])).ok


async def test_command_timeout_and_string_argv(conn: Connection) -> None:
    with pytest.raises(CommandTimeout):
        await conn.run(["sleep", "30"], timeout=0.5)
    with pytest.raises(TypeError):
        await conn.run("echo hi")  # type: ignore[arg-type]
    assert (await conn.run(["echo", "still usable"])).stdout == "still usable\n"


async def test_many_concurrent_commands_share_one_connection(pool: ConnectionPool, host: HostAddress) -> None:
    # More than OpenSSH's MaxSessions (10) at once: they must queue, not fail or break the connection.
    conn = await pool.get(host)
    outs = await asyncio.gather(*(conn.run(["echo", str(i)]) for i in range(25)))
    assert [o.stdout for o in outs] == [f"{i}\n" for i in range(25)]
    assert not conn.is_closed and await pool.get(host) is conn


# ---------------------------------------------------------------------------------------------- SFTP


async def test_put_bytes_is_atomic_and_sets_mode(conn: Connection, scratch: str) -> None:
    target = f"{scratch}/conf/app.env"
    await conn.makedirs(f"{scratch}/conf")
    await conn.makedirs(f"{scratch}/conf")  # existing is fine
    await conn.put_bytes(target, b"one\n", mode=0o640)
    first = (await conn.run(["stat", "-c", "%a %i", target])).stdout.split()
    assert first[0] == "640"
    assert await conn.read_bytes(target) == b"one\n"

    await conn.put_bytes(target, b"two\n", mode=0o600)
    second = (await conn.run(["stat", "-c", "%a %i", target])).stdout.split()
    assert second[0] == "600"
    # A new inode renamed over the old one: a reader sees the old file or the new, never a torn one.
    assert second[1] != first[1]
    assert (await conn.run(["cat", target])).stdout == "two\n"
    assert await _listing(conn, f"{scratch}/conf") == ["app.env"]  # no temp file left behind


async def test_put_into_missing_dir_fails_cleanly(conn: Connection, scratch: str) -> None:
    with pytest.raises(RemoteFileError) as info:
        await conn.put_bytes(f"{scratch}/nope/x", b"x")
    assert info.value.host == conn.host.name
    with pytest.raises(RemoteFileError) as missing:
        await conn.read_bytes(f"{scratch}/absent")
    assert missing.value.not_found
    assert await _listing(conn, scratch) == []


async def test_put_file_uploads_large_file(conn: Connection, scratch: str, tmp_path: Path) -> None:
    data = os.urandom(700 * 1024 + 13)  # several read chunks
    local = tmp_path / "blob.bin"
    local.write_bytes(data)
    remote = f"{scratch}/blob.bin"
    await conn.put_file(local, remote, mode=0o755)
    out = (await conn.run(["sh", "-c", 'sha256sum "$1" && stat -c %a "$1"', "sh", remote])).stdout.split()
    assert out[0] == hashlib.sha256(data).hexdigest()
    assert out[-1] == "755"


# ---------------------------------------------------------------------------------------- forwarding


async def test_docker_socket_works_with_aiodocker(host: HostAddress) -> None:
    conn = await Connection.open(host, connect_timeout=20)
    try:
        path = await conn.docker_socket()
        assert await conn.docker_socket() == path  # cached for the life of the connection
        mode = stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode)
        assert mode == 0o700
        docker = aiodocker.Docker(url="unix://" + path)
        try:
            version = await docker.version()
        finally:
            await docker.close()
        assert version["ApiVersion"]
        # The engine is the host's own: it reports the host's hostname, not this machine's.
        info = await conn.run(["hostname"])
        docker = aiodocker.Docker(url="unix://" + path)
        try:
            system = await docker.system.info()
        finally:
            await docker.close()
        assert system["Name"] == info.stdout.strip()
        assert conn.stats.forwards == 1
    finally:
        await conn.close()
    assert not os.path.exists(os.path.dirname(path))


async def test_forward_port_reaches_host_loopback(conn: Connection, scratch: str) -> None:
    token = os.urandom(8).hex()
    await conn.put_bytes(f"{scratch}/index.html", token.encode())
    remote_port = int(
        (
            await conn.run(
                ["python3", "-c",
                 "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"]
            )
        ).stdout
    )
    server = ["busybox", "httpd", "-f", "-p", f"127.0.0.1:{remote_port}", "-h", scratch]
    pid = (
        await conn.run(["sh", "-c", '"$@" >/dev/null 2>&1 </dev/null & echo $!', "sh", *server])
    ).stdout.strip()
    try:
        body = None
        async with conn.forwarded_port(remote_port) as local_port, httpx.AsyncClient() as client:
            for _ in range(100):  # bounded: the server needs a moment to bind
                try:
                    r = await client.get(f"http://127.0.0.1:{local_port}/index.html", timeout=5)
                    body = r.text
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
        assert body == token
        # the tunnel lives only as long as the block: its local port is closed after it
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient() as client:
                await client.get(f"http://127.0.0.1:{local_port}/index.html", timeout=5)
    finally:
        await conn.run(["kill", pid], check=False)


# ---------------------------------------------------------------------------------------------- pool


async def test_pool_reuses_one_connection(host: HostAddress) -> None:
    pool = ConnectionPool(connect_timeout=20)
    try:
        many = await asyncio.gather(*(pool.get(host) for _ in range(5)))
        assert all(c is many[0] for c in many)
        again = await pool.get(host)
        assert again is many[0]
        await again.run(["true"])
        await again.run(["true"])
        await again.makedirs("/tmp")
        s = pool.stats()[host.name]
        assert (s.connects, s.commands, s.sftp_ops, s.round_trips) == (1, 2, 1, 3)
    finally:
        await pool.close_all()


async def test_reconnect_after_dropped_connection(pool: ConnectionPool, host: HostAddress) -> None:
    first = await pool.get(host)
    pids = (await first.run(["python3", "-c", _SSHD_PIDS])).stdout.split()
    assert pids
    # Drop it from the server side, out of band, while it is idle.
    side = await Connection.open(host, connect_timeout=20)
    try:
        await side.run(["kill", "-9", *pids])
    finally:
        await side.close()
    await asyncio.wait_for(first.wait_closed(), timeout=30)
    assert first.is_closed
    second = await pool.get(host)
    assert second is not first
    assert (await second.run(["echo", "back"])).stdout == "back\n"
    assert pool.stats()[host.name].connects == 2


async def test_drop_during_command_is_unreachable_then_reconnects(
    pool: ConnectionPool, host: HostAddress
) -> None:
    first = await pool.get(host)
    pids = (await first.run(["python3", "-c", _SSHD_PIDS])).stdout.split()
    with pytest.raises(HostUnreachable) as info:
        await first.run(["kill", "-9", *pids])
    assert info.value.host == host.name and info.value.transient
    second = await pool.get(host)
    assert second is not first
    assert (await second.run(["true"])).ok


async def test_changed_address_reconnects(pool: ConnectionPool, host: HostAddress, tmp_path: Path) -> None:
    first = await pool.get(host)
    copy = tmp_path / "known_hosts"
    copy.write_bytes(Path(host.known_hosts).read_bytes())
    moved = dataclasses.replace(host, known_hosts=str(copy))
    second = await pool.get(moved)
    assert second is not first and first.is_closed
    assert (await second.run(["true"])).ok
    assert pool.stats()[host.name].connects == 2


# -------------------------------------------------------------------------------------------- errors


async def test_wrong_host_key_is_rejected(host: HostAddress, tmp_path: Path) -> None:
    impostor = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    pattern = host.address if host.port == 22 else f"[{host.address}]:{host.port}"
    wrong = tmp_path / "known_hosts_wrong"
    wrong.write_text(f"{pattern} {impostor}\n")
    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")
    pool = ConnectionPool(connect_timeout=20)
    try:
        for kh in (wrong, empty):
            with pytest.raises(HostKeyRejected) as info:
                await pool.get(dataclasses.replace(host, known_hosts=str(kh)))
            assert str(info.value) == f"host key for {host.name} did not verify against {kh}"
            assert not info.value.transient
        assert pool.stats()[host.name].connects == 0
        # Control: the real known_hosts file connects, so the rejections above are about the key.
        assert (await (await pool.get(host)).run(["true"])).ok
    finally:
        await pool.close_all()


async def test_unknown_client_key_is_refused(host: HostAddress, tmp_path: Path) -> None:
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    key = tmp_path / "id_stranger"
    stranger.write_private_key(str(key))
    key.chmod(0o600)
    with pytest.raises(AuthenticationRejected) as info:
        await Connection.open(dataclasses.replace(host, key_path=str(key)), connect_timeout=20)
    assert info.value.host == host.name and not info.value.transient
    secret = stranger.export_private_key().decode()
    assert secret.splitlines()[1] not in str(info.value)
    with pytest.raises(AuthenticationRejected):
        await Connection.open(dataclasses.replace(host, key_path=str(tmp_path / "missing")), connect_timeout=20)


async def test_unreachable_port_names_the_host(host: HostAddress) -> None:
    ghost = dataclasses.replace(host, name="ghost-host", address="127.0.0.1", port=_free_local_port())
    pool = ConnectionPool(connect_timeout=10)
    with pytest.raises(HostUnreachable) as info:
        await pool.get(ghost)
    assert not isinstance(info.value, HostKeyRejected)
    assert info.value.host == "ghost-host" and "ghost-host" in str(info.value)
    assert info.value.reason == "connection refused" and info.value.transient
    assert (pool.stats()["ghost-host"].connects, pool.stats()["ghost-host"].failures) == (0, 1)


async def test_silent_server_times_out_as_unreachable(host: HostAddress) -> None:
    # A port that accepts TCP but never speaks SSH (like a host still booting): bounded by connect_timeout.
    accepted: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        mute = dataclasses.replace(host, name="mute-host", address="127.0.0.1", port=port)
        with pytest.raises(HostUnreachable) as info:
            await Connection.open(mute, connect_timeout=1)
        assert info.value.host == "mute-host" and info.value.reason == "timed out"
        assert accepted  # the TCP connect did happen: it is the SSH handshake that timed out
    finally:
        for w in accepted:
            w.close()
        server.close()
        await server.wait_closed()


async def test_command_lines_stay_out_of_logs(conn: Connection, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    marker = "not-for-logs-" + os.urandom(6).hex()
    await conn.run(["echo", marker])
    with pytest.raises(CommandError) as info:
        await conn.run(["sh", "-c", "exit 1", marker])
    assert marker not in caplog.text and marker not in str(info.value)


def test_host_address_requires_known_hosts() -> None:
    with pytest.raises(ValueError):
        HostAddress(name="h", address="127.0.0.1", key_path="/k", known_hosts="")
