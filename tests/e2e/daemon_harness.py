"""End-to-end harness: a real desired-state git repository and a real daemon (engine + HTTP API) in-process.

Every daemon gets its own instance name, state dir and repository, so tests sharing the sandbox's hosts and
Registry never see (or prune) each other's services.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml

from deployerd.api import create_app
from deployerd.config import Settings
from deployerd.daemon import Subscribers, close_engine, open_engine
from deployerd.desired import HostSpec
from deployerd.engine import Engine
from deployerd.registry_client import RegistryClient
from deployerd.sandbox import HostInfo, SandboxInfo
from deployerd.store import Job

ROOT = Path(__file__).resolve().parents[2]

DOCKERFILE = """FROM busybox:latest
COPY www /www
CMD ["busybox", "httpd", "-f", "-v", "-p", "{port}", "-h", "/www"]
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def ssh_opts(h: HostInfo) -> list[str]:
    """OpenSSH client options for a sandbox host, its key verified (tests and benches that use the plain client)."""
    return ["-p", str(h.ssh_port), "-i", h.key_path, "-o", f"UserKnownHostsFile={h.known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def private_file(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


class DesiredRepo:
    """A real git repository of desired state, committed to the way a user would."""

    def __init__(self, path: Path, sandbox: SandboxInfo) -> None:
        self.path = path
        path.mkdir(parents=True)
        git(path, "init", "-q", "-b", "main")
        git(path, "config", "user.email", "test@deployerd.local")
        git(path, "config", "user.name", "deployerd tests")
        hosts = {
            h.name: {"address": h.address, "ssh_port": h.ssh_port, "user": h.user,
                     "public_address": h.internal_address}
            for h in sandbox.hosts
        }
        self.write("hosts.yaml", yaml.safe_dump({"hosts": hosts}))

    def write(self, rel: str, text: str) -> None:
        p = self.path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    def service(self, name: str, port: int, host: str = "sbx-1", version: str = "1", *,
                dockerfile: str | None = None, health_timeout_s: float = 15, **extra: Any) -> None:
        """A small busybox web service: its manifest and its source folder."""
        manifest = {"name": name, "host": host, "method": "docker", "port": port, "source": f"services/{name}",
                    "health": {"path": "/health", "timeout_s": health_timeout_s, "interval_s": 0.5}, **extra}
        self.write(f"services/{name}.yaml", yaml.safe_dump(manifest))
        self.write(f"services/{name}/Dockerfile", dockerfile or DOCKERFILE.format(port=port))
        self.write(f"services/{name}/www/health",
                   json.dumps({"status": "active", "service": name, "version": version}))
        self.write(f"services/{name}/www/index.html", f"<h1>{name} v{version}</h1>\n")

    def remove(self, rel: str) -> None:
        git(self.path, "rm", "-rq", rel)

    def commit(self, message: str) -> str:
        git(self.path, "add", "-A")
        git(self.path, "commit", "-qm", message)
        return git(self.path, "rev-parse", "HEAD")


async def containers_of(daemon: Daemon, host: HostSpec, service: str) -> list[dict[str, Any]]:
    """The daemon's containers of ``service`` on ``host``, read straight from its engine (not through deployerd)."""
    import aiodocker

    handle = await daemon.engine.hosts.handle(host)
    sock = await handle.conn.docker_socket()
    labels = [f"deployerd.service={service}", f"deployerd.instance={daemon.engine.settings.instance}"]
    async with aiodocker.Docker(url=f"unix://{sock}") as d:
        found = await d.containers.list(all=True, filters=json.dumps({"label": labels}))
        return [c._container for c in found]


class Daemon:
    """deployerd with its API on a loopback port; tests drive reconciles directly, or run the real loop."""

    def __init__(self, engine: Engine, url: str, token: str, subscribers: Subscribers) -> None:
        self.engine = engine
        self.subscribers = subscribers  # notifications and the audit trail, as the daemon runs them
        self.url = url
        self.token = token
        self.http = httpx.AsyncClient(base_url=url, timeout=30)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def reconcile(self, force: set[str] | None = None) -> list[Any]:
        """One reconcile, then wait for the jobs it started (and for none to be left running)."""
        actions = await self.engine.reconcile(["test"], force=force)
        await self.engine.drain()
        return actions

    async def jobs(self, service: str) -> list[Job]:
        return await self.engine.store.jobs(service)

    async def last_job(self, service: str) -> Job:
        jobs = await self.jobs(service)
        assert jobs, f"no job for {service}"
        return jobs[0]


def api_source(settings: Settings, name: str, port: int) -> Path:
    """A busybox web service's folder under the daemon's API source directory, for the older POST /deploy."""
    src = settings.api_source_root / name
    (src / "www").mkdir(parents=True)
    (src / "Dockerfile").write_text(DOCKERFILE.format(port=port))
    (src / "www" / "health").write_text('{"status": "active"}')
    return src


def settings_for(tmp: Path, sandbox: SandboxInfo, repo: DesiredRepo, **overrides: Any) -> Settings:
    assert sandbox.registry is not None, "the sandbox runs no Registry"
    tmp.mkdir(parents=True, exist_ok=True)
    return Settings(
        repo_url=str(repo.path), branch="main", state_dir=tmp / "state",
        instance=overrides.pop("instance", None) or f"t{secrets.token_hex(3)}",  # shared by daemons that share hosts
        registry_url=sandbox.registry.url, registry_token_file=Path(sandbox.registry.token_path),
        ssh_key=Path(sandbox.hosts[0].key_path),
        known_hosts=overrides.pop("known_hosts", None) or Path(sandbox.hosts[0].known_hosts),
        api_token_file=private_file(tmp / "api.token", secrets.token_urlsafe(24)),
        webhook_secret_file=private_file(tmp / "webhook.secret", secrets.token_urlsafe(24)),
        listen_port=free_port(), poll_interval_s=3600, resync_interval_s=3600,
        **overrides,
    )


@asynccontextmanager
async def running_daemon(settings: Settings, loop: bool = False, cleanup: bool = True) -> AsyncIterator[Daemon]:
    """Open the daemon (store, Registry client, engine) and serve its API; with ``loop`` also run its loop.

    With ``cleanup`` (the default) its deployments are removed at the end; a test that restarts the
    daemon passes False for the first run so the second finds them.
    """
    engine = await open_engine(settings)
    subscribers = Subscribers(engine)
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=settings.listen_port,
                                           log_level="warning"))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    serving = asyncio.create_task(server.serve())
    stop = asyncio.Event()
    loop_task = asyncio.create_task(engine.run(stop)) if loop else None
    for _ in range(200):
        if server.started:
            break
        await asyncio.sleep(0.05)
    daemon = Daemon(engine, f"http://127.0.0.1:{settings.listen_port}", settings.secret("api_token") or "",
                    subscribers)
    try:
        yield daemon
    finally:
        stop.set()  # the loop first: a resync running during the cleanup would redeploy what it removes
        if loop_task is not None:
            await loop_task
        if cleanup:
            await _remove_instance(engine)
        server.should_exit = True
        await serving
        await daemon.http.aclose()
        await subscribers.close()
        await close_engine(engine)


