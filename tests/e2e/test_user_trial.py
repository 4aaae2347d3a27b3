"""What a new user's trial broke, end to end on a sandbox host: a broken desired state says so on /health (and
in one WARNING, not one per reconcile), a newcomer clashing with an untouched service is the one blocked,
unknown service names are errors, and the API's own surfaces (/docs offline, the bearer scheme, GitHub's ping)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from daemon_harness import DesiredRepo, containers_of, http_get, running_daemon, settings_for

from deployerd.plan import ActionKind
from deployerd.sandbox import SandboxInfo
from deployerd.store import JobStatus

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]


async def test_broken_desired_state_degrades_health_and_warns_once(
        sandbox: SandboxInfo, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("trial-ok", 8161)
    repo.commit("one")
    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        await d.reconcile()
        assert (await d.http.get("/health")).json()["degraded"] == []
        repo.write("services/trial-bad.yaml", "name: trial-bad\nhost: sbx-1\nport: 99999\nsource: services/trial-ok\n")
        repo.commit("an invalid manifest")
        caplog.set_level(logging.WARNING, logger="deployerd")
        for _ in range(3):
            await d.reconcile()
        health = (await d.http.get("/health")).json()
        assert health["state"] == "degraded"
        assert "desired state: services/trial-bad.yaml: port: must be between 1 and 65535" in health["degraded"]
        assert health["desired"]["invalid"] == ["trial-bad"]
        warned = [r for r in caplog.records if "services/trial-bad.yaml: port" in r.getMessage()]
        assert len(warned) == 1 and warned[0].levelno == logging.WARNING, [r.getMessage() for r in caplog.records]

        hosts = yaml.safe_load((repo.path / "hosts.yaml").read_text())
        hosts["hosts"]["sbx-1"]["base_dir"] = "/etc"
        repo.write("hosts.yaml", yaml.safe_dump(hosts))
        repo.commit("base_dir: /etc")
        await d.reconcile()
        health = (await d.http.get("/health")).json()
        assert health["state"] == "degraded" and health["desired"]["complete"] is False
        assert any(line.startswith("desired state: hosts.yaml: hosts.sbx-1.base_dir: /etc is a system directory")
                   for line in health["degraded"]), health["degraded"]
        assert "trial-ok v1" in (await http_get(f"http://{sandbox.hosts[0].internal_address}:8161/")).text
        repo.write("hosts.yaml", yaml.safe_dump({"hosts": {**hosts["hosts"], "sbx-1": {
            k: v for k, v in hosts["hosts"]["sbx-1"].items() if k != "base_dir"}}}))
        repo.remove("services/trial-bad.yaml")
        repo.commit("fixed")
        await d.reconcile()  # whole again: the harness's clean-up finds the host


async def test_newcomer_on_a_taken_port_is_the_one_blocked(sandbox: SandboxInfo, tmp_path: Path) -> None:
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("trial-web", 8162)
    repo.commit("one")
    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        await d.reconcile()
        repo.service("trial-nc", 8162)  # a newcomer on trial-web's port
        repo.commit("nc on the same port")
        actions = {a.service: a for a in await d.reconcile()}
        assert actions["trial-web"].kind is ActionKind.NOOP, actions["trial-web"]
        blocked = actions["trial-nc"]
        assert blocked.kind is ActionKind.BLOCKED
        assert ("services/trial-nc.yaml: port: port 8162 on host sbx-1 is already used by trial-web "
                "(services/trial-web.yaml, unchanged since the last applied commit)") in blocked.reasons[0]
        # the untouched one keeps reconciling: a change of its own deploys, the newcomer stays blocked
        repo.write("services/trial-web/www/index.html", "<h1>trial-web v2</h1>\n")
        repo.commit("trial-web v2")
        actions = {a.service: a for a in await d.reconcile()}
        assert actions["trial-web"].kind is ActionKind.DEPLOY and actions["trial-nc"].kind is ActionKind.BLOCKED
        assert (await d.last_job("trial-web")).status is JobStatus.SUCCEEDED
        assert "trial-web v2" in (await http_get(f"http://{sandbox.hosts[0].internal_address}:8162/")).text


async def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a process of its own, waited for on a thread: the daemon it asks runs on this loop."""
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "deployerd", *args], capture_output=True,
                                   text=True, timeout=120)


