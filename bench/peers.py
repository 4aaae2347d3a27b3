"""deployerd next to what users would use instead, on the same sandbox hosts, in the same run.

Peers: (a) a plain script (rsync + one `ssh` running the Docker CLI on the host: the floor), (b) Ansible
(the `ansible` PyPI package, which bundles community.docker: copy, docker_image build, docker_container, uri),
(c) pyinfra (files.sync + server.shell running the Docker CLI; pyinfra has no image-build operation).
The peers run from .bench-venv (`make bench` creates it), never from the project's .venv.

Scenarios (numbers are medians of interleaved rounds; the machine is shared and noisy):
 1. one small service, build cache warm, commit -> healthy: deployerd vs plain vs Ansible vs pyinfra;
 2. a reconcile that finds nothing to do: 10 and 50 services over 3 hosts, SSH round trips per host;
    Ansible --check over its own 50 (deployed for real first, so it too has nothing to do);
 3. one file changed in a 20 MB source tree: bytes deployerd sends vs rsync --stats, and times
    (BENCH_S3_PEERS="pyinfra" or "" leaves out the slow peers on a loaded machine; plain always runs);
 4. failed health verdict -> old release serving again (Docker and systemd), from the jobs' rollback seconds;
 5. scale: RSS of this process (the daemon runs in it) and CPU per idle reconcile at 50, then BENCH_SCALE
    (default "200") services over the hosts.

Run: `make bench`, or `DEPLOYERD_BENCH_SANDBOX=/tmp/bench-sbx .venv/bin/python bench/peers.py` with a
sandbox of 3 hosts (`.venv/bin/python -m deployerd.sandbox up --hosts 3 --state-dir /tmp/bench-sbx`).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, med, peer_tool, rss_kib, rsync, scale_service, ssh, wait_job  # noqa: E402
from daemon_harness import DOCKERFILE, DesiredRepo, running_daemon, settings_for  # noqa: E402

from deployerd import sandbox as sbx  # noqa: E402
from deployerd.sandbox import HostInfo, SandboxInfo  # noqa: E402
from deployerd.store import JobStatus  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
ROUNDS_BIG = int(os.environ.get("BENCH_ROUNDS_BIG", "2"))
SCALES = [int(x) for x in os.environ.get("BENCH_SCALE", "200").split(",") if x.strip()]
ONLY = set(os.environ.get("BENCH_ONLY", "1,2,3,4,5").split(","))
# scenario 3's slow peers can be left out on a loaded machine (plain always runs: rsync's bytes are the yardstick)
S3_PEERS = set(os.environ.get("BENCH_S3_PEERS", "ansible,pyinfra").split(",")) | {"plain"}

results: dict[str, object] = {}


def log(msg: str) -> None:
    print(msg, flush=True)


# --- sources the peers deploy (same files as deployerd's) -----------------------------------------------------


def write_source(d: Path, name: str, port: int, version: str) -> None:
    (d / "www").mkdir(parents=True, exist_ok=True)
    (d / "Dockerfile").write_text(DOCKERFILE.format(port=port))
    (d / "www" / "health").write_text(json.dumps({"status": "active", "service": name, "version": version}))
    (d / "www" / "index.html").write_text(f"<h1>{name} v{version}</h1>\n")


def big_tree(d: Path, seed: int = 7) -> None:
    """20 MB of incompressible files (200 x 100 KiB) under www/data."""
    rnd = random.Random(seed)
    (d / "www" / "data").mkdir(parents=True, exist_ok=True)
    for i in range(200):
        (d / "www" / "data" / f"f{i:03d}.bin").write_bytes(rnd.randbytes(100 * 1024))


def touch_one(d: Path, i: int) -> None:
    """Change 16 bytes at the start of one 100 KiB file: one file changed, most of it the same."""
    p = d / "www" / "data" / "f100.bin"
    data = bytearray(p.read_bytes())
    data[:16] = f"{i:016d}".encode()
    p.write_bytes(bytes(data))


# --- (a) the plain script -------------------------------------------------------------------------------------


def plain_deploy(h: HostInfo, src: Path, name: str, port: int, version: str, stats: bool = False) -> dict:
    t0 = time.monotonic()
    dest = f"/opt/bench-plain/{name}"
    ssh(h, f"mkdir -p {dest}")  # a careful script's first line; rsync needs the parent
    r = rsync(h, src, dest, stats=stats)
    t_sync = time.monotonic() - t0
    tag = f"bench-plain-{name}:{version}"
    ssh(h, f"set -e; docker build -q -t {tag} {dest} >/dev/null; docker rm -f bench-plain-{name} >/dev/null 2>&1 || true; "
           f"docker run -d --name bench-plain-{name} -p {port}:{port} {tag} >/dev/null; "
           f"for i in $(seq 600); do busybox wget -q -O /dev/null http://127.0.0.1:{port}/health && exit 0; sleep 0.05; done; exit 1")
    out = {"seconds": time.monotonic() - t0, "sync_seconds": t_sync}
    if stats:
        m = re.search(r"Total bytes sent: ([\d,.]+)", r.stdout)
        out["rsync_bytes_sent"] = int(re.sub(r"[,.]", "", m.group(1))) if m else None
        m = re.search(r"Total bytes received: ([\d,.]+)", r.stdout)
        out["rsync_bytes_received"] = int(re.sub(r"[,.]", "", m.group(1))) if m else None
        m = re.search(r"Total transferred file size: ([\d,.]+)", r.stdout)
        out["rsync_file_bytes"] = int(re.sub(r"[,.]", "", m.group(1))) if m else None
    return out


# --- (b) Ansible ----------------------------------------------------------------------------------------------

ANSIBLE_DEPLOY = """\
- hosts: "{{ target }}"
  gather_facts: false
  tasks:
    - name: copy the source
      ansible.builtin.copy: {src: "{{ src }}/", dest: "/opt/bench-ansible/{{ svc }}/"}
    - name: build the image
      community.docker.docker_image:
        name: "bench-ans-{{ svc }}"
        tag: "{{ version }}"
        source: build
        build: {path: "/opt/bench-ansible/{{ svc }}", pull: false}
    - name: run the container
      community.docker.docker_container:
        name: "bench-ans-{{ svc }}"
        image: "bench-ans-{{ svc }}:{{ version }}"
        published_ports: ["{{ port }}:{{ port }}"]
        init: true  # as deployerd: busybox httpd as PID 1 ignores SIGTERM (else a 10 s stop per replace)
        state: started
    - name: health
      ansible.builtin.uri: {url: "http://127.0.0.1:{{ port }}/health"}
      register: r
      until: r.status == 200
      retries: 600
      delay: 0.05
      when: not ansible_check_mode
