"""Injection corpus end to end: hostile values in manifests deployed by a real daemon to a sandbox host.

Every payload that could run a command tries to create a canary file (``/tmp/canary-*``); after the deploys
the host is searched for any canary, and the values that are valid (env values, command arguments, the health
path, build args, odd file names) must reach the service byte for byte.
"""

from __future__ import annotations

import json
import shlex
from urllib.parse import unquote
from pathlib import Path

import pytest
import yaml

from deployerd.runtimes.systemd import SystemdRuntime
from deployerd.sandbox import SandboxInfo
from deployerd.store import JobStatus

from daemon_harness import Daemon, DesiredRepo, git, http_get, running_daemon, settings_for

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

CORPUS = [
    "$(touch /tmp/canary-sub)", "`touch /tmp/canary-tick`", "; touch /tmp/canary-semi", "| touch /tmp/canary-pipe",
    "&& touch /tmp/canary-and", "> /tmp/canary-redir", "< /etc/passwd", "'\"' ; touch /tmp/canary-q", "\\$HOME %h %%",
    "${IFS}touch${IFS}/tmp/canary-ifs", "é 日本語 \U0001f600", "x" * 10_000,
]
MULTILINE = ["a\ntouch /tmp/canary-nl", "a\rb"]

APP = '''\
import json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port = int(sys.argv[sys.argv.index("--port") + 1])


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"argv": sys.argv[1:], "env": dict(os.environ), "path": self.path,
                           "files": sorted(os.listdir("."))}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
'''


async def _remove_units(d: Daemon) -> None:
    """The harness removes containers; this daemon's systemd units, service dirs and users go here."""
    await d.engine.drain()
    for spec in (d.engine.desired.hosts.values() if d.engine.desired else []):
        handle = await d.engine.hosts.handle(spec)
        rt = SystemdRuntime(handle.conn, spec, d.engine.settings.instance)
        instances, _ = await rt.observe()
        for service in {i.service for i in instances}:
            await rt.remove_service(service)


async def test_injection_corpus_runs_nothing_and_arrives_literally(sandbox: SandboxInfo, tmp_path: Path) -> None:
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    env = {f"INJ_{i}": v for i, v in enumerate(CORPUS)}
    argv = [v if len(v) < 1000 else "y" * 3000 for v in CORPUS]  # systemd.command is at most 4096 chars
    args = " ".join(shlex.quote(v) for v in argv)
    health = "/health?$(touch${IFS}/tmp/canary-health);`id`|x>y<z'\"&"
    manifest = {"name": "inj-sd", "host": "sbx-1", "method": "systemd", "port": 8601, "source": "services/inj-sd",
                "health": {"path": health, "timeout_s": 20, "interval_s": 0.5}, "env": env,
                "systemd": {"command": f"python3 app.py --port {{port}} {args}"}}
    repo.write("services/inj-sd.yaml", yaml.safe_dump(manifest))
    repo.write("services/inj-sd/app.py", APP)
    # a file name cannot hold '/': if run, these would create their canary in the release dir (searched too)
    odd_names = ["$(touch canary-f)", "`touch canary-g`", "a;touch canary-h", "new\nline", "-rf", "'q\"é"]
    for name in odd_names:
        repo.write(f"services/inj-sd/{name}", "x")
    # rejected by the schema: never deployed, never run
    repo.write("services/inj-key.yaml", yaml.safe_dump({
        "name": "inj-key", "host": "sbx-1", "port": 8602, "source": "services/inj-sd", "method": "systemd",
        "env": {"A$(touch /tmp/canary-key)": "x"}}))
    repo.write("services/inj-nl.yaml", yaml.safe_dump({
        "name": "inj-nl", "host": "sbx-1", "port": 8603, "source": "services/inj-sd", "method": "systemd",
        "env": {"A": MULTILINE[0]}, "systemd": {"command": "python3 app.py\ntouch /tmp/canary-cmd"}}))
    bad_name = "x$(touch${IFS}canary-name);`id`"
    repo.write(f"services/{bad_name}.yaml", yaml.safe_dump({
        "name": bad_name, "host": "sbx-1", "port": 8604, "source": "services/inj-sd", "method": "systemd"}))
    repo.commit("injection corpus")
    assert "services/inj-sd/new\nline" in git(repo.path, "ls-files", "-z", "services/inj-sd").split("\0")

    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        try:
            await d.reconcile()
            desired = d.engine.desired
            assert {"inj-key", "inj-nl", bad_name} <= desired.broken
            assert "inj-sd" in desired.services, desired.errors
            job = await d.last_job("inj-sd")
            assert job.status is JobStatus.SUCCEEDED, job.error

            facts = json.loads((await http_get(f"http://{sandbox.hosts[0].internal_address}:8601{health}")).text)
            assert facts["argv"][2:] == argv  # every argument arrived as one word, byte for byte
            assert {k: facts["env"].get(k) for k in env} == env
            assert unquote(facts["path"]) == health  # (httpx percent-encodes <, > and " in our own request)
            assert set(odd_names) <= set(facts["files"])

            conn = (await d.engine.hosts.handle(desired.hosts["sbx-1"])).conn
            found = await conn.run(["find", "/", "-xdev", "-name", "canary-*"], check=False)
            assert found.stdout.strip() == "", found.stdout
            tmp = await conn.run(["find", "/tmp", "/var/tmp", "/run", "-name", "canary-*"], check=False)
            assert tmp.stdout.strip() == "", tmp.stdout
        finally:
            await _remove_units(d)
