"""GitSource against real git repositories in temp dirs; triggers (watch, poll, Kick)."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import threading
import traceback
from pathlib import Path

import git
import pytest
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from deployerd.source import GitSource, Kick, SourceError, is_ref_change, redact, start_polling

_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.invalid",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}


def run_git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", "-C", str(repo), *args], env=_ENV, check=True, capture_output=True, text=True)
    return out.stdout.strip()


def commit_file(repo: Path, name: str, text: str, message: str = "change") -> str:
    path = repo / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    run_git(repo, "add", "--", name)
    run_git(repo, "commit", "-q", "-m", message)
    return run_git(repo, "rev-parse", "HEAD")


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    repo = tmp_path / "origin"
    repo.mkdir()
    run_git(repo, "init", "-q", "-b", "main")
    commit_file(repo, "services/web.yaml", "name: web\n", "first")
    return repo


async def test_first_fetch_clones_and_pins_tip(origin: Path, tmp_path: Path) -> None:
    src = GitSource(str(origin), "main", tmp_path / "work")
    assert src.revision is None and src.last_fetch_at is None
    sha = await src.fetch()
    assert sha == run_git(origin, "rev-parse", "HEAD")
    assert src.revision == sha and src.last_fetch_at is not None and src.last_error is None
    mirror = git.Repo(src.repo_path)
    assert mirror.commit(sha).tree["services/web.yaml"].data_stream.read() == b"name: web\n"


async def test_fetch_sees_new_commit(origin: Path, tmp_path: Path) -> None:
    src = GitSource(str(origin), "main", tmp_path / "work")
    first = await src.fetch()
    second = commit_file(origin, "services/api.yaml", "name: api\n")
    assert second != first
    assert await src.fetch() == second
    assert git.Repo(src.repo_path).commit(first).hexsha == first  # the old commit stays readable


async def test_fetch_follows_force_push(origin: Path, tmp_path: Path) -> None:
    src = GitSource(str(origin), "main", tmp_path / "work")
    await src.fetch()
    commit_file(origin, "a.yaml", "a\n")
    before = await src.fetch()
    run_git(origin, "reset", "-q", "--hard", "HEAD~1")
    rewritten = commit_file(origin, "b.yaml", "b\n")
    assert await src.fetch() == rewritten
    assert git.Repo(src.repo_path).commit(before).hexsha == before


async def test_branch_selection(origin: Path, tmp_path: Path) -> None:
    main_sha = run_git(origin, "rev-parse", "HEAD")
    run_git(origin, "checkout", "-q", "-b", "staging")
    staging_sha = commit_file(origin, "services/web.yaml", "name: web\nimage: v2\n")
    run_git(origin, "checkout", "-q", "main")
    assert await GitSource(str(origin), "staging", tmp_path / "s").fetch() == staging_sha
    assert await GitSource(str(origin), "main", tmp_path / "m").fetch() == main_sha


async def test_missing_branch_is_a_clear_terminal_error(origin: Path, tmp_path: Path) -> None:
    src = GitSource(str(origin), "nope", tmp_path / "work")
    with pytest.raises(SourceError) as info:
        await src.fetch()
    assert info.value.transient is False
    assert "branch 'nope' not found" in str(info.value)
    assert src.last_error == str(info.value) and src.revision is None


async def test_missing_repository_names_the_url(tmp_path: Path) -> None:
    url = str(tmp_path / "does-not-exist")
    src = GitSource(url, "main", tmp_path / "work")
    with pytest.raises(SourceError) as info:
        await src.fetch()
    assert url in str(info.value)
    assert info.value.transient is False


@pytest.mark.parametrize("userinfo", ["deploy:s3cr3t-tok", "s3cr3t-tok", "x-access-token:s3cr3t"])
async def test_credentials_are_redacted_everywhere(
    userinfo: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Port 1 on loopback refuses at once: a fast, offline network failure.
    src = GitSource(f"https://{userinfo}@127.0.0.1:1/org/repo.git", "main", tmp_path / "work")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(SourceError) as info:
        await src.fetch()
    err = info.value
    assert "https://***@127.0.0.1:1/org/repo.git" in str(err)
    assert err.transient is True
    rendered = "".join(traceback.format_exception(err))
    assert "s3cr3t" not in rendered
    assert "s3cr3t" not in caplog.text and "s3cr3t" not in repr(src) and "s3cr3t" not in (src.last_error or "")
    assert "s3cr3t" not in (src.repo_path / "config").read_text()


def test_redact() -> None:
    assert redact("fatal: https://u:p@h/x and ssh://tok@h2/y") == "fatal: https://***@h/x and ssh://***@h2/y"
    assert redact("git@github.com:org/repo.git") == "git@github.com:org/repo.git"


async def test_file_url_and_is_local(origin: Path, tmp_path: Path) -> None:
    src = GitSource(origin.as_uri(), "main", tmp_path / "work")
    assert src.is_local and src.local_path == origin
    assert await src.fetch() == run_git(origin, "rev-parse", "HEAD")
    assert GitSource(str(origin), "main", tmp_path).is_local
    assert not GitSource("https://example.invalid/r.git", "main", tmp_path).is_local
    assert not GitSource("git@example.invalid:org/r.git", "main", tmp_path).is_local


async def test_concurrent_fetches_serialize(origin: Path, tmp_path: Path) -> None:
    src = GitSource(str(origin), "main", tmp_path / "work")
    results = await asyncio.gather(*(src.fetch() for _ in range(5)))
    assert set(results) == {run_git(origin, "rev-parse", "HEAD")}


async def test_changed_paths(origin: Path, tmp_path: Path) -> None:
    src = GitSource(str(origin), "main", tmp_path / "work")
    old = await src.fetch()
    commit_file(origin, "services/api.yaml", "name: api\n")
    run_git(origin, "rm", "-q", "services/web.yaml")
    run_git(origin, "commit", "-q", "-m", "rm web")
    new = await src.fetch()
    assert await src.changed_paths(old, new) == ["services/api.yaml", "services/web.yaml"]
    assert await src.changed_paths(None, old) == ["services/web.yaml"]
    assert await src.changed_paths(new, new) == []
    with pytest.raises(ValueError):
        await src.changed_paths("--output=/tmp/x", new)
    with pytest.raises(SourceError):
        await src.changed_paths("deadbeef" * 5, new)


@pytest.mark.parametrize("branch", ["", "-x", "a..b", "a b", "x.lock", "a:b", "refs/heads/../x"])
def test_invalid_branch_rejected(branch: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        GitSource("/tmp/x", branch, tmp_path)


def test_ref_change_filter(tmp_path: Path) -> None:
    g = tmp_path / ".git"
    assert is_ref_change(g, g / "refs" / "heads" / "main")
    assert is_ref_change(g, g / "refs" / "heads" / "team" / "x")
    assert is_ref_change(g, g / "HEAD")
    assert is_ref_change(g, g / "packed-refs")
    assert not is_ref_change(g, g / "refs" / "heads" / "main.lock")
    assert not is_ref_change(g, g / "objects" / "ab" / "cdef")
    assert not is_ref_change(g, g / "index")
    assert not is_ref_change(g, g / "index.lock")
    assert not is_ref_change(g, tmp_path / "services" / "web.yaml")


async def test_watch_sees_a_commit(origin: Path, tmp_path: Path) -> None:
    src = GitSource(str(origin), "main", tmp_path / "work")
    fired = asyncio.Event()
    stop = asyncio.Event()
    task = asyncio.create_task(src.watch(fired.set, stop))
    try:
        # The watcher starts in a thread with no readiness signal: commit again until seen (bounded).
        for i in range(10):
            await asyncio.to_thread(commit_file, origin, f"w{i}.yaml", f"{i}\n")
            try:
                await asyncio.wait_for(fired.wait(), timeout=1.0)
                break
            except TimeoutError:
                continue
        assert fired.is_set()
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)


async def test_watch_returns_for_remote_url(tmp_path: Path) -> None:
    src = GitSource("https://example.invalid/r.git", "main", tmp_path)
    await asyncio.wait_for(src.watch(lambda: None, asyncio.Event()), timeout=5)


async def test_poller_fires_on_the_loop_thread() -> None:
    scheduler = AsyncIOScheduler(event_loop=asyncio.get_running_loop())
    fired = asyncio.Event()
    threads: list[int] = []

    def on_change() -> None:
        threads.append(threading.get_ident())
        fired.set()

    scheduler.start()
    try:
        job = start_polling(scheduler, 0.05, on_change, jitter_s=0.01)
        assert job.id == "deployerd-source-poll"
        await asyncio.wait_for(fired.wait(), timeout=10)
    finally:
        scheduler.shutdown(wait=False)
    assert threads[0] == threading.get_ident()


async def test_kick_coalesces_triggers_during_a_reconcile() -> None:
    kick = Kick()
    batches: list[list[str]] = []
    running = asyncio.Event()
    release = asyncio.Event()

    async def reconcile_loop() -> None:
        for _ in range(2):
            batches.append(await kick.wait())
            running.set()
            await release.wait()
            release.clear()

    task = asyncio.create_task(reconcile_loop())
    kick.set("startup")
    await asyncio.wait_for(running.wait(), timeout=5)
    for reason in ("watch", "poll", "webhook", "poll", "watch"):
        kick.set(reason)
    assert kick.is_set()
    running.clear()
    release.set()
    await asyncio.wait_for(running.wait(), timeout=5)
    assert batches == [["startup"], ["watch", "poll", "webhook"]]
    assert not kick.is_set()  # nothing queued behind the second reconcile
    release.set()
    await asyncio.wait_for(task, timeout=5)


async def test_kick_bounds_its_reasons() -> None:
    kick = Kick()
    for i in range(1000):
        kick.set(f"r{i}")
    reasons = await kick.wait()
    assert len(reasons) == Kick.max_reasons and reasons[0] == "r0"


def test_job_trigger_names_what_brought_the_commit() -> None:
    from deployerd.source import job_trigger

    assert job_trigger(["git watch"], True) == "watch"
    assert job_trigger(["poll"], True) == "poll"
    assert job_trigger(["start"], True) == "poll"
    assert job_trigger(["webhook github", "poll"], True) == "webhook"
    assert job_trigger(["git watch", "resync"], True) == "watch"
    assert job_trigger(["sync web"], True) == "sync"
    assert job_trigger(["sync all"], False) == "sync"
    assert job_trigger(["resync"], False) == "resync"
    assert job_trigger(["job deploy-1 failed", "host sbx-1 back"], False) == "resync"
