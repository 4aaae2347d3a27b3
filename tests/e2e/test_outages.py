"""Outages end to end: a host's SSH down, a host's Docker engine stopped, the Registry down / 500 / slow, the git
remote gone. Each test runs the real daemon loop (engine + HTTP API) managing services on two sandbox hosts,
breaks one real part (sshd and docker inside a test-host container, a loopback HTTP proxy in front of the
real Registry, a bare repository moved away), and checks that the daemon stays up, /health names what is
degraded and why, the rest keeps reconciling, nothing on the broken part is rolled back, pruned or
quarantined, retries back off, and everything converges when the part comes back.

Every wait is bounded; no assertion is on timing except lower bounds that only a hammering retry breaks.
Figures (time from recovery to converged, retries during the outage, the /health text) are printed: run
with ``-s`` to see them.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import aiodocker
import httpx
import pytest
from aiohttp import web
from daemon_harness import (
    Daemon,
    DesiredRepo,
    git,
    http_get,
    registry_client,
    running_daemon,
    settings_for,
)
from test_systemd import systemd_service

from deployerd import sandbox as sbx
from deployerd.config import Settings
from deployerd.engine import BACKOFF_MAX_S, BACKOFF_MIN_S
from deployerd.observe import HOST_RETRY_MAX_S, HOST_RETRY_MIN_S
from deployerd.sandbox import HostInfo, SandboxInfo
from deployerd.store import Job, JobStatus

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

RESYNC_S = 2.0  # the loop's periodic reconcile: how often a healed part can be noticed in these tests
T = TypeVar("T")


# ----------------------------------------------------------------------------------------- small helpers


async def until(what: str, check: Callable[[], Awaitable[T]], timeout_s: float = 240, step: float = 0.5) -> T:
    """Poll ``check`` until it returns something truthy; bounded, fails naming what was awaited."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(step)


async def in_host(sandbox: SandboxInfo, host: HostInfo, *argv: str, check: bool = True) -> sbx.Result:
    """Run a command inside a test host's container, through the sandbox's engine (not over SSH)."""
    return await sbx.Engine(sandbox.engine.url).docker("exec", host.container, *argv, check=check, timeout=60)


async def ssh_down(sandbox: SandboxInfo, host: HostInfo) -> None:
    """Stop the host's sshd and end every live session (the daemon's kept connection included)."""
    await in_host(sandbox, host, "systemctl", "stop", "ssh.service")
    pids = (await in_host(sandbox, host, "pgrep", "-x", "sshd", check=False)).out.split()
    if pids:
        await in_host(sandbox, host, "kill", *pids, check=False)


async def ssh_up(sandbox: SandboxInfo, host: HostInfo) -> None:
    await in_host(sandbox, host, "systemctl", "start", "ssh.service")


async def docker_down(sandbox: SandboxInfo, host: HostInfo) -> None:
    await in_host(sandbox, host, "systemctl", "stop", "docker.socket", "docker.service")


async def docker_up(sandbox: SandboxInfo, host: HostInfo) -> None:
    await in_host(sandbox, host, "systemctl", "start", "docker.socket", "docker.service")


async def health(d: Daemon) -> dict[str, Any]:
    """GET /health, also checking it answers at once (it must never wait on a remote call)."""
    t0 = time.monotonic()
    resp = await d.http.get("/health", timeout=5)
    resp.raise_for_status()
    body = resp.json()
    body["_answered_in_s"] = round(time.monotonic() - t0, 3)
    return body


async def finished_job(d: Daemon, service: str, after: set[str], status: JobStatus | None = None) -> Job | None:
    """The newest finished job of ``service`` not in ``after`` (optionally with ``status``), if any."""
    for job in await d.jobs(service):
        if job.id not in after and job.status.finished and (status is None or job.status is status):
            return job
    return None


async def job_ids(d: Daemon, *services: str) -> set[str]:
    return {j.id for s in services for j in await d.jobs(s)}


async def serves(url: str, text: str) -> bool:
    try:
        return text in (await http_get(url)).text
    except httpx.HTTPError:
        return False


def web_url(host: HostInfo, port: int) -> str:
    return f"http://{host.internal_address}:{port}/"


def daemon_settings(tmp: Path, sandbox: SandboxInfo, repo: DesiredRepo, **update: Any) -> Settings:
    """The harness's settings with a short resync (how soon a healed part is noticed here) and ``update``."""
    return settings_for(tmp, sandbox, repo).model_copy(update={"resync_interval_s": RESYNC_S, **update})


