"""Notifications, the audit trail and monitoring around real deploys: a real daemon (its loop watching a real git
repository) deploys to a sandbox host, a release that echoes its secret and exits is rolled back, and

- a real Prometheus (Debian's package, started here on loopback with its own config and storage, scraping every
  second and evaluating monitoring/deployerd.rules.yml every second) fires DeployerdRollback;
- the live /metrics passes ``promtool check metrics`` and names every metric the dashboard and rules use;
- commit statuses and chat messages reach a receiver on loopback (a receiver that checks the documented
  request shapes, NOT the real GitHub or Slack): pending, success, pending, failure;
- the audit trail has one record per job, with author, committer, trigger and message, and no secret value.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import yaml
from daemon_harness import DesiredRepo, free_port, private_file, running_daemon, settings_for

from deployerd.sandbox import SandboxInfo
from deployerd.store import Job, JobStatus

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from notify_receiver import Receiver, serve  # noqa: E402
from test_monitoring import dashboard_exprs, exported_names, metric_names, rule_exprs  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

ROOT = Path(__file__).resolve().parents[2]
NAME, PORT = "obs-web", 8471
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


class Prometheus:
    """A real Prometheus on 127.0.0.1 with its own config and storage, ended by the test."""

    def __init__(self, work: Path, target_port: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        work.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(ROOT / "monitoring" / "deployerd.rules.yml")],
            "scrape_configs": [{"job_name": "deployerd",
                                "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}],
        }
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = work / "prometheus.log"
        assert PROMETHEUS is not None
        self.argv = [PROMETHEUS, f"--config.file={work / 'prometheus.yml'}",
                     f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                     "--storage.tsdb.retention.time=1h", "--log.level=warn"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    async def api(self, path: str, **params: str) -> Any:
        async with httpx.AsyncClient(timeout=5) as client:
            resp = await client.get(f"{self.url}{path}", params=params)
        resp.raise_for_status()
        return resp.json()["data"]

    async def wait(self, what: str, check: Any, limit_s: float = 90) -> Any:
        """Poll ``check()`` until it returns something truthy, at most ``limit_s``."""
        deadline = time.monotonic() + limit_s
        last: Any = None
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                last = await check()
                if last:
                    return last
            except httpx.HTTPError as e:
                last = e
            await asyncio.sleep(0.5)
        raise AssertionError(f"{what}: not within {limit_s:g} s (last: {last!r})\n{self.log.read_text()[-2000:]}")

    async def alerts(self, name: str) -> list[dict[str, Any]]:
        return [a for a in (await self.api("/api/v1/alerts"))["alerts"] if a["labels"]["alertname"] == name]


@pytest_asyncio.fixture(loop_scope="session")
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver(tokens={k: secrets.token_urlsafe(16) for k in ("github", "gitea", "gitlab", "webhook")})
    server = serve(r)
    try:
        yield r
    finally:
        server.shutdown()
        server.server_close()


async def wait_job(daemon: Any, after: int, limit_s: float = 240) -> Job:
    """The service's job number ``after`` (0-based, oldest first) once it has finished."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        jobs = list(reversed(await daemon.jobs(NAME)))
        if len(jobs) > after and jobs[after].status.finished:
            return jobs[after]
        await asyncio.sleep(0.5)
    raise AssertionError(f"job {after} of {NAME} did not finish within {limit_s} s")


async def deploy_then_break(d: Any, repo: DesiredRepo, between: Any = None) -> tuple[Job, Job, str]:
    """The good release (deployed at start), then a release that echoes its secret and exits (rolled back, its
    log tail scrubbed), committed for the daemon's git watch to see. ``between`` runs once the first is up."""
    first = await wait_job(d, 0)
    assert first.status is JobStatus.SUCCEEDED, (first.status, first.error)
    if between is not None:
        await between()
    repo.write(f"services/{NAME}/Dockerfile",
               'FROM busybox:latest\nCMD ["sh", "-c", "echo db password is $DB_PASSWORD; exit 3"]\n')
    bad_commit = repo.commit("obs-web: a release that cannot start")
    failed = await wait_job(d, 1)
    assert failed.status is JobStatus.ROLLED_BACK, (failed.status, failed.error)
    return first, failed, bad_commit


def with_secret(tmp_path: Path, sandbox: SandboxInfo) -> tuple[DesiredRepo, str, Path, str]:
    secret_value = "obs-" + secrets.token_hex(12)
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service(NAME, PORT, secrets=["DB_PASSWORD"], health_timeout_s=8)
    good_commit = repo.commit("obs-web: first release")
    secrets_file = private_file(tmp_path / "secrets.yaml",
                                yaml.safe_dump({"services": {NAME: {"DB_PASSWORD": secret_value}}}))
    return repo, secret_value, secrets_file, good_commit


