"""A file tree at one revision: the same read-only interface over a git commit and a plain directory.

Validation and release ids are computed from `Entry` data only (path, git mode, blob sha), so
``deployerd validate PATH`` on a working copy and the daemon on a pinned commit agree byte for byte.
Both implementations are synchronous; async callers wrap them in ``asyncio.to_thread``.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import os
import posixpath
import stat
import subprocess
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, Protocol, cast

import git

EntryKind = Literal["file", "symlink", "other"]

MODE_FILE = 0o100644
MODE_EXEC = 0o100755
MODE_SYMLINK = 0o120000
MODE_GITLINK = 0o160000  # submodule


class TreeError(Exception):
    """A path that is not in the tree, is not a readable file, or would leave the tree."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One non-directory entry. ``mode`` uses git's normalized modes so both trees compare equal."""

    path: str  # posix, relative to the tree root
    mode: int
    sha: str  # git blob sha1 of the content (for a symlink: of its target)
    kind: EntryKind
    size: int
    link_target: str | None = None


class Tree(Protocol):
    """Read-only view of a tree at one revision."""

    def entries(self, prefix: str = "") -> list[Entry]: ...

    def read(self, path: str) -> bytes: ...

    def open(self, path: str) -> AbstractContextManager[BinaryIO]:
        """A regular file's content as a stream (blocking reads): a large file is never held whole in memory."""
        ...

    def exists(self, path: str) -> bool: ...

    def is_dir(self, path: str) -> bool: ...