def two_hosts(sandbox: SandboxInfo) -> tuple[HostInfo, HostInfo]:
    assert len(sandbox.hosts) >= 2, "these tests need two sandbox hosts"
    return sandbox.hosts[0], sandbox.hosts[1]


def report(scenario: str, **figures: Any) -> None:
    print(f"\n[outages] {scenario}: " + json.dumps(figures, default=str))


def started(job: Job) -> float:
    return datetime.fromisoformat(job.started_at or job.created_at).timestamp()


async def deploy_all(d: Daemon, services: list[str]) -> None:
    for name in services:
        job = await until(f"first deploy of {name}", lambda n=name: finished_job(d, n, set()))
        assert job.status is JobStatus.SUCCEEDED, f"{name}: {job.error}"


async def no_harm(d: Daemon, services: list[str], since: set[str]) -> None:
    """Nothing was rolled back, pruned or quarantined for ``services`` since the jobs in ``since``."""
    for name in services:
        for job in await d.jobs(name):
            if job.id in since:
                continue
            assert job.status is not JobStatus.ROLLED_BACK and job.rollback is None, f"{name} rolled back: {job}"
            assert job.kind != "prune", f"{name} pruned during the outage: {job}"
    quarantined = await d.engine.store.quarantined()
    assert not set(quarantined) & set(services), f"quarantined during the outage: {quarantined}"


# ----------------------------------------------------------------------------------------- 1. SSH down


async def test_host_ssh_down(sandbox: SandboxInfo, tmp_path: Path) -> None:
    down, other = two_hosts(sandbox)
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("o-keep", 8701, host=down.name)
    repo.service("o-gone", 8702, host=down.name)
    repo.service("o-other", 8703, host=other.name)
    repo.commit("three services on two hosts")
    settings = daemon_settings(tmp_path, sandbox, repo, ssh_connect_timeout_s=5)
    async with running_daemon(settings, loop=True) as d:
        await deploy_all(d, ["o-keep", "o-gone", "o-other"])
        before = await job_ids(d, "o-keep", "o-gone", "o-other")
        stats0 = d.engine.hosts.pool.stats()[down.name]
        reconciles0 = _reconciles(d)
        try:
            await ssh_down(sandbox, down)
            t_down = time.monotonic()
            repo.service("o-keep", 8701, host=down.name, version="2")
            repo.remove("services/o-gone.yaml")
            repo.remove("services/o-gone")
            repo.service("o-other", 8703, host=other.name, version="2")
            repo.commit("change a service on each host, delete one on the down host")

            # the other host keeps reconciling: its change deploys during the outage
            job = await until("o-other v2 during the outage", lambda: finished_job(d, "o-other", before))
            assert job.status is JobStatus.SUCCEEDED, job.error
            assert await serves(web_url(other, 8703), "o-other v2")

            h = await until("/health naming the down host", lambda: _degraded_with(d, f"host {down.name}"))
            assert h["status"] == "error" and h["state"] == "degraded"
            assert h["hosts"][down.name]["reachable"] is False and h["hosts"][other.name]["reachable"] is True

            # the down host's services are unknown, neither redeployed, rolled back nor pruned
            await until("several reconciles and host attempts during the outage",
                        lambda: _outage_seen(d, down.name, reconciles0, 5, 3), timeout_s=120)
            for name in ("o-keep", "o-gone"):
                row = d.engine.services[name]
                assert row.sync_status == "Unknown" and row.health_status == "Unknown", row
                assert any("unreachable" in r for r in row.reasons), row.reasons
            await no_harm(d, ["o-keep", "o-gone"], before)
            assert not (await job_ids(d, "o-keep", "o-gone")) - before, "a job ran on a host that is down"
            async with registry_client(sandbox) as reg:
                assert await reg.get_by_name("o-gone") is not None, "o-gone deregistered while its host was down"
            assert await serves(web_url(down, 8701), "o-keep v1")  # what ran keeps running

            # retries back off: connection attempts spaced by the doubling host backoff, not one per reconcile
            h = await health(d)
            attempts, reconciles = h["hosts"][down.name]["attempts"], _reconciles(d) - reconciles0
            assert_backed_off(h["hosts"][down.name])
            stats1 = d.engine.hosts.pool.stats()[down.name]
            outage_s = time.monotonic() - t_down
            h_text = h["degraded"]
        finally:
            await ssh_up(sandbox, down)
        t_up = time.monotonic()
        await until("the host seen again", lambda: _host_back(d, down.name), step=0.2)
        noticed_s = time.monotonic() - t_up
        keep = await until("o-keep v2 after SSH is back",
                           lambda: finished_job(d, "o-keep", before, JobStatus.SUCCEEDED), step=0.2)
        gone = await until("o-gone pruned after SSH is back",
                           lambda: finished_job(d, "o-gone", before, JobStatus.SUCCEEDED), step=0.2)
        converged_s = time.monotonic() - t_up
        assert gone.kind == "prune" and keep.kind == "deploy"
        assert await serves(web_url(down, 8701), "o-keep v2")
        async with registry_client(sandbox) as reg:
            assert await reg.get_by_name("o-gone") is None
        await until("/health healthy again", lambda: _healthy(d))
        report("ssh down", outage_s=round(outage_s, 1), reconciles=reconciles, connect_attempts=attempts,
               failed_connects=stats1.failures - stats0.failures,
               recovery_noticed_s=round(noticed_s, 1), recovery_to_converged_s=round(converged_s, 1),
               health_degraded=h_text,
               health_answered_in_s=h["_answered_in_s"])


