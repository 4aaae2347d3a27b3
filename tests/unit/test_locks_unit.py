"""Pure parts of host locks: the verdict on a lock found in place, the record format, the daemon id file."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deployerd.locks import (
    LockBusy,
    LockRecord,
    Verdict,
    judge,
    load_daemon_id,
    lock_path,
    parse,
)

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def record(holder: str = "dother", token: str = "t1", expires_in: float = 30) -> LockRecord:
    return LockRecord(holder=holder, hostname="m", pid=7, instance="default", service="web", job="j1",
                      token=token, acquired_at=NOW - timedelta(seconds=5),
                      expires_at=NOW + timedelta(seconds=expires_in))


@pytest.mark.parametrize(
    ("rec", "held", "verdict"),
    [
        (record(), set(), Verdict.WAIT),  # another daemon, live
        (record(expires_in=0), set(), Verdict.EXPIRED),  # expiry is inclusive
        (record(expires_in=-1), set(), Verdict.EXPIRED),
        (record(holder="dme"), set(), Verdict.OWN_STALE),  # ours, from an earlier life: at once, even if live
        (record(holder="dme", expires_in=-1), set(), Verdict.OWN_STALE),
        (record(holder="dme"), {"t1"}, Verdict.WAIT),  # ours and held by a running job of this process
        (record(holder="dme", expires_in=-1), {"t1"}, Verdict.EXPIRED),
        (record(holder="dother"), {"t1"}, Verdict.WAIT),  # a token we hold means nothing for another holder
        (None, set(), Verdict.UNREADABLE),
    ],
)
def test_judge(rec: LockRecord | None, held: set[str], verdict: Verdict) -> None:
    assert judge(rec, "dme", held, NOW) is verdict


def test_record_round_trip_and_garbage() -> None:
    rec = record()
    assert parse(rec.encode()) == rec
    for junk in (b"", b"{", b"[]", b"{}", b'{"holder": "x"}', b"\xff\xfe", b'{"holder": 1, "token": []}'):
        assert parse(junk) is None, junk


def test_busy_error_names_host_service_holder_and_expiry() -> None:
    err = LockBusy("sbx-1", "web", "/opt/x/.locks/web.lock", record(), 2.0)
    text = str(err)
    for part in ("sbx-1", "web", "dother", "pid 7", "job j1", "2026-01-01T12:00:30+00:00", "/opt/x/.locks/web.lock"):
        assert part in text
    assert err.transient


def test_lock_path_cannot_be_a_service_dir() -> None:
    # service dirs are <base_dir>/<DNS label>; a DNS label never starts with '.'
    assert lock_path("/opt/fpai/services", "t1-web") == "/opt/fpai/services/.locks/t1-web.lock"


def test_daemon_id_survives_restarts_and_is_private(tmp_path: Path) -> None:
    first = load_daemon_id(tmp_path / "state")
    assert load_daemon_id(tmp_path / "state") == first
    assert stat.S_IMODE((tmp_path / "state" / "daemon-id").stat().st_mode) == 0o600
    assert load_daemon_id(tmp_path / "other") != first
    (tmp_path / "state" / "daemon-id").write_text("not an id; rm -rf /\n")
    with pytest.raises(ValueError, match="daemon-id"):
        load_daemon_id(tmp_path / "state")


def test_daemon_id_made_once_under_concurrent_first_use(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(lambda _: load_daemon_id(tmp_path / "s"), range(32)))
    assert len(ids) == 1
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["daemon-id"]  # no temp file left
