"""The command line as a user runs it: validate, plan, status, history, sync (real daemon, real hosts)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import yaml
from daemon_harness import DesiredRepo, api_source, running_daemon, settings_for

from deployerd.config import Settings
from deployerd.sandbox import SandboxInfo
from deployerd.store import JobStatus

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]
ROOT = Path(__file__).resolve().parents[2]


async def cli(*args: str) -> tuple[int, str]:
    """Run ``python -m deployerd ARGS`` as a subprocess (without blocking the in-process daemon)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deployerd", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


def one_service(sandbox: SandboxInfo, tmp_path: Path, name: str, port: int) -> tuple[DesiredRepo, Settings, Path]:
    """A repository with one committed service, the daemon's settings, and its config file for the CLI."""
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service(name, port)
    repo.commit("one")
    settings = settings_for(tmp_path, sandbox, repo)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude_none=True)))
    return repo, settings, config


async def test_validate_bundled_and_broken(tmp_path: Path) -> None:
    code, out = await cli("validate", str(ROOT / "desired_state"))
    assert code == 0, out
    assert "ok: hello-web (docker on sbx-1:8010)" in out and "ok: hello-api" in out

    broken = tmp_path / "ds"
    (broken / "services" / "bad").mkdir(parents=True)
    (broken / "hosts.yaml").write_text("hosts:\n  h1: {address: 127.0.0.1}\n")
    (broken / "services" / "bad.yaml").write_text("name: bad\nhost: h1\nport: 80\nsource: services/bad\ncolor: red\n")
    (broken / "services" / "lost.yaml").write_text("name: lost\nhost: h2\nport: 81\nsource: services/bad\n")
    code, out = await cli("validate", str(broken))
    assert code == 1
    assert "services/bad.yaml: color: unknown field" in out
    assert "services/lost.yaml: host:" in out and "h2" in out


async def test_plan_status_history_sync(sandbox: SandboxInfo, tmp_path: Path) -> None:
    repo, settings, config = one_service(sandbox, tmp_path, "cli-web", 8401)

    code, out = await cli("plan", "--config", str(config))
    assert code == 0, out
    assert "deploy" in out.lower() and "cli-web" in out and "not deployed on sbx-1" in out

    async with running_daemon(settings) as d:
        code, out = await cli("sync", "--config", str(config))
        assert code == 0, out
        assert "cli-web@sbx-1: not deployed on sbx-1" in out
        await d.engine.drain()
        await d.reconcile()
        code, out = await cli("status", "--config", str(config))
        assert code == 0, out
        line = next(line for line in out.splitlines() if line.startswith("cli-web"))
        assert "Synced" in line and "Healthy" in line
        code, out = await cli("history", "cli-web", "--config", str(config))
        assert code == 0 and "succeeded" in out, out
        # a deploy a crash cut short (recorded so by the restarted daemon): `plan` says it deploys it again
        last = (await d.engine.store.jobs("cli-web", limit=1))[0]
        await d.engine.store.save_job(last.model_copy(update={"status": JobStatus.INTERRUPTED}))
        code, out = await cli("plan", "--config", str(config))
        assert code == 0, out
        assert "cli-web" in out and "its deploy was interrupted" in out, out
        wrong = tmp_path / "wrong.token"
        wrong.write_text("nope")
        wrong.chmod(0o600)
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "api_token_file": str(wrong)}))
        code, out = await cli("sync", "--config", str(bad))
        assert code == 1 and "401" in out


async def test_sync_prune_all_lets_an_emptying_commit_prune(sandbox: SandboxInfo, tmp_path: Path) -> None:
    """A commit that removes every service prunes nothing (it looks like an emptied checkout) until
    `deployerd sync --prune-all` asks for it, with the token."""
    repo, settings, config = one_service(sandbox, tmp_path, "last-one", 8411)
    async with running_daemon(settings) as d:
        await d.reconcile()
        assert (await d.last_job("last-one")).status is JobStatus.SUCCEEDED
        repo.remove("services")
        repo.commit("remove every service")
        actions = await d.reconcile()
        assert [(a.kind.value, a.service) for a in actions] == [("blocked", "last-one")]
        assert "--prune-all" in actions[0].reasons[0]
        code, out = await cli("sync", "--prune-all", "--config", str(config))
        assert code == 0 and "prune" in out and "last-one@sbx-1: removed from git" in out, out
        await d.engine.drain()
        pruned = await d.last_job("last-one")
        assert (pruned.kind, pruned.status) == ("prune", JobStatus.SUCCEEDED), pruned
        handle = await d.engine.hosts.handle(d.engine.desired.hosts["sbx-1"])
        instances, _ = await handle.runtime("docker").observe()
        assert [i for i in instances if i.service == "last-one"] == []
        assert [a.kind.value for a in await d.reconcile()] == []  # nothing left, nothing to guard


async def test_remove_an_out_of_band_service(sandbox: SandboxInfo, tmp_path: Path) -> None:
    """`deployerd remove NAME` removes what POST /deploy deployed; a name git manages is refused."""
    _, settings, config = one_service(sandbox, tmp_path, "cli-git", 8421)
    src = api_source(settings, "cli-oob", 8422)
    async with running_daemon(settings) as d:
        await d.reconcile()
        resp = await d.http.post("/deploy", headers=d.auth, json={
            "service_name": "cli-oob", "service_path": str(src), "service_port": 8422, "auto_register": False})
        assert resp.status_code == 202, resp.text
        await d.engine.drain()
        assert (await d.last_job("cli-oob")).status is JobStatus.SUCCEEDED
        code, out = await cli("remove", "cli-git", "--config", str(config))
        assert code == 1 and "409" in out and "managed by git" in out, out
        code, out = await cli("remove", "cli-oob", "--config", str(config))
        assert code == 0 and "removing cli-oob: job deploy-" in out, out
        await d.engine.drain()
        removed = await d.last_job("cli-oob")
        assert (removed.kind, removed.status) == ("prune", JobStatus.SUCCEEDED), removed
        handle = await d.engine.hosts.handle(d.engine.desired.hosts["sbx-1"])
        instances, kept = await handle.runtime("docker").observe()
        assert [i for i in instances if i.service == "cli-oob"] == [] and "cli-oob" not in kept
        assert all(a.service != "cli-oob" for a in await d.reconcile())  # forgotten: not healed back
        code, out = await cli("remove", "cli-oob", "--config", str(config))
        assert code == 1 and "404" in out, out