def assert_backed_off(host: dict[str, Any]) -> None:
    """The host's failed attempts (from /health) are at least the doubling backoff apart."""
    attempts = host["attempts"]
    first, last = (datetime.fromisoformat(host[k]) for k in ("since", "last_attempt_at"))
    least = sum(min(HOST_RETRY_MAX_S, HOST_RETRY_MIN_S * 2 ** k) for k in range(attempts - 1))
    assert attempts >= 2 and (last - first).total_seconds() >= 0.9 * least, (
        f"{attempts} attempts in {(last - first).total_seconds():.1f} s: not backed off ({host})")


def _reconciles(d: Daemon) -> float:
    return sum(s.value for m in d.engine.metrics.reconciles.collect() for s in m.samples
               if s.name.endswith("_total"))


async def _reconciles_since(d: Daemon, start: float, n: int) -> bool:
    return _reconciles(d) - start >= n


async def _outage_seen(d: Daemon, host: str, reconciles0: float, reconciles: int, attempts: int) -> bool:
    h = await health(d)
    return _reconciles(d) - reconciles0 >= reconciles and h["hosts"][host].get("attempts", 0) >= attempts


async def _degraded_with(d: Daemon, text: str) -> dict[str, Any] | None:
    h = await health(d)
    return h if any(text in line for line in h["degraded"]) else None


async def _host_back(d: Daemon, host: str) -> bool:
    return bool((await health(d))["hosts"][host]["reachable"])


async def _healthy(d: Daemon) -> dict[str, Any] | None:
    h = await health(d)
    return h if h["state"] == "active" and not h["degraded"] else None


# ----------------------------------------------------------------------------------------- 2. Docker down


async def test_host_docker_engine_stopped(sandbox: SandboxInfo, tmp_path: Path) -> None:
    down, other = two_hosts(sandbox)
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("d-web", 8711, host=down.name)
    repo.service("d-other", 8712, host=other.name)
    repo.commit("one service on each host")
    settings = daemon_settings(tmp_path, sandbox, repo)
    async with running_daemon(settings, loop=True) as d:
        await deploy_all(d, ["d-web", "d-other"])
        before = await job_ids(d, "d-web", "d-other")
        try:
            await docker_down(sandbox, down)
            t_down = time.monotonic()
            repo.service("d-web", 8711, host=down.name, version="2")
            repo.service("d-other", 8712, host=other.name, version="2")
            repo.commit("change both")
            job = await until("d-other v2 while the other host's Docker is down",
                              lambda: finished_job(d, "d-other", before))
            assert job.status is JobStatus.SUCCEEDED, job.error
            h = await until("/health naming the host's Docker engine",
                            lambda: _degraded_with(d, f"host {down.name}: docker not answering"))
            row = d.engine.services["d-web"]
            assert row.sync_status == "Unknown" and row.health_status == "Unknown", row  # not "Missing"
            await no_harm(d, ["d-web"], before)
            assert not (await job_ids(d, "d-web")) - before, "a job ran against a stopped Docker engine"
            async with registry_client(sandbox) as reg:
                assert await reg.get_by_name("d-web") is not None
            outage_s = time.monotonic() - t_down
        finally:
            await docker_up(sandbox, down)
        t_up = time.monotonic()
        await until("the host seen again", lambda: _host_back(d, down.name), step=0.2)
        noticed_s = time.monotonic() - t_up
        job = await until("d-web v2 after Docker is back",
                          lambda: finished_job(d, "d-web", before, JobStatus.SUCCEEDED), step=0.2)
        await until("d-web serving v2", lambda: serves(web_url(down, 8711), "d-web v2"), step=0.2)
        converged_s = time.monotonic() - t_up
        await until("/health healthy again", lambda: _healthy(d))
        report("docker down", outage_s=round(outage_s, 1), recovery_noticed_s=round(noticed_s, 1),
               recovery_to_converged_s=round(converged_s, 1),
               health_degraded=h["degraded"], health_answered_in_s=h["_answered_in_s"],
               jobs_during_outage=len((await job_ids(d, "d-web")) - before) - 1)


