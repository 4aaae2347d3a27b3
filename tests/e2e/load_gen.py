"""A bounded HTTP load generator: a fixed rate to one address, stopped by a count and a time limit.

Lean on purpose (raw asyncio streams, HTTP/1.1 keep-alive, one request in flight), so the latency it reports
is the server's and the network's rather than an HTTP library's: the proxy's added latency is a difference
of two such runs. A request fails on a refused or reset connection, a timeout or a non-2xx status; a failed
connection is opened again before the next request. Only the sandbox's own hosts are ever targets.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

MAX_REQUESTS = 100_000
MAX_SECONDS = 600.0


@dataclass
class Sample:
    at: float  # monotonic send time
    latency_s: float
    ok: bool
    status: int = 0
    upstream: str = ""  # the proxy's X-Deployerd-Upstream header, if any
    error: str = ""


@dataclass
class LoadResult:
    samples: list[Sample] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(not s.ok for s in self.samples)

    def longest_gap_s(self) -> float:
        """The longest time without a successful answer: between two successes, or from the first request."""
        if not self.samples:
            return 0.0
        last = self.samples[0].at
        gap = 0.0
        for s in self.samples:
            if s.ok:
                gap = max(gap, s.at - last)
                last = s.at
        return round(max(gap, self.samples[-1].at - last), 3)

    def percentile_ms(self, p: float) -> float:
        xs = sorted(s.latency_s for s in self.samples if s.ok)
        if not xs:
            return float("nan")
        return round(1000 * xs[min(len(xs) - 1, int(p / 100 * len(xs)))], 3)

    def upstreams(self) -> list[str]:
        """The upstreams that answered, in the order they first did."""
        seen: list[str] = []
        for s in self.samples:
            if s.ok and s.upstream not in seen:
                seen.append(s.upstream)
        return seen

    def summary(self) -> str:
        return (f"{len(self.samples)} requests, {self.failed} failed, longest gap {self.longest_gap_s():.3f} s, "
                f"p50 {self.percentile_ms(50):.3f} ms, p99 {self.percentile_ms(99):.3f} ms")


class _Client:
    def __init__(self, host: str, port: int, path: str, timeout: float, keepalive: bool) -> None:
        self.host, self.port, self.timeout, self.keepalive = host, port, timeout, keepalive
        close = "" if keepalive else "Connection: close\r\n"
        self.request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: deployerd-bench\r\n"
                        f"{close}\r\n").encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None

    async def get(self) -> tuple[int, str]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(self.request)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        await self.reader.readexactly(int(headers.get("content-length", "0")))
        if not self.keepalive or headers.get("connection", "").lower() == "close":
            await self.close()
        return status, headers.get("x-deployerd-upstream", "")


async def run_load(
    host: str, port: int, *, rate: float = 50.0, seconds: float = 10.0, path: str = "/",
    stop: asyncio.Event | None = None, timeout: float = 5.0, max_requests: int = MAX_REQUESTS,
    keepalive: bool = True,
) -> LoadResult:
    """``rate`` requests/s to ``host:port`` for ``seconds`` (or until ``stop`` is set), bounded by
    ``max_requests`` and MAX_SECONDS whatever the caller asks."""
    result = LoadResult()
    client = _Client(host, port, path, timeout, keepalive)
    start = time.monotonic()
    end = start + min(seconds, MAX_SECONDS)
    n = 0
    try:
        while n < min(max_requests, MAX_REQUESTS) and time.monotonic() < end and not (stop and stop.is_set()):
            due = start + n / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            n += 1
            t0 = time.monotonic()
            try:
                status, upstream = await asyncio.wait_for(client.get(), timeout)
                result.samples.append(Sample(t0, time.monotonic() - t0, 200 <= status < 300, status, upstream))
            except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
                await client.close()
                result.samples.append(Sample(t0, time.monotonic() - t0, False, error=type(e).__name__))
    finally:
        await client.close()
    return result
