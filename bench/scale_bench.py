"""Scale across hosts: an idle reconcile (nothing to do) of BENCH_PER_HOST (default 25) small Docker services on
each of the sandbox's hosts (20: 500 services), next to the same per-host spread on its first 3 hosts (75
services), both measured in the same run by a fresh daemon (``python -m deployerd run``, its own process).

Per idle reconcile (POST /sync, bench/reconcile_bench.idle_reconciles): wall (the daemon's own
``last_reconcile.duration_s``, with its stages), CPU (/proc utime+stime), RSS, and round trips per host (deltas
of /metrics ``deployerd_host_operations_total``: SSH commands, SFTP calls, Docker API requests). Printed as
ratios of the N-host figures to the 3-host baseline. Goals (issue 15): wall < 2 s, round trips per host the
same at 3 and N hosts, RSS within 10 % of the 3-host figure.

Order: the 3-host repository (hosts.yaml lists only the first 3) is deployed and measured first; then the
other hosts and their services are added in one commit, deployed, and measured. Each measurement is done by a
daemon started afresh over what is deployed (no deploy history in its memory), after it has settled. Then
(BENCH_SAME_TOTAL=1, the default) that deployment is removed and the same number of services is deployed over
the first 3 hosts alone (round robin) and measured: the N-host figures against the same services on 3 hosts
(what the hosts themselves cost), next to the first comparison (the same services per host).

    .venv/bin/python -m deployerd.sandbox up --hosts 20 --state-dir /tmp/sbx-scale
    DEPLOYERD_BENCH_SANDBOX=/tmp/sbx-scale .venv/bin/python bench/scale_bench.py

BENCH_HOSTS (default: every sandbox host), BENCH_BASE_HOSTS (3), BENCH_PER_HOST (25), BENCH_PARALLEL (the
daemons' max_parallel, 16), BENCH_IDLE_ROUNDS (10), BENCH_SAME_TOTAL=0 (skip the third
measurement), BENCH_KEEP=1 (leave the services deployed).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import SCRATCH_DOCKERFILE, bench_sandbox, rss_kib, scale_service  # noqa: E402
from daemon_harness import DaemonProcess, DesiredRepo, remove_deployment, settings_for  # noqa: E402
from reconcile_bench import IDLE_ROUNDS, idle_reconciles  # noqa: E402

PER_HOST = int(os.environ.get("BENCH_PER_HOST", "25"))
BASE_HOSTS = int(os.environ.get("BENCH_BASE_HOSTS", "3"))
PARALLEL = int(os.environ.get("BENCH_PARALLEL", "16"))
KEEP = os.environ.get("BENCH_KEEP") == "1"
SAME_TOTAL = os.environ.get("BENCH_SAME_TOTAL", "1") == "1"  # also the N-host total over BASE_HOSTS hosts


def log(msg: str) -> None:
    print(msg, flush=True)


def write_set(repo: DesiredRepo, all_hosts: dict[str, Any], hosts: int, total_hosts: int,
              per_host: int = PER_HOST, limit: int | None = None) -> set[str]:
    """hosts.yaml with the first ``hosts`` hosts (sandbox order: sbx-1, sbx-2, ...), and their services of the
    full set (``total_hosts`` x ``per_host``, round robin, the first ``limit``): the same names, ports and
    manifests at either size."""
    names = [f"sbx-{i + 1}" for i in range(hosts)]
    repo.write("hosts.yaml", yaml.safe_dump({"hosts": {n: all_hosts[n] for n in names}}, sort_keys=False))
    out = set()
    for i in range(min(total_hosts * per_host, limit or total_hosts * per_host)):
        name, host, port = scale_service(i, total_hosts)
        if host in names:
            repo.service(name, port, host=host, health_timeout_s=120,
                         dockerfile=SCRATCH_DOCKERFILE.format(port=port))
            out.add(name)
    return out


async def fresh_measure(settings: Any, work: Path, names: set[str], label: str) -> dict[str, Any]:
    """A daemon started afresh over what is deployed: settled, then IDLE_ROUNDS idle reconciles."""
    d = DaemonProcess(settings, work)
    await d.start()
    try:
        start_rss = rss_kib(d.pid) / 1024
        await d.wait_services(names, limit_s=1800)
        await asyncio.sleep(3)  # its first reconcile and the one after it are over
        r = await idle_reconciles(d, IDLE_ROUNDS)
        r["rss_at_start_mib"] = round(start_rss, 1)
        trips = r["round_trips_per_host"]
        log(f"scale: {label}: {r['services']} services, {len(trips)} hosts: wall median {r['wall_median_s']:.3f} s "
            f"(max {r['wall_max_s']:.3f}), CPU {r['cpu_median_s']:.3f} s, RSS {r['rss_mib']} MiB (anon "
            f"{r['rss_anon_mib']}; {r['rss_at_start_mib']} at start), round trips per host min/max "
            f"{min(trips.values())}/{max(trips.values())}, stages {r['stages_median_s']}")
        log(f"scale: {label}: by kind per host {r['by_kind_per_host']}")
        return r
    finally:
        await d.close()


async def deploy(settings: Any, work: Path, repo: DesiredRepo, names: set[str], message: str) -> float:
    """Commit, let a daemon deploy every named service, stop it; the seconds it took."""
    repo.commit(message)
    d = DaemonProcess(settings, work)
    await d.start()
    try:
        t0 = time.monotonic()
        await d.sync()
        await d.wait_services(names, limit_s=3600)
        took = time.monotonic() - t0
        log(f"scale: {message}: {len(names)} services synced and healthy after {took:.1f} s; deploying daemon's "
            f"RSS {rss_kib(d.pid) / 1024:.1f} MiB")
        return took
    finally:
        await d.close()


def compare(big: dict[str, Any], base: dict[str, Any], what: str) -> None:
    """The N-host figures as ratios of a baseline measured in the same run, each against its goal."""
    b_trips, n_trips = base["round_trips_per_host"], big["round_trips_per_host"]
    log(f"scale: {len(n_trips)} hosts / {len(b_trips)} hosts, {what} ({big['services']} vs {base['services']} "
        "services):")
    log(f"  wall {big['wall_median_s']:.3f} / {base['wall_median_s']:.3f} s = "
        f"{big['wall_median_s'] / base['wall_median_s']:.2f}x (goal: < 2 s: "
        f"{'met' if big['wall_median_s'] < 2 else 'NOT met'}; max {big['wall_max_s']:.3f} s)")
    log(f"  round trips per host {sorted(set(n_trips.values()))} / {sorted(set(b_trips.values()))} "
        f"(goal: the same: {'met' if set(n_trips.values()) == set(b_trips.values()) else 'NOT met'}; "
        f"max in any reconcile {big['round_trips_max_any_reconcile']} / {base['round_trips_max_any_reconcile']})")
    ratio = big["rss_mib"] / base["rss_mib"]
    log(f"  RSS {big['rss_mib']} / {base['rss_mib']} MiB = {ratio:.3f}x (goal <= 1.10x: "
        f"{'met' if ratio <= 1.10 else 'NOT met'}); anon {big['rss_anon_mib']} / {base['rss_anon_mib']} MiB")
    log(f"  CPU {big['cpu_median_s']:.3f} / {base['cpu_median_s']:.3f} s = "
        f"{big['cpu_median_s'] / max(base['cpu_median_s'], 1e-3):.2f}x")


async def main() -> None:
    info = bench_sandbox()
    total = int(os.environ.get("BENCH_HOSTS", str(len(info.hosts))))
    assert BASE_HOSTS <= total <= len(info.hosts), (BASE_HOSTS, total, len(info.hosts))
    tmp = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    repo = DesiredRepo(tmp / "repo", info)
    all_hosts = yaml.safe_load((repo.path / "hosts.yaml").read_text())["hosts"]
    settings = settings_for(tmp / "daemon", info, repo, max_parallel=PARALLEL)
    work = tmp / "daemon"
    log(f"scale: {PER_HOST} services per host, {BASE_HOSTS} hosts then {total}; max_parallel {PARALLEL}; "
        f"log {work / 'daemon.log'}")
    try:
        base_names = write_set(repo, all_hosts, BASE_HOSTS, total)
        await deploy(settings, work, repo, base_names, f"{BASE_HOSTS} hosts")
        base = await fresh_measure(settings, work, base_names, f"{BASE_HOSTS} hosts (baseline)")
        names = write_set(repo, all_hosts, total, total)
        await deploy(settings, work, repo, names, f"{total} hosts")
        big = await fresh_measure(settings, work, names, f"{total} hosts")
        compare(big, base, f"the same {PER_HOST} services per host")
        if not SAME_TOTAL:
            return
        # the same number of services over BASE_HOSTS hosts: what the hosts themselves cost. A deployment of its
        # own (the first one removed), so no move or port clash is in the way.
        await remove_deployment(settings)
        repo = DesiredRepo(tmp / "repo-same", info)
        settings = settings_for(tmp / "daemon-same", info, repo, max_parallel=PARALLEL)
        work = tmp / "daemon-same"
        same_names = write_set(repo, all_hosts, BASE_HOSTS, BASE_HOSTS, per_host=len(names) // BASE_HOSTS + 1,
                               limit=len(names))
        await deploy(settings, work, repo, same_names, f"{len(same_names)} services on {BASE_HOSTS} hosts")
        same = await fresh_measure(settings, work, same_names, f"{len(same_names)} services on {BASE_HOSTS} hosts")
        compare(big, same, f"the same {len(names)} services")
    finally:
        if KEEP:
            log(f"scale: kept the deployment (BENCH_KEEP): config {work / 'config.yaml'}")
        else:  # leave the hosts and the Registry as found (hosts.yaml names every host now)
            await remove_deployment(settings)
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
