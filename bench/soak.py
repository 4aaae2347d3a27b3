"""Soak: hundreds of seeded random commits at a bounded rate to one real daemon; the end state must equal the
last commit exactly, nothing may leak beyond retention, no job may stay stuck, and the daemon's memory must
not grow.

The daemon runs as its own process (``python -m deployerd run``) so its RSS is read from /proc; it watches a
real local git repository of N small services (busybox httpd in Docker, stdlib Python under systemd) spread
over the sandbox's hosts. Commits are file changes, env changes, ``git revert`` of an earlier commit, broken
releases (health never passes, or the process exits), deletions, re-additions and host moves. At the end
the hosts are read directly (containers, images, units and files by the instance's labels and names, plus
HTTP), and compared with the last commit, the Registry and the daemon's own plan.

``make soak`` runs the full version (300 commits, 20 services, 3 hosts; SOAK_* variables change it);
tests/e2e/test_soak.py runs a short one through `run_soak`. Seeded (SOAK_SEED) so a failure is reproducible.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's deployerd, as the daemon process gets it
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "bench"))

from _common import rss_kib, ssh_opts  # noqa: E402
from daemon_harness import DOCKERFILE, DaemonProcess, DesiredRepo, _remove_instance, git, registry_client, settings_for  # noqa: E402

from deployerd import sandbox as sbx  # noqa: E402
from deployerd.config import Settings  # noqa: E402
from deployerd.daemon import close_engine, open_engine  # noqa: E402
from deployerd.desired import DesiredState, expected_registry_entry  # noqa: E402
from deployerd.plan import ActionKind  # noqa: E402
from deployerd.sandbox import HostInfo, SandboxInfo  # noqa: E402
from deployerd.store import JobStatus, Store  # noqa: E402

KINDS = {"change": 30, "env": 12, "broken": 14, "revert": 12, "delete": 7, "readd": 7, "move": 6, "multi": 6}

APP = '''\
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
VERSION, MODE = {version!r}, {mode!r}
if MODE == "exit":
    print("soak: broken release, exiting", flush=True)
    sys.exit(3)
port = int(sys.argv[sys.argv.index("--port") + 1])


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        ok = MODE == "ok" and self.path == "/health"
        body = json.dumps({{"status": "active" if ok else "broken", "version": VERSION}}).encode()
        self.send_response(200 if ok else 500)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
'''
EXIT_DOCKERFILE = """FROM busybox:latest
COPY www /www
CMD ["busybox", "sh", "-c", "echo soak: broken release, exiting; exit 3"]
"""

# Read on each host: everything of one daemon instance, by its labels and names (constant code, values as argv).
HOST_PROBE = r'''
import glob, json, os, subprocess, sys
instance, base = sys.argv[1], sys.argv[2]
def out(*argv):
    return subprocess.run(argv, capture_output=True, text=True).stdout
label = "label=deployerd.instance=" + instance
containers, images, units, dirs = [], [], [], {}
ids = out("docker", "ps", "-aq", "--no-trunc", "--filter", label).split()
for c in json.loads(out("docker", "inspect", *ids)) if ids else []:
    lab = c["Config"]["Labels"] or {}
    containers.append({"name": c["Name"].lstrip("/"), "service": lab.get("deployerd.service"),
                       "release": lab.get("deployerd.release"), "running": c["State"]["Running"]})
imgs = sorted(set(out("docker", "images", "-q", "--no-trunc", "--filter", label).split()))
for i in json.loads(out("docker", "image", "inspect", *imgs)) if imgs else []:
    lab = i["Config"]["Labels"] or {}
    images.append({"service": lab.get("deployerd.service"), "release": lab.get("deployerd.release"),
                   "tags": i.get("RepoTags") or []})
for path in sorted(glob.glob("/etc/systemd/system/deployerd-" + instance + "-*.service")):
    meta = {}
    for line in open(path, encoding="utf-8", errors="replace"):
        if line.startswith("X-Deployerd-") and "=" in line:
            k, v = line[len("X-Deployerd-"):].rstrip("\n").split("=", 1)
            meta[k.lower()] = v
    if meta.get("instance") != instance:
        continue
    unit = os.path.basename(path)
    units.append({"unit": unit, "service": meta.get("service"), "release": meta.get("release"),
                  "active": out("systemctl", "is-active", unit).strip()})
prefix = instance + "-"
try:
    locks = sorted(f for f in os.listdir(os.path.join(base, ".locks")) if f.startswith(prefix))
except OSError:
    locks = []
for d in sorted(os.listdir(base)) if os.path.isdir(base) else []:
    if not d.startswith(prefix):
        continue
    sd = os.path.join(base, d)
    def ls(p):
        try:
            return sorted(os.listdir(os.path.join(sd, p)))
        except OSError:
            return []
    try:
        cur = os.path.basename(os.readlink(os.path.join(sd, "current")))
    except OSError:
        cur = None
    dirs[d[len(prefix):]] = {"releases": ls("releases"), "venvs": ls("venvs"), "env": ls("env"), "current": cur}
print(json.dumps({"containers": containers, "images": images, "units": units, "dirs": dirs, "locks": locks}))
'''


@dataclass
class SoakConfig:
    commits: int = 300
    services: int = 20
    seed: int = 0
    interval_s: float = 2.0  # at least this long between two commits
    max_outstanding: int = 6  # no commit while this many jobs run
    keep_releases: int = 3
    base_port: int = 8700
    prefix: str = "soak"  # service names (Registry names are global: two runs sharing one need two prefixes)
    health_timeout_s: float = 10.0
    baseline_at: int = 50  # RSS baseline after this commit (and quiescence)
    quiesce_s: float = 300.0  # bounded wait for the daemon to settle (at the baseline and at the end)
    outstanding_wait_s: float = 180.0  # bounded wait for the job count to fall below max_outstanding
    resync_interval_s: float = 30.0
    keep: bool = False  # leave the deployments on the hosts (to look at a failure)
    count_objects: bool = False  # diagnosis: the daemon counts its objects by type; the top growth is reported

    @classmethod
    def from_env(cls) -> "SoakConfig":
        e = os.environ
        return cls(
            commits=int(e.get("SOAK_COMMITS", 300)), services=int(e.get("SOAK_SERVICES", 20)),
            seed=int(e["SOAK_SEED"]) if e.get("SOAK_SEED") else random.SystemRandom().randrange(1 << 31),
            interval_s=float(e.get("SOAK_INTERVAL_S", 2.0)), max_outstanding=int(e.get("SOAK_MAX_OUTSTANDING", 6)),
            base_port=int(e.get("SOAK_BASE_PORT", 8700)), prefix=e.get("SOAK_PREFIX", "soak"), keep=e.get("SOAK_KEEP", "") not in ("", "0"),
            count_objects=e.get("SOAK_COUNT_OBJECTS", "") not in ("", "0"),
        )


# --------------------------------------------------------------------------- the desired-state model


@dataclass(frozen=True)
class Svc:
    """One service as the repository holds it; rendered to files on every change."""

    name: str
    method: str
    host: str
    port: int
    version: int = 1
    env_level: int = 0
    broken: str | None = None  # "health" (never healthy) | "exit" (the process exits)
    present: bool = True


class Workload:
    """The seeded sequence of commits, and what the repository holds after each (the expected end state)."""

    def __init__(self, repo: DesiredRepo, cfg: SoakConfig, hosts: list[str]) -> None:
        self.repo, self.cfg, self.hosts = repo, cfg, hosts
        self.rng = random.Random(cfg.seed)
        self.seq = 0
        self.svcs: dict[str, Svc] = {}
        self.good_versions: dict[str, set[int]] = {}  # every healthy version a service ever had in git
        self.history: list[tuple[str, dict[str, Svc | None]]] = []  # per commit: sha, services' state before
        self.last_touch: dict[str, int] = {}
        self.kinds: Counter[str] = Counter()

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def render(self, s: Svc) -> None:
        shutil.rmtree(self.repo.path / "services" / s.name, ignore_errors=True)
        (self.repo.path / "services" / f"{s.name}.yaml").unlink(missing_ok=True)
        if not s.present:
            return
        manifest: dict[str, Any] = {
            "name": s.name, "host": s.host, "method": s.method, "port": s.port, "source": f"services/{s.name}",
            "health": {"path": "/health", "timeout_s": self.cfg.health_timeout_s, "interval_s": 0.5},
            "env": {"SOAK_LEVEL": str(s.env_level)},
        }
        if s.method == "systemd":
            manifest["systemd"] = {"command": "python3 app.py --port {port}"}
            mode = {"health": "unhealthy", "exit": "exit"}.get(s.broken or "", "ok")
            self.repo.write(f"services/{s.name}/app.py", APP.format(version=str(s.version), mode=mode))
        else:
            self.repo.write(f"services/{s.name}/Dockerfile",
                            EXIT_DOCKERFILE if s.broken == "exit" else DOCKERFILE.format(port=s.port))
            if s.broken != "health":
                self.repo.write(f"services/{s.name}/www/health",
                                json.dumps({"status": "active", "service": s.name, "version": str(s.version)}))
            self.repo.write(f"services/{s.name}/www/index.html", f"<h1>{s.name} v{s.version}</h1>\n")
        self.repo.write(f"services/{s.name}.yaml", yaml.safe_dump(manifest))

    def _set(self, s: Svc) -> None:
        self.svcs[s.name] = s
        if s.present and s.broken is None:
            self.good_versions.setdefault(s.name, set()).add(s.version)
        self.render(s)

    def initial(self) -> str:
        for i in range(self.cfg.services):
            method = "systemd" if i % 4 == 3 else "docker"
            self._set(Svc(f"{self.cfg.prefix}-{i:02d}", method, self.hosts[i % len(self.hosts)], self.cfg.base_port + i,
                          version=self._next()))
        sha = self.repo.commit(f"soak: {self.cfg.services} services")
        self.history.append((sha, {}))
        return sha

    def step(self, index: int) -> tuple[str, str]:
        """Make one random commit; returns its kind and sha."""
        present = sorted(n for n, s in self.svcs.items() if s.present)
        absent = sorted(n for n, s in self.svcs.items() if not s.present)
        revertible = [i for i, (_, before) in enumerate(self.history)
                      if i > 0 and before and all(self.last_touch.get(n) == i for n in before)]
        kinds = {k: w for k, w in KINDS.items()
                 if not (k == "readd" and not absent) and not (k == "revert" and not revertible)
                 and not (k == "delete" and len(present) <= max(2, self.cfg.services // 3))
                 and not (k == "move" and len(self.hosts) < 2)}
        kind = self.rng.choices(list(kinds), weights=list(kinds.values()))[0]
        before: dict[str, Svc | None] = {}

        def touch(new: Svc) -> None:
            before.setdefault(new.name, self.svcs.get(new.name))
            self._set(new)

        pick = lambda: self.svcs[self.rng.choice(present)]  # noqa: E731
        if kind == "revert":
            target = self.rng.choice(revertible)
            sha, restored = self.history[target]
            git(self.repo.path, "revert", "--no-edit", sha)
            for name, old in restored.items():
                before[name] = self.svcs.get(name)
                assert old is not None  # a service's first commit is the initial one, never reverted
                self._set(old)
            if git(self.repo.path, "status", "--porcelain"):  # the model and the revert must agree exactly
                raise AssertionError(f"revert of {sha[:12]} differs from the model:\n"
                                     + git(self.repo.path, "status", "--porcelain"))
            new_sha = git(self.repo.path, "rev-parse", "HEAD")
        else:
            if kind == "change":
                s = pick()
                touch(dataclasses.replace(s, version=self._next(), broken=None))
            elif kind == "env":
                s = pick()
                touch(dataclasses.replace(s, env_level=s.env_level + 1))
            elif kind == "broken":
                s = pick()
                touch(dataclasses.replace(s, version=self._next(), broken=self.rng.choice(["health", "exit"])))
            elif kind == "delete":
                touch(dataclasses.replace(pick(), present=False))
            elif kind == "readd":
                s = self.svcs[self.rng.choice(absent)]
                touch(dataclasses.replace(s, present=True, broken=None, version=self._next(),
                                          host=self.rng.choice(self.hosts)))
            elif kind == "move":
                # healthy services only: a broken release has no last good one on the new host to fall back to
                healthy = [n for n in present if self.svcs[n].broken is None] or present
                s = self.svcs[self.rng.choice(healthy)]
                touch(dataclasses.replace(s, host=self.rng.choice([h for h in self.hosts if h != s.host])))
            else:  # multi: several services in one commit
                for name in self.rng.sample(present, min(len(present), self.rng.randint(2, 3))):
                    s = self.svcs[name]
                    touch(dataclasses.replace(s, version=self._next(), broken=None) if self.rng.random() < 0.7
                          else dataclasses.replace(s, env_level=s.env_level + 1))
            new_sha = self.repo.commit(f"soak {index}: {kind} {', '.join(sorted(before))}")
        self.history.append((new_sha, before))
        for name in before:
            self.last_touch[name] = len(self.history) - 1
        self.kinds[kind] += 1
        return kind, new_sha


# --------------------------------------------------------------------------- the daemon process


TRACE_HOOK = '''\
import collections, gc, json, os, signal, sys
_dir = os.environ.get("SOAK_TRACE_DIR")
if _dir:
    _count = [0]

    def _dump(signum, frame):
        _count[0] += 1
        gc.collect()
        types = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())
        path = os.path.join(_dir, f"snapshot-{_count[0]}")
        with open(path + ".tmp", "w") as f:
            json.dump({"blocks": sys.getallocatedblocks(), "types": types}, f)
        os.rename(path + ".tmp", path)

    signal.signal(signal.SIGUSR1, _dump)
'''


class TracedDaemon(DaemonProcess):
    """The daemon process, its config in ``workdir``; with ``trace`` a sitecustomize hook makes SIGUSR1 dump
    its live objects counted by type."""

    def __init__(self, settings: Settings, workdir: Path, trace: bool = False) -> None:
        super().__init__(settings, workdir, timeout_s=30)
        self.trace_dir = workdir / "trace" if trace else None
        self.snapshots: list[Path] = []

    def env(self) -> dict[str, str]:
        env = super().env()
        if self.trace_dir is not None:
            self.trace_dir.mkdir(exist_ok=True)
            (self.trace_dir / "sitecustomize.py").write_text(TRACE_HOOK)
            env.update(PYTHONPATH=f"{self.trace_dir}{os.pathsep}{env['PYTHONPATH']}", SOAK_TRACE_DIR=str(self.trace_dir))
        return env

    def figures(self) -> dict[str, int]:
        """RSS (KiB), open file descriptors and child processes of the daemon, from /proc."""
        proc = Path(f"/proc/{self.pid}")
        children = sum(len((t / "children").read_text().split()) for t in (proc / "task").iterdir())
        return {"rss_kib": rss_kib(self.pid), "fds": len(os.listdir(proc / "fd")), "children": children}

    async def snapshot(self) -> None:
        """With tracing: the daemon's object counts by type (bounded wait for its file)."""
        if self.trace_dir is None:
            return
        path = self.trace_dir / f"snapshot-{len(self.snapshots) + 1}"
        os.kill(self.pid, signal.SIGUSR1)
        for _ in range(600):
            if path.exists():
                self.snapshots.append(path)
                return
            await asyncio.sleep(0.2)

    def top_growth(self, limit: int = 15) -> list[str]:
        """Which object types grew in number between the first and the last snapshot, most first."""
        if len(self.snapshots) < 2:
            return []
        first, last = (json.loads(p.read_text()) for p in (self.snapshots[0], self.snapshots[-1]))
        grew = Counter(last["types"])
        grew.subtract(first["types"])
        return [f"allocated blocks {first['blocks']} -> {last['blocks']}"] + [
            f"{t}: {first['types'].get(t, 0)} -> {last['types'][t]}" for t, n in grew.most_common(limit) if n > 0]


