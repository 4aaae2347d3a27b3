"""systemd deployments end to end: real git, real OpenSSH, real systemd and venvs on sandbox hosts, real Registry.

The same scenarios as the Docker ones (deploy, change, failed releases rolled back and quarantined, git revert
without rebuild, prune, healing of a unit stopped by hand), plus what only systemd has: the dedicated user,
the hardening, the env file, offline wheels, and a Docker service next to a systemd one on one host.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon_harness import Daemon, DesiredRepo, git, http_get, registry_client, running_daemon, settings_for

from deployerd.plan import ActionKind
from deployerd.runtimes.systemd import SystemdRuntime, default_user, unit_name
from deployerd.sandbox import SandboxInfo
from deployerd.store import JobStatus, PhaseStatus

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

APP = '''\
"""A tiny service using only the standard library: /health, and /facts for the tests."""
import json, os, pwd, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = {version!r}
MODE = {mode!r}
port = int(sys.argv[sys.argv.index("--port") + 1])
host = sys.argv[sys.argv.index("--host") + 1] if "--host" in sys.argv else "0.0.0.0"
if MODE == "crash":
    print("fatal: config missing", flush=True)
    sys.exit(1)
print(f"starting v{{VERSION}} on {{port}}", flush=True)


def can_write(path):
    try:
        with open(path, "w") as f:
            f.write("x")
        os.remove(path)
        return True
    except OSError:
        return False


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a load through the public port reuses its connection

    def do_GET(self):
        if self.path == "/health":
            code = 200 if MODE == "ok" else 500
            body = {{"status": "active" if code == 200 else "broken", "version": VERSION}}
        elif self.path == "/":  # what a load through the public port asks for
            code, body = 200, {{"version": VERSION}}
        elif self.path == "/facts":
            service_dir = os.path.dirname(os.path.dirname(os.getcwd()))
            try:
                import tinyver
                extra = tinyver.VERSION
            except ImportError:
                extra = None
            code, body = 200, {{
                "version": VERSION, "user": pwd.getpwuid(os.geteuid()).pw_name, "argv": sys.argv[1:],
                "echo": os.environ.get("ECHO"), "python": sys.executable, "cwd": os.getcwd(), "extra": extra,
                "write_release": can_write("probe.txt"),
                "write_data": can_write(os.path.join(service_dir, "data", "probe.txt")),
                "write_etc": can_write("/etc/deployerd-probe"),
            }}
        else:
            code, body = 404, {{}}
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


ThreadingHTTPServer((host, port), Handler).serve_forever()
'''

HOSTILE_ENV = 'q"x\\y $HOME %h #z \'s `id` ;'  # quotes, backslash, variable, specifier, comment, backticks
HOSTILE_ARGS = ["%h", "$HOME", ";", 'q"x', "back\\slash"]


def systemd_service(repo: DesiredRepo, name: str, port: int, host: str = "sbx-1", version: str = "1", *,
                    mode: str = "ok", health_timeout_s: float = 15, command: str | None = None,
                    **extra: Any) -> None:
    """A stdlib-only Python web service run by a systemd unit: its manifest and its source folder."""
    manifest = {"name": name, "host": host, "method": "systemd", "port": port, "source": f"services/{name}",
                "health": {"path": "/health", "timeout_s": health_timeout_s, "interval_s": 0.5},
                "systemd": {"command": command or "python3 app.py --port {port}"}, **extra}
    repo.write(f"services/{name}.yaml", yaml.safe_dump(manifest))
    repo.write(f"services/{name}/app.py", APP.format(version=version, mode=mode))


def make_wheel(out: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A pure-Python wheel written by hand (zip + dist-info + RECORD), no build tool and no network."""
    out.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    contents = {**files,
                f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                f"{dist}/WHEEL": ("Wheel-Version: 1.0\nGenerator: deployerd-tests\nRoot-Is-Purelib: true\n"
                                  "Tag: py3-none-any\n")}
    record = []
    for path, text in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    wheel = out / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in contents.items():
            z.writestr(path, text)
        z.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return wheel


def phase(job, name):  # type: ignore[no-untyped-def]
    return next(p for p in job.phases if p.phase == name)


