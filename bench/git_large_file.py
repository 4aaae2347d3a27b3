"""A large file in the desired-state repository: time and the daemon's peak memory, next to plain `git fetch`.

A repository whose Docker service ``big-web`` (on sbx-1) holds a 90 MB file (random bytes: git cannot compress
them) and, outside every service's folder, a 10 MB file no service uses. The daemon runs as its own process
(``python -m deployerd run``, its local-repository watch), so its memory is its own:
1. the first commit: the daemon's first fetch (its ``fetch`` stage on /health), the first deploy (commit ->
   job ended, its Transfer phase and bytes sent), and its peak RSS (VmHWM) during it;
2. a later commit changing 1 MiB in the middle of the 90 MB file: the same figures (the peak reset first,
   ``echo 5 > /proc/PID/clear_refs``).
The baseline, in the same run: plain `git fetch` of the same repository into a bare repository, first and later.

Run: DEPLOYERD_BENCH_SANDBOX=<state dir of a running sandbox> .venv/bin/python bench/git_large_file.py
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "bench"))

from _common import rss_kib  # noqa: E402
from daemon_harness import DaemonProcess, DesiredRepo, remove_deployment, settings_for  # noqa: E402

from deployerd import sandbox as sbx  # noqa: E402

MB = 1_000_000
BIG = 90 * MB
PORT = 8341


def cli_fetch(source: Path, bare: Path) -> float:
    """Plain `git fetch` of the branch into a bare repository (created on first use); seconds."""
    if not bare.exists():
        subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    t0 = time.monotonic()
    subprocess.run(["git", "-C", str(bare), "fetch", "--quiet", "--no-tags", "--", str(source),
                    "+refs/heads/main:refs/heads/main"], check=True, timeout=600)
    return time.monotonic() - t0


async def next_job(d: DaemonProcess, after: str | None, limit_s: float = 900) -> tuple[dict[str, Any], dict]:
    """The first job of big-web newer than ``after`` once finished, and /health's last reconcile as it was when
    that job first appeared (the reconcile that launched it: the next one starts only when the job ends)."""
    deadline = time.monotonic() + limit_s
    launched: dict = {}
    while time.monotonic() < deadline:
        resp = await d.http.get("/services/big-web/history")  # 404 until the first look loaded the manifests
        jobs = resp.json()["jobs"] if resp.status_code == 200 else []
        if jobs and jobs[0]["id"] != after:
            if not launched:
                launched = (await d.get("/health"))["last_reconcile"] or {}
            if jobs[0]["status"] not in ("pending", "running"):
                return jobs[0], launched
        await asyncio.sleep(0.1)
    raise TimeoutError(f"no finished job of big-web within {limit_s} s:\n{d.tail()}")


def peak_reset(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def summary(job: dict[str, Any], launched: dict, committed: float, rss0: int, pid: int) -> str:
    transfer = next(p for p in job["phases"] if p["phase"] == "Transfer")
    done = time.time()
    return (f"job {job['status']}; fetch stage {launched.get('stages', {}).get('fetch', float('nan')):.2f} s, "
            f"load {launched.get('stages', {}).get('load', float('nan')):.2f} s; commit -> job ended "
            f"{done - committed:.1f} s (job {job['duration_seconds']:.1f} s; "
            f"Transfer {transfer['duration_seconds']:.1f} s, "
            f"{transfer['details'].get('bytes_sent', 0) / MB:.1f} MB sent, {transfer['details'].get('files_delta', 0)} "
            f"delta); daemon RSS {rss0 / 1024:.0f} MiB before, peak {rss_kib(pid, 'VmHWM') / 1024:.0f} MiB "
            f"(+{(rss_kib(pid, 'VmHWM') - rss0) / 1024:.0f}), after {rss_kib(pid) / 1024:.0f} MiB")


async def main() -> None:
    state = os.environ.get("DEPLOYERD_BENCH_SANDBOX")
    info = sbx.load_info(Path(state)) if state else None
    if info is None:
        raise SystemExit("set DEPLOYERD_BENCH_SANDBOX to a running sandbox's state dir")
    rnd = random.Random(90)
    with tempfile.TemporaryDirectory(prefix="git-large-") as tmp:
        work = Path(tmp)
        repo = DesiredRepo(work / "repo", info)
        repo.service("big-web", PORT, host=info.hosts[0].name, health_timeout_s=120)
        big = repo.path / "services" / "big-web" / "www" / "big.bin"
        data = bytearray(rnd.randbytes(BIG))
        big.write_bytes(data)
        (repo.path / "docs").mkdir()
        (repo.path / "docs" / "unused.bin").write_bytes(rnd.randbytes(10 * MB))
        repo.commit("big-web with a 90 MB file")
        cli = [cli_fetch(repo.path, work / "cli.git")]  # first, so the daemon's first fetch is not the one to warm
        # the page cache
        settings = settings_for(work / "daemon", info, repo)
        d = DaemonProcess(settings, work / "daemon")
        rows = []
        try:
            committed = time.time()
            await d.start()
            rss0 = rss_kib(d.pid)
            job, launched = await next_job(d, None)
            rows.append("first commit (daemon started on it): " + summary(job, launched, committed, rss0, d.pid))

            data[BIG // 2:BIG // 2 + MB] = rnd.randbytes(MB)
            big.write_bytes(data)
            del data
            await asyncio.sleep(2)  # the reconcile the job's end asked for is over
            peak_reset(d.pid)
            rss0 = rss_kib(d.pid)
            repo.commit("1 MiB of the 90 MB file changed")  # git add + commit of 90 MB: not the daemon's time
            committed = time.time()
            job, launched = await next_job(d, job["id"])
            rows.append("later commit (1 MiB of it changed): " + summary(job, launched, committed, rss0, d.pid))
            cli.append(cli_fetch(repo.path, work / "cli.git"))
        finally:
            await d.close()
            await remove_deployment(settings)
    print(f"plain git fetch: first {cli[0]:.2f} s, later {cli[1]:.2f} s")
    for r in rows:
        print(r)


if __name__ == "__main__":
    asyncio.run(main())