@pytest.mark.skipif(PROMETHEUS is None or PROMTOOL is None, reason="apt: prometheus (`make deps`)")
async def test_a_real_rollback_fires_the_alert_in_a_real_prometheus(sandbox: SandboxInfo, tmp_path: Path) -> None:
    repo, _, secrets_file, _ = with_secret(tmp_path, sandbox)
    settings = settings_for(tmp_path, sandbox, repo, secrets_file=secrets_file)
    prometheus = Prometheus(tmp_path / "prometheus", settings.listen_port)
    async with running_daemon(settings, loop=True) as d:
        async def start_prometheus() -> None:
            prometheus.start()

            async def scraped() -> bool:
                result = (await prometheus.api("/api/v1/query", query='deployerd_host_up{host="sbx-1"}'))["result"]
                return bool(result) and result[0]["value"][1] == "1"
            await prometheus.wait("the daemon scraped", scraped)
            await asyncio.sleep(3)  # three rule evaluations on what was scraped
            assert await prometheus.alerts("DeployerdRollback") == []

        try:
            await deploy_then_break(d, repo, start_prometheus)

            async def rollback_firing() -> list[dict[str, Any]]:
                return [a for a in await prometheus.alerts("DeployerdRollback")
                        if a["state"] == "firing" and a["labels"].get("service") == NAME]
            t0 = time.monotonic()
            firing = await prometheus.wait("DeployerdRollback firing", rollback_firing)
            print(f"\nDeployerdRollback fired {time.monotonic() - t0:.1f} s after the rollback job ended: {firing}")
            assert firing[0]["labels"]["reason"] == "Verify Health"

            # the live /metrics: promtool-clean, and it exports every name the rules and the dashboard use
            text = (await d.http.get("/metrics")).text
            checked = await asyncio.to_thread(subprocess.run, [PROMTOOL, "check", "metrics"], input=text,
                                              capture_output=True, text=True, timeout=60)
            assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), checked
            assert "_created" not in text
            exported = exported_names(text)
            used = {n for _, e in dashboard_exprs() + rule_exprs() for n in metric_names(e)}
            assert used <= exported, sorted(used - exported)
        finally:
            prometheus.stop()


async def test_notifications_and_audit_of_real_deploys(sandbox: SandboxInfo, tmp_path: Path,
                                                       receiver: Receiver) -> None:
    repo, secret_value, secrets_file, good_commit = with_secret(tmp_path, sandbox)
    base = f"http://127.0.0.1:{receiver.port}"
    notifications = [
        {"kind": "github", "name": "gh", "api_url": f"{base}/gh", "repo": "ops/desired-state",
         "token_file": str(private_file(tmp_path / "gh.token", receiver.tokens["github"]))},
        {"kind": "slack", "name": "chat", "url_file": str(private_file(tmp_path / "slack.url", f"{base}/slack/T/B/X"))},
    ]
    settings = settings_for(tmp_path, sandbox, repo, secrets_file=secrets_file, notifications=notifications)
    async with running_daemon(settings, loop=True) as d:
        first, _, bad_commit = await deploy_then_break(d, repo)
        # notifications: the receiver saw the documented shapes, in order, no secret value
        await d.subscribers.notifier.drain()
        statuses = [(r.json["state"], r.path.rsplit("/", 1)[1]) for r in receiver.of("github")]
        assert statuses == [("pending", good_commit), ("success", good_commit),
                            ("pending", bad_commit), ("failure", bad_commit)], statuses
        assert all(r.json["context"] == f"deployerd/{NAME}" for r in receiver.of("github"))
        assert not [r.problems for r in receiver.received if r.problems]
        assert len(receiver.of("slack")) == 4
        assert all(secret_value.encode() not in r.body for r in receiver.received)

        # the audit trail
        await d.subscribers.audit.drain()
        raw = settings.audit_path.read_bytes()
        assert secret_value.encode() not in raw
        records = [json.loads(line) for line in raw.decode().splitlines()]
        mine = [r for r in records if r["service"] == NAME]
        assert [r["outcome"] for r in mine] == ["succeeded", "rolled_back"], mine
        assert mine[0]["who"]["author"] == "deployerd tests <test@deployerd.local>"
        assert mine[0]["who"]["committer"] == "deployerd tests <test@deployerd.local>"
        assert mine[1]["message"] == "obs-web: a release that cannot start" and mine[1]["commit"] == bad_commit
        assert mine[1]["trigger"] == "watch" and mine[1]["rolled_back_to"] == first.release
        assert mine[1]["hosts"] == ["sbx-1"] and [p["phase"] for p in mine[1]["phases"]][0] == "Validation"
        assert (await d.http.get("/audit")).status_code == 401
        answer = await d.http.get("/audit", params={"service": NAME}, headers=d.auth)
        assert [r["outcome"] for r in answer.json()["records"]] == ["succeeded", "rolled_back"]
        assert secret_value not in answer.text
        config = tmp_path / "cli.yaml"  # the CLI asks the daemon (GET /audit with the token), or reads the file
        config.write_text(yaml.safe_dump({"api_token_file": str(settings.api_token_file),
                                          "listen_port": settings.listen_port}))
        for how in (["--config", str(config)], ["--file", str(settings.audit_path)]):
            table = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "deployerd", "audit", *how, "--service", NAME, "--since", "1h"],
                capture_output=True, text=True, timeout=60, cwd=ROOT)
            assert table.returncode == 0, table.stderr
            print(table.stdout)
            lines = table.stdout.splitlines()
            assert len(lines) == 3 and "succeeded" in lines[1] and "rolled_back" in lines[2], lines
            assert "deployerd tests" in lines[2] and "watch" in lines[2] and "a release that cannot" in lines[2]
