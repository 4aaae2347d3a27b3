"""`method: swarm` end to end on a real 3-node Swarm (sandbox `up --hosts 3 --swarm`): real git, OpenSSH,
the manager's engine API, Debian's docker-registry, Swarm's own scheduler and rollback, the real Registry.

Services publish in host mode (the sandbox kernel has no ip_vs: no routing mesh), so each task answers on
its own node's address; the tests read the cluster straight from the manager's CLI, not through deployerd.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon_harness import DesiredRepo, git, http_get, registry_client, running_daemon, settings_for

from deployerd import sandbox as sbx
from deployerd.plan import ActionKind
from deployerd.store import JobStatus, PhaseStatus

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

DOCKERFILE = """FROM busybox:latest
COPY www /www
CMD ["busybox", "httpd", "-f", "-v", "-p", "80", "-h", "/www"]
"""


def swarm_repo(path: Path, sandbox: sbx.SandboxInfo) -> DesiredRepo:
    """A desired-state repo whose hosts.yaml names the sandbox's Swarm as cluster `prod`."""
    assert sandbox.swarm is not None
    repo = DesiredRepo(path, sandbox)
    hosts = yaml.safe_load((path / "hosts.yaml").read_text())
    hosts["clusters"] = {"prod": {"manager": sandbox.swarm.manager, "registry": sandbox.swarm.registry}}
    repo.write("hosts.yaml", yaml.safe_dump(hosts))
    return repo


def swarm_service(repo: DesiredRepo, name: str, port: int, version: str = "1", *, replicas: int | None = 2,
                  dockerfile: str = DOCKERFILE, **extra: Any) -> None:
    manifest: dict[str, Any] = {
        "name": name, "method": "swarm", "cluster": "prod", "port": port, "source": f"services/{name}",
        "publish_mode": "host", "docker": {"container_port": 80},
        "health": {"path": "/health", "timeout_s": 20, "interval_s": 0.5},
        "rollout": {"monitor_s": 2}, **extra}
    if replicas is not None:
        manifest["replicas"] = replicas
    repo.write(f"services/{name}.yaml", yaml.safe_dump(manifest))
    repo.write(f"services/{name}/Dockerfile", dockerfile)
    repo.write(f"services/{name}/www/health", json.dumps({"status": "active", "service": name, "version": version}))
    repo.write(f"services/{name}/www/index.html", f"<h1>{name} v{version}</h1>\n")


async def manager_cli(sandbox: sbx.SandboxInfo, *argv: str, check: bool = True) -> str:
    async with await sbx.connect(sandbox.hosts[0]) as conn:
        done = await conn.run(shlex.join(argv), check=check)
        return str(done.stdout)


async def service_of(sandbox: sbx.SandboxInfo, name: str) -> dict[str, Any] | None:
    out = await manager_cli(sandbox, "docker", "service", "inspect", name, check=False)
    found = json.loads(out) if out.strip() else []
    return found[0] if found else None


async def running_tasks(sandbox: sbx.SandboxInfo, name: str) -> list[dict[str, str]]:
    out = await manager_cli(sandbox, "docker", "service", "ps", name, "--filter", "desired-state=running",
                            "--format", "{{json .}}")
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def node_address(sandbox: sbx.SandboxInfo, node: str) -> str:
    return next(h.internal_address for h in sandbox.hosts if h.name == node)


async def answers(sandbox: sbx.SandboxInfo, name: str, port: int, text: str) -> list[str]:
    """The nodes whose task of ``name`` serves ``text`` on its published port; asserts every task does."""
    tasks = await running_tasks(sandbox, name)
    nodes = sorted({t["Node"] for t in tasks})
    for node in nodes:
        body = (await http_get(f"http://{node_address(sandbox, node)}:{port}/")).text
        assert text in body, f"{node}: {body!r}"
    return nodes


def phase(job, name):  # type: ignore[no-untyped-def]
    return next(p for p in job.phases if p.phase == name)