def url(sandbox: SandboxInfo, port: int, path: str = "/") -> str:
    return f"http://{sandbox.hosts[0].internal_address}:{port}{path}"


async def conn_of(d: Daemon, host: str = "sbx-1"):  # type: ignore[no-untyped-def]
    return (await d.engine.hosts.handle(d.engine.desired.hosts[host])).conn


async def sh(d: Daemon, *argv: str, check: bool = True) -> str:
    return (await (await conn_of(d)).run(list(argv), check=check)).stdout.strip()


def service_dir(d: Daemon, name: str) -> str:
    return f"/opt/fpai/services/{d.engine.settings.instance}-{name}"


def unit(d: Daemon, name: str) -> str:
    return unit_name(f"{d.engine.settings.instance}-{name}")


async def facts(sandbox: SandboxInfo, port: int) -> dict[str, Any]:
    resp = await http_get(url(sandbox, port, "/facts"))
    assert resp.status_code == 200, resp.text
    return resp.json()


async def _remove_units(d: Daemon) -> None:
    """Leave the shared sandbox as found: this daemon's units, service dirs and users go."""
    await d.engine.drain()
    for spec in (d.engine.desired.hosts.values() if d.engine.desired else []):
        try:
            handle = await d.engine.hosts.handle(spec)
        except Exception:
            continue
        rt = SystemdRuntime(handle.conn, spec, d.engine.settings.instance)
        instances, _ = await rt.observe()
        for service in {i.service for i in instances}:
            await rt.remove_service(service)


@asynccontextmanager
async def systemd_daemon(settings: Any) -> AsyncIterator[Daemon]:
    async with running_daemon(settings) as d:
        try:
            yield d
        finally:
            await _remove_units(d)


