"""verify_webhook: signatures per provider, refusals as data, real-shaped push bodies."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from deployerd.webhook import WebhookError, WebhookEvent, WebhookPush, verify_webhook

SECRET = "It's a Secret to Everybody"
AFTER = "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c"

# Trimmed but real-shaped push payloads (field names and nesting as each provider sends them).
GITHUB_PUSH = {
    "ref": "refs/heads/main",
    "before": "6113728f27ae82c7b1a177c8d03f9e96e0adf246",
    "after": AFTER,
    "repository": {"id": 1296269, "full_name": "octocat/Hello-World", "default_branch": "main"},
    "pusher": {"name": "octocat", "email": "octocat@github.com"},
    "created": False,
    "deleted": False,
    "forced": False,
    "head_commit": {"id": AFTER, "message": "Update web.yaml", "added": [], "modified": ["services/web.yaml"]},
    "commits": [{"id": AFTER, "message": "Update web.yaml"}],
}
GITEA_PUSH = {
    "ref": "refs/heads/deploy",
    "before": "28e1879d029cb852e4844d9c718537df08844e03",
    "after": "BC7F3C6B5E8F1A0D2C4E6F8A0B2C4D6E8F0A1B3C",
    "compare_url": "http://localhost:3000/gitea/webhooks/compare/28e1879d029cb852e4844d9c718537df08844e03...bc7f3c",
    "commits": [{"id": "bc7f3c6b5e8f1a0d2c4e6f8a0b2c4d6e8f0a1b3c", "message": "bump\n"}],
    "repository": {"id": 140, "full_name": "gitea/webhooks", "default_branch": "main"},
    "pusher": {"login": "gitea"},
    "sender": {"login": "gitea"},
}
GITLAB_PUSH = {
    "object_kind": "push",
    "event_name": "push",
    "before": "95790bf891e76fee5e1747ab589903a6a1f80f22",
    "after": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
    "ref": "refs/heads/master",
    "ref_protected": True,
    "checkout_sha": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
    "user_username": "jsmith",
    "project_id": 15,
    "project": {"id": 15, "path_with_namespace": "mike/diaspora", "default_branch": "master"},
    "commits": [{"id": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7", "message": "fixed readme"}],
    "total_commits_count": 1,
}


def body_of(payload: object) -> bytes:
    return json.dumps(payload).encode()


def sig(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def github(body: bytes, secret: str = SECRET) -> dict[str, str]:
    return {"X-GitHub-Event": "push", "X-Hub-Signature-256": f"sha256={sig(body, secret)}"}


def gitea(body: bytes, secret: str = SECRET) -> dict[str, str]:
    # Gitea sends its own signature and GitHub's header too.
    return {
        "X-Gitea-Event": "push",
        "X-Gitea-Signature": sig(body, secret),
        "X-Hub-Signature-256": f"sha256={sig(body, secret)}",
    }


def gitlab(_body: bytes, secret: str = SECRET) -> dict[str, str]:
    return {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": secret}


def refused(headers: dict[str, str], body: bytes, secret: str = SECRET, **kw: int) -> WebhookError:
    with pytest.raises(WebhookError) as info:
        verify_webhook(headers, body, secret, **kw)
    return info.value


def test_github_sample_accepted() -> None:
    body = body_of(GITHUB_PUSH)
    push = verify_webhook(github(body), body, SECRET)
    assert push == WebhookPush(provider="github", ref="refs/heads/main", branch="main", after=AFTER)
    assert not push.deleted


def test_github_known_vector() -> None:
    # The example from GitHub's "Validating webhook deliveries" documentation.
    expected = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    assert sig(b"Hello, World!") == expected
    body = b"Hello, World!"
    err = refused({"X-Hub-Signature-256": f"sha256={expected}"}, body)
    assert err.status_code == 400  # authentic, but not a push body


def test_gitea_sample_accepted_and_identified() -> None:
    body = body_of(GITEA_PUSH)
    push = verify_webhook(gitea(body), body, SECRET)
    assert (push.provider, push.branch, push.after) == ("gitea", "deploy", GITEA_PUSH["after"].lower())


def test_gitlab_sample_accepted() -> None:
    body = body_of(GITLAB_PUSH)
    push = verify_webhook(gitlab(body), body, SECRET)
    assert (push.provider, push.ref, push.branch, push.after) == (
        "gitlab",
        "refs/heads/master",
        "master",
        GITLAB_PUSH["after"],
    )


def test_header_names_are_case_insensitive() -> None:
    body = body_of(GITHUB_PUSH)
    headers = {"x-hub-signature-256": f"SHA256={sig(body).upper()}"}
    assert verify_webhook(headers, body, SECRET).provider == "github"
    assert verify_webhook({"X-GITLAB-TOKEN": SECRET}, body, SECRET).provider == "gitlab"


@pytest.mark.parametrize("make", [github, gitea, gitlab])
def test_wrong_secret_refused(make) -> None:  # type: ignore[no-untyped-def]
    body = body_of(GITHUB_PUSH)
    assert refused(make(body, "not-the-secret"), body).status_code == 401


@pytest.mark.parametrize("make", [github, gitea])
def test_tampered_body_refused(make) -> None:  # type: ignore[no-untyped-def]
    body = body_of(GITHUB_PUSH)
    headers = make(body)
    tampered = body.replace(b"refs/heads/main", b"refs/heads/evil")
    assert refused(headers, tampered).status_code == 401


def test_missing_signature_refused() -> None:
    body = body_of(GITHUB_PUSH)
    err = refused({"X-GitHub-Event": "push", "Content-Type": "application/json"}, body)
    assert (err.status_code, err.reason) == (401, "missing signature")


def test_malformed_signatures_refused() -> None:
    body = body_of(GITHUB_PUSH)
    for headers in (
        {"X-Hub-Signature-256": sig(body)},  # no sha256= prefix
        {"X-Hub-Signature-256": f"sha1={sig(body)}"},
        {"X-Hub-Signature-256": "sha256="},
        {"X-Gitea-Signature": "zz\u00e9"},
        {"X-Gitlab-Token": ""},
    ):
        assert refused(headers, body).status_code == 401, headers


def test_gitea_header_wins_over_a_valid_github_header() -> None:
    # A forged X-Gitea-Signature cannot be rescued by a correct GitHub one: the first header found decides.
    body = body_of(GITEA_PUSH)
    headers = {"X-Gitea-Signature": "0" * 64, "X-Hub-Signature-256": f"sha256={sig(body)}"}
    assert refused(headers, body).status_code == 401


def test_empty_secret_refuses_everything() -> None:
    body = body_of(GITHUB_PUSH)
    assert refused(github(body, ""), body, secret="").status_code == 401
    assert refused({"X-Gitlab-Token": ""}, body, secret="").status_code == 401


def test_oversized_body_refused_before_verification() -> None:
    body = body_of({**GITHUB_PUSH, "padding": "x" * 2048})
    err = refused(github(body), body, max_bytes=1024)
    assert err.status_code == 413
    assert refused({}, body, max_bytes=1024).status_code == 413
    assert verify_webhook(github(body), body, SECRET, max_bytes=len(body)).branch == "main"


@pytest.mark.parametrize(
    "body",
    [
        b"payload=%7B%22ref%22%3A%22refs%2Fheads%2Fmain%22%7D",  # GitHub's form-encoded content type
        b"\xff\xfe not utf-8",
        b"[1, 2]",
        body_of({"zen": "Keep it logically awesome.", "hook_id": 1}),  # GitHub ping: no ref
        body_of({"ref": "refs/heads/main"}),
        body_of({"ref": "refs/heads/main", "after": "not-a-sha"}),
        body_of({"ref": 5, "after": AFTER}),
    ],
)
def test_bad_bodies_are_400(body: bytes) -> None:
    assert refused(github(body), body).status_code == 400


def test_tag_push_has_no_branch_and_delete_is_flagged() -> None:
    body = body_of({**GITHUB_PUSH, "ref": "refs/tags/v1.0"})
    push = verify_webhook(github(body), body, SECRET)
    assert push.branch is None and push.ref == "refs/tags/v1.0"
    body = body_of({**GITHUB_PUSH, "after": "0" * 40, "deleted": True})
    assert verify_webhook(github(body), body, SECRET).deleted


def test_error_never_echoes_the_secret() -> None:
    body = body_of(GITHUB_PUSH)
    err = refused({"X-Gitlab-Token": "guess"}, body)
    assert SECRET not in str(err) and "guess" not in str(err)


def test_github_ping_is_an_event_not_a_push() -> None:
    body = body_of({"zen": "Keep it logically awesome.", "hook_id": 1})
    event = verify_webhook({**github(body), "X-GitHub-Event": "ping"}, body, SECRET)
    assert event == WebhookEvent(provider="github", event="ping")
    with pytest.raises(WebhookError) as e:  # still authenticated first
        verify_webhook({**github(body, "other"), "X-GitHub-Event": "ping"}, body, SECRET)
    assert e.value.status_code == 401