async def test_deploy_change_revert_scale_by_hand_and_prune(swarm_sandbox: sbx.SandboxInfo, tmp_path: Path) -> None:
    sandbox = swarm_sandbox
    repo = swarm_repo(tmp_path / "repo", sandbox)
    swarm_service(repo, "sw-web", 8301)
    repo.service("plain-web", 8311, host="sbx-2")  # a plain Docker service on a host that is also a Swarm node
    first = repo.commit("sw-web on the cluster, plain-web beside it")
    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        instance = d.engine.settings.instance
        name = f"{instance}-sw-web"
        actions = await d.reconcile()
        assert [(a.service, a.host, a.kind) for a in actions] == [("plain-web", "sbx-2", ActionKind.DEPLOY),
                                                                  ("sw-web", "sbx-1", ActionKind.DEPLOY)]
        plain = await d.last_job("plain-web")
        assert plain.status is JobStatus.SUCCEEDED, plain.error
        assert "plain-web v1" in (await http_get(f"http://{node_address(sandbox, 'sbx-2')}:8311/")).text
        job = await d.last_job("sw-web")
        assert job.status is JobStatus.SUCCEEDED, (job.error, job.logs)
        assert all(p.status is PhaseStatus.SUCCEEDED for p in job.phases), [(p.phase, p.status) for p in job.phases]
        start = phase(job, "Start Service").details
        assert start["action"] == "created" and start["image"].startswith(f"{sandbox.swarm.registry}/deployerd/")
        svc = await service_of(sandbox, name)
        assert svc is not None
        labels = svc["Spec"]["Labels"]
        assert (labels["deployerd.service"], labels["deployerd.release"], labels["deployerd.commit"],
                labels["deployerd.instance"]) == ("sw-web", job.release, first, instance)
        assert svc["Spec"]["UpdateConfig"]["Order"] == "start-first"
        assert svc["Spec"]["UpdateConfig"]["FailureAction"] == "rollback"
        nodes = await answers(sandbox, name, 8301, "sw-web v1")
        assert len(nodes) == 2  # two replicas, each on its own node (host-mode port)
        health = phase(job, "Verify Health").details
        assert all(n in health["url"] for n in nodes), health
        async with registry_client(sandbox) as reg:
            entry = await reg.get_by_name("sw-web")
        # host mode: the endpoint is a node that runs a task (the first by address), and it answers there
        assert entry is not None and entry.endpoint == f"http://{min(node_address(sandbox, n) for n in nodes)}:8301"
        assert "sw-web v1" in (await http_get(entry.endpoint + "/")).text
        assert entry.metadata is not None
        meta = entry.metadata
        assert (meta["cluster"], meta["replicas"], meta["release"]) == ("prod", 2, job.release)

        # nothing to do: in sync (the Swarm's task containers on sbx-2 are not taken for Docker services there)
        actions = await d.reconcile()
        assert [a.kind for a in actions] == [ActionKind.NOOP, ActionKind.NOOP], [a.reasons for a in actions]

        # change the source: one image for the cluster, pushed once, every task runs it
        repo.write("services/sw-web/www/index.html", "<h1>sw-web v2</h1>\n")
        repo.commit("v2")
        actions = await d.reconcile()
        assert [a.reasons for a in actions if a.kind is ActionKind.DEPLOY] == [["changed: source files"]]
        job2 = await d.last_job("sw-web")
        assert job2.status is JobStatus.SUCCEEDED, (job2.error, job2.logs)
        assert phase(job2, "Start Service").details["update_state"] == "completed"
        await answers(sandbox, name, 8301, "sw-web v2")

        # git revert: the first release's image is still on the manager: no transfer, no build
        git(repo.path, "revert", "--no-edit", "HEAD")
        await d.reconcile()
        job3 = await d.last_job("sw-web")
        assert job3.status is JobStatus.SUCCEEDED and job3.release == job.release, job3.error
        assert phase(job3, "Build").status is PhaseStatus.SKIPPED
        await answers(sandbox, name, 8301, "sw-web v1")

        # scaled by hand: seen, named, healed
        await manager_cli(sandbox, "docker", "service", "scale", "--detach", f"{name}=1")
        actions = [a for a in await d.reconcile() if a.service == "sw-web"]
        assert actions[0].kind is ActionKind.DEPLOY
        assert "scaled by hand to 1 replicas (deployerd set 2)" in actions[0].reasons, actions[0].reasons
        assert (await d.last_job("sw-web")).status is JobStatus.SUCCEEDED
        svc = await service_of(sandbox, name)
        assert svc is not None and svc["Spec"]["Mode"]["Replicated"]["Replicas"] == 2
        assert len(await running_tasks(sandbox, name)) == 2

        # updated by hand: an env added
        await manager_cli(sandbox, "docker", "service", "update", "--detach", "--env-add", "HAND=1", name)
        actions = [a for a in await d.reconcile() if a.service == "sw-web"]
        assert "updated by hand (its spec differs from the one deployerd set)" in actions[0].reasons, actions[0].reasons
        svc = await service_of(sandbox, name)
        assert svc is not None and "HAND=1" not in (svc["Spec"]["TaskTemplate"]["ContainerSpec"].get("Env") or [])

        # removed by hand: deployed again
        await manager_cli(sandbox, "docker", "service", "rm", name)
        actions = [a for a in await d.reconcile() if a.service == "sw-web"]
        assert actions[0].kind is ActionKind.DEPLOY and "removed by hand" in actions[0].reasons[0], actions[0].reasons
        await answers(sandbox, name, 8301, "sw-web v1")

        # leaves git: pruned (service and Registry entry)
        repo.remove("services/sw-web.yaml")
        repo.commit("sw-web gone")
        actions = [a for a in await d.reconcile() if a.service == "sw-web"]
        assert [(a.host, a.kind, a.reasons) for a in actions] == [("sbx-1", ActionKind.PRUNE, ["removed from git"])]
        pruned = await d.last_job("sw-web")
        assert (pruned.kind, pruned.status) == ("prune", JobStatus.SUCCEEDED), pruned.error
        assert await service_of(sandbox, name) is None
        async with registry_client(sandbox) as reg:
            assert await reg.get_by_name("sw-web") is None


