"""Throwaway production servers on this machine: containers that boot systemd, sshd and their own dockerd.

deployerd's end-to-end tests and its demo need real servers. A sandbox host is a container run from an
image built once with debootstrap (see shared/testbed.md); it is reached over real SSH, with its host key
read out of band through the engine (never trusted on first use). A sandbox also runs the embedded Registry.

Ownership is by label and pid only: ``down`` removes what carries this sandbox's labels and the processes it
recorded, never anything else, so several sandboxes (demo, test run) can share one engine.

CLI: ``python -m deployerd.sandbox up --hosts N [--state-dir D]``, ``down``, ``status``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import secrets
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import httpx
from pydantic import BaseModel, Field, computed_field

from deployerd.sandbox_image import cache_dir, ensure_image, image_ref, image_version  # noqa: F401 - public here too
from deployerd.sandbox_image._proc import Result, SandboxError, file_lock, pid_alive, run, terminate
from deployerd.sandbox_swarm import SwarmInfo, form_swarm

log = logging.getLogger("deployerd.sandbox")

# --- fixed places --------------------------------------------------------------------------------------------

ENGINE_RUN_DIR = Path("/run/deployerd-sandbox")
ENGINE_DIR = Path("/var/lib/deployerd-sandbox/engine")
ENGINE_SOCKET = ENGINE_RUN_DIR / "docker.sock"
ENGINE_PIDFILE = ENGINE_RUN_DIR / "docker.pid"
ENGINE_USERS_LOCK = ENGINE_DIR / "users.lock"  # held shared by every `up` in progress
# Our own bridge, not docker0: any other engine on this machine would reconfigure a shared docker0 and cut
# the hosts off. Its subnet is distinct from the hosts' inner bridges (172.29/16, pools in 172.30/16, see
# sandbox_image/daemon.json): an overlap would route SSH replies into the host's own inner bridge.
ENGINE_BRIDGE = "deployerd0"
ENGINE_BIP = "172.28.0.1/16"
DEFAULT_DOCKER_SOCKET = Path("/var/run/docker.sock")

LABEL = "deployerd.sandbox"  # value: sandbox id
LABEL_STATE_DIR = "deployerd.sandbox.state-dir"
LABEL_HOST = "deployerd.sandbox.host"

BOOT_TIMEOUT = 180.0  # seconds for one host to reach "running" with its engine and busybox image
ENGINE_TIMEOUT = 60.0
REGISTRY_TIMEOUT = 30.0


# --- models (the sandbox.json edge) ---------------------------------------------------------------------------


class EngineInfo(BaseModel):
    url: str  # DOCKER_HOST form: unix:///path or tcp://...
    private: bool  # our own dockerd (vs. a system engine we merely use)
    started: bool = False  # this sandbox's `up` started it (only then may `down` stop it)
    pid: int | None = None


class HostInfo(BaseModel):
    name: str
    address: str = "127.0.0.1"
    ssh_port: int
    user: str = "root"
    key_path: str
    known_hosts: str
    container: str
    internal_address: str  # the container's IP on the engine bridge: its services' published ports


class RegistryInfo(BaseModel):
    url: str
    token_path: str
    pid: int
    db: str


class SandboxInfo(BaseModel):
    id: str
    state_dir: str
    image: str = ""
    engine: EngineInfo
    hosts: list[HostInfo] = Field(default_factory=list)
    registry: RegistryInfo | None = None
    swarm: SwarmInfo | None = None  # `up --swarm`: the hosts form one Swarm (sandbox_swarm)


class HostStatus(BaseModel):
    container: str
    name: str
    state: str


class SandboxStatus(BaseModel):
    id: str | None
    state_dir: str
    engine_url: str | None
    engine_answers: bool
    expected_hosts: int = 0  # hosts recorded in sandbox.json
    hosts: list[HostStatus] = Field(default_factory=list)
    registry_url: str | None = None
    registry_running: bool = False

    @computed_field  # type: ignore[prop-decorator]
    @property
    def healthy(self) -> bool:
        """Everything recorded is running: callers (the demo) reuse the sandbox instead of a new `up`."""
        return (self.id is not None and self.engine_answers and len(self.hosts) == self.expected_hosts
                and all(h.state == "running" for h in self.hosts)
                and (self.registry_url is None or self.registry_running))


# --- small process helpers ------------------------------------------------------------------------------------


def _write_private(path: Path, data: str) -> None:
    """Write a secret file created with mode 0600 (never briefly world-readable)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the engine -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Engine:
    """A Docker engine driven through the docker CLI (argv lists, DOCKER_HOST in the environment)."""

    url: str

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.url}

    async def docker(self, *args: str, stdin: bytes | None = None, check: bool = True,
                     timeout: float | None = 300.0) -> Result:
        return await run(["docker", *args], env=self.env, stdin=stdin, check=check, timeout=timeout)

    async def answers(self) -> bool:
        try:
            res = await self.docker("version", "--format", "{{.Server.Version}}", check=False, timeout=10)
        except SandboxError:
            return False
        return res.rc == 0

    async def labelled(self, kind: str, label: str) -> list[str]:
        """Ids of containers (all states) or volumes carrying ``label`` (``key`` or ``key=value``)."""
        if kind == "container":
            res = await self.docker("ps", "-aq", "--no-trunc", "--filter", f"label={label}")
        else:
            res = await self.docker("volume", "ls", "-q", "--filter", f"label={label}")
        return res.out.split()

    async def inspect(self, ref: str) -> dict:
        return json.loads((await self.docker("inspect", "--type", "container", ref)).out)[0]


