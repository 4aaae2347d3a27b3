"""Zero downtime, measured: requests failed while deployerd changes a service, stop-first next to the proxy.

One run, one daemon, two hosts of one sandbox: ``sbx-1`` with ``ingress: none`` (the old instance stops, then
the new one starts) and ``sbx-2`` with ``ingress: haproxy`` (the new one starts beside the old one on a
private port, is proven, and the proxy switches); on each, the same small Docker service and the same small
systemd service (a stdlib Python app; behind the proxy one unit per release). For each operation, a bounded
load of 50 requests/s per service (bench's lean keep-alive client, one request in flight) goes to the
service's public port on its host's address, from 0.5 s before the reconcile until 0.5 s after its jobs ended:
1. a change (new content),
2. a failed release (its health check fails: rolled back automatically),
3. a rollback of a release whose process exits at start,
4. a git revert to the kept first release (no rebuild).
Rounds: BENCH_ROUNDS (default 2), interleaved. Reported per method, mode and operation: failed requests, the
longest time without a successful answer, the job's duration (commit to healthy and registered).

Run: DEPLOYERD_BENCH_SANDBOX=<state dir of a running 2-host sandbox> .venv/bin/python bench/ingress_bench.py
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from daemon_harness import DOCKERFILE, DesiredRepo, git, running_daemon, settings_for  # noqa: E402
from load_gen import run_load  # noqa: E402
from test_ingress_systemd import service as systemd_service  # noqa: E402

from deployerd import sandbox as sbx  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "2"))
STOP, PROXY = "stop-first (ingress: none)", "proxy (ingress: haproxy)"
# (method, mode) -> host, service, port
SERVICES = {("docker", STOP): ("sbx-1", "zb-stop", 8321), ("docker", PROXY): ("sbx-2", "zb-proxy", 8322),
            ("systemd", STOP): ("sbx-1", "zs-stop", 8323), ("systemd", PROXY): ("sbx-2", "zs-proxy", 8324)}
EXITS = 'FROM busybox:latest\nCMD ["sh", "-c", "echo fatal: config missing; exit 1"]\n'


def write(repo: DesiredRepo, method: str, host: str, name: str, port: int, version: str, mode: str = "ok") -> None:
    """Version ``version`` of one service; ``mode``: ok, broken (its health check fails) or exit (at start)."""
    if method == "systemd":
        systemd_service(repo, name, port, version, mode, host=host)
        return
    repo.service(name, port, host=host, version=version, health_timeout_s=6, drain_timeout_s=5,
                 dockerfile=EXITS if mode == "exit" else DOCKERFILE.format(port=port))
    if mode == "broken":
        (repo.path / "services" / name / "www" / "health").unlink()  # committed by the next `git add -A`


async def main() -> None:
    state = os.environ.get("DEPLOYERD_BENCH_SANDBOX")
    if not state:
        raise SystemExit("set DEPLOYERD_BENCH_SANDBOX to a running 2-host sandbox's state dir")
    info = sbx.SandboxInfo.model_validate_json((Path(state) / "sandbox.json").read_text())
    address = {h.name: h.internal_address for h in info.hosts}
    rows: dict[tuple[str, str, str], list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="ingress-bench-") as tmp:
        repo = DesiredRepo(Path(tmp) / "repo", info)
        hosts = {h.name: {"address": h.address, "ssh_port": h.ssh_port, "user": h.user,
                          "public_address": h.internal_address, "ingress": "none" if h.name == "sbx-1" else "haproxy"}
                 for h in info.hosts}
        repo.write("hosts.yaml", yaml.safe_dump({"hosts": hosts}))

        def write_all(version: str, mode: str = "ok") -> None:
            for (method, _), (host, name, port) in SERVICES.items():
                write(repo, method, host, name, port, version, mode)

        write_all("1")
        repo.commit("v1")
        async with running_daemon(settings_for(Path(tmp), info, repo)) as d:
            await d.reconcile()

            async def measure(op: str) -> None:
                """The reconcile just committed for, under load on every service at once."""
                stop = asyncio.Event()
                loads = {key: asyncio.create_task(run_load(address[h], p, rate=50, seconds=180, stop=stop))
                         for key, (h, _, p) in SERVICES.items()}
                await asyncio.sleep(0.5)
                await d.reconcile()
                await asyncio.sleep(0.5)
                stop.set()
                for (method, mode), (_, name, _) in SERVICES.items():
                    r = await loads[(method, mode)]
                    job = await d.last_job(name)
                    rows.setdefault((method, op, mode), []).append(
                        f"{r.failed}/{len(r.samples)} failed, gap {r.longest_gap_s():.2f} s, job {job.status.value} "
                        f"{job.duration_seconds:.2f} s")

            v1 = git(repo.path, "rev-parse", "HEAD")
            for i in range(ROUNDS):
                write_all(f"2.{i}")
                change = repo.commit(f"change {i}")
                await measure("change")
                write_all(f"3.{i}", "broken")
                repo.commit(f"break {i}")
                await measure("failed release (health fails; rolled back)")
                write_all(f"4.{i}", "exit")
                repo.commit(f"exits at start {i}")
                await measure("rollback (the release exits at start)")
                git(repo.path, "checkout", change, "--", "services")  # the change again: serving, nothing to do
                repo.commit(f"undo the failures {i}")
                await d.reconcile()
                git(repo.path, "checkout", v1, "--", "services")  # v1's files: a kept release, no rebuild
                repo.commit(f"revert to v1 {i}")
                await measure("git revert to the kept release")
    print("\n| method | operation | mode | per round: failed requests, longest gap, job |\n|---|---|---|---|")
    for (method, op, mode), cells in sorted(rows.items(), key=lambda kv: (kv[0][0], list(rows).index(kv[0]))):
        print(f"| {method} | {op} | {mode} | {'; '.join(cells)} |")


if __name__ == "__main__":
    asyncio.run(main())
