"""Faults around a real 3-node sandbox Swarm (`sandbox up --hosts 3 --swarm`), each breaking one real part with
the daemon's own loop running: the manager's sshd stopped (an outage: nothing rolled back or pruned, /health
names it, Docker and systemd services on the plain hosts beside the Swarm keep reconciling from the same
repository), the cluster's image registry stopped (a push that fails is transient: retried, never quarantined,
the cluster keeps running what it ran), a worker's engine stopped during an update (never reported as a
success; converged once it is back).

The cluster is read through the sandbox's own engine (``docker exec`` into the manager), never through
deployerd nor over the SSH a test cuts. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import registry_client, running_daemon
from test_outages import (
    daemon_settings,
    deploy_all,
    docker_down,
    docker_up,
    finished_job,
    health,
    in_host,
    job_ids,
    no_harm,
    serves,
    ssh_down,
    ssh_up,
    until,
    web_url,
)
from test_swarm import swarm_repo, swarm_service
from test_systemd import systemd_service

from deployerd.sandbox import SandboxInfo
from deployerd.store import JobStatus

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]


async def cluster_service(sandbox: SandboxInfo, name: str) -> dict[str, Any] | None:
    """`docker service inspect` on the manager, through the sandbox's engine (no SSH)."""
    done = await in_host(sandbox, sandbox.hosts[0], "docker", "service", "inspect", name, check=False)
    found = json.loads(done.out) if done.out.strip() else []
    return found[0] if found else None


async def cluster_release(sandbox: SandboxInfo, name: str) -> str | None:
    svc = await cluster_service(sandbox, name)
    return svc["Spec"]["Labels"]["deployerd.release"] if svc else None


async def task_nodes(sandbox: SandboxInfo, name: str) -> list[str]:
    """The node names of the service's tasks meant to run that are running."""
    done = await in_host(sandbox, sandbox.hosts[0], "docker", "service", "ps", name, "--filter",
                         "desired-state=running", "--format", "{{json .}}")
    rows = [json.loads(line) for line in done.out.splitlines() if line.strip()]
    return sorted(r["Node"] for r in rows if r["CurrentState"].startswith("Running"))


async def serves_everywhere(sandbox: SandboxInfo, name: str, port: int, text: str) -> bool:
    """Every running task of ``name`` answers ``text`` on its node's published port."""
    nodes = await task_nodes(sandbox, name)
    hosts = {h.name: h for h in sandbox.hosts}
    return bool(nodes) and all([await serves(web_url(hosts[n], port), text) for n in nodes])


