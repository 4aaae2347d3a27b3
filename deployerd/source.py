"""The desired-state repository as a stream of pinned commits.

`GitSource` keeps a bare mirror of one branch under a work directory and answers "which commit is the
tip now?". Everything downstream reads trees by commit sha from `repo_path`, so a reconcile is pinned to
one revision even if the branch moves while it runs.

Triggers decide *when* to ask: a file watcher on a local repository, a jittered poll, and push webhooks
all feed one coalescing `Kick`, so a burst of triggers during a reconcile queues exactly one more.

Errors: every git failure leaves this module as `SourceError`, classified ``transient`` (network, timeout:
retry with backoff) or not (missing repository or branch, authentication: wait for the config to change).
Credentials embedded in the URL never appear in messages, logs or exception chains.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import git
from watchfiles import Change, awatch

log = logging.getLogger(__name__)

_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
_SHA = re.compile(r"^[0-9a-fA-F]{4,64}$")
_BAD_BRANCH = re.compile(r"(^[-/.])|(\.\.)|([\s~^:?*\[\\\x00-\x1f\x7f])|(@\{)|(/$)|(\.lock$)|(//)|(/\.)")

# Never prompt (a prompt would hang the worker thread forever) and never read a credential helper's UI.
_GIT_ENV = {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true", "SSH_ASKPASS": "true", "LC_ALL": "C"}

# stderr fragments, checked in order: the first match decides (message, transient).
_CLASSIFY: tuple[tuple[str, str, bool], ...] = (
    ("couldn't find remote ref", "branch {branch!r} not found", False),
    ("authentication failed", "authentication failed", False),
    ("permission denied", "permission denied", False),
    ("could not read username", "credentials required", False),
    ("host key verification failed", "host key verification failed", False),
    ("does not appear to be a git repository", "repository not found", False),
    ("repository not found", "repository not found", False),
    ("not found", "repository not found", False),
    ("timed out", "timed out", True),
    ("could not resolve host", "could not resolve host", True),
    ("failed to connect", "connection failed", True),
    ("connection refused", "connection refused", True),
    ("could not read from remote repository", "could not read from remote repository", True),
)


_COMMIT_FORMAT = "%H%x00%an <%ae>%x00%cn <%ce>%x00%cI%x00%B"
_COMMIT_SHA = re.compile(r"[0-9a-f]{7,64}")
_COMMITS_CACHED = 2048
MESSAGE_MAX = 2000
# watchfiles yields a change once a step passes with nothing new, so a commit is noticed about two steps after its
# ref moves: measured 95 ms with 50, 36 ms with 20, 17 ms with 10; idle, the watcher thread's wake-ups cost 0.15 %,
# 0.34 % and 0.48 % of a core (10 s of each).
WATCH_STEP_MS = 20


@dataclass(frozen=True)
class CommitInfo:
    """Who made a commit and what it says: what a person reads next to a sha (the audit trail, the status page)."""

    sha: str
    author: str  # "Name <email>"
    committer: str
    date: str  # committer date, ISO 8601
    message: str  # bounded to MESSAGE_MAX characters

    @property
    def summary(self) -> str:
        """The message's first line."""
        return self.message.split("\n", 1)[0]

    @property
    def author_name(self) -> str:
        return self.author.split(" <", 1)[0]


def read_commit(repo_path: Path, sha: str) -> CommitInfo | None:
    """One commit of the repository at ``repo_path`` (blocking: call it in a thread); None when unknown."""
    if not _COMMIT_SHA.fullmatch(sha):
        return None  # also never an option to git
    proc = subprocess.run(["git", "-C", str(repo_path), "show", "-s", f"--format={_COMMIT_FORMAT}", sha, "--"],
                          capture_output=True, text=True, timeout=30, check=False, env={**os.environ, **_GIT_ENV})
    parts = proc.stdout.split("\0", 4)
    if proc.returncode != 0 or len(parts) != 5:
        return None
    full, author, committer, date, message = parts
    return CommitInfo(sha=full, author=author, committer=committer, date=date, message=message.strip()[:MESSAGE_MAX])


