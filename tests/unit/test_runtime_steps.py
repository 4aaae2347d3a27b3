"""The runtimes' operations as data: the Docker container config and build argv, the systemd build and
start steps, and the one executor's payload, asserted exactly with no host (as Kamal tests its commands)."""

from __future__ import annotations

import json

from fakes import context

from deployerd.runtimes.docker import build_argv, container_config
from deployerd.runtimes.steps import Run, Write, payload
from deployerd.runtimes.systemd import ReleaseFacts, build_steps, start_steps
from deployerd.runtimes.systemd_steps import switched_steps

SDIR = "/opt/fpai/services/web"


def facts(built: bool, has_req: bool = True, has_wheels: bool = False) -> ReleaseFacts:
    return ReleaseFacts(release_dir=True, manifest=True, key="k" * 16, has_req=has_req, has_wheels=has_wheels,
                        built=built, linked=False, bins=(), current=None)


def test_container_config() -> None:
    ctx = context(docker={"container_port": 80, "restart": "on-failure"}).with_env({"B": "2", "A": "1"})
    cfg = container_config(ctx)
    rid = ctx.release.id
    assert cfg == {
        "Image": f"deployerd/web:{rid}",
        "Env": ["A=1", "B=2"],
        "Labels": ctx.labels(),
        "ExposedPorts": {"80/tcp": {}},
        "HostConfig": {
            "Init": True,
            "PortBindings": {"80/tcp": [{"HostIp": "0.0.0.0", "HostPort": "8080"}]},
            "RestartPolicy": {"Name": "on-failure", "MaximumRetryCount": 5},
            "LogConfig": {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "3"}},
        },
    }
    assert container_config(context(docker={"restart": "no"}))["HostConfig"]["RestartPolicy"] == {"Name": ""}


def test_build_argv() -> None:
    ctx = context(docker={"build_args": {"Z": "1", "A": "x y"}})
    argv = build_argv(ctx)
    rdir = f"{SDIR}/releases/{ctx.release.id}"
    assert argv[:7] == ["env", "DOCKER_BUILDKIT=1", "docker", "build", "--quiet", "--tag",
                        f"deployerd/web:{ctx.release.id}"]
    assert argv[-7:] == ["--build-arg", "A=x y", "--build-arg", "Z=1", "--file", f"{rdir}/Dockerfile", rdir]
    assert argv.count("--label") == len(ctx.labels())


def test_a_venv_is_built_once_per_set_of_dependencies() -> None:
    ctx = context(method="systemd", systemd={"command": "python3 app.py"})
    rid, venv = ctx.release.id, f"{SDIR}/pyenvs/{'k' * 16}"
    lock = ("flock", "--wait", "900", "--", f"{SDIR}/.build.lock")
    steps = build_steps(ctx, facts(built=False, has_wheels=True))
    assert steps[:4] == [
        Run("install", "-d", "-m", "0755", "--", f"{SDIR}/pyenvs", f"{SDIR}/venvs"),
        Run(*lock, "rm", "-rf", "--", venv, timeout=960),
        Run(*lock, "python3", "-m", "venv", "--", venv, timeout=300),
        Run(*lock, f"{venv}/bin/python", "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
            "--progress-bar", "off", "--no-index", "--find-links", f"{SDIR}/releases/{rid}/wheels", "-r",
            f"{SDIR}/releases/{rid}/requirements.txt", timeout=900),
    ]
    marker = steps[6]
    assert isinstance(marker, Write) and marker.path == f"{venv}/.deployerd-complete"
    assert steps[-2:] == [Run("ln", "-sfnT", "--", f"../pyenvs/{'k' * 16}", f"{SDIR}/venvs/{rid}.new"),
                          Run("mv", "-T", "--", f"{SDIR}/venvs/{rid}.new", f"{SDIR}/venvs/{rid}")]
    # the same dependencies already built (an env- or command-only change): nothing but the link and modes
    reuse = build_steps(ctx, facts(built=True))
    assert [s.argv[0] for s in reuse if isinstance(s, Run)] == ["install", "chmod", "chmod", "ln", "mv"]
    assert not any(isinstance(s, Write) for s in reuse)
    # no requirements: a venv without pip
    bare = build_steps(ctx, facts(built=False, has_req=False))
    assert Run(*lock, "python3", "-m", "venv", "--without-pip", "--", venv, timeout=300) in bare
    assert not any(isinstance(s, Run) and "pip" in s.argv for s in bare)


