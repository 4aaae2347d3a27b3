"""systemd on a host: a Python app run by a generated unit, one virtual environment per release.

Layout under the service dir (``<base_dir>/<qualified name>``)::

    releases/<release>/          the transferred source (root-owned, world-readable)
    releases/<release>.manifest.json
    venvs/<release> -> ../pyenvs/<key>   the release's venv: one per set of dependencies (requirements,
                                 wheels, the host's Python), shared by releases that share them, so an env-
                                 or command-only change builds nothing; ``.deployerd-complete`` is written last
    env/<release>.env            EnvironmentFile (0600 in a 0700 dir; read by PID 1, never by the service)
    current -> releases/<id>     the unit's WorkingDirectory, switched atomically (``current.new`` + ``mv -T``)
    data/                        the only path the service may write (ReadWritePaths=)

One unit per service, ``/etc/systemd/system/deployerd-<qualified name>.service``. Its ``X-Deployerd-*``
lines (ignored by systemd) carry what Docker keeps in labels: service, release, commit, instance,
managed_by, port and inputs; observe reads them back. A rollback is a ``start`` of the previous release:
its venv and source are still on the host, so only the unit, ``current`` and a restart change.

The build and start steps are data (``build_steps``, ``start_steps``), executed by ``steps.execute``: Start
Service is three round trips (the release's facts, naming it, running it), Build two.

Facts are read by one constant helper (``python3 -c PROBE args``, no value ever spliced into code or a
shell string): every deployerd unit of this instance, its metadata, its systemd state, ``current`` and
the complete releases, in one round trip per host.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import shlex
from dataclasses import dataclass
from typing import Any

from deployerd.connection import CommandError
from deployerd.failpoints import failpoint
from deployerd.observed import Instance, RunState
from deployerd.layout import release_id
from deployerd.runtimes.base import BuildResult, Output, ReleaseContext, Removed, Runtime, StartError, StartResult
from deployerd.runtimes.steps import Run, Step, Write, execute

UNIT_DIR = "/etc/systemd/system"
META_PREFIX = "X-Deployerd-"
COMPLETE_MARKER = ".deployerd-complete"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_PROPS = "Id,LoadState,ActiveState,SubState,Result,NRestarts,MainPID"

# The probe: constant code, values only as argv. Prints a JSON list of this instance's units.
PROBE = r"""
import json, os, subprocess, sys
unit_dir, base, instance, only = sys.argv[1], sys.argv[2], sys.argv[3], set(sys.argv[4:])
pre, suf, meta_pre = "deployerd-", ".service", "X-Deployerd-"
units = []
try:
    files = sorted(os.listdir(unit_dir))
except OSError:
    files = []
