"""Fleets end to end (issue 15): one service on 3 real sandbox hosts, rolled out in waves behind a canary.

Real git, OpenSSH, Docker engines and systemd on the hosts, the sandbox Registry. The hosts are those of the
3-host sandbox (`fleet_sandbox` in conftest: the Swarm sandbox's nodes used as plain hosts, so `make test`
boots nothing more for these tests). Each test checks what runs on every host through the host's own runtime,
not through deployerd's records alone:

- a canary failing its health check: no other host ever runs the release, which is quarantined;
- wave 2 failing on host 3 (a systemd service that fails there only): hosts 1 and 2 go back to the last good
  release, each behind its HAProxy, and a load on every host's public port loses no request;
- a host's sshd stopped mid-rollout: the rollout pauses (no rollback, no quarantine, /health says so), then
  resumes once the host answers, and every host converges;
- a newer commit during the pause after the canary: superseded at once, the newer release rolled out from the
  canary;
- placement: a tag, a move from `host:` to `hosts:` (the new hosts first, the old one pruned after), removing one
  host from the list (pruned there only);
- SIGKILL of the daemon (a process of its own) between two waves: started again, it finishes the rollout.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from daemon_harness import (
    Daemon,
    DaemonProcess,
    DesiredRepo,
    http_get,
    registry_client,
    running_daemon,
    settings_for,
)
from load_gen import LoadResult, run_load
from test_cli import cli
from test_outages import in_host, ssh_down, ssh_up, until

from deployerd.sandbox import SandboxInfo
from deployerd.store import Job, JobStatus

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

T = TypeVar("T")
HOSTS = ["sbx-1", "sbx-2", "sbx-3"]

APP = '''\
"""A stdlib web service whose health fails on a host holding /etc/deployerd-test-fleet-break-<version>."""
import json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = {version!r}
port = int(sys.argv[sys.argv.index("--port") + 1])
host = sys.argv[sys.argv.index("--host") + 1]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        broken = os.path.exists(f"/etc/deployerd-test-fleet-break-{{VERSION}}")
        code = 500 if broken and self.path == "/health" else 200
        data = json.dumps({{"status": "broken" if code == 500 else "active", "version": VERSION}}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


ThreadingHTTPServer((host, port), Handler).serve_forever()
'''


# ----------------------------------------------------------------------------------------- helpers


def hosts_yaml(repo: DesiredRepo, sandbox: SandboxInfo, *, ingress: bool = False,
               tags: dict[str, list[str]] | None = None) -> None:
    hosts = {h.name: {"address": h.address, "ssh_port": h.ssh_port, "user": h.user,
                      "public_address": h.internal_address, **({"ingress": "haproxy"} if ingress else {}),
                      **({"tags": (tags or {})[h.name]} if (tags or {}).get(h.name) else {})}
             for h in sandbox.hosts[:3]}
    repo.write("hosts.yaml", yaml.safe_dump({"hosts": hosts}))


def docker_fleet(repo: DesiredRepo, name: str, port: int, version: str, placement: dict[str, Any], *,
                 healthy: bool = True, **rollout: Any) -> None:
    """A busybox web service on ``placement`` (``{"hosts": [...]}``, ``{"hosts": {"tag": t}}`` or
    ``{"host": h}``); unhealthy: its /health answers 404 on every host."""
    repo.service(name, port, version=version, health_timeout_s=6)
    manifest = yaml.safe_load((repo.path / f"services/{name}.yaml").read_text())
    manifest.pop("host")
    manifest.update(placement)
    if rollout:
        manifest["rollout"] = rollout
    repo.write(f"services/{name}.yaml", yaml.safe_dump(manifest))
    if not healthy:
        (repo.path / f"services/{name}/www/health").unlink()


def systemd_fleet(repo: DesiredRepo, name: str, port: int, version: str, **rollout: Any) -> None:
    manifest = {"name": name, "hosts": HOSTS, "method": "systemd", "port": port, "source": f"services/{name}",
                "health": {"path": "/health", "timeout_s": 6, "interval_s": 0.5}, "drain_timeout_s": 5,
                "systemd": {"command": "python3 app.py --host {host} --port {port}"}, "rollout": rollout}
    repo.write(f"services/{name}.yaml", yaml.safe_dump(manifest))
    repo.write(f"services/{name}/app.py", APP.format(version=version))


async def on_host(d: Daemon, host: str, service: str, method: str = "docker") -> tuple[dict[str, str], list[str]]:
    """What ``host``'s own runtime says of ``service``: release -> state of each instance, and the kept releases."""
    handle = await d.engine.hosts.handle(d.engine.desired.hosts[host])  # type: ignore[union-attr]
    instances, kept = await handle.runtime(method).observe()
    return {i.release: i.state.value for i in instances if i.service == service}, kept.get(service, [])