def test_start_steps_name_the_release_then_run_it() -> None:
    ctx = context(method="systemd", systemd={"command": "python3 app.py"}).with_env({"TOKEN": "s3cret"})
    rid, unit = ctx.release.id, "deployerd-web.service"
    name, run = start_steps(ctx, "deployerd-web", "UNIT TEXT")
    assert [s.argv if isinstance(s, Run) else ("write", s.path, oct(s.mode)) for s in name] == [
        ("useradd", "--system", "--no-create-home", "--user-group", "--home-dir", "/nonexistent", "--shell",
         "/usr/sbin/nologin", "--", "deployerd-web"),
        ("install", "-d", "-m", "0700", "--", f"{SDIR}/env"),
        ("write", f"{SDIR}/env/{rid}.env", "0o600"),
        ("install", "-d", "-m", "0750", "--", f"{SDIR}/data"),
        ("chown", "--", "deployerd-web:", f"{SDIR}/data"),
        ("write", f"/etc/systemd/system/{unit}", "0o644"),
        ("ln", "-sfnT", "--", f"releases/{rid}", f"{SDIR}/current.new"),
        ("mv", "-T", "--", f"{SDIR}/current.new", f"{SDIR}/current"),
    ]
    assert name[0] == Run(*name[0].argv, ok=(0, 9))  # type: ignore[union-attr]
    assert run == [Run("systemctl", "daemon-reload"), Run("systemctl", "enable", "--quiet", "--", unit),
                   Run("systemctl", "reset-failed", "--", unit, ok=None),
                   Run("systemctl", "restart", "--", unit, timeout=120)]
    # the secret travels only as file content on stdin, never as an argument
    assert all("s3cret" not in a for s in name + run if isinstance(s, Run) for a in s.argv)
    sent = json.loads(payload(name))
    assert all("s3cret" not in json.dumps(item.get("run", "")) for item in sent)
    assert sent[2]["mode"] == 0o600 and "data" in sent[2]


def test_behind_the_proxy_a_release_gets_its_own_unit_started_beside_the_old_one() -> None:
    ctx = context(method="systemd", systemd={"command": "python3 app.py"}).with_env({"TOKEN": "s3cret"})
    rid, unit = ctx.release.id, f"deployerd-web@{ctx.release.id}.service"
    name, run = start_steps(ctx, "deployerd-web", "UNIT TEXT", private_port=21234)
    writes = [s.path for s in name if not isinstance(s, Run)]
    assert writes == [f"{SDIR}/env/{rid}.env", f"/etc/systemd/system/{unit}"]
    assert not any(isinstance(s, Run) and "current" in " ".join(s.argv) for s in name)  # current moves at switch
    # start, not restart: a unit of this release that runs may be the one the proxy already sends requests to
    assert run == [Run("systemctl", "daemon-reload"), Run("systemctl", "reset-failed", "--", unit, ok=None),
                   Run("systemctl", "start", "--", unit, timeout=120)]
    assert all("s3cret" not in a for s in name + run if isinstance(s, Run) for a in s.argv)


def test_after_the_switch_the_new_unit_is_enabled_current_and_the_others_stop() -> None:
    ctx = context(method="systemd", systemd={"command": "python3 app.py"})
    rid = ctx.release.id
    steps = switched_steps(ctx, ["deployerd-web@old.service", "deployerd-web.service"])
    assert [s.argv for s in steps if isinstance(s, Run)] == [
        ("systemctl", "enable", "--quiet", "--", f"deployerd-web@{rid}.service"),
        ("ln", "-sfnT", "--", f"releases/{rid}", f"{SDIR}/current.new"),
        ("mv", "-T", "--", f"{SDIR}/current.new", f"{SDIR}/current"),
        ("systemctl", "disable", "--now", "--quiet", "--", "deployerd-web@old.service", "deployerd-web.service"),
    ]
    assert len(switched_steps(ctx, [])) == 3  # nothing else to stop
    moved = [s.argv for s in switched_steps(ctx, [], remove=True) if isinstance(s, Run)]  # from before the proxy
    assert ("rm", "-f", "--", "/etc/systemd/system/deployerd-web.service") in moved
    assert moved[-2:] == [("systemctl", "daemon-reload"), ("systemctl", "reset-failed", "--", "deployerd-web.service")]