async def test_host_without_docker_deploys_its_systemd_services(sandbox: SandboxInfo, tmp_path: Path) -> None:
    """A host whose Docker engine is stopped from the start, with a systemd service only: it is never asked
    for Docker, and the service deploys and serves (today the whole host stayed unreachable)."""
    down, _ = two_hosts(sandbox)
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    systemd_service(repo, "n-unit", 8721, host=down.name)
    repo.commit("a systemd service on a host without Docker")
    await docker_down(sandbox, down)
    async with running_daemon(daemon_settings(tmp_path, sandbox, repo), loop=True) as d:
        try:  # Docker comes back before the daemon's cleanup (which reads every runtime)
            await deploy_all(d, ["n-unit"])
            assert await serves(web_url(down, 8721) + "health", '"version": "1"')
            await until("n-unit Synced and Healthy", lambda: _synced(d, "n-unit"), timeout_s=60)
            h = await health(d)
            assert h["hosts"][down.name]["reachable"], h["hosts"]
            assert h["hosts"][down.name]["runtimes"]["docker"] == "not observed", h["hosts"]
            assert not any("docker" in line for line in h["degraded"]), h["degraded"]
        finally:
            await docker_up(sandbox, down)


async def test_docker_stopped_makes_only_docker_services_unknown(sandbox: SandboxInfo, tmp_path: Path) -> None:
    """A Docker and a systemd service on one host, its Docker engine stopped: the systemd one still deploys a
    change, the Docker one is Unknown (no job, nothing pruned, its Registry entry kept), /health names it."""
    down, _ = two_hosts(sandbox)
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("m-dock", 8722, host=down.name)
    systemd_service(repo, "m-unit", 8723, host=down.name)
    repo.commit("one service of each runtime on one host")
    async with running_daemon(daemon_settings(tmp_path, sandbox, repo), loop=True) as d:
        await deploy_all(d, ["m-dock", "m-unit"])
        before = await job_ids(d, "m-dock", "m-unit")
        try:
            await docker_down(sandbox, down)
            repo.service("m-dock", 8722, host=down.name, version="2")
            systemd_service(repo, "m-unit", 8723, host=down.name, version="2")
            repo.commit("change both")
            job = await until("m-unit v2 while the host's Docker is down",
                              lambda: finished_job(d, "m-unit", before))
            assert job.status is JobStatus.SUCCEEDED, job.error
            assert await serves(web_url(down, 8723) + "health", '"version": "2"')
            h = await until("/health naming the host's Docker engine",
                            lambda: _degraded_with(d, f"host {down.name}: docker not answering"))
            assert h["hosts"][down.name]["reachable"], h["hosts"]
            assert h["hosts"][down.name]["runtimes"]["systemd"] == "answering", h["hosts"]
            assert "docker not answering" in h["hosts"][down.name]["runtimes"]["docker"], h["hosts"]
            dock = d.engine.services["m-dock"]
            assert dock.sync_status == "Unknown" and dock.health_status == "Unknown", dock  # not "Missing"
            assert any("docker not answering" in r for r in dock.reasons), dock
            await until("m-unit Synced", lambda: _synced(d, "m-unit"))
            await no_harm(d, ["m-dock", "m-unit"], before)
            assert not (await job_ids(d, "m-dock")) - before, "a job ran against a stopped Docker engine"
            async with registry_client(sandbox) as reg:
                assert await reg.get_by_name("m-dock") is not None
        finally:
            await docker_up(sandbox, down)
        await until("m-dock v2 after Docker is back",
                    lambda: finished_job(d, "m-dock", before, JobStatus.SUCCEEDED), step=0.2)
        await until("m-dock serving v2", lambda: serves(web_url(down, 8722), "m-dock v2"), step=0.2)
        report("docker down beside systemd", health_degraded=h["degraded"], runtimes=h["hosts"][down.name]["runtimes"])


