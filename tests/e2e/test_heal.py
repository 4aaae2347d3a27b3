"""Manual drift healed from the hosts' own events, end to end: the real daemon loop, real Docker engines and
systemd on sandbox hosts over OpenSSH, the real Registry.

The resync and the git poll are an hour apart here (the harness's settings), so only a host's event can heal
within the bounded waits: each heal job must say trigger ``heal``. A deploy's own stop of the old release, and a
prune, must not start one; a release that keeps dying after heals is healed with backoff, and says so.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import yaml
from daemon_harness import Daemon, DesiredRepo, containers_of, http_get, running_daemon, settings_for
from test_systemd import systemd_service, unit

from deployerd.sandbox import SandboxInfo
from deployerd.store import Job, JobStatus

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]



async def until(what: str, check: Callable[[], object], limit_s: float = 90) -> None:
    """Wait (bounded) until ``check()`` (sync or async) is truthy."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"not within {limit_s:g} s: {what}")


async def settled(d: Daemon, service: str, methods: set[str], host: str = "sbx-1") -> None:
    """The loop deployed ``service``, its job's reconcile ran, and the host's watchers listen."""
    async def deployed() -> bool:
        jobs = await d.jobs(service)
        return bool(jobs) and jobs[0].status is JobStatus.SUCCEEDED and not d.engine.queue.in_flight
    await until(f"{service} deployed", deployed, 180)
    await until("the reconcile after its job", lambda: d.engine.last_reconcile is not None
                and any(t.startswith("job ") for t in d.engine.last_reconcile.trigger))
    await until(f"watchers of {host} listening", lambda: {(host, m) for m in methods} <= d.engine.watchers.listening)


async def heal_jobs(d: Daemon, service: str) -> list[Job]:
    return [j for j in await d.jobs(service) if j.trigger == "heal"]


async def serves(url: str, text: str) -> bool:
    try:
        return text in (await http_get(url)).text
    except Exception:
        return False


def url(sandbox: SandboxInfo, port: int, path: str = "/") -> str:
    return f"http://{sandbox.hosts[0].internal_address}:{port}{path}"


async def sh(d: Daemon, *argv: str) -> str:
    handle = await d.engine.hosts.handle(d.engine.desired.hosts["sbx-1"])
    return (await handle.conn.run(list(argv))).stdout.strip()


async def test_container_removed_or_stopped_by_hand_is_healed_from_its_event(
        sandbox: SandboxInfo, tmp_path: Path) -> None:
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("ev-web", 8171)
    repo.commit("v1")
    settings = settings_for(tmp_path, sandbox, repo)  # resync and poll: an hour apart
    async with running_daemon(settings, loop=True) as d:
        await settled(d, "ev-web", {"docker"})
        host = d.engine.desired.hosts["sbx-1"]
        assert "docker" in (await d.http.get("/health")).json()["hosts"]["sbx-1"]["events"]

        # removed by hand
        [c] = await containers_of(d, host, "ev-web")
        await sh(d, "docker", "rm", "-f", c["Id"])
        await until("a heal job succeeded", lambda: _succeeded(d, "ev-web", 1))
        [healed] = await heal_jobs(d, "ev-web")
        assert any("was removed" in r for r in healed.reasons), healed.reasons
        assert "not deployed on sbx-1" in " ".join(healed.reasons), healed.reasons
        assert await serves(url(sandbox, 8171), "ev-web v1")

        # stopped by hand: its kept container started again
        await until("the reconcile after the heal", lambda: not d.engine.queue.in_flight)
        [c] = [c for c in await containers_of(d, host, "ev-web") if c["State"] == "running"]
        await sh(d, "docker", "stop", c["Id"])
        await until("a second heal job succeeded", lambda: _succeeded(d, "ev-web", 2))
        second = (await heal_jobs(d, "ev-web"))[0]
        assert "not running (" in " ".join(second.reasons), second.reasons
        assert await serves(url(sandbox, 8171), "ev-web v1")
        assert d.engine.last_reconcile is not None and "resync" not in d.engine.last_reconcile.trigger


async def _succeeded(d: Daemon, service: str, n: int) -> bool:
    jobs = await heal_jobs(d, service)
    return len(jobs) >= n and all(j.status is JobStatus.SUCCEEDED for j in jobs[:1]) \
        and not d.engine.queue.busy(service)