"""

ANSIBLE_MANY = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: copy the sources
      ansible.builtin.copy: {src: "{{ item.src }}/", dest: "/opt/bench-ansible/{{ item.name }}/"}
      loop: "{{ services }}"
    - name: build the images
      community.docker.docker_image:
        name: "bench-ans-{{ item.name }}"
        tag: "1"
        source: build
        build: {path: "/opt/bench-ansible/{{ item.name }}", pull: false}
      loop: "{{ services }}"
    - name: run the containers
      community.docker.docker_container:
        name: "bench-ans-{{ item.name }}"
        image: "bench-ans-{{ item.name }}:1"
        published_ports: ["{{ item.port }}:{{ item.port }}"]
        init: true
        state: started
      loop: "{{ services }}"
    - name: health
      ansible.builtin.uri: {url: "http://127.0.0.1:{{ item.port }}/health"}
      loop: "{{ services }}"
      when: not ansible_check_mode
"""


class Ansible:
    def __init__(self, work: Path, info: SandboxInfo) -> None:
        self.work = work
        work.mkdir(parents=True)
        h0 = info.hosts[0]
        (work / "ansible.cfg").write_text(
            "[defaults]\ninventory = inventory.ini\nhost_key_checking = True\n"
            "interpreter_python = /usr/bin/python3\nforks = 10\ngathering = explicit\nretry_files_enabled = False\n"
            f"local_tmp = {work}/tmp\n"
            "[ssh_connection]\npipelining = True\n"
            f"ssh_args = -o ControlMaster=auto -o ControlPersist=60s -o UserKnownHostsFile={h0.known_hosts}\n"
            f"control_path_dir = {work}/cp\n")
        (work / "inventory.ini").write_text("".join(
            f"{h.name} ansible_host={h.address} ansible_port={h.ssh_port} ansible_user={h.user} "
            f"ansible_ssh_private_key_file={h.key_path}\n" for h in info.hosts))
        (work / "deploy.yml").write_text(ANSIBLE_DEPLOY)
        (work / "many.yml").write_text(ANSIBLE_MANY)
        (work / "host_vars").mkdir()
        self.env = {**os.environ, "ANSIBLE_CONFIG": str(work / "ansible.cfg"), "ANSIBLE_HOME": str(work / "home"),
                    "ANSIBLE_NOCOLOR": "1", "ANSIBLE_PYTHON_INTERPRETER": "/usr/bin/python3"}
        self.tool = peer_tool("ansible-playbook")

    def play(self, playbook: str, *args: str) -> float:
        t0 = time.monotonic()
        r = subprocess.run([str(self.tool), playbook, *args], cwd=self.work, env=self.env, capture_output=True,
                           text=True, timeout=900)
        if r.returncode != 0:
            raise RuntimeError(f"ansible-playbook {playbook} failed:\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}")
        self.last = r.stdout
        return time.monotonic() - t0

    def deploy(self, host: str, src: Path, name: str, port: int, version: str) -> float:
        return self.play("deploy.yml", "-e", json.dumps({"target": host, "src": str(src), "svc": name,
                                                         "port": port, "version": version}))

    def set_services(self, per_host: dict[str, list[dict]]) -> None:
        for host, services in per_host.items():
            (self.work / "host_vars" / f"{host}.yml").write_text(json.dumps({"services": services}))


