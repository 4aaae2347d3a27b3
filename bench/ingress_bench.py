"""Zero downtime, measured: requests failed while deployerd changes a service, stop-first next to the proxy.

One run, one daemon, two hosts of one sandbox: ``sbx-1`` with ``ingress: none`` (the old instance stops, then
the new one starts) and ``sbx-2`` with ``ingress: haproxy``; the same small Docker service on each. For each
operation, a bounded load of 50 requests/s (bench's lean keep-alive client, one request in flight) goes to the
service's public port on its host's address, from 0.5 s before the reconcile until 0.5 s after its job ended:
1. a change (new content), 2. a failed release (health path removed: rolled back automatically),
3. a git revert to the kept first release (no rebuild). Rounds: BENCH_ROUNDS (default 2), interleaved.
Reported per mode and operation: failed requests, the longest time without a successful answer, the job's
duration (commit to healthy and registered).

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

from daemon_harness import DesiredRepo, git, running_daemon, settings_for  # noqa: E402
from load_gen import run_load  # noqa: E402

from deployerd import sandbox as sbx  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "2"))
MODES = {"stop-first (ingress: none)": ("sbx-1", "zb-stop", 8321),
         "proxy (ingress: haproxy)": ("sbx-2", "zb-proxy", 8322)}


async def main() -> None:
    state = os.environ.get("DEPLOYERD_BENCH_SANDBOX")
    if not state:
        raise SystemExit("set DEPLOYERD_BENCH_SANDBOX to a running 2-host sandbox's state dir")
    info = sbx.SandboxInfo.model_validate_json((Path(state) / "sandbox.json").read_text())
    address = {h.name: h.internal_address for h in info.hosts}
    rows: dict[tuple[str, str], list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="ingress-bench-") as tmp:
        repo = DesiredRepo(Path(tmp) / "repo", info)
        hosts = {h.name: {"address": h.address, "ssh_port": h.ssh_port, "user": h.user,
                          "public_address": h.internal_address, "ingress": "none" if h.name == "sbx-1" else "haproxy"}
                 for h in info.hosts}
        repo.write("hosts.yaml", yaml.safe_dump({"hosts": hosts}))
        for host, name, port in MODES.values():
            repo.service(name, port, host=host, health_timeout_s=6)
        repo.commit("v1")
        async with running_daemon(settings_for(Path(tmp), info, repo)) as d:
            await d.reconcile()

            async def measure(op: str) -> None:
                """The reconcile just committed for, under load on both hosts at once."""
                stop = asyncio.Event()
                loads = {mode: asyncio.create_task(run_load(address[h], p, rate=50, seconds=120, stop=stop))
                         for mode, (h, _, p) in MODES.items()}
                await asyncio.sleep(0.5)
                await d.reconcile()
                await asyncio.sleep(0.5)
                stop.set()
                for mode, (_, name, _) in MODES.items():
                    r = await loads[mode]
                    job = await d.last_job(name)
                    rows.setdefault((mode, op), []).append(
                        f"{r.failed}/{len(r.samples)} failed, gap {r.longest_gap_s():.2f} s, job {job.status.value} "
                        f"{job.duration_seconds:.2f} s")

            for i in range(ROUNDS):
                for _, name, _ in MODES.values():
                    repo.write(f"services/{name}/www/index.html", f"<h1>{name} round {i}</h1>\n")
                change = repo.commit(f"change {i}")
                await measure("change")
                for _, name, _ in MODES.values():
                    repo.remove(f"services/{name}/www/health")
                repo.commit(f"break {i}")
                await measure("failed release (rolled back)")
                git(repo.path, "revert", "--no-edit", "HEAD")
                git(repo.path, "revert", "--no-edit", change)
                await measure("git revert to the kept release")
    print("\n| mode | operation | per round: failed requests, longest gap, job |\n|---|---|---|")
    for (mode, op), cells in rows.items():
        print(f"| {mode} | {op} | {'; '.join(cells)} |")


if __name__ == "__main__":
    asyncio.run(main())
