"""Client of a Registry that speaks the droplet contract (the original one or deployerd's embedded one).

Every failure leaves as :class:`RegistryError` with ``transient`` set, because the caller's next move
depends on it: a transient error (connection refused, timeout, 5xx, 429) is retried later; anything else
(a 4xx, a reply that breaks the contract) will fail the same way again. Messages name the Registry URL and
the operation, never the token.
"""

from __future__ import annotations

import asyncio
import builtins  # the class's own list() method shadows the name in its annotations
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from deployerd.observed import RegistryEntry

READ_ATTEMPTS = 2
READ_RETRY_S = 0.2


class RegistryError(Exception):
    """A Registry operation failed; ``transient`` says whether retrying later can help."""

    def __init__(self, message: str, *, transient: bool, status_code: int | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.status_code = status_code


class RegistryClient:
    """Async client for the Registry at ``base_url``; ``token`` is sent as a bearer token when set."""

    def __init__(
        self, base_url: str, token: str | None = None, timeout: float = 10.0,
        *, transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def list(self) -> dict[str, RegistryEntry]:
        """Every droplet, by name."""
        body = await self._request("list droplets", "GET", "/droplets")
        entries = self._parse_many(body.get("droplets"), "list droplets")
        return {e.name: e for e in entries}

    async def get_by_name(self, name: str) -> RegistryEntry | None:
        """The droplet named ``name``, or None when the Registry has none."""
        op = f"get droplet {name!r}"
        body = await self._request(op, "GET", f"/droplets/name/{quote(name, safe='')}", absent_ok=True)
        return None if body is None else self._parse(body.get("droplet"), op)

    async def register(
        self, name: str, endpoint: str, metadata: dict[str, Any], droplet_id: int | None = None
    ) -> RegistryEntry:
        """Create or update ``name`` by the contract's flow (POST; on 409 GET by name + PATCH), then confirm.

        Confirmation re-reads the record, so a Registry that answered 2xx without storing the change is caught.
        """
        op = f"register {name!r}"
        payload: dict[str, Any] = {"name": name, "endpoint": endpoint, "metadata": metadata}
        if droplet_id:
            payload["id"] = droplet_id
        created = await self._request(op, "POST", "/droplets", json=payload, conflict_ok=True)
        if created is not None:
            entry = self._parse(created.get("droplet"), op)
        else:
            existing = await self.get_by_name(name)
            if existing is None:  # deleted between our POST and GET: someone else is writing too
                raise RegistryError(f"Registry {self.base_url}: {op}: 409 on create, then not found", transient=True)
            patch = {"endpoint": endpoint, "status": "active", "metadata": metadata}
            body = await self._request(op, "PATCH", f"/droplets/{existing.id}", json=patch)
            entry = self._parse(body.get("droplet"), op)
        confirmed = await self._request(f"confirm {op}", "GET", f"/droplets/{entry.id}", absent_ok=True)
        got = None if confirmed is None else self._parse(confirmed.get("droplet"), f"confirm {op}")
        want = (name, endpoint, "active", metadata)
        if got is None or (got.name, got.endpoint, got.status, got.metadata) != want:
            raise RegistryError(
                f"Registry {self.base_url}: {op}: the stored record does not match what was written", transient=False
            )
        return got

    async def deregister(self, name: str) -> bool:
        """Remove ``name``; False if the Registry had no such droplet (already gone is not an error)."""
        entry = await self.get_by_name(name)
        if entry is None:
            return False
        body = await self._request(f"deregister {name!r}", "DELETE", f"/droplets/{entry.id}", absent_ok=True)
        return body is not None

    # -- plumbing --

    async def _request(
        self, op: str, method: str, path: str, *, json: Any = None, absent_ok: bool = False, conflict_ok: bool = False,
    ) -> Any:
        """The JSON body; None for a 404 (``absent_ok``) or a 409 (``conflict_ok``); RegistryError otherwise."""
        where = f"Registry {self.base_url}: {op}"
        # A read is asked twice before it counts as failed: a kept-alive connection that the server closed as it
        # was reused ("Server disconnected without sending a response") or one 5xx must not make the Registry
        # look down until the next reconcile. Writes are retried by the phase runner, which knows their effect.
        attempts = READ_ATTEMPTS if method == "GET" else 1
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                resp = await self._http.request(method, path, json=json)
            except httpx.TimeoutException as exc:
                raise RegistryError(f"{where}: timed out ({type(exc).__name__})", transient=True) from None
            except httpx.TransportError as exc:
                if not last:
                    await asyncio.sleep(READ_RETRY_S)
                    continue
                raise RegistryError(self._redact(f"{where}: unreachable ({type(exc).__name__}: {exc})"),
                                    transient=True) from None
            if resp.status_code >= 500 and not last:
                await asyncio.sleep(READ_RETRY_S)
                continue
            break
        code = resp.status_code
        if (code == 404 and absent_ok) or (code == 409 and conflict_ok):
            return None
        if code >= 400:
            reason = "unauthorized: check the Registry token" if code in (401, 403) else _detail(resp)
            raise RegistryError(self._redact(f"{where}: HTTP {code}: {reason}"),
                                transient=code >= 500 or code == 429, status_code=code)
        try:
            return resp.json()
        except ValueError:
            raise RegistryError(f"{where}: HTTP {code} with a body that is not JSON", transient=False,
                                status_code=code) from None

    def _parse(self, data: Any, op: str) -> RegistryEntry:
        return self._parse_many([data], op)[0]

    def _parse_many(self, data: Any, op: str) -> builtins.list[RegistryEntry]:
        try:
            return [RegistryEntry.model_validate(d) for d in (data or [])]
        except (ValidationError, TypeError) as exc:
            raise RegistryError(f"Registry {self.base_url}: {op}: reply breaks the contract: "
                                f"{exc.__class__.__name__}", transient=False) from None

    def _redact(self, message: str) -> str:
        """Belt and braces: a message quoting a reply must never carry the token."""
        return message.replace(self._token, "***") if self._token else message


def _detail(resp: httpx.Response) -> str:
    try:
        detail = resp.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    text = detail if detail is not None else resp.text
    return str(text)[:300]
