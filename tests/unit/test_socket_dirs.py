"""sweep_socket_dirs: a killed daemon's forwarded-socket dirs go at the next start; a live one's stay."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from deployerd.connection import sweep_socket_dirs


def test_dead_daemons_dirs_go_live_ones_stay() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: its pid names no process now
    base = Path(tempfile.gettempdir())
    gone = Path(tempfile.mkdtemp(prefix=f"deployerd-ssh-{dead.pid}-"))
    (gone / "docker.sock").write_text("")
    live = Path(tempfile.mkdtemp(prefix=f"deployerd-ssh-{os.getpid()}-"))
    other = Path(tempfile.mkdtemp(prefix="deployerd-ssh-notapid-"))
    try:
        removed = sweep_socket_dirs()
        assert str(gone) in removed and not gone.exists()
        assert live.exists() and other.exists()
        assert str(live) not in removed and str(other) not in removed
        assert all(Path(p).parent == base for p in removed)
    finally:
        for d in (live, other):
            d.rmdir()