async def outstanding(d: DaemonProcess) -> int:
    return len((await d.get("/health"))["jobs_in_flight"])


async def quiesce(d: DaemonProcess, head: str, limit_s: float) -> bool:
    """Bounded wait until the daemon has reconciled ``head``, runs no job, and every service is in sync or
    blocked by a quarantine, three polls in a row (it converges by itself: nothing here forces a sync)."""
    deadline, stable = time.monotonic() + limit_s, 0
    while time.monotonic() < deadline:
        health, services = await d.get("/health"), await d.get("/services")
        last = health.get("last_reconcile") or {}
        quiet = (not health["jobs_in_flight"] and last.get("revision") == head and all(
            s["sync_status"] == "Synced" or any("quarantined" in r for r in s["reasons"])
            for s in services["services"]))
        stable = stable + 1 if quiet else 0
        if stable >= 3:
            return True
        await asyncio.sleep(1)
    return False


# --------------------------------------------------------------------------- the report


@dataclass
class SoakReport:
    seed: int
    commits: int = 0
    services: int = 0
    hosts: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    commit_phase_s: float = 0.0
    settle_s: float = 0.0
    jobs: dict[str, int] = field(default_factory=dict)  # "kind status" -> count
    rollbacks: int = 0
    prunes: int = 0
    deploy_median_s: float | None = None
    rss_series: list[tuple[int, int]] = field(default_factory=list)  # (commit, KiB)
    baseline: dict[str, int] = field(default_factory=dict)  # after commit baseline_at
    end: dict[str, int] = field(default_factory=dict)
    rss_growth_pct: float | None = None
    final_services: int = 0
    final_broken: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    daemon_log_errors: list[str] = field(default_factory=list)
    daemon_exit: int | None = None

    def summary(self) -> str:
        lines = [
            f"soak seed {self.seed}: {self.commits} commits ({', '.join(f'{k} {v}' for k, v in sorted(self.kinds.items()))}) "
            f"to {self.services} services on {self.hosts} hosts",
            f"wall {self.wall_s:.0f} s (commits {self.commit_phase_s:.0f} s, settle {self.settle_s:.0f} s)",
            f"jobs: {sum(self.jobs.values())} ({', '.join(f'{k} {v}' for k, v in sorted(self.jobs.items()))}); "
            f"rollbacks {self.rollbacks}, prunes {self.prunes}, median deploy {self.deploy_median_s} s",
            f"daemon RSS after commit {self.baseline.get('commit')}: {self.baseline.get('rss_kib')} KiB, at the end "
            f"{self.end.get('rss_kib')} KiB: growth {self.rss_growth_pct}%; fds {self.baseline.get('fds')} -> "
            f"{self.end.get('fds')}, child processes {self.baseline.get('children')} -> {self.end.get('children')}",
            f"RSS series (commit: KiB): {' '.join(f'{c}:{k}' for c, k in self.rss_series)}",
            f"end state: {self.final_services} services, broken (quarantined) {self.final_broken or 'none'}; "
            f"leaks {len(self.leaks)}, problems {len(self.problems)}, daemon exit {self.daemon_exit}",
        ]
        lines += [f"  LEAK {x}" for x in self.leaks] + [f"  PROBLEM {x}" for x in self.problems]
        lines += [f"  note {x}" for x in self.notes] + [f"  daemon log: {x}" for x in self.daemon_log_errors]
        return "\n".join(lines)