async def running(d: Daemon, service: str, method: str = "docker") -> dict[str, list[str]]:
    """host -> the releases of ``service`` running there."""
    out = {}
    for host in HOSTS:
        states, _ = await on_host(d, host, service, method)
        out[host] = sorted(r for r, s in states.items() if s == "running")
    return out


async def rollouts(d: Daemon, service: str) -> list[Job]:
    """The service's rollout jobs, newest first."""
    return [j for j in await d.jobs(service) if j.kind == "rollout"]


async def children(d: Daemon, job: Job) -> list[Job]:
    out = []
    for cid in job.children:
        child = await d.engine.store.job(cid)
        assert child is not None and child.parent == job.id
        out.append(child)
    return out


async def registry_hosts(sandbox: SandboxInfo, service: str) -> list[tuple[str, str]]:
    async with registry_client(sandbox) as reg:
        entry = await reg.get_by_name(service)
    assert entry is not None, f"no Registry entry for {service}"
    return [(h["host"], h["release"]) for h in (entry.metadata or {}).get("hosts", [])]


async def deploy_v1(d: Daemon, service: str, method: str = "docker") -> str:
    await d.reconcile()
    first = (await rollouts(d, service))[0]
    assert first.status is JobStatus.SUCCEEDED, (first.error, [(c.host, c.error) for c in await children(d, first)])
    assert await running(d, service, method) == {h: [first.release] for h in HOSTS}
    return first.release


# ----------------------------------------------------------------------------------------- the tests


async def test_a_failed_canary_never_reaches_another_host(fleet_sandbox: SandboxInfo, tmp_path: Path) -> None:
    sandbox = fleet_sandbox
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    hosts_yaml(repo, sandbox)
    docker_fleet(repo, "fl-canary", 8811, "1", {"hosts": HOSTS}, canary=1, batch=2)
    repo.commit("v1 on three hosts")
    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        v1 = await deploy_v1(d, "fl-canary")
        assert await registry_hosts(sandbox, "fl-canary") == [(h, v1) for h in HOSTS]

        docker_fleet(repo, "fl-canary", 8811, "2", {"hosts": HOSTS}, healthy=False, canary=1, batch=2)
        repo.commit("v2: its health check fails")
        await d.reconcile()
        job = (await rollouts(d, "fl-canary"))[0]
        v2 = job.release
        assert v2 != v1 and job.status is JobStatus.ROLLED_BACK, job.error
        assert job.waves == [["sbx-1"], ["sbx-2", "sbx-3"]]
        kids = await children(d, job)
        assert [(c.host, c.status) for c in kids] == [("sbx-1", JobStatus.ROLLED_BACK)]  # the canary only
        assert kids[0].error and kids[0].error.startswith("Verify Health")
        assert (await d.engine.store.quarantined())["fl-canary"].release == v2
        # no other host ever ran it: neither an instance nor a kept release of v2 there; the canary is on v1
        for host in ("sbx-2", "sbx-3"):
            states, kept = await on_host(d, host, "fl-canary")
            assert v2 not in states and v2 not in kept, (host, states, kept)
        assert await running(d, "fl-canary") == {h: [v1] for h in HOSTS}
        assert await registry_hosts(sandbox, "fl-canary") == [(h, v1) for h in HOSTS]

        # quarantined: the next reconcile starts nothing
        await d.reconcile()
        assert (await rollouts(d, "fl-canary"))[0].id == job.id

        # the older API's GET /deploy: a rollout names its hosts' jobs and waves, a host's job has the older shape
        body = (await d.http.get(f"/deploy/{job.id}")).json()
        assert body["children"] == job.children and body["waves"] == job.waves and body["status"] == "failed"
        assert f"rolled back to release {v1}, which serves again" in body["error"], body["error"]
        child = (await d.http.get(f"/deploy/{kids[0].id}")).json()
        assert "children" not in child and [p["phase"] for p in child["phases"]][0] == "Validation"

        # `deployerd status` shows every host's release
        config = tmp_path / "config.yaml"
        config.write_text(yaml.safe_dump(d.engine.settings.model_dump(mode="json", exclude_none=True)))
        code, out = await cli("status", "--config", str(config))
        assert code == 0, out
        lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  @")}
        assert sorted(lines) == [f"@{h}" for h in HOSTS], out
        assert all(v1 in line for line in lines.values()), out


