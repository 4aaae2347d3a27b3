"""Zero downtime behind the host's ingress proxy, systemd: one unit per release on a private port of 127.0.0.1,
started beside the serving one, proven there, switched to through the proxy, the old one drained, stopped and
kept. A change, a failed release, a release that exits at start (both rolled back), a git revert to a kept
release, each under a bounded load of 50 requests/s through the public port: no request may fail. Then the
same switch restores an instance stopped or removed by hand, and a host upgraded from the single-unit layout
keeps serving until its next change moves it behind the proxy.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon_harness import Daemon, DesiredRepo, git, settings_for
from load_gen import run_load
from test_ingress import under_load, with_ingress
from test_systemd import APP, systemd_daemon

from deployerd.ingress import PRIVATE_PORTS
from deployerd.plan import ActionKind
from deployerd.runtimes.base import ReleaseContext
from deployerd.runtimes.systemd import UNIT_DIR, unit_name
from deployerd.sandbox import SandboxInfo
from deployerd.store import JobStatus

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

PORT = 8341

def service(repo: DesiredRepo, name: str, port: int, version: str, mode: str = "ok", host: str = "sbx-1") -> None:
    """test_systemd's stdlib service; ``mode``: ok, broken (its health check fails) or exit (at start)."""
    manifest = {"name": name, "host": host, "method": "systemd", "port": port, "source": f"services/{name}",
                "health": {"path": "/health", "timeout_s": 8, "interval_s": 0.5}, "drain_timeout_s": 5,
                "systemd": {"command": "python3 app.py --host {host} --port {port}"}}
    repo.write(f"services/{name}.yaml", yaml.safe_dump(manifest))
    repo.write(f"services/{name}/app.py", APP.format(version=version, mode="crash" if mode == "exit" else mode))


async def sh(d: Daemon, *argv: str) -> str:
    conn = (await d.engine.hosts.handle(d.engine.desired.hosts["sbx-1"])).conn
    return (await conn.run(list(argv), check=False)).stdout.strip()


async def units(d: Daemon, name: str) -> dict[str, str]:
    """The service's unit files on the host -> their ActiveState."""
    q = f"{d.engine.settings.instance}-{name}"
    found = (await sh(d, "find", UNIT_DIR, "-maxdepth", "1", "-name", f"deployerd-{q}[@.]*")).split()
    names = sorted(f.rsplit("/", 1)[-1] for f in found)
    return {u: await sh(d, "systemctl", "show", "--value", "--property=ActiveState", u) for u in names}


def release_unit(d: Daemon, name: str, release: str) -> str:
    return unit_name(f"{d.engine.settings.instance}-{name}", release)


async def main_pid(d: Daemon, unit: str) -> str:
    return await sh(d, "systemctl", "show", "--value", "--property=MainPID", unit)


