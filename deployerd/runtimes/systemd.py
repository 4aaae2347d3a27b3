"""systemd on a host: a Python app run by a generated unit, one virtual environment per release.

Layout under the service dir (``<base_dir>/<qualified name>``)::

    releases/<release>/          the transferred source (root-owned, world-readable)
    releases/<release>.manifest.json
    venvs/<release>/             the release's venv; ``.deployerd-complete`` in it is written last
    env/<release>.env            EnvironmentFile (0600 in a 0700 dir; read by PID 1, never by the service)
    current -> releases/<id>     the unit's WorkingDirectory, switched atomically (``current.new`` + ``mv -T``)
    data/                        the only path the service may write (ReadWritePaths=)

One unit per service, ``/etc/systemd/system/deployerd-<qualified name>.service``. Its ``X-Deployerd-*``
lines (ignored by systemd) carry what Docker keeps in labels: service, release, commit, instance,
managed_by, port and inputs; observe reads them back. A rollback is a ``start`` of the previous release:
its venv and source are still on the host, so only the unit, ``current`` and a restart change.

Facts are read by one constant helper (``python3 -c PROBE args``, no value ever spliced into code or a
shell string): every deployerd unit of this instance, its metadata, its systemd state, ``current`` and
the complete releases, in one round trip per host.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import shlex
from typing import Any

from deployerd.connection import CommandError
from deployerd.failpoints import failpoint
from deployerd.observed import Instance, RunState
from deployerd.runtimes.base import ReleaseContext, Runtime, StartError

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

    async def observe(self) -> tuple[list[Instance], dict[str, list[str]]]:
        return parse_probe(await self._probe(), self.host.name, self.method)

    async def has_artifact(self, ctx: ReleaseContext) -> bool:
        marker = posixpath.join(venv_dir(ctx.service_dir, ctx.release.id), COMPLETE_MARKER)
        manifest = posixpath.join(ctx.service_dir, "releases", f"{ctx.release.id}.manifest.json")
        done = await self.conn.run(["test", "-f", marker, "-a", "-f", manifest, "-a", "-d", ctx.release_dir],
                                   check=False)
        return done.exit_status == 0

    async def build(self, ctx: ReleaseContext) -> dict[str, Any]:
        venv = venv_dir(ctx.service_dir, ctx.release.id)
        requirements = posixpath.join(ctx.release_dir, ctx.spec.systemd.requirements)
        wheels = posixpath.join(ctx.release_dir, "wheels")
        has_req = (await self.conn.run(["test", "-f", requirements], check=False)).ok
        has_wheels = (await self.conn.run(["test", "-d", wheels], check=False)).ok
        # A build cut short by a daemon crash goes on running on the host (no pty: no SIGHUP when the SSH
        # connection dies). Every step that writes the venv holds the service's build lock, so the next
        # build waits for that orphan to end before it deletes and rewrites the same directory.
        locked = ["flock", "--wait", "900", "--", posixpath.join(ctx.service_dir, ".build.lock")]
        await self.conn.run(["install", "-d", "-m", "0755", "--", posixpath.dirname(venv)])
        await self.conn.run([*locked, "rm", "-rf", "--", venv], timeout=16 * 60)
        try:
            # pip only when there is something to install: ensurepip is most of a venv's build time
            await self.conn.run([*locked, "python3", "-m", "venv", *([] if has_req else ["--without-pip"]), "--",
                                 venv], timeout=5 * 60)
            if has_req:
                argv = [posixpath.join(venv, "bin", "python"), "-m", "pip", "install", "--disable-pip-version-check",
                        "--no-input", "--progress-bar", "off"]
                if has_wheels:
                    argv += ["--no-index", "--find-links", wheels]
                await self.conn.run([*locked, *argv, "-r", requirements], timeout=15 * 60)
        except CommandError as e:
            raise StartError(f"venv of {ctx.qualified_name} release {ctx.release.id} failed on {self.host.name}",
                             _tail(e.stderr)) from e
        # readable by the service user whatever umask wrote them; nothing writable but by root
        await self.conn.run(["chmod", "-R", "u+rwX,go+rX,go-w", "--", ctx.release_dir, venv])
        await self.conn.run(["chmod", "0755", "--", ctx.service_dir, posixpath.join(ctx.service_dir, "releases")])
        await self.conn.put_bytes(posixpath.join(venv, COMPLETE_MARKER),
                                  json.dumps({"release": ctx.release.id, "commit": ctx.commit}).encode(), mode=0o644)
        return {"venv": venv, "requirements": ctx.spec.systemd.requirements if has_req else None,
                "offline_wheels": has_wheels and has_req}

    async def _ensure_user(self, user: str) -> bool:
        """Create the service's system user if missing; True when it was created now."""
        done = await self.conn.run(["useradd", "--system", "--no-create-home", "--user-group",
                                    "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", "--", user],
                                   check=False)
        if done.exit_status == 9:  # already exists
            return False
        if done.exit_status != 0:
            raise StartError(f"useradd {user} failed on {self.host.name}", _tail(done.stderr))
        return True

    async def start(self, ctx: ReleaseContext) -> dict[str, Any]:
        unit = unit_name(ctx.qualified_name)
        user = service_user(ctx)
        venv = venv_dir(ctx.service_dir, ctx.release.id)
        created = await self._ensure_user(user)
        await self.conn.run(["install", "-d", "-m", "0700", "--", posixpath.dirname(ctx.env_file)])
        await self.conn.put_bytes(ctx.env_file, systemd_env_file_text(ctx.env), mode=0o600)
        data = posixpath.join(ctx.service_dir, "data")
        await self.conn.run(["install", "-d", "-m", "0750", "--", data])
        await self.conn.run(["chown", "--", f"{user}:", data])  # the user and its login group
        bins = (await self.conn.run(["ls", "-1", "--", posixpath.join(venv, "bin")], check=False)).stdout.split()
        text = render_unit(ctx, user, command_argv(ctx, set(bins)))
        previous = (await self.conn.run(["readlink", "--", posixpath.join(ctx.service_dir, "current")],
                                        check=False)).stdout.strip()
        await self.conn.put_bytes(posixpath.join(UNIT_DIR, unit), text.encode(), mode=0o644)
        new_link = posixpath.join(ctx.service_dir, "current.new")
        await self.conn.run(["ln", "-sfnT", "--", posixpath.join("releases", ctx.release.id), new_link])
        await self.conn.run(["mv", "-T", "--", new_link, posixpath.join(ctx.service_dir, "current")])
        await failpoint("Start Service")  # test-only: the host names the new release, the old code still runs
        await self.conn.run(["systemctl", "daemon-reload"])
        await self.conn.run(["systemctl", "enable", "--quiet", "--", unit])
        await self.conn.run(["systemctl", "reset-failed", "--", unit], check=False)  # clear a spent start limit
        try:
            await self.conn.run(["systemctl", "restart", "--", unit], timeout=120)
        except CommandError as e:
            raise StartError(f"unit {unit} did not start on {self.host.name}",
                             await self._journal(unit) or _tail(e.stderr)) from e
        return {"unit": unit, "user": user, "user_created": created, "release_dir": ctx.release_dir,
                "previous_release": posixpath.basename(previous) or None, "reused_container": None}

    async def state(self, service: str, release: str) -> RunState | None:
        units = await self._probe(self.qualified(service))
        if not units:
            return None
        u = units[0]
        state = run_state(u.get("props") or {})
        if state is None:
            return None
        if u.get("current") != release or (u.get("meta") or {}).get("release") != release:
            return RunState.STOPPED
        return state

    async def _journal(self, unit: str, lines: int = 40) -> list[str]:
        done = await self.conn.run(["journalctl", "-u", unit, "-n", str(lines), "--no-pager", "-o", "cat"],
                                   check=False)
        return [line for line in done.stdout.splitlines() if line.strip()][-lines:]

    async def logs(self, service: str, release: str, lines: int = 40) -> list[str]:
        return await self._journal(unit_name(self.qualified(service)), lines)

    async def discard(self, service: str, release: str) -> None:
        units = await self._probe(self.qualified(service))
        if units and (units[0].get("meta") or {}).get("release") == release:
            unit = unit_name(self.qualified(service))
            await self.conn.run(["systemctl", "stop", "--", unit], check=False)
            await self.conn.run(["systemctl", "reset-failed", "--", unit], check=False)

    async def remove_service(self, service: str) -> dict[str, Any]:
        q = self.qualified(service)
        unit = unit_name(q)
        sdir = self.service_dir(service)
        listed = await self.conn.run(["ls", "-1", "--", posixpath.join(sdir, "releases")], check=False)
        releases = sorted({e.removesuffix(".manifest.json").removesuffix(".partial") for e in listed.stdout.split()})
        await self.conn.run(["systemctl", "disable", "--now", "--quiet", "--", unit], check=False)
        await self.conn.run(["rm", "-f", "--", posixpath.join(UNIT_DIR, unit)])
        await self.conn.run(["systemctl", "daemon-reload"])
        await self.conn.run(["systemctl", "reset-failed", "--", unit], check=False)
        await self.conn.run(["rm", "-rf", "--", sdir])
        # the user deployerd made for it (a user named in the manifest is the admin's, left alone)
        await self.conn.run(["userdel", "--", default_user(q)], check=False)
        return {"unit": unit, "removed_releases": releases}

    async def retain(self, service: str, keep: list[str]) -> dict[str, Any]:
        sdir = self.service_dir(service)
        current = (await self.conn.run(["readlink", "--", posixpath.join(sdir, "current")], check=False)).stdout.strip()
        protect = set(keep) | {posixpath.basename(current)}  # never what serves, whatever keep says
        stale = sorted(r for r in await self.host_releases(service) if r not in protect)
        await self.remove_stale_temps([UNIT_DIR], unit_name(self.qualified(service)))
        await self.remove_release_files(service, stale)
        return {"removed_releases": stale}


__all__ = ["SystemdRuntime", "render_unit", "command_argv", "parse_probe", "run_state", "unit_quote",
           "systemd_env_file_text", "default_user", "unit_name"]
