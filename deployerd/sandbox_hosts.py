"""A sandbox's test hosts: containers that boot systemd, sshd and their own dockerd, reached over real SSH.

Each host's key is read out of band through the engine (never trusted on first use); root gets the
sandbox's own client key. Hosts are started with the flags shared/testbed.md names, and are ready once
systemd says running, the inner engine answers and busybox:latest is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from pathlib import Path

import asyncssh
from pydantic import BaseModel

from deployerd.sandbox_engine import LABEL, LABEL_HOST, LABEL_STATE_DIR, Engine
from deployerd.sandbox_image._proc import SandboxError

log = logging.getLogger("deployerd.sandbox")

BOOT_TIMEOUT = 180.0  # seconds for one host to reach "running" with its engine and busybox image


class HostInfo(BaseModel):
    name: str
    address: str = "127.0.0.1"
    ssh_port: int
    user: str = "root"
    key_path: str
    known_hosts: str
    container: str
    internal_address: str  # the container's IP on the engine bridge: its services' published ports


def write_private(path: Path, data: str) -> None:
    """Write a secret file created with mode 0600 (never briefly world-readable)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data)


def sandbox_id(state_dir: Path) -> str:
    f = state_dir / "sandbox.id"
    if not f.exists():
        f.write_text(secrets.token_hex(4) + "\n")
    return f.read_text().strip()


def ensure_client_key(state_dir: Path) -> Path:
    """The sandbox's ed25519 client key (created once per state dir, mode 0600)."""
    key_path = state_dir / "id_ed25519"
    if not key_path.exists():
        key = asyncssh.generate_private_key("ssh-ed25519", comment="deployerd-sandbox")
        write_private(key_path, key.export_private_key().decode())
        (state_dir / "id_ed25519.pub").write_text(key.export_public_key().decode())
    return key_path


async def start_host(engine: Engine, image: str, sid: str, state_dir: Path, index: int,
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


async def host_key(engine: Engine, cid: str) -> str:
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
                                  known_hosts=host.known_hosts, **kwargs)


async def wait_ready(host: HostInfo) -> None:
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


# Every test host's systemd (and its journald, logind, dockerd) takes inotify instances from root's one
# machine-wide allowance; Debian's default of 128 runs out at a few hosts and the next one fails to boot
# ("Failed to create inotify object: Too many open files").
INOTIFY_MINIMUMS = {"max_user_instances": 1024, "max_user_watches": 524288}


def raise_inotify_limits() -> None:
    """Raise the kernel's inotify limits to what several sandboxes need (never lowers them)."""
    for name, minimum in INOTIFY_MINIMUMS.items():
        path = Path("/proc/sys/fs/inotify") / name
        try:
            if int(path.read_text()) < minimum:
                path.write_text(f"{minimum}\n")
                log.info("raised fs.inotify.%s to %d for the test hosts' systemd", name, minimum)
        except (OSError, ValueError) as e:
            log.warning("could not raise fs.inotify.%s to %d (%s): test hosts may fail to boot", name, minimum, e)


async def diagnose(engine: Engine, hosts: list[HostInfo]) -> None:
    """Log why a host failed to boot before it is removed (failed units, last journal lines)."""
    for h in hosts:
        with contextlib.suppress(Exception):
            res = await engine.docker("exec", h.container, "systemctl", "--failed", "--no-legend", "--plain",
                                      check=False, timeout=10)
            jr = await engine.docker("exec", h.container, "journalctl", "-b", "-p", "warning", "-n", "30",
                                     "--no-pager", check=False, timeout=10)
            log.error("%s failed units:\n%s\njournal:\n%s", h.name, res.out, jr.out)