async def test_change_failures_and_revert_drop_no_request(sandbox: SandboxInfo, tmp_path: Path) -> None:
    name = "zs-web"
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    with_ingress(repo, sandbox)
    service(repo, name, PORT, "1")
    repo.commit("v1")
    async with systemd_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        await d.reconcile()
        first = await d.last_job(name)
        assert first.status is JobStatus.SUCCEEDED, (first.error, first.logs)
        r1 = first.release
        private = first.phase("Start Service").details["private_port"]
        assert private in PRIVATE_PORTS
        assert first.phase("Start Service").details["unit"] == release_unit(d, name, r1)
        listening = await sh(d, "ss", "-Hltn", f"sport = :{private}")
        assert f"127.0.0.1:{private}" in listening, listening  # {host} behind the proxy: loopback only
        assert (await run_load(sandbox.hosts[0].internal_address, PORT, seconds=0.3)).upstreams() == [r1]

        service(repo, name, PORT, "2")
        v2 = repo.commit("v2")
        change = await under_load(sandbox, d.reconcile(), PORT)
        job = await d.last_job(name)
        assert job.status is JobStatus.SUCCEEDED, (job.error, job.logs)
        r2 = job.release
        assert change.failed == 0, change.summary()
        assert change.upstreams() == [r1, r2]
        switch = job.phase("Verify Health").details["switch"]
        assert (switch["upstream_before"], switch["upstream_after"], switch["front_door"]) == (r1, r2, r2)
        assert switch["stopped"] == [release_unit(d, name, r1)]
        assert await units(d, name) == {release_unit(d, name, r1): "inactive", release_unit(d, name, r2): "active"}
        serving_pid = await main_pid(d, release_unit(d, name, r2))

        for mode in ("broken", "exit"):  # unhealthy on its private port / exits at start: both rolled back
            service(repo, name, PORT, "3", mode=mode)
            repo.commit(f"v3 {mode}")
            failed = await under_load(sandbox, d.reconcile(), PORT)
            bad = await d.last_job(name)
            assert bad.status is JobStatus.ROLLED_BACK, (mode, bad.error)
            assert failed.failed == 0, (mode, failed.summary())
            assert failed.upstreams() == [r2], mode  # the failed release never received a request
            assert await main_pid(d, release_unit(d, name, r2)) == serving_pid, f"{mode}: the old one was stopped"
            assert await units(d, name) == {release_unit(d, name, r1): "inactive",
                                            release_unit(d, name, r2): "active"}, mode
            git(repo.path, "revert", "--no-edit", "HEAD")

        git(repo.path, "revert", "--no-edit", v2)  # back to v1: a kept release, no rebuild
        revert = await under_load(sandbox, d.reconcile(), PORT)
        back = await d.last_job(name)
        assert back.status is JobStatus.SUCCEEDED, (back.error, back.logs)
        assert back.release == r1
        assert back.phase("Build").status.value == "skipped"
        assert revert.failed == 0, revert.summary()
        assert revert.upstreams() == [r2, r1]
        assert await units(d, name) == {release_unit(d, name, r1): "active", release_unit(d, name, r2): "inactive"}
        assert await sh(d, "systemctl", "is-enabled", release_unit(d, name, r1)) == "enabled"  # at boot: r1

        # RESTORE: the desired release quarantined, the last good one stopped by hand: the same switch
        service(repo, name, PORT, "4", mode="broken")
        repo.commit("v4 broken")
        await d.reconcile()
        assert (await d.last_job(name)).status is JobStatus.ROLLED_BACK
        await sh(d, "systemctl", "stop", release_unit(d, name, r1))
        actions = await d.reconcile()
        assert [(a.kind, a.release) for a in actions if a.service == name] == [(ActionKind.RESTORE, r1)]
        restored = await d.last_job(name)
        assert restored.status is JobStatus.SUCCEEDED, (restored.error, restored.logs)
        assert restored.phase("Verify Health").details["switch"]["front_door"] == r1
        assert (await run_load(sandbox.hosts[0].internal_address, PORT, seconds=0.3)).upstreams() == [r1]

        # removed by hand (stopped, its unit file deleted): deployed again from the kept release, through the switch
        git(repo.path, "revert", "--no-edit", "HEAD")
        await d.reconcile()
        assert (await d.last_job(name)).release == r1
        await sh(d, "systemctl", "disable", "--now", release_unit(d, name, r1))
        await sh(d, "rm", "-f", f"{UNIT_DIR}/{release_unit(d, name, r1)}")
        await sh(d, "systemctl", "daemon-reload")
        await d.reconcile()
        again = await d.last_job(name)
        assert again.status is JobStatus.SUCCEEDED and again.release == r1, (again.error, again.logs)
        assert again.phase("Build").status.value == "skipped"
        assert again.phase("Verify Health").details["switch"]["front_door"] == r1
        assert (await units(d, name))[release_unit(d, name, r1)] == "active"
        assert (await run_load(sandbox.hosts[0].internal_address, PORT, seconds=0.3)).upstreams() == [r1]


