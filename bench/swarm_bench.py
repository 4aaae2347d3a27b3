"""Docker Swarm benches on a 3-node sandbox Swarm (`deployerd sandbox up --hosts 3 --swarm --state-dir X`,
then DEPLOYERD_BENCH_SANDBOX=X): every figure next to its baseline, measured in the same run.

1. Commit to converged: a source change of a 2-replica service (host mode, start-first, monitor 2 s), from the
   commit to deployerd's job ended (fetch, observe, plan, Transfer, Build, push, service update, Swarm's
   convergence, Verify Health on every task's node, Register), against the plain CLI doing the same by hand
   over SSH on the manager: rsync of the source, `docker build`, `docker push`, `docker service update
   --detach=false` (which waits for convergence and the monitor period). Prints the ratio (goal <= 1.2x).
2. No-op reconcile: Docker API requests (and other round trips) to the manager per reconcile that finds
   nothing to do, with 1 and with BENCH_SWARM_SERVICES (default 50) swarm services: constant.

    DEPLOYERD_BENCH_SANDBOX=/tmp/sbx .venv/bin/python bench/swarm_bench.py
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from _common import med, rsync, ssh
from daemon_harness import running_daemon, settings_for  # noqa: E402
from test_swarm import DOCKERFILE, swarm_repo, swarm_service  # noqa: E402

from deployerd import sandbox as sbx  # noqa: E402
from deployerd.store import JobStatus  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
MANY = int(os.environ.get("BENCH_SWARM_SERVICES", "50"))
ROLLOUT = {"monitor_s": 2}


def plain_cli(info: sbx.SandboxInfo, work: Path, name: str, port: int) -> list[float]:
    """What an operator does by hand, timed per change (the service created first, untimed)."""
    assert info.swarm is not None
    manager = info.hosts[0]
    src = work / "plain"
    (src / "www").mkdir(parents=True)
    (src / "Dockerfile").write_text(DOCKERFILE)
    remote = f"/opt/bench-plain/{name}"
    image = f"{info.swarm.registry}/bench/{name}"

    def change(version: int) -> None:
        (src / "www" / "health").write_text('{"status": "active"}')
        (src / "www" / "index.html").write_text(f"<h1>{name} v{version}</h1>\n")
        ssh(manager, f"mkdir -p {shlex.quote(remote)}")
        rsync(manager, src, remote)
        tag = shlex.quote(f"{image}:v{version}")
        ssh(manager, f"DOCKER_BUILDKIT=1 docker build --quiet --tag {tag} {shlex.quote(remote)} >/dev/null"
                     f" && docker push --quiet {tag} >/dev/null")

    change(0)
    ssh(manager, f"docker service create --quiet --detach=false --name {shlex.quote(name)} --replicas 2 "
                 f"--publish mode=host,target=80,published={port} --update-order start-first "
                 f"--update-monitor 2s --update-failure-action rollback --init {shlex.quote(image + ':v0')}")
    times = []
    try:
        for v in range(1, ROUNDS + 1):
            t0 = time.monotonic()
            change(v)
            ssh(manager, f"docker service update --quiet --detach=false --image {shlex.quote(f'{image}:v{v}')} "
                         f"{shlex.quote(name)} >/dev/null")
            times.append(time.monotonic() - t0)
    finally:
        ssh(manager, f"docker service rm {shlex.quote(name)}", check=False)
        ssh(manager, f"rm -rf {shlex.quote(remote)}", check=False)
    return times


async def deployerd_rounds(info: sbx.SandboxInfo, work: Path) -> list[float]:
    repo = swarm_repo(work / "repo", info)
    swarm_service(repo, "bench-sw", 8790, rollout=ROLLOUT)
    repo.commit("v0")
    times = []
    async with running_daemon(settings_for(work / "d", info, repo)) as d:
        await d.reconcile()
        assert (await d.last_job("bench-sw")).status is JobStatus.SUCCEEDED
        for v in range(1, ROUNDS + 1):
            swarm_service(repo, "bench-sw", 8790, version=str(v + 1), rollout=ROLLOUT)
            t0 = time.monotonic()
            repo.commit(f"v{v}")
            await d.reconcile()
            times.append(time.monotonic() - t0)
            job = await d.last_job("bench-sw")
            assert job.status is JobStatus.SUCCEEDED and job.release, job.error
    return times


async def noop_calls(info: sbx.SandboxInfo, work: Path, counts: list[int]) -> dict[int, dict[str, float]]:
    """Round trips to the manager in one no-op reconcile, with ``counts`` swarm services deployed."""
    repo = swarm_repo(work / "noop", info)
    out: dict[int, dict[str, float]] = {}
    async with running_daemon(settings_for(work / "dn", info, repo, max_parallel=4)) as d:
        deployed = 0
        for n in counts:
            for i in range(deployed, n):
                swarm_service(repo, f"noop-{i}", 8800 + i, replicas=1, rollout=ROLLOUT)
            repo.commit(f"{n} services")
            deployed = n
            t0 = time.monotonic()
            await d.reconcile()
            setup_s = time.monotonic() - t0
            bad = [a for a in await d.reconcile() if a.kind.value != "noop"]
            assert not bad, bad
            manager = info.hosts[0].name
            samples = []
            for _ in range(5):
                before = d.engine.hosts.pool.stats()[manager]
                actions = await d.reconcile()
                after = d.engine.hosts.pool.stats()[manager]
                assert all(a.kind.value == "noop" for a in actions)
                samples.append((after.api_requests - before.api_requests, after.commands - before.commands,
                                after.sftp_ops - before.sftp_ops))
            out[n] = {"api_requests": med([s[0] for s in samples]), "commands": med([s[1] for s in samples]),
                      "sftp_ops": med([s[2] for s in samples]), "deploy_s": round(setup_s, 1)}
    return out


async def main() -> None:
    state = os.environ.get("DEPLOYERD_BENCH_SANDBOX")
    info = sbx.load_info(Path(state)) if state else None
    if info is None or info.swarm is None or len(info.hosts) < 3:
        raise SystemExit("set DEPLOYERD_BENCH_SANDBOX to a sandbox from `deployerd sandbox up --hosts 3 --swarm`")
    with tempfile.TemporaryDirectory(prefix="swarm-bench-") as tmp:
        work = Path(tmp)
        only = os.environ.get("BENCH_ONLY", "converge,noop")
        if "converge" in only:
            ours = await deployerd_rounds(info, work / "ours")
            plain = await asyncio.to_thread(plain_cli, info, work / "cli", "bench-plain", 8791)
            print(f"commit -> converged, {ROUNDS} rounds: deployerd median {med(ours):.2f} s "
                  f"({', '.join(f'{t:.2f}' for t in ours)}), plain CLI median {med(plain):.2f} s "
                  f"({', '.join(f'{t:.2f}' for t in plain)}): ratio {med(ours) / med(plain):.2f}x (goal <= 1.2x)")
        if "noop" in only:
            figures = await noop_calls(info, work / "noop", [1, MANY])
            for n, f in figures.items():
                print(f"no-op reconcile with {n} swarm services: {f['api_requests']:g} Docker API requests, "
                      f"{f['commands']:g} commands, {f['sftp_ops']:g} SFTP calls to the manager "
                      f"(deploying them took {f['deploy_s']} s)")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
