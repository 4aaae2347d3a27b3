"""Configuration precedence and the secret-file guard."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployerd.config import load_settings


def test_precedence_file_then_env_then_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("repo_url: /from/file\nbranch: file-branch\nmax_parallel: 2\n")
    monkeypatch.setenv("DEPLOYERD_BRANCH", "env-branch")
    s = load_settings(cfg, max_parallel=7)
    assert (s.repo_url, s.branch, s.max_parallel) == ("/from/file", "env-branch", 7)


def test_unknown_setting_is_an_error(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("repo_ulr: /typo\n")
    with pytest.raises(ValueError, match="repo_ulr"):
        load_settings(cfg)


def test_secret_files_must_be_private(tmp_path: Path) -> None:
    token = tmp_path / "api.token"
    token.write_text("s3cret\n")
    token.chmod(0o644)
    s = load_settings(tmp_path / "absent.yaml", api_token_file=token)
    with pytest.raises(PermissionError, match="api.token"):
        s.secret("api_token")
    token.chmod(0o660)
    with pytest.raises(PermissionError):
        s.secret("api_token")
    for ok in (0o600, 0o640):
        token.chmod(ok)
        assert s.secret("api_token") == "s3cret"
    assert s.secret("webhook_secret") is None