async def test_unknown_names_missing_files_and_the_api_surfaces(sandbox: SandboxInfo, tmp_path: Path) -> None:
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("trial-api", 8163)
    repo.commit("one")
    settings = settings_for(tmp_path, sandbox, repo)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"api_token_file": str(settings.api_token_file),
                                      "listen_port": settings.listen_port}))
    async with running_daemon(settings) as d:
        await d.reconcile()
        assert (await d.http.get("/services/trial-api/history")).status_code == 200
        gone = await d.http.get("/services/nosuch/history")
        assert gone.status_code == 404 and "nosuch" in gone.json()["detail"]
        sync = await d.http.post("/sync", json={"service": "nosuch"}, headers=d.auth)
        assert sync.status_code == 404 and "nosuch" in sync.json()["detail"]
        assert (await d.http.post("/sync", json={"service": "trial-api"}, headers=d.auth)).status_code == 200

        for argv in (("history", "nosuch", "--config", str(config)), ("sync", "nosuch", "--config", str(config))):
            done = await cli(*argv)
            assert done.returncode == 1 and "no service named 'nosuch'" in done.stderr, (argv, done.stderr)
        done = await cli("status", "--config", str(tmp_path / "missing.yaml"))
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert done.stderr.strip().endswith(f"config file {tmp_path / 'missing.yaml'} not found: create it (see "
                                            "README, Configure) or give another with --config FILE")
        done = await cli("validate", str(tmp_path / "nowhere"))
        assert done.returncode == 2 and "Traceback" not in done.stderr and "is not a folder" in done.stderr

        # /docs loads Swagger UI from the daemon itself, not from a CDN
        docs = (await d.http.get("/docs")).text
        assert "cdn." not in docs and "/static-offline-docs/swagger-ui-bundle.js" in docs
        js = await d.http.get("/static-offline-docs/swagger-ui-bundle.js")
        assert js.status_code == 200 and len(js.content) > 500_000
        # the token is a declared bearer scheme on the routes that need it
        spec = (await d.http.get("/openapi.json")).json()
        assert spec["components"]["securitySchemes"]["api_token"]["scheme"] == "bearer"
        assert spec["paths"]["/sync"]["post"]["security"] == [{"api_token": []}]
        assert "security" not in spec["paths"]["/services"]["get"]

        # GitHub's ping when the webhook is added: 200, nothing fetched
        secret = settings.secret("webhook_secret") or ""
        body = json.dumps({"zen": "Keep it logically awesome.", "hook_id": 1}).encode()
        sig = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        ping = await d.http.post("/webhook", content=body, headers={"X-GitHub-Event": "ping",
                                                                    "X-Hub-Signature-256": sig,
                                                                    "Content-Type": "application/json"})
        assert ping.status_code == 200 and ping.json()["accepted"] is False, ping.text
        unsigned = await d.http.post("/webhook", content=body, headers={"X-GitHub-Event": "ping"})
        assert unsigned.status_code == 401


async def test_healthy_means_its_health_probe_passes(sandbox: SandboxInfo, tmp_path: Path) -> None:
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("trial-probe", 8164)
    repo.commit("one")
    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        await d.reconcile()

        async def row() -> dict[str, object]:
            await d.engine.reconcile(["resync"])  # the resync probes what runs
            await d.engine.drain()
            rows = (await d.http.get("/services")).json()["services"]
            return next(r for r in rows if r["name"] == "trial-probe")

        first = await row()
        assert first["health_status"] == "Healthy" and first["health_checked_at"], first
        # by hand: the process goes on running, its health path answers 404
        spec = d.engine.desired.hosts["sbx-1"]
        [running] = [c for c in await containers_of(d, spec, "trial-probe") if c["State"] == "running"]
        conn = (await d.engine.hosts.handle(spec)).conn
        await conn.run(["docker", "exec", running["Id"], "rm", "/www/health"])
        broken = await row()
        assert broken["health_status"] == "Degraded", broken
        assert any("health probe failed at" in r and "/health: HTTP 404" in r for r in broken["reasons"]), broken
        assert broken["health_checked_at"] and broken["health_checked_at"] >= first["health_checked_at"]
        metrics = (await d.http.get("/metrics")).text
        assert 'health_status="Degraded"' in metrics and 'service="trial-probe"' in metrics
        assert 'deployerd_service_health_checked_timestamp_seconds{service="trial-probe"}' in metrics