for fn in files:
    if not (fn.startswith(pre) and fn.endswith(suf)):
        continue
    q = fn[len(pre):-len(suf)]
    if only and q not in only:
        continue
    meta = {}
    try:
        with open(os.path.join(unit_dir, fn), encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(meta_pre) and "=" in line:
                    k, v = line[len(meta_pre):].rstrip("\n").split("=", 1)
                    meta[k.lower()] = v
    except OSError:
        continue
    if meta.get("instance") != instance:
        continue
    sdir = os.path.join(base, q)
    try:
        current = os.path.basename(os.readlink(os.path.join(sdir, "current")))
    except OSError:
        current = None
    kept = []
    try:
        rels = os.listdir(os.path.join(sdir, "releases"))
    except OSError:
        rels = []
    for r in rels:
        marker = os.path.join(sdir, "venvs", r, ".deployerd-complete")
        if os.path.isdir(os.path.join(sdir, "releases", r)) and os.path.isfile(marker):
            kept.append([r, os.stat(marker).st_mtime])
    units.append({"unit": fn, "qualified": q, "meta": meta, "current": current, "kept": kept, "props": {}})
if units:
    out = subprocess.run(["systemctl", "show", "--property=__PROPS__", "--", *[u["unit"] for u in units]],
                         capture_output=True, text=True)
    props = {}
    for block in out.stdout.split("\n\n"):
        d = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if "Id" in d:
            props[d["Id"]] = d
    for u in units:
        u["props"] = props.get(u["unit"], {})
print(json.dumps(units))
""".replace("__PROPS__", _PROPS)


def unit_name(qualified: str) -> str:
    return f"deployerd-{qualified}.service"


def default_user(qualified: str) -> str:
    """``deployerd-<qualified name>``, shortened with a digest to fit the 32-character limit of useradd."""
    name = f"deployerd-{qualified}"
    if len(name) <= 32:
        return name
    return f"deployerd-{qualified[:13]}-{hashlib.sha256(qualified.encode()).hexdigest()[:8]}"


def service_user(ctx: ReleaseContext) -> str:
    return ctx.spec.systemd.user or default_user(ctx.qualified_name)


def venv_dir(service_dir: str, release: str) -> str:
    """The venv path a release's unit names (a link to the venv its dependencies share, see ``layout``)."""
    return posixpath.join(service_dir, "venvs", release)


# --------------------------------------------------------------------------- pure: unit text


def unit_quote(value: str) -> str:
    """One word for a unit file: double-quoted, with quotes, backslashes, ``%`` specifiers and ``$``
    variables escaped, so it reaches the process exactly as given (and a lone ``;`` is not a separator)."""
    if any(c in value for c in "\0\n\r"):
        raise ValueError("unit values must not contain NUL or newline characters")
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def _plain(value: str) -> str:
    """A single-valued setting that takes no quotes (paths, names): only specifiers need escaping."""
    if any(c in value for c in "\0\n\r"):
        raise ValueError("unit values must not contain NUL or newline characters")
    return value.replace("%", "%%")


def env_file_quote(value: str) -> str:
    """A value for an EnvironmentFile: double-quoted with systemd's shell-like escapes."""
    if any(c in value for c in "\0\n\r"):
        raise ValueError("env values must not contain NUL or newline characters")
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")
    return f'"{escaped}"'


def systemd_env_file_text(env: dict[str, str]) -> bytes:
    """EnvironmentFile text: values quoted so quotes, backslashes, ``$`` and ``#`` arrive as written."""
    return "".join(f"{k}={env_file_quote(v)}\n" for k, v in sorted(env.items())).encode()


def command_argv(ctx: ReleaseContext, venv_bins: set[str]) -> list[str]:
    """The manifest's command as argv: ``{port}`` substituted, the first word resolved against the venv's
    bin (then left to systemd's own search), a relative path taken from the ``current`` release dir."""
    try:
        argv = shlex.split(ctx.spec.systemd.command)
    except ValueError as e:
        raise StartError(f"systemd.command of {ctx.spec.name} cannot be split into words: {e}") from None
    if not argv:
        raise StartError(f"systemd.command of {ctx.spec.name} is empty")
    argv = [a.replace("{port}", str(ctx.spec.port)) for a in argv]
    exe = argv[0]
    if "/" not in exe:
        if exe in venv_bins:
            argv[0] = posixpath.join(venv_dir(ctx.service_dir, ctx.release.id), "bin", exe)
    elif not exe.startswith("/"):
        argv[0] = posixpath.normpath(posixpath.join(ctx.service_dir, "current", exe))
    return argv


def render_unit(ctx: ReleaseContext, user: str, argv: list[str]) -> str:
    """The unit file of ``ctx``'s release (pure: same input, same text)."""
    venv_bin = posixpath.join(venv_dir(ctx.service_dir, ctx.release.id), "bin")
    meta = {
        "Service": ctx.spec.name,
        "Release": ctx.release.id,
        "Commit": ctx.commit,
        "Instance": ctx.instance,
        "Managed-By": ctx.managed_by,
        "Port": str(ctx.spec.port),
        "Inputs": json.dumps(ctx.release.inputs, sort_keys=True, separators=(",", ":")),
    }
    for key, value in meta.items():
        if any(c in value for c in "\0\n\r"):
            raise ValueError(f"metadata {key} must not contain NUL or newline characters")
    lines = [
        "# Generated by deployerd; changes are overwritten at the next deploy.",
        "[Unit]",
        f"Description={_plain(f'deployerd {ctx.qualified_name} release {ctx.release.id}')}",
        "After=network-online.target",
        "Wants=network-online.target",
        # a crash loop ends as failed: at most 3 starts per minute
        "StartLimitIntervalSec=60",
        "StartLimitBurst=3",
        *(f"{META_PREFIX}{key}={value}" for key, value in meta.items()),
        "",
        "[Service]",
        "Type=exec",
        f"User={_plain(user)}",
        f"WorkingDirectory={_plain(posixpath.join(ctx.service_dir, 'current'))}",
        f"EnvironmentFile={_plain(ctx.env_file)}",
        f"Environment={unit_quote(f'PATH={venv_bin}:{BASE_PATH}')}",
        f"Environment={unit_quote(f'VIRTUAL_ENV={posixpath.dirname(venv_bin)}')}",
        f"Environment={unit_quote('PYTHONUNBUFFERED=1')}",
        f"ExecStart={' '.join(unit_quote(a) for a in argv)}",
        "Restart=on-failure",
        "RestartSec=2",
        "TimeoutStopSec=20",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectControlGroups=yes",
        "RestrictSUIDSGID=yes",
        f"ReadWritePaths={_plain(posixpath.join(ctx.service_dir, 'data'))}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- pure: facts


def run_state(props: dict[str, str]) -> RunState | None:
    """systemd's ActiveState/SubState -> RunState; None when systemd does not know the unit."""
    if not props or props.get("LoadState") in ("not-found", "bad-setting", "error", "masked"):
        return None
    active, sub = props.get("ActiveState", ""), props.get("SubState", "")
    if active == "failed" or sub == "auto-restart":
        return RunState.FAILED
    if active in ("active", "reloading", "activating"):
        return RunState.RUNNING
    if active == "inactive" and props.get("Result", "success") not in ("success", ""):
        return RunState.FAILED  # ended by a failure (e.g. its start limit) and the failed state was reset
    return RunState.STOPPED


def parse_probe(units: list[dict[str, Any]], host: str, method: str = "systemd"
                ) -> tuple[list[Instance], dict[str, list[str]]]:
    """The probe's JSON -> instances (one per unit, always current) and kept releases (newest first)."""
    instances: list[Instance] = []
    kept: dict[str, list[str]] = {}
    for u in units:
        meta = u.get("meta") or {}
        service = meta.get("service")
        if not service:
            continue
        release = meta.get("release", "")
        state = run_state(u.get("props") or {}) or RunState.STOPPED
        if u.get("current") != release and state is RunState.RUNNING:
            state = RunState.STOPPED  # the unit names a release `current` does not point at: not serving it
        try:
            inputs = json.loads(meta.get("inputs", "{}"))
        except ValueError:
            inputs = {}
        port = meta.get("port", "")
        instances.append(Instance(
            service=service, host=host, method=method, release=release, commit=meta.get("commit", ""),
            state=state, ref=u.get("unit", ""), port=int(port) if port.isdigit() else None,
            managed_by=meta.get("managed-by", "git"), current=True,
            inputs=inputs if isinstance(inputs, dict) else {},
        ))
        releases = [r for r, _ in sorted(u.get("kept") or [], key=lambda k: k[1], reverse=True)]
        kept.setdefault(service, []).extend(r for r in releases if r not in kept[service])
    return instances, kept


def _tail(text: str, lines: int = 40) -> list[str]:
    return [line for line in text.splitlines() if line.strip()][-lines:]


# --------------------------------------------------------------------------- pure: steps

# One release's facts, in one round trip: is it complete on the host, which venv it needs (the digest of what
# the venv depends on: the requirements file and the wheels as the release manifest lists them, and the host's
# Python), is that venv built, what the venv's bin holds, what ``current`` names.
RELEASE_FACTS = r"""
import hashlib, json, os, sys
sdir, release, req = sys.argv[1], sys.argv[2], sys.argv[3]
rdir = os.path.join(sdir, "releases", release)
try:
    with open(os.path.join(sdir, "releases", release + ".manifest.json")) as f:
        manifest = json.load(f)
except (OSError, ValueError):
    manifest = None
m = manifest or {}
has_req = os.path.isfile(os.path.join(rdir, req))
has_wheels = os.path.isdir(os.path.join(rdir, "wheels"))
deps = {"python": [sys.version, os.path.realpath(sys.executable)], "requirements": m.get(req) if has_req else None,
        "wheels": sorted([k, v] for k, v in m.items() if k.startswith("wheels/")) if has_wheels else None}
key = hashlib.sha256(json.dumps(deps, sort_keys=True).encode()).hexdigest()[:16]
venv = os.path.join(sdir, "venvs", release)
try:
    bins = sorted(os.listdir(os.path.join(venv, "bin")))
except OSError:
    bins = []
try:
    current = os.path.basename(os.readlink(os.path.join(sdir, "current")))
except OSError:
    current = None
print(json.dumps({
    "release_dir": os.path.isdir(rdir), "manifest": manifest is not None, "key": key,
    "has_req": has_req, "has_wheels": has_wheels,
    "built": os.path.isfile(os.path.join(sdir, "pyenvs", key, ".deployerd-complete")),
    "linked": os.path.isfile(os.path.join(venv, ".deployerd-complete")), "bins": bins, "current": current}))
"""

# Venvs in ``pyenvs/`` that no release's ``venvs/`` link points at any more (run under the service's lock).
PRUNE_PYENVS = r"""
import os, shutil, sys
sdir = sys.argv[1]
pyenvs, venvs = os.path.join(sdir, "pyenvs"), os.path.join(sdir, "venvs")
try:
    used = {os.path.realpath(os.path.join(venvs, v)) for v in os.listdir(venvs)}
    have = os.listdir(pyenvs)
except OSError:
    sys.exit(0)
for k in have:
    if os.path.realpath(os.path.join(pyenvs, k)) not in used:
        shutil.rmtree(os.path.join(pyenvs, k), ignore_errors=True)
        print(k)
"""


@dataclass(frozen=True)
class ReleaseFacts:
    """What ``RELEASE_FACTS`` reads for one release."""

    release_dir: bool
    manifest: bool
    key: str  # the venv's key: the digest of what it depends on
    has_req: bool
    has_wheels: bool
    built: bool  # the venv for ``key`` is complete
    linked: bool  # the release's venv link leads to a complete venv
    bins: tuple[str, ...]
    current: str | None

    @classmethod
    def parse(cls, text: str) -> ReleaseFacts:
        d = json.loads(text)
        return cls(d["release_dir"], d["manifest"], d["key"], d["has_req"], d["has_wheels"], d["built"],
                   d["linked"], tuple(d["bins"]), d["current"])


def _link(target: str, link: str) -> list[Step]:
    """Point ``link`` at ``target`` atomically (a new link beside it, renamed over it)."""
    new = f"{link}.new"
    return [Run("ln", "-sfnT", "--", target, new), Run("mv", "-T", "--", new, link)]


def build_steps(ctx: ReleaseContext, facts: ReleaseFacts) -> list[Step]:
    """Build: the venv for the release's dependencies when no release built it yet, then the release's link
    to it. A build cut short by a daemon crash goes on running on the host (no pty: no SIGHUP when the SSH
    connection dies), so every step that writes a venv holds the service's build lock: the next build waits
    for that orphan to end before it deletes and rewrites the same directory."""
    layout, rid = ctx.layout, ctx.release.id
    venv = layout.pyenv(facts.key)
    steps: list[Step] = [Run("install", "-d", "-m", "0755", "--", layout.pyenvs_dir, layout.venvs_dir)]
    if not facts.built:
        locked = ("flock", "--wait", "900", "--", layout.build_lock)
        steps += [Run(*locked, "rm", "-rf", "--", venv, timeout=16 * 60),
                  # pip only when there is something to install: ensurepip is most of a venv's build time
                  Run(*locked, "python3", "-m", "venv", *([] if facts.has_req else ["--without-pip"]), "--", venv,
                      timeout=5 * 60)]
        if facts.has_req:
            pip = [posixpath.join(venv, "bin", "python"), "-m", "pip", "install", "--disable-pip-version-check",
                   "--no-input", "--progress-bar", "off"]
            if facts.has_wheels:
                pip += ["--no-index", "--find-links", posixpath.join(ctx.release_dir, "wheels")]
            steps.append(Run(*locked, *pip, "-r", posixpath.join(ctx.release_dir, ctx.spec.systemd.requirements),
                             timeout=15 * 60))
    # readable by the service user whatever umask wrote them; nothing writable but by root
    steps += [Run("chmod", "-R", "u+rwX,go+rX,go-w", "--", ctx.release_dir, venv),
              Run("chmod", "0755", "--", layout.service_dir, layout.releases_dir)]
    if not facts.built:
        marker = {"key": facts.key, "built_for": rid, "commit": ctx.commit}
        steps.append(Write(posixpath.join(venv, COMPLETE_MARKER), json.dumps(marker).encode()))
    return steps + _link(posixpath.join("..", "pyenvs", facts.key), layout.venv(rid))


def start_steps(ctx: ReleaseContext, user: str, unit_text: str) -> tuple[list[Step], list[Step]]:
    """Start Service as two lists: what makes the host name the new release (user, env file, data dir, unit,
    ``current``), then what makes systemd run it. The caller runs them in two round trips (a crash test
    stops the daemon between them)."""
    layout, unit = ctx.layout, unit_name(ctx.qualified_name)
    name = [
        Run("useradd", "--system", "--no-create-home", "--user-group", "--home-dir", "/nonexistent",
            "--shell", "/usr/sbin/nologin", "--", user, ok=(0, 9)),  # 9: it exists
        Run("install", "-d", "-m", "0700", "--", layout.env_dir),
        Write(ctx.env_file, systemd_env_file_text(ctx.env), 0o600),
        Run("install", "-d", "-m", "0750", "--", layout.data_dir),
        Run("chown", "--", f"{user}:", layout.data_dir),  # the user and its login group
        Write(posixpath.join(UNIT_DIR, unit), unit_text.encode()),
        *_link(posixpath.join("releases", ctx.release.id), layout.current),
    ]
    run = [
        Run("systemctl", "daemon-reload"),
        Run("systemctl", "enable", "--quiet", "--", unit),
        Run("systemctl", "reset-failed", "--", unit, ok=None),  # clear a spent start limit
        Run("systemctl", "restart", "--", unit, timeout=120),
    ]
    return name, run


# The journal of one unit since its file was last written (the start of the release it names), and how its
# main process last ended: a failed release's own lines, not the previous release's.
UNIT_LOGS = r"""
import json, os, subprocess, sys
unit_path, unit, lines = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    since = ["--since", "@%.6f" % os.stat(unit_path).st_mtime]
except OSError:
    since = []
j = subprocess.run(["journalctl", "-u", unit, *since, "-n", lines, "--no-pager", "-o", "cat"],
                   capture_output=True, text=True, errors="replace")
s = subprocess.run(["systemctl", "show", "--property=ExecMainStatus,ExecMainCode", "--", unit],
                   capture_output=True, text=True)
props = dict(line.split("=", 1) for line in s.stdout.splitlines() if "=" in line)
print(json.dumps({"lines": j.stdout.splitlines(), "status": props.get("ExecMainStatus"),
                  "code": props.get("ExecMainCode")}))
"""


# --------------------------------------------------------------------------- the runtime


class SystemdRuntime(Runtime):
    method = "systemd"

    async def _probe(self, *qualified: str) -> list[dict[str, Any]]:
        done = await self.conn.run(
            ["python3", "-c", PROBE, UNIT_DIR, self.host.base_dir, self.instance, *qualified], check=False)
        if done.exit_status == 127:  # no python3 on this host: nothing of ours can run there
            return []
        if done.exit_status != 0:
            raise CommandError(self.host.name, "python3 (systemd probe)", done.exit_status, done.stderr)
        return json.loads(done.stdout)

    async def _facts(self, ctx: ReleaseContext) -> ReleaseFacts:
        done = await self.conn.run(["python3", "-c", RELEASE_FACTS, ctx.service_dir, ctx.release.id,
                                    ctx.spec.systemd.requirements])
        return ReleaseFacts.parse(done.stdout)

    async def observe(self) -> tuple[list[Instance], dict[str, list[str]]]:
        return parse_probe(await self._probe(), self.host.name, self.method)

    async def has_artifact(self, ctx: ReleaseContext) -> bool:
        facts = await self._facts(ctx)
        return facts.linked and facts.manifest and facts.release_dir

    async def build(self, ctx: ReleaseContext) -> BuildResult:
        facts = await self._facts(ctx)
        try:
            await execute(self.conn, build_steps(ctx, facts))
        except CommandError as e:
            raise StartError(f"venv of {ctx.qualified_name} release {ctx.release.id} failed on {self.host.name}",
                             _tail(e.stderr)) from e
        venv = venv_dir(ctx.service_dir, ctx.release.id)
        return BuildResult(venv, {"venv": venv, "venv_key": facts.key, "venv_reused": facts.built,
                                  "requirements": ctx.spec.systemd.requirements if facts.has_req else None,
                                  "offline_wheels": facts.has_wheels and facts.has_req})

    async def start(self, ctx: ReleaseContext) -> StartResult:
        unit = unit_name(ctx.qualified_name)
        user = service_user(ctx)
        facts = await self._facts(ctx)
        text = render_unit(ctx, user, command_argv(ctx, set(facts.bins)))
        name, run = start_steps(ctx, user, text)
        done = await execute(self.conn, name)
        await failpoint("Start Service")  # test-only: the host names the new release, the old code still runs
        try:
            await execute(self.conn, run)
        except CommandError as e:
            out = await self.logs(ctx)
            raise StartError(f"unit {unit} did not start on {self.host.name}{_ended(out)}",
                             out.lines or _tail(e.stderr)) from e
        return StartResult(unit, None, facts.current,
                           {"unit": unit, "user": user, "user_created": done[0].exit_status == 0,
                            "release_dir": ctx.release_dir, "previous_release": facts.current})

    async def state(self, ctx: ReleaseContext) -> RunState | None:
        units = await self._probe(ctx.qualified_name)
        if not units:
            return None
        u = units[0]
        state = run_state(u.get("props") or {})
        if state is None:
            return None
        release = ctx.release.id
        if u.get("current") != release or (u.get("meta") or {}).get("release") != release:
            return RunState.STOPPED
        return state

    async def logs(self, ctx: ReleaseContext, lines: int = 40) -> Output:
        unit = unit_name(ctx.qualified_name)
        done = await self.conn.run(["python3", "-c", UNIT_LOGS, posixpath.join(UNIT_DIR, unit), unit, str(lines)],
                                   check=False)
        try:
            d = json.loads(done.stdout)
        except ValueError:
            return Output([])
        status = d.get("status") or ""
        code = int(status) if status.isdigit() and d.get("code") == "exited" else None
        return Output([line for line in d.get("lines") or [] if line.strip()][-lines:], code)

    async def discard(self, ctx: ReleaseContext) -> None:
        units = await self._probe(ctx.qualified_name)
        if units and (units[0].get("meta") or {}).get("release") == ctx.release.id:
            unit = unit_name(ctx.qualified_name)
            await self.conn.run(["systemctl", "stop", "--", unit], check=False)
            await self.conn.run(["systemctl", "reset-failed", "--", unit], check=False)

    async def remove_service(self, service: str) -> Removed:
        q = self.qualified(service)
        unit = unit_name(q)
        layout = self.layout(service)
        listed = await self.conn.run(["ls", "-1", "--", layout.releases_dir], check=False)
        releases = sorted({release_id(e) for e in listed.stdout.split()})
        await self.conn.run(["systemctl", "disable", "--now", "--quiet", "--", unit], check=False)
        await self.conn.run(["rm", "-f", "--", posixpath.join(UNIT_DIR, unit)])
        await self.conn.run(["systemctl", "daemon-reload"])
        await self.conn.run(["systemctl", "reset-failed", "--", unit], check=False)
        await self.conn.run(["rm", "-rf", "--", layout.service_dir])
        # the user deployerd made for it (a user named in the manifest is the admin's, left alone)
        await self.conn.run(["userdel", "--", default_user(q)], check=False)
        return Removed(releases, {"unit": unit})

    async def retain(self, service: str, keep: list[str]) -> Removed:
        layout = self.layout(service)
        current = (await self.conn.run(["readlink", "--", layout.current], check=False)).stdout.strip()
        protect = set(keep) | {posixpath.basename(current)}  # never what serves, whatever keep says
        stale = sorted(r for r in await self.host_releases(service) if r not in protect)
        await self.remove_stale_temps([UNIT_DIR], unit_name(self.qualified(service)))
        await self.remove_release_files(service, stale)
        if stale:
            await self.conn.run(["python3", "-c", PRUNE_PYENVS, layout.service_dir], check=False)
        return Removed(stale)


def _ended(out: Output) -> str:
    return f" (its process exited with code {out.exit_code})" if out.exit_code else ""


__all__ = ["SystemdRuntime", "render_unit", "command_argv", "parse_probe", "run_state", "unit_quote",
           "systemd_env_file_text", "default_user", "unit_name", "build_steps", "start_steps", "ReleaseFacts"]
