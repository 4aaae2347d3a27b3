"""A real HTTP receiver on loopback for the notification tests. It is a RECEIVER, NOT the real GitHub, Gitea,
GitLab or Slack: it checks that each request has the shape each service's REST API documents (method, path,
headers, body fields and values) and answers 201 when it does, 422 with the reasons when it does not.

Documented shapes checked (what deployerd.notify.render builds):
- GitHub "Create a commit status": POST /repos/{owner}/{repo}/statuses/{sha}; Authorization: Bearer <token>;
  Accept: application/vnd.github+json; X-GitHub-Api-Version: 2022-11-28; JSON body: state (error, failure,
  pending, success) required, target_url, description, context optional.
- Gitea "Create a commit status": POST /api/v1/repos/{owner}/{repo}/statuses/{sha}; Authorization: token
  <token>; JSON CreateStatusOption: state (pending, success, error, failure, warning), target_url, description,
  context.
- GitLab "Set the pipeline status of a commit": POST /api/v4/projects/{id or url-encoded path}/statuses/{sha};
  PRIVATE-TOKEN: <token>; state (pending, running, success, failed, canceled) required, name, target_url,
  description.
- Slack incoming webhook: POST to the webhook URL, Content-Type: application/json, body {"text": ...}.
- deployerd's generic webhook: POST, JSON, X-Deployerd-Signature-256: sha256=<HMAC-SHA256 of the body>.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

SHA = r"[0-9a-f]{40}"


@dataclass
class Received:
    api: str
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    problems: list[str]

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    tokens: dict[str, str]  # api -> the token (or signing secret) it expects
    received: list[Received] = field(default_factory=list)
    status_override: dict[str, int] = field(default_factory=dict)  # path prefix -> status to answer instead
    hold: dict[str, threading.Event] = field(default_factory=dict)  # path prefix -> wait for it before answering
    port: int = 0

    def of(self, api: str) -> list[Received]:
        return [r for r in self.received if r.api == api]

    def check(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[str, list[str]]:
        p: list[str] = []
        h = {k.lower(): v for k, v in headers.items()}
        if method != "POST":
            p.append(f"method {method}, want POST")
        if "json" not in h.get("content-type", ""):
            p.append("Content-Type is not JSON")
        try:
            data = json.loads(body)
        except ValueError:
            return "?", [*p, "body is not JSON"]
        if m := re.fullmatch(rf"/gh/repos/([^/]+)/([^/]+)/statuses/({SHA})", path):
            api = "github"
            if h.get("authorization") != f"Bearer {self.tokens['github']}":
                p.append("Authorization is not 'Bearer <token>'")
            if h.get("accept") != "application/vnd.github+json":
                p.append("Accept is not application/vnd.github+json")
            if h.get("x-github-api-version") != "2022-11-28":
                p.append("X-GitHub-Api-Version missing")
            p += _fields(data, {"state", "target_url", "description", "context"}, "state",
                         {"error", "failure", "pending", "success"})
        elif m := re.fullmatch(rf"/gitea/api/v1/repos/([^/]+)/([^/]+)/statuses/({SHA})", path):
            api = "gitea"
            if h.get("authorization") != f"token {self.tokens['gitea']}":
                p.append("Authorization is not 'token <token>'")
            p += _fields(data, {"state", "target_url", "description", "context"}, "state",
                         {"pending", "success", "error", "failure", "warning"})
        elif m := re.fullmatch(rf"/gl/api/v4/projects/([^/]+)/statuses/({SHA})", path):
            api = "gitlab"
            if "/" in m.group(1) or not unquote(m.group(1)):
                p.append("project id is not an id or a url-encoded path")
            if h.get("private-token") != self.tokens["gitlab"]:
                p.append("PRIVATE-TOKEN missing or wrong")
            p += _fields(data, {"state", "ref", "name", "context", "target_url", "description", "coverage",
                                "pipeline_id"}, "state", {"pending", "running", "success", "failed", "canceled"})
        elif path.startswith("/slack/"):
            api = "slack"
            if not isinstance(data.get("text"), str) or not data["text"]:
                p.append("no text")
        elif path.startswith("/hook"):
            api = "webhook"
            want = "sha256=" + hmac.new(self.tokens["webhook"].encode(), body, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(h.get("x-deployerd-signature-256", ""), want):
                p.append("bad signature")
        else:
            api = "?"
            p.append(f"unknown path {path}")
        return api, p


def _fields(data: Any, allowed: set[str], required: str, states: set[str]) -> list[str]:
    if not isinstance(data, dict):
        return ["body is not an object"]
    p = [f"unknown field {k}" for k in data if k not in allowed]
    if data.get(required) not in states:
        p.append(f"{required} {data.get(required)!r} not one of {sorted(states)}")
    p += [f"{k} is not a string" for k, v in data.items() if not isinstance(v, str)]
    return p


def serve(receiver: Receiver) -> ThreadingHTTPServer:
    """Start it on 127.0.0.1 (a free port, in ``receiver.port``) on a thread; the caller shuts it down."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the http.server API
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            api, problems = receiver.check("POST", self.path, dict(self.headers), body)
            receiver.received.append(Received(api, "POST", self.path, dict(self.headers), body, problems))
            for prefix, event in receiver.hold.items():
                if self.path.startswith(prefix):
                    event.wait(30)
            status = next((s for prefix, s in receiver.status_override.items() if self.path.startswith(prefix)),
                          422 if problems else 201)
            out = json.dumps({"problems": problems}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    receiver.port = server.server_address[1]
    threading.Thread(target=server.serve_forever, name="notify receiver", daemon=True).start()
    return server
