"""Each destination's HTTP request for a notice, as data (method, URL, headers, body). Pure: the secrets are
passed in, read from their files by the caller at each delivery.

The commit status requests follow each service's documented REST API:
- GitHub: ``POST {api}/repos/{owner}/{repo}/statuses/{sha}``, ``Authorization: Bearer``, ``Accept:
  application/vnd.github+json``, ``X-GitHub-Api-Version: 2022-11-28``; body ``state`` (pending, success,
  failure, error), ``target_url``, ``description``, ``context``.
- Gitea: ``POST {url}/api/v1/repos/{owner}/{repo}/statuses/{sha}``, ``Authorization: token``; body
  CreateStatusOption: ``state`` (pending, success, error, failure, warning), ``target_url``, ``description``,
  ``context``.
- GitLab: ``POST {url}/api/v4/projects/{id or url-encoded path}/statuses/{sha}``, ``PRIVATE-TOKEN``; body
  ``state`` (pending, running, success, failed, canceled), ``name`` (the context), ``target_url``,
  ``description``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass, field
from urllib.parse import quote

from deployerd.config import CommitStatusDestination, Destination, SlackDestination, WebhookDestination
from deployerd.notify.outcomes import Notice, Outcome

SIGNATURE_HEADER = "X-Deployerd-Signature-256"
DESCRIPTION_MAX = 140  # GitHub truncates longer descriptions; GitLab and Gitea take as much
GITLAB_STATES = {Outcome.PENDING: "pending", Outcome.SUCCESS: "success", Outcome.FAILURE: "failed"}


@dataclass(frozen=True)
class Request:
    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def sign(secret: str, body: bytes) -> str:
    """The generic webhook's signature header value: ``sha256=`` and the hex HMAC-SHA256 of the raw body (as
    GitHub signs its webhooks, so receivers can reuse their checks)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def title(n: Notice) -> str:
    """One human line: what happened to which service."""
    if n.outcome is Outcome.PENDING:
        word = "deploying"
    elif n.outcome is Outcome.SUCCESS:
        word = "recovered" if n.recovered else "deployed"
    else:
        word = "still failing" if n.reminder else "failed"
    return f"{n.service} {word}: {n.summary}"


def _json(payload: object) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def build(dest: Destination, n: Notice, url: str | None = None, secret: str | None = None) -> Request | None:
    """The request for ``dest``; ``url`` and ``secret`` are the contents of its files (the webhook URL, the
    signing secret or the API token). None: this destination has nothing to say (a status needs a commit)."""
    if isinstance(dest, WebhookDestination):
        assert url and secret
        body = _json({
            "event": "deploy", "service": n.service, "outcome": n.outcome.value, "release": n.release,
            "commit": n.commit, "host": n.host, "job_id": n.job_id, "summary": n.summary, "text": title(n),
            "recovered": n.recovered, "reminder": n.reminder, "at": n.at,
        })
        return Request("POST", url, {"Content-Type": "application/json", SIGNATURE_HEADER: sign(secret, body),
                                     "X-Deployerd-Event": "deploy", "X-Deployerd-Delivery": str(uuid.uuid4())}, body)
    if isinstance(dest, SlackDestination):
        assert url
        return Request("POST", url, {"Content-Type": "application/json"}, _json({"text": title(n)}))
    return _commit_status(dest, n, secret)


def _commit_status(dest: CommitStatusDestination, n: Notice, token: str | None) -> Request | None:
    if not n.commit:
        return None  # a deploy of no commit (POST /deploy), or a quarantine told without one
    assert token
    base = dest.api_url.rstrip("/")
    description = title(n)[:DESCRIPTION_MAX]
    target = dest.target_url.replace("{service}", n.service) if dest.target_url else None
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if dest.kind == "gitlab":
        url = f"{base}/api/v4/projects/{quote(dest.repo, safe='')}/statuses/{n.commit}"
        payload: dict[str, str] = {"state": GITLAB_STATES[n.outcome], "name": n.context, "description": description}
        headers["PRIVATE-TOKEN"] = token
    else:
        owner, _, name = dest.repo.partition("/")
        path = f"/repos/{quote(owner, safe='')}/{quote(name, safe='')}/statuses/{n.commit}"
        payload = {"state": n.outcome.value, "context": n.context, "description": description}
        if dest.kind == "github":
            url = base + path
            headers.update({"Accept": "application/vnd.github+json", "Authorization": f"Bearer {token}",
                            "X-GitHub-Api-Version": "2022-11-28"})
        else:
            url = f"{base}/api/v1{path}"
            headers["Authorization"] = f"token {token}"
    if target:
        payload["target_url"] = target
    return Request("POST", url, headers, _json(payload))