async def _start_private_engine() -> EngineInfo:
    """Start our own dockerd, detached (its own session) so it outlives the `up` command."""
    ENGINE_RUN_DIR.mkdir(parents=True, exist_ok=True)
    (ENGINE_DIR / "data").mkdir(parents=True, exist_ok=True)
    logpath = ENGINE_DIR / "dockerd.log"
    argv = ["dockerd", "--host", f"unix://{ENGINE_SOCKET}", "--data-root", str(ENGINE_DIR / "data"),
            "--exec-root", str(ENGINE_RUN_DIR / "exec"), "--pidfile", str(ENGINE_PIDFILE), "--bridge", ENGINE_BRIDGE]
    t0 = time.monotonic()
    await _ensure_bridge()

    def spawn() -> int:
        with open(logpath, "ab") as logf:
            import subprocess

            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                    start_new_session=True, close_fds=True).pid

    pid = await asyncio.to_thread(spawn)
    engine = Engine(f"unix://{ENGINE_SOCKET}")
    for _ in range(int(ENGINE_TIMEOUT / 0.2)):
        if await engine.answers():
            log.info("started private Docker engine (pid %d) in %.1f s, log %s", pid, time.monotonic() - t0, logpath)
            return EngineInfo(url=engine.url, private=True, started=True, pid=pid)
        if not pid_alive(pid, "dockerd"):
            break
        await asyncio.sleep(0.2)
    raise SandboxError(f"private Docker engine did not answer; see {logpath}")


async def _ensure_bridge() -> None:
    """Create our engine's bridge (idempotent); an earlier version of ours put the same subnet on docker0."""
    if (await run(["ip", "link", "show", "dev", ENGINE_BRIDGE], check=False)).rc != 0:
        await run(["ip", "link", "add", "name", ENGINE_BRIDGE, "type", "bridge"])
    if ENGINE_BIP in (await run(["ip", "-o", "-4", "addr", "show", "dev", "docker0"], check=False)).out:
        await run(["ip", "addr", "del", ENGINE_BIP, "dev", "docker0"], check=False)
    if ENGINE_BIP not in (await run(["ip", "-o", "-4", "addr", "show", "dev", ENGINE_BRIDGE])).out:
        await run(["ip", "addr", "add", ENGINE_BIP, "dev", ENGINE_BRIDGE])
    await run(["ip", "link", "set", "dev", ENGINE_BRIDGE, "up"])


