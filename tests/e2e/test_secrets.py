"""Secrets end to end: values from the daemon's secrets file and from age files in git reach a Docker and a systemd
service, and appear nowhere else.

Looked at, for every value the test ever used: the daemon's logs (every logger at DEBUG, and everything
written to stdout/stderr, uvicorn's included), every file under the daemon's state dir (SQLite db and WAL),
every API answer, ``ps -eo args`` sampled on the host and on the daemon's machine all through each deploy,
everything under the services' folders on the host except the env files, the images and units, the Registry,
and every object of both git repositories. The env files are 0600 root in a 0700 dir and hold the values.
A rotated value deploys a new release; a rollback runs the restored release with the current values.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import subprocess
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from daemon_harness import (
    Daemon,
    DesiredRepo,
    http_get,
    private_file,
    running_daemon,
    settings_for,
)

from deployerd.runtimes.docker import image_tag
from deployerd.runtimes.systemd import unit_name
from deployerd.sandbox import SandboxInfo
from deployerd.secrets import age_path
from deployerd.store import JobStatus

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="session")]

T = TypeVar("T")
WEB, PY, LEAK, PYLEAK = "sec-web", "sec-py", "sec-leak", "sec-pyleak"
PORTS = {WEB: 8461, PY: 8462, LEAK: 8463, PYLEAK: 8464}
MAX_SAMPLES = 3000  # per host per deploy: the sampler is bounded even if a deploy hangs

PROOF_CMD = ("printf '%s\\n%s' \"$DB_PASSWORD\" \"$API_KEY\" | busybox sha256sum > /www/proof"
             " && exec busybox httpd -f -p {port} -h /www")

APP = '''\
import hashlib, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port = int(sys.argv[sys.argv.index("--port") + 1])
if os.environ.get("LEAK_TOKEN"):
    print("cannot connect with token " + os.environ["LEAK_TOKEN"], flush=True)  # a service echoing its secret
    sys.exit(1)
PROOF = hashlib.sha256((os.environ["DB_PASSWORD"] + "\\n" + os.environ["API_KEY"]).encode()).hexdigest()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = {"/health": b"ok", "/proof": PROOF.encode()}.get(self.path)
        self.send_response(200 if body else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
'''


def proof(db: str, api: str) -> str:
    return hashlib.sha256(f"{db}\n{api}".encode()).hexdigest()


def age_keygen(tmp: Path) -> tuple[Path, str]:
    identity = tmp / "age.key"
    subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
    identity.chmod(0o600)
    public = subprocess.run(["age-keygen", "-y", str(identity)], check=True, capture_output=True, text=True)
    return identity, public.stdout.strip()


def encrypt(repo: DesiredRepo, service: str, public: str, plaintext: str) -> None:
    """What a user does: `age -r KEY` on stdin, commit the ciphertext."""
    out = subprocess.run(["age", "--encrypt", "--armor", "--recipient", public], input=plaintext.encode(),
                         check=True, capture_output=True).stdout
    (repo.path / age_path(service)).parent.mkdir(exist_ok=True)
    (repo.path / age_path(service)).write_bytes(out)


def docker_service(repo: DesiredRepo, name: str, command: str, secret_names: list[str], **extra: Any) -> None:
    repo.service(name, PORTS[name], secrets=secret_names, env={"PLAIN": "not-secret"}, health_timeout_s=20,
                 dockerfile="FROM busybox:latest\nCOPY www /www\nCMD " + json.dumps(["busybox", "sh", "-c", command])
                 + "\n", **extra)


def systemd_service(repo: DesiredRepo, name: str, secret_names: list[str]) -> None:
    manifest = {"name": name, "host": "sbx-1", "method": "systemd", "port": PORTS[name], "source": f"services/{name}",
                "health": {"path": "/health", "timeout_s": 20, "interval_s": 0.5}, "secrets": secret_names,
                "systemd": {"command": "python3 app.py --port {port}"}}
    repo.write(f"services/{name}.yaml", yaml.safe_dump(manifest))
    repo.write(f"services/{name}/app.py", APP)


class Watch:
    """Samples ``ps -eo args`` on the host (over the daemon's own SSH connection) and on this machine while an
    awaitable runs; every sample is kept to be searched afterwards."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.host_samples: list[str] = []
        self.local_samples: list[str] = []

    async def during(self, work: Awaitable[T]) -> T:
        task = asyncio.ensure_future(work)
        conn = (await self.d.engine.hosts.handle(self.d.engine.desired.hosts["sbx-1"])).conn \
            if self.d.engine.desired else None

        async def host() -> None:
            for _ in range(MAX_SAMPLES):
                if task.done():
                    return
                if conn is not None:
                    self.host_samples.append((await conn.run(["ps", "-eo", "args"])).stdout)
                await asyncio.sleep(0.05)

        async def local() -> None:
            for _ in range(MAX_SAMPLES):
                if task.done():
                    return
                proc = await asyncio.create_subprocess_exec("ps", "-eo", "args", stdout=asyncio.subprocess.PIPE)
                out, _ = await proc.communicate()
                self.local_samples.append(out.decode("utf-8", "replace"))
                await asyncio.sleep(0.05)

        await asyncio.gather(host(), local())
        return await task


async def sh(d: Daemon, *argv: str, check: bool = True) -> str:
    conn = (await d.engine.hosts.handle(d.engine.desired.hosts["sbx-1"])).conn  # type: ignore[union-attr]
    return (await conn.run(list(argv), check=check)).stdout


async def proof_of(sandbox: SandboxInfo, name: str) -> str:
    resp = await http_get(f"http://{sandbox.hosts[0].internal_address}:{PORTS[name]}/proof")
    assert resp.status_code == 200, resp.text
    return resp.text.split()[0]


async def test_secrets_reach_services_and_nowhere_else(
    sandbox: SandboxInfo, tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    v = {k: f"S3cr{k}{secrets.token_hex(10)}" for k in ("db", "db2", "db3", "web_api", "py_api", "leak")}
    identity, public = age_keygen(tmp_path)
    repo = DesiredRepo(tmp_path / "repo", sandbox)
    docker_service(repo, WEB, PROOF_CMD.format(port=PORTS[WEB]), ["DB_PASSWORD", "API_KEY"])
    systemd_service(repo, PY, ["DB_PASSWORD", "API_KEY"])
    docker_service(repo, LEAK, 'echo "cannot connect with token $LEAK_TOKEN"; exit 3', ["LEAK_TOKEN"],
                   docker={"restart": "no"})
    systemd_service(repo, PYLEAK, ["LEAK_TOKEN"])
    encrypt(repo, WEB, public, f"# the web's key\nAPI_KEY={v['web_api']}\n")
    encrypt(repo, PY, public, f"API_KEY={v['py_api']}\n")
    repo.commit("services with secrets")

    def secrets_yaml(db: str) -> str:
        return yaml.safe_dump({"shared": {"DB_PASSWORD": db},
                               "services": {LEAK: {"LEAK_TOKEN": v["leak"]}, PYLEAK: {"LEAK_TOKEN": v["leak"]}}})

    secrets_file = private_file(tmp_path / "secrets.yaml", secrets_yaml(v["db"]))
    settings = settings_for(tmp_path, sandbox, repo, secrets_file=secrets_file, age_identity_file=identity)
    inst = settings.instance
    api_texts: list[str] = []
    host_files: list[str] = []
    async with running_daemon(settings) as d:
        watch = Watch(d)
        await d.engine.preview()  # the hosts are known before the first sample
        await watch.during(d.reconcile())

        # each service got its values (one from the file, one from its age file), and only its own
        first = {n: await d.last_job(n) for n in PORTS}
        for name in (WEB, PY):
            assert first[name].status is JobStatus.SUCCEEDED, (name, first[name].error, first[name].logs)
            assert "secrets" in first[name].phases[0].details["inputs"]
        assert await proof_of(sandbox, WEB) == proof(v["db"], v["web_api"])
        assert await proof_of(sandbox, PY) == proof(v["db"], v["py_api"])

        # a service that echoes its secret: the job keeps its output, with the value redacted
        for name in (LEAK, PYLEAK):
            job = first[name]
            assert job.status is JobStatus.FAILED, (name, job.status, job.error)
            assert any("cannot connect with token ***" in line for line in job.logs), (name, job.logs)

        # a rotated value (the secrets file changed, no commit) deploys a new release of both services
        private_file(secrets_file, secrets_yaml(v["db2"]))
        await watch.during(d.reconcile())
        second = {n: await d.last_job(n) for n in (WEB, PY)}
        for name in (WEB, PY):
            assert second[name].id != first[name].id and second[name].status is JobStatus.SUCCEEDED
            assert second[name].release != first[name].release
            inputs = (second[name].phases[0].details["inputs"], first[name].phases[0].details["inputs"])
            assert inputs[0]["secrets"] != inputs[1]["secrets"]
        assert await proof_of(sandbox, WEB) == proof(v["db2"], v["web_api"])
        assert await proof_of(sandbox, PY) == proof(v["db2"], v["py_api"])
        assert [j.id for j in (await d.jobs(LEAK))] == [first[LEAK].id]  # unchanged secrets: still quarantined

        # rotated again together with a broken web: the rollback restores the kept release with the value
        # resolved now, not the one its container was created with
        docker_service(repo, WEB, "exit 1", ["DB_PASSWORD", "API_KEY"])
        repo.commit("a broken web")
        private_file(secrets_file, secrets_yaml(v["db3"]))
        await watch.during(d.reconcile())
        broken = await d.last_job(WEB)
        assert broken.status is JobStatus.ROLLED_BACK, (broken.status, broken.error, broken.rollback)
        assert broken.rollback and broken.rollback["release"] == second[WEB].release
        assert broken.rollback["container_reused"] is False  # recreated: its env no longer matched
        assert await proof_of(sandbox, WEB) == proof(v["db3"], v["web_api"])
        assert await proof_of(sandbox, PY) == proof(v["db3"], v["py_api"])
        web_release, py_release = second[WEB].release, (await d.last_job(PY)).release

        # the env files: 0600 root in a 0700 root dir, holding the values (and only they do, below)
        for name, release, want in ((WEB, web_release, ("db3", "web_api")), (PY, py_release, ("db3", "py_api"))):
            sdir = f"/opt/fpai/services/{inst}-{name}"
            assert (await sh(d, "stat", "-c", "%a %U %G", f"{sdir}/env/{release}.env")).strip() == "600 root root"
            assert (await sh(d, "stat", "-c", "%a %U %G", f"{sdir}/env")).strip() == "700 root root"
            conn = (await d.engine.hosts.handle(d.engine.desired.hosts["sbx-1"])).conn  # type: ignore[union-attr]
            text = (await conn.read_bytes(f"{sdir}/env/{release}.env")).decode()
            assert all(v[k] in text for k in want)

        # every API answer
        for path in ["/health", "/metrics", "/services", "/state", "/capabilities", "/dependencies"] + [
                f"/services/{n}" for n in PORTS] + [f"/services/{n}/history" for n in PORTS]:
            resp = await d.http.get(path)
            assert resp.status_code == 200, (path, resp.status_code)
            api_texts.append(resp.text)
        for name in PORTS:
            for job in await d.jobs(name):
                resp = await d.http.get(f"/deploy/{job.id}")
                assert resp.status_code == 200
                api_texts.append(resp.text)

        # the host: every file of the services but the env files, their images and units, the Registry (the
        # services that never served are removed whole, files and image: searched if anything is left)
        for name in PORTS:
            sdir = f"/opt/fpai/services/{inst}-{name}"
            if name in (WEB, PY) or (await sh(d, "ls", "-d", "--", sdir, check=False)).strip():
                host_files.append(await sh(d, "tar", "-C", sdir, "--exclude=./env", "-cf", "-", "."))
        for name in (WEB, LEAK):
            images = (await sh(d, "docker", "image", "ls", "-q", "--filter", f"label=deployerd.service={name}",
                                "--filter", f"label=deployerd.instance={inst}")).split()
            if not images:
                assert name == LEAK, f"no image of {name}"
                continue
            inspected = await sh(d, "docker", "image", "inspect", *images)
            assert name != WEB or image_tag(f"{inst}-{WEB}", web_release) in inspected
            host_files.append(inspected)
            for image in images:
                host_files.append(await sh(d, "docker", "history", "--no-trunc", image))
        for name in (PY, PYLEAK):
            host_files.append(await sh(d, "systemctl", "cat", unit_name(f"{inst}-{name}"), check=name != PY))
            host_files.append(await sh(d, "systemctl", "show", unit_name(f"{inst}-{name}")))
        entries = (await d.engine.registry.list()).items()
        host_files.append(json.dumps({n: e.model_dump(mode="json") for n, e in entries}))
        assert v["db3"] not in "".join(host_files)

    # ----- nothing anywhere holds a value (after the daemon stopped: its state is flushed)
    values = list(v.values())
    where: dict[str, list[str]] = {
        "daemon logs": [caplog.text, *(r.getMessage() for r in caplog.records)],
        "stdout/stderr": list(capfd.readouterr()),
        "API answers": api_texts,
        "ps on the host": watch.host_samples,
        "ps on the daemon's machine": watch.local_samples,
        "host files, images, units, Registry": host_files,
        "state dir files": [p.read_bytes().decode("latin-1") for p in settings.state_dir.rglob("*") if p.is_file()],
    }
    for name, gitdir in (("the repository", repo.path / ".git"),
                         ("the daemon's mirror", settings.repo_cache / "mirror.git")):
        def run(*args: str, gitdir: Path = gitdir) -> str:
            return subprocess.run(["git", "--git-dir", str(gitdir), *args], capture_output=True,
                                  check=True).stdout.decode("latin-1")
        where[f"{name} (every object, every patch)"] = [run("cat-file", "--batch-all-objects", "--batch"),
                                                         run("log", "-p", "--all")]
    for place, texts in where.items():
        for value in values:
            assert not any(value in t for t in texts), f"a secret value is in {place}"
    counts = {place: len(texts) for place, texts in where.items()}
    assert counts["ps on the host"] >= 3 and counts["ps on the daemon's machine"] >= 3, counts
    assert len(caplog.records) > 0 and sum(len(t) for t in where["state dir files"]) > 0
    print(f"\nsecret values searched in {json.dumps(counts)}; {len(caplog.records)} log records")