async def _synced(d: Daemon, name: str) -> bool:
    row = d.engine.services.get(name)
    return row is not None and row.sync_status == "Synced" and row.health_status == "Healthy"


# ----------------------------------------------------------------------------------------- 3. Registry


class RegistryProxy:
    """A real HTTP server on loopback in front of the real Registry, with switchable failure modes:
    ``pass``, ``down`` (nothing listens), ``500`` (every request), ``500-writes`` (reads pass),
    ``slow`` (answers after ``delay_s``, beyond the client's timeout)."""

    def __init__(self, upstream: str, port: int) -> None:
        self.upstream = upstream
        self.port = port
        self.mode = "pass"
        self.delay_s = 12.0
        self.requests: list[tuple[float, str, str, int]] = []  # (monotonic, method, path, status)
        self._client = httpx.AsyncClient(base_url=upstream, timeout=30)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        status = 500
        try:
            if self.mode == "500" or (self.mode == "500-writes" and request.method != "GET"):
                return web.json_response({"detail": "injected failure"}, status=500)
            if self.mode == "slow":
                await asyncio.sleep(self.delay_s)
            headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
            resp = await self._client.request(request.method, request.path_qs, content=body, headers=headers)
            status = resp.status_code
            return web.Response(body=resp.content, status=resp.status_code,
                                content_type=resp.headers.get("content-type", "application/json").split(";")[0])
        finally:
            self.requests.append((time.monotonic(), request.method, request.path, status))

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def set(self, mode: str) -> None:
        if mode == "down":
            await self.stop()
        elif self._runner is None:
            await self.start()
        self.mode = mode

    async def close(self) -> None:
        await self.stop()
        await self._client.aclose()


@asynccontextmanager
async def registry_proxy(sandbox: SandboxInfo) -> AsyncIterator[RegistryProxy]:
    from daemon_harness import free_port

    assert sandbox.registry is not None
    proxy = RegistryProxy(sandbox.registry.url, free_port())
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def _registered(release: str, name: str, sandbox: SandboxInfo) -> bool:
    async with registry_client(sandbox) as reg:
        entry = await reg.get_by_name(name)
    return entry is not None and (entry.metadata or {}).get("release") == release