async def _remove_bridge() -> None:
    """Delete our bridge and the iptables rules dockerd left naming it (it never removes them itself)."""
    for table in ("filter", "nat"):
        res = await run(["iptables", "-t", table, "-S"], check=False)
        for line in res.out.splitlines():
            words = shlex.split(line)
            if words[:1] == ["-A"] and ENGINE_BRIDGE in words:
                await run(["iptables", "-t", table, "-D", *words[1:]], check=False)
    await run(["ip", "link", "del", "dev", ENGINE_BRIDGE], check=False)


def _private_engine_pid() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(ENGINE_PIDFILE.read_text().strip())
    return None


async def find_engine(*, start: bool) -> EngineInfo | None:
    """The engine to use: DOCKER_HOST, else the system socket if it answers, else our private one."""
    if url := os.environ.get("DOCKER_HOST"):
        if await Engine(url).answers():
            return EngineInfo(url=url, private=False)
        raise SandboxError(f"DOCKER_HOST={url} does not answer")
    if DEFAULT_DOCKER_SOCKET.exists() and await Engine(f"unix://{DEFAULT_DOCKER_SOCKET}").answers():
        return EngineInfo(url=f"unix://{DEFAULT_DOCKER_SOCKET}", private=False)
    private = Engine(f"unix://{ENGINE_SOCKET}")
    if not start:
        return EngineInfo(url=private.url, private=True, pid=_private_engine_pid()) if ENGINE_SOCKET.exists() else None
    async with file_lock(ENGINE_DIR / "engine.lock", "engine", timeout=ENGINE_TIMEOUT * 2):
        if ENGINE_SOCKET.exists() and await private.answers():
            return EngineInfo(url=private.url, private=True, started=False, pid=_private_engine_pid())
        return await _start_private_engine()


# --- the image ------------------------------------------------------------------------------------------------


# --- hosts ----------------------------------------------------------------------------------------------------


def _sandbox_id(state_dir: Path) -> str:
    f = state_dir / "sandbox.id"
    if not f.exists():
        f.write_text(secrets.token_hex(4) + "\n")
    return f.read_text().strip()


def _ensure_client_key(state_dir: Path) -> Path:
    """The sandbox's ed25519 client key (created once per state dir, mode 0600)."""
    key_path = state_dir / "id_ed25519"
    if not key_path.exists():
        key = asyncssh.generate_private_key("ssh-ed25519", comment="deployerd-sandbox")
        _write_private(key_path, key.export_private_key().decode())
        (state_dir / "id_ed25519.pub").write_text(key.export_public_key().decode())
    return key_path


async def _start_host(engine: Engine, image: str, sid: str, state_dir: Path, index: int,
                      pubkey: str) -> tuple[str, str]:
    """docker run one host (flags per testbed.md), give root our key; returns (name, container id)."""
    name = f"sbx-{index}"
    container = f"deployerd-sbx-{sid}-{index}"
    res = await engine.docker(
        "run", "-d", "--name", container, "--hostname", name,
        "--label", f"{LABEL}={sid}", "--label", f"{LABEL_STATE_DIR}={state_dir}", "--label", f"{LABEL_HOST}={name}",
        "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
        "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
        "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
        # An anonymous volume as `-v /var/lib/docker` gives, but labelled so `down` can prove it removed it.
        "--mount", f"type=volume,destination=/var/lib/docker,volume-label={LABEL}={sid}",
        "--tmpfs", "/run", "--tmpfs", "/run/lock", "--stop-signal", "SIGRTMIN+3",
        "-p", "127.0.0.1::22", image)
    cid = res.out.strip()
    await engine.docker("exec", "-i", cid, "sh", "-c",
                        "umask 077 && mkdir -p /root/.ssh && cat > /root/.ssh/authorized_keys",
                        stdin=pubkey.encode())
    return name, cid


