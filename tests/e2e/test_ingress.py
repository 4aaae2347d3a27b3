"""Zero downtime behind the host's ingress proxy (HAProxy), Docker: a change, a failed release, a git revert to
a kept release, each under a bounded load of 50 requests/s through the public port: no request may fail.

The proxy names the release that answered (X-Deployerd-Upstream), so the load also shows who served when.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon_harness import DesiredRepo, git, running_daemon, settings_for
from load_gen import LoadResult, run_load

from deployerd.ingress.config import UNIT_NAME
from deployerd.sandbox import SandboxInfo
from deployerd.store import JobStatus

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

PORT = 8311


def with_ingress(repo: DesiredRepo, sandbox: SandboxInfo) -> None:
    hosts = {h.name: {"address": h.address, "ssh_port": h.ssh_port, "user": h.user,
                      "public_address": h.internal_address, "ingress": "haproxy"} for h in sandbox.hosts}
    repo.write("hosts.yaml", yaml.safe_dump({"hosts": hosts}))


async def under_load(sandbox: SandboxInfo, work: Any) -> LoadResult:
    """``work`` (a coroutine) while 50 requests/s go to the public port; bounded to 120 s."""
    stop = asyncio.Event()
    load = asyncio.create_task(run_load(sandbox.hosts[0].internal_address, PORT, rate=50, seconds=120, stop=stop))
    await asyncio.sleep(0.5)
    try:
        await work
        await asyncio.sleep(0.5)
    finally:
        stop.set()
    return await load


async def running_containers(d: Any, service: str) -> list[str]:
    handle = await d.engine.hosts.handle(d.engine.desired.hosts["sbx-1"])
    instances, _ = await handle.runtime("docker").observe()
    return sorted(i.release for i in instances if i.service == service and i.state.value == "running")


async def test_change_failure_and_revert_drop_no_request(sandbox: SandboxInfo, tmp_path: Path) -> None:
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    with_ingress(repo, sandbox)
    repo.service("zd-web", PORT)
    repo.commit("v1")
    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        await d.reconcile()
        first = await d.last_job("zd-web")
        assert first.status is JobStatus.SUCCEEDED, first.error
        r1 = first.release
        assert (await run_load(sandbox.hosts[0].internal_address, PORT, seconds=0.3)).upstreams() == [r1]

        repo.write("services/zd-web/www/index.html", "<h1>zd-web v2</h1>\n")
        v2 = repo.commit("v2")
        change = await under_load(sandbox, d.reconcile())
        job = await d.last_job("zd-web")
        assert job.status is JobStatus.SUCCEEDED, job.error
        r2 = job.release
        assert change.failed == 0, change.summary()
        assert change.upstreams() == [r1, r2]
        switch = job.phase("Verify Health").details["switch"]
        assert (switch["upstream_before"], switch["upstream_after"], switch["front_door"]) == (r1, r2, r2)
        assert await running_containers(d, "zd-web") == [r2]  # the old one stopped, kept

        repo.remove("services/zd-web/www/health")
        repo.commit("break the health check")
        failed = await under_load(sandbox, d.reconcile())
        bad = await d.last_job("zd-web")
        assert bad.status is JobStatus.ROLLED_BACK, bad.error
        assert failed.failed == 0, failed.summary()
        assert failed.upstreams() == [r2]  # the failed release never received a request
        assert await running_containers(d, "zd-web") == [r2]

        git(repo.path, "revert", "--no-edit", "HEAD")
        git(repo.path, "revert", "--no-edit", v2)  # back to v1: a kept release, no rebuild
        revert = await under_load(sandbox, d.reconcile())
        back = await d.last_job("zd-web")
        assert back.status is JobStatus.SUCCEEDED, back.error
        assert back.release == r1
        assert back.phase("Build").status.value == "skipped"
        assert revert.failed == 0, revert.summary()
        assert revert.upstreams() == [r2, r1]
        assert await running_containers(d, "zd-web") == [r1]
        metrics = (await d.http.get("/metrics")).text
        assert 'deployerd_ingress_switch_seconds_count{host="sbx-1"}' in metrics

        # the proxy stopped by hand: the next observation names it in /health and starts it again
        handle = await d.engine.hosts.handle(d.engine.desired.hosts["sbx-1"])
        await handle.conn.run(["systemctl", "stop", UNIT_NAME])
        await d.reconcile()
        health = (await d.http.get("/health")).json()
        assert any(line.startswith("host sbx-1: ingress proxy: its admin socket does not answer")
                   for line in health["degraded"]), health["degraded"]
        assert (await run_load(sandbox.hosts[0].internal_address, PORT, seconds=0.3)).upstreams() == [r1]