async def test_deploy_change_revert_as_a_hardened_unit(sandbox: SandboxInfo, tmp_path: Path) -> None:
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    command = "python3 app.py --port {port} " + " ".join(f"'{a}'" for a in HOSTILE_ARGS)
    systemd_service(repo, "sd-web", 8301, command=command, env={"ECHO": HOSTILE_ENV})
    repo.commit("v1")
    async with systemd_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        actions = await d.reconcile()
        assert [(a.service, a.kind) for a in actions] == [("sd-web", ActionKind.DEPLOY)]
        v1 = await d.last_job("sd-web")
        assert v1.status is JobStatus.SUCCEEDED, (v1.error, v1.logs)
        assert all(p.status is PhaseStatus.SUCCEEDED for p in v1.phases), [(p.phase, p.status) for p in v1.phases]
        sdir = service_dir(d, "sd-web")
        assert phase(v1, "Start Service").details["unit"] == unit(d, "sd-web")

        # serving from the release's venv, as the dedicated user, with argv and env exactly as written
        f = await facts(sandbox, 8301)
        user = default_user(f"{d.engine.settings.instance}-sd-web")
        assert f["version"] == "1" and f["user"] == user != "root"
        assert f["python"] == f"{sdir}/venvs/{v1.release}/bin/python3"
        assert f["cwd"] == f"{sdir}/releases/{v1.release}"
        assert f["argv"] == ["--port", "8301", *HOSTILE_ARGS]
        assert f["echo"] == HOSTILE_ENV
        # hardening: the release and the system are read-only, the data dir is writable
        assert (f["write_release"], f["write_etc"], f["write_data"]) == (False, False, True)
        main_pid = await sh(d, "systemctl", "show", "--value", "--property=MainPID", unit(d, "sd-web"))
        assert await sh(d, "stat", "-c", "%U", f"/proc/{main_pid}") == user
        assert await sh(d, "stat", "-c", "%a %U", f"{sdir}/env/{v1.release}.env") == "600 root"
        assert await sh(d, "systemctl", "is-enabled", unit(d, "sd-web")) == "enabled"

        async with registry_client(sandbox) as reg:
            entry = await reg.get_by_name("sd-web")
        assert entry is not None and entry.endpoint == f"http://{sandbox.hosts[0].internal_address}:8301"
        assert entry.metadata["release"] == v1.release and entry.metadata["method"] == "systemd"

        # observed in one round trip, and in sync
        conn = await conn_of(d)
        rt = SystemdRuntime(conn, d.engine.desired.hosts["sbx-1"], d.engine.settings.instance)
        before = conn.stats.round_trips
        instances, kept = await rt.observe()
        assert conn.stats.round_trips - before == 1
        assert [(i.service, i.release, i.state.value) for i in instances] == [("sd-web", v1.release, "running")]
        assert kept == {"sd-web": [v1.release]}
        actions = await d.reconcile()
        assert [a.kind for a in actions] == [ActionKind.NOOP]

        # change: a new release, `current` switched, the old release kept
        systemd_service(repo, "sd-web", 8301, version="2", command=command, env={"ECHO": HOSTILE_ENV})
        repo.commit("v2")
        actions = await d.reconcile()
        assert [(a.kind, a.reasons) for a in actions] == [(ActionKind.DEPLOY, ["changed: source files"])]
        v2 = await d.last_job("sd-web")
        assert v2.status is JobStatus.SUCCEEDED and v2.release != v1.release, (v2.error, v2.logs)
        assert phase(v2, "Transfer").details["files_sent"] == 1
        assert (await facts(sandbox, 8301))["version"] == "2"
        assert await sh(d, "readlink", f"{sdir}/current") == f"releases/{v2.release}"
        assert set((await sh(d, "ls", "-1", f"{sdir}/releases")).split()) >= {v1.release, v2.release}

        # git revert: the kept release comes back without transfer or build
        git(repo.path, "revert", "--no-edit", "HEAD")
        actions = await d.reconcile()
        back_action = next(a for a in actions if a.service == "sd-web")
        assert back_action.kind is ActionKind.DEPLOY and back_action.kept and back_action.release == v1.release
        back = await d.last_job("sd-web")
        assert back.status is JobStatus.SUCCEEDED and back.release == v1.release, (back.error, back.logs)
        assert phase(back, "Build").status is PhaseStatus.SKIPPED
        assert phase(back, "Transfer").status is PhaseStatus.SKIPPED
        assert (await facts(sandbox, 8301))["version"] == "1"
        assert await sh(d, "readlink", f"{sdir}/current") == f"releases/{v1.release}"

        # retention: what is not kept goes (source, venv, env file, manifest); `current` never does
        removed = await rt.retain("sd-web", keep=[])
        assert removed.releases == [v2.release]
        assert (await sh(d, "ls", "-1", f"{sdir}/releases")).split() == [v1.release, f"{v1.release}.manifest.json"]
        assert (await sh(d, "ls", "-1", f"{sdir}/venvs")).split() == [v1.release]
        assert (await sh(d, "ls", "-1", f"{sdir}/env")).split() == [f"{v1.release}.env"]
        assert (await facts(sandbox, 8301))["version"] == "1"


@pytest.mark.parametrize("breakage", ["crash", "unhealthy"])
async def test_failed_release_rolls_back_and_is_quarantined(sandbox: SandboxInfo, tmp_path: Path,
                                                             breakage: str) -> None:
    port = {"crash": 8311, "unhealthy": 8312}[breakage]
    name = f"sd-{breakage}"
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    systemd_service(repo, name, port, health_timeout_s=6)
    repo.commit("good")
    async with systemd_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        await d.reconcile()
        good = await d.last_job(name)
        assert good.status is JobStatus.SUCCEEDED, (good.error, good.logs)

        systemd_service(repo, name, port, version="2", mode=breakage, health_timeout_s=6)
        repo.commit(f"break {name}")
        await d.reconcile()
        job = await d.last_job(name)
        assert job.status is JobStatus.ROLLED_BACK, (job.status, job.error, job.rollback)
        assert job.rollback and job.rollback["release"] == good.release and job.rollback["seconds"] > 0
        assert phase(job, "Verify Health").status is PhaseStatus.FAILED
        if breakage == "crash":
            assert "is failed" in (job.error or "")  # the wait ended on the unit's state, not the timeout
            assert "fatal: config missing" in job.logs
        else:
            assert "not healthy within 6 s" in (job.error or "")
            assert f"starting v2 on {port}" in job.logs
        f = await facts(sandbox, port)
        assert f["version"] == "1"
        assert await sh(d, "readlink", f"{service_dir(d, name)}/current") == f"releases/{good.release}"
        async with registry_client(sandbox) as reg:
            entry = await reg.get_by_name(name)
        assert entry is not None and entry.metadata["release"] == good.release

        # quarantined: not retried until git changes
        actions = await d.reconcile()
        mine = [a for a in actions if a.service == name]
        assert [a.kind for a in mine] == [ActionKind.BLOCKED] and "quarantined" in mine[0].reasons[0]
        assert (await d.last_job(name)).id == job.id


