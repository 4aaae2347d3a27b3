"""Zero downtime behind the host's ingress proxy (HAProxy), Docker: a change, a failed release, a git revert to
a kept release, each under a bounded load of 50 requests/s through the public port: no request may fail.

The proxy names the release that answered (X-Deployerd-Upstream), so the load also shows who served when.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon_harness import DesiredRepo, git, running_daemon, settings_for
from load_gen import LoadResult, run_load

from deployerd.ingress import allocate_port
from deployerd.ingress.config import CONFIG_PATH, UNIT_NAME
from deployerd.ingress.proxy import parse_config
from deployerd.runtimes.base import qualified_name
from deployerd.sandbox import SandboxInfo
from deployerd.store import JobStatus

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

PORT = 8311


def with_ingress(repo: DesiredRepo, sandbox: SandboxInfo, ingress: str = "haproxy") -> None:
    hosts = {h.name: {"address": h.address, "ssh_port": h.ssh_port, "user": h.user,
                      "public_address": h.internal_address, "ingress": ingress} for h in sandbox.hosts}
    repo.write("hosts.yaml", yaml.safe_dump({"hosts": hosts}))


async def under_load(sandbox: SandboxInfo, work: Any, port: int = PORT) -> LoadResult:
    """``work`` (a coroutine) while 50 requests/s go to the public port; bounded to 120 s."""
    stop = asyncio.Event()
    load = asyncio.create_task(run_load(sandbox.hosts[0].internal_address, port, rate=50, seconds=120, stop=stop))
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


@pytest.mark.parametrize("point", ["Before Switch", "Switch"])
async def test_ssh_lost_mid_switch_keeps_serving(sandbox: SandboxInfo, tmp_path: Path, point: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The host's SSH connection is cut at the switch (before the proxy change, or after it and before the old
    release's drain and stop): the job fails transiently naming the host, what serves keeps serving, and the
    next reconcile finishes the switch with exactly one instance running."""
    from test_outages import ssh_down, ssh_up

    import deployerd.switch

    port = PORT + 1
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    with_ingress(repo, sandbox)
    repo.service("zd-ssh", port)
    repo.commit("v1")
    real = deployerd.switch.failpoint
    cut: list[str] = []

    async def cut_ssh(name: str) -> None:  # the fault, injected at the exact point of the switch
        if name == point and not cut:
            cut.append(name)
            await ssh_down(sandbox, sandbox.hosts[0])
        await real(name)

    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        await d.reconcile()
        r1 = (await d.last_job("zd-ssh")).release
        repo.write("services/zd-ssh/www/index.html", "<h1>zd-ssh v2</h1>\n")
        repo.commit("v2")
        monkeypatch.setattr(deployerd.switch, "failpoint", cut_ssh)
        stop = asyncio.Event()
        load = asyncio.create_task(run_load(sandbox.hosts[0].internal_address, port, rate=50, seconds=120,
                                            stop=stop))
        try:
            await d.reconcile()
            job = await d.last_job("zd-ssh")
            assert cut == [point]
            assert job.status is JobStatus.FAILED and job.transient, (job.status, job.error)
            assert "sbx-1" in (job.error or ""), job.error
            await ssh_up(sandbox, sandbox.hosts[0])
            for _ in range(20):  # the host's probe reconnects; bounded
                await asyncio.sleep(0.5)
                await d.reconcile()
                last = await d.last_job("zd-ssh")
                if last.status is JobStatus.SUCCEEDED and last.release != r1:
                    break
            await asyncio.sleep(0.5)
        finally:
            stop.set()
            await ssh_up(sandbox, sandbox.hosts[0])
        result = await load
        assert result.failed == 0, result.summary()
        r2 = (await d.last_job("zd-ssh")).release
        assert r2 != r1 and result.upstreams()[-1] == r2
        assert await running_containers(d, "zd-ssh") == [r2]


@asynccontextmanager
async def squatting(sandbox: SandboxInfo, unit: str, listen: str) -> AsyncIterator[None]:
    """For the block, a process deployerd does not know listening on ``listen`` at sbx-1 (busybox httpd, a
    transient unit ``unit``)."""
    from test_outages import in_host

    host = sandbox.hosts[0]
    await in_host(sandbox, host, "systemctl", "stop", unit, check=False)
    await in_host(sandbox, host, "systemctl", "reset-failed", unit, check=False)
    await in_host(sandbox, host, "systemd-run", f"--unit={unit}", "busybox", "httpd", "-f", "-p", listen, "-h", "/tmp")
    try:
        yield
        assert (await in_host(sandbox, host, "systemctl", "is-active", unit, check=False)).out.strip() == "active"
    finally:
        await in_host(sandbox, host, "systemctl", "stop", unit, check=False)


async def test_a_taken_public_port_fails_naming_host_and_port(sandbox: SandboxInfo, tmp_path: Path) -> None:
    port = PORT + 2
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    with_ingress(repo, sandbox)
    repo.service("zd-taken", port)
    repo.commit("v1")
    async with squatting(sandbox, "t-squatter", f"0.0.0.0:{port}"), \
            running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        await d.reconcile()
        job = await d.last_job("zd-taken")
        assert job.status is JobStatus.FAILED and job.transient, (job.status, job.error)
        assert f"host sbx-1: ingress proxy: public port {port} of" in (job.error or ""), job.error
        assert "taken by" in (job.error or "")
        assert "zd-taken" not in await d.engine.store.quarantined()  # an outage of the host: retried