# --------------------------------------------------------------------------- the end-state check


async def probe_host(h: HostInfo, instance: str, base_dir: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        "ssh", *ssh_opts(h), f"{h.user}@{h.address}", shlex.join(["python3", "-", instance, base_dir]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(HOST_PROBE.encode()), 120)
    if proc.returncode != 0:
        raise RuntimeError(f"probe of {h.name} failed: {err.decode()[-500:]}")
    return json.loads(out)


async def http_version(address: str, port: int) -> str | None:
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            resp = await client.get(f"http://{address}:{port}/health")
        return str(resp.json().get("version")) if resp.status_code == 200 else f"HTTP {resp.status_code}"
    except (httpx.HTTPError, ValueError) as e:
        return f"error {type(e).__name__}"


async def check_end_state(report: SoakReport, work: Workload, info: SandboxInfo, settings: Settings,
                          desired: DesiredState, quarantined: dict[str, str]) -> None:
    """Compare the hosts, the Registry and the daemon's store with the last commit; record what differs."""
    instance, keep = settings.instance, settings.keep_releases
    by_name = {h.name: h for h in info.hosts}
    facts = dict(zip(by_name, await asyncio.gather(
        *(probe_host(h, instance, desired.hosts[h.name].base_dir) for h in info.hosts))))
    async with registry_client(info) as reg:
        entries = await reg.list()
    want = {n: s for n, s in work.svcs.items() if s.present}
    if set(desired.services) != set(want) or desired.broken:
        report.problems.append(f"the last commit loads as {sorted(desired.services)} (invalid {sorted(desired.broken)}),"
                               f" the model says {sorted(want)}")
    report.final_services = len(want)
    report.final_broken = sorted(n for n, s in want.items() if s.broken)

    def running_on(host: str, name: str, method: str) -> list[str]:
        f = facts[host]
        if method == "docker":
            return [c["release"] for c in f["containers"] if c["service"] == name and c["running"]]
        return [u["release"] for u in f["units"] if u["service"] == name and u["active"] == "active"]

    for name, s in sorted(want.items()):
        release = desired.releases[name].id
        spec, host = desired.services[name], desired.hosts[s.host]
        serving_host = s.host
        if s.broken and not running_on(s.host, name, s.method):
            # moved, and the release on the new host is quarantined: the old host keeps the last good one
            serving_host = next((h for h in facts if running_on(h, name, s.method)), s.host)
        running = running_on(serving_host, name, s.method)
        served = await http_version(info_host(info, serving_host).internal_address, s.port)
        entry = entries.get(name)
        if s.broken is None:
            if running != [release]:
                report.problems.append(f"{name}: runs {running} on {s.host}, the last commit wants {release}")
            if served != str(s.version):
                report.problems.append(f"{name}: answers {served!r} on {s.host}:{s.port}, want version {s.version}")
            exp = expected_registry_entry(spec, host, desired.releases[name], instance)
            got = {k: getattr(entry, k) for k in ("endpoint", "status", "metadata")} if entry else None
            if got != exp:
                report.problems.append(f"{name}: Registry entry {got}, want {exp}")
        else:
            if quarantined.get(name) != release:
                report.problems.append(f"{name}: broken release {release} not quarantined ({quarantined.get(name)})")
            if release in running:
                report.problems.append(f"{name}: the broken release {release} runs")
            if running:
                if serving_host != s.host:
                    report.notes.append(f"{name}: its release on {s.host} is quarantined; {serving_host}, where it "
                                        f"moved from, still serves the last good one")
                if served not in {str(v) for v in work.good_versions.get(name, ())}:
                    report.problems.append(f"{name}: quarantined; what serves answers {served!r}, not a good version")
                if entry is None or (entry.metadata or {}).get("release") not in running:
                    report.problems.append(f"{name}: quarantined; Registry says "
                                           f"{(entry.metadata or {}).get('release') if entry else None}, runs {running}")
            else:
                report.notes.append(f"{name}: broken release quarantined and nothing serves (no good release of it "
                                    f"was deployed on {s.host}, or it was superseded before it finished)")
        for other, of in facts.items():
            left = {"containers": [c["name"] for c in of["containers"] if c["service"] == name],
                    "units": [u["unit"] for u in of["units"] if u["service"] == name],
                    "images": [i["tags"] for i in of["images"] if i["service"] == name],
                    "files": of["dirs"].get(name)}
            if other == s.host or not any(left.values()):
                continue
            if s.broken:  # kept until git changes: the planner prunes the old host once the new one serves
                report.notes.append(f"{name}: quarantined on {s.host}; {other}, where it moved from, keeps {left}")
            else:
                report.leaks.append(f"{name}: left on {other} after moving to {s.host}: {left}")

    for host, f in facts.items():
        if f["locks"]:
            report.leaks.append(f"{host}: lock files left with no job running: {f['locks']}")
        for c in f["containers"]:
            if c["service"] not in want:
                report.leaks.append(f"{host}: container {c['name']} of removed service {c['service']}")
        for u in f["units"]:
            if u["service"] not in want:
                report.leaks.append(f"{host}: unit {u['unit']} of removed service {u['service']}")
        for name, d in f["dirs"].items():
            if name not in want:
                report.leaks.append(f"{host}: directory of removed service {name}: {d}")
                continue
            rels = {r.removesuffix(".manifest.json").removesuffix(".partial") for r in d["releases"]}
            partial = [r for r in d["releases"] if r.endswith(".partial")]
            allowed = keep
            if partial:
                report.leaks.append(f"{host}: {name}: partial transfers {partial}")
            for what, items in (("release dirs", rels), ("venvs", set(d["venvs"])),
                                ("env files", {e.removesuffix(".env") for e in d["env"]}),
                                ("images", {i["release"] for i in f["images"] if i["service"] == name}),
                                ("containers", {c["release"] for c in f["containers"] if c["service"] == name})):
                if len(items) > allowed:
                    report.leaks.append(f"{host}: {name}: {len(items)} {what} (keep_releases {keep}): {sorted(items)}")
        for i in f["images"]:
            if i["service"] not in want:
                report.leaks.append(f"{host}: image {i['tags']} of removed service {i['service']}")
    for name, entry in entries.items():
        meta = entry.metadata or {}
        if meta.get("instance") == instance and name not in want:
            report.leaks.append(f"Registry entry of removed service {name}")


def info_host(info: SandboxInfo, name: str) -> HostInfo:
    return next(h for h in info.hosts if h.name == name)


# --------------------------------------------------------------------------- the run


async def run_soak(cfg: SoakConfig, info: SandboxInfo, workdir: Path, log: Any = print) -> SoakReport:
    """The whole soak on the hosts of ``info``; returns its figures and every difference found."""
    report = SoakReport(seed=cfg.seed, services=cfg.services, hosts=len(info.hosts))
    repo = DesiredRepo(workdir / "repo", info)
    settings = settings_for(workdir / "daemon", info, repo).model_copy(update={
        "keep_releases": cfg.keep_releases, "resync_interval_s": cfg.resync_interval_s})
    work = Workload(repo, cfg, [h.name for h in info.hosts])
    daemon = TracedDaemon(settings, workdir, trace=cfg.count_objects)
    log(f"soak: seed {cfg.seed}, {cfg.commits} commits, {cfg.services} services on {len(info.hosts)} hosts, "
        f"instance {settings.instance}, daemon log {daemon.log}")
    t0 = time.monotonic()
    head = work.initial()
    try:
        await daemon.start()
        if not await quiesce(daemon, head, cfg.quiesce_s):
            report.problems.append(f"the initial {cfg.services} services did not settle within {cfg.quiesce_s:g} s")
        baseline_at = min(cfg.baseline_at, max(1, cfg.commits // 2))
        t_commits, last_commit = time.monotonic(), 0.0
        for i in range(1, cfg.commits + 1):
            wait_until = time.monotonic() + cfg.outstanding_wait_s
            while await outstanding(daemon) >= cfg.max_outstanding and time.monotonic() < wait_until:
                await asyncio.sleep(0.2)
            await asyncio.sleep(max(0.0, last_commit + cfg.interval_s - time.monotonic()))
            kind, head = await asyncio.to_thread(work.step, i)
            last_commit = time.monotonic()
            if i % 10 == 0:
                report.rss_series.append((i, daemon.figures()["rss_kib"]))
                log(f"  commit {i}/{cfg.commits} ({kind}), jobs running {await outstanding(daemon)}, "
                    f"RSS {report.rss_series[-1][1]} KiB")
            if i == baseline_at:
                if not await quiesce(daemon, head, cfg.quiesce_s):
                    report.problems.append(f"no quiescence after commit {i} within {cfg.quiesce_s:g} s")
                report.baseline = {"commit": i, **daemon.figures()}
                await daemon.snapshot()
        report.commits = cfg.commits
        report.kinds = dict(work.kinds)
        report.commit_phase_s = round(time.monotonic() - t_commits, 1)
        t_settle = time.monotonic()
        if not await quiesce(daemon, head, cfg.quiesce_s):
            report.problems.append(f"no quiescence after the last commit within {cfg.quiesce_s:g} s")
        report.settle_s = round(time.monotonic() - t_settle, 1)
        report.end = {"commit": cfg.commits, **daemon.figures()}
        await daemon.snapshot()
        report.rss_series.append((cfg.commits, report.end["rss_kib"]))
        if report.baseline:
            report.rss_growth_pct = round(100 * (report.end["rss_kib"] / report.baseline["rss_kib"] - 1), 1)
        health = await daemon.get("/health")
        if health["jobs_in_flight"]:
            report.problems.append(f"jobs still in flight at the end: {health['jobs_in_flight']}")
        await job_figures(report, settings)
    finally:
        report.daemon_exit = await daemon.close()
        report.wall_s = round(time.monotonic() - t0, 1)
    report.notes += [f"object growth: {line}" for line in daemon.top_growth()]
    report.daemon_log_errors = [line for line in daemon.log.read_text(errors="replace").splitlines()
                                if " ERROR " in line or "Traceback" in line][:20]
    if report.daemon_exit not in (0, -signal.SIGTERM):  # uvicorn re-raises the SIGTERM it handled, once drained
        report.problems.append(f"the daemon did not stop on SIGTERM within the bounded wait (exit {report.daemon_exit})")

    # The daemon's own plan of the last commit (what `deployerd plan` prints), then the hosts read directly.
    engine = await open_engine(settings)
    try:
        snap = await engine.preview()
        desired, actions = snap.desired, snap.actions
        quarantined = {s: q.release for s, q in (await engine.store.quarantined()).items()}
        for a in actions:
            if a.kind is ActionKind.NOOP or (a.kind is ActionKind.BLOCKED and any("quarantined" in r for r in a.reasons)):
                continue
            report.problems.append(f"plan of the last commit: {a.kind.value} {a.service}@{a.host}: {'; '.join(a.reasons)}")
        await check_end_state(report, work, info, settings, desired, quarantined)
        if not cfg.keep:
            await _remove_instance(engine)
    finally:
        await close_engine(engine)
    return report


async def job_figures(report: SoakReport, settings: Settings) -> None:
    """Every job the daemon recorded, by kind and status; none may be left running."""
    store = await Store.open(settings.db_path)
    try:
        jobs = await store.jobs(limit=1_000_000)
    finally:
        await store.close()
    report.jobs = dict(Counter(f"{j.kind} {j.status.value}" for j in jobs))
    report.rollbacks = sum(j.status is JobStatus.ROLLED_BACK for j in jobs)
    report.prunes = sum(j.kind == "prune" for j in jobs)
    stuck = [f"{j.id} {j.service} {j.kind}" for j in jobs if not j.status.finished]
    if stuck:
        report.problems.append(f"jobs not finished after quiescence: {stuck}")
    done = sorted(j.duration_seconds for j in jobs if j.kind == "deploy" and j.status is JobStatus.SUCCEEDED
                  and j.duration_seconds is not None)
    report.deploy_median_s = done[len(done) // 2] if done else None


async def main() -> int:
    cfg = SoakConfig.from_env()
    hosts = int(os.environ.get("SOAK_HOSTS", 3))
    state = os.environ.get("DEPLOYERD_SOAK_SANDBOX")
    workdir = Path(tempfile.mkdtemp(prefix=f"deployerd-soak-{cfg.seed}-"))
    info = sbx.load_info(Path(state)) if state else await sbx.up_async(hosts, workdir / "sandbox")
    if info is None:
        raise SystemExit(f"DEPLOYERD_SOAK_SANDBOX={state}: no sandbox is up there")
    try:
        report = await run_soak(cfg, info, workdir)
    finally:
        if not state:
            await sbx.down_async(workdir / "sandbox")
    print(report.summary())
    out = Path(os.environ.get("SOAK_JSON") or workdir / "soak.json")
    out.write_text(json.dumps(dataclasses.asdict(report), indent=2))
    print(f"summary: {out}; work dir (repo, daemon log, config): {workdir}")
    growth_ok = report.rss_growth_pct is not None and report.rss_growth_pct < 10
    if not growth_ok:
        print(f"FAIL: daemon RSS growth {report.rss_growth_pct}% (limit 10%)")
    return 0 if growth_ok and not report.problems and not report.leaks else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