async def _host_key(engine: Engine, cid: str) -> str:
    """The host's ed25519 public key read through the engine (trusted channel), waiting for first-boot keygen."""
    for _ in range(int(BOOT_TIMEOUT / 0.25)):
        res = await engine.docker("exec", cid, "cat", "/etc/ssh/ssh_host_ed25519_key.pub", check=False)
        words = res.out.split()
        if res.rc == 0 and len(words) >= 2 and words[0] == "ssh-ed25519":
            return f"{words[0]} {words[1]}"
        await asyncio.sleep(0.25)
    raise SandboxError(f"host {cid[:12]} generated no SSH host key")


async def connect(host: HostInfo, **kwargs: object) -> asyncssh.SSHClientConnection:
    """An SSH connection to a sandbox host, host key checked against the sandbox's known_hosts."""
    return await asyncssh.connect(host.address, host.ssh_port, username=host.user, client_keys=[host.key_path],
                                  known_hosts=host.known_hosts, **kwargs)  # type: ignore[arg-type]


async def _wait_ready(host: HostInfo) -> None:
    """Bounded wait until systemd says running (over SSH), the inner engine answers and busybox:latest exists."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    last: Exception | str = "no attempt"
    while time.monotonic() < deadline:
        try:
            async with await connect(host, connect_timeout=10) as conn:
                state = (await conn.run("systemctl is-system-running --wait", timeout=BOOT_TIMEOUT)).stdout
                state = (state or "").strip()
                if state != "running":
                    failed = (await conn.run("systemctl --failed --no-legend --plain")).stdout
                    raise SandboxError(f"{host.name}: system is {state!r}; failed units: {failed!r}")
                eng = await conn.run("docker version --format '{{.Server.Version}}'")
                img = await conn.run("docker image inspect --format '{{.Id}}' busybox:latest")
                if eng.exit_status == 0 and img.exit_status == 0:
                    return
                last = f"inner docker: {eng.stderr!r} {img.stderr!r}"
        except (asyncssh.HostKeyNotVerifiable, asyncssh.PermissionDenied):
            raise
        except (OSError, asyncssh.Error) as exc:
            last = exc
        await asyncio.sleep(0.5)
    raise SandboxError(f"{host.name} not ready after {BOOT_TIMEOUT} s: {last}")


# --- the registry ---------------------------------------------------------------------------------------------


def _registry_available() -> bool:
    try:
        return importlib.util.find_spec("deployerd.registry.__main__") is not None
    except ModuleNotFoundError:
        return False


async def _start_registry(state_dir: Path) -> RegistryInfo | None:
    """Start the embedded Registry detached (own session) and wait until GET /droplets answers."""
    if not _registry_available():
        log.warning("deployerd.registry is not available yet: sandbox runs without a Registry")
        return None
    token_path = state_dir / "registry.token"
    if not token_path.exists():
        _write_private(token_path, secrets.token_urlsafe(32) + "\n")
    db = state_dir / "registry.db"
    port = _free_port()
    argv = [sys.executable, "-m", "deployerd.registry", "serve", "--db", str(db), "--host", "127.0.0.1",
            "--port", str(port), "--token-file", str(token_path)]
    logpath = state_dir / "registry.log"

    def spawn() -> int:
        import subprocess

        with open(logpath, "ab") as logf:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                    start_new_session=True, close_fds=True).pid

    pid = await asyncio.to_thread(spawn)
    (state_dir / "registry.pid").write_text(f"{pid}\n")  # found by `up`/`down` even if sandbox.json is lost
    url = f"http://127.0.0.1:{port}"
    token = token_path.read_text().strip()
    async with httpx.AsyncClient(timeout=2.0) as client:
        for _ in range(int(REGISTRY_TIMEOUT / 0.2)):
            with contextlib.suppress(httpx.TransportError):
                await client.get(f"{url}/droplets", headers={"Authorization": f"Bearer {token}"})
                log.info("registry answering at %s (pid %d)", url, pid)
                return RegistryInfo(url=url, token_path=str(token_path), pid=pid, db=str(db))
            if not pid_alive(pid, "deployerd.registry"):
                break
            await asyncio.sleep(0.2)
    await terminate(pid, "deployerd.registry")
    raise SandboxError(f"registry did not answer at {url}; see {logpath}")


async def _stop_registry(state_dir: Path, info: SandboxInfo | None) -> None:
    pids = {info.registry.pid} if info and info.registry else set()
    with contextlib.suppress(OSError, ValueError):
        pids.add(int((state_dir / "registry.pid").read_text().strip()))
    for pid in pids:
        await terminate(pid, "deployerd.registry")
    (state_dir / "registry.pid").unlink(missing_ok=True)


# --- up / down / status ---------------------------------------------------------------------------------------


def default_state_dir() -> Path:
    return Path(os.environ.get("DEPLOYERD_SANDBOX_DIR") or Path.cwd() / ".sandbox")


def load_info(state_dir: Path) -> SandboxInfo | None:
    """The recorded sandbox of ``state_dir``, or None if it is not up."""
    f = Path(state_dir) / "sandbox.json"
    if not f.exists():
        return None
    return SandboxInfo.model_validate_json(f.read_text())


def _save_info(info: SandboxInfo) -> None:
    f = Path(info.state_dir) / "sandbox.json"
    tmp = f.with_suffix(".tmp")
    tmp.write_text(info.model_dump_json(indent=2) + "\n")
    tmp.replace(f)


async def _remove_ours(engine: Engine, sid: str, state_dir: Path) -> int:
    """Remove this sandbox's containers and volumes, and orphans of sandboxes whose state dir is gone."""
    doomed = set(await engine.labelled("container", f"{LABEL}={sid}"))
    for cid in await engine.labelled("container", LABEL):
        if cid in doomed:
            continue
        labels = (await engine.inspect(cid)).get("Config", {}).get("Labels") or {}
        owner = labels.get(LABEL_STATE_DIR)
        if owner == str(state_dir) or (owner and not Path(owner).exists()):
            doomed.add(cid)
    if doomed:
        await engine.docker("rm", "-f", "-v", *sorted(doomed))
    vols = await engine.labelled("volume", f"{LABEL}={sid}")
    if vols:
        await engine.docker("volume", "rm", "-f", *vols, check=False)
    return len(doomed)


