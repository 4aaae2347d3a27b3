"""systemd Build and Start Service as data: the release's facts (one helper run on the host), and the
steps that build its venv and name and run its unit, executed by ``steps.execute`` in one round trip each.

A venv is keyed by the digest of what it depends on (the requirements file and wheels as the release
manifest lists them, and the host's Python) and shared by the releases that share them, so an env- or
command-only change builds nothing (``layout``: ``venvs/<release> -> ../pyenvs/<key>``).
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

from deployerd.runtimes.base import ReleaseContext
from deployerd.runtimes.steps import Run, Step, Write
from deployerd.runtimes.systemd_unit import UNIT_DIR, systemd_env_file_text, unit_name

COMPLETE_MARKER = ".deployerd-complete"

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


def start_steps(ctx: ReleaseContext, user: str, unit_text: str, private_port: int | None = None
                ) -> tuple[list[Step], list[Step]]:
    """Start Service as two lists: what makes the host name the new release (user, env file, data dir, unit,
    ``current``), then what makes systemd run it. The caller runs them in two round trips (a crash test
    stops the daemon between them).

    With ``private_port`` (behind the host's ingress proxy) the release gets its own unit, started beside the
    one that serves; ``current`` and the boot-time enablement move to it only once the proxy switched to it
    (``switched_steps``). A unit of the release that already runs is left running (``start``, not
    ``restart``): after an interrupted switch it may be the one the proxy sends requests to."""
    layout = ctx.layout
    unit = unit_name(ctx.qualified_name, None if private_port is None else ctx.release.id)
    name: list[Step] = [
        Run("useradd", "--system", "--no-create-home", "--user-group", "--home-dir", "/nonexistent",
            "--shell", "/usr/sbin/nologin", "--", user, ok=(0, 9)),  # 9: it exists
        Run("install", "-d", "-m", "0700", "--", layout.env_dir),
        Write(ctx.env_file, systemd_env_file_text(ctx.env), 0o600),
        Run("install", "-d", "-m", "0750", "--", layout.data_dir),
        Run("chown", "--", f"{user}:", layout.data_dir),  # the user and its login group
        Write(posixpath.join(UNIT_DIR, unit), unit_text.encode()),
    ]
    reset = Run("systemctl", "reset-failed", "--", unit, ok=None)  # clear a spent start limit
    if private_port is not None:
        return name, [Run("systemctl", "daemon-reload"), reset, Run("systemctl", "start", "--", unit, timeout=120)]
    run: list[Step] = [
        Run("systemctl", "daemon-reload"),
        Run("systemctl", "enable", "--quiet", "--", unit),
        reset,
        Run("systemctl", "restart", "--", unit, timeout=120),
    ]
    return name + _link(posixpath.join("releases", ctx.release.id), layout.current), run


def switched_steps(ctx: ReleaseContext, others: list[str], remove: bool = False) -> list[Step]:
    """Behind the proxy, once it serves ``ctx``'s release and the old one drained: the release's unit is the
    one that starts at boot and ``current`` names it; every other unit of the service (``others``: the
    previous releases' and the per-service unit of a host from before the proxy) stops, kept for rollback;
    ``remove``: that per-service unit's file goes."""
    steps: list[Step] = [Run("systemctl", "enable", "--quiet", "--", unit_name(ctx.qualified_name, ctx.release.id)),
                         *_link(posixpath.join("releases", ctx.release.id), ctx.layout.current)]
    if others:
        steps.append(Run("systemctl", "disable", "--now", "--quiet", "--", *others, timeout=60))
    if remove:
        legacy = unit_name(ctx.qualified_name)
        steps += [Run("systemctl", "disable", "--quiet", "--", legacy, ok=None),
                  Run("rm", "-f", "--", posixpath.join(UNIT_DIR, legacy)), Run("systemctl", "daemon-reload"),
                  Run("systemctl", "reset-failed", "--", legacy, ok=None)]
    return steps


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
