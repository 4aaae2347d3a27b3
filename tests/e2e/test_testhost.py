"""A sandbox host behaves like a real server: systemd, sshd with a pinned host key, its own Docker engine."""

from __future__ import annotations

import asyncio
import secrets
import shlex
import tempfile
from pathlib import Path

import aiodocker
import asyncssh
import httpx
import pytest

from deployerd import sandbox as sbx

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]


async def _ok(conn: asyncssh.SSHClientConnection, argv: list[str]) -> str:
    """Run argv on the host (quoted, never pasted) and return stdout; fail the test with stderr otherwise."""
    res = await conn.run(shlex.join(argv))
    assert res.exit_status == 0, f"{argv}: {res.stderr}"
    return str(res.stdout)


async def _get_via_tunnel(conn: asyncssh.SSHClientConnection, port: int, attempts: int = 50) -> str:
    """GET / on the host's loopback ``port`` through an SSH tunnel; retried a bounded number of times."""
    listener = await conn.forward_local_port("127.0.0.1", 0, "127.0.0.1", port)
    try:
        url = f"http://127.0.0.1:{listener.get_port()}/"
        async with httpx.AsyncClient(timeout=5) as client:
            last: Exception | None = None
            for _ in range(attempts):
                try:
                    resp = await client.get(url)
                    if resp.status_code == 200:
                        return resp.text
                except httpx.HTTPError as exc:
                    last = exc
                await asyncio.sleep(0.2)
            raise AssertionError(f"nothing answered on the host's port {port}: {last}")
    finally:
        listener.close()


async def test_systemd_is_running(sandbox: sbx.SandboxInfo) -> None:
    for host in sandbox.hosts:
        async with await sbx.connect(host) as conn:
            res = await conn.run("systemctl is-system-running")
            assert str(res.stdout).strip() == "running", await conn.run("systemctl --failed")
            assert (await _ok(conn, ["hostname"])).strip() == host.name


async def test_host_keys_differ_and_client_key_private(sandbox: sbx.SandboxInfo) -> None:
    keys = Path(sandbox.hosts[0].known_hosts).read_text().splitlines()
    assert len(keys) == len(sandbox.hosts)
    assert len({line.split()[2] for line in keys}) == len(keys)
    assert Path(sandbox.hosts[0].key_path).stat().st_mode & 0o077 == 0


async def test_wrong_host_key_is_refused(sandbox: sbx.SandboxInfo, tmp_path: Path) -> None:
    """A known_hosts entry with another key for the host's address makes the connection fail."""
    first, second = sandbox.hosts[:2]
    other_key = Path(second.known_hosts).read_text().splitlines()[1].split(maxsplit=1)[1]
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{first.ssh_port} {other_key}\n")
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        await sbx.connect(first.model_copy(update={"known_hosts": str(wrong)}))
    # And with no entry at all: unknown keys are never accepted.
    wrong.write_text("")
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        await sbx.connect(first.model_copy(update={"known_hosts": str(wrong)}))


async def test_build_and_run_container_on_host(sandbox: sbx.SandboxInfo) -> None:
    """docker build FROM busybox:latest on the host, run it, reach it by tunnel and at the host's address."""
    host = sandbox.hosts[0]
    token = secrets.token_hex(8)
    name = f"sbx-test-{token}"
    async with await sbx.connect(host) as conn:
        workdir = f"/tmp/{name}"
        await _ok(conn, ["mkdir", "-p", workdir])
        async with conn.start_sftp_client() as sftp:
            async with sftp.open(f"{workdir}/Dockerfile", "w") as f:
                await f.write("FROM busybox:latest\n"
                              f"RUN mkdir -p /www && echo {token} > /www/index.html\n"
                              'CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]\n')
        try:
            await _ok(conn, ["docker", "build", "-q", "-t", f"{name}:1", workdir])
            await _ok(conn, ["docker", "run", "-d", "--name", name, "-p", "18080:8080", f"{name}:1"])
            assert (await _get_via_tunnel(conn, 18080)).strip() == token
            async with httpx.AsyncClient(timeout=5) as client:
                resp = await client.get(f"http://{host.internal_address}:18080/")
            assert resp.text.strip() == token
        finally:
            await conn.run(shlex.join(["docker", "rm", "-f", name]))
            await conn.run(shlex.join(["docker", "rmi", "-f", f"{name}:1"]))
            await conn.run(shlex.join(["rm", "-rf", workdir]))


async def test_docker_socket_over_ssh(sandbox: sbx.SandboxInfo) -> None:
    """The host's engine API through its socket forwarded over SSH, with an ordinary Docker client."""
    host = sandbox.hosts[1]
    name = f"sbx-test-{secrets.token_hex(6)}"
    with tempfile.TemporaryDirectory() as tmp:
        local = str(Path(tmp) / "docker.sock")
        async with await sbx.connect(host) as conn:
            listener = await conn.forward_local_path(local, "/var/run/docker.sock")
            docker = aiodocker.Docker(url=f"unix://{local}")
            try:
                version = await docker.version()
                assert version["ApiVersion"]
                container = await docker.containers.create(
                    {"Image": "busybox:latest", "Cmd": ["true"], "Labels": {"test": name}}, name=name)
                listed = await docker.containers.list(all=True)
                assert name in {c["Names"][0].lstrip("/") for c in listed}
                # It is the host's own engine: the host's CLI sees the same container.
                assert name in await _ok(conn, ["docker", "ps", "-a", "--format", "{{.Names}}"])
                await container.delete(force=True)
            finally:
                await docker.close()
                listener.close()


async def test_systemd_unit_over_sftp(sandbox: sbx.SandboxInfo) -> None:
    """A unit file uploaded by SFTP starts with systemd and serves; it is gone after disable + removal."""
    host = sandbox.hosts[1]
    token = secrets.token_hex(8)
    unit = f"sbx-test-{token}.service"
    root = f"/srv/sbx-test-{token}"
    async with await sbx.connect(host) as conn:
        async with conn.start_sftp_client() as sftp:
            await sftp.makedirs(root, exist_ok=True)
            async with sftp.open(f"{root}/index.html", "w") as f:
                await f.write(token + "\n")
            async with sftp.open(f"/etc/systemd/system/{unit}", "w") as f:
                await f.write("[Unit]\nDescription=sandbox test web\n\n[Service]\n"
                              f"ExecStart=/bin/busybox httpd -f -p 127.0.0.1:18181 -h {root}\n\n"
                              "[Install]\nWantedBy=multi-user.target\n")
        try:
            await _ok(conn, ["systemctl", "daemon-reload"])
            await _ok(conn, ["systemctl", "enable", "--now", unit])
            assert (await _ok(conn, ["systemctl", "is-enabled", unit])).strip() == "enabled"
            assert (await _get_via_tunnel(conn, 18181)).strip() == token
        finally:
            await conn.run(shlex.join(["systemctl", "disable", "--now", unit]))
            await conn.run(shlex.join(["rm", "-rf", f"/etc/systemd/system/{unit}", root]))
            await conn.run("systemctl daemon-reload")


async def test_idle_host_memory_is_measurable(sandbox: sbx.SandboxInfo) -> None:
    """`docker stats` says 0 B for these hosts; the cgroup says what they really use (reported by the tests)."""
    engine = sbx.Engine(sandbox.engine.url)
    cid = (await engine.inspect(sandbox.hosts[0].container))["Id"]
    used = sbx.host_memory_bytes(cid)
    assert used is not None and 10 * 2**20 < used < 2**30, used
    print(f"host {sandbox.hosts[0].name}: {used / 2**20:.0f} MiB")