async def up_async(hosts: int, state_dir: Path | None = None, swarm: bool = False) -> SandboxInfo:
    """Bring up ``hosts`` fresh test hosts and the Registry; write and return ``<state_dir>/sandbox.json``.

    ``swarm``: the hosts then form a Swarm (the first one its manager, with the cluster's image registry).

    Hosts this state dir already had are replaced (a clean slate per `up`); to reuse a running sandbox,
    check ``status(state_dir).healthy`` and ``load_info`` first.
    """
    if hosts < 0:
        raise ValueError("hosts must be >= 0")
    state_dir = Path(state_dir or default_state_dir()).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    sid = _sandbox_id(state_dir)
    key_path = _ensure_client_key(state_dir)
    pubkey = (state_dir / "id_ed25519.pub").read_text()
    old = load_info(state_dir)
    await _stop_registry(state_dir, old)
    try:
        async with file_lock(ENGINE_USERS_LOCK, "engine users", shared=True):
            return await _up_locked(hosts, state_dir, sid, key_path, pubkey, old, t0, swarm)
    except BaseException:
        with contextlib.suppress(Exception):
            await down_async(state_dir)  # outside the users lock, so an engine we started can stop again
        raise


async def _up_locked(hosts: int, state_dir: Path, sid: str, key_path: Path, pubkey: str,
                     old: SandboxInfo | None, t0: float, swarm: bool = False) -> SandboxInfo:
    """The body of `up`, run while this process counts as a user of the engine (so no `down` stops it)."""
    _raise_inotify_limits()
    engine_info = await find_engine(start=True)
    assert engine_info is not None
    if old and old.engine.started and old.engine.url == engine_info.url:
        engine_info.started = True  # still ours to stop at `down`
    engine = Engine(engine_info.url)
    if n := await _remove_ours(engine, sid, state_dir):
        log.info("removed %d leftover container(s) of an earlier run", n)
    info = SandboxInfo(id=sid, state_dir=str(state_dir), engine=engine_info)
    _save_info(info)  # from here on, `down` can clean up whatever follows
    try:
        info.image = await ensure_image(engine.env)
        t1 = time.monotonic()
        started = await asyncio.gather(*(_start_host(engine, info.image, sid, state_dir, i, pubkey)
                                         for i in range(1, hosts + 1)))
        known_hosts = state_dir / "known_hosts"
        lines = []
        for name, cid in started:
            data = await engine.inspect(cid)
            port = int(data["NetworkSettings"]["Ports"]["22/tcp"][0]["HostPort"])
            info.hosts.append(HostInfo(name=name, ssh_port=port, key_path=str(key_path),
                                       known_hosts=str(known_hosts), container=data["Name"].lstrip("/"),
                                       internal_address=data["NetworkSettings"]["IPAddress"]))
            lines.append(f"[127.0.0.1]:{port} {await _host_key(engine, cid)}")
        known_hosts.write_text("".join(f"{line}\n" for line in lines))
        _save_info(info)
        await asyncio.gather(*(_wait_ready(h) for h in info.hosts))
        log.info("%d host(s) ready in %.1f s", hosts, time.monotonic() - t1)
        info.registry = await _start_registry(state_dir)
        if swarm:
            info.swarm = await form_swarm(info.hosts)
        _save_info(info)
    except BaseException:
        await _diagnose(engine, info)
        raise
    log.info("sandbox %s up in %.1f s (state %s)", sid, time.monotonic() - t0, state_dir)
    return info


