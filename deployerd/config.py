"""Daemon configuration: a YAML file plus ``DEPLOYERD_*`` environment variables (the environment wins).

Secrets (API token, webhook secret, Registry token, the services' secret values and the age identity) are read
from files named here, never taken from the command line, so they stay out of ``ps`` output and shell history.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_CONFIG_PATH = Path("/etc/deployerd/config.yaml")


class _Destination(BaseModel):
    """Where notifications go. URLs and tokens are read from files (0600) at each delivery, never from here:
    the config file may be world-readable, and a rotated token needs no restart."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$", description="its label in logs and /metrics")
    reminder_s: float = Field(default=3600.0, gt=0, description="repeat a failure that persists this often")


class WebhookDestination(_Destination):
    """A generic webhook: the event as JSON, signed with HMAC-SHA256 of the body in X-Deployerd-Signature-256."""

    kind: Literal["webhook"]
    url_file: Path
    secret_file: Path


class SlackDestination(_Destination):
    """A Slack-compatible incoming webhook (Mattermost, Rocket.Chat take the same ``{"text": ...}``)."""

    kind: Literal["slack"]
    url_file: Path


class CommitStatusDestination(_Destination):
    """Commit status, one context per service (``deployerd/<service>``): GitHub, Gitea or GitLab."""

    kind: Literal["github", "gitea", "gitlab"]
    api_url: str = Field(description="https://api.github.com, https://gitea.example.com, https://gitlab.com")
    repo: str = Field(min_length=1, description="owner/name (GitHub, Gitea) or the project's id or path (GitLab)")
    token_file: Path
    target_url: str | None = Field(default=None, description="linked from the status; {service} is replaced")

    @field_validator("repo")
    @classmethod
    def _owner_name(cls, v: str, info: Any) -> str:
        if info.data.get("kind") in ("github", "gitea") and (v.count("/") != 1 or "" in v.split("/")):
            raise ValueError(f"repo {v!r}: give owner/name")
        return v


Destination = Annotated[
    WebhookDestination | SlackDestination | CommitStatusDestination, Field(discriminator="kind")
]


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
    heal_on_events: bool = Field(
        default=True, description="watch each host's Docker and systemd events and heal a service stopped or "
                                  "removed by hand at once (false: only the resync heals drift)",
    )
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
        default=None,
        description="POST /deploy may only deploy directories under this one (default state_dir/api-sources)",
    )
    secrets_file: Path | None = Field(
        default=None, description="values of the manifests' `secrets` on this machine (YAML, see deployerd.secrets)"
    )
    age_identity_file: Path | None = Field(
        default=None, description="age identity that decrypts secrets/<service>.env.age in the repository"
    )
    notifications: list[Destination] = Field(
        default_factory=list, description="webhooks, chat and commit status told of deploy outcomes"
    )
    api_token_name: str = Field(
        default="api-token", max_length=64, description="who the audit trail names for jobs the API token started"
    )

    @field_validator("api_token_file", "webhook_secret_file", "registry_token_file", "secrets_file",
                     "age_identity_file", mode="before")
    @classmethod
    def _empty_is_none(cls, v: Any) -> Any:
        return None if v in ("", None) else v

    @field_validator("notifications")
    @classmethod
    def _unique_names(cls, v: list[Any]) -> list[Any]:
        names = [d.name for d in v]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"notifications: destination names must be unique: {', '.join(dupes)}")
        return v

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
    def audit_path(self) -> Path:
        return self.state_dir / "audit.jsonl"

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


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the file or setting and what to do."""


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