async def _remove_instance(engine: Engine) -> None:
    """Leave the shared sandbox as found: this test daemon's deployments (containers, images, units, files,
    through each runtime's own prune) and its Registry entries go."""
    await engine.drain()
    for spec in (engine.desired.hosts.values() if engine.desired else []):
        try:
            handle = await engine.hosts.handle(spec)
        except Exception:
            continue
        for runtime in handle.runtimes.values():
            instances, kept = await runtime.observe()
            for service in {i.service for i in instances} | set(kept):
                await runtime.remove_service(service)
    for name, entry in (await engine.registry.list()).items():
        if (entry.metadata or {}).get("instance") == engine.settings.instance:
            await engine.registry.deregister(name)


async def remove_deployment(settings: Settings) -> None:
    """What a daemon process with ``settings`` deployed, removed by an engine of its own that looks once at git
    and the hosts (benchmarks that ran the daemon as a separate process)."""
    engine = await open_engine(settings)
    try:
        await engine.preview()
        await _remove_instance(engine)
    finally:
        await close_engine(engine)


def registry_client(sandbox: SandboxInfo) -> RegistryClient:
    assert sandbox.registry is not None
    return RegistryClient(sandbox.registry.url, token=Path(sandbox.registry.token_path).read_text().strip())


async def http_get(url: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5) as client:
        return await client.get(url)


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')