# --- (c) pyinfra ----------------------------------------------------------------------------------------------

PYINFRA_DEPLOY = """\
import os
from pyinfra.operations import files, server
svc, port, version, src = os.environ["B_SVC"], os.environ["B_PORT"], os.environ["B_VERSION"], os.environ["B_SRC"]
dest = f"/opt/bench-pyinfra/{svc}"
files.sync(name="sync the source", src=src, dest=dest, delete=True)
tag = f"bench-pyi-{svc}:{version}"
server.shell(name="build, replace, health", commands=[
    f"docker build -q -t {tag} {dest} >/dev/null",
    f"docker rm -f bench-pyi-{svc} >/dev/null 2>&1 || true",
    f"docker run -d --name bench-pyi-{svc} -p {port}:{port} {tag} >/dev/null",
    f"for i in $(seq 600); do busybox wget -q -O /dev/null http://127.0.0.1:{port}/health && exit 0; sleep 0.05; done; exit 1",
])
"""


class Pyinfra:
    def __init__(self, work: Path, info: SandboxInfo) -> None:
        self.work = work
        work.mkdir(parents=True)
        (work / "deploy.py").write_text(PYINFRA_DEPLOY)
        (work / "inventory.py").write_text("hosts = " + repr([
            (h.name, {"ssh_hostname": h.address, "ssh_port": h.ssh_port, "ssh_user": h.user, "ssh_key": h.key_path,
                      "ssh_known_hosts_file": h.known_hosts, "ssh_strict_host_key_checking": "yes"})
            for h in info.hosts]) + "\n")
        self.tool = peer_tool("pyinfra")

    def deploy(self, host: str, src: Path, name: str, port: int, version: str) -> float:
        env = {**os.environ, "B_SVC": name, "B_PORT": str(port), "B_VERSION": version, "B_SRC": str(src)}
        t0 = time.monotonic()
        r = subprocess.run([str(self.tool), "-y", "--limit", host, "inventory.py", "deploy.py"], cwd=self.work,
                           env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise RuntimeError(f"pyinfra failed:\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}")
        return time.monotonic() - t0


# --- deployerd ------------------------------------------------------------------------------------------------


async def deploy_all(d, names: list[str], limit_s: float = 1800) -> None:  # type: ignore[no-untyped-def]
    for n in names:
        job = await wait_job(d, n, None, limit_s)
        assert job.status is JobStatus.SUCCEEDED, (n, job.status, job.error)


async def noop_reconciles(d, count: int) -> dict:  # type: ignore[no-untyped-def]
    """``count`` reconciles that find nothing to do: wall, CPU of this process, round trips per host."""
    pool = d.engine.hosts.pool
    walls, cpus, trips = [], [], []
    n = 0
    for _ in range(count):
        before = {h: s.round_trips for h, s in pool.stats().items()}
        b_cmd = {h: (s.commands, s.sftp_ops) for h, s in pool.stats().items()}
        c0, t0 = time.process_time(), time.monotonic()
        actions = await d.engine.reconcile(["bench"])
        walls.append(time.monotonic() - t0)
        cpus.append(time.process_time() - c0)
        after = pool.stats()
        trips.append({h: after[h].round_trips - before.get(h, 0) for h in after})
        last_split = {h: (after[h].commands - b_cmd.get(h, (0, 0))[0], after[h].sftp_ops - b_cmd.get(h, (0, 0))[1])
                      for h in after}
        bad = [(a.service, a.kind.value, a.reasons) for a in actions if a.kind.value != "noop"]
        assert not bad, bad
        n = len(actions)
    return {"services": n, "wall_median_s": med(walls), "wall_max_s": max(walls), "cpu_median_s": med(cpus),
            "trips_per_host": trips[-1], "commands_sftp_per_host": last_split, "rss_mib": rss_kib() / 1024}


async def main() -> None:
    state = os.environ.get("DEPLOYERD_BENCH_SANDBOX")
    own = state is None
    tmp = Path(tempfile.mkdtemp(prefix="deployerd-peers-"))
    info = sbx.load_info(Path(state)) if state else await sbx.up_async(3, tmp / "sandbox")
    assert info is not None and len(info.hosts) >= 3, "scenarios need a sandbox of 3 hosts"
    hosts = {h.name: h for h in info.hosts}
    h1, h2, h3 = info.hosts[:3]
    ans, pyi = Ansible(tmp / "ansible", info), Pyinfra(tmp / "pyinfra", info)
    settings = None
    try:
        repo = DesiredRepo(tmp / "repo", info)
        repo.service("s1-web", 8550, host=h1.name, health_timeout_s=10)
        repo.service("s3-big", 8560, host=h2.name, health_timeout_s=10)
        big_tree(repo.path / "services" / "s3-big")
        repo.service("s4-docker", 8570, host=h3.name, health_timeout_s=3)
        app = (ROOT / "desired_state" / "services" / "hello-py" / "app.py").read_text()
        repo.write("services/s4-sd/app.py", app)
        repo.write("services/s4-sd.yaml", json.dumps({
            "name": "s4-sd", "host": h3.name, "method": "systemd", "port": 8571, "source": "services/s4-sd",
            "systemd": {"command": "python3 app.py --port {port}"},
            "health": {"path": "/health", "timeout_s": 3, "interval_s": 0.5}}))
        fixed = ["s1-web", "s3-big", "s4-docker", "s4-sd"]
        for i in range(10):
            name, host, port = scale_service(i)
            repo.service(name, port, host=host, health_timeout_s=30)
        repo.commit("bench: fixed services + 10 of the scale set")
        settings = settings_for(tmp / "daemon", info, repo)
        t0 = time.monotonic()
        async with running_daemon(settings, loop=True) as d:
            await deploy_all(d, fixed + [scale_service(i)[0] for i in range(10)])
            log(f"first deploy of {len(fixed) + 10} services: {time.monotonic() - t0:.1f} s")
            last = {n: (await d.jobs(n))[0].id for n in fixed}

            # --- 1. commit -> healthy, one small service, cache warm ---------------------------------------
            if "1" in ONLY:
                srcs = {k: tmp / "src" / k for k in ("plain", "ansible", "pyinfra")}
                for k, p in srcs.items():
                    write_source(p, "s1", 8551 + list(srcs).index(k), "0")
                # warm-up (not counted): each peer's first deploy builds its image and fills caches
                await asyncio.to_thread(plain_deploy, h1, srcs["plain"], "s1", 8551, "0")
                await asyncio.to_thread(ans.deploy, h1.name, srcs["ansible"], "s1", 8552, "0")
                await asyncio.to_thread(pyi.deploy, h1.name, srcs["pyinfra"], "s1", 8553, "0")
                times: dict[str, list[float]] = {"deployerd": [], "plain": [], "ansible": [], "pyinfra": []}
                order = list(times)
                for r in range(1, ROUNDS + 1):
                    v = str(r)
                    for tool in order[r % 4:] + order[:r % 4]:  # rotate who goes first
                        if tool == "deployerd":
                            repo.write("services/s1-web/www/index.html", f"<h1>s1-web round {v}</h1>\n")
                            t0 = time.monotonic()
                            repo.commit(f"s1 v{v}")
                            job = await wait_job(d, "s1-web", last["s1-web"])
                            assert job.status is JobStatus.SUCCEEDED, job.error
                            times["deployerd"].append(time.monotonic() - t0)
                            last["s1-web"] = job.id
                            phases = {p.phase: round(p.duration_seconds, 3) for p in job.phases}
                        elif tool == "plain":
                            (srcs["plain"] / "www" / "index.html").write_text(f"v{v}")
                            times["plain"].append((await asyncio.to_thread(plain_deploy, h1, srcs["plain"], "s1", 8551, v))["seconds"])
                        elif tool == "ansible":
                            (srcs["ansible"] / "www" / "index.html").write_text(f"v{v}")
                            times["ansible"].append(await asyncio.to_thread(ans.deploy, h1.name, srcs["ansible"], "s1", 8552, v))
                        else:
                            (srcs["pyinfra"] / "www" / "index.html").write_text(f"v{v}")
                            times["pyinfra"].append(await asyncio.to_thread(pyi.deploy, h1.name, srcs["pyinfra"], "s1", 8553, v))
                    log(f"  round {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
                m = {k: med(v) for k, v in times.items()}
                results["1"] = {"rounds": ROUNDS, "median_s": m, "all_s": times, "deployerd_phases": phases}
                log(f"1. commit->healthy medians ({ROUNDS} rounds): " + ", ".join(
                    f"{k} {v:.2f}s ({v / m['plain']:.2f}x plain)" for k, v in m.items()))
                log(f"   deployerd phases (last job): {phases}")

            # --- 3. one file changed in a 20 MB tree ------------------------------------------------------
            if "3" in ONLY:
                srcs = {k: tmp / "big" / k for k in ("plain", "ansible", "pyinfra")}
                for i, (k, p) in enumerate(srcs.items()):
                    write_source(p, "s3", 8561 + i, "0")
                    big_tree(p)
                first = await asyncio.to_thread(plain_deploy, h2, srcs["plain"], "s3", 8561, "0", stats=True)
                ans_first = await asyncio.to_thread(ans.deploy, h2.name, srcs["ansible"], "s3", 8562, "0") if "ansible" in S3_PEERS else None
                pyi_first = await asyncio.to_thread(pyi.deploy, h2.name, srcs["pyinfra"], "s3", 8563, "0") if "pyinfra" in S3_PEERS else None
                log(f"   20 MB first deploy: plain {first['seconds']:.1f}s (rsync sent {first['rsync_bytes_sent']} B), "
                    f"ansible {ans_first or 0:.1f}s, pyinfra {pyi_first or 0:.1f}s (0: not run; peers run: {sorted(S3_PEERS)})")
                big: dict[str, list] = {"deployerd": [], "plain": [], "ansible": [], "pyinfra": [],
                                        "deployerd_bytes": [], "deployerd_bytes_detail": [],
                                        "deployerd_bytes_received_hashes": [], "deployerd_transfer_s": [],
                                        "rsync_bytes": [], "rsync_bytes_received": [], "rsync_s": []}
                for r in range(1, ROUNDS_BIG + 1):
                    touch_one(repo.path / "services" / "s3-big", r)
                    t0 = time.monotonic()
                    repo.commit(f"s3 one file {r}")
                    job = await wait_job(d, "s3-big", last["s3-big"])
                    assert job.status is JobStatus.SUCCEEDED, job.error
                    big["deployerd"].append(time.monotonic() - t0)
                    last["s3-big"] = job.id
                    tr = next(p for p in job.phases if "ransfer" in str(p.phase))
                    big["deployerd_bytes"].append(tr.details.get("bytes_sent"))
                    big["deployerd_bytes_detail"].append(tr.details.get("bytes_sent_detail"))
                    big["deployerd_bytes_received_hashes"].append(tr.details.get("bytes_received_hashes"))
                    big["deployerd_transfer_s"].append(tr.duration_seconds)
                    touch_one(srcs["plain"], r)
                    out = await asyncio.to_thread(plain_deploy, h2, srcs["plain"], "s3", 8561, str(r), stats=True)
                    big["plain"].append(out["seconds"])
                    big["rsync_bytes"].append(out["rsync_bytes_sent"])
                    big["rsync_bytes_received"].append(out["rsync_bytes_received"])
                    big["rsync_s"].append(out["sync_seconds"])
                    if "ansible" in S3_PEERS:
                        touch_one(srcs["ansible"], r)
                        big["ansible"].append(await asyncio.to_thread(ans.deploy, h2.name, srcs["ansible"], "s3", 8562, str(r)))
                    if "pyinfra" in S3_PEERS:
                        touch_one(srcs["pyinfra"], r)
                        big["pyinfra"].append(await asyncio.to_thread(pyi.deploy, h2.name, srcs["pyinfra"], "s3", 8563, str(r)))
                    log(f"  round {r}: " + ", ".join(f"{k} {v[-1]}" for k, v in big.items() if v))
                results["3"] = {"rounds": ROUNDS_BIG, "all": big,
                                "median": {k: med(v) for k, v in big.items() if k != "deployerd_bytes_detail"}}
                log(f"3. one file changed in 20 MB: {results['3']['median']}")

            # --- 4. failed release -> old release serving ------------------------------------------------
            if "4" in ONLY:
                rb: dict[str, list[float]] = {"docker": [], "systemd": []}
                for i in range(3):
                    repo.remove("services/s4-docker/www/health")
                    repo.write("services/s4-docker/www/index.html", f"<h1>broken {i}</h1>\n")
                    # a broken revision differs each round: an identical one stays quarantined (by design)
                    repo.write("services/s4-sd/app.py", f"raise SystemExit(3)  # broken {i}\n" + app)
                    repo.commit(f"broken {i}")
                    for svc, kind in (("s4-docker", "docker"), ("s4-sd", "systemd")):
                        job = await wait_job(d, svc, last[svc])
                        assert job.status is JobStatus.ROLLED_BACK, (svc, job.status, job.error, job.rollback)
                        rb[kind].append(job.rollback["seconds"])
                        last[svc] = job.id
                    repo.write("services/s4-docker/www/health", '{"status": "active"}')
                    repo.write("services/s4-docker/www/index.html", f"<h1>fixed {i}</h1>\n")
                    repo.write("services/s4-sd/app.py", app + f"\n# fixed {i}\n")
                    repo.commit(f"fixed {i}")
                    for svc in ("s4-docker", "s4-sd"):
                        job = await wait_job(d, svc, last[svc])
                        assert job.status is JobStatus.SUCCEEDED, (svc, job.status, job.error)
                        last[svc] = job.id
                results["4"] = {"rollback_s": rb, "median_s": {k: med(v) for k, v in rb.items()}}
                log(f"4. failed health -> old release serving (rollback seconds): {results['4']}")

            # --- 2. no-op reconcile: 10 vs 50 services, Ansible --check over 50 ---------------------------
            if "2" in ONLY or "5" in ONLY:
                r14 = await noop_reconciles(d, 10)
                log(f"2. no-op reconcile, {r14['services']} services: {r14}")
                for i in range(10, 50):
                    name, host, port = scale_service(i)
                    repo.service(name, port, host=host, health_timeout_s=30)
                t0 = time.monotonic()
                repo.commit("scale set: 50")
                await deploy_all(d, [scale_service(i)[0] for i in range(10, 50)])
                log(f"   40 more services deployed by deployerd in {time.monotonic() - t0:.1f} s")
                await asyncio.sleep(1)
                r54 = await noop_reconciles(d, 10)
                log(f"   no-op reconcile, {r54['services']} services: {r54}")
                results["2"] = {"small": r14, "large": r54}
                results["5"] = {str(r54["services"]): r54}
            if "2" in ONLY:
                per_host: dict[str, list[dict]] = {h: [] for h in hosts}
                for i in range(50):
                    name, host, _ = scale_service(i)
                    src = tmp / "ans-many" / name
                    write_source(src, name, 8600 + i, "1")
                    per_host[host].append({"name": name, "src": str(src), "port": 8600 + i})
                ans.set_services(per_host)
                real = await asyncio.to_thread(ans.play, "many.yml")
                log(f"   Ansible real deploy of 50 services: {real:.1f} s")
                ours, theirs = [], []
                for _ in range(int(os.environ.get("BENCH_ANSIBLE_CHECKS", "3"))):
                    ours.append((await noop_reconciles(d, 1))["wall_median_s"])
                    theirs.append(await asyncio.to_thread(ans.play, "many.yml", "--check"))
                    assert "changed=0" in ans.last and "changed=1" not in ans.last, ans.last[-1500:]
                results["2"]["ansible_real_deploy_50_s"] = real  # type: ignore[index]
                results["2"]["interleaved"] = {"deployerd_s": ours, "ansible_check_s": theirs,  # type: ignore[index]
                                               "ratio": med(theirs) / med(ours)}
                log(f"   interleaved: deployerd {med(ours) * 1000:.0f} ms vs Ansible --check {med(theirs):.1f} s "
                    f"({med(theirs) / med(ours):.0f}x)")

            # --- 5. scale ---------------------------------------------------------------------------------
            if "5" in ONLY:
                n = 50
                for target in SCALES:
                    for i in range(n, target):
                        name, host, port = scale_service(i)
                        repo.service(name, port, host=host, health_timeout_s=60)
                    t0 = time.monotonic()
                    repo.commit(f"scale set: {target}")
                    await deploy_all(d, [scale_service(i)[0] for i in range(n, target)], limit_s=3600)
                    log(f"   {target - n} more services deployed by deployerd in {time.monotonic() - t0:.1f} s")
                    n = target
                    await asyncio.sleep(1)
                    r = await noop_reconciles(d, 10)
                    results["5"][str(r["services"])] = r  # type: ignore[index]
                    log(f"5. idle reconcile at {r['services']} services: {r}")
                    out = ssh(h1, "free -m | sed -n 2p; docker ps -q | wc -l", check=False).stdout.split()
                    log(f"   {h1.name}: {out}")
        print("\n## results (JSON)\n" + json.dumps(results, indent=1, default=str))
        if out := os.environ.get("BENCH_JSON"):  # raw figures, for whoever updates RESULTS.md
            Path(out).write_text(json.dumps(results, indent=1, default=str))
    finally:
        inst = f"deployerd-{settings.instance}-" if settings is not None else "deployerd-none-"
        for h in info.hosts:  # the peers' containers; deployerd's systemd units (the harness removes only containers)
            ssh(h, "docker ps -aq --filter name=bench- | xargs -r docker rm -f >/dev/null; "
                   "rm -rf /opt/bench-plain /opt/bench-ansible /opt/bench-pyinfra; "
                   f"for u in $(systemctl list-units --all --no-legend --plain '{inst}*' | cut -d' ' -f1); do "
                   "systemctl disable --now $u; rm -f /etc/systemd/system/$u; done; systemctl daemon-reload",
                check=False)
        if own:
            await sbx.down_async(tmp / "sandbox")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
