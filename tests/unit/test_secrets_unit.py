"""Secrets: the manifest field, the secrets file, age files in the repository, release ids, redaction.

Every test that sees an error also checks that no value is in it. The age tests run Debian's real `age`.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from test_desired import WEB, build

from deployerd.desired import DesiredState, load_desired
from deployerd.secrets import (
    KEY_FILE,
    SecretError,
    Secrets,
    age_path,
    digest,
    parse_env_lines,
    parse_secrets_file,
    redact,
)
from deployerd.tree import DirTree

DB = "pw-Zq8!x 'quoted' \"d\" $HOME"
API_KEY = "ak-7f3c9e1d2b"
SHARED = "smtp-shared-0c1d"

needs_age = pytest.mark.skipif(shutil.which("age") is None, reason="Debian's age is not installed (make apt)")


def private(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def secrets_file(tmp_path: Path, mode: int = 0o600) -> Path:
    return private(tmp_path / "secrets.yaml",
                   f"services:\n  web:\n    DB_PASSWORD: {DB!r}\nshared:\n  SMTP: {SHARED}\n".replace("\\'", "''"),
                   mode)


def repo(tmp_path: Path, secrets: list[str], files: dict[str, Any] | None = None) -> tuple[DirTree, DesiredState]:
    tree = build(tmp_path / "repo", {"services/web.yaml": {**WEB, "secrets": secrets}, **(files or {})})
    return tree, load_desired(tree, "rev")


def assert_no_values(text: str) -> None:
    for value in (DB, API_KEY, SHARED):
        assert value not in text


# --------------------------------------------------------------------------- the manifest field


@pytest.mark.parametrize("secrets, reason", [
    ({"DB_PASSWORD": DB}, "values never go in the manifest"),
    (["DB_PASSWORD", "DB_PASSWORD"], "DB_PASSWORD is listed twice"),
    (["1BAD"], "item 0 must be a name"),
    (["GREETING"], "GREETING also in env"),
    ("DB_PASSWORD", "list"),
    ([DB], "item 0 must be a name"),
])
def test_manifest_secrets_field_is_validated(tmp_path: Path, secrets: Any, reason: str) -> None:
    _, state = repo(tmp_path, secrets)
    errors = [e for e in state.errors if e.file == "services/web.yaml"]
    assert "web" in state.broken and len(errors) == 1, state.errors
    assert errors[0].field == "secrets" and reason in errors[0].reason
    assert DB not in str(errors[0])  # a value written where a name goes is not echoed


def test_manifest_with_secrets_loads_and_keeps_names_only(tmp_path: Path) -> None:
    _, state = repo(tmp_path, ["DB_PASSWORD", "API_KEY"])
    assert state.services["web"].secrets == ["DB_PASSWORD", "API_KEY"]
    assert "secrets" not in state.releases["web"].inputs  # the daemon adds the keyed digest


# --------------------------------------------------------------------------- parsing


def test_secrets_file_parses_services_and_shared(tmp_path: Path) -> None:
    parsed = parse_secrets_file(secrets_file(tmp_path).read_bytes(), "f")
    assert parsed.services == {"web": {"DB_PASSWORD": DB}} and parsed.shared == {"SMTP": SHARED}
    assert parse_secrets_file(b"", "f").services == {}


@pytest.mark.parametrize("text, where", [
    (f"services:\n  web:\n    PORT: 5432\n    X: {API_KEY}\n", "services.web.PORT"),
    (f"sevices: {{web: {{X: {API_KEY}}}}}\n", "sevices"),
    (f"shared: [{API_KEY}]\n", "shared"),
    (f"shared:\n  A: {API_KEY}\n  A: {API_KEY}\n", "duplicate key 'A' at line 3"),
    (f"shared: {{A: \"{API_KEY}\n", "YAML syntax error at line"),
    (f"- {API_KEY}\n", "mapping"),
    (f"shared:\n  A: \"{API_KEY}\\nx\"\n", "newline"),
])
def test_secrets_file_errors_name_the_place_never_the_value(text: str, where: str) -> None:
    with pytest.raises(SecretError) as exc:
        parse_secrets_file(text.encode(), "/etc/deployerd/secrets.yaml")
    assert where in str(exc.value) and "/etc/deployerd/secrets.yaml" in str(exc.value)
    assert_no_values(str(exc.value))


def test_env_lines() -> None:
    text = f"# comment\n\nDB_PASSWORD={DB}\r\nAPI_KEY={API_KEY}=tail\nEMPTY=\n"
    assert parse_env_lines(text, "f") == {"DB_PASSWORD": DB, "API_KEY": f"{API_KEY}=tail", "EMPTY": ""}
    for bad, line in ((f"{API_KEY}\n", 1), (f"A=1\n9X={API_KEY}\n", 2), (f"A={API_KEY}\nA={API_KEY}\n", 2)):
        with pytest.raises(SecretError, match=f"f: line {line}") as exc:
            parse_env_lines(bad, "f")
        assert_no_values(str(exc.value))


# --------------------------------------------------------------------------- digest and redaction


def test_digest_is_keyed_and_follows_values() -> None:
    k1, k2 = b"k" * 32, b"j" * 32
    assert digest(k1, {"A": "x"}) == digest(k1, {"A": "x"})
    assert digest(k1, {"A": "x"}) != digest(k1, {"A": "y"})  # a rotated value: a new release
    assert digest(k1, {"A": "x"}) != digest(k2, {"A": "x"})  # a plain hash would let anyone test guesses
    import hashlib
    import json
    assert digest(k1, {"A": "x"}) not in hashlib.sha256(json.dumps({"A": "x"}).encode()).hexdigest()


def test_redact_longest_first() -> None:
    assert redact(f"a {DB} b {API_KEY}{API_KEY} c", [API_KEY, DB, ""]) == "a *** b ****** c"
    assert redact("secret-long and secret", ["secret", "secret-long"]) == "*** and ***"


# --------------------------------------------------------------------------- resolving


async def test_resolve_from_secrets_file_and_permissions(tmp_path: Path) -> None:
    tree, state = repo(tmp_path, ["DB_PASSWORD", "SMTP"])
    path = secrets_file(tmp_path)
    s = Secrets(path, None, tmp_path / "state")
    assert await s.resolve(state.services["web"], tree) == {"DB_PASSWORD": DB, "SMTP": SHARED}
    for lax in (0o644, 0o660, 0o604):
        path.chmod(lax)
        with pytest.raises(PermissionError, match="secrets.yaml"):
            await s.resolve(state.services["web"], tree)
    path.chmod(0o640)
    assert (await s.resolve(state.services["web"], tree))["DB_PASSWORD"] == DB


async def test_rotation_in_the_file_is_seen_without_restart(tmp_path: Path) -> None:
    tree, state = repo(tmp_path, ["SMTP"])
    path = secrets_file(tmp_path)
    s = Secrets(path, None, tmp_path / "state")
    before, values = await s.apply(state, tree)
    assert values == {"web": {"SMTP": SHARED}}
    private(path, "shared: {SMTP: rotated-value}\n")
    after, values = await s.apply(state, tree)
    assert values == {"web": {"SMTP": "rotated-value"}}
    assert before.releases["web"].id != after.releases["web"].id
    assert before.releases["web"].inputs["secrets"] != after.releases["web"].inputs["secrets"]
    assert state.releases["web"].id not in (before.releases["web"].id, after.releases["web"].id)
    # the key is made once, private, and kept: the same values give the same release in a new daemon
    assert (tmp_path / "state" / KEY_FILE).stat().st_mode & 0o777 == 0o600
    again, _ = await Secrets(path, None, tmp_path / "state").apply(state, tree)
    assert again.releases["web"].id == after.releases["web"].id


async def test_missing_secret_blocks_only_that_service(tmp_path: Path) -> None:
    tree, state = repo(tmp_path, ["DB_PASSWORD", "NOPE", "ALSO_NOPE"])
    s = Secrets(secrets_file(tmp_path), None, tmp_path / "state")
    out, values = await s.apply(state, tree)
    assert "web" in out.broken and "web" not in out.services and "api" in out.services and values == {}
    [err] = [e for e in out.errors if e.field == "secrets"]
    text = str(err)
    assert err.file == "services/web.yaml"
    assert "service web: secret NOPE, ALSO_NOPE not found" in text
    assert "secrets.yaml (services.web, shared)" in text and f"{age_path('web')} (not in the repository)" in text
    assert_no_values(text)
    assert out.errors_for("web") == [err]


async def test_no_secrets_file_configured_is_named(tmp_path: Path) -> None:
    tree, state = repo(tmp_path, ["DB_PASSWORD"])
    with pytest.raises(SecretError, match="no secrets_file configured"):
        await Secrets(None, None, tmp_path / "state").resolve(state.services["web"], tree)
    with pytest.raises(SecretError, match="not found"):
        await Secrets(tmp_path / "absent.yaml", None, tmp_path / "state").resolve(state.services["web"], tree)


def age_keygen(tmp_path: Path) -> tuple[Path, str]:
    identity = tmp_path / "age.key"
    subprocess.run(["age-keygen", "-o", str(identity)], check=True, capture_output=True)
    identity.chmod(0o600)
    public = subprocess.run(["age-keygen", "-y", str(identity)], check=True, capture_output=True,
                            text=True).stdout.strip()
    return identity, public


def age_encrypt(public: str, plaintext: str) -> bytes:
    return subprocess.run(["age", "--encrypt", "--recipient", public], input=plaintext.encode(), check=True,
                          capture_output=True).stdout


@needs_age
async def test_age_file_in_the_repository(tmp_path: Path) -> None:
    identity, public = age_keygen(tmp_path)
    ciphertext = age_encrypt(public, f"API_KEY={API_KEY}\nDB_PASSWORD=from-repo\nUNUSED=x\n")
    tree, state = repo(tmp_path, ["DB_PASSWORD", "API_KEY"], {age_path("web"): ciphertext})
    assert API_KEY.encode() not in ciphertext
    s = Secrets(secrets_file(tmp_path), identity, tmp_path / "state")
    # the daemon's file wins over the repository's (an operator's override); the rest comes from the repo
    assert await s.resolve(state.services["web"], tree) == {"DB_PASSWORD": DB, "API_KEY": API_KEY}
    assert await Secrets(None, identity, tmp_path / "state").resolve(state.services["web"], tree) == {
        "DB_PASSWORD": "from-repo", "API_KEY": API_KEY}
    identity.chmod(0o644)
    with pytest.raises(PermissionError, match="age identity"):
        await Secrets(None, identity, tmp_path / "state").resolve(state.services["web"], tree)


@needs_age
async def test_age_failures_are_named(tmp_path: Path) -> None:
    identity, public = age_keygen(tmp_path)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    _, stranger = age_keygen(other_dir)
    cases: dict[str, tuple[bytes, Path | None, str]] = {
        "no identity": (age_encrypt(public, f"API_KEY={API_KEY}\n"), None, "no age_identity_file is configured"),
        "wrong key": (age_encrypt(stranger, f"API_KEY={API_KEY}\n"), identity, "age could not decrypt it"),
        "not age": (b"API_KEY=" + API_KEY.encode() + b"\n", identity, "age could not decrypt it"),
        "bad plaintext": (age_encrypt(public, f"{API_KEY}\n"), identity, "line 1: expected NAME=value"),
    }
    for name, (blob, ident, reason) in cases.items():
        tree, state = repo(tmp_path / name, ["API_KEY"], {age_path("web"): blob})
        with pytest.raises(SecretError) as exc:
            await Secrets(None, ident, tmp_path / "state").resolve(state.services["web"], tree)
        assert reason in str(exc.value) and age_path("web") in str(exc.value), (name, exc.value)
        assert_no_values(str(exc.value))
    tree, state = repo(tmp_path / "gone", ["API_KEY"], {age_path("web"): age_encrypt(public, "A=1\n")})
    with pytest.raises(SecretError, match="age program is not installed"):
        await Secrets(None, identity, tmp_path / "state", age_binary="/nonexistent/age").resolve(
            state.services["web"], tree)


async def test_hmac_key_must_be_whole_and_private(tmp_path: Path) -> None:
    tree, state = repo(tmp_path, ["SMTP"])
    path = secrets_file(tmp_path)
    key = tmp_path / "state" / KEY_FILE
    key.parent.mkdir()
    private(key, "short")
    with pytest.raises(SecretError, match="must be 32 bytes"):
        await Secrets(path, None, tmp_path / "state").apply(state, tree)
    key.write_bytes(b"k" * 32)
    key.chmod(0o644)
    with pytest.raises(PermissionError, match="secrets HMAC key"):
        await Secrets(path, None, tmp_path / "state").apply(state, tree)
    key.chmod(0o600)
    out, _ = await Secrets(path, None, tmp_path / "state").apply(state, tree)
    assert out.releases["web"].inputs["secrets"] == digest(b"k" * 32, {"SMTP": SHARED})
