"""Helpers the benches share: waiting for jobs, the peers' tools (.bench-venv), SSH by hand, and /proc figures
(the daemon as a process of its own is tests/e2e/daemon_harness.DaemonProcess)."""

from __future__ import annotations

import asyncio
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from daemon_harness import ssh_opts  # noqa: E402  (re-exported for the benches)

from deployerd import sandbox as sbx  # noqa: E402
from deployerd.connection import Connection, HostAddress  # noqa: E402
from deployerd.sandbox import HostInfo  # noqa: E402

PEERS_VENV = Path(os.environ.get("BENCH_PEERS_VENV", ROOT / ".bench-venv"))


def bench_sandbox() -> sbx.SandboxInfo:
    """The running sandbox DEPLOYERD_BENCH_SANDBOX names (its state dir)."""
    state = os.environ.get("DEPLOYERD_BENCH_SANDBOX")
    info = sbx.load_info(Path(state)) if state else None
    if info is None:
        raise SystemExit("set DEPLOYERD_BENCH_SANDBOX to a running sandbox's state dir")
    return info


async def bench_host(connect_timeout: float = 30.0) -> tuple[HostInfo, Connection]:
    """The first host of the sandbox that DEPLOYERD_BENCH_SANDBOX names, and one SSH connection to it (its host
    key verified against the sandbox's known_hosts)."""
    h = bench_sandbox().hosts[0]
    conn = await Connection.open(HostAddress(name=h.name, address=h.address, port=h.ssh_port, user=h.user,
                                             key_path=h.key_path, known_hosts=h.known_hosts),
                                 connect_timeout=connect_timeout)
    return h, conn


async def wait_job(d, service: str, after: str | None, limit_s: float = 300):  # type: ignore[no-untyped-def]
    """The first finished job of ``service`` newer than job id ``after``."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        jobs = await d.jobs(service)
        if jobs and jobs[0].id != after and jobs[0].status.finished:
            return jobs[0]
        await asyncio.sleep(0.05)
    raise TimeoutError(f"no finished job for {service} within {limit_s} s")


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ssh(h: HostInfo, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """One OpenSSH connection running ``script`` in the host's shell (what a user's script does)."""
    return subprocess.run(["ssh", *ssh_opts(h), f"{h.user}@{h.address}", script], check=check,
                          capture_output=True, text=True, timeout=600)


def rsync(h: HostInfo, src: Path, dest: str, stats: bool = False) -> subprocess.CompletedProcess[str]:
    e = "ssh " + " ".join(shlex.quote(o) for o in ssh_opts(h))
    return subprocess.run(["rsync", "-a", "--delete", *(["--stats"] if stats else []), "-e", e,
                           f"{src}/", f"{h.user}@{h.address}:{dest}/"], check=True, capture_output=True,
                          text=True, timeout=600)


def peer_tool(name: str) -> Path:
    tool = PEERS_VENV / "bin" / name
    if not tool.exists():
        raise SystemExit(f"{tool} missing: `make bench` creates {PEERS_VENV} with ansible and pyinfra")
    return tool


def rss_kib(pid: int | str = "self", field: str = "VmRSS") -> int:
    """Resident memory in KiB (VmRSS; RssAnon is the part not backed by files such as shared libraries)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0



def cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used (/proc/PID/stat utime and stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scale_service(i: int, hosts: int = 3) -> tuple[str, str, int]:
    """Service i of the scale set: name, host (round robin over ``hosts``) and port (8700 + i // hosts: < 8900
    for 500 over 3)."""
    return f"svc-{i:03d}", f"sbx-{i % hosts + 1}", 8700 + i // hosts


# A small service: busybox copied out of the host's preloaded busybox:latest into an empty image (~2 MB).
SCRATCH_DOCKERFILE = """FROM scratch
COPY --from=busybox:latest /bin/busybox /bin/busybox
COPY www /www
CMD ["/bin/busybox", "httpd", "-f", "-p", "{port}", "-h", "/www"]
"""
