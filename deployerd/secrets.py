"""Secret env values: the manifest names them (``secrets: [DB_PASSWORD]``), git never holds them in clear.

Values are resolved by the daemon at every reconcile, per name, from the first source that has it:

1. the secrets file on the daemon's machine (setting ``secrets_file``; mode 0600, or 0640 root-owned)::

       services:
         web: {DB_PASSWORD: "..."}      # for service web only
       shared:
         SMTP_PASSWORD: "..."           # for any service that names it

   Being outside git, it is the operator's override: a value here wins over the repository's.
2. ``secrets/<service>.env.age`` in the repository, at the commit being deployed: ``NAME=value`` lines
   (``#`` comments and blank lines allowed, the value verbatim after the first ``=``) encrypted with age to the
   daemon's public key, and decrypted with ``age_identity_file``. Debian's ``age`` runs with the ciphertext on
   stdin and the plaintext on stdout: never in argv, never on disk.

A rotated value must deploy a new release, yet the release id is shown everywhere (labels, API, store), and a
plain hash of a low-entropy password invites offline guessing. So values enter the id only as an HMAC keyed
with a random key that never leaves the daemon's state dir (``secrets.key``, 0600). Losing that key changes the
ids of services with secrets once (they are redeployed with the same values).

Nothing here logs or raises a value: errors name the service, the secret and the sources looked at.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import secrets as _random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from deployerd.config import check_private, read_private
from deployerd.desired import (
    SERVICES_DIR,
    DesiredState,
    ManifestError,
    ServiceSpec,
    StrictLoader,
)
from deployerd.tree import Entry, Tree, TreeError

REPO_DIR = "secrets"
MAX_AGE_FILE_BYTES = 1024 * 1024
AGE_TIMEOUT_S = 30.0
KEY_FILE = "secrets.key"
REDACTED = "***"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_EnvValues = dict[str, str]


class SecretError(Exception):
    """A secret could not be resolved; the message names service, secret and sources, never a value."""


def age_path(service: str) -> str:
    """Where a service's encrypted secrets live in the repository."""
    return f"{REPO_DIR}/{service}.env.age"


# --------------------------------------------------------------------------- parsing (pure)


