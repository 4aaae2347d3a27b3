"""``make demo``: a sandbox host, the embedded Registry, a git copy of ``desired_state/`` and the daemon.

Everything lives under ``.sandbox/demo/`` of the current directory: the sandbox state, the desired-state
repository (commit there to deploy), the daemon's config, state, log and pid file. The daemon keeps running
after the command returns, so a commit made afterwards deploys; ``make demo-down`` stops it all.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from deployerd import sandbox

ROOT = Path.cwd() / ".sandbox" / "demo"
BUNDLED = Path(__file__).resolve().parent.parent / "desired_state"
PORT = int(os.environ.get("DEPLOYERD_DEMO_PORT", "8007"))
WAIT_S = 300


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def _secret(path: Path) -> Path:
    if not path.exists():
        path.write_text(secrets.token_urlsafe(32))
    path.chmod(0o600)
    return path


def _repo(info: sandbox.SandboxInfo) -> Path:
    """The demo's desired-state repository: made once from desired_state/, then the user's to commit to."""
    repo = ROOT / "desired-state"
    host = info.hosts[0]
    if not (repo / ".git").exists():
        shutil.copytree(BUNDLED, repo, dirs_exist_ok=True)
        _git(repo, "init", "-q", "-b", "main")
        _git(repo, "config", "user.email", "demo@deployerd.local")
        _git(repo, "config", "user.name", "deployerd demo")
    hosts_file = repo / "hosts.yaml"
    data = yaml.safe_load(hosts_file.read_text())
    entry = data["hosts"].setdefault(host.name, {})
    # the host's ingress proxy (HAProxy, in the sandbox image): changes and rollbacks drop no request
    want = {"address": host.address, "ssh_port": host.ssh_port, "user": host.user,
            "public_address": host.internal_address, "ingress": "haproxy"}
    if any(entry.get(k) != v for k, v in want.items()):
        entry.update(want)
        hosts_file.write_text("# Servers deployerd deploys to (rewritten by `make demo` for its sandbox host).\n"
                              + yaml.safe_dump(data, sort_keys=False))
    _git(repo, "add", "-A")
    if _git(repo, "status", "--porcelain"):
        _git(repo, "commit", "-qm", "demo: desired state for the sandbox host")
    return repo


def _config(info: sandbox.SandboxInfo, repo: Path) -> Path:
    assert info.registry is not None, "the sandbox started no Registry"
    config = ROOT / "config.yaml"
    config.write_text(yaml.safe_dump({
        "repo_url": str(repo),
        "branch": "main",
        "state_dir": str(ROOT / "state"),
        "registry_url": info.registry.url,
        "registry_token_file": info.registry.token_path,
        "ssh_key": info.hosts[0].key_path,
        "known_hosts": info.hosts[0].known_hosts,
        "api_token_file": str(_secret(ROOT / "api.token")),
        "webhook_secret_file": str(_secret(ROOT / "webhook.secret")),
        "listen_host": "127.0.0.1",
        "listen_port": PORT,
        "poll_interval_s": 30,
        "resync_interval_s": 30,
    }, sort_keys=False))
    return config


def _pid() -> int | None:
    try:
        pid = int((ROOT / "deployerd.pid").read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _stop_daemon() -> int | None:
    """SIGTERM the demo's daemon and wait (bounded) for it to go; returns its pid if one ran."""
    if (pid := _pid()) is not None:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if _pid() is None:
                break
            time.sleep(0.1)
    return pid


def _start_daemon(config: Path) -> int:
    _stop_daemon()
    log = open(ROOT / "deployerd.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "deployerd", "run", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    (ROOT / "deployerd.pid").write_text(str(proc.pid))
    return proc.pid


def _wait_converged(url: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + WAIT_S
    services: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        try:
            services = httpx.get(f"{url}/services", timeout=5).json()["services"]
            if services and all(s["sync_status"] == "Synced" and s["health_status"] == "Healthy" for s in services):
                return services
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(1)
    return services


def up() -> int:
    ROOT.mkdir(parents=True, exist_ok=True)
    state = ROOT / "sandbox"
    info = sandbox.load_info(state)
    if info is None or not sandbox.status(state).healthy:
        print("starting a sandbox host and the embedded Registry (the first run builds the host image: minutes)")
        info = sandbox.up(1, state)
    repo = _repo(info)
    config = _config(info, repo)
    pid = _start_daemon(config)
    url = f"http://127.0.0.1:{PORT}"
    print(f"deployerd started (pid {pid}), API {url}, log {ROOT / 'deployerd.log'}; waiting for the services...")
    services = _wait_converged(url)
    print()
    for s in services:
        print(f"  {s['name']:<14} {s['sync_status']:<10} {s['health_status']:<9} "
              f"release {s['running_release']}  {s['url']}")
    ok = bool(services) and all(s["health_status"] == "Healthy" for s in services)
    changed = next((s["url"] for s in services if s["name"] == "hello-web"), "URL")  # the service the hint changes
    print(f"""
{'All services deployed, healthy and registered.' if ok else 'Not every service converged yet: see the log.'}
  Registry:        curl {info.registry.url if info.registry else '?'}/droplets
  Status:          .venv/bin/deployerd status --config {config}
  Metrics:         curl {url}/metrics
  Deploy a change: cd {repo}
                   echo '<h1>hello again</h1>' > services/hello-web/www/index.html
                   git commit -am 'hello-web: new page'     # deployed within seconds (watched)
  Who answers:     curl -s -D - -o /dev/null {changed} | grep -i x-deployerd-upstream
  Roll back:       git revert --no-edit HEAD
  History:         .venv/bin/deployerd history hello-web --config {config}
  Stop it all:     make demo-down
""")
    return 0 if ok else 1


def down() -> int:
    if (pid := _stop_daemon()) is not None:
        print(f"stopped deployerd (pid {pid})")
    sandbox.down(ROOT / "sandbox")
    return 0