async def test_a_host_from_the_single_unit_layout_keeps_serving_then_moves_behind_the_proxy(
        sandbox: SandboxInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before this release of deployerd, a systemd service on an ``ingress: haproxy`` host ran stop-first in
    its one unit on the public port. Upgraded, deployerd leaves it serving as it is (same release, nothing to
    do); its next change starts the release's own unit beside it, then stops the old unit (the proxy needs its
    port), binds the port and switches; when the proxy cannot take the port, the old unit serves again. Prune
    then removes every unit of the service and nothing else."""
    name, port = "zs-old", PORT + 5
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    with_ingress(repo, sandbox)
    service(repo, name, port, "1")
    repo.commit("v1")
    async with systemd_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        legacy = unit_name(f"{d.engine.settings.instance}-{name}")
        with monkeypatch.context() as old_code:  # what the earlier deployerd did with systemd on such a host
            old_code.setattr(ReleaseContext, "behind_ingress", property(lambda self: self.spec.method != "systemd"))
            await d.reconcile()
        first = await d.last_job(name)
        assert first.status is JobStatus.SUCCEEDED, (first.error, first.logs)
        assert await units(d, name) == {legacy: "active"}
        address = sandbox.hosts[0].internal_address
        assert (await run_load(address, port, seconds=0.3)).failed == 0

        actions = await d.reconcile()  # the upgraded daemon: nothing to do, the old unit keeps serving
        assert [a.kind for a in actions if a.service == name] == [ActionKind.NOOP]
        assert await units(d, name) == {legacy: "active"}

        service(repo, name, port, "2")
        repo.commit("v2")
        # the proxy cannot take the port (its binary refuses to run): the old unit is started again
        await sh(d, "chmod", "0644", "/usr/sbin/haproxy")
        try:
            await d.reconcile()
        finally:
            await sh(d, "chmod", "0755", "/usr/sbin/haproxy")
        refused = await d.last_job(name)
        assert refused.status is JobStatus.FAILED and refused.transient, (refused.status, refused.error)
        assert "host sbx-1: ingress proxy" in (refused.error or ""), refused.error
        assert (await units(d, name))[legacy] == "active"
        for _ in range(20):  # bounded: the old unit's process binds the port again
            if (await run_load(address, port, seconds=0.1)).failed == 0:
                break
            await asyncio.sleep(0.25)
        assert (await run_load(address, port, seconds=0.3)).failed == 0

        async def until_moved() -> None:  # the failed attempt backs off (transient): bounded retries
            for _ in range(40):
                await d.reconcile()
                if (await d.last_job(name)).status is JobStatus.SUCCEEDED:
                    return
                await asyncio.sleep(0.5)

        moved = await under_load(sandbox, until_moved(), port)
        job = await d.last_job(name)
        assert job.status is JobStatus.SUCCEEDED, (job.error, job.logs)
        switch: dict[str, Any] = job.phase("Verify Health").details["switch"]
        assert switch["stopped_unproxied"] == [legacy]
        assert await units(d, name) == {release_unit(d, name, job.release): "active"}
        assert moved.upstreams()[-1] == job.release
        print(f"\nmoving behind the proxy: {moved.summary()}")  # the one gap of a migration: the port changes hands

        repo.remove(f"services/{name}.yaml")
        repo.remove(f"services/{name}")
        service(repo, "zs-keep", port + 1, "1")  # a commit that removes every service prunes nothing
        repo.commit("remove zs-old")
        await d.reconcile()
        assert await units(d, name) == {}
        assert not (await sh(d, "ls", "-d", f"/opt/fpai/services/{d.engine.settings.instance}-{name}"))


async def test_a_host_that_drops_its_proxy_runs_the_services_one_unit_on_the_public_port(
        sandbox: SandboxInfo, tmp_path: Path) -> None:
    """``ingress: haproxy`` -> ``none``: the route goes before the stop-first start, the service's one unit
    binds the public port, and the per-release unit that served behind the proxy stops (kept, not enabled)."""
    name, port = "zs-drop", PORT + 8
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    with_ingress(repo, sandbox)
    service(repo, name, port, "1")
    repo.commit("v1 behind the proxy")
    async with systemd_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        await d.reconcile()
        proxied = await d.last_job(name)
        assert proxied.status is JobStatus.SUCCEEDED, (proxied.error, proxied.logs)
        behind = release_unit(d, name, proxied.release)
        assert await units(d, name) == {behind: "active"}
        with_ingress(repo, sandbox, "none")
        repo.commit("the host drops its proxy")
        await d.reconcile()
        job = await d.last_job(name)
        assert job.status is JobStatus.SUCCEEDED, (job.error, job.logs)
        start = job.phase("Start Service").details
        q = f"{d.engine.settings.instance}-{name}"
        assert start["left_proxy"]["route_removed"] == q, start
        assert start["stopped"] == [behind], start
        assert await units(d, name) == {unit_name(q): "active", behind: "inactive"}
        assert await sh(d, "systemctl", "is-enabled", behind) == "disabled"
        served = await run_load(sandbox.hosts[0].internal_address, port, seconds=0.3)
        assert served.samples and served.failed == 0, served.summary()
        assert served.upstreams() == [""], served.summary()  # the unit answers itself: no proxy names it
