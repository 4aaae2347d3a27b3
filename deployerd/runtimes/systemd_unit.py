"""systemd unit text, pure: names, quoting, the command line and the unit file of one release.

Same input, same text (tested as data, and checked by ``systemd-analyze verify`` in the unit tests).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import shlex

from deployerd.runtimes.base import ReleaseContext, StartError

UNIT_DIR = "/etc/systemd/system"
META_PREFIX = "X-Deployerd-"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def unit_name(qualified: str, release: str | None = None) -> str:
    """The service's one unit (``ingress: none``), or one release's unit behind the host's ingress proxy."""
    return f"deployerd-{qualified}.service" if release is None else f"deployerd-{qualified}@{release}.service"


def ctx_unit(ctx: ReleaseContext) -> str:
    """The unit that runs ``ctx``'s release: its own behind an ingress proxy, else the service's one."""
    return unit_name(ctx.qualified_name, ctx.release.id if ctx.behind_ingress else None)


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


def command_argv(ctx: ReleaseContext, venv_bins: set[str], private_port: int | None = None) -> list[str]:
    """The manifest's command as argv: ``{port}`` and ``{host}`` substituted (the public port and 0.0.0.0, or
    behind an ingress proxy the release's private port and 127.0.0.1), the first word resolved against the
    venv's bin (then left to systemd's own search), a relative path taken from the release's dir."""
    try:
        argv = shlex.split(ctx.spec.systemd.command)
    except ValueError as e:
        raise StartError(f"systemd.command of {ctx.spec.name} cannot be split into words: {e}") from None
    if not argv:
        raise StartError(f"systemd.command of {ctx.spec.name} is empty")
    port, host = (ctx.spec.port, "0.0.0.0") if private_port is None else (private_port, "127.0.0.1")
    argv = [a.replace("{port}", str(port)).replace("{host}", host) for a in argv]
    exe = argv[0]
    if "/" not in exe:
        if exe in venv_bins:
            argv[0] = posixpath.join(venv_dir(ctx.service_dir, ctx.release.id), "bin", exe)
    elif not exe.startswith("/"):
        argv[0] = posixpath.normpath(posixpath.join(_workdir(ctx, private_port), exe))
    return argv


def _workdir(ctx: ReleaseContext, private_port: int | None) -> str:
    """The service's ``current`` link (its one unit), or behind an ingress proxy the release's own dir."""
    return posixpath.join(ctx.service_dir, "current") if private_port is None else ctx.release_dir


def render_unit(ctx: ReleaseContext, user: str, argv: list[str], private_port: int | None = None) -> str:
    """The unit file of ``ctx``'s release (pure: same input, same text). With ``private_port``: the release's
    own unit behind the host's ingress proxy, which records the port where observation reads it back."""
    venv_bin = posixpath.join(venv_dir(ctx.service_dir, ctx.release.id), "bin")
    meta = {
        "Service": ctx.spec.name,
        "Release": ctx.release.id,
        "Commit": ctx.commit,
        "Instance": ctx.instance,
        "Managed-By": ctx.managed_by,
        "Port": str(ctx.spec.port),
        "Inputs": json.dumps(ctx.release.inputs, sort_keys=True, separators=(",", ":")),
        **({"Private-Port": str(private_port)} if private_port is not None else {}),
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
        f"WorkingDirectory={_plain(_workdir(ctx, private_port))}",
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
