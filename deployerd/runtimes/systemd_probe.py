"""What systemd runs on a host, read in one round trip: the probe (constant code, values only as argv) and the
pure mapping of its answer onto instances.

Two unit layouts are read, whichever made them:

- ``deployerd-<qualified name>.service``: one unit per service, binding the public port itself (``ingress:
  none``, and every host before ``ingress: haproxy`` covered systemd); it runs what ``current`` names;
- ``deployerd-<qualified name>@<release>.service``: one unit per release behind the host's ingress proxy, on
  the private port its ``X-Deployerd-Private-Port`` line records. Several exist per service (the one serving,
  the ones kept stopped for rollback, a new one started beside the old one): the running one is current, the
  enabled one (what the last switch made serve) when none runs, and the observation then asks the proxy which
  one it really sends requests to (``observe._serving``), as for Docker.
"""

from __future__ import annotations

import json
from typing import Any

from deployerd.observed import Instance, RunState

_PROPS = "Id,LoadState,ActiveState,SubState,Result,NRestarts,MainPID,UnitFileState"

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
    q, _, rel = fn[len(pre):-len(suf)].partition("@")
    if only and q not in only:
        continue
    meta = {}
    path = os.path.join(unit_dir, fn)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(meta_pre) and "=" in line:
                    k, v = line[len(meta_pre):].rstrip("\n").split("=", 1)
                    meta[k.lower()] = v
        mtime = os.stat(path).st_mtime
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
    units.append({"unit": fn, "qualified": q, "per_release": bool(rel), "meta": meta, "current": current,
                  "kept": kept, "mtime": mtime, "props": {}})
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


def unit_state(u: dict[str, Any]) -> RunState:
    """One probed unit's run state. A per-service unit runs what ``current`` names: one naming another release
    is not serving it."""
    state = run_state(u.get("props") or {}) or RunState.STOPPED
    if not u.get("per_release") and u.get("current") != (u.get("meta") or {}).get("release", "") \
            and state is RunState.RUNNING:
        state = RunState.STOPPED
    return state


def _current(units: list[dict[str, Any]]) -> set[str]:
    """The unit names that are current: every per-service unit; of a service's per-release units the running
    ones, else the enabled one (the last switched to), else the newest."""
    out = {u["unit"] for u in units if not u.get("per_release")}
    per: dict[str, list[dict[str, Any]]] = {}
    for u in units:
        if u.get("per_release"):
            per.setdefault(str((u.get("meta") or {}).get("service", "")), []).append(u)
    for group in per.values():
        running = [u for u in group if unit_state(u) is RunState.RUNNING]
        enabled = [u for u in group if (u.get("props") or {}).get("UnitFileState") == "enabled"]
        newest = sorted(group, key=lambda u: float(u.get("mtime") or 0), reverse=True)[:1]
        out |= {u["unit"] for u in (running or enabled[:1] or newest)}
    return out


def parse_probe(units: list[dict[str, Any]], host: str, method: str = "systemd"
                ) -> tuple[list[Instance], dict[str, list[str]]]:
    """The probe's JSON -> instances (one per unit) and kept releases (newest first)."""
    instances: list[Instance] = []
    kept: dict[str, list[str]] = {}
    current = _current(units)
    for u in units:
        meta = u.get("meta") or {}
        service = meta.get("service")
        if not service:
            continue
        try:
            inputs = json.loads(meta.get("inputs", "{}"))
        except ValueError:
            inputs = {}
        port, private = meta.get("port", ""), meta.get("private-port", "")
        instances.append(Instance(
            service=service, host=host, method=method, release=meta.get("release", ""),
            commit=meta.get("commit", ""), state=unit_state(u), ref=u.get("unit", ""),
            port=int(port) if port.isdigit() else None,
            private_port=int(private) if u.get("per_release") and private.isdigit() else None,
            managed_by=meta.get("managed-by", "git"), current=u.get("unit") in current,
            inputs=inputs if isinstance(inputs, dict) else {},
        ))
        releases = [r for r, _ in sorted(u.get("kept") or [], key=lambda k: k[1], reverse=True)]
        kept.setdefault(service, []).extend(r for r in releases if r not in kept[service])
    return instances, kept