class DaemonProcess:
    """``python -m deployerd run`` (this checkout) as a process of its own, driven over its HTTP API.

    Its config is written to ``work/config.yaml`` and its output appended to ``work/daemon.log``. The crash
    test kills it; the benches and the soak read its memory and CPU from /proc, which are then its own.
    """

    def __init__(self, settings: Settings, work: Path, timeout_s: float = 600) -> None:
        self.settings = settings
        work.mkdir(parents=True, exist_ok=True)
        self.config = work / "config.yaml"
        self.log = work / "daemon.log"
        self.config.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude_none=True)))
        self.url = f"http://127.0.0.1:{settings.listen_port}"
        self.auth = {"Authorization": f"Bearer {settings.secret('api_token')}"}
        self.proc: asyncio.subprocess.Process | None = None
        self.http = httpx.AsyncClient(base_url=self.url, timeout=timeout_s)

    def env(self) -> dict[str, str]:
        """The child's environment: no DEPLOYERD_* variables (the config file says it all), this checkout first."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEPLOYERD_")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        return env

    async def start(self, failpoints: str | None = None, limit_s: float = 180) -> None:
        """Start it (``failpoints`` armed, see deployerd.failpoints) and wait until its API answers."""
        env = self.env()
        if failpoints:
            env["DEPLOYERD_FAILPOINTS"] = failpoints
        with self.log.open("ab") as out:
            out.write(f"---- start (failpoints: {failpoints or '-'})\n".encode())
            out.flush()
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "deployerd", "run", "--config", str(self.config), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        deadline = time.monotonic() + limit_s  # a loaded machine starts Python slowly
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"the daemon exited:\n{self.tail()}")
            try:
                if (await self.http.get("/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
        raise TimeoutError(f"the daemon's API did not answer within {limit_s:g} s:\n{self.tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def kill(self) -> None:
        """SIGKILL, as a crash would."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()
        self.proc = None

    async def stop(self, limit_s: float = 120) -> int | None:
        """SIGTERM (a graceful stop: the daemon drains its jobs), SIGKILL after ``limit_s``; the exit code."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), limit_s)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                return None
        return proc.returncode

    async def close(self) -> int | None:
        """Stop it and close the API client."""
        code = await self.stop()
        await self.http.aclose()
        return code

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    async def get(self, path: str) -> Any:
        resp = await self.http.get(path)
        resp.raise_for_status()
        return resp.json()

    async def sync(self) -> dict[str, Any]:
        """POST /sync: one reconcile, answered when it has planned and launched its jobs."""
        resp = await self.http.post("/sync", headers=self.auth, json={})
        resp.raise_for_status()
        return resp.json()

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The /metrics samples: (name, sorted labels) -> value."""
        resp = await self.http.get("/metrics")
        resp.raise_for_status()
        out = {}
        for line in resp.text.splitlines():
            m = _SAMPLE.match(line)
            if m:
                labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")))
                out[(m.group(1), labels)] = float(m.group(3))
        return out

    async def wait_services(self, names: set[str], limit_s: float) -> float:
        """Wait until every named service is Synced and Healthy; the seconds it took."""
        t0 = time.monotonic()
        rows: dict[str, Any] = {}
        while time.monotonic() - t0 < limit_s:
            rows = {r["name"]: r for r in (await self.get("/services"))["services"]}
            if all(n in rows and (rows[n]["sync_status"], rows[n]["health_status"]) == ("Synced", "Healthy")
                   for n in names):
                return time.monotonic() - t0
            await asyncio.sleep(1)
        missing = sorted(n for n in names if n not in rows or rows[n]["sync_status"] != "Synced")
        raise TimeoutError(f"{len(missing)} services not synced within {limit_s} s: {missing[:10]}")