async def under_load(sandbox: SandboxInfo, port: int, work: Awaitable[T]) -> tuple[T, list[LoadResult]]:
    """``work`` while 20 requests/s go to ``port`` on each of the 3 hosts (bounded to 300 s)."""
    stop = asyncio.Event()
    loads = [asyncio.create_task(run_load(h.internal_address, port, rate=20, seconds=300, stop=stop))
             for h in sandbox.hosts[:3]]
    await asyncio.sleep(0.5)
    try:
        result = await work
        await asyncio.sleep(0.5)
    finally:
        stop.set()
    return result, [await load for load in loads]


async def test_wave_2_failing_on_host_3_rolls_the_fleet_back_dropping_nothing(fleet_sandbox: SandboxInfo,
                                                                               tmp_path: Path) -> None:
    sandbox = fleet_sandbox
    sbx3 = sandbox.hosts[2]
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    hosts_yaml(repo, sandbox, ingress=True)
    systemd_fleet(repo, "fl-wave", 8812, "1", canary=1, batch=2)
    repo.commit("v1 on three hosts behind their proxies")
    marker = "/etc/deployerd-test-fleet-break-2"
    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        try:
            v1 = await deploy_v1(d, "fl-wave", "systemd")
            await in_host(sandbox, sbx3, "touch", marker)  # v2 fails its health check on sbx-3 only
            systemd_fleet(repo, "fl-wave", 8812, "2", canary=1, batch=2)
            repo.commit("v2")
            _, loads = await under_load(sandbox, 8812, d.reconcile())
        finally:
            await in_host(sandbox, sbx3, "rm", "-f", marker, check=False)
        job = (await rollouts(d, "fl-wave"))[0]
        v2 = job.release
        assert job.status is JobStatus.ROLLED_BACK, job.error
        kids = await children(d, job)
        forward, back = kids[:3], kids[3:]
        assert [(c.host, c.status) for c in forward] == [
            ("sbx-1", JobStatus.SUCCEEDED), ("sbx-2", JobStatus.SUCCEEDED), ("sbx-3", JobStatus.ROLLED_BACK)]
        assert sorted((c.host, c.release, c.status) for c in back) == [
            ("sbx-1", v1, JobStatus.SUCCEEDED), ("sbx-2", v1, JobStatus.SUCCEEDED)]
        assert (await d.engine.store.quarantined())["fl-wave"].release == v2
        assert await running(d, "fl-wave", "systemd") == {h: [v1] for h in HOSTS}
        for h in sandbox.hosts[:3]:  # each public port answers v1 again
            assert json.loads((await http_get(f"http://{h.internal_address}:8812/")).text)["version"] == "1"
        assert await registry_hosts(sandbox, "fl-wave") == [(h, v1) for h in HOSTS]
        # nothing dropped on any host, and hosts 1 and 2 did serve v2 for a while (the load saw both)
        for host, load in zip(HOSTS, loads, strict=True):
            assert load.failed == 0, (host, load.summary())
        assert [v2 in load.upstreams() for load in loads] == [True, True, False]
        assert [next(x.upstream for x in reversed(load.samples) if x.ok) for load in loads] == [v1, v1, v1]


