"""Crash safety: SIGKILL the daemon inside each of the six phases, for Docker and for systemd, and restart it
(and, behind a host's ingress proxy, on either side of the switch, Docker and systemd).

The daemon runs as a real process (``python -m deployerd run``) on a real git repository, the sandbox hosts
and the sandbox Registry. Each case deploys a new release, watches the job through the HTTP API until the
phase under test is ``running``, kills the daemon with SIGKILL, starts it again on the same state dir, and
checks that the service converges: the desired release serves on its port, healthy and registered, with
exactly one running container (or one unit), no more releases kept than ``keep_releases``, no partial or
temporary files left, and the killed job recorded as ``interrupted``.

The phases are caught by real slowness where it is natural: a large file (Transfer), a slow build step
(Build: a slow ``RUN``; systemd: a venv with pip), a service that listens late (Verify Health) and a slow
Registry (Register: a loopback proxy that holds writes). Validation and Start Service last milliseconds:
they are held by a test-only failpoint (``deployerd/failpoints.py``) armed only in the process that is
killed. The cases of one method share one repository, service and daemon state dir (each case is a new
release of the same service), which also makes retention bite: every case adds a release.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Self

import aiodocker
import httpx
import pytest
import pytest_asyncio
import uvicorn
import yaml
from daemon_harness import DaemonProcess, DesiredRepo, free_port, registry_client, running_daemon, settings_for
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from test_systemd import make_wheel

import deployerd
from deployerd.desired import DesiredState, expected_registry_entry, load_desired
from deployerd.observe import Hosts
from deployerd.runtimes.base import qualified_name
from deployerd.runtimes.systemd import UNIT_DIR, unit_name
from deployerd.sandbox import SandboxInfo
from deployerd.store import PHASES
from deployerd.tree import GitTree

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

VALIDATION, TRANSFER, BUILD, START, HEALTH, REGISTER = PHASES
SHORT = {VALIDATION: "Validation", TRANSFER: "Transfer", BUILD: "Build", START: "Start", HEALTH: "Health",
         REGISTER: "Register"}
FAILPOINTS = {VALIDATION, START}  # too short to catch from outside: held by deployerd.failpoints
METHODS = {"docker": ("sbx-1", 8431), "systemd": ("sbx-2", 8432)}  # host and port; the service: crash-<method>
KEEP = 2  # keep_releases: small, so that every case's new release makes retention remove one
BIG_FILE_MB = 32  # Transfer: long enough to be caught on a fast machine, a second or two on a slow one
LATE_LISTEN_S = 6  # Verify Health: the service listens this long after it starts
REGISTRY_DELAY_S = 8  # Register: the proxy holds writes this long (below the client's 10 s timeout)
ROOT = Path(deployerd.__file__).resolve().parents[1]
FIGURES: dict[str, dict[str, float | int]] = {}  # case -> seconds of each step, printed at the end

APP = '''\
"""A stdlib web service that may take a while before it listens (to hold Verify Health)."""
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = {version!r}
port = int(sys.argv[sys.argv.index("--port") + 1])
time.sleep({delay})


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        data = json.dumps({{"status": "active", "version": VERSION}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
'''


class SlowRegistry:
    """A loopback HTTP proxy in front of the sandbox Registry that holds every write for ``delay`` seconds
    while it is set: a slow Registry, so the Register phase lasts long enough to be caught."""

    def __init__(self, upstream: str) -> None:
        self.delay = 0.0
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # no kept-alive connections upstream: one the Registry closed as it was reused failed a forwarded
        # request with a 500 once (RemoteProtocolError), which a test then waited 240 s on
        self._client = httpx.AsyncClient(base_url=upstream, timeout=30,
                                         limits=httpx.Limits(max_keepalive_connections=0))
        app = Starlette(routes=[Route("/{path:path}", self._forward,
                                      methods=["GET", "POST", "PUT", "PATCH", "DELETE"])])
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._task: asyncio.Task[None] | None = None

    async def _forward(self, request: Request) -> Response:
        body = await request.body()
        if request.method != "GET" and self.delay:
            await asyncio.sleep(self.delay)
            if await request.is_disconnected():  # the daemon was killed meanwhile: its write never lands
                return Response(status_code=499)
        headers = {k: v for k, v in request.headers.items() if k in ("authorization", "content-type", "accept")}
        path = request.scope.get("raw_path", b"").decode() or request.url.path
        resp = await self._client.request(request.method, path, params=request.query_params, content=body,
                                          headers=headers)
        return Response(resp.content, status_code=resp.status_code, media_type=resp.headers.get("content-type"))

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._server.serve())
        for _ in range(200):
            if self._server.started:
                break
            await asyncio.sleep(0.05)
        assert self._server.started, "the Registry proxy did not start"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        await self._client.aclose()


class Stack:
    """One method's repository, daemon (config, state dir, process), host and service under test."""

    def __init__(self, method: str, sandbox: SandboxInfo, tmp: Path, registry: SlowRegistry) -> None:
        self.method = method
        self.sandbox = sandbox
        self.host, self.port = METHODS[method]
        self.service = f"crash-{method}"  # one name per method: the stacks share the Registry
        self.repo = DesiredRepo(tmp / "repo", sandbox)
        self.settings = settings_for(tmp, sandbox, self.repo, keep_releases=KEEP).model_copy(
            update={"registry_url": registry.url})
        self.daemon = DaemonProcess(self.settings, tmp)
        self.api = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.settings.listen_port}", timeout=10)
        self.hosts = Hosts(self.settings.ssh_key, self.settings.known_hosts, instance=self.settings.instance)
        self.version = 0
        self.release = ""
        self.desired: DesiredState | None = None
        self.ingress = False  # behind the host's proxy: one unit per release (systemd)

    # ---------------------------------------------------------------- desired state
    def write(self, slow: str | None) -> None:
        """The next version of the service, made slow in the phase ``slow`` (and only there)."""
        self.version += 1
        manifest: dict[str, Any] = {
            "name": self.service, "host": self.host, "method": self.method, "port": self.port,
            "source": f"services/{self.service}", "health": {"path": "/health", "timeout_s": 60, "interval_s": 0.5}}
        src = self.repo.path / "services" / self.service
        src.mkdir(parents=True, exist_ok=True)
        blob = src / "blob.bin"
        if slow == TRANSFER:
            blob.write_bytes(os.urandom(BIG_FILE_MB << 20))
        elif blob.exists():
            blob.unlink()
        delay = LATE_LISTEN_S if slow == HEALTH else 0
        if self.method == "docker":
            build = f"RUN sleep 6 && echo {self.settings.instance}-{self.version}\n" if slow == BUILD else ""
            self.repo.write(f"services/{self.service}/Dockerfile", (
                f"FROM busybox:latest\n{build}COPY www /www\n"
                f'CMD ["sh", "-c", "sleep {delay}; exec busybox httpd -f -p {self.port} -h /www"]\n'))
            self.repo.write(f"services/{self.service}/www/health",
                            json.dumps({"status": "active", "version": str(self.version)}))
        else:
            manifest["systemd"] = {"command": "python3 app.py --port {port}"}
            self.repo.write(f"services/{self.service}/app.py", APP.format(version=str(self.version), delay=delay))
            requirements, wheels = src / "requirements.txt", src / "wheels"
            if slow == BUILD:  # pip in the venv: ensurepip and an offline install take seconds
                requirements.write_text("tinyver\n")
                make_wheel(wheels, "tinyver", "1.0", {"tinyver.py": "VERSION = '1.0'\n"})
            else:
                requirements.unlink(missing_ok=True)
                for wheel in wheels.glob("*") if wheels.exists() else []:
                    wheel.unlink()
        self.repo.write(f"services/{self.service}.yaml", yaml.safe_dump(manifest))

    def commit(self, message: str) -> str:
        rev = self.repo.commit(message)
        tree = GitTree(self.repo.path, rev)
        try:
            self.desired = load_desired(tree, rev)
        finally:
            tree.close()
        assert not self.desired.errors, self.desired.errors
        self.release = self.desired.releases[self.service].id
        return rev

    # ---------------------------------------------------------------- the daemon
    async def start(self, failpoints: str | None = None) -> None:
        await self.daemon.start(failpoints, limit_s=60)

    async def get(self, path: str) -> Any:
        resp = await self.api.get(path)
        resp.raise_for_status()
        return resp.json()

    async def wait_phase(self, phase: str) -> str:
        """Watch the job deploying ``self.release`` until ``phase`` runs (and, for a failpoint, holds there);
        returns the job id. Fails when the phase was missed."""
        order = list(PHASES)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.daemon.alive(), f"the daemon exited:\n{self.daemon.tail()}"
            for job in (await self.get(f"/services/{self.service}/history?limit=5"))["jobs"]:
                if job["release"] != self.release:
                    continue
                status = {p["phase"]: p["status"] for p in job["phases"]}
                later = [p for p in order[order.index(phase) + 1:] if status.get(p, "pending") != "pending"]
                assert job["status"] in ("pending", "running") and not later, (
                    f"missed {phase}: job {job['id']} is {job['status']}, phases {status}")
                if status.get(phase) == "running" and (
                        phase not in FAILPOINTS or f"failpoint {phase} reached" in self.daemon.tail(200)):
                    return str(job["id"])
            await asyncio.sleep(0.05)
        pytest.fail(f"{phase} of release {self.release} never ran:\n{self.daemon.tail()}")

    # ---------------------------------------------------------------- convergence
    async def not_converged(self) -> str | None:
        """Why the service is not converged on ``self.release`` yet (None once it is)."""
        try:
            health = await self.get("/health")
            svc = await self.get(f"/services/{self.service}")
        except httpx.HTTPError as e:
            return f"daemon API: {type(e).__name__}: {e}"
        if health["status"] != "active":
            return f"daemon health {health['status']}: {health.get('degraded')}"
        got = (svc["sync_status"], svc["health_status"], svc["running_release"])
        if got != ("Synced", "Healthy", self.release):
            return f"service status {got}"
        last = svc["last_job"] or {}
        if (last.get("status"), last.get("release")) != ("succeeded", self.release):
            return f"last job {last.get('id')} {last.get('status')} release {last.get('release')}"
        address = next(h.internal_address for h in self.sandbox.hosts if h.name == self.host)
        try:
            answer = (await self.api.get(f"http://{address}:{self.port}/health")).json()
        except (httpx.HTTPError, ValueError) as e:
            return f"service port: {type(e).__name__}: {e}"
        if answer.get("version") != str(self.version):
            return f"service answers version {answer.get('version')}, want {self.version}"
        assert self.desired is not None
        want = expected_registry_entry(self.desired.services[self.service], self.desired.hosts[self.host],
                                       self.desired.releases[self.service], self.settings.instance)
        async with registry_client(self.sandbox) as reg:
            entry = await reg.get_by_name(self.service)
        if entry is None or (entry.endpoint, entry.status, entry.metadata) != (
                want["endpoint"], want["status"], want["metadata"]):
            return f"registry entry {entry}"
        return None

    async def wait_converged(self, timeout: float = 240) -> None:
        t0 = time.monotonic()
        why: str | None = "not checked"
        while time.monotonic() - t0 < timeout:
            assert self.daemon.alive(), f"the daemon exited:\n{self.daemon.tail()}"
            why = await self.not_converged()
            if why is None:
                return
            await asyncio.sleep(0.5)
        pytest.fail(f"not converged on release {self.release} within {timeout:g} s: {why}\n{self.daemon.tail()}")

    # ---------------------------------------------------------------- the host, read directly
    async def run(self, *argv: str) -> str:
        assert self.desired is not None
        handle = await self.hosts.handle(self.desired.hosts[self.host])
        return (await handle.conn.run(list(argv), check=False)).stdout

    async def assert_host_clean(self) -> None:
        """One serving instance of the desired release; at most KEEP releases of anything; no leftovers."""
        assert self.desired is not None
        q = qualified_name(self.service, self.settings.instance)
        sdir = f"{self.desired.hosts[self.host].base_dir}/{q}"
        listing = {d: (await self.run("ls", "-1A", "--", f"{sdir}/{d}")).split()
                   for d in ("", "releases", "env", "venvs")}
        leftovers = [f"{d}/{e}" for d, entries in listing.items() for e in entries
                     if ".partial" in e or ".tmp-" in e or e == "current.new"]
        assert not leftovers, f"partial or temporary files left on the host: {leftovers}"
        releases = {e.removesuffix(".manifest.json") for e in listing["releases"]}
        assert self.release in releases and len(releases) <= KEEP, f"release dirs: {sorted(releases)}"
        assert len(listing["env"]) <= KEEP, f"env files: {listing['env']}"
        assert len(listing["venvs"]) <= KEEP, f"venvs: {listing['venvs']}"
        if self.method == "docker":
            handle = await self.hosts.handle(self.desired.hosts[self.host])
            labels = {"label": [f"deployerd.instance={self.settings.instance}", f"deployerd.service={self.service}"]}
            async with aiodocker.Docker(url=f"unix://{await handle.conn.docker_socket()}") as d:
                found = [c._container for c in await d.containers.list(all=True, filters=json.dumps(labels))]
                images = await d.images.list(filters=labels)
            running = [c["Labels"]["deployerd.release"] for c in found if c["State"] == "running"]
            assert running == [self.release], f"running containers of {self.service}: {running}"
            assert len(found) <= KEEP, f"containers: {[c['Names'] for c in found]}"
            image_releases = {(i.get("Labels") or {}).get("deployerd.release") for i in images}
            assert self.release in image_releases and len(images) <= KEEP, f"images: {image_releases}"
        elif self.ingress:  # one unit per release: the desired one runs, the others are kept stopped
            found = (await self.run("find", UNIT_DIR, "-maxdepth", "1", "-name", f"deployerd-{q}[@.]*")).split()
            units = sorted(f.rsplit("/", 1)[-1] for f in found)
            running = [u for u in units if (await self.run("systemctl", "is-active", u)).strip() == "active"]
            assert running == [unit_name(q, self.release)], f"running units of {self.service}: {running} of {units}"
            assert unit_name(q) not in units and len(units) <= KEEP, f"unit files: {units}"
            assert (await self.run("readlink", f"{sdir}/current")).strip() == f"releases/{self.release}"
        else:
            units = (await self.run("find", UNIT_DIR, "-maxdepth", "1", "-name", f"*deployerd-{q}*")).split()
            assert units == [f"{UNIT_DIR}/{unit_name(q)}"], f"unit files: {units}"
            assert (await self.run("systemctl", "is-active", unit_name(q))).strip() == "active"
            assert (await self.run("readlink", f"{sdir}/current")).strip() == f"releases/{self.release}"

    async def close(self) -> None:
        """Stop the daemon; remove its deployments and Registry entry with an in-process engine on its state."""
        await self.daemon.close()
        await self.api.aclose()
        await self.hosts.close()
        async with running_daemon(self.settings) as d:
            await d.engine.preview()


