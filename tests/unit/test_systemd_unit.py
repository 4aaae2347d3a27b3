"""The systemd runtime's pure parts: generated units (checked by systemd-analyze), quoting of hostile
values, command resolution, the state mapping and the probe's facts, as data."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deployerd.desired import HostSpec, Release, ServiceSpec
from deployerd.observed import RunState
from deployerd.runtimes import RUNTIMES
from deployerd.runtimes.base import ReleaseContext
from deployerd.runtimes.systemd import (
    PROBE,
    SystemdRuntime,
    command_argv,
    default_user,
    parse_probe,
    render_unit,
    run_state,
    systemd_env_file_text,
    unit_name,
    unit_quote,
    venv_dir,
)

INPUTS = {"source": "s1", "image": "i1", "env": "e1", "port": "p1", "health": "h1", "host": "o1"}
REPO_ROOT = Path(__file__).resolve().parents[2]


def ctx(base_dir: str = "/opt/fpai/services", command: str = "python3 app.py --port {port}", instance: str = "default",
        env: dict[str, str] | None = None, **systemd: Any) -> ReleaseContext:
    spec = ServiceSpec(name="web", host="prod-1", port=8300, source="services/web", method="systemd",
                       systemd={"command": command, **systemd})
    return ReleaseContext(spec=spec, host=HostSpec(name="prod-1", address="10.0.0.1", base_dir=base_dir),
                          release=Release(id="abcdef012345", inputs=INPUTS), commit="c" * 40,
                          instance=instance, env=env or {})


def exec_start(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("ExecStart="))


def test_registered_under_its_method() -> None:
    assert RUNTIMES["systemd"] is SystemdRuntime


# --------------------------------------------------------------------------- systemd-analyze verify


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed (e2e verifies on a host)")
@pytest.mark.parametrize("command", [
    "python3 app.py --port {port}",
    "python3 app.py --name 'a b' '%h' '$HOME' ';' 'q\"x' 'back\\slash' --port={port}",
    "bin/serve --port {port}",
])
def test_generated_unit_passes_systemd_analyze_verify(tmp_path: Path, command: str) -> None:
    c = ctx(base_dir=str(tmp_path / "services"), command=command)
    venv_bin = Path(venv_dir(c.service_dir, c.release.id)) / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python3").symlink_to(sys.executable)
    release = Path(c.release_dir)
    (release / "bin").mkdir(parents=True)
    (release / "bin" / "serve").write_text("#!/bin/sh\n")
    (release / "bin" / "serve").chmod(0o755)
    (Path(c.service_dir) / "current").symlink_to(release)
    (Path(c.service_dir) / "data").mkdir()
    unit = tmp_path / unit_name(c.qualified_name)
    unit.write_text(render_unit(c, "nobody", command_argv(c, {"python3", "pip"})))
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # no complaint about this unit except the deliberate test user (a real deploy uses its own user)
    complaints = [line for line in done.stderr.splitlines() if unit.name in line and "nobody" not in line]
    assert complaints == []


def test_unit_has_the_required_settings() -> None:
    c = ctx(instance="blue")
    text = render_unit(c, "deployerd-blue-web", command_argv(c, {"python3"}))
    lines = set(text.splitlines())
    sdir = "/opt/fpai/services/blue-web"
    for want in (
        "Type=exec", "User=deployerd-blue-web", f"WorkingDirectory={sdir}/current",
        f"EnvironmentFile={sdir}/env/abcdef012345.env", "Restart=on-failure", "StartLimitBurst=3",
        "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "ProtectHome=yes",
        f"ReadWritePaths={sdir}/data", "WantedBy=multi-user.target",
        "X-Deployerd-Service=web", "X-Deployerd-Release=abcdef012345", "X-Deployerd-Instance=blue",
        "X-Deployerd-Commit=" + "c" * 40, "X-Deployerd-Managed-By=git", "X-Deployerd-Port=8300",
        "X-Deployerd-Inputs=" + json.dumps(INPUTS, sort_keys=True, separators=(",", ":")),
        f'Environment="PATH={sdir}/venvs/abcdef012345/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"',
    ):
        assert want in lines, want
    assert exec_start(text) == f'ExecStart="{sdir}/venvs/abcdef012345/bin/python3" "app.py" "--port" "8300"'
    assert unit_name(c.qualified_name) == "deployerd-blue-web.service"
    assert render_unit(c, "deployerd-blue-web", command_argv(c, {"python3"})) == text  # pure


# --------------------------------------------------------------------------- hostile values


def test_specifiers_quotes_variables_and_separators_in_the_command_are_escaped() -> None:
    c = ctx(command="""python3 app.py '%h' '%%' '$HOME' '${PATH}' ';' 'q"x' "it's" 'back\\slash' '\\;' '"; rm -rf /'""")
    argv = command_argv(c, {"python3"})
    assert argv[1:] == ["app.py", "%h", "%%", "$HOME", "${PATH}", ";", 'q"x', "it's", "back\\slash", "\\;",
                        '"; rm -rf /']
    line = exec_start(render_unit(c, "u", argv))
    assert line == ("ExecStart=" + f'"{c.service_dir}/venvs/abcdef012345/bin/python3" "app.py" "%%h" "%%%%" '
                    '"$$HOME" "$${PATH}" ";" "q\\"x" "it\'s" "back\\\\slash" "\\\\;" "\\"; rm -rf /"')
    # every word is one double-quoted token: no unescaped quote, no lone % or $ reaches systemd
    body = line.removeprefix("ExecStart=")
    words = re.findall(r'"((?:[^"\\]|\\.)*)"', body)
    assert " ".join(f'"{w}"' for w in words) == body and len(words) == len(argv)
    assert all(re.fullmatch(r"(?:[^%]|%%)*", w) and re.fullmatch(r"(?:[^$]|\$\$)*", w) for w in words)


def test_a_prefix_character_cannot_change_how_systemd_runs_the_command() -> None:
    # "-" (ignore failure), "+" (full privileges), "!" / "@" / ":" are prefixes only when unquoted
    for first in ("-python3", "+python3", "!python3", "@python3", ":python3"):
        line = exec_start(render_unit(ctx(command=f"{first} app.py"), "u", [first, "app.py"]))
        assert line.startswith(f'ExecStart="{first}"')


def test_newlines_never_reach_the_unit() -> None:
    c = ctx()
    with pytest.raises(ValueError):
        unit_quote("a\nExecStartPre=/bin/sh")
    with pytest.raises(ValueError):
        render_unit(c, "u", ["python3", "x\n[Service]"])
    with pytest.raises(ValueError):
        systemd_env_file_text({"A": "x\nB=y"})


def test_env_file_quotes_values_for_systemd() -> None:
    text = systemd_env_file_text({"B": "plain", "A": 'q"x\\y$HOME%h#z \'s `id`', "C": " padded "})
    assert text == (b'A="q\\"x\\\\y\\$HOME%h#z \'s \\`id\\`"\n'
                    b'B="plain"\n'
                    b'C=" padded "\n')


def test_unbalanced_quotes_in_the_command_fail_start() -> None:
    from deployerd.runtimes.base import StartError

    with pytest.raises(StartError, match="cannot be split"):
        command_argv(ctx(command="python3 'app.py"), {"python3"})


# --------------------------------------------------------------------------- command resolution


@pytest.mark.parametrize("command,bins,want0", [
    ("python3 app.py", {"python3"}, "{venv}/bin/python3"),
    ("gunicorn app:app", {"python3", "gunicorn"}, "{venv}/bin/gunicorn"),
    ("busybox httpd", {"python3"}, "busybox"),  # not in the venv: systemd's own search path
    ("bin/serve", {"python3"}, "{sdir}/current/bin/serve"),  # relative to the running release
    ("./serve.sh", set(), "{sdir}/current/serve.sh"),
    ("/usr/bin/python3 app.py", {"python3"}, "/usr/bin/python3"),
])
def test_command_resolution(command: str, bins: set[str], want0: str) -> None:
    c = ctx(command=command)
    argv = command_argv(c, bins)
    assert argv[0] == want0.format(venv=venv_dir(c.service_dir, c.release.id), sdir=c.service_dir)


def test_port_placeholder_is_substituted_and_other_braces_are_left_alone() -> None:
    assert command_argv(ctx(command="python3 app.py --port={port} '{x}' {0}"), set())[1:] == [
        "app.py", "--port=8300", "{x}", "{0}"]


def test_default_user_fits_useradd_and_differs_per_instance() -> None:
    long = "t" * 6 + "-" + "a" * 63
    for q in ("web", long, "blue-" + "b" * 63):
        u = default_user(q)
        assert re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", u), u
    assert default_user("web") == "deployerd-web"
    assert default_user(long) != default_user("t" * 6 + "-" + "a" * 62 + "b")


# --------------------------------------------------------------------------- facts


@pytest.mark.parametrize("props,want", [
    ({"LoadState": "loaded", "ActiveState": "active", "SubState": "running"}, RunState.RUNNING),
    ({"LoadState": "loaded", "ActiveState": "activating", "SubState": "start"}, RunState.RUNNING),
    ({"LoadState": "loaded", "ActiveState": "activating", "SubState": "auto-restart"}, RunState.FAILED),
    ({"LoadState": "loaded", "ActiveState": "failed", "SubState": "failed", "Result": "exit-code"}, RunState.FAILED),
    ({"LoadState": "loaded", "ActiveState": "inactive", "SubState": "dead"}, RunState.STOPPED),
    ({"LoadState": "loaded", "ActiveState": "inactive", "SubState": "dead", "Result": "success"}, RunState.STOPPED),
    ({"LoadState": "loaded", "ActiveState": "inactive", "SubState": "dead", "Result": "start-limit-hit"},
     RunState.FAILED),
    ({"LoadState": "loaded", "ActiveState": "deactivating", "SubState": "stop-sigterm"}, RunState.STOPPED),
    ({"LoadState": "not-found", "ActiveState": "inactive"}, None),
    ({}, None),
])
def test_run_state(props: dict[str, str], want: RunState | None) -> None:
    assert run_state(props) is want


def _unit(service: str, release: str, current: str | None, active: str = "active", sub: str = "running",
          kept: list[list[Any]] | None = None, **meta: str) -> dict[str, Any]:
    return {"unit": f"deployerd-{service}.service", "qualified": service, "current": current, "kept": kept or [],
            "meta": {"service": service, "release": release, "commit": "c1", "instance": "default",
                     "managed-by": "git", "port": "8300", "inputs": json.dumps(INPUTS), **meta},
            "props": {"Id": f"deployerd-{service}.service", "LoadState": "loaded", "ActiveState": active,
                      "SubState": sub}}


def test_parse_probe() -> None:
    units = [
        _unit("web", "r2", "r2", kept=[["r1", 100.0], ["r2", 200.0]]),
        _unit("api", "r9", "r9", active="inactive", sub="dead"),
        _unit("odd", "r5", "r4"),  # the unit names a release `current` does not point at
        _unit("bad", "r1", "r1", inputs="{not json", port="x"),
        {"unit": "deployerd-x.service", "meta": {}, "props": {}},  # no metadata: not ours to report
    ]
    instances, kept = parse_probe(units, "prod-1")
    by = {i.service: i for i in instances}
    assert set(by) == {"web", "api", "odd", "bad"}
    web = by["web"]
    assert (web.method, web.release, web.commit, web.state, web.ref, web.port, web.current, web.inputs) == (
        "systemd", "r2", "c1", RunState.RUNNING, "deployerd-web.service", 8300, True, INPUTS)
    assert by["api"].state is RunState.STOPPED
    assert by["odd"].state is RunState.STOPPED
    assert by["bad"].inputs == {} and by["bad"].port is None
    assert kept == {"web": ["r2", "r1"], "api": [], "odd": [], "bad": []}


def test_probe_script_reads_units_metadata_current_and_complete_releases(tmp_path: Path) -> None:
    """The remote helper run locally against a fake unit dir and base dir (systemctl answers nothing here)."""
    units, base = tmp_path / "units", tmp_path / "base"
    units.mkdir()
    c = ctx(base_dir=str(base))
    (units / unit_name("web")).write_text(render_unit(c, "u", command_argv(c, set())))
    other = ctx(base_dir=str(base), instance="blue")
    (units / unit_name(other.qualified_name)).write_text(render_unit(other, "u", command_argv(other, set())))
    (units / "unrelated.service").write_text("[Service]\nExecStart=/bin/true\n")
    sdir = base / "web"
    for rel, complete in (("abcdef012345", True), ("older0000000", True), ("partial00000", False)):
        (sdir / "releases" / rel).mkdir(parents=True)
        (sdir / "venvs" / rel).mkdir(parents=True)
        if complete:
            (sdir / "venvs" / rel / ".deployerd-complete").write_text("{}")
    os.utime(sdir / "venvs" / "older0000000" / ".deployerd-complete", (1, 1))
    (sdir / "current").symlink_to("releases/abcdef012345")
    env = {**os.environ, "PATH": str(tmp_path)}  # no systemctl: props stay empty, the rest is read
    (tmp_path / "systemctl").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "systemctl").chmod(0o755)
    out = subprocess.run([sys.executable, "-c", PROBE, str(units), str(base), "default"], capture_output=True,
                         text=True, env=env, check=True).stdout
    found = json.loads(out)
    assert [u["unit"] for u in found] == ["deployerd-web.service"]  # the blue instance's unit is not ours
    u = found[0]
    assert u["current"] == "abcdef012345"
    assert u["meta"]["release"] == "abcdef012345" and u["meta"]["instance"] == "default"
    assert json.loads(u["meta"]["inputs"]) == INPUTS
    instances, kept = parse_probe(found, "prod-1")
    assert kept == {"web": ["abcdef012345", "older0000000"]}
    only = subprocess.run([sys.executable, "-c", PROBE, str(units), str(base), "default", "nothere"],
                          capture_output=True, text=True, env=env, check=True).stdout
    assert json.loads(only) == []


def test_service_unit_of_deployerd_itself_verifies() -> None:
    unit = REPO_ROOT / "systemd" / "deployerd.service"
    text = unit.read_text()
    for want in ("Type=notify", "WatchdogSec=60", "Restart=on-failure", "StateDirectory=deployerd", "User=deployerd",
                 "ExecStart=/opt/deployerd/bin/deployerd run --config /etc/deployerd/config.yaml",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes", "ProtectHome=yes"):
        assert want in text.splitlines(), want
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True)
    # the binary is not installed on a build machine: that is the only complaint allowed
    problems = [line for line in done.stderr.splitlines()
                if "deployerd.service" in line and "/opt/deployerd/bin/deployerd" not in line
                and "User=deployerd" not in line]
    assert problems == [], done.stderr


# --------------------------------------------------------------------------- one unit per release, behind the proxy


def test_a_release_unit_behind_the_proxy_records_its_private_port_and_binds_loopback(tmp_path: Path) -> None:
    c = ctx(command="python3 app.py --host {host} --port {port}", base_dir=str(tmp_path / "services"))
    text = render_unit(c, "u", command_argv(c, {"python3"}, 21234), 21234)
    lines = set(text.splitlines())
    assert "X-Deployerd-Private-Port=21234" in lines and "X-Deployerd-Port=8300" in lines
    assert f"WorkingDirectory={c.release_dir}" in lines  # its own release, not `current`
    assert exec_start(text).endswith('"app.py" "--host" "127.0.0.1" "--port" "21234"')
    stop_first = render_unit(c, "u", command_argv(c, {"python3"}))
    assert exec_start(stop_first).endswith('"app.py" "--host" "0.0.0.0" "--port" "8300"')
    assert not any(line.startswith("X-Deployerd-Private-Port") for line in stop_first.splitlines())
    assert unit_name("web", "abcdef012345") == "deployerd-web@abcdef012345.service"
    if shutil.which("systemd-analyze") is None:
        return
    venv_bin = Path(venv_dir(c.service_dir, c.release.id)) / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python3").symlink_to(sys.executable)
    Path(c.release_dir).mkdir(parents=True)
    (Path(c.service_dir) / "data").mkdir()
    unit = tmp_path / unit_name(c.qualified_name, c.release.id)
    unit.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True)
    assert [line for line in done.stderr.splitlines() if unit.name in line and "nobody" not in line
            and "'u'" not in line and " u " not in line] == [], done.stderr


def test_the_default_command_keeps_its_release_ids() -> None:
    """``{host}`` came into the default command; a service on the default keeps the release id it had."""
    from deployerd.releases import compute_release
    from deployerd.schema import DEFAULT_COMMAND_BEFORE

    spec = ServiceSpec(name="web", host="prod-1", port=8300, source="services/web", method="systemd")
    before = spec.model_copy(update={"systemd": spec.systemd.model_copy(update={"command": DEFAULT_COMMAND_BEFORE})})
    host = HostSpec(name="prod-1", address="10.0.0.1")
    assert "{host}" in spec.systemd.command
    assert compute_release(spec, host, []).id == compute_release(before, host, []).id
    assert command_argv(ctx(command=spec.systemd.command), set())[2:] == ["--host", "0.0.0.0", "--port", "8300"]


def _release_unit(release: str, state: str = "active", enabled: bool = False, mtime: float = 1.0,
                  private: str = "21000") -> dict[str, Any]:
    u = _unit("web", release, "r1", active=state, sub="running" if state == "active" else "dead",
              **{"private-port": private})
    u.update(unit=f"deployerd-web@{release}.service", per_release=True, mtime=mtime)
    u["props"].update(Id=u["unit"], UnitFileState="enabled" if enabled else "disabled")
    return u


@pytest.mark.parametrize(("units", "current"), [
    # a new release started beside the serving one (an interrupted switch): both running, both current until
    # the proxy says which one it sends requests to (observe._serving)
    ([_release_unit("r1", enabled=True), _release_unit("r2", mtime=2.0)], {"r1", "r2"}),
    # none running (stopped by hand): the enabled one, what the last switch made serve
    ([_release_unit("r1", "inactive", enabled=True), _release_unit("r2", "inactive", mtime=2.0)], {"r1"}),
    # none running, none enabled: the newest
    ([_release_unit("r1", "inactive"), _release_unit("r2", "inactive", mtime=2.0)], {"r2"}),
    ([_release_unit("r2", enabled=True), _release_unit("r1", "inactive")], {"r2"}),
])
def test_release_units_which_is_current(units: list[dict[str, Any]], current: set[str]) -> None:
    instances, _ = parse_probe(units, "prod-1")
    assert {i.release for i in instances if i.current} == current
    assert {i.private_port for i in instances} == {21000}
    # a per-release unit runs its own release dir: `current` naming another release does not stop it
    assert all(i.state is RunState.RUNNING for i in instances if i.release in current and len(current) == 2)


def test_the_single_unit_from_before_the_proxy_is_read_beside_release_units() -> None:
    legacy = _unit("web", "r0", "r0")
    instances, _ = parse_probe([legacy, _release_unit("r1", "inactive")], "prod-1")
    by = {i.release: i for i in instances}
    assert by["r0"].current and by["r0"].private_port is None and by["r0"].state is RunState.RUNNING
    assert by["r1"].private_port == 21000


def test_probe_reads_release_units_and_filters_by_service(tmp_path: Path) -> None:
    units, base = tmp_path / "units", tmp_path / "base"
    units.mkdir()
    c = ctx(base_dir=str(base))
    (units / unit_name("web", "abcdef012345")).write_text(render_unit(c, "u", command_argv(c, set(), 21000), 21000))
    (units / unit_name("web")).write_text(render_unit(c, "u", command_argv(c, set())))
    (units / unit_name("web-api", "abcdef012345")).write_text(
        render_unit(c, "u", command_argv(c, set(), 21001), 21001).replace("X-Deployerd-Service=web",
                                                                        "X-Deployerd-Service=web-api"))
    env = {**os.environ, "PATH": str(tmp_path)}
    (tmp_path / "systemctl").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "systemctl").chmod(0o755)
    out = subprocess.run([sys.executable, "-c", PROBE, str(units), str(base), "default", "web"], capture_output=True,
                         text=True, env=env, check=True).stdout
    found = json.loads(out)
    assert sorted((u["unit"], u["per_release"]) for u in found) == [
        ("deployerd-web.service", False), ("deployerd-web@abcdef012345.service", True)]  # not web-api's
    instances, _ = parse_probe(found, "prod-1")
    assert sorted((i.ref, i.private_port) for i in instances) == [
        ("deployerd-web.service", None), ("deployerd-web@abcdef012345.service", 21000)]
