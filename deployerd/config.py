"""Daemon configuration: a YAML file plus ``DEPLOYERD_*`` environment variables (the environment wins).

Secrets (API token, webhook secret, Registry token, the services' secret values and the age identity) are read
from files named here, never taken from the command line, so they stay out of ``ps`` output and shell history.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_CONFIG_PATH = Path("/etc/deployerd/config.yaml")


class Settings(BaseSettings):
    """Everything the daemon needs that is not in git: where git is, how to reach hosts, where to listen."""

    model_config = SettingsConfigDict(env_prefix="DEPLOYERD_", extra="forbid")

    repo_url: str = Field(default="", description="git URL or local path of the desired-state repository")
    instance: str = Field(
        default="default", pattern=r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$",
        description="name of this daemon's deployments on shared hosts: it sees and prunes only its own",
    )
    branch: str = "main"
    state_dir: Path = Path("/var/lib/deployerd")
    poll_interval_s: float = Field(default=60.0, gt=0)
    resync_interval_s: float = Field(default=60.0, gt=0, description="periodic full reconcile (heals drift)")
    max_parallel: int = Field(default=4, ge=1, le=64)
    keep_releases: int = Field(default=3, ge=1, le=20)
    listen_host: str = "127.0.0.1"
    listen_port: int = Field(default=8007, ge=0, le=65535)
    api_token_file: Path | None = None
    webhook_secret_file: Path | None = None
    registry_url: str = "http://127.0.0.1:8000"
    registry_token_file: Path | None = None
    ssh_key: Path | None = None
    known_hosts: Path = Path("/etc/deployerd/known_hosts")
    ssh_connect_timeout_s: float = Field(default=10.0, gt=0)
    lock_ttl_s: float = Field(
        default=60.0, ge=3, description="a host lock not renewed for this long (its holder died) may be taken over",
    )
    lock_wait_s: float = Field(
        default=120.0, ge=0, description="how long a job waits for a host lock another daemon holds, then fails "
                                         "transiently (retried with backoff, never rolled back)",
    )
    api_source_dir: Path | None = Field(
        default=None, description="POST /deploy may only deploy directories under this one (default state_dir/api-sources)"
    )
    secrets_file: Path | None = Field(
        default=None, description="values of the manifests' `secrets` on this machine (YAML, see deployerd.secrets)"
    )
    age_identity_file: Path | None = Field(
        default=None, description="age identity that decrypts secrets/<service>.env.age in the repository"
    )

    @field_validator("api_token_file", "webhook_secret_file", "registry_token_file", "secrets_file",
                     "age_identity_file", mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return None if v in ("", None) else v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings)

    def secret(self, name: str) -> str | None:
        """Read one secret file (``api_token``, ``webhook_secret``, ``registry_token``); refuse lax permissions."""
        path: Path | None = getattr(self, f"{name}_file")
        if path is None:
            return None
        return read_private(path, name).decode().strip() or None

    @property
    def db_path(self) -> Path:
        return self.state_dir / "deployerd.db"

    @property
    def api_source_root(self) -> Path:
        return self.api_source_dir or self.state_dir / "api-sources"

    @property
    def repo_cache(self) -> Path:
        return self.state_dir / "repo"


def check_private(mode: int, path: Path, what: str) -> None:
    """Refuse a secret file others can read or its group can write: 0600, or 0640 for a root-owned file
    the daemon's group reads."""
    mode &= 0o777
    if mode & 0o027:
        raise PermissionError(f"{path}: {what} file must not be readable by others nor writable by group "
                              f"(mode {mode:o}; use 0600 or 0640)")


def read_private(path: Path, what: str) -> bytes:
    """Read a secret file after `check_private` (on the opened file, so a swap between check and read fails)."""
    with open(path, "rb") as f:
        check_private(os.fstat(f.fileno()).st_mode, path, what)
        return f.read()


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Precedence, lowest first: defaults, the config file, ``DEPLOYERD_*`` variables, explicit overrides."""
    path = path or Path(os.environ.get("DEPLOYERD_CONFIG", DEFAULT_CONFIG_PATH))
    data: dict[str, Any] = {}
    if path.exists():
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: the config file must be a mapping of settings")
        data.update(loaded)
    from_env = Settings()
    data.update({k: getattr(from_env, k) for k in from_env.model_fields_set})
    data.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**data)