class Stacks:
    """The stacks of the methods this run selected, their first good releases deployed concurrently."""

    def __init__(self, sandbox: SandboxInfo, tmp: pytest.TempPathFactory, proxy: SlowRegistry,
                 methods: list[str]) -> None:
        self.proxy = proxy
        self.stacks = {m: Stack(m, sandbox, tmp.mktemp(f"crash-{m}"), proxy) for m in methods}
        self._ready = {m: asyncio.create_task(self._first_release(st)) for m, st in self.stacks.items()}

    @staticmethod
    async def _first_release(st: Stack) -> None:
        st.write(None)
        st.commit("first good release")
        t0 = time.monotonic()
        await st.start()
        await st.wait_converged()
        FIGURES[f"{st.method}: first deploy"] = {"converge": time.monotonic() - t0}

    async def ready(self, method: str) -> Stack:
        await self._ready[method]
        return self.stacks[method]

    async def close(self) -> None:
        for task in self._ready.values():
            task.cancel()
        await asyncio.gather(*self._ready.values(), return_exceptions=True)
        for st in self.stacks.values():
            await st.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stacks(request: pytest.FixtureRequest, sandbox: SandboxInfo,
                 tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stacks]:
    """One stack per method selected in this run (its first good release deployed), closed at the end."""
    assert sandbox.registry is not None
    methods = sorted({item.callspec.params["method"] for item in request.session.items
                      if item.module is request.module and hasattr(item, "callspec")})
    async with SlowRegistry(sandbox.registry.url) as proxy:
        made = Stacks(sandbox, tmp_path_factory, proxy, methods)
        try:
            yield made
        finally:
            await made.close()
            print("\ncrash safety, seconds per step (arm: restart with the failpoint armed; catch: commit to the "
                  "phase running; converge: restart to converged)")
            for name, steps in FIGURES.items():
                print(f"  {name:<22} " + "  ".join(f"{k} {v:5.1f}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in steps.items()))


CASES = [pytest.param(m, p, id=f"{m}-{SHORT[p]}") for m in METHODS for p in PHASES]


@pytest.mark.timeout(600)
@pytest.mark.parametrize(("method", "phase"), CASES)
async def test_sigkill_in_phase_converges_after_restart(stacks: Stacks, method: str, phase: str) -> None:
    st = await stacks.ready(method)
    steps: dict[str, float | int] = {}
    FIGURES[f"{method}-{SHORT[phase]}"] = steps
    assert await st.not_converged() is None, "the service was not converged before the crash"
    t0 = time.monotonic()
    if phase in FAILPOINTS:  # only the process that is killed has the failpoint armed
        await st.daemon.stop()
        await st.start(failpoints=phase)
        steps["arm"] = time.monotonic() - t0
    st.write(slow=phase)
    stacks.proxy.delay = REGISTRY_DELAY_S if phase == REGISTER else 0
    try:
        st.commit(f"version {st.version}: slow {phase}")
        t0 = time.monotonic()
        job_id = await st.wait_phase(phase)
        steps["catch"] = time.monotonic() - t0
        killed_pid = st.daemon.proc.pid if st.daemon.proc else 0
        await st.daemon.kill()
    finally:
        stacks.proxy.delay = 0
    if phase == BUILD:  # the killed daemon's build goes on on the host (no pty over SSH: no SIGHUP)
        steps["orphans"] = sum(st.release in line for line in (await st.run("ps", "-eo", "args")).splitlines())

    t0 = time.monotonic()
    await st.start()
    await st.wait_converged()
    steps["converge"] = time.monotonic() - t0
    left = glob.glob(os.path.join(tempfile.gettempdir(), f"deployerd-ssh-{killed_pid}-*"))
    assert not left, f"the killed daemon's socket dirs are still there: {left}"
    print(f"{method}-{SHORT[phase]}: converged {steps['converge']:.1f} s after the restart")

    killed = await st.get(f"/jobs/{job_id}")
    assert killed["status"] == "interrupted", killed
    assert {p["phase"]: p["status"] for p in killed["phases"]}[phase] == "failed"
    history = await st.get(f"/services/{st.service}/history")
    assert any(r["release"] == st.release and r["status"] == "good" for r in history["releases"]), (
        "the converged release was never verified healthy (not recorded good)")
    await st.assert_host_clean()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", list(METHODS))
async def test_sigterm_drains_the_deploy_in_flight(stacks: Stacks, method: str) -> None:
    """A graceful stop (SIGTERM, what systemd sends) lets the deploy in flight finish before the process
    ends, with exit code 0: nothing is left interrupted."""
    st = await stacks.ready(method)
    assert await st.not_converged() is None, "the service was not converged before the stop"
    st.write(slow=HEALTH)
    st.commit(f"version {st.version}: slow {HEALTH}, then SIGTERM")
    job_id = await st.wait_phase(HEALTH)
    code = await st.daemon.stop(limit_s=120)
    assert code == 0, f"exit code {code} after SIGTERM:\n{st.daemon.tail()}"
    await st.start()
    job = await st.get(f"/jobs/{job_id}")
    assert job["status"] == "succeeded", job
    assert [p["status"] for p in job["phases"]] == ["succeeded"] * len(PHASES), job["phases"]
    await st.wait_converged()
    await st.assert_host_clean()


INGRESS_PORTS = {"docker": 8433, "systemd": 8434}
SWITCH_POINTS = ["Before Switch", "Switch"]  # failpoints in deployerd.switch: new instance up / proxy switched


@pytest.mark.timeout(600)
@pytest.mark.parametrize("method", list(INGRESS_PORTS))
async def test_sigkill_around_the_ingress_switch(sandbox: SandboxInfo, tmp_path_factory: pytest.TempPathFactory,
                                                 method: str) -> None:
    """Behind the host's proxy (Docker; systemd with one unit per release): SIGKILL between starting the new
    instance and the switch, and between the switch and stopping the old one. After a restart exactly one
    instance serves, none is orphaned, and a bounded load through the public port saw no failed request over
    the whole crash and recovery."""
    from load_gen import run_load

    assert sandbox.registry is not None
    async with SlowRegistry(sandbox.registry.url) as registry:
        st = Stack(method, sandbox, tmp_path_factory.mktemp(f"crash-ingress-{method}"), registry)
        st.service, st.port, st.ingress = f"crash-ingress-{method}", INGRESS_PORTS[method], True
        hosts = {h.name: {"address": h.address, "ssh_port": h.ssh_port, "user": h.user,
                          "public_address": h.internal_address, "ingress": "haproxy"} for h in sandbox.hosts}
        st.repo.write("hosts.yaml", yaml.safe_dump({"hosts": hosts}))
        address = next(h.internal_address for h in sandbox.hosts if h.name == st.host)
        try:
            st.write(None)
            st.commit("first good release")
            await st.start()
            await st.wait_converged()
            for point in SWITCH_POINTS:
                await st.daemon.stop()
                await st.start(failpoints=point)
                stop = asyncio.Event()
                load = asyncio.create_task(run_load(address, st.port, rate=50, seconds=300, stop=stop,
                                                         path="/health"))
                try:
                    st.write(None)
                    st.commit(f"version {st.version}: killed at {point}")
                    deadline = time.monotonic() + 120
                    while f"failpoint {point} reached" not in st.daemon.tail(200):
                        assert time.monotonic() < deadline, f"{point} never reached:\n{st.daemon.tail()}"
                        await asyncio.sleep(0.05)
                    await st.daemon.kill()
                    await st.start()
                    await st.wait_converged()
                finally:
                    stop.set()
                result = await load
                assert result.failed == 0, f"{point}: {result.summary()}"
                await st.assert_host_clean()
        finally:
            await st.close()