async def test_registry_down_500_slow_and_failing_writes(sandbox: SandboxInfo, tmp_path: Path) -> None:
    """Down and slow: a deploy whose Registration fails. 500: nothing can be read, nothing is done. 500 on writes
    only (the Registry lists fine): the entry, deleted by hand, is written again by retries that back off."""
    one, other = two_hosts(sandbox)
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("r-web", 8721, host=one.name)
    repo.service("r-other", 8722, host=other.name)
    repo.commit("one service on each host")
    async with registry_proxy(sandbox) as proxy:
        settings = daemon_settings(tmp_path, sandbox, repo, registry_url=proxy.url)
        async with running_daemon(settings, loop=True) as d:
            await deploy_all(d, ["r-web", "r-other"])
            for n, mode in enumerate(("down", "slow", "500", "500-writes"), start=2):
                before = await job_ids(d, "r-web", "r-other")
                want = (await d.last_job("r-web")).release
                try:
                    await proxy.set(mode)
                    t_down = time.monotonic()
                    if mode in ("down", "slow"):  # a deploy whose Registration fails
                        repo.service("r-web", 8721, host=one.name, version=str(n))
                        repo.commit(f"r-web v{n} while the Registry is {mode}")
                        failed = await until(f"r-web v{n} job ({mode})", lambda b=before: finished_job(d, "r-web", b))
                        # transient: the job fails, nothing rolls back, the new release serves
                        assert failed.status is JobStatus.FAILED and failed.transient, failed
                        assert (failed.error or "").startswith("Register with Registry"), failed.error
                        assert await serves(web_url(one, 8721), f"r-web v{n}")
                        want = failed.release
                    if mode == "500-writes":  # drift in the Registry: its fix is retried, backing off
                        async with registry_client(sandbox) as reg:
                            await reg.deregister("r-web")
                        await until("three retries", lambda b=before: _jobs_since(d, "r-web", b, 4), timeout_s=120)
                        h = await until("/health naming the failing Registration",
                                        lambda: _degraded_with(d, "service r-web"))
                    else:  # the Registry cannot be read: /health says so
                        h = await until("/health naming the Registry", lambda: _degraded_with(d, "registry:"))
                    if mode == "500":
                        reconciles0 = _reconciles(d)
                        await until("reconciles", lambda r=reconciles0: _reconciles_since(d, r, 3))
                    await no_harm(d, ["r-web", "r-other"], before)
                    attempts = sorted((j for j in await d.jobs("r-web") if j.id not in before), key=started)
                    assert mode != "500" or not attempts, f"jobs ran while the Registry could not be read: {attempts}"
                    outage_s = time.monotonic() - t_down
                finally:
                    await proxy.set("pass")
                t_up = time.monotonic()
                await until("the Registry seen again", lambda: _registry_back(d), step=0.2)
                noticed_s = time.monotonic() - t_up
                await until(f"r-web {want} registered after the Registry healed",
                            lambda w=want: _registered(w, "r-web", sandbox), step=0.2)
                converged_s = time.monotonic() - t_up
                await until("/health healthy again", lambda: _healthy(d))
                gaps = [round(started(b) - (_ended(a)), 1) for a, b in itertools.pairwise(attempts)]
                # backoff: each retry starts at least the doubling minimum after the previous attempt ended
                for k, gap in enumerate(gaps):
                    assert gap >= 0.9 * min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** k), f"retries not backed off: {gaps}"
                report(f"registry {mode}", outage_s=round(outage_s, 1),
                       jobs=[f"{j.kind} {j.status.value}" for j in attempts], waits_between_attempts_s=gaps,
                       recovery_noticed_s=round(noticed_s, 1), recovery_to_converged_s=round(converged_s, 1),
                       health_degraded=h["degraded"], health_answered_in_s=h["_answered_in_s"])
            assert (await d.last_job("r-other")).status is JobStatus.SUCCEEDED


def _ended(job: Job) -> float:
    return datetime.fromisoformat(job.completed_at or job.created_at).timestamp()


async def _registry_back(d: Daemon) -> bool:
    return bool((await health(d))["registry"]["reachable"])


async def _jobs_since(d: Daemon, service: str, before: set[str], n: int) -> bool:
    return len([j for j in await d.jobs(service) if j.id not in before and j.status.finished]) >= n


# ----------------------------------------------------------------------------------------- 4. git remote


async def _container_of(d: Daemon, host: str, service: str) -> dict[str, Any] | None:
    handle = await d.engine.hosts.handle(d.engine.desired.hosts[host])  # type: ignore[union-attr]
    sock = await handle.conn.docker_socket()
    async with aiodocker.Docker(url=f"unix://{sock}") as docker:
        found = await docker.containers.list(filters=json.dumps(
            {"label": [f"deployerd.service={service}", f"deployerd.instance={d.engine.settings.instance}"]}))
        return found[0]._container if found else None


