"""systemd notification of the daemon (Type=notify): READY and WATCHDOG reach the notify socket."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_sd_notify_sends_to_the_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from deployerd.daemon import sd_notify

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sd_notify("READY=1") is True
        assert listener.recv(64) == b"READY=1"
