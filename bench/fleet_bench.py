"""Rolling deploy of one small Docker service on a fleet of BENCH_FLEET (default 6) sandbox hosts, canary 1 then
batches of 2 (``hosts: [...]``, ``rollout: {canary: 1, batch: 2}``), next to Ansible with ``serial: [1, 2]``
doing the same per-host steps (bench/peers.py's playbook: copy the source, docker_image build, docker_container
replace, uri health check) on the same hosts, in the same run, rounds interleaved (who goes first alternates).

Figures per round:
- deployerd: from `git commit` (its local-repository watch) to the rollout job's end, and the rollout job's own
  time; per wave, from the job's child records, the wave's time (from the previous wave's end, or the rollout's
  start, to its last host's end) minus its slowest host's deploy (that child's own time): the overhead per wave;
- Ansible: the ansible-playbook run's wall time.
Goals (issue 15): overhead per wave < 0.3 s; deployerd's total under 0.3x Ansible's.

    .venv/bin/python -m deployerd.sandbox up --hosts 6 --state-dir /tmp/sbx-fleet
    make .bench-venv/.installed     # Ansible (with community.docker) in the bench's own venv, not the project's
    DEPLOYERD_BENCH_SANDBOX=/tmp/sbx-fleet .venv/bin/python bench/fleet_bench.py

BENCH_ROUNDS (default 3), BENCH_FLEET (6), BENCH_ONLY=ansible or deployerd (default both).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import bench_sandbox, med, ssh  # noqa: E402
from daemon_harness import DesiredRepo, running_daemon, settings_for  # noqa: E402
from peers import ANSIBLE_DEPLOY, Ansible, write_source  # noqa: E402
from reconcile_bench import _at  # noqa: E402  (a job record's timestamp as epoch seconds)

from deployerd.sandbox import SandboxInfo  # noqa: E402
from deployerd.store import Job, JobStatus  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
FLEET = int(os.environ.get("BENCH_FLEET", "6"))
ONLY = set(os.environ.get("BENCH_ONLY", "ansible,deployerd").split(","))
CANARY, BATCH = 1, 2
SERVICE, PORT = "fleet-web", 8410  # deployerd's
ANS_SERVICE, ANS_PORT = "fleet", 8411  # Ansible's (container bench-ans-fleet)
# peers.py's one-host playbook, rolled out the way Ansible users roll: `serial`, the play stops on a failure
ROLLING = ANSIBLE_DEPLOY.replace("  gather_facts: false\n",
                                 f"  gather_facts: false\n  serial: [{CANARY}, {BATCH}]\n  max_fail_percentage: 0\n",
                                 1)
assert ROLLING != ANSIBLE_DEPLOY


def log(msg: str) -> None:
    print(msg, flush=True)


def fleet_repo(path: Path, info: SandboxInfo, fleet: list[str]) -> DesiredRepo:
    """The desired state: hosts.yaml with the fleet's hosts only, and the service on all of them."""
    repo = DesiredRepo(path, info)
    hosts = yaml.safe_load((repo.path / "hosts.yaml").read_text())["hosts"]
    repo.write("hosts.yaml", yaml.safe_dump({"hosts": {h: hosts[h] for h in fleet}}, sort_keys=False))
    write_fleet_service(repo, fleet, "0")
    return repo


def write_fleet_service(repo: DesiredRepo, fleet: list[str], version: str) -> None:
    repo.service(SERVICE, PORT, host=fleet[0], version=version,
                 health={"path": "/health", "timeout_s": 30, "interval_s": 0.1})
    manifest = yaml.safe_load((repo.path / f"services/{SERVICE}.yaml").read_text())
    del manifest["host"]
    manifest["hosts"] = fleet
    manifest["rollout"] = {"canary": CANARY, "batch": BATCH}
    repo.write(f"services/{SERVICE}.yaml", yaml.safe_dump(manifest))


async def wait_rollout(d: Any, after: set[str], limit_s: float = 600) -> Job:
    """The first finished rollout job of the service that is not in ``after`` (job ids seen before)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        for job in await d.jobs(SERVICE):
            if job.kind == "rollout" and job.id not in after and job.status.finished:
                return job  # type: ignore[no-any-return]
        await asyncio.sleep(0.05)
    raise TimeoutError(f"no finished rollout of {SERVICE} within {limit_s} s")


async def waves_of(d: Any, rollout: Job) -> list[dict[str, Any]]:
    """Per wave: its hosts, its time (previous wave's end, or the rollout's start, to its last host's end), its
    slowest host's deploy (that child's started -> completed), and the difference: the rollout's overhead."""
    children = [await d.engine.store.job(cid) for cid in rollout.children]
    by_host = {c.host: c for c in children if c is not None}
    out, start = [], _at(rollout.started_at)
    for hosts in rollout.waves:
        kids = [by_host[h] for h in hosts]
        assert all(k.status is JobStatus.SUCCEEDED for k in kids), [(k.host, k.status, k.error) for k in kids]
        end = max(_at(k.completed_at) for k in kids)
        slowest = max(_at(k.completed_at) - _at(k.started_at) for k in kids)
        first_start = min(_at(k.started_at) for k in kids)
        out.append({"hosts": hosts, "wave_s": end - start, "slowest_host_s": slowest,
                    "overhead_s": end - start - slowest, "launch_lag_s": first_start - start})
        start = end
    return out