async def test_git_remote_unreachable(sandbox: SandboxInfo, tmp_path: Path) -> None:
    one, other = two_hosts(sandbox)
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("g-web", 8731, host=one.name)
    repo.service("g-other", 8732, host=other.name)
    repo.commit("one service on each host")
    remote = tmp_path / "remote.git"
    git(tmp_path, "clone", "-q", "--bare", str(repo.path), str(remote))
    settings = daemon_settings(tmp_path, sandbox, repo, repo_url=str(remote))
    moved = tmp_path / "remote-away.git"
    async with running_daemon(settings, loop=True) as d:
        await deploy_all(d, ["g-web", "g-other"])
        revision = d.engine.source.revision
        before = await job_ids(d, "g-web", "g-other")
        try:
            os.rename(remote, moved)
            t_down = time.monotonic()
            h = await until("/health naming git", lambda: _degraded_with(d, "git"))
            assert h["git"]["error"] and h["git"]["revision"] == revision
            # drift is still healed from the last fetched revision
            running = await _container_of(d, one.name, "g-web")
            assert running is not None
            handle = await d.engine.hosts.handle(d.engine.desired.hosts[one.name])  # type: ignore[union-attr]
            async with aiodocker.Docker(url=f"unix://{await handle.conn.docker_socket()}") as docker:
                await (await docker.containers.get(running["Id"])).stop()
            healed = await until("g-web healed while git is down", lambda: finished_job(d, "g-web", before))
            assert healed.status is JobStatus.SUCCEEDED and healed.commit == revision, healed
            assert await until("g-web serving again", lambda: serves(web_url(one, 8731), "g-web v1"))
            h = await until("/health still naming git", lambda: _degraded_with(d, "git"))
            fetch_errors = _fetch_errors(d)
            outage_s = time.monotonic() - t_down
        finally:
            if moved.exists():
                os.rename(moved, remote)
        repo.service("g-web", 8731, host=one.name, version="2")
        repo.commit("g-web v2 after the remote is back")
        git(repo.path, "push", "-q", str(remote), "main")
        t_up = time.monotonic()
        await until("git fetched again", lambda: _git_back(d), step=0.2)
        noticed_s = time.monotonic() - t_up
        head = git(repo.path, "rev-parse", "HEAD")
        job = await until("g-web v2 deployed", lambda: _deployed_commit(d, "g-web", head),
                          step=0.2)
        converged_s = time.monotonic() - t_up
        assert job.status is JobStatus.SUCCEEDED
        assert await serves(web_url(one, 8731), "g-web v2")
        await until("/health healthy again", lambda: _healthy(d))
        report("git remote gone", outage_s=round(outage_s, 1), fetch_errors=fetch_errors,
               recovery_noticed_s=round(noticed_s, 1),
               recovery_to_converged_s=round(converged_s, 1), health_degraded=h["degraded"],
               health_answered_in_s=h["_answered_in_s"])


async def _git_back(d: Daemon) -> bool:
    return (await health(d))["git"]["error"] is None


def _fetch_errors(d: Daemon) -> float:
    return sum(s.value for m in d.engine.metrics.fetch_errors.collect() for s in m.samples
               if s.name.endswith("_total"))


async def _deployed_commit(d: Daemon, service: str, commit: str) -> Job | None:
    for job in await d.jobs(service):
        if job.commit == commit and job.status.finished:
            return job
    return None


# ------------------------------------------------------------------ 5. the connection lost during Transfer


async def test_connection_lost_during_transfer_is_retried_never_quarantined(sandbox: SandboxInfo,
                                                                            tmp_path: Path) -> None:
    """Bug 2 of issue 12: sshd killed while Transfer writes a large file. The SFTP error that ends the write
    is an outage (transient): the job fails, is retried once the host is back, and its release is never
    quarantined (it was, when transfer.py used asyncssh's SFTP client past the connection's translation)."""
    host, _ = two_hosts(sandbox)
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("o-big", 8711, host=host.name)
    repo.commit("small")
    settings = daemon_settings(tmp_path, sandbox, repo, ssh_connect_timeout_s=5)
    async with running_daemon(settings, loop=True) as d:
        await deploy_all(d, ["o-big"])
        before = await job_ids(d, "o-big")
        repo.service("o-big", 8711, host=host.name, version="2")
        for i in range(2):  # 2 x 45 MB of random bytes: seconds of SFTP writes, whole (nothing to delta against)
            (repo.path / f"services/o-big/www/blob{i}.bin").write_bytes(os.urandom(45 * 1024 * 1024))
        repo.commit("v2: large files")

        async def transferring() -> Job | None:
            for job in await d.jobs("o-big"):
                if job.id not in before and job.phase("Transfer").status.value == "running":
                    return job
            return None

        job = await until("v2 in Transfer", transferring, step=0.1)
        try:
            await ssh_down(sandbox, host)
            cut = await until("the v2 job to end", lambda: finished_job(d, "o-big", before))
            report("connection lost during Transfer", status=cut.status.value, transient=cut.transient,
                   error=cut.error)
            assert cut.id == job.id and cut.status is JobStatus.FAILED and cut.transient, (cut.status, cut.error)
            assert "o-big" not in await d.engine.store.quarantined()
        finally:
            await ssh_up(sandbox, host)
        done = await until("v2 retried once the host is back",
                           lambda: finished_job(d, "o-big", before | {job.id}, JobStatus.SUCCEEDED))
        assert done.release == job.release
        assert await serves(web_url(host, 8711), "o-big v2")
        await no_harm(d, ["o-big"], before)
