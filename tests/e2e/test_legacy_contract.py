"""The older Deployer's API as its callers use it, against a live daemon on sandbox hosts (Docker and systemd).

The client below is written from the API's documentation alone (the older Deployer's POST /deploy and
GET /deploy/{job_id}), not from deployerd's models: it sends the documented request, polls until ``completed``
or ``failed``, and checks every answer against the documented shape. What it deployed is then checked on the
host itself over SSH (the env of the running process, read from /proc), not through deployerd.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncssh
import httpx
import pytest
import pytest_asyncio
from daemon_harness import ROOT, DaemonProcess, DesiredRepo, settings_for

from deployerd.sandbox import HostInfo, SandboxInfo

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

WHEELHOUSE = Path(os.environ.get("DEPLOYERD_WHEELHOUSE", ROOT / ".wheelhouse"))

# ---------------------------------------------------------------------------- the documented contract
JOB_STATUSES = {"pending", "validating", "transferring", "building", "starting", "verifying", "registering",
                "completed", "failed"}
PHASE_STATUSES = {"success", "failed", "skipped"}
JOB_KEYS = {"deploy_job_id", "service_name", "service_path", "status", "droplet_id", "service_port", "service_url",
            "phases", "registration", "started_at", "completed_at", "duration_seconds", "success"}
PHASE_KEYS = {"phase", "status", "started_at", "completed_at", "duration_seconds", "details", "error"}
PHASE_NAMES = ["Validation", "Transfer", "Build", "Start Service", "Verify Health", "Register with Registry"]


def seed_request(service_path: str, method: str) -> dict[str, Any]:
    """The documentation's example request; only the path (under this daemon's source dir) and the method differ."""
    return {
        "service_path": service_path,
        "service_name": "i-proactive",
        "droplet_id": 20,
        "service_port": 8010,
        "deployment_method": method,
        "environment_vars": {"ANTHROPIC_API_KEY": "sk-legacy-contract"},
        "auto_register": True,
        "verification_job_id": "ver-abc123",
    }


class OlderDeployerClient:
    """A caller of the older Deployer, as its documentation describes it."""

    def __init__(self, url: str, token: str) -> None:
        self.http = httpx.AsyncClient(base_url=url, timeout=60, headers={"Authorization": f"Bearer {token}"})
        self.seen: list[str] = []  # every job status observed while polling

    async def deploy(self, body: dict[str, Any]) -> httpx.Response:
        return await self.http.post("/deploy", json=body)

    async def job(self, job_id: str) -> dict[str, Any]:
        resp = await self.http.get(f"/deploy/{job_id}")
        assert resp.status_code == 200, resp.text
        job = resp.json()
        check_job_shape(job)
        return job

    async def poll(self, job_id: str, limit_s: float = 300) -> dict[str, Any]:
        """Poll until ``status`` is ``completed`` or ``failed`` (what every caller does)."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            job = await self.job(job_id)
            self.seen.append(job["status"])
            if job["status"] in ("completed", "failed"):
                return job
            await asyncio.sleep(0.2)
        pytest.fail(f"job {job_id} did not end within {limit_s} s; statuses seen: {self.seen}")


def check_job_shape(job: dict[str, Any]) -> None:
    assert JOB_KEYS <= set(job), sorted(JOB_KEYS - set(job))
    assert job["status"] in JOB_STATUSES, job["status"]
    assert job["success"] is (job["status"] == "completed")
    assert job.get("error") is None or isinstance(job["error"], str)
    for p in job["phases"]:
        assert PHASE_KEYS <= set(p), (p, sorted(PHASE_KEYS - set(p)))
        assert p["status"] in PHASE_STATUSES, p
        assert isinstance(p["details"], str) and p["details"], p
        assert p["error"] is None or isinstance(p["error"], str), p
    if job["registration"] is not None:
        assert set(job["registration"]) >= {"droplet_id", "service_name", "endpoint", "registered_at"}


# ---------------------------------------------------------------------------- the services deployed
DOCKERFILE = {"ok": 'FROM busybox:latest\nCOPY www /www\nCMD ["busybox", "httpd", "-f", "-p", "8010", "-h", "/www"]\n',
              "crash": 'FROM busybox:latest\nCMD ["sh", "-c", "echo fatal: no config; exit 3"]\n'}
ASGI_APP = '''\
MODE = {mode!r}
if MODE == "crash":
    raise SystemExit("fatal: no config")


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({{"type": message["type"] + ".complete"}})
            if message["type"] == "lifespan.shutdown":
                return
    await send({{"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}})
    await send({{"type": "http.response.body", "body": b'{{"status": "active"}}'}})
'''


def wheels() -> list[Path]:
    """The systemd service's dependencies (uvicorn, the default command, and what it needs) as wheels."""
    return [w for pattern in ("uvicorn-*.whl", "click-*.whl", "h11-*.whl") for w in WHEELHOUSE.glob(pattern)]


def write_source(folder: Path, method: str, mode: str) -> None:
    """A service folder the way the older Deployer's callers prepare one: a Dockerfile, or a Python app run by
    uvicorn (the default command) with its wheels for an offline install."""
    shutil.rmtree(folder, ignore_errors=True)
    if method == "docker":
        (folder / "www").mkdir(parents=True)
        (folder / "Dockerfile").write_text(DOCKERFILE[mode])
        (folder / "www" / "health").write_text('{"status": "active"}')
        return
    (folder / "app").mkdir(parents=True)
    (folder / "app" / "__init__.py").write_text("")
    (folder / "app" / "main.py").write_text(ASGI_APP.format(mode=mode))
    (folder / "requirements.txt").write_text("uvicorn\n")
    (folder / "wheels").mkdir()
    for wheel in wheels():
        shutil.copy(wheel, folder / "wheels" / wheel.name)