async def deployerd_round(d: Any, repo: DesiredRepo, fleet: list[str], version: str,
                          seen: set[str]) -> dict[str, Any]:
    write_fleet_service(repo, fleet, version)
    committed = time.time()
    repo.commit(f"{SERVICE} v{version}")
    job = await wait_rollout(d, seen)
    seen.add(job.id)
    assert job.status is JobStatus.SUCCEEDED, (job.status, job.error)
    waves = await waves_of(d, job)
    return {"commit_to_done_s": _at(job.completed_at) - committed,
            "rollout_s": _at(job.completed_at) - _at(job.started_at),
            "after_last_wave_s": _at(job.completed_at) - _at(job.started_at) - sum(w["wave_s"] for w in waves),
            "waves": waves}


def ansible_round(ans: Ansible, src: Path, fleet: list[str], version: str) -> float:
    write_source(src, ANS_SERVICE, ANS_PORT, version)
    return ans.play("rolling.yml", "-e", json.dumps({"target": ":".join(fleet), "src": str(src),
                                                    "svc": ANS_SERVICE, "port": ANS_PORT, "version": version}))


def report(ours: list[dict[str, Any]], theirs: list[float]) -> None:
    if ours:
        totals = [r["commit_to_done_s"] for r in ours]
        log(f"deployerd: commit -> rollout done, median {med(totals):.2f} s ({' '.join(f'{t:.2f}' for t in totals)});"
            f" rollout job alone median {med([r['rollout_s'] for r in ours]):.2f} s")
        n_waves = len(ours[0]["waves"])
        for i in range(n_waves):
            ws = [r["waves"][i] for r in ours]
            log(f"  wave {i} ({len(ws[0]['hosts'])} hosts: {','.join(ws[0]['hosts'])}): wave "
                f"{med([w['wave_s'] for w in ws]):.3f} s, slowest host {med([w['slowest_host_s'] for w in ws]):.3f} s,"
                f" overhead {med([w['overhead_s'] for w in ws]):.3f} s (max {max(w['overhead_s'] for w in ws):.3f};"
                f" of which before its first host started {med([w['launch_lag_s'] for w in ws]):.3f} s)")
        worst = max(w["overhead_s"] for r in ours for w in r["waves"])
        log(f"  overhead per wave: worst of all rounds {worst:.3f} s (goal < 0.3 s: "
            f"{'met' if worst < 0.3 else 'NOT met'}); after the last wave "
            f"{med([r['after_last_wave_s'] for r in ours]):.3f} s")
    if theirs:
        log(f"Ansible serial [{CANARY}, {BATCH}]: median {med(theirs):.2f} s ({' '.join(f'{t:.2f}' for t in theirs)})")
    if ours and theirs:
        ratio = med([r["commit_to_done_s"] for r in ours]) / med(theirs)
        log(f"deployerd / Ansible: {ratio:.2f}x (goal < 0.3x: {'met' if ratio < 0.3 else 'NOT met'}); rollout job "
            f"alone {med([r['rollout_s'] for r in ours]) / med(theirs):.2f}x")


async def main() -> None:
    info = bench_sandbox()
    assert len(info.hosts) >= FLEET, f"the sandbox has {len(info.hosts)} hosts, the bench needs {FLEET}"
    fleet = [h.name for h in info.hosts[:FLEET]]
    tmp = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    ours: list[dict[str, Any]] = []
    theirs: list[float] = []
    ans = src = None
    if "ansible" in ONLY:
        ans = Ansible(tmp / "ansible", info)
        (ans.work / "rolling.yml").write_text(ROLLING)
        src = tmp / "ans-src"
        log(f"Ansible warm-up (first deploy on {len(fleet)} hosts, not counted): "
            f"{await asyncio.to_thread(ansible_round, ans, src, fleet, '0'):.2f} s")
    try:
        if "deployerd" not in ONLY:
            assert ans is not None and src is not None, "BENCH_ONLY names neither ansible nor deployerd"
            for r in range(1, ROUNDS + 1):
                theirs.append(await asyncio.to_thread(ansible_round, ans, src, fleet, str(r)))
                log(f"round {r}: Ansible {theirs[-1]:.2f} s")
            return
        repo = fleet_repo(tmp / "repo", info, fleet)
        repo.commit(f"{SERVICE} v0 on {len(fleet)} hosts")
        settings = settings_for(tmp / "daemon", info, repo, max_parallel=max(4, BATCH))
        async with running_daemon(settings, loop=True) as d:
            t0 = time.monotonic()
            seen: set[str] = set()
            first = await wait_rollout(d, seen)
            seen.add(first.id)
            assert first.status is JobStatus.SUCCEEDED, (first.status, first.error)
            log(f"deployerd warm-up (first rollout, not counted): {time.monotonic() - t0:.2f} s")
            for r in range(1, ROUNDS + 1):
                order = ["deployerd", "ansible"] if r % 2 else ["ansible", "deployerd"]
                for tool in order:
                    if tool == "deployerd":
                        await asyncio.sleep(1)  # the reconcile the last job asked for is over
                        ours.append(await deployerd_round(d, repo, fleet, str(r), seen))
                    elif ans is not None and src is not None:
                        theirs.append(await asyncio.to_thread(ansible_round, ans, src, fleet, str(r)))
                log(f"round {r}: deployerd {ours[-1]['commit_to_done_s']:.2f} s (waves overhead "
                    + " ".join(f"{w['overhead_s']:.3f}" for w in ours[-1]["waves"]) + ")"
                    + (f", Ansible {theirs[-1]:.2f} s" if theirs else ""))
    finally:
        report(ours, theirs)
        if ans is not None:
            for h in info.hosts[:FLEET]:
                ssh(h, f"docker rm -f bench-ans-{ANS_SERVICE} >/dev/null 2>&1; rm -rf /opt/bench-ansible", check=False)


if __name__ == "__main__":
    asyncio.run(main())