def blob_sha(content: bytes) -> str:
    """Git's blob id: sha1 over a ``blob <len>\\0`` header and the content."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def clean_path(path: str) -> str:
    """Normalize a tree-relative path; refuse absolute paths and ones climbing out with ``..``."""
    if "\0" in path or "\\" in path:
        raise TreeError(f"{path!r}: invalid path")
    if path.startswith("/"):
        raise TreeError(f"{path!r}: absolute path")
    norm = posixpath.normpath(path) if path else ""
    if norm == ".":
        norm = ""
    if norm == ".." or norm.startswith("../"):
        raise TreeError(f"{path!r}: leaves the tree")
    return norm


class GitTree:
    """The tree of one commit of a (bare or non-bare) repository; never touches the working copy."""

    def __init__(self, repo_path: Path, commit: str) -> None:
        # gitpython talks to one long-lived `git cat-file` process, which is not safe across threads (jobs
        # transfer files concurrently): the lock serializes object access. close() ends that process.
        self._repo = git.Repo(repo_path)
        self._repo_path = Path(repo_path)
        self._lock = threading.Lock()
        try:
            self._commit = self._repo.commit(commit)
            self._commit.tree  # noqa: B018 - resolve now: a full-length unknown sha is otherwise lazy
        except (git.BadName, git.BadObject, ValueError) as exc:
            raise TreeError(f"{commit!r}: unknown commit in {repo_path}") from exc
        self.revision: str = self._commit.hexsha
        self._index: dict[str, tuple[Entry, bytes]] | None = None  # path -> (entry, binsha)
        self._dirs: set[str] = {""}
        # Entries sorted by path, and their paths: everything under a folder is one contiguous run, found by
        # bisect, so entries(prefix) costs O(log n + matches) instead of a scan of the whole tree per service.
        self._sorted: list[Entry] = []
        self._paths: list[str] = []

    @property
    def committed_date(self) -> int:
        """The commit's time (seconds since the epoch)."""
        return int(self._commit.committed_date)

    def close(self) -> None:
        """Stop gitpython's helper processes."""
        self._repo.close()

    def _load(self) -> dict[str, tuple[Entry, bytes]]:
        with self._lock:
            return self._load_locked()

    def _load_locked(self) -> dict[str, tuple[Entry, bytes]]:
        if self._index is not None:
            return self._index
        index: dict[str, tuple[Entry, bytes]] = {}
        for item in self._commit.tree.traverse():
            assert isinstance(item, (git.Tree, git.Blob, git.Submodule))  # traverse() of a tree yields objects
            path, mode = str(item.path), item.mode
            if item.type == "tree":
                self._dirs.add(path)
                continue
            if mode == MODE_SYMLINK:
                target = self._repo.odb.stream(item.binsha).read()
                entry = Entry(path, mode, item.hexsha, "symlink", len(target),
                              target.decode("utf-8", "surrogateescape"))
            elif item.type == "blob" and mode in (MODE_FILE, MODE_EXEC):
                entry = Entry(path, mode, item.hexsha, "file", item.size)
            else:  # submodule (gitlink) or an unusual mode
                entry = Entry(path, mode, item.hexsha, "other", 0)
            index[path] = (entry, item.binsha)
        self._sorted = sorted((e for e, _ in index.values()), key=lambda e: e.path)
        self._paths = [e.path for e in self._sorted]
        self._index = index
        return index

    def entries(self, prefix: str = "") -> list[Entry]:
        prefix = clean_path(prefix)
        index = self._load()
        if not prefix:
            return list(self._sorted)
        if prefix in index:  # a file (git has no file and folder of one name)
            return [index[prefix][0]]
        folder = prefix + "/"
        start = bisect.bisect_left(self._paths, folder)
        end = bisect.bisect_left(self._paths, prefix + "0", start)  # "0" follows "/": the run's end
        return self._sorted[start:end]

    def read(self, path: str) -> bytes:
        """Content of a file (for a symlink: its target, as git stores it)."""
        found = self._load().get(clean_path(path))
        if found is None or found[0].kind == "other":
            raise TreeError(f"{path}: not a file in commit {self.revision[:12]}")
        with self._lock:
            data: bytes = self._repo.odb.stream(found[1]).read()
            return data

    @contextlib.contextmanager
    def open(self, path: str) -> Iterator[BinaryIO]:
        """A file's content streamed by its own ``git cat-file blob`` (not through the shared helper process,
        so large files neither wait for the lock nor sit whole in memory)."""
        found = self._load().get(clean_path(path))
        if found is None or found[0].kind != "file":
            raise TreeError(f"{path}: not a file in commit {self.revision[:12]}")
        proc = subprocess.Popen(["git", "-C", str(self._repo_path), "cat-file", "blob", found[0].sha],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None
        try:
            yield cast(BinaryIO, proc.stdout)
        finally:
            proc.stdout.close()
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    def exists(self, path: str) -> bool:
        path = clean_path(path)
        return path in self._load() or path in self._dirs

    def is_dir(self, path: str) -> bool:
        path = clean_path(path)
        self._load()
        return path in self._dirs


class DirTree:
    """A plain directory, read like a commit: skips ``.git``, never follows symlinks."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise TreeError(f"{root}: not a directory")

    def _lstat(self, path: str) -> os.stat_result | None:
        """lstat of ``path``, or None if missing or if any parent component is not a real directory."""
        path = clean_path(path)
        if path == ".git" or path.startswith(".git/"):
            return None
        current = self.root
        parts = path.split("/") if path else []
        for i, part in enumerate(parts):
            current = current / part
            try:
                st = os.lstat(current)
            except OSError:
                return None
            if i < len(parts) - 1 and not stat.S_ISDIR(st.st_mode):
                return None
        return os.lstat(current) if parts else os.lstat(self.root)

    def _entry(self, rel: str, full: str, st: os.stat_result) -> Entry:
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(os.fsencode(full))
            return Entry(rel, MODE_SYMLINK, blob_sha(target), "symlink", len(target),
                         target.decode("utf-8", "surrogateescape"))
        if stat.S_ISREG(st.st_mode):
            mode = MODE_EXEC if st.st_mode & stat.S_IXUSR else MODE_FILE
            h = hashlib.sha1(b"blob %d\0" % st.st_size)
            size = 0
            with open(full, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
                    size += len(chunk)
            if size != st.st_size:  # changed while reading: hash what we read
                raise TreeError(f"{rel}: file changed while being read")
            return Entry(rel, mode, h.hexdigest(), "file", size)
        return Entry(rel, stat.S_IFMT(st.st_mode), "", "other", 0)

    def entries(self, prefix: str = "") -> list[Entry]:
        prefix = clean_path(prefix)
        st = self._lstat(prefix)
        if st is None:
            return []
        if not stat.S_ISDIR(st.st_mode):
            return [self._entry(prefix, str(self.root / prefix), st)]
        out: list[Entry] = []
        stack = [prefix]
        while stack:
            rel_dir = stack.pop()
            with os.scandir(self.root / rel_dir if rel_dir else self.root) as it:
                for d in it:
                    rel = f"{rel_dir}/{d.name}" if rel_dir else d.name
                    if rel == ".git":
                        continue
                    dst = d.stat(follow_symlinks=False)
                    if stat.S_ISDIR(dst.st_mode):
                        stack.append(rel)
                    else:
                        out.append(self._entry(rel, d.path, dst))
        return sorted(out, key=lambda e: e.path)

    def read(self, path: str) -> bytes:
        """Content of a regular file (for a symlink: its target, like git)."""
        st = self._lstat(path)
        full = self.root / clean_path(path)
        if st is not None and stat.S_ISLNK(st.st_mode):
            return os.readlink(os.fsencode(full))
        if st is None or not stat.S_ISREG(st.st_mode):
            raise TreeError(f"{path}: not a file in {self.root}")
        with self.open(path) as fh:
            return fh.read()

    @contextlib.contextmanager
    def open(self, path: str) -> Iterator[BinaryIO]:
        """A regular file, opened without following a symlink."""
        st = self._lstat(path)
        if st is None or not stat.S_ISREG(st.st_mode):
            raise TreeError(f"{path}: not a file in {self.root}")
        fd = os.open(self.root / clean_path(path), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as fh:
            yield fh

    def exists(self, path: str) -> bool:
        return self._lstat(path) is not None

    def is_dir(self, path: str) -> bool:
        st = self._lstat(path)
        return st is not None and stat.S_ISDIR(st.st_mode)
