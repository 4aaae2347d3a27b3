"""The sandbox's local process checks: a daemon it starts is judged by its own handle, a pid file by /proc."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deployerd import sandbox_engine
from deployerd.sandbox_image._proc import pid_alive, spawn_detached


def test_a_process_with_an_empty_command_line_is_found_by_its_name() -> None:
    # A process that has just exec'd can read back an empty cmdline; kernel threads always do. CI once failed
    # because the engine's start loop took a fresh dockerd for dead on that empty read.
    comm = Path("/proc/2/comm")
    if not comm.exists() or comm.read_text().strip() != "kthreadd" or Path("/proc/2/cmdline").read_bytes():
        pytest.skip("no kthreadd with an empty command line at pid 2 in this pid namespace")
    assert pid_alive(2, "kthreadd")
    assert not pid_alive(2, "dockerd")


def test_pid_alive_tells_our_process_from_another_and_from_none() -> None:
    assert pid_alive(os.getpid(), "python")
    assert not pid_alive(os.getpid(), "dockerd")
    assert not pid_alive(None, "python")


def test_a_detached_daemon_is_judged_by_its_handle(tmp_path: Path) -> None:
    log = tmp_path / "d.log"
    quitter = spawn_detached([sys.executable, "-c", "import sys; print('bye'); sys.exit(3)"], log)
    assert quitter.wait(timeout=30) == 3
    assert "bye" in log.read_text()
    sleeper = spawn_detached(["sleep", "30"], log)
    try:
        assert sleeper.poll() is None
        assert os.getsid(sleeper.pid) == sleeper.pid  # its own session: it outlives the `up` that started it
    finally:
        sleeper.kill()
        sleeper.wait(timeout=30)


def test_a_stale_engine_pid_file_is_removed_a_live_one_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "exec" / "containerd").mkdir(parents=True)
    pidfile = run_dir / "docker.pid"
    containerd_pidfile = run_dir / "exec" / "containerd" / "containerd.pid"
    monkeypatch.setattr(sandbox_engine, "ENGINE_RUN_DIR", run_dir)
    monkeypatch.setattr(sandbox_engine, "ENGINE_PIDFILE", pidfile)
    # A pid another process now holds (ours: python, not dockerd), as after a killed engine's pid was reused.
    pidfile.write_text(f"{os.getpid()}\n")
    # A live containerd of ours: a process whose command line names containerd.
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "containerd"])
    try:
        # a fresh exec may read back an empty cmdline for a moment (the race this module guards against)
        for _ in range(500):
            if b"containerd" in Path(f"/proc/{live.pid}/cmdline").read_bytes():
                break
            time.sleep(0.01)
        containerd_pidfile.write_text(f"{live.pid}\n")
        sandbox_engine._remove_stale_pidfiles()
        assert not pidfile.exists()
        assert containerd_pidfile.exists()
    finally:
        live.kill()
        live.wait(timeout=30)
