"""Names on disk the connection makes: atomic-write temp files on hosts, forwarded-socket dirs locally."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import PurePosixPath

_SOCKET_DIR_PREFIX = "deployerd-ssh-"


def sweep_socket_dirs() -> list[str]:
    """Remove the forwarded-socket dirs (``deployerd-ssh-<pid>-*`` in the temp dir) of daemons that died
    without closing (SIGKILL); a live process's dirs stay. Blocking: run it in a thread. Returns what went."""
    base = tempfile.gettempdir()
    gone = []
    for name in os.listdir(base):
        pid = name.removeprefix(_SOCKET_DIR_PREFIX).split("-", 1)[0]
        path = os.path.join(base, name)
        if not name.startswith(_SOCKET_DIR_PREFIX) or not pid.isdigit():
            continue
        try:
            if os.lstat(path).st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
            continue  # alive (or a reused pid: then the dir stays, which is harmless)
        except ProcessLookupError:
            pass
        except OSError:  # another user's process, or the dir just went
            continue
        shutil.rmtree(path, ignore_errors=True)
        gone.append(path)
    return gone


_TEMP_INFIX = ".tmp-"


def temp_name_pattern(name: str = "*") -> str:
    """The glob of ``_temp_name``'s names for files named ``name``: what a write cut short leaves behind."""
    return f".{name}{_TEMP_INFIX}*"


def _temp_name(path: str) -> str:
    """A hidden, unique sibling of ``path``: same filesystem, so the final rename is atomic."""
    p = PurePosixPath(path)
    return str(p.with_name(f".{p.name}{_TEMP_INFIX}{secrets.token_hex(6)}"))