async def test_manager_ssh_down_is_an_outage_and_plain_hosts_keep_going(swarm_sandbox: SandboxInfo,
                                                                        tmp_path: Path) -> None:
    sandbox = swarm_sandbox
    manager, docker_host, systemd_host = sandbox.hosts
    repo = swarm_repo(tmp_path / "repo", sandbox)
    swarm_service(repo, "sf-keep", 8721)
    swarm_service(repo, "sf-gone", 8722, replicas=1)
    repo.service("sf-plain", 8723, host=docker_host.name)
    systemd_service(repo, "sf-unit", 8724, host=systemd_host.name)
    repo.commit("two swarm services; a Docker and a systemd service on the workers as plain hosts")
    async with running_daemon(daemon_settings(tmp_path, sandbox, repo, ssh_connect_timeout_s=5), loop=True) as d:
        prefix = f"{d.engine.settings.instance}-"
        names = ["sf-keep", "sf-gone", "sf-plain", "sf-unit"]
        await deploy_all(d, names)
        keep_v1 = (await d.last_job("sf-keep")).release
        before = await job_ids(d, *names)
        try:
            await ssh_down(sandbox, manager)
            swarm_service(repo, "sf-keep", 8721, version="2")
            repo.remove("services/sf-gone.yaml")
            repo.remove("services/sf-gone")
            repo.service("sf-plain", 8723, host=docker_host.name, version="2")
            systemd_service(repo, "sf-unit", 8724, host=systemd_host.name, version="2")
            repo.commit("change each, delete a swarm service, while the manager's sshd is down")

            # the plain hosts beside the Swarm keep reconciling from the same repository
            for name, host, port in (("sf-plain", docker_host, 8723), ("sf-unit", systemd_host, 8724)):
                job = await until(f"{name} v2 during the outage", lambda n=name: finished_job(d, n, before))
                assert job.status is JobStatus.SUCCEEDED, (name, job.error)
                assert await serves(web_url(host, port), "sf-plain v2" if name == "sf-plain" else '"version": "2"')

            # /health names the manager; its cluster's services are unknown, not redeployed, rolled back or pruned
            h = await until("/health naming the manager",
                            lambda: _degraded_with(d, f"host {manager.name}"))
            assert h["hosts"][manager.name]["reachable"] is False
            for name in ("sf-keep", "sf-gone"):
                row = d.engine.services[name]
                assert row.sync_status == "Unknown", row
                assert any("unreachable" in r for r in row.reasons), row.reasons
            await no_harm(d, ["sf-keep", "sf-gone"], before)
            assert not (await job_ids(d, "sf-keep", "sf-gone")) - before, "a job ran on a cluster that is unreachable"
            async with registry_client(sandbox) as reg:
                assert await reg.get_by_name("sf-gone") is not None, "sf-gone deregistered during the outage"
            assert await cluster_service(sandbox, prefix + "sf-gone") is not None, "sf-gone removed during the outage"
            assert await cluster_release(sandbox, prefix + "sf-keep") == keep_v1
            assert await serves_everywhere(sandbox, prefix + "sf-keep", 8721, "sf-keep v1")  # Swarm keeps serving
        finally:
            await ssh_up(sandbox, manager)
        keep = await until("sf-keep v2 after SSH is back",
                           lambda: finished_job(d, "sf-keep", before, JobStatus.SUCCEEDED), step=0.5)
        gone = await until("sf-gone pruned after SSH is back",
                           lambda: finished_job(d, "sf-gone", before, JobStatus.SUCCEEDED), step=0.5)
        assert (keep.kind, gone.kind) == ("deploy", "prune")
        assert await serves_everywhere(sandbox, prefix + "sf-keep", 8721, "sf-keep v2")
        assert await cluster_service(sandbox, prefix + "sf-gone") is None
        async with registry_client(sandbox) as reg:
            assert await reg.get_by_name("sf-gone") is None


async def _degraded_with(d: Any, text: str) -> dict[str, Any] | None:
    h = await health(d)
    return h if any(text in line for line in h["degraded"]) else None


async def test_image_registry_down_is_transient(swarm_sandbox: SandboxInfo, tmp_path: Path) -> None:
    """The push of a new image fails while the cluster's registry is stopped: the job fails as transient, nothing
    is rolled back or quarantined and the cluster keeps its release; once the registry is back it deploys."""
    sandbox = swarm_sandbox
    manager = sandbox.hosts[0]
    repo = swarm_repo(tmp_path / "repo", sandbox)
    swarm_service(repo, "sf-reg", 8725)
    repo.commit("v1")
    async with running_daemon(daemon_settings(tmp_path, sandbox, repo), loop=False) as d:
        name = f"{d.engine.settings.instance}-sf-reg"
        await d.reconcile()
        good = await d.last_job("sf-reg")
        assert good.status is JobStatus.SUCCEEDED, good.error
        swarm_service(repo, "sf-reg", 8725, version="2")
        repo.commit("v2")
        try:
            await in_host(sandbox, manager, "systemctl", "stop", "docker-registry.service")
            await d.reconcile()
            cut = await d.last_job("sf-reg")
            assert (cut.status, cut.transient) == (JobStatus.FAILED, True), (cut.status, cut.error)
            assert "image registry" in (cut.error or "") and "not answering" in (cut.error or ""), cut.error
            assert cut.rollback is None and cut.phase("Start Service").status.value == "failed"
            assert "sf-reg" not in await d.engine.store.quarantined()
            assert await cluster_release(sandbox, name) == good.release  # nothing changed on the cluster
            assert await serves_everywhere(sandbox, name, 8725, "sf-reg v1")
        finally:
            await in_host(sandbox, manager, "systemctl", "start", "docker-registry.service")
        await until("the registry answering", lambda: _registry_answers(sandbox))
        await d.reconcile(force=set())  # now, not after the failure's backoff
        job = await d.last_job("sf-reg")
        assert job.status is JobStatus.SUCCEEDED and job.id != cut.id, job.error
        assert await serves_everywhere(sandbox, name, 8725, "sf-reg v2")