# Every test host's systemd (and its journald, logind, dockerd) takes inotify instances from root's one
# machine-wide allowance; Debian's default of 128 runs out at a few hosts and the next one fails to boot
# ("Failed to create inotify object: Too many open files").
INOTIFY_MINIMUMS = {"max_user_instances": 1024, "max_user_watches": 524288}


def _raise_inotify_limits() -> None:
    """Raise the kernel's inotify limits to what several sandboxes need (never lowers them)."""
    for name, minimum in INOTIFY_MINIMUMS.items():
        path = Path("/proc/sys/fs/inotify") / name
        try:
            if int(path.read_text()) < minimum:
                path.write_text(f"{minimum}\n")
                log.info("raised fs.inotify.%s to %d for the test hosts' systemd", name, minimum)
        except (OSError, ValueError) as e:
            log.warning("could not raise fs.inotify.%s to %d (%s): test hosts may fail to boot", name, minimum, e)


async def _diagnose(engine: Engine, info: SandboxInfo) -> None:
    """Log why a host failed to boot before it is removed (failed units, last journal lines)."""
    for h in info.hosts:
        with contextlib.suppress(Exception):
            res = await engine.docker("exec", h.container, "systemctl", "--failed", "--no-legend", "--plain",
                                      check=False, timeout=10)
            jr = await engine.docker("exec", h.container, "journalctl", "-b", "-p", "warning", "-n", "30",
                                     "--no-pager", check=False, timeout=10)
            log.error("%s failed units:\n%s\njournal:\n%s", h.name, res.out, jr.out)