async def test_a_private_port_something_listens_on_is_not_given_to_a_release(sandbox: SandboxInfo,
                                                                              tmp_path: Path) -> None:
    """A new release's private port is one nothing listens on at the host: a process deployerd does not know (as a
    systemd release or another daemon's instance would) on the very port the allocator starts from keeps it
    (undisturbed), and the release gets another one and serves."""
    port = PORT + 4
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    with_ingress(repo, sandbox)
    repo.service("zd-private", port)
    repo.commit("v1")
    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        first = allocate_port(set(), qualified_name("zd-private", d.engine.settings.instance))
        async with squatting(sandbox, "t-private-squatter", f"127.0.0.1:{first}"):
            await d.reconcile()
            job = await d.last_job("zd-private")
            assert job.status is JobStatus.SUCCEEDED, (job.status, job.error)
            assert job.phase("Verify Health").details["switch"]["private_port"] != first
            assert (await run_load(sandbox.hosts[0].internal_address, port, seconds=0.3)).upstreams() == [job.release]


async def test_a_kept_release_whose_private_port_was_taken_starts_on_another(sandbox: SandboxInfo,
                                                                              tmp_path: Path) -> None:
    """A git revert to a kept release whose private port something else took meanwhile: its kept container is
    created again from its kept image (no rebuild) on a free port, and serves; the other process keeps its port."""
    port = PORT + 7
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    with_ingress(repo, sandbox)
    repo.service("zd-kept", port)
    repo.commit("v1")
    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        await d.reconcile()
        first = await d.last_job("zd-kept")
        assert first.status is JobStatus.SUCCEEDED, first.error
        kept_port = first.phase("Verify Health").details["switch"]["private_port"]
        repo.write("services/zd-kept/www/index.html", "<h1>zd-kept v2</h1>\n")
        repo.commit("v2")
        await d.reconcile()
        assert (await d.last_job("zd-kept")).status is JobStatus.SUCCEEDED
        async with squatting(sandbox, "t-kept-squatter", f"127.0.0.1:{kept_port}"):
            git(repo.path, "revert", "--no-edit", "HEAD")
            await d.reconcile()
            back = await d.last_job("zd-kept")
            assert back.status is JobStatus.SUCCEEDED, (back.status, back.error)
            assert back.release == first.release and back.phase("Build").status.value == "skipped"
            assert back.phase("Verify Health").details["switch"]["private_port"] != kept_port
            assert (await run_load(sandbox.hosts[0].internal_address, port, seconds=0.3)).upstreams() == [back.release]


async def test_a_container_from_before_the_proxy_moves_behind_it(sandbox: SandboxInfo, tmp_path: Path) -> None:
    """A host that gets ``ingress: haproxy``: its container, which published the public port itself, keeps
    serving until the new release is proven beside it, then stops (kept) so the proxy can take the port."""
    port = PORT + 3
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("zd-moved", port)
    repo.commit("v1, stop-first")
    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        await d.reconcile()
        r1 = (await d.last_job("zd-moved")).release
        with_ingress(repo, sandbox)
        repo.commit("the host gets its proxy")
        await d.reconcile()
        job = await d.last_job("zd-moved")
        assert job.status is JobStatus.SUCCEEDED, job.error
        switch = job.phase("Verify Health").details["switch"]
        assert switch["stopped_unproxied"] == [f"deployerd-{d.engine.settings.instance}-zd-moved-{r1}"]
        assert await running_containers(d, "zd-moved") == [job.release]
        assert (await run_load(sandbox.hosts[0].internal_address, port, seconds=0.3)).upstreams() == [job.release]


async def test_a_host_that_drops_its_proxy_runs_stop_first_on_the_public_port(sandbox: SandboxInfo,
                                                                               tmp_path: Path) -> None:
    """``ingress: haproxy`` -> ``none``: the service's route goes before the stop-first start, so the new
    container binds the public port itself; the proxied one stops (kept); the proxy keeps no route of it."""
    from test_outages import in_host
    port = PORT + 6
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    with_ingress(repo, sandbox)
    repo.service("zd-drop", port)
    repo.commit("behind the proxy")
    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        await d.reconcile()
        proxied = await d.last_job("zd-drop")
        assert proxied.status is JobStatus.SUCCEEDED, proxied.error
        q = f"{d.engine.settings.instance}-zd-drop"
        async def routed() -> list[str]:
            return [r.service for r in parse_config((await in_host(sandbox, sandbox.hosts[0], "cat", CONFIG_PATH)).out)]

        assert q in await routed()
        with_ingress(repo, sandbox, "none")
        repo.commit("the host drops its proxy")
        await d.reconcile()
        job = await d.last_job("zd-drop")
        assert job.status is JobStatus.SUCCEEDED, (job.error, job.logs)
        assert job.release != proxied.release
        start = job.phase("Start Service").details
        assert start["left_proxy"]["route_removed"] == q, start
        assert start["stopped"] == [f"deployerd-{q}-{proxied.release}"], start
        assert await running_containers(d, "zd-drop") == [job.release]
        assert q not in await routed()
        served = await run_load(sandbox.hosts[0].internal_address, port, seconds=0.3)
        assert served.samples and served.failed == 0, served.summary()
        assert served.upstreams() == [""], served.summary()  # no proxy names an upstream: the container answers