async def test_a_host_unreachable_pauses_then_the_rollout_resumes(fleet_sandbox: SandboxInfo,
                                                                   tmp_path: Path) -> None:
    sandbox = fleet_sandbox
    sbx2 = sandbox.hosts[1]  # wave 1 of 2 (batch 1): the host the rollout goes to after the canary
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    hosts_yaml(repo, sandbox)
    docker_fleet(repo, "fl-pause", 8813, "1", {"hosts": HOSTS}, canary=1, batch=1, pause_s=6)
    repo.commit("v1")
    settings = settings_for(tmp_path, sandbox, repo, ssh_connect_timeout_s=5).model_copy(
        update={"resync_interval_s": 2.0})
    async with running_daemon(settings, loop=True) as d:
        v1 = (await until("v1 everywhere", lambda: _ended_rollout(d, "fl-pause"))).release
        assert await running(d, "fl-pause") == {h: [v1] for h in HOSTS}
        docker_fleet(repo, "fl-pause", 8813, "2", {"hosts": HOSTS}, canary=1, batch=1, pause_s=6)
        repo.commit("v2")
        try:
            rollout = await until("v2's canary switched", lambda: _canary_done(d, "fl-pause", v1))
            await ssh_down(sandbox, sbx2)
            paused = await until("the rollout paused", lambda: _ended_rollout(d, "fl-pause", rollout.id))
            assert paused.status is JobStatus.FAILED and paused.transient, paused.error
            assert paused.error and "rollout paused at wave 1: host sbx-2 unreachable" in paused.error
            assert [c.host for c in await children(d, paused)] == ["sbx-1", "sbx-2"]
            # the planner holds sbx-3 too (it needs the release while sbx-2 is down): /health says why
            h = await until("/health saying the rollout is paused", lambda: _paused_in_health(d))
            assert any("service fl-pause: rollout paused: host sbx-2 unreachable since" in line
                       for line in h["degraded"]), h["degraded"]
            states, _ = await on_host(d, "sbx-3", "fl-pause")
            assert list(states) == [v1]
            assert "fl-pause" not in await d.engine.store.quarantined()
        finally:
            await ssh_up(sandbox, sbx2)
        v2 = rollout.release
        await until("every host on v2", lambda: _all_on(d, "fl-pause", v2), timeout_s=300)
        resumed = await until("the rollout that resumed", lambda: _newest_if(d, "fl-pause", JobStatus.SUCCEEDED))
        assert resumed.id != rollout.id and resumed.release == v2
        assert sorted(c.host for c in await children(d, resumed)) == ["sbx-2", "sbx-3"]
        jobs = await d.jobs("fl-pause")
        assert not [j for j in jobs if j.status is JobStatus.ROLLED_BACK], "an outage must never roll back"
        assert "fl-pause" not in await d.engine.store.quarantined()
        assert await registry_hosts(sandbox, "fl-pause") == [(h, v2) for h in HOSTS]


async def _ended_rollout(d: Daemon, service: str, job_id: str | None = None) -> Job | None:
    for job in await rollouts(d, service):
        if (job_id is None or job.id == job_id) and job.status.finished:
            return job
    return None


async def _canary_done(d: Daemon, service: str, old: str) -> Job | None:
    for job in await rollouts(d, service):
        if job.release != old and job.children:
            first = await d.engine.store.job(job.children[0])
            if first is not None and first.status is JobStatus.SUCCEEDED:
                return job
    return None


async def _paused_in_health(d: Daemon) -> dict[str, Any] | None:
    body: dict[str, Any] = (await d.http.get("/health")).json()
    return body if any("rollout paused: host" in line for line in body["degraded"]) else None


async def _all_on(d: Daemon, service: str, release: str) -> bool:
    try:
        return await running(d, service) == {h: [release] for h in HOSTS}
    except Exception:  # a host still reconnecting
        return False