async def process_env(host: HostInfo, method: str, instance: str, service: str) -> dict[str, str]:
    """The environment of the service's running process, read on the host from /proc."""
    async with asyncssh.connect(host.address, port=host.ssh_port, username=host.user, client_keys=[host.key_path],
                                known_hosts=host.known_hosts) as conn:
        if method == "docker":
            ids = (await conn.run(f"docker ps -q --filter label=deployerd.service={service} "
                                  f"--filter label=deployerd.instance={instance}", check=True)).stdout
            [cid] = str(ids).split()
            pid = (await conn.run(f"docker inspect -f '{{{{.State.Pid}}}}' {cid}", check=True)).stdout
        else:
            unit = f"deployerd-{instance}-{service}.service"
            pid = (await conn.run(f"systemctl show -p MainPID --value {unit}", check=True)).stdout
        raw = (await conn.run(f"cat /proc/{str(pid).strip()}/environ", check=True, encoding=None)).stdout
    assert isinstance(raw, bytes)
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


# ---------------------------------------------------------------------------- the live daemon
@pytest_asyncio.fixture(loop_scope="session")
async def live(sandbox: SandboxInfo, tmp_path: Path) -> AsyncIterator[tuple[DaemonProcess, OlderDeployerClient, Path]]:
    """deployerd as its own process, its hosts.yaml loaded; yields it, a client and its API source directory."""
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.commit("hosts only")
    settings = settings_for(tmp_path, sandbox, repo, instance=f"lc{secrets.token_hex(3)}")
    daemon = DaemonProcess(settings, tmp_path / "daemon")
    client = OlderDeployerClient(daemon.url, settings.secret("api_token") or "")
    await daemon.start()
    try:
        await daemon.sync()  # the first reconcile: hosts.yaml known
        yield daemon, client, settings.api_source_root
    finally:
        gone = await daemon.http.delete("/deploy/services/i-proactive", headers=daemon.auth)
        if gone.status_code == 202:
            await client.poll(gone.json()["deploy_job_id"])
        await client.http.aclose()
        await daemon.close()


@pytest.mark.timeout(900)
@pytest.mark.parametrize("method", ["docker", "systemd"])
async def test_older_callers_keep_working(live: tuple[DaemonProcess, OlderDeployerClient, Path],
                                          sandbox: SandboxInfo, method: str) -> None:
    daemon, client, sources = live
    if method == "systemd" and not wheels():
        pytest.fail(f"no wheelhouse at {WHEELHOUSE}: run `make wheelhouse` (make test builds it)")
    folder = sources / "i-proactive"
    write_source(folder, method, "ok")
    request = seed_request(str(folder), method)

    # the example request deploys; the poll ends on completed
    resp = await client.deploy(request)
    assert resp.status_code in (200, 202), resp.text
    created = resp.json()
    assert set(created) == {"deploy_job_id", "service_name", "status", "created_at"}
    assert (created["service_name"], created["status"]) == ("i-proactive", "pending")
    job = await client.poll(created["deploy_job_id"])
    assert job["status"] == "completed", job
    assert set(client.seen) <= JOB_STATUSES
    assert (job["deploy_job_id"], job["service_name"], job["service_path"], job["service_port"], job["droplet_id"]) \
        == (created["deploy_job_id"], "i-proactive", str(folder), 8010, 20)
    address = sandbox.hosts[0].internal_address
    assert job["service_url"] == f"http://{address}:8010"
    assert [p["phase"] for p in job["phases"]] == PHASE_NAMES
    assert {p["status"] for p in job["phases"]} == {"success"}, job["phases"]
    assert job["phases"][-1]["details"] == "Registered as Droplet #20"
    assert all(isinstance(p["duration_seconds"], int) and p["started_at"] and p["completed_at"] for p in job["phases"])
    assert job["registration"]["droplet_id"] == 20 and job["registration"]["endpoint"] == job["service_url"]
    assert job["error"] is None and isinstance(job["duration_seconds"], int)
    async with httpx.AsyncClient(timeout=10) as plain:
        assert (await plain.get(f"{job['service_url']}/health")).status_code == 200

    # the env is the service's, on the host, in the running process
    env = await process_env(sandbox.hosts[0], method, daemon.settings.instance, "i-proactive")
    assert env.get("ANTHROPIC_API_KEY") == "sk-legacy-contract"
    assert "sk-legacy-contract" not in await asyncio.to_thread(daemon.log.read_text)  # never logged

    # a failing release ends failed, with the rollback named; the good one serves again
    write_source(folder, method, "crash")
    job = await client.poll((await client.deploy(request)).json()["deploy_job_id"])
    assert (job["status"], job["success"], job["registration"]) == ("failed", False, None), job
    assert "rolled back" in job["error"], job["error"]
    assert "failed" in {p["status"] for p in job["phases"]}
    assert len(job["phases"]) == len(PHASE_NAMES)  # those it never reached are skipped, none left pending
    async with httpx.AsyncClient(timeout=10) as plain:
        assert (await plain.get(f"{job['service_url']}/health")).status_code == 200

    # a bad request gets a 422 naming the field
    for bad, field in (({**request, "colour": "red"}, "colour"),
                       ({k: v for k, v in request.items() if k != "service_port"}, "service_port"),
                       ({**request, "service_path": "/etc"}, "service_path")):
        resp = await client.deploy(bad)
        assert resp.status_code == 422, (field, resp.text)
        assert field in resp.text, resp.text
        assert "sk-legacy-contract" not in resp.text