async def test_a_deploys_own_stop_a_switch_and_a_prune_start_no_heal(sandbox: SandboxInfo, tmp_path: Path) -> None:
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    hosts = {h.name: {"address": h.address, "ssh_port": h.ssh_port, "user": h.user,
                      "public_address": h.internal_address, **({"ingress": "haproxy"} if h.name == "sbx-2" else {})}
             for h in sandbox.hosts}
    repo.write("hosts.yaml", yaml.safe_dump({"hosts": hosts}))
    repo.service("own-web", 8172)  # sbx-1: stop-first
    repo.service("own-gone", 8173)  # sbx-1: pruned below
    repo.service("own-sw", 8175, host="sbx-2")  # behind sbx-2's proxy: start beside, switch, drain, stop the old
    repo.commit("v1")
    settings = settings_for(tmp_path, sandbox, repo)  # resync and poll: an hour apart
    async with running_daemon(settings, loop=True) as d:
        await settled(d, "own-web", {"docker"})
        await until("all deployed", lambda: {"own-gone", "own-sw"} <= set(d.engine.services)
                    and not d.engine.queue.in_flight, 180)
        await until("sbx-2 watched", lambda: ("sbx-2", "docker") in d.engine.watchers.listening)
        healer = d.engine.healer
        before = len(healer.recent)

        repo.service("own-web", 8172, version="2")
        repo.service("own-sw", 8175, host="sbx-2", version="2")
        repo.remove("services/own-gone.yaml")
        repo.remove("services/own-gone")
        repo.commit("v2, and own-gone removed")
        d.engine.kick.set("test commit")
        sbx2 = f"http://{sandbox.hosts[1].internal_address}:8175/"
        await until("v2 serves", lambda: _all(serves(url(sandbox, 8172), "own-web v2"), serves(sbx2, "own-sw v2")),
                    180)
        await until("own-gone pruned", lambda: "own-gone" not in d.engine.services and not d.engine.queue.in_flight,
                    120)
        # the engines reported the old containers' stops and own-gone's removal: those events did arrive ...
        ours = {"own-web", "own-gone", "own-sw"}
        await until("the deploys', the switch's and the prune's events seen",
                    lambda: ours <= {e[1] for e in list(healer.recent)[before:]})
        await until("their looks done", lambda: not healer._looking and not d.engine.queue.in_flight)
        # ... and started no heal: ignored while the job ran, or nothing to heal when looked at after it
        for service in ours:
            assert await heal_jobs(d, service) == [], service
        assert healer.heals == 0, list(healer.recent)
        outcomes = {e[3] for e in list(healer.recent)[before:] if e[1] in ours}
        assert outcomes <= {"ignored: a job of ours is in flight", "looked again: nothing to heal"}, outcomes


async def _all(*checks: Awaitable[bool]) -> bool:
    return all(await asyncio.gather(*checks))


async def test_unit_stopped_by_hand_is_healed_from_systemds_signal(sandbox: SandboxInfo, tmp_path: Path) -> None:
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    systemd_service(repo, "ev-unit", 8371)
    repo.commit("v1")
    settings = settings_for(tmp_path, sandbox, repo)  # resync and poll: an hour apart
    async with running_daemon(settings, loop=True) as d:
        await settled(d, "ev-unit", {"systemd"})
        await sh(d, "systemctl", "stop", unit(d, "ev-unit"))
        await until("a heal job succeeded", lambda: _succeeded(d, "ev-unit", 1))
        [healed] = await heal_jobs(d, "ev-unit")
        assert "not running (stopped)" in " ".join(healed.reasons), healed.reasons
        assert any("changed state" in r for r in healed.reasons), healed.reasons
        assert await sh(d, "systemctl", "is-active", unit(d, "ev-unit")) == "active"
        # a host with systemd services only: its Docker is not even asked, nor watched
        assert ("sbx-1", "docker") not in d.engine.watchers.listening

        # the connection lost (its helper on the host exits with it): the watcher opens its stream again
        await until("the last heal's reconcile", lambda: not d.engine.queue.in_flight)
        key = ("sbx-1", "systemd")
        opened = d.engine.watchers.opened[key]
        await d.engine.hosts.pool.drop("sbx-1")
        await until("the watch open again", lambda: d.engine.watchers.opened[key] > opened
                    and key in d.engine.watchers.listening)
        await sh(d, "systemctl", "stop", unit(d, "ev-unit"))
        await until("a heal after the reconnect", lambda: _succeeded(d, "ev-unit", 2))
        assert await sh(d, "systemctl", "is-active", unit(d, "ev-unit")) == "active"


FLAPPY = """FROM busybox:latest
COPY www /www
CMD ["sh", "-c", "timeout 8 busybox httpd -f -p {port} -h /www; exit 3"]
"""


async def test_a_release_that_keeps_dying_is_healed_with_backoff(sandbox: SandboxInfo, tmp_path: Path) -> None:
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    # serves 8 s, then exits 3; Docker itself does not restart it
    repo.service("flappy", 8174, dockerfile=FLAPPY.format(port=8174), docker={"restart": "no"})
    repo.commit("v1")
    settings = settings_for(tmp_path, sandbox, repo)  # resync and poll: an hour apart
    async with running_daemon(settings, loop=True) as d:
        await settled(d, "flappy", {"docker"})
        # heals 1 and 2 at once; from the third on, each waits a doubling backoff (10 s, 20 s, ...), which shows
        # once the wait is longer than the release lives
        try:
            await until("a heal held back by the flap guard", lambda: _waited(d, "flappy"), 150)
        except AssertionError as e:
            jobs = [(j.trigger, j.status.value, j.reasons, j.error) for j in await d.jobs("flappy")]
            raise AssertionError(f"{e}\njobs: {jobs}\nevents: {list(d.engine.healer.recent)}") from None
        jobs = await heal_jobs(d, "flappy")
        assert len(jobs) >= 3
        assert not any(r.startswith("flap guard") for j in jobs[-2:] for r in j.reasons), [j.reasons for j in jobs]
        flap = d.engine.healer.flaps["flappy"]
        assert flap.heals >= 3 and flap.backoff.failures >= 2
        # shown where users look: the service's status and /services
        await until("status says flapping", lambda: (d.engine.services.get("flappy") is not None
                                                     and (d.engine.services["flappy"].healing or "")
                                                     .startswith("flapping: healed")))
        body = (await d.http.get("/services/flappy")).json()
        assert body["healing"].startswith("flapping") and any(r.startswith("flapping") for r in body["reasons"])


async def _waited(d: Daemon, service: str) -> bool:
    return any(r.startswith("flap guard: waited") for j in await heal_jobs(d, service) for r in j.reasons)