async def test_a_newer_commit_supersedes_the_rollout_in_its_pause(fleet_sandbox: SandboxInfo,
                                                                   tmp_path: Path) -> None:
    sandbox = fleet_sandbox
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    hosts_yaml(repo, sandbox)
    docker_fleet(repo, "fl-super", 8814, "1", {"hosts": HOSTS}, canary=1, batch=2)
    repo.commit("v1")
    async with running_daemon(settings_for(tmp_path, sandbox, repo), loop=True) as d:
        v1 = (await until("v1 everywhere", lambda: _ended_rollout(d, "fl-super"))).release
        assert await running(d, "fl-super") == {h: [v1] for h in HOSTS}
        # v2 waits 600 s after its canary: a newer commit must not wait for that (the test's bound is 120 s)
        docker_fleet(repo, "fl-super", 8814, "2", {"hosts": HOSTS}, canary=1, batch=2, pause_s=600)
        repo.commit("v2, a long pause after its canary")
        second = await until("v2 on the canary", lambda: _canary_done(d, "fl-super", v1))
        docker_fleet(repo, "fl-super", 8814, "3", {"hosts": HOSTS}, canary=1, batch=2)
        repo.commit("v3 during v2's pause")
        stopped = await until("v2's rollout superseded", lambda: _ended_rollout(d, "fl-super", second.id),
                              timeout_s=120)
        assert stopped.status is JobStatus.SUPERSEDED, stopped.error
        assert [c.host for c in await children(d, stopped)] == ["sbx-1"]
        # the newer release starts again from the canary and goes everywhere
        third = await until("v3 rolled out", lambda: _rollout_of(d, "fl-super", exclude={v1, second.release}))
        assert third.status is JobStatus.SUCCEEDED, third.error
        assert third.waves == [["sbx-1"], ["sbx-2", "sbx-3"]]
        assert await running(d, "fl-super") == {h: [third.release] for h in HOSTS}
        for host in ("sbx-2", "sbx-3"):  # they never ran v2
            states, kept = await on_host(d, host, "fl-super")
            assert second.release not in states and second.release not in kept, (host, states, kept)


async def _newest_if(d: Daemon, service: str, status: JobStatus) -> Job | None:
    """The service's newest rollout job, once it has ``status``."""
    jobs = await rollouts(d, service)
    return jobs[0] if jobs and jobs[0].status is status else None


async def _rollout_of(d: Daemon, service: str, exclude: set[str]) -> Job | None:
    for job in await rollouts(d, service):
        if job.release not in exclude and job.status.finished:
            return job
    return None


async def test_tags_a_move_to_hosts_and_a_host_removed(fleet_sandbox: SandboxInfo, tmp_path: Path) -> None:
    sandbox = fleet_sandbox
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    hosts_yaml(repo, sandbox, tags={"sbx-1": ["web"], "sbx-2": ["web"]})
    docker_fleet(repo, "fl-place", 8815, "1", {"host": "sbx-3"})
    repo.commit("one host")
    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        await d.reconcile()
        assert await running(d, "fl-place") == {"sbx-1": [], "sbx-2": [], "sbx-3": [(await d.last_job("fl-place"))
                                                                                  .release]}
        # host: sbx-3 -> hosts: {tag: web}: the new hosts are deployed first, sbx-3 serves until they do
        docker_fleet(repo, "fl-place", 8815, "1", {"hosts": {"tag": "web"}})
        repo.commit("move to the hosts tagged web")
        await d.reconcile()
        move = (await rollouts(d, "fl-place"))[0]
        assert move.status is JobStatus.SUCCEEDED, move.error
        assert sorted(c.host for c in await children(d, move)) == ["sbx-1", "sbx-2"]
        now = await running(d, "fl-place")
        assert now["sbx-1"] and now["sbx-2"] and now["sbx-3"], now  # the old host not pruned in the same pass
        await d.reconcile()  # now that the fleet serves: sbx-3 pruned
        now = await running(d, "fl-place")
        assert now["sbx-1"] == now["sbx-2"] and now["sbx-3"] == [], now
        assert [h for h, _ in await registry_hosts(sandbox, "fl-place")] == ["sbx-1", "sbx-2"]

        # sbx-3 tagged too: added (deployed first), then removed from an explicit list: pruned there only
        hosts_yaml(repo, sandbox, tags={h: ["web"] for h in HOSTS})
        repo.commit("sbx-3 tagged web")
        await d.reconcile()
        added = (await rollouts(d, "fl-place"))[0]
        assert added.id != move.id and [c.host for c in await children(d, added)] == ["sbx-3"], added.error
        assert all((await running(d, "fl-place")).values())
        docker_fleet(repo, "fl-place", 8815, "1", {"hosts": ["sbx-1", "sbx-3"]})
        repo.commit("sbx-2 removed from the list")
        actions = await d.reconcile()
        prunes = [a for a in actions if a.kind.value == "prune"]
        assert [(a.host, a.reasons) for a in prunes] == [("sbx-2", ["removed from the service's hosts"])]
        now = await running(d, "fl-place")
        assert now["sbx-2"] == [] and now["sbx-1"] and now["sbx-3"], now
        # the entry still names sbx-2: the next reconcile (the prune's end starts one) writes it again
        actions = await d.reconcile()
        assert [(a.kind.value, a.host) for a in actions if a.kind.value not in ("noop", "blocked")] == [
            ("register", "sbx-1")], actions
        assert [h for h, _ in await registry_hosts(sandbox, "fl-place")] == ["sbx-1", "sbx-3"]