class SourceError(Exception):
    """A git operation failed. ``transient`` says whether retrying later can help without a config change."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient


def redact(text: str) -> str:
    """Replace credentials in URLs (``scheme://user:password@host``) with ``***@``."""
    return _USERINFO.sub("***@", text)


def _validate_branch(branch: str) -> None:
    if not branch or _BAD_BRANCH.search(branch):
        raise ValueError(f"invalid branch name: {branch!r}")


class GitSource:
    """A local bare mirror of one branch of ``url``; `fetch` returns the pinned tip commit.

    The URL is passed to git on each fetch instead of being stored as a remote, so credentials it may
    carry are not written into the mirror's config on disk.
    """

    def __init__(self, url: str, branch: str, workdir: Path, *, fetch_timeout_s: float = 120.0) -> None:
        if not url or url.startswith("-"):
            raise ValueError("invalid repository URL")
        _validate_branch(branch)
        self._url = url
        self.branch = branch
        self.workdir = Path(workdir)
        self._fetch_timeout_s = fetch_timeout_s
        self._lock = asyncio.Lock()
        self._revision: str | None = None
        self._last_fetch_at: datetime | None = None
        self._last_error: str | None = None
        self._commits: dict[str, CommitInfo] = {}

    def __repr__(self) -> str:
        return f"GitSource({self.display_url!r}, branch={self.branch!r})"

    @property
    def display_url(self) -> str:
        """The URL safe to show: credentials redacted."""
        return redact(self._url)

    @property
    def repo_path(self) -> Path:
        """The bare mirror; readers open commits here by sha."""
        return self.workdir / "mirror.git"

    @property
    def revision(self) -> str | None:
        """Sha of the branch tip at the last successful fetch."""
        return self._revision

    @property
    def last_fetch_at(self) -> datetime | None:
        return self._last_fetch_at

    @property
    def last_error(self) -> str | None:
        """Redacted message of the last failed fetch; None after a success."""
        return self._last_error

    @property
    def local_path(self) -> Path | None:
        """The directory for a local URL (a path or file://), else None. Syntactic: no I/O."""
        if self._url.startswith("file://"):
            return Path(unquote(urlparse(self._url).path))
        if "://" in self._url:
            return None
        if ":" in self._url.split("/", 1)[0]:  # scp-like user@host:path
            return None
        return Path(self._url)

    @property
    def is_local(self) -> bool:
        return self.local_path is not None

    async def fetch(self) -> str:
        """Clone on first use, fetch the branch, and return the sha at its tip."""
        async with self._lock:
            try:
                sha = await asyncio.to_thread(self._fetch_sync)
            except SourceError as exc:
                self._last_error = exc.message
                log.warning("source fetch failed: %s", exc.message)
                raise
            if sha != self._revision:
                log.info("source %s@%s at %s (was %s)", self.display_url, self.branch, sha[:12], self._revision)
            self._revision = sha
            self._last_fetch_at = datetime.now(UTC)
            self._last_error = None
            return sha

    async def commits(self, shas: Iterable[str]) -> dict[str, CommitInfo]:
        """The fetched commits among ``shas`` (unknown ones are left out), read from the mirror.

        Commits never change, so answers are kept (bounded): a page showing the same commits reads git once."""
        wanted = {s for s in shas if s}
        missing = sorted(s for s in wanted if s not in self._commits)
        if missing:
            found = await asyncio.to_thread(lambda: {s: read_commit(self.repo_path, s) for s in missing})
            if len(self._commits) + len(found) > _COMMITS_CACHED:
                self._commits.clear()
            self._commits.update({s: info for s, info in found.items() if info is not None})
        return {s: self._commits[s] for s in wanted if s in self._commits}

    async def changed_paths(self, old: str | None, new: str) -> list[str]:
        """Paths that differ between two fetched commits (all paths of ``new`` when ``old`` is empty)."""
        for sha in (old, new):
            if sha and not _SHA.match(sha):
                raise ValueError(f"not a commit sha: {sha!r}")
        return await asyncio.to_thread(self._changed_paths_sync, old, new)

    async def watch(self, on_change: Callable[[], None], stop: asyncio.Event, *, debounce_ms: int = 200) -> None:
        """Call ``on_change`` when a ref of the local source repository moves, until ``stop`` is set.

        Returns at once for a remote URL (polling and webhooks cover those). Only ref updates count:
        object writes, index and lock-file churn during a commit would otherwise fire several times.
        """
        local = self.local_path
        if local is None:
            return
        gitdir = await asyncio.to_thread(_find_gitdir, local)
        if gitdir is None:
            log.warning("source %s is not a git directory; not watching it", local)
            return

        def accept(_change: Change, path: str) -> bool:
            return is_ref_change(gitdir, Path(path))

        backoff = 1.0
        while not stop.is_set():
            try:
                async for _changes in awatch(
                    gitdir, watch_filter=accept, debounce=debounce_ms, step=WATCH_STEP_MS, stop_event=stop
                ):
                    backoff = 1.0
                    on_change()
            except Exception as exc:  # the directory vanished, inotify limits...: retry, bounded by stop
                log.warning("watching %s failed: %s", gitdir, exc)
                try:
                    await asyncio.wait_for(stop.wait(), timeout=backoff)
                except TimeoutError:
                    pass
                backoff = min(backoff * 2, 60.0)

    # -- worker-thread side ------------------------------------------------------------------------

    def _open_mirror(self) -> git.Repo:
        path = self.repo_path
        try:
            if (path / "HEAD").exists():
                return git.Repo(path)
            path.mkdir(parents=True, exist_ok=True)
            repo = git.Repo.init(path, bare=True)
            with repo.config_writer() as cfg:
                # Deployed commits must stay readable for rollback even after a force-push upstream.
                cfg.set_value("gc", "auto", "0")
            repo.git.symbolic_ref("HEAD", f"refs/heads/{self.branch}")
            return repo
        except (OSError, git.GitError) as exc:
            raise SourceError(f"cannot open mirror at {path}: {exc}", transient=False) from None

    def _fetch_sync(self) -> str:
        repo = self._open_mirror()
        ref = f"refs/heads/{self.branch}"
        try:
            repo.git.fetch(
                "--quiet",
                "--no-tags",
                "--",
                self._url,
                f"+{ref}:{ref}",
                env=_GIT_ENV,
                kill_after_timeout=self._fetch_timeout_s,
            )
            return str(repo.git.rev_parse("--verify", f"{ref}^{{commit}}"))
        except git.GitCommandError as exc:
            # `from None`: the original exception's text carries the raw command line, URL included.
            raise self._translate(exc) from None
        finally:
            repo.close()

    def _translate(self, exc: git.GitCommandError) -> SourceError:
        stderr = str(exc.stderr or "")
        low = stderr.lower()
        for needle, what, transient in _CLASSIFY:  # noqa: B007 - the match's transient is read after the break
            if needle in low:
                reason = what.format(branch=self.branch)
                break
        else:
            reason, transient = f"git exited with status {exc.status}", True
        detail = redact(" ".join(stderr.replace("stderr:", "").split()).strip("'"))[:300]
        msg = f"fetch {self.display_url} ({self.branch}): {reason}"
        return SourceError(f"{msg}: {detail}" if detail else msg, transient=transient)

    def _changed_paths_sync(self, old: str | None, new: str) -> list[str]:
        try:
            repo = git.Repo(self.repo_path)
        except (OSError, git.GitError) as exc:
            raise SourceError(f"cannot open mirror at {self.repo_path}: {exc}", transient=False) from None
        try:
            if old:
                out = repo.git.diff("--name-only", "--no-renames", "-z", old, new, "--")
            else:
                out = repo.git.ls_tree("-r", "--name-only", "-z", new)
        except git.GitCommandError as exc:
            raise SourceError(f"cannot diff {old}..{new}: unknown commit", transient=False) from exc
        finally:
            repo.close()
        return sorted(p for p in out.split("\0") if p)


def _find_gitdir(path: Path) -> Path | None:
    """The directory whose refs move on commit: ``path/.git`` for a work tree, ``path`` for a bare repo."""
    if (path / ".git").is_dir():
        return path / ".git"
    if (path / "HEAD").is_file() and (path / "refs").is_dir():
        return path
    return None


def is_ref_change(gitdir: Path, path: Path) -> bool:
    """True for a change that can move a branch: HEAD, packed-refs, or a file under refs/heads."""
    try:
        rel = path.relative_to(gitdir)
    except ValueError:
        return False
    if rel.name.endswith(".lock"):
        return False
    parts = rel.parts
    if parts in (("HEAD",), ("packed-refs",)):
        return True
    return len(parts) >= 3 and parts[:2] == ("refs", "heads")


def start_polling(scheduler: Any, interval_s: float, on_change: Callable[[], None], jitter_s: float = 0.0) -> Any:
    """Add an interval job to an apscheduler ``AsyncIOScheduler`` that calls ``on_change``.

    The job is a coroutine so it runs on the event loop (a plain function would run in a thread pool,
    where touching asyncio objects is unsafe). ``coalesce`` and ``max_instances=1`` keep a stalled loop
    from releasing a burst of missed runs. Returns the apscheduler Job.
    """

    async def tick() -> None:
        on_change()

    return scheduler.add_job(
        tick,
        "interval",
        seconds=interval_s,
        jitter=jitter_s or None,
        id="deployerd-source-poll",
        name="poll git source",
        replace_existing=True,
        coalesce=True,
        max_instances=1,
    )


class Kick:
    """A coalescing trigger: any number of `set` calls between two `wait` calls wake one waiter once.

    The reconcile loop awaits `wait()`; while it runs, the watcher, poller and webhook may all call
    `set`, and exactly one more reconcile follows, told every distinct reason. Must be used on the
    event loop's thread.
    """

    max_reasons = 32

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._reasons: list[str] = []

    def set(self, reason: str) -> None:
        if reason not in self._reasons and len(self._reasons) < self.max_reasons:
            self._reasons.append(reason)
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> list[str]:
        """Wait for at least one `set`, then return (and forget) the reasons collected since the last wait."""
        await self._event.wait()
        self._event.clear()
        reasons, self._reasons = self._reasons, []
        return reasons


def job_trigger(reasons: list[str], revision_changed: bool) -> str:
    """What started a reconcile's jobs, from the Kick's reasons: ``webhook``, ``watch`` (the local repository
    changed) or ``poll`` when it brought a new commit, ``sync`` when asked (POST /sync, ``deployerd sync``),
    else ``resync`` (the periodic full reconcile, a job or a host coming back: drift healed)."""
    if any(r.startswith("sync") for r in reasons):
        return "sync"
    if not revision_changed:
        return "resync"
    if any(r.startswith("webhook") for r in reasons):
        return "webhook"
    if "git watch" in reasons:
        return "watch"
    return "poll"  # the poller, the first fetch at start, or a reconcile that fetched for another reason


__all__ = ["GitSource", "Kick", "SourceError", "is_ref_change", "job_trigger", "redact", "start_polling"]
