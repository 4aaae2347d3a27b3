"""Helpers the benches share: the sandbox, waiting for jobs, the peers' tools (.bench-venv), SSH by hand, and
the daemon as a process of its own (so its memory and CPU are its own, not the bench's)."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from deployerd.config import Settings  # noqa: E402
from deployerd.sandbox import HostInfo  # noqa: E402

PEERS_VENV = Path(os.environ.get("BENCH_PEERS_VENV", ROOT / ".bench-venv"))


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


def ssh_opts(h: HostInfo) -> list[str]:
    return ["-p", str(h.ssh_port), "-i", h.key_path, "-o", f"UserKnownHostsFile={h.known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]


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


def scale_service(i: int) -> tuple[str, str, int]:
    """Service i of the scale set: name, host (round robin over 3) and port (8700 + i // 3: < 8900 for 500)."""
    return f"svc-{i:03d}", f"sbx-{i % 3 + 1}", 8700 + i // 3


# A small service: busybox copied out of the host's preloaded busybox:latest into an empty image (~2 MB).
SCRATCH_DOCKERFILE = """FROM scratch
COPY --from=busybox:latest /bin/busybox /bin/busybox
COPY www /www
CMD ["/bin/busybox", "httpd", "-f", "-p", "{port}", "-h", "/www"]
"""

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')


class DaemonProcess:
    """``python -m deployerd run`` in its own process (this checkout's package), driven over its HTTP API."""

    def __init__(self, settings: Settings, work: Path) -> None:
        self.settings = settings
        self.config = work / "daemon.yaml"
        self.log = work / "daemon.log"
        self.config.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude_none=True)))
        self.url = f"http://127.0.0.1:{settings.listen_port}"
        self.auth = {"Authorization": f"Bearer {settings.secret('api_token')}"}
        self.proc: asyncio.subprocess.Process | None = None
        self.http = httpx.AsyncClient(base_url=self.url, timeout=600)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, limit_s: float = 60) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        log = await asyncio.to_thread(open, self.log, "ab")
        with log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "deployerd", "run", "-c", str(self.config), env=env, stdout=log,
                stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise RuntimeError(f"daemon exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            try:
                if (await self.http.get("/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
        raise TimeoutError(f"daemon not answering within {limit_s} s")

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
        while time.monotonic() - t0 < limit_s:
            rows = {r["name"]: r for r in (await self.get("/services"))["services"]}
            if all(n in rows and (rows[n]["sync_status"], rows[n]["health_status"]) == ("Synced", "Healthy")
                   for n in names):
                return time.monotonic() - t0
            await asyncio.sleep(1)
        missing = sorted(n for n in names if n not in rows or rows[n]["sync_status"] != "Synced")
        raise TimeoutError(f"{len(missing)} services not synced within {limit_s} s: {missing[:10]}")

    async def stop(self) -> None:
        await self.http.aclose()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 120)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