async def test_sigkill_between_waves_the_restarted_daemon_finishes(fleet_sandbox: SandboxInfo,
                                                                    tmp_path: Path) -> None:
    """The daemon, a process of its own, is killed (SIGKILL) while it holds between the canary and wave 1 (the
    test-only failpoint ``Between Waves``); started again on the same state, it finishes the rollout: every
    host ends on one release, the same, and the killed rollout is recorded as interrupted."""
    sandbox = fleet_sandbox
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    hosts_yaml(repo, sandbox)
    docker_fleet(repo, "fl-crash", 8816, "1", {"hosts": HOSTS}, canary=1, batch=2)
    repo.commit("v1")
    settings = settings_for(tmp_path / "d", sandbox, repo)
    proc = DaemonProcess(settings, tmp_path / "work")
    try:
        await proc.start()
        v1 = await until("v1 everywhere", lambda: _api_rollout(proc, "fl-crash", JobStatus.SUCCEEDED))
        await proc.stop()
        docker_fleet(repo, "fl-crash", 8816, "2", {"hosts": HOSTS}, canary=1, batch=2)
        repo.commit("v2")
        await proc.start(failpoints="Between Waves")
        await until("the rollout held between its waves",
                    lambda: _true("failpoint Between Waves reached" in proc.tail(200)))
        held = await _api_rollout(proc, "fl-crash", JobStatus.RUNNING, exclude=v1["release"])
        assert held is not None and len(held["children"]) == 1, held
        await proc.kill()
        await proc.start()
        done = await until("v2 rolled out after the restart",
                           lambda: _api_rollout(proc, "fl-crash", JobStatus.SUCCEEDED, exclude=v1["release"]))
        assert done["release"] == held["release"]
        history = (await proc.get("/services/fl-crash/history?limit=50"))["jobs"]
        assert next(j for j in history if j["id"] == held["id"])["status"] == "interrupted"
        await proc.stop()
    finally:
        await proc.close()
    async with running_daemon(settings) as d:  # looks at the hosts once (no reconcile), then removes it all
        await d.engine.preview()
        assert await running(d, "fl-crash") == {h: [held["release"]] for h in HOSTS}


async def _true(value: bool) -> bool:
    return value


async def _api_rollout(proc: DaemonProcess, service: str, status: JobStatus,
                       exclude: str | None = None) -> dict[str, Any] | None:
    """The service's newest rollout job with ``status`` (not of release ``exclude``), through the API."""
    try:
        jobs = (await proc.get(f"/services/{service}/history?limit=50"))["jobs"]
    except Exception:  # not known yet
        return None
    for job in jobs:
        if job["kind"] == "rollout" and job["release"] != exclude:
            return job if job["status"] == status.value else None
    return None