async def test_swarm_rollback_is_a_failure_and_quarantined(swarm_sandbox: sbx.SandboxInfo, tmp_path: Path) -> None:
    """A release whose tasks exit: Swarm's monitor rolls the update back by itself. deployerd reports the deploy
    as failed and rolled back (never as a success), and quarantines the release."""
    sandbox = swarm_sandbox
    repo = swarm_repo(tmp_path / "repo", sandbox)
    swarm_service(repo, "sw-rb", 8302)
    repo.commit("good")
    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        name = f"{d.engine.settings.instance}-sw-rb"
        await d.reconcile()
        good = await d.last_job("sw-rb")
        assert good.status is JobStatus.SUCCEEDED, good.error
        repo.write("services/sw-rb/Dockerfile", 'FROM busybox:latest\nCMD ["sh", "-c", "echo broken config; exit 3"]\n')
        repo.commit("broken")
        await d.reconcile()
        bad = await d.last_job("sw-rb")
        assert bad.status is JobStatus.ROLLED_BACK, (bad.status, bad.error, bad.rollback)
        assert "Swarm rolled back the update to release" in (bad.error or ""), bad.error
        quarantine = (await d.engine.store.quarantined())["sw-rb"]
        assert quarantine.release == bad.release and "Swarm rolled back" in quarantine.reason, quarantine
        assert phase(bad, "Start Service").status is PhaseStatus.FAILED
        assert bad.rollback is not None and bad.rollback["release"] == good.release
        svc = await service_of(sandbox, name)
        assert svc is not None and svc["Spec"]["Labels"]["deployerd.release"] == good.release
        await answers(sandbox, name, 8302, "sw-rb v1")
        actions = await d.reconcile()  # quarantined: not retried until git changes
        assert actions[0].kind is ActionKind.BLOCKED and "quarantined" in actions[0].reasons[-1], actions[0].reasons
        assert (await d.last_job("sw-rb")).id == bad.id


async def test_unhealthy_release_rolled_back_to_last_good_spec(swarm_sandbox: sbx.SandboxInfo, tmp_path: Path) -> None:
    """Tasks that run but fail the health check: Swarm sees nothing wrong; deployerd's own rollback sets the
    last good spec again."""
    sandbox = swarm_sandbox
    repo = swarm_repo(tmp_path / "repo", sandbox)
    swarm_service(repo, "sw-uh", 8303)
    repo.commit("good")
    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        name = f"{d.engine.settings.instance}-sw-uh"
        await d.reconcile()
        good = await d.last_job("sw-uh")
        assert good.status is JobStatus.SUCCEEDED, good.error
        repo.remove("services/sw-uh/www/health")
        repo.write("services/sw-uh/www/index.html", "<h1>sw-uh v2</h1>\n")
        swarm_service_health_timeout(repo, "sw-uh", 4)
        repo.commit("no health")
        await d.reconcile()
        bad = await d.last_job("sw-uh")
        assert bad.status is JobStatus.ROLLED_BACK, (bad.status, bad.error)
        assert phase(bad, "Verify Health").status is PhaseStatus.FAILED
        assert bad.rollback is not None and bad.rollback["release"] == good.release
        svc = await service_of(sandbox, name)
        assert svc is not None and svc["Spec"]["Labels"]["deployerd.release"] == good.release
        await answers(sandbox, name, 8303, "sw-uh v1")


def swarm_service_health_timeout(repo: DesiredRepo, name: str, timeout_s: float) -> None:
    path = repo.path / f"services/{name}.yaml"
    manifest = yaml.safe_load(path.read_text())
    manifest["health"]["timeout_s"] = timeout_s
    repo.write(f"services/{name}.yaml", yaml.safe_dump(manifest))