async def _registry_answers(sandbox: SandboxInfo) -> bool:
    done = await in_host(sandbox, sandbox.hosts[0], "curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:5000/v2/",
                         check=False)
    return done.rc == 0


async def tasks_of(sandbox: SandboxInfo, name: str) -> list[dict[str, str]]:
    done = await in_host(sandbox, sandbox.hosts[0], "docker", "service", "ps", name, "--filter",
                         "desired-state=running", "--format", "{{json .}}")
    return [json.loads(line) for line in done.out.splitlines() if line.strip()]


async def node_state(sandbox: SandboxInfo, node: str) -> str:
    done = await in_host(sandbox, sandbox.hosts[0], "docker", "node", "inspect", node, "--format",
                         "{{.Status.State}}")
    return done.out.strip()


async def test_worker_stopped_during_an_update(swarm_sandbox: SandboxInfo, tmp_path: Path) -> None:
    """Two replicas on the two workers (stop-first: each worker's port is taken by its task); once the first
    task runs the new release, the other worker's engine stops. The update cannot finish (its task has no node
    to go to): the job waits in Start Service and never reports success while a task runs the old release or
    none. The worker comes back: Swarm finishes, and the job succeeds with every task on the new release,
    verified on each node."""
    sandbox = swarm_sandbox
    hosts = {h.name: h for h in sandbox.hosts}
    repo = swarm_repo(tmp_path / "repo", sandbox)
    rollout = {"monitor_s": 2, "order": "stop-first", "delay_s": 5}
    swarm_service(repo, "sf-worker", 8726, placement={"constraints": ["node.role==worker"]}, rollout=rollout)
    repo.commit("v1 on the workers")
    async with running_daemon(daemon_settings(tmp_path, sandbox, repo), loop=False) as d:
        name = f"{d.engine.settings.instance}-sf-worker"
        await d.reconcile()
        good = await d.last_job("sf-worker")
        assert good.status is JobStatus.SUCCEEDED, good.error
        assert await task_nodes(sandbox, name) == ["sbx-2", "sbx-3"]
        old_image = (await cluster_service(sandbox, name) or {})["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
        swarm_service(repo, "sf-worker", 8726, version="2", placement={"constraints": ["node.role==worker"]},
                      rollout=rollout)
        repo.commit("v2")
        reconcile = asyncio.create_task(d.reconcile())
        stopped = None
        try:
            first = await until("a task of v2 running", lambda: _new_task_node(sandbox, name, old_image), step=0.2)
            stopped = hosts["sbx-3" if first == "sbx-2" else "sbx-2"]
            await docker_down(sandbox, stopped)
            await until(f"{stopped.name} seen down by the manager",
                        lambda: _is(node_state(sandbox, stopped.name), "down"), timeout_s=120)
            await asyncio.sleep(3)  # a few of the job's polls with the node down
            job = await d.last_job("sf-worker")
            assert not reconcile.done() and job.status is JobStatus.RUNNING, (job.status, job.error)
            assert job.phase("Start Service").status.value == "running"
        finally:
            if stopped is not None:
                await docker_up(sandbox, stopped)
        await asyncio.wait_for(reconcile, 300)
        job = await d.last_job("sf-worker")
        assert job.status is JobStatus.SUCCEEDED, (job.status, job.error)
        assert job.phase("Start Service").details["update_state"] == "completed"
        assert all(n in job.phase("Verify Health").details["url"] for n in ("sbx-2", "sbx-3")), job.phases
        tasks = await tasks_of(sandbox, name)
        assert sorted(t["Node"] for t in tasks) == ["sbx-2", "sbx-3"] and all(t["Image"] != old_image for t in tasks)
        assert await serves_everywhere(sandbox, name, 8726, "sf-worker v2")


async def _is(value: Any, wanted: str) -> bool:
    return bool(await value == wanted)


async def _new_task_node(sandbox: SandboxInfo, name: str, old_image: str) -> str | None:
    for t in await tasks_of(sandbox, name):
        if t["Image"] != old_image and t["CurrentState"].startswith("Running"):
            return t["Node"]
    return None
