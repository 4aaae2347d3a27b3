"""Push-webhook verification: is this request really from our git host, and which branch moved?

Pure (no I/O) so the HTTP route stays thin and every refusal is testable as data. Checks run cheapest
and safest first: size (413) before any hashing, signature (401) before any parsing, so an
unauthenticated sender never reaches the JSON parser. Comparisons are constant-time.

Providers, told apart by their signature header (Gitea also sends GitHub's header, so it is checked first):
  Gitea/Forgejo/Gogs  X-Gitea-Signature / X-Gogs-Signature: <hex HMAC-SHA256 of the body>
  GitHub              X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>
  GitLab              X-Gitlab-Token: <the shared secret itself>
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel

Provider = Literal["github", "gitea", "gitlab"]

_HEX = re.compile(r"^[0-9a-f]+$")
_ZERO_SHA = re.compile(r"^0+$")


class WebhookError(Exception):
    """A refused webhook; ``status_code`` is the HTTP status to answer, ``reason`` is safe to show."""

    def __init__(self, status_code: int, reason: str) -> None:
        super().__init__(f"{status_code}: {reason}")
        self.status_code = status_code
        self.reason = reason


class WebhookPush(BaseModel):
    """A verified push: ``branch`` is None when ``ref`` is not a branch (a tag push)."""

    provider: Provider
    ref: str
    branch: str | None
    after: str

    @property
    def deleted(self) -> bool:
        """The push deleted the ref (``after`` is the all-zero sha)."""
        return bool(_ZERO_SHA.match(self.after))


class WebhookEvent(BaseModel):
    """A verified event that is not a push (GitHub's ``ping`` when a webhook is added, or any other event the
    hook was set to send): answered 200 so the git host shows the hook as working, and nothing is fetched."""

    provider: Provider
    event: str


# the event header each provider sends, and its name for a push
_EVENT_HEADERS = {"x-gitea-event": "push", "x-gogs-event": "push", "x-github-event": "push",
                  "x-gitlab-event": "push hook"}


def _hmac_hex(secret: str, body: bytes) -> bytes:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest().encode()


def _same(expected: bytes, given: str) -> bool:
    return hmac.compare_digest(expected, given.strip().lower().encode("utf-8", "replace"))


def _authenticate(headers: Mapping[str, str], body: bytes, secret: str) -> Provider:
    for name in ("x-gitea-signature", "x-gogs-signature"):
        if name in headers:
            if _same(_hmac_hex(secret, body), headers[name]):
                return "gitea"
            raise WebhookError(401, "signature mismatch")
    if "x-hub-signature-256" in headers:
        algo, _, digest = headers["x-hub-signature-256"].strip().partition("=")
        if algo.lower() == "sha256" and _same(_hmac_hex(secret, body), digest):
            return "github"
        raise WebhookError(401, "signature mismatch")
    if "x-gitlab-token" in headers:
        if hmac.compare_digest(secret.encode(), headers["x-gitlab-token"].encode("utf-8", "replace")):
            return "gitlab"
        raise WebhookError(401, "token mismatch")
    raise WebhookError(401, "missing signature")


def verify_webhook(
    headers: Mapping[str, str], body: bytes, secret: str, max_bytes: int = 1 << 20
) -> WebhookPush | WebhookEvent:
    """Verify a webhook and return what moved (or, for an event that is not a push, which event it was);
    raise `WebhookError` (413, 401 or 400) otherwise."""
    if len(body) > max_bytes:
        raise WebhookError(413, f"body larger than {max_bytes} bytes")
    if not secret:
        # An empty HMAC key is forgeable by anyone: refuse rather than accept everything.
        raise WebhookError(401, "webhook secret is not configured")
    lowered = {k.lower(): v for k, v in headers.items()}
    provider = _authenticate(lowered, body, secret)
    for header, push in _EVENT_HEADERS.items():
        event = lowered.get(header, "").strip()
        if event and event.lower() != push:
            return WebhookEvent(provider=provider, event=event[:64])

    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise WebhookError(400, "body is not JSON (set the webhook content type to application/json)") from None
    if not isinstance(payload, dict):
        raise WebhookError(400, "body is not a JSON object")
    ref, after = payload.get("ref"), payload.get("after")
    if not isinstance(ref, str) or not ref:
        raise WebhookError(400, "missing ref (not a push event?)")
    if not isinstance(after, str) or not _HEX.match(after.lower()):
        raise WebhookError(400, "missing or malformed 'after' commit")
    branch = ref.removeprefix("refs/heads/") if ref.startswith("refs/heads/") else None
    return WebhookPush(provider=provider, ref=ref, branch=branch or None, after=after.lower())


__all__ = ["Provider", "WebhookError", "WebhookEvent", "WebhookPush", "verify_webhook"]