async def down_async(state_dir: Path | None = None) -> None:
    """Remove this sandbox's containers, volumes and processes (by label and recorded pid); idempotent."""
    state_dir = Path(state_dir or default_state_dir()).resolve()
    info = load_info(state_dir)
    id_file = state_dir / "sandbox.id"
    sid = info.id if info else (id_file.read_text().strip() if id_file.exists() else None)
    await _stop_registry(state_dir, info)
    engine_info = info.engine if info else await find_engine(start=False)
    if engine_info is not None:
        engine = Engine(engine_info.url)
        if await engine.answers():
            if sid:
                await _remove_ours(engine, sid, state_dir)
            if engine_info.private and engine_info.started:
                await _stop_engine_if_unused(engine, engine_info)
    (state_dir / "sandbox.json").unlink(missing_ok=True)


async def _stop_engine_if_unused(engine: Engine, engine_info: EngineInfo) -> None:
    """Stop the private engine unless a sandbox host remains in it or another `up` is under way."""
    fd = os.open(ENGINE_USERS_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("private engine left running: another sandbox is coming up in it")
            return
        if await engine.labelled("container", LABEL):
            log.info("private engine left running: other sandboxes still use it")
            return
        await terminate(engine_info.pid or _private_engine_pid(), "dockerd", timeout=30)
        await _remove_bridge()
        log.info("private engine stopped")
    finally:
        os.close(fd)


async def status_async(state_dir: Path | None = None) -> SandboxStatus:
    """What of this sandbox is running: its host containers and the Registry."""
    state_dir = Path(state_dir or default_state_dir()).resolve()
    info = load_info(state_dir)
    st = SandboxStatus(id=info.id if info else None, state_dir=str(state_dir),
                       engine_url=info.engine.url if info else None, engine_answers=False,
                       expected_hosts=len(info.hosts) if info else 0)
    if info is None:
        return st
    engine = Engine(info.engine.url)
    st.engine_answers = await engine.answers()
    if st.engine_answers:
        for cid in await engine.labelled("container", f"{LABEL}={info.id}"):
            data = await engine.inspect(cid)
            st.hosts.append(HostStatus(container=data["Name"].lstrip("/"), state=data["State"]["Status"],
                                       name=(data["Config"]["Labels"] or {}).get(LABEL_HOST, "")))
    if info.registry:
        st.registry_url = info.registry.url
        st.registry_running = pid_alive(info.registry.pid, "deployerd.registry")
    return st


def up(hosts: int, state_dir: Path | None = None, swarm: bool = False) -> SandboxInfo:
    """Sync wrapper of :func:`up_async` for the CLI."""
    return asyncio.run(up_async(hosts, state_dir, swarm))


def down(state_dir: Path | None = None) -> None:
    """Sync wrapper of :func:`down_async` for the CLI."""
    asyncio.run(down_async(state_dir))


def status(state_dir: Path | None = None) -> SandboxStatus:
    """Sync wrapper of :func:`status_async` for the CLI."""
    return asyncio.run(status_async(state_dir))


def host_memory_bytes(container_id: str) -> int | None:
    """Memory a host uses now (cgroup v1; `docker stats` reports 0 for these hosts)."""
    mem = Path("/sys/fs/cgroup/memory")
    for f in (mem / "docker" / container_id / "memory.usage_in_bytes",  # cgroupfs driver (our engine)
              mem / "system.slice" / f"docker-{container_id}.scope" / "memory.usage_in_bytes"):  # systemd driver
        with contextlib.suppress(OSError, ValueError):
            return int(f.read_text())
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deployerd.sandbox", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="start N test hosts and the Registry")
    p_up.add_argument("--hosts", type=int, default=2)
    p_up.add_argument("--swarm", action="store_true", help="form the hosts into a Swarm with an image registry")
    for name in ("down", "status"):
        sub.add_parser(name)
    for p in sub.choices.values():
        p.add_argument("--state-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("asyncssh", "httpx"):  # one line per SSH channel or request drowns the progress lines
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if args.cmd == "up":
            print(up(args.hosts, args.state_dir, args.swarm).model_dump_json(indent=2))
        elif args.cmd == "down":
            down(args.state_dir)
        else:
            print(status(args.state_dir).model_dump_json(indent=2))
    except SandboxError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
