"""The reconcile loop end to end: real git, real OpenSSH, real Docker engines on sandbox hosts, real Registry.

Each scenario of the reconcile issue is a test here: deploy, change, failed releases rolled back and
quarantined, git revert without rebuild, prune, healing of hand-made drift, restart, and the older API.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiodocker
import pytest
import yaml
from daemon_harness import DesiredRepo, api_source, git, http_get, registry_client, running_daemon, settings_for

from deployerd.plan import ActionKind
from deployerd.sandbox import SandboxInfo
from deployerd.store import JobStatus, PhaseStatus

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]


def phase(job, name):  # type: ignore[no-untyped-def]
    return next(p for p in job.phases if p.phase == name)


async def containers(daemon, service: str) -> list[dict]:  # type: ignore[no-untyped-def]
    """The service's containers on sbx-1, read straight from the host's engine (not through deployerd)."""
    handle = await daemon.engine.hosts.handle(daemon.engine.desired.hosts["sbx-1"])
    sock = await handle.conn.docker_socket()
    async with aiodocker.Docker(url=f"unix://{sock}") as d:
        found = await d.containers.list(all=True, filters=json.dumps({"label": [f"deployerd.service={service}"]}))
        return [c._container for c in found]


def url(sandbox: SandboxInfo, port: int, path: str = "/") -> str:
    return f"http://{sandbox.hosts[0].internal_address}:{port}{path}"


async def test_deploy_change_and_leave_others_alone(sandbox: SandboxInfo, tmp_path: Path) -> None:
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("web-a", 8101)
    repo.service("web-b", 8102)
    first = repo.commit("two services")
    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        actions = await d.reconcile()
        assert {a.service: a.kind for a in actions} == {"web-a": ActionKind.DEPLOY, "web-b": ActionKind.DEPLOY}
        job = await d.last_job("web-a")
        assert job.status is JobStatus.SUCCEEDED, job.error
        assert [p.phase for p in job.phases] == ["Validation", "Transfer", "Build", "Start Service",
                                                 "Verify Health", "Register with Registry"]
        assert all(p.status is PhaseStatus.SUCCEEDED for p in job.phases)
        assert "web-a v1" in (await http_get(url(sandbox, 8101))).text
        async with registry_client(sandbox) as reg:
            entry = await reg.get_by_name("web-a")
        assert entry is not None and entry.endpoint == f"http://{sandbox.hosts[0].internal_address}:8101"
        assert entry.metadata["release"] == job.release

        # /services and /metrics show it
        await d.reconcile()
        services = (await d.http.get("/services")).json()["services"]
        row = next(s for s in services if s["name"] == "web-a")
        assert (row["sync_status"], row["health_status"], row["running_release"]) == ("Synced", "Healthy", job.release)
        metrics = (await d.http.get("/metrics")).text
        assert f'deployerd_service_info{{commit="{first[:12]}"' in metrics
        assert 'service="web-a"' in metrics and 'sync_status="Synced"' in metrics

        # change web-a's source: a new release replaces it; web-b is left alone
        b_jobs_before = len(await d.jobs("web-b"))
        repo.write("services/web-a/www/index.html", "<h1>web-a v2</h1>\n")
        repo.commit("web-a v2")
        actions = await d.reconcile()
        changed = [a for a in actions if a.kind is ActionKind.DEPLOY]
        assert [(a.service, a.reasons) for a in changed] == [("web-a", ["changed: source files"])]
        job2 = await d.last_job("web-a")
        assert job2.status is JobStatus.SUCCEEDED and job2.release != job.release
        assert phase(job2, "Transfer").details["files_sent"] == 1  # only the changed file crossed the network
        assert "web-a v2" in (await http_get(url(sandbox, 8101))).text
        assert len(await d.jobs("web-b")) == b_jobs_before
        cs = await containers(d, "web-a")
        states = {c["Labels"]["deployerd.release"]: c["State"] for c in cs}
        assert states == {job2.release: "running", job.release: "exited"}  # previous kept, stopped


@pytest.mark.parametrize(
    "breakage",
    ["build", "exits", "unhealthy"],
)
async def test_failed_release_rolls_back_and_is_quarantined(sandbox: SandboxInfo, tmp_path: Path,
                                                             breakage: str) -> None:
    port = {"build": 8111, "exits": 8112, "unhealthy": 8113}[breakage]
    name = f"fail-{breakage}"
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service(name, port, health_timeout_s=6)
    good_commit = repo.commit("good")
    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        await d.reconcile()
        good = await d.last_job(name)
        assert good.status is JobStatus.SUCCEEDED, good.error

        if breakage == "build":
            repo.write(f"services/{name}/Dockerfile", "FROM busybox:latest\nRUN echo building-badly && exit 7\n")
        elif breakage == "exits":
            repo.write(f"services/{name}/Dockerfile",
                       'FROM busybox:latest\nCMD ["sh", "-c", "echo fatal: config missing; exit 3"]\n')
        else:
            repo.remove(f"services/{name}/www/health")
        repo.commit(f"break {name}")
        await d.reconcile()
        job = await d.last_job(name)
        assert job.status is JobStatus.ROLLED_BACK, (job.status, job.error)
        assert job.rollback and job.rollback["release"] == good.release
        failed_phase = {"build": "Build", "exits": "Verify Health", "unhealthy": "Verify Health"}[breakage]
        assert phase(job, failed_phase).status is PhaseStatus.FAILED
        if breakage == "build":
            assert any("building-badly" in line for line in job.logs), job.logs
        elif breakage == "exits":
            assert any("fatal: config missing" in line for line in job.logs), job.logs
            # the exit ended the wait at once, not the health timeout
            assert "while waiting for health" in (phase(job, "Verify Health").error or "")
        # the old release serves and is registered
        assert "v1" in (await http_get(url(sandbox, port))).text
        async with registry_client(sandbox) as reg:
            entry = await reg.get_by_name(name)
        assert entry is not None and entry.metadata["release"] == good.release

        # not retried on later reconciles
        for _ in range(2):
            actions = await d.reconcile()
            mine = [a for a in actions if a.service == name]
            assert [a.kind for a in mine] == [ActionKind.BLOCKED]
            assert "quarantined" in mine[0].reasons[0]
        assert (await d.last_job(name)).id == job.id

        if breakage == "unhealthy":
            # meanwhile the last good release is drift-healed like any other: stopped by hand, restarted
            conn = (await d.engine.hosts.handle(d.engine.desired.hosts["sbx-1"])).conn
            for c in await containers(d, name):
                if c["State"] == "running":
                    await conn.run(["docker", "stop", c["Id"]])
            actions = await d.reconcile()
            assert [(a.kind, a.release) for a in actions if a.service == name] == [(ActionKind.RESTORE, good.release)]
            restored = await d.last_job(name)
            assert restored.status is JobStatus.SUCCEEDED and restored.release == good.release
            assert phase(restored, "Build").status is PhaseStatus.SKIPPED
            assert "v1" in (await http_get(url(sandbox, port))).text
            assert (await d.engine.store.quarantined())[name].release == job.release  # still quarantined
            job = await d.engine.store.job(job.id)  # the failed job, for the checks below
            assert job is not None

        # the older API says failed, naming the failure and the rollback; deployerd's own route has it all
        body = (await d.http.get(f"/deploy/{job.id}")).json()
        assert body["status"] == "failed" and body["success"] is False
        assert body["error"].startswith(f"{failed_phase}: ")
        assert f"rolled back to release {good.release}" in body["error"]
        assert [p["status"] for p in body["phases"]][-1] == "skipped"
        rich = (await d.http.get(f"/jobs/{job.id}")).json()
        assert rich["status"] == "rolled_back" and rich["logs"] == job.logs

        # git changes (back to good): quarantine no longer applies
        git(repo.path, "revert", "--no-edit", "HEAD")
        actions = await d.reconcile()
        assert all(a.kind is not ActionKind.BLOCKED for a in actions if a.service == name)
        assert git(repo.path, "rev-parse", "HEAD") != good_commit


async def test_revert_restores_kept_release_without_rebuild(sandbox: SandboxInfo, tmp_path: Path) -> None:
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("revert-me", 8121)
    repo.commit("v1")
    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        await d.reconcile()
        v1 = await d.last_job("revert-me")
        repo.service("revert-me", 8121, version="2")
        repo.commit("v2")
        await d.reconcile()
        v2 = await d.last_job("revert-me")
        assert v2.status is JobStatus.SUCCEEDED and v2.release != v1.release
        git(repo.path, "revert", "--no-edit", "HEAD")
        actions = await d.reconcile()
        deploy = next(a for a in actions if a.service == "revert-me")
        assert deploy.kind is ActionKind.DEPLOY and deploy.kept and deploy.release == v1.release
        back = await d.last_job("revert-me")
        assert back.status is JobStatus.SUCCEEDED and back.release == v1.release
        assert phase(back, "Build").status is PhaseStatus.SKIPPED
        assert phase(back, "Transfer").status is PhaseStatus.SKIPPED
        assert phase(back, "Start Service").details["reused_container"] is True
        assert "revert-me v1" in (await http_get(url(sandbox, 8121))).text

        # retention: 3 releases kept (the serving one and the 2 most recently good); older ones removed
        releases = {}
        for version in ("3", "4"):
            repo.service("revert-me", 8121, version=version)
            repo.commit(f"v{version}")
            await d.reconcile()
            releases[version] = (await d.last_job("revert-me")).release
        kept = {c["Labels"]["deployerd.release"] for c in await containers(d, "revert-me")}
        assert kept == {releases["4"], releases["3"], v1.release}
        conn = (await d.engine.hosts.handle(d.engine.desired.hosts["sbx-1"])).conn
        base = f"/opt/fpai/services/{d.engine.settings.instance}-revert-me"
        dirs = (await conn.run(["ls", "-1", f"{base}/releases"])).stdout.split()
        assert v2.release not in " ".join(dirs) and releases["4"] in dirs
        image = f"deployerd/{d.engine.settings.instance}-revert-me"
        images = (await conn.run(["docker", "images", "-q", image])).stdout.split()
        assert len(images) == 3


async def test_delete_manifest_prunes_and_drift_is_healed(sandbox: SandboxInfo, tmp_path: Path) -> None:
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("keeper", 8131)
    repo.service("goner", 8132)
    repo.commit("two")
    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d, registry_client(sandbox) as reg:
        await d.reconcile()
        assert await reg.get_by_name("goner") is not None

        # drift by hand: the container removed and the Registry entry deleted
        for c in await containers(d, "keeper"):
            handle = await d.engine.hosts.handle(d.engine.desired.hosts["sbx-1"])
            await handle.conn.run(["docker", "rm", "-f", c["Id"]])
        assert await reg.deregister("keeper")
        actions = await d.reconcile()
        heal = next(a for a in actions if a.service == "keeper")
        assert heal.kind is ActionKind.DEPLOY
        assert (await d.last_job("keeper")).status is JobStatus.SUCCEEDED
        assert "keeper v1" in (await http_get(url(sandbox, 8131))).text
        assert await reg.get_by_name("keeper") is not None

        # a stopped container is healed too
        for c in await containers(d, "keeper"):
            if c["State"] == "running":
                handle = await d.engine.hosts.handle(d.engine.desired.hosts["sbx-1"])
                await handle.conn.run(["docker", "stop", c["Id"]])
        actions = await d.reconcile()
        assert next(a for a in actions if a.service == "keeper").kind is ActionKind.DEPLOY
        assert "keeper v1" in (await http_get(url(sandbox, 8131))).text

        # delete a manifest: container and Registry entry gone
        repo.remove("services/goner.yaml")
        repo.remove("services/goner")
        repo.commit("remove goner")
        actions = await d.reconcile()
        assert [a.kind for a in actions if a.service == "goner"] == [ActionKind.PRUNE]
        assert await containers(d, "goner") == []
        assert await reg.get_by_name("goner") is None
        assert await reg.get_by_name("keeper") is not None

        # a commit that empties the repository prunes nothing
        repo.remove("services")
        repo.commit("oops, everything")
        actions = await d.reconcile()
        assert [a.kind for a in actions] == [ActionKind.BLOCKED]
        assert [c["State"] for c in await containers(d, "keeper")] == ["running"]


async def test_broken_manifest_fails_alone(sandbox: SandboxInfo, tmp_path: Path) -> None:
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("solid", 8141)
    repo.service("shaky", 8142)
    repo.commit("two")
    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        await d.reconcile()
        repo.write("services/shaky.yaml", "name: shaky\nhost: sbx-1\nport: 99999\nsource: services/shaky\n")
        repo.write("services/solid/www/index.html", "<h1>solid v2</h1>\n")
        repo.commit("break shaky, change solid")
        actions = await d.reconcile()
        shaky = next(a for a in actions if a.service == "shaky")
        assert shaky.kind is ActionKind.BLOCKED
        assert "services/shaky.yaml: port" in shaky.reasons[0]
        assert (await d.last_job("solid")).status is JobStatus.SUCCEEDED
        assert "solid v2" in (await http_get(url(sandbox, 8141))).text
        assert "shaky v1" in (await http_get(url(sandbox, 8142))).text  # still running, untouched


async def test_restart_keeps_history_releases_and_quarantine(sandbox: SandboxInfo, tmp_path: Path) -> None:
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("durable", 8151, health_timeout_s=4)
    repo.commit("v1")
    settings = settings_for(tmp_path, sandbox, repo)
    async with running_daemon(settings, cleanup=False) as d:
        await d.reconcile()
        repo.remove("services/durable/www/health")
        repo.commit("break")
        await d.reconcile()
        failed = await d.last_job("durable")
        assert failed.status is JobStatus.ROLLED_BACK
    async with running_daemon(settings) as d:
        history = (await d.http.get("/services/durable/history")).json()
        assert [j["id"] for j in history["jobs"]][0] == failed.id
        assert history["quarantine"]["release"] == failed.release
        assert any(r["status"] == "good" for r in history["releases"])
        actions = await d.reconcile()
        assert [a.kind for a in actions if a.service == "durable"] == [ActionKind.BLOCKED]
        # sync --force retries the quarantined release (and it fails again, rolled back again)
        resp = await d.http.post("/sync", json={"service": "durable", "force": True}, headers=d.auth)
        assert resp.status_code == 200
        await d.engine.drain()
        retried = await d.last_job("durable")
        assert retried.id != failed.id and retried.release == failed.release
        assert retried.status is JobStatus.ROLLED_BACK, (retried.status, retried.error, retried.rollback)


async def test_older_deploy_api(sandbox: SandboxInfo, tmp_path: Path) -> None:
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("in-git", 8161)
    repo.commit("one")
    settings = settings_for(tmp_path, sandbox, repo)
    src = api_source(settings, "legacy-svc", 8162)
    async with running_daemon(settings) as d:
        await d.reconcile()
        body = {"service_name": "legacy-svc", "service_path": str(src), "service_port": 8162, "droplet_id": 4242,
                "environment_vars": {"GREETING": "from-legacy"}}
        assert (await d.http.post("/deploy", json=body)).status_code == 401  # no token
        resp = await d.http.post("/deploy", json=body, headers=d.auth)
        assert resp.status_code == 202, resp.text
        created = resp.json()
        assert set(created) == {"deploy_job_id", "service_name", "status", "created_at"}
        assert created["deploy_job_id"].startswith("deploy-") and len(created["deploy_job_id"]) == 15
        await d.engine.drain()
        job = (await d.http.get(f"/deploy/{created['deploy_job_id']}")).json()
        for key in ("deploy_job_id", "service_name", "service_path", "status", "droplet_id", "service_port",
                    "service_url", "phases", "registration", "started_at", "completed_at", "duration_seconds",
                    "success"):
            assert key in job
        assert job["success"] is True and job["status"] == "completed", job
        assert job["service_path"] == str(src)  # as sent, not the host's release directory
        assert [p["phase"] for p in job["phases"]][-1] == "Register with Registry"
        assert all(p["status"] == "success" and isinstance(p["details"], str) for p in job["phases"]), job
        conn = (await d.engine.hosts.handle(d.engine.desired.hosts["sbx-1"])).conn
        ids = [c["Id"] for c in await containers(d, "legacy-svc")]
        env = (await conn.run(["docker", "inspect", "--format", "{{json .Config.Env}}", *ids])).stdout.split()
        assert ["GREETING=from-legacy" in json.loads(e) for e in env] == [True], env
        assert set(job["registration"]) >= {"droplet_id", "service_name", "endpoint", "registered_at"}
        assert job["registration"]["droplet_id"] == 4242
        # a name git manages is refused; an outside path is refused; a reconcile leaves the out-of-band one alone
        clash = {**body, "service_name": "in-git"}
        assert (await d.http.post("/deploy", json=clash, headers=d.auth)).status_code == 409
        outside = {**body, "service_path": "/etc"}
        refused = await d.http.post("/deploy", json=outside, headers=d.auth)
        assert refused.status_code == 422 and "under the API source directory" in refused.text
        assert refused.json()["detail"][0]["loc"] == ["body", "service_path"]
        unknown = await d.http.post("/deploy", json={**body, "env": {"GREETING": "x"}}, headers=d.auth)
        assert unknown.status_code == 422 and unknown.json()["detail"][0]["loc"] == ["body", "env"]
        actions = await d.reconcile()
        assert all(a.service != "legacy-svc" for a in actions if a.kind is ActionKind.PRUNE)
        assert [(a.kind, a.reasons) for a in actions if a.service == "legacy-svc"] == [(ActionKind.NOOP, ["in sync"])]
        assert (await http_get(url(sandbox, 8162, "/health"))).status_code == 200
        assert (await d.http.get("/deploy/deploy-00000000")).status_code == 404

        # first-class in reconcile: the Registry loses it, it is registered again; stopped by hand, started again
        async with registry_client(sandbox) as reg:
            await reg.deregister("legacy-svc")
            actions = await d.reconcile()
            assert [(a.kind, a.reasons) for a in actions if a.service == "legacy-svc"] == [
                (ActionKind.REGISTER, ["registry entry missing"])]
            entry = await reg.get_by_name("legacy-svc")
            assert entry is not None and entry.metadata["managed_by"] == "deployerd-api", entry
        for c in await containers(d, "legacy-svc"):
            await conn.run(["docker", "stop", c["Id"]])
        actions = await d.reconcile()
        assert [a.kind for a in actions if a.service == "legacy-svc"] == [ActionKind.DEPLOY]
        healed = await d.last_job("legacy-svc")
        deployed = await d.engine.store.job(created["deploy_job_id"])
        assert deployed is not None
        assert (healed.status, healed.managed_by, healed.release) == (JobStatus.SUCCEEDED, "api", deployed.release)
        assert healed.phases[1].status is PhaseStatus.SKIPPED  # its kept container started again: no transfer
        assert (await http_get(url(sandbox, 8162, "/health"))).status_code == 200

        # removable, with the token; git's names are not
        assert (await d.http.delete("/deploy/services/legacy-svc")).status_code == 401
        assert (await d.http.delete("/deploy/services/in-git", headers=d.auth)).status_code == 409
        assert (await d.http.delete("/deploy/services/nothing-here", headers=d.auth)).status_code == 404
        gone = await d.http.delete("/deploy/services/legacy-svc", headers=d.auth)
        assert gone.status_code == 202, gone.text
        await d.engine.drain()
        removed = (await d.http.get(f"/deploy/{gone.json()['deploy_job_id']}")).json()
        assert removed["status"] == "completed", removed
        assert await containers(d, "legacy-svc") == []
        async with registry_client(sandbox) as reg:
            assert await reg.get_by_name("legacy-svc") is None
        assert all(a.service != "legacy-svc" for a in await d.reconcile())


async def test_commit_seen_by_watch_deploys(sandbox: SandboxInfo, tmp_path: Path) -> None:
    """The real loop: a commit to a local repository is seen by the watch and deployed, no reconcile call."""
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("watched", 8171)
    repo.commit("first")
    async with running_daemon(settings_for(tmp_path, sandbox, repo), loop=True) as d:
        for _ in range(240):  # bounded: up to 120 s
            jobs = await d.jobs("watched")
            if jobs and jobs[0].status.finished:
                break
            await asyncio.sleep(0.5)
        assert (await d.last_job("watched")).status is JobStatus.SUCCEEDED
        first = await d.last_job("watched")
        repo.write("services/watched/www/index.html", "<h1>watched v2</h1>\n")
        repo.commit("second")
        for _ in range(240):
            job = await d.last_job("watched")
            if job.id != first.id and job.status.finished:
                break
            await asyncio.sleep(0.5)
        assert job.id != first.id and job.status is JobStatus.SUCCEEDED
        assert "watched v2" in (await http_get(url(sandbox, 8171))).text
        health = (await d.http.get("/health")).json()
        assert health["status"] == "active" and health["hosts"]["sbx-1"]["reachable"] is True


async def test_newer_commit_supersedes_a_deploy_waiting_for_health(sandbox: SandboxInfo, tmp_path: Path) -> None:
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("impatient", 8181, health_timeout_s=300)
    repo.commit("v1")
    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        await d.reconcile()
        repo.remove("services/impatient/www/health")  # v2 never gets healthy (and would wait 300 s)
        repo.commit("v2: broken health")
        await d.engine.reconcile(["test"])  # launches the v2 job without waiting for it
        for _ in range(200):  # bounded: until the job is waiting in Verify Health
            job = await d.last_job("impatient")
            if any(p.phase == "Verify Health" and p.status is PhaseStatus.RUNNING for p in job.phases):
                break
            await asyncio.sleep(0.2)
        repo.service("impatient", 8181, version="3", health_timeout_s=300)
        repo.commit("v3: fixed")
        await d.engine.reconcile(["test"])  # records v3 as wanted; the v2 job stops at its next probe
        await d.engine.drain()
        v2 = await d.engine.store.job(job.id)
        assert v2 is not None and v2.status is JobStatus.SUPERSEDED
        assert "superseded" in (phase(v2, "Verify Health").error or "")
        await d.reconcile()
        v3 = await d.last_job("impatient")
        assert v3.status is JobStatus.SUCCEEDED and v3.id != v2.id
        assert "impatient v3" in (await http_get(url(sandbox, 8181))).text
        assert "impatient" not in await d.engine.store.quarantined()


async def test_a_deploy_superseded_in_verify_health_leaves_a_verified_release_serving(
        sandbox: SandboxInfo, tmp_path: Path) -> None:
    """Bug 1 of issue 11: deploy Y waits in Verify Health (its health never passes) when the branch moves to
    a tree whose release is quarantined. Y was left serving, unverified; the last good release must be."""
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("cutshort", 8188)
    repo.commit("v1: good")
    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        await d.reconcile()
        good = await d.last_job("cutshort")
        assert good.status is JobStatus.SUCCEEDED, good.error
        repo.service("cutshort", 8188, version="2", health_timeout_s=3)
        (repo.path / "services/cutshort/www/health").unlink()
        repo.commit("v2: broken health")
        await d.reconcile()
        broken = await d.last_job("cutshort")
        assert broken.status is JobStatus.ROLLED_BACK, broken.error
        assert (await d.engine.store.quarantined())["cutshort"].release == broken.release

        repo.service("cutshort", 8188, version="3", health_timeout_s=300)
        (repo.path / "services/cutshort/www/health").unlink()
        repo.commit("v3: health never passes")
        await d.engine.reconcile(["test"])  # launches the v3 job without waiting for it
        for _ in range(300):  # bounded: until the job is waiting in Verify Health
            y = await d.last_job("cutshort")
            if any(p.phase == "Verify Health" and p.status is PhaseStatus.RUNNING for p in y.phases):
                break
            await asyncio.sleep(0.2)
        assert y.release not in (good.release, broken.release)
        git(repo.path, "reset", "--hard", "HEAD~1")  # back to v2, whose release is quarantined
        await d.engine.reconcile(["test"])
        await d.engine.drain()
        y = await d.engine.store.job(y.id)
        assert y is not None and y.status is JobStatus.SUPERSEDED, (y.status, y.error)
        assert "cutshort v1" in (await http_get(url(sandbox, 8188))).text
        assert (await http_get(url(sandbox, 8188, "/health"))).status_code == 200
        running = {c["Labels"]["deployerd.release"] for c in await containers(d, "cutshort") if c["State"] == "running"}
        assert running == {good.release}


async def test_api_guards_webhook_and_health(sandbox: SandboxInfo, tmp_path: Path) -> None:
    import hashlib
    import hmac

    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("guarded", 8191)
    repo.commit("one")
    settings = settings_for(tmp_path, sandbox, repo)
    async with running_daemon(settings) as d:
        # every route that changes anything wants the token
        for path, body in (("/sync", {}), ("/deploy", {}), ("/message", {})):
            assert (await d.http.post(path, json=body)).status_code == 401
            bad = {"Authorization": "Bearer not-the-token"}
            assert (await d.http.post(path, json=body, headers=bad)).status_code == 401
        # /health answers before any reconcile, without waiting on a host
        h = (await d.http.get("/health")).json()
        assert h["service"] == "deployerd" and h["state"] == "starting" and h["last_reconcile"] is None
        # webhook: wrong signature refused (nothing fetched), right one accepted
        secret = settings.secret("webhook_secret") or ""
        push = json.dumps({"ref": "refs/heads/main", "after": "a" * 40}).encode()
        wrong = {"X-Hub-Signature-256": "sha256=" + "0" * 64, "Content-Type": "application/json"}
        assert (await d.http.post("/webhook", content=push, headers=wrong)).status_code == 401
        assert d.engine.source.revision is None and not d.engine.kick.is_set()
        sig = "sha256=" + hmac.new(secret.encode(), push, hashlib.sha256).hexdigest()
        ok = await d.http.post("/webhook", content=push, headers={**wrong, "X-Hub-Signature-256": sig})
        assert ok.status_code == 200 and ok.json()["accepted"] is True and d.engine.kick.is_set()
        big = b"{" + b" " * (2 << 20) + b"}"
        assert (await d.http.post("/webhook", content=big, headers=wrong)).status_code == 413
        # after a reconcile: health says active, with the hosts and the Registry reachable
        await d.reconcile()
        h = (await d.http.get("/health")).json()
        assert h["status"] == "active" and h["registry"]["reachable"] is True
        assert all(v["reachable"] for v in h["hosts"].values())
        for path in ("/capabilities", "/state", "/dependencies"):
            assert (await d.http.get(path)).status_code == 200
        deps = (await d.http.get("/dependencies")).json()
        assert deps["missing"] == []


async def test_rollback_rebuilds_a_last_good_release_removed_by_hand(sandbox: SandboxInfo, tmp_path: Path) -> None:
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("phoenix", 8185, health_timeout_s=5)
    repo.commit("v1")
    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        await d.reconcile()
        good = await d.last_job("phoenix")
        conn = (await d.engine.hosts.handle(d.engine.desired.hosts["sbx-1"])).conn
        for c in await containers(d, "phoenix"):  # someone cleans up by hand: container and image gone
            await conn.run(["docker", "rm", "-f", c["Id"]])
        await conn.run(["docker", "rmi", "-f", f"deployerd/{d.engine.settings.instance}-phoenix:{good.release}"])
        repo.remove("services/phoenix/www/health")
        repo.commit("v2: broken")
        await d.reconcile()
        job = await d.last_job("phoenix")
        assert job.status is JobStatus.ROLLED_BACK, (job.status, job.error, job.rollback)
        assert job.rollback["release"] == good.release and job.rollback["rebuilt"] is True
        assert "phoenix v1" in (await http_get(url(sandbox, 8185))).text


async def test_a_run_of_broken_commits_stays_within_retention(sandbox: SandboxInfo, tmp_path: Path) -> None:
    """Found by the soak: each failed release left its image and release dir until the next good deploy."""
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("relapse", 8186, health_timeout_s=5)
    repo.commit("v1")
    async with running_daemon(settings_for(tmp_path, sandbox, repo, keep_releases=2)) as d:
        await d.reconcile()
        good = await d.last_job("relapse")
        assert good.status is JobStatus.SUCCEEDED, good.error
        failed = []
        for i in range(3):
            repo.write("services/relapse/Dockerfile", f'FROM busybox:latest\nCMD ["sh", "-c", "exit {i + 3}"]\n')
            repo.commit(f"broken {i}")
            await d.reconcile()
            job = await d.last_job("relapse")
            assert job.status is JobStatus.ROLLED_BACK, (job.status, job.error)
            failed.append(job.release)
        conn = (await d.engine.hosts.handle(d.engine.desired.hosts["sbx-1"])).conn
        q = f"{d.engine.settings.instance}-relapse"
        images = (await conn.run(["docker", "images", "--format", "{{.Tag}}", f"deployerd/{q}"])).stdout.split()
        dirs = (await conn.run(["ls", "-1", f"/opt/fpai/services/{q}/releases"])).stdout.split()
        # the one serving and the last failed one (a forced retry reuses it); earlier failed ones are gone
        assert sorted(images) == sorted([good.release, failed[-1]])
        assert sorted(d for d in dirs if not d.endswith(".manifest.json")) == sorted([good.release, failed[-1]])
        assert "relapse v1" in (await http_get(url(sandbox, 8186))).text


async def test_a_first_release_that_never_served_leaves_nothing_behind(sandbox: SandboxInfo, tmp_path: Path) -> None:
    """Found by the soak: a service's first release on a host that failed (nothing to roll back to) or was
    superseded left its files and image there with no instance, so moving the service away or deleting it
    never pruned them."""
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("stillborn", 8187, health_timeout_s=5,
                 dockerfile='FROM busybox:latest\nCMD ["sh", "-c", "exit 3"]\n')
    repo.commit("born broken")
    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        await d.reconcile()
        job = await d.last_job("stillborn")
        assert job.status is JobStatus.FAILED and job.rollback and job.rollback["release"] is None, job
        conn = (await d.engine.hosts.handle(d.engine.desired.hosts["sbx-1"])).conn
        q = f"{d.engine.settings.instance}-stillborn"
        assert (await conn.run(["docker", "images", "-q", f"deployerd/{q}"])).stdout.strip() == ""
        assert (await conn.run(["test", "-e", f"/opt/fpai/services/{q}"], check=False)).exit_status == 1
        assert (await d.engine.store.quarantined())["stillborn"].release == job.release  # still quarantined


async def test_a_commit_adding_a_host_is_planned_on_that_host_read(sandbox: SandboxInfo, tmp_path: Path) -> None:
    """A reconcile reads the hosts while git loads, as the last look asked for them: a commit that adds a host and a
    service on it is planned, in that same reconcile, on the new host read (never on the look of before, which did
    not ask that host)."""
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    hosts = yaml.safe_load((repo.path / "hosts.yaml").read_text())
    second = hosts["hosts"].pop("sbx-2")
    repo.write("hosts.yaml", yaml.safe_dump(hosts))
    repo.service("early-a", 8194)
    repo.commit("one host")
    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        await d.reconcile()
        assert d.engine.observed is not None and set(d.engine.observed.hosts) == {"sbx-1"}
        hosts["hosts"]["sbx-2"] = second
        repo.write("hosts.yaml", yaml.safe_dump(hosts))
        repo.service("early-b", 8195, host="sbx-2")
        repo.commit("a second host, and a service on it")
        actions = await d.reconcile()
        assert [(a.host, a.kind) for a in actions if a.service == "early-b"] == [("sbx-2", ActionKind.DEPLOY)]
        assert d.engine.observed is not None and d.engine.observed.hosts["sbx-2"].reachable
        assert (await d.last_job("early-b")).status is JobStatus.SUCCEEDED
