"""Injection corpus end to end: hostile values in manifests deployed by a real daemon to a sandbox host.

Every payload that could run a command tries to create a canary file (``/tmp/canary-*``); after the deploys
the host is searched for any canary, and the values that are valid (env values, command arguments, the health
path, build args, odd file names) must reach the service byte for byte.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml
from daemon_harness import DesiredRepo, git, http_get, running_daemon, settings_for

from deployerd.sandbox import SandboxInfo
from deployerd.store import JobStatus

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


DOCKER_APP = """FROM busybox:latest
{args}
COPY www /www
RUN env > /www/build.env
CMD ["sh", "-c", "env > /www/run.env && exec httpd -f -p {port} -h /www"]
"""


def _env_file(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


async def test_injection_corpus_in_docker_env_and_build_args(sandbox: SandboxInfo, tmp_path: Path) -> None:
    """The same corpus as container env values and build args (which reach the host's ``docker build``
    command line): nothing runs on the host or in the build, and every value arrives byte for byte."""
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    env = {f"INJ_{i}": v for i, v in enumerate(CORPUS)}
    build_args = {f"BA_{i}": v[:2000] for i, v in enumerate(CORPUS)}
    health = "/health?$(touch${IFS}/tmp/canary-dhealth);`id`|x>y<z'\"&"
    arg_lines = "\n".join(f"ARG {k}" for k in build_args)
    repo.service("inj-dk", 8611, dockerfile=DOCKER_APP.format(args=arg_lines, port=8611), env=env,
                 docker={"build_args": build_args})
    manifest = yaml.safe_load((repo.path / "services/inj-dk.yaml").read_text())
    manifest["health"]["path"] = health
    repo.write("services/inj-dk.yaml", yaml.safe_dump(manifest))
    repo.commit("injection corpus, docker")

    async with running_daemon(settings_for(tmp_path, sandbox, repo)) as d:
        await d.reconcile()
        job = await d.last_job("inj-dk")
        assert job.status is JobStatus.SUCCEEDED, job.error
        base = f"http://{sandbox.hosts[0].internal_address}:8611"
        run_env = _env_file((await http_get(f"{base}/run.env")).text)
        assert {k: run_env.get(k) for k in env} == env
        build_env = _env_file((await http_get(f"{base}/build.env")).text)
        assert {k: build_env.get(k) for k in build_args} == build_args

        conn = (await d.engine.hosts.handle(d.engine.desired.hosts["sbx-1"])).conn
        found = await conn.run(["find", "/", "-xdev", "-name", "canary-*"], check=False)
        assert found.stdout.strip() == "", found.stdout  # the engine's data root (image layers) included
        tmp = await conn.run(["find", "/tmp", "/var/tmp", "/run", "-name", "canary-*"], check=False)
        assert tmp.stdout.strip() == "", tmp.stdout
