"""deployerd installed on a test host from its own unit file (systemd/deployerd.service), the way the README
says: it reaches `active` (Type=notify: only after READY=1), answers /health, and systemd restarts it after
it is killed. The host has no network: deployerd comes from the wheelhouse `make test` builds."""

from __future__ import annotations

import asyncio
import io
import os
import tarfile
from pathlib import Path

import httpx
import pytest

from deployerd.connection import Connection, ConnectionPool, HostAddress
from deployerd.sandbox import SandboxInfo

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]
ROOT = Path(__file__).resolve().parents[2]
WHEELHOUSE = Path(os.environ.get("DEPLOYERD_WHEELHOUSE", ROOT / ".wheelhouse"))
CONFIG = """repo_url: /srv/desired-state
state_dir: /var/lib/deployerd
listen_host: 127.0.0.1
listen_port: 8007
known_hosts: /etc/deployerd/known_hosts
"""


def _tar(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for wheel in sorted(folder.glob("*.whl")):
            tar.add(wheel, arcname=wheel.name)
    return buf.getvalue()


async def _main_pid(conn: Connection) -> str:
    return (await conn.run(["systemctl", "show", "--property=MainPID", "--value", "deployerd"])).stdout.strip()


async def _wait_active(conn: Connection, not_pid: str | None = None) -> str:
    for _ in range(240):  # bounded: 120 s
        state = (await conn.run(["systemctl", "is-active", "deployerd"], check=False)).stdout.strip()
        pid = await _main_pid(conn)
        if state == "active" and pid not in ("0", not_pid):
            return pid
        if state == "failed":
            journal = (await conn.run(["journalctl", "-u", "deployerd", "-n", "30", "--no-pager"])).stdout
            pytest.fail(f"deployerd.service failed:\n{journal}")
        await asyncio.sleep(0.5)
    pytest.fail(f"deployerd.service not active: {state}")


async def _health(conn: Connection) -> dict:
    async with conn.forwarded_port(8007) as port, httpx.AsyncClient(timeout=5) as client:
        resp = await client.get(f"http://127.0.0.1:{port}/health")
    assert resp.status_code == 200
    return resp.json()


async def test_deployerd_runs_as_a_systemd_service(sandbox: SandboxInfo) -> None:
    if not (WHEELHOUSE / ".built").exists():
        pytest.fail(f"no wheelhouse at {WHEELHOUSE}: run `make wheelhouse` (make test builds it)")
    h = sandbox.hosts[1]
    pool = ConnectionPool()
    conn = await pool.get(HostAddress(h.name, h.address, h.ssh_port, h.user, h.key_path, h.known_hosts))
    try:
        await conn.run(["install", "-d", "/tmp/wheelhouse"])
        await conn.run(["tar", "-x", "-C", "/tmp/wheelhouse"], input=_tar(WHEELHOUSE))
        await conn.run(["python3", "-m", "venv", "/opt/deployerd"], timeout=300)
        await conn.run(["/opt/deployerd/bin/pip", "install", "-q", "--no-index", "--find-links", "/tmp/wheelhouse",
                        "deployerd"], timeout=600)
        # the install steps of the unit file's header
        await conn.run(["useradd", "--system", "--user-group", "--home-dir", "/var/lib/deployerd",
                        "--shell", "/usr/sbin/nologin", "deployerd"])
        await conn.run(["install", "-d", "-m", "0750", "-o", "root", "-g", "deployerd", "/etc/deployerd"])
        await conn.put_bytes("/etc/deployerd/config.yaml", CONFIG.encode(), mode=0o640)
        await conn.put_bytes("/etc/deployerd/known_hosts", b"", mode=0o640)
        await conn.run(["chgrp", "deployerd", "/etc/deployerd/config.yaml", "/etc/deployerd/known_hosts"])
        await conn.put_bytes("/etc/systemd/system/deployerd.service",
                             (ROOT / "systemd" / "deployerd.service").read_bytes())
        await conn.run(["systemctl", "daemon-reload"])
        await conn.run(["systemctl", "enable", "--now", "deployerd"], timeout=180)

        pid = await _wait_active(conn)
        health = await _health(conn)
        assert health["service"] == "deployerd"
        user = (await conn.run(["ps", "-o", "user=", "-p", pid])).stdout.strip()
        assert user == "deployerd"

        await conn.run(["systemctl", "kill", "--signal=SIGKILL", "deployerd"])
        new_pid = await _wait_active(conn, not_pid=pid)
        assert new_pid != pid
        assert (await _health(conn))["service"] == "deployerd"
    finally:
        await conn.run(["systemctl", "disable", "--now", "deployerd"], check=False)
        await conn.run(["rm", "-rf", "/etc/systemd/system/deployerd.service", "/opt/deployerd", "/etc/deployerd",
                        "/var/lib/deployerd", "/tmp/wheelhouse"], check=False)
        await conn.run(["systemctl", "daemon-reload"], check=False)
        await conn.run(["userdel", "deployerd"], check=False)
        await pool.close_all()