async def test_stopped_unit_is_healed_and_deleted_manifest_pruned(sandbox: SandboxInfo, tmp_path: Path) -> None:
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    systemd_service(repo, "sd-keeper", 8321)
    systemd_service(repo, "sd-goner", 8322)
    repo.commit("two")
    async with systemd_daemon(settings_for(tmp_path, sandbox, repo)) as d, registry_client(sandbox) as reg:
        await d.reconcile()
        assert (await d.last_job("sd-keeper")).status is JobStatus.SUCCEEDED
        assert await reg.get_by_name("sd-goner") is not None

        # stopped by hand: healed by the next reconcile, from the kept release (no rebuild)
        await sh(d, "systemctl", "stop", unit(d, "sd-keeper"))
        assert await sh(d, "systemctl", "is-active", unit(d, "sd-keeper"), check=False) == "inactive"
        actions = await d.reconcile()
        heal = next(a for a in actions if a.service == "sd-keeper")
        assert heal.kind is ActionKind.DEPLOY and "not running (stopped)" in heal.reasons
        healed = await d.last_job("sd-keeper")
        assert healed.status is JobStatus.SUCCEEDED and phase(healed, "Build").status is PhaseStatus.SKIPPED
        assert (await facts(sandbox, 8321))["version"] == "1"

        # manifest deleted: unit, files and Registry entry gone; the other service untouched
        goner_dir = service_dir(d, "sd-goner")
        repo.remove("services/sd-goner.yaml")
        repo.remove("services/sd-goner")
        repo.commit("remove sd-goner")
        actions = await d.reconcile()
        assert [a.kind for a in actions if a.service == "sd-goner"] == [ActionKind.PRUNE]
        assert (await d.last_job("sd-goner")).status is JobStatus.SUCCEEDED
        conn = await conn_of(d)
        assert not (await conn.run(["test", "-e", f"/etc/systemd/system/{unit(d, 'sd-goner')}"], check=False)).ok
        assert not (await conn.run(["test", "-e", goner_dir], check=False)).ok
        load = await sh(d, "systemctl", "show", "--value", "--property=LoadState", unit(d, "sd-goner"))
        assert load == "not-found"
        assert await reg.get_by_name("sd-goner") is None
        assert await reg.get_by_name("sd-keeper") is not None
        assert (await facts(sandbox, 8321))["version"] == "1"


async def test_offline_wheels_install_into_the_release_venv(sandbox: SandboxInfo, tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path / "wheels", "tinyver", "7.1", {"tinyver/__init__.py": 'VERSION = "7.1"\n'})
    # the wheel is valid: pip installs it offline here too
    target = tmp_path / "check"
    await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "-q",
                                             "--target", str(target), str(wheel)], check=True, capture_output=True)
    assert (target / "tinyver" / "__init__.py").exists()

    repo = DesiredRepo(tmp_path / "repo", sandbox)
    systemd_service(repo, "sd-wheels", 8341)
    repo.write("services/sd-wheels/requirements.txt", "tinyver==7.1\n")
    (repo.path / "services/sd-wheels/wheels").mkdir()
    shutil.copy(wheel, repo.path / "services/sd-wheels/wheels" / wheel.name)
    repo.commit("with a wheel")
    async with systemd_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        await d.reconcile()
        job = await d.last_job("sd-wheels")
        assert job.status is JobStatus.SUCCEEDED, (job.error, job.logs)
        assert phase(job, "Build").details["offline_wheels"] is True
        assert (await facts(sandbox, 8341))["extra"] == "7.1"


