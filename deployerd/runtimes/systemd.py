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

With ``ingress: none``, one unit per service, ``/etc/systemd/system/deployerd-<qualified name>.service``,
switched stop-first: a rollback is a ``start`` of the previous release (its venv and source are still on the
host, so only the unit, ``current`` and a restart change). Behind the host's ingress proxy, one unit per
release, ``deployerd-<qualified name>@<release>.service``, on a private port of 127.0.0.1 that deployerd
allocates and the unit records: it starts beside the serving one, and ``switch.switch_to`` moves the proxy to
it, then stops the old one (``stop_others``), kept for rollback. Full unit files rather than a template with
per-release drop-ins: each release differs in its command, venv, env file, port and metadata anyway, and one
self-contained file per release is read back, verified and removed as one. The ``X-Deployerd-*`` lines
(ignored by systemd) carry what Docker keeps in labels: service, release, commit, instance, managed_by, port,
inputs and the private port; observe reads them back (``systemd_probe``).

The build and start steps are data (``build_steps``, ``start_steps``), executed by ``steps.execute``: Start
Service is three round trips (the release's facts, naming it, running it), Build two.

Facts are read by one constant helper (``systemd_probe.PROBE``, no value ever spliced into code or a shell
string): every deployerd unit of this instance, its metadata, its systemd state, ``current`` and the complete
releases, in one round trip per host.
"""

from __future__ import annotations

import asyncio
import json
import posixpath
from collections.abc import AsyncIterator
from typing import Any

from deployerd.connection import CommandError
from deployerd.failpoints import failpoint
from deployerd.ingress import allocate_port
from deployerd.layout import release_id
from deployerd.observed import Instance, RunState
from deployerd.runtimes.base import (
    BuildResult,
    Drift,
    Output,
    ReleaseContext,
    Removed,
    Runtime,
    StartError,
    StartResult,
)
from deployerd.runtimes.steps import Run, execute
from deployerd.runtimes.systemd_probe import PROBE, parse_probe, run_state, unit_state
from deployerd.runtimes.systemd_steps import (
    COMPLETE_MARKER,
    PRUNE_PYENVS,
    RELEASE_FACTS,
    UNIT_LOGS,
    ReleaseFacts,
    build_steps,
    start_steps,
    switched_steps,
)
from deployerd.runtimes.systemd_unit import (
    UNIT_DIR,
    command_argv,
    ctx_unit,
    default_user,
    render_unit,
    service_user,
    systemd_env_file_text,
    unit_name,
    unit_quote,
    venv_dir,
)
from deployerd.runtimes.systemd_watch import unit_changes


def _tail(text: str, lines: int = 40) -> list[str]:
    return [line for line in text.splitlines() if line.strip()][-lines:]


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
        """Stop-first (no ingress): the service's one unit names and runs the new release. Behind an ingress:
        the release's own unit starts beside the serving one, on a private port (``switch`` moves the proxy)."""
        user = service_user(ctx)
        facts, left = await asyncio.gather(self._facts(ctx), self._leave_ingress(ctx))
        private = await self._private_port(ctx) if ctx.behind_ingress else None
        unit = ctx_unit(ctx)
        text = render_unit(ctx, user, command_argv(ctx, set(facts.bins), private), private)
        name, run = start_steps(ctx, user, text, private)
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
                            "release_dir": ctx.release_dir, "previous_release": facts.current, **left}, private)

    async def _leave_ingress(self, ctx: ReleaseContext) -> dict[str, Any]:
        """Stop-first on a host that had the proxy: its route goes (the port is free) and the service's
        per-release units from then stop, kept, so only the service's one unit runs it (see ``leave_ingress``).
        Nothing behind the proxy."""
        if ctx.behind_ingress:
            return {}
        left, units = await asyncio.gather(self.leave_ingress(ctx.qualified_name), self._probe(ctx.qualified_name))
        others = _live([u for u in units if u.get("per_release")])
        if others:
            await execute(self.conn, [Run("systemctl", "disable", "--now", "--quiet", "--", *others, timeout=60)])
        return {**({"left_proxy": left} if left else {}), **({"stopped": others} if others else {})}

    async def _private_port(self, ctx: ReleaseContext) -> int:
        """The port the release's unit recorded when it still runs or nothing else took it; else a free one:
        recorded by none of this daemon's units on the host and not listening there (a Docker container's, a
        process deployerd does not know)."""
        units, used = await asyncio.gather(self._probe(), self.listening_ports())
        mine = unit_name(ctx.qualified_name, ctx.release.id)
        for u in units:
            recorded = (u.get("meta") or {}).get("private-port", "")
            if u.get("unit") == mine and recorded.isdigit() and (
                    unit_state(u) is RunState.RUNNING or int(recorded) not in used):
                return int(recorded)
        used |= {int(p) for u in units if (p := (u.get("meta") or {}).get("private-port", "")).isdigit()}
        return allocate_port(used, ctx.qualified_name)

    async def _unit_of(self, ctx: ReleaseContext) -> dict[str, Any] | None:
        """The probed unit that runs ``ctx``'s release (None: no such unit, or it names another release)."""
        unit = ctx_unit(ctx)
        found = next((u for u in await self._probe(ctx.qualified_name) if u.get("unit") == unit), None)
        if found is None or (found.get("meta") or {}).get("release") != ctx.release.id:
            return None
        return found

    async def state(self, ctx: ReleaseContext) -> RunState | None:
        unit = ctx_unit(ctx)
        u = next((u for u in await self._probe(ctx.qualified_name) if u.get("unit") == unit), None)
        if u is None or run_state(u.get("props") or {}) is None:
            return None
        if (u.get("meta") or {}).get("release") != ctx.release.id:
            return RunState.STOPPED  # the service's one unit names another release now
        return unit_state(u)

    async def logs(self, ctx: ReleaseContext, lines: int = 40) -> Output:
        unit = ctx_unit(ctx)
        done = await self.conn.run(["python3", "-c", UNIT_LOGS, posixpath.join(UNIT_DIR, unit), unit, str(lines)],
                                   check=False)
        try:
            d = json.loads(done.stdout)
        except ValueError:
            return Output([])
        status = d.get("status") or ""
        code = int(status) if status.isdigit() and d.get("code") == "exited" else None
        return Output([line for line in d.get("lines") or [] if line.strip()][-lines:], code)

    async def stop_others(self, ctx: ReleaseContext) -> list[str]:
        """After the switch: the new release's unit starts at boot and ``current`` names it; the service's other
        running units stop (kept for rollback), and the per-service unit from before the proxy goes (its
        release comes back in a unit of its own when rolled back to). Returns the units stopped."""
        mine, legacy = ctx_unit(ctx), unit_name(ctx.qualified_name)
        units = await self._probe(ctx.qualified_name)
        others = [u for u in units if u["unit"] != mine]
        running = [u["unit"] for u in others if unit_state(u) is RunState.RUNNING]
        await execute(self.conn, switched_steps(ctx, _live(others),
                                                remove=any(u["unit"] == legacy for u in units)))
        return running

    async def stop_unproxied(self, ctx: ReleaseContext) -> list[str]:
        """Before the proxy first binds the public port: the service's one unit from before the proxy (or from
        ``ingress: none``) holds it, and stops (its file stays until the switch is done)."""
        legacy = unit_name(ctx.qualified_name)
        units = [u for u in await self._probe(ctx.qualified_name)
                 if u.get("unit") == legacy and unit_state(u) is RunState.RUNNING]
        if not units:
            return []
        await execute(self.conn, [Run("systemctl", "disable", "--now", "--quiet", "--", legacy, timeout=60)])
        return [legacy]

    async def watch(self) -> AsyncIterator[Drift]:
        """Unit state changes of this instance's units (``deployerd-<name>.service`` and, behind an ingress,
        ``deployerd-<name>@<release>.service``), from systemd's own signals (see ``systemd_watch``)."""
        prefix = unit_name(self.qualified(""))[: -len(".service")]  # "deployerd-" or "deployerd-<instance>-"
        async for unit in unit_changes(self.conn, prefix):
            if unit is None:
                yield Drift(None, f"systemd on {self.host.name}: watching unit state changes")
                continue
            service, _, release = unit[len(prefix):-len(".service")].partition("@")
            if service:
                yield Drift(service, f"systemd: unit {unit} changed state", release=release)

    async def start_unproxied(self, ctx: ReleaseContext, stopped: list[str]) -> None:
        if stopped:
            await execute(self.conn, [Run("systemctl", "enable", "--now", "--quiet", "--", *stopped, timeout=120)])

    async def discard(self, ctx: ReleaseContext) -> None:
        if await self._unit_of(ctx) is None:
            return
        unit = ctx_unit(ctx)
        steps = [Run("systemctl", "stop", "--", unit, ok=None, timeout=60), Run("systemctl", "reset-failed", "--",
                                                                                 unit, ok=None)]
        if ctx.behind_ingress:  # a failed release's own unit goes, as a failed container does
            steps += [Run("systemctl", "disable", "--quiet", "--", unit, ok=None),
                      Run("rm", "-f", "--", posixpath.join(UNIT_DIR, unit)), Run("systemctl", "daemon-reload")]
        await execute(self.conn, steps)

    async def has_instances(self, service: str) -> bool:
        return bool(await self._probe(self.qualified(service)))

    async def _remove_units(self, units: list[str]) -> None:
        """Stop, disable and delete these unit files of ours (found by the probe: this instance's metadata)."""
        if not units:
            return
        await execute(self.conn, [Run("systemctl", "disable", "--now", "--quiet", "--", *units, ok=None,
                                      timeout=120),
                                  Run("rm", "-f", "--", *(posixpath.join(UNIT_DIR, u) for u in units)),
                                  Run("systemctl", "daemon-reload"),
                                  Run("systemctl", "reset-failed", "--", *units, ok=None)])

    async def remove_service(self, service: str) -> Removed:
        owned = await self.owned_dir(service)  # refuses before anything is removed
        q = self.qualified(service)
        layout = self.layout(service)
        await self.leave_ingress(q)  # the proxy stops taking its public port first
        listed = await self.conn.run(["ls", "-1", "--", layout.releases_dir], check=False)
        releases = sorted({release_id(e) for e in listed.stdout.split()})
        units = sorted({u["unit"] for u in await self._probe(q)} | {unit_name(q)})
        await self._remove_units(units)
        if owned:
            await self.conn.run(["rm", "-rf", "--", layout.service_dir])
        # the user deployerd made for it (a user named in the manifest is the admin's, left alone)
        await self.conn.run(["userdel", "--", default_user(q)], check=False)
        return Removed(releases, {"unit": unit_name(q), "units": units})

    async def retain(self, service: str, keep: list[str]) -> Removed:
        if not await self.owned_dir(service):
            return Removed([])
        layout = self.layout(service)
        q = self.qualified(service)
        units = await self._probe(q)
        current = (await self.conn.run(["readlink", "--", layout.current], check=False)).stdout.strip()
        running = {(u.get("meta") or {}).get("release", "") for u in units if unit_state(u) is RunState.RUNNING}
        protect = set(keep) | {posixpath.basename(current)} | running  # never what serves, whatever keep says
        stale = sorted(r for r in await self.host_releases(service) if r not in protect)
        gone = [u["unit"] for u in units
                if u.get("per_release") and (u.get("meta") or {}).get("release") not in protect]
        await self._remove_units(gone)
        await self.remove_stale_temps([UNIT_DIR], unit_name(q, None if self.host.ingress == "none" else "*"))
        await self.remove_release_files(service, stale)
        if stale:
            await self.conn.run(["python3", "-c", PRUNE_PYENVS, layout.service_dir], check=False)
        return Removed(stale, {"units_removed": gone} if gone else {})


def _live(units: list[dict[str, Any]]) -> list[str]:
    """The probed units that run or start at boot: what stops (kept) when another unit takes over."""
    return sorted(u["unit"] for u in units if unit_state(u) is RunState.RUNNING
                  or (u.get("props") or {}).get("UnitFileState") == "enabled")


def _ended(out: Output) -> str:
    return f" (its process exited with code {out.exit_code})" if out.exit_code else ""


__all__ = ["COMPLETE_MARKER", "PROBE", "ReleaseFacts", "SystemdRuntime", "build_steps", "command_argv",
           "default_user", "parse_probe", "render_unit", "run_state", "start_steps", "systemd_env_file_text",
           "unit_name", "unit_quote", "venv_dir"]
