"""systemd on a host: a Python app run by a generated unit, in a venv its dependencies key (shared).

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

import json
import posixpath
from typing import Any

from deployerd.connection import CommandError
from deployerd.failpoints import failpoint
from deployerd.layout import release_id
from deployerd.observed import Instance, RunState
from deployerd.runtimes.base import BuildResult, Output, ReleaseContext, Removed, Runtime, StartError, StartResult
from deployerd.runtimes.steps import execute
from deployerd.runtimes.systemd_steps import (
    COMPLETE_MARKER,
    PRUNE_PYENVS,
    RELEASE_FACTS,
    UNIT_LOGS,
    ReleaseFacts,
    build_steps,
    start_steps,
)
from deployerd.runtimes.systemd_unit import (
    UNIT_DIR,
    command_argv,
    default_user,
    render_unit,
    service_user,
    systemd_env_file_text,
    unit_name,
    unit_quote,
    venv_dir,
)

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
        units: list[dict[str, Any]] = json.loads(done.stdout)
        return units

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

    async def has_instances(self, service: str) -> bool:
        return bool(await self._probe(self.qualified(service)))

    async def remove_service(self, service: str) -> Removed:
        owned = await self.owned_dir(service)  # refuses before anything is removed
        q = self.qualified(service)
        unit = unit_name(q)
        layout = self.layout(service)
        listed = await self.conn.run(["ls", "-1", "--", layout.releases_dir], check=False)
        releases = sorted({release_id(e) for e in listed.stdout.split()})
        await self.conn.run(["systemctl", "disable", "--now", "--quiet", "--", unit], check=False)
        await self.conn.run(["rm", "-f", "--", posixpath.join(UNIT_DIR, unit)])
        await self.conn.run(["systemctl", "daemon-reload"])
        await self.conn.run(["systemctl", "reset-failed", "--", unit], check=False)
        if owned:
            await self.conn.run(["rm", "-rf", "--", layout.service_dir])
        # the user deployerd made for it (a user named in the manifest is the admin's, left alone)
        await self.conn.run(["userdel", "--", default_user(q)], check=False)
        return Removed(releases, {"unit": unit})

    async def retain(self, service: str, keep: list[str]) -> Removed:
        if not await self.owned_dir(service):
            return Removed([])
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


__all__ = ["COMPLETE_MARKER", "ReleaseFacts", "SystemdRuntime", "build_steps", "command_argv", "default_user",
           "parse_probe", "render_unit", "run_state", "start_steps", "systemd_env_file_text", "unit_name",
           "unit_quote", "venv_dir"]