def _check_value(where: str, name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise SecretError(f"{where}: {name}: must be a string (quote numbers and booleans in YAML)")
    if any(c in value for c in "\0\n\r"):
        raise SecretError(f"{where}: {name}: must not contain NUL or newline characters")
    return value


class SecretsFile(BaseModel):
    """The daemon-side secrets file: per-service values, and shared ones any service may name."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    services: dict[str, dict[str, str]] = Field(default_factory=dict)
    shared: dict[str, str] = Field(default_factory=dict)

    @field_validator("services", "shared", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return {} if v is None else v


def parse_secrets_file(data: bytes, where: str) -> SecretsFile:
    """Parse the secrets file. Errors name the file and the key path, never the value found there."""
    try:
        doc = yaml.load(data.decode("utf-8"), Loader=StrictLoader)
    except UnicodeDecodeError as exc:
        raise SecretError(f"{where}: not UTF-8 (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        # the parser's own text may quote the file (a value): only StrictLoader's refusals, which name keys
        problem = str(getattr(exc, "problem", "") or "")
        what = problem if problem.startswith(("duplicate key", "YAML aliases")) else "syntax error"
        raise SecretError(f"{where}: YAML {what}{at}") from None
    if doc is None:
        return SecretsFile()
    if not isinstance(doc, dict):
        raise SecretError(f"{where}: must be a mapping with 'services' and/or 'shared'")
    try:
        parsed = SecretsFile.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        field = ".".join(str(p) for p in first["loc"] if p != "[key]")
        raise SecretError(f"{where}: {field}: {first['msg']}") from None
    for name, value in parsed.shared.items():
        _check_value(where, f"shared.{name}", value)
    for service, values in parsed.services.items():
        for name, value in values.items():
            _check_value(where, f"services.{service}.{name}", value)
    return parsed


def parse_env_lines(text: str, where: str) -> _EnvValues:
    """``NAME=value`` lines (the plaintext of an age file). Errors name the line number, never its text."""
    out: _EnvValues = {}
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, eq, value = line.partition("=")
        name = name.strip()
        if not eq or not _NAME.fullmatch(name):
            raise SecretError(f"{where}: line {number}: expected NAME=value")
        if "\0" in value:
            raise SecretError(f"{where}: line {number}: {name}: must not contain NUL")
        if name in out:
            raise SecretError(f"{where}: line {number}: {name} is given twice")
        out[name] = value
    return out


def digest(key: bytes, values: _EnvValues) -> str:
    """The release input for secret values: an HMAC, so the id reveals nothing testable without the key."""
    blob = json.dumps(values, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return hmac.new(key, blob, hashlib.sha256).hexdigest()[:12]


def redact(text: str, values: Iterable[str]) -> str:
    """Replace every known secret value in ``text`` with ``***`` (longest first, so no tail of one survives)."""
    for value in sorted({v for v in values if v}, key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return text


def secret_values(spec: ServiceSpec, env: _EnvValues) -> list[str]:
    """The values of the secrets ``spec`` names, out of a resolved env (what redaction must hide)."""
    return [env[n] for n in spec.secrets if env.get(n)]


# --------------------------------------------------------------------------- the resolver


def _listing(tree: Tree) -> dict[str, Entry]:
    return {e.path: e for e in tree.entries(REPO_DIR)} if tree.is_dir(REPO_DIR) else {}


@dataclass(frozen=True)
class _FileStamp:
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int


def _stamp(st: os.stat_result) -> _FileStamp:
    return _FileStamp(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Secrets:
    """Resolves the secrets services name; caches what it read (the file by its stat, age files by blob sha).

    Plaintext lives only in this process's memory and in the 0600 env files on hosts.
    """

    def __init__(self, secrets_file: Path | None, age_identity_file: Path | None, state_dir: Path,
                 age_binary: str = "age") -> None:
        self.secrets_file = secrets_file
        self.identity = age_identity_file
        self.key_path = state_dir / KEY_FILE
        self.age_binary = age_binary
        self._key: bytes | None = None
        self._file: tuple[_FileStamp, SecretsFile] | None = None
        self._age: dict[tuple[str, _FileStamp | None], _EnvValues] = {}

    # ---------------------------------------------------------------- sources
    def _load_key(self) -> bytes:
        """The HMAC key: made once, published whole (link of a finished temp file), so a reader never
        sees it half written, even from another process (``deployerd plan`` next to the daemon)."""
        if self._key is None:
            try:
                key = read_private(self.key_path, "secrets HMAC key")
            except FileNotFoundError:
                self.key_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.key_path.with_name(f".{KEY_FILE}.{os.getpid()}.{_random.token_hex(4)}")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(_random.token_bytes(32))
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, self.key_path)  # fails if another process published one first: use that
                except FileExistsError:
                    pass
                finally:
                    os.unlink(tmp)
                key = read_private(self.key_path, "secrets HMAC key")
            if len(key) != 32:
                raise SecretError(f"{self.key_path}: the secrets HMAC key must be 32 bytes; remove it to make a "
                                  "new one (services with secrets are then redeployed once)")
            self._key = key
        return self._key

    def _read_file(self) -> SecretsFile | None:
        """The secrets file, parsed again only when it changed (a rotation needs no restart)."""
        if self.secrets_file is None:
            return None
        path = self.secrets_file
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise SecretError(f"secrets file {path} not found") from None
        check_private(st.st_mode, path, "secrets")
        stamp = _stamp(st)
        if self._file is None or self._file[0] != stamp:
            data = read_private(path, "secrets")
            self._file = (stamp, parse_secrets_file(data, str(path)))
        return self._file[1]

    async def _decrypt(self, tree: Tree, service: str, listing: dict[str, Entry] | None) -> tuple[_EnvValues, str]:
        """The service's age file at ``tree`` ({} when absent) and a note on it for error messages."""
        path = age_path(service)
        if listing is None:
            listing = await asyncio.to_thread(_listing, tree)
        entry = listing.get(path)
        if entry is None:
            return {}, f"{path} (not in the repository)"
        if entry.kind != "file":
            raise SecretError(f"{path}: must be a regular file (not a symlink)")
        if entry.size > MAX_AGE_FILE_BYTES:
            raise SecretError(f"{path}: larger than {MAX_AGE_FILE_BYTES} bytes")
        if self.identity is None:
            raise SecretError(f"{path} is in the repository but no age_identity_file is configured")
        try:
            ident_stat = await asyncio.to_thread(os.stat, self.identity)
        except OSError as exc:
            raise SecretError(f"age identity {self.identity}: {exc.strerror}") from None
        check_private(ident_stat.st_mode, self.identity, "age identity")
        key = (entry.sha, _stamp(ident_stat))
        if key not in self._age:
            ciphertext = await asyncio.to_thread(tree.read, path)
            plaintext = await self._run_age(ciphertext, path)
            try:
                text = plaintext.decode("utf-8")
            except UnicodeDecodeError:
                raise SecretError(f"{path}: plaintext is not UTF-8") from None
            self._age = {k: v for k, v in self._age.items() if k[0] != entry.sha}  # one identity at a time
            self._age[key] = parse_env_lines(text, path)
        return self._age[key], path

    async def _run_age(self, ciphertext: bytes, where: str) -> bytes:
        assert self.identity is not None
        try:
            proc = await asyncio.create_subprocess_exec(
                self.age_binary, "--decrypt", "--identity", str(self.identity),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except FileNotFoundError:
            raise SecretError(f"{where}: the age program is not installed on the daemon's machine "
                              "(apt-get install age)") from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(ciphertext), AGE_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise SecretError(f"{where}: age did not finish within {AGE_TIMEOUT_S:.0f} s") from None
        if proc.returncode != 0:
            reason = err.decode("utf-8", "replace").strip().splitlines()
            last = (reason or [f"exit {proc.returncode}"])[-1][:200]
            raise SecretError(f"{where}: age could not decrypt it: {last}")
        return out

    # ---------------------------------------------------------------- resolving
    async def resolve(self, spec: ServiceSpec, tree: Tree | None,
                      listing: dict[str, Entry] | None = None) -> _EnvValues:
        """The values of every secret ``spec`` names (``tree``: where its age file is; None: no repository;
        ``listing``: the tree's ``secrets/`` entries when the caller already has them).

        Raises SecretError naming the service, the missing secrets and each source looked at.
        """
        if not spec.secrets:
            return {}
        local = await asyncio.to_thread(self._read_file)
        looked: list[str] = []
        found: _EnvValues = {}
        if local is not None:
            mine = local.services.get(spec.name, {})
            for n in spec.secrets:
                if n in mine or n in local.shared:
                    found[n] = mine.get(n, local.shared.get(n, ""))
            looked.append(f"{self.secrets_file} (services.{spec.name}, shared)")
        else:
            looked.append("no secrets_file configured")
        missing = [n for n in spec.secrets if n not in found]
        if missing and tree is not None:
            from_repo, note = await self._decrypt(tree, spec.name, listing)
            found.update({n: from_repo[n] for n in missing if n in from_repo})
            looked.append(note)
        missing = [n for n in spec.secrets if n not in found]
        if missing:
            raise SecretError(f"service {spec.name}: secret {', '.join(missing)} not found; looked in "
                              + " and ".join(looked))
        return {n: found[n] for n in spec.secrets}

    async def digest(self, values: _EnvValues) -> str:
        key = await asyncio.to_thread(self._load_key)
        return digest(key, values)

    async def apply(self, desired: DesiredState, tree: Tree) -> tuple[DesiredState, dict[str, _EnvValues]]:
        """Resolve every service's secrets at ``tree``: their HMAC joins each release; a service whose secrets
        cannot be resolved is blocked (like a broken manifest: its running release is left as is).

        Returns the adjusted desired state and, per service, the values to deploy with.
        """
        wanting = [spec for spec in desired.services.values() if spec.secrets]
        if not wanting:
            return desired, {}
        key = await asyncio.to_thread(self._load_key)
        listing = await asyncio.to_thread(_listing, tree)  # one walk of the tree for all services
        results = await asyncio.gather(*(self.resolve(spec, tree, listing) for spec in wanting),
                                       return_exceptions=True)
        services, releases = dict(desired.services), dict(desired.releases)
        host_releases = dict(desired.host_releases)
        errors, broken = list(desired.errors), set(desired.broken)
        values: dict[str, _EnvValues] = {}
        for spec, result in zip(wanting, results, strict=True):
            if isinstance(result, (SecretError, TreeError, OSError)):  # PermissionError is an OSError
                yml = f"{SERVICES_DIR}/{spec.name}.yml"
                file = yml if await asyncio.to_thread(tree.exists, yml) else f"{SERVICES_DIR}/{spec.name}.yaml"
                errors.append(ManifestError(file=file, field="secrets", reason=str(result)))
                broken.add(spec.name)
                services.pop(spec.name)
                releases.pop(spec.name)
                host_releases.pop(spec.name, None)
            elif isinstance(result, BaseException):
                raise result
            else:
                values[spec.name] = result
                keyed = digest(key, result)
                releases[spec.name] = releases[spec.name].with_input("secrets", keyed)
                host_releases[spec.name] = {h: r.with_input("secrets", keyed)
                                            for h, r in host_releases.get(spec.name, {}).items()}
        adjusted = desired.model_copy(update={"services": services, "releases": releases,
                                              "host_releases": host_releases, "errors": errors, "broken": broken})
        return adjusted, values


__all__ = ["REDACTED", "SecretError", "Secrets", "SecretsFile", "age_path", "digest", "parse_env_lines",
           "parse_secrets_file", "redact", "secret_values"]