async def test_docker_and_systemd_side_by_side_with_timings(sandbox: SandboxInfo, tmp_path: Path,
                                                            record_property: Any) -> None:
    """One host runs both methods; deploy and rollback are measured the same way for each."""
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("dk-pair", 8331, health_timeout_s=6)
    systemd_service(repo, "sd-pair", 8332, health_timeout_s=6)
    repo.commit("both")
    async with systemd_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        actions = await d.reconcile()
        assert {a.service: a.kind for a in actions} == {"dk-pair": ActionKind.DEPLOY, "sd-pair": ActionKind.DEPLOY}
        dk, sd = await d.last_job("dk-pair"), await d.last_job("sd-pair")
        assert dk.status is JobStatus.SUCCEEDED and sd.status is JobStatus.SUCCEEDED, (dk.error, sd.error, sd.logs)
        assert (dk.method, sd.method) == ("docker", "systemd")
        assert "dk-pair v1" in (await http_get(url(sandbox, 8331))).text
        assert (await facts(sandbox, 8332))["version"] == "1"
        assert [a.kind for a in await d.reconcile()] == [ActionKind.NOOP, ActionKind.NOOP]

        # break both health checks in one commit: both roll back
        repo.remove("services/dk-pair/www/health")
        systemd_service(repo, "sd-pair", 8332, version="2", mode="unhealthy", health_timeout_s=6)
        repo.commit("break both")
        await d.reconcile()
        dk_rb, sd_rb = await d.last_job("dk-pair"), await d.last_job("sd-pair")
        assert dk_rb.status is JobStatus.ROLLED_BACK and sd_rb.status is JobStatus.ROLLED_BACK
        timings = {
            "docker": {"deploy_s": dk.duration_seconds, "build_s": phase(dk, "Build").duration_seconds,
                       "rollback_s": dk_rb.rollback["seconds"], "failed_job_s": dk_rb.duration_seconds},
            "systemd": {"deploy_s": sd.duration_seconds, "build_s": phase(sd, "Build").duration_seconds,
                        "rollback_s": sd_rb.rollback["seconds"], "failed_job_s": sd_rb.duration_seconds},
        }
        record_property("timings", json.dumps(timings))
        print("TIMINGS", json.dumps(timings))
        assert "dk-pair v1" in (await http_get(url(sandbox, 8331))).text
        assert (await facts(sandbox, 8332))["version"] == "1"


async def test_temp_files_a_killed_daemon_left_go_with_the_next_deploy(sandbox: SandboxInfo, tmp_path: Path) -> None:
    """A SIGKILL between an atomic write and its rename leaves ``.<name>.tmp-*`` beside the target; the next
    deploy of the service removes its own, and leaves every other file, hidden or not, alone."""
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    repo.service("dk-tmp", 8335, health_timeout_s=10)
    systemd_service(repo, "sd-tmp", 8336, health_timeout_s=10)
    repo.commit("v1")
    async with systemd_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        await d.reconcile()
        for name in ("dk-tmp", "sd-tmp"):
            assert (await d.last_job(name)).status is JobStatus.SUCCEEDED
        sd_unit = unit(d, "sd-tmp")
        left = [f"{service_dir(d, n)}/{sub}.{f}.tmp-0123456789ab" for n in ("dk-tmp", "sd-tmp")
                for sub, f in (("", "x.env"), ("releases/", "r1.manifest.json"), ("env/", "r1.env"))]
        left.append(f"/etc/systemd/system/.{sd_unit}.tmp-0123456789ab")
        kept = [f"{service_dir(d, 'dk-tmp')}/.keep", f"{service_dir(d, 'sd-tmp')}/releases/.keep",
                "/etc/systemd/system/.other-unit.service.tmp-0123456789ab"]
        await sh(d, "mkdir", "-p", f"{service_dir(d, 'dk-tmp')}/env", f"{service_dir(d, 'sd-tmp')}/env")
        await sh(d, "touch", *left, *kept)

        repo.service("dk-tmp", 8335, version="2", health_timeout_s=10)
        systemd_service(repo, "sd-tmp", 8336, version="2", health_timeout_s=10)
        repo.commit("v2")
        await d.reconcile()
        for name in ("dk-tmp", "sd-tmp"):
            assert (await d.last_job(name)).status is JobStatus.SUCCEEDED
        still = (await sh(d, "ls", "-1d", "--", *left, *kept, check=False)).splitlines()
        assert sorted(still) == sorted(kept)
        await sh(d, "rm", "-f", "--", *kept)
