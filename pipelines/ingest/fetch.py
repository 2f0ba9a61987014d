"""A polite, safe asynchronous HTTP fetcher shared by the image and text crawls.

Polite: an honest user agent; robots.txt fetched once per origin, cached and obeyed (protego,
RFC 9309), its Crawl-delay honoured; `X-Robots-Tag` opt-outs obeyed before the body is read; a
per-host concurrency limit and request rate; retries with exponential backoff and jitter on
timeouts, connection errors, 5xx and 429, honouring `Retry-After`.

Safe: http/https only; a hard deadline per attempt; a byte cap enforced while streaming; at most N
redirects, each hop re-checked (scheme, robots, address); names resolving to private, loopback or
link-local addresses refused at connection time (so DNS rebinding cannot slip through) unless
`allow_private_network` is set.

Limits apply per Fetcher, i.e. per shard task: with K shard tasks running at once, a host sees
at most K x per_host_concurrency connections.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver
from protego import Protego
from pydantic import Field

from pipelines import __version__
from pipelines.config import ConfigModel

USER_AGENT_TOKEN = "pipelines-crawler"
DEFAULT_USER_AGENT = (f"{USER_AGENT_TOKEN}/{__version__} (research dataset crawler; "
                      "obeys robots.txt and X-Robots-Tag noai/noimageai)")
REDIRECT_CODES = {301, 302, 303, 307, 308}
ROBOTS_TTL_S = 24 * 3600
# robots.txt rules per (origin, user agent), kept across the shard tasks a worker process runs.
_ROBOTS_CACHE: dict[tuple[str, str], tuple[float, Any]] = {}


class FetchConfig(ConfigModel):
    user_agent: str = Field(DEFAULT_USER_AGENT, description="User-Agent header; robots.txt rules are matched on it.")
    timeout: float = Field(10.0, gt=0, description="Hard deadline in seconds for one attempt, redirects included.")
    max_bytes: int = Field(16 * 2**20, gt=0, description="Largest body accepted; longer downloads are aborted.")
    max_redirects: int = Field(5, ge=0, description="Redirects followed per request, each re-checked.")
    retries: int = Field(2, ge=0, description="Extra attempts after a transient failure (timeout, 5xx, 429, reset).")
    backoff: float = Field(0.5, ge=0, description="Base of the exponential backoff in seconds (with jitter).")
    max_retry_after: float = Field(60.0, ge=0, description="Longest Retry-After honoured; a longer one fails the row.")
    concurrency: int = Field(64, gt=0, description="Concurrent requests per worker.")
    per_host_concurrency: int = Field(16, gt=0, description="Concurrent requests per host per worker.")
    per_host_rate: float | None = Field(None, gt=0, description="Requests per second per host per worker (none: unlimited).")
    respect_robots: bool = Field(True, description="Fetch and obey robots.txt.")
    respect_opt_out: bool = Field(True, description="Obey X-Robots-Tag opt-out directives.")
    opt_out_directives: list[str] = Field(["noai", "noimageai", "noindex", "noimageindex"],
                                          description="X-Robots-Tag directives that skip a URL.")
    allow_private_network: bool = Field(False, description=(
        "Allow URLs resolving to private, loopback or link-local addresses (tests, intranets)."))


# Fetch settings that change how fast or how hard a crawl runs, not which rows may become samples
# (robots, opt-out, byte cap and address rules do decide that, so they stay in config digests).
FETCH_RUN_OPTIONS = {"user_agent", "timeout", "retries", "backoff", "max_retry_after", "concurrency",
                     "per_host_concurrency", "per_host_rate"}


@dataclass
class FetchResult:
    status: str  # success or a failure status of the row
    url: str
    error_message: str | None = None
    http_status: int | None = None
    content_type: str | None = None
    final_url: str | None = None
    data: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    fetch_ms: float = 0.0
    retryable: bool = False  # a transient failure that a later `--retry-failed` run may fix


class BlockedAddress(OSError):
    """A host resolved to an address the crawl may not reach."""


def is_blocked_ip(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    # Not global covers private, loopback, link-local, reserved, unspecified and shared (100.64/10).
    return not addr.is_global or addr.is_multicast


class GuardedResolver(AbstractResolver):
    """aiohttp resolver refusing private addresses, checked on every connection (redirects included)."""

    def __init__(self) -> None:
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        infos = await self._inner.resolve(host, port, family)
        for info in infos:
            if is_blocked_ip(info["host"]):
                raise BlockedAddress(f"{host} resolves to non-public address {info['host']}")
        return infos

    async def close(self) -> None:
        await self._inner.close()


class HostRateLimiter:
    """Spaces requests to one host at least `interval` seconds apart (per process)."""

    def __init__(self) -> None:
        self._next: dict[str, float] = {}

    async def wait(self, host: str, interval: float) -> None:
        if interval <= 0:
            return
        now = time.monotonic()
        start = max(now, self._next.get(host, now))
        self._next[host] = start + interval
        if start > now:
            await asyncio.sleep(start - now)


class _Transient(Exception):
    def __init__(self, message: str, http_status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.http_status = http_status
        self.retry_after = retry_after


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def opt_out_directive(header_values: list[str], directives: list[str]) -> str | None:
    """The first opt-out directive of X-Robots-Tag values that applies to us, if any.

    A value may be scoped to a crawler (`otherbot: noindex`); scoped values apply only when the
    scope is our user-agent token or `*`.
    """
    wanted = {d.lower() for d in directives}
    for value in header_values:
        scope, sep, rest = value.partition(":")
        if sep and " " not in scope.strip() and scope.strip().lower() not in ("unavailable_after",):
            if scope.strip().lower() not in (USER_AGENT_TOKEN, "*"):
                continue
            value = rest
        for token in value.split(","):
            if token.strip().lower() in wanted:
                return token.strip().lower()
    return None


class Fetcher:
    """One aiohttp session per worker: connection reuse, robots cache and per-host limits shared."""

    def __init__(self, config: FetchConfig, accept: str = "*/*"):
        self.config = config
        self.accept = accept
        self._robots: dict[str, asyncio.Future] = {}
        self._rate = HostRateLimiter()
        self._host_slots: dict[str, asyncio.Semaphore] = {}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "Fetcher":
        c = self.config
        # The per-host limit is ours (`_host_slots`), so that waiting for a slot pauses the deadline.
        connector = aiohttp.TCPConnector(
            limit=c.concurrency, limit_per_host=0, ttl_dns_cache=300,
            resolver=None if c.allow_private_network else GuardedResolver())
        self._session = aiohttp.ClientSession(
            connector=connector, headers={"User-Agent": c.user_agent, "Accept": self.accept},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=c.timeout), max_field_size=16384)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._session is not None
        await self._session.close()

    # -- public ------------------------------------------------------------------------------
    async def fetch(self, url: str) -> FetchResult:
        """Fetch `url` with retries; never raises for a network or HTTP problem."""
        c = self.config
        start = time.perf_counter()
        attempt = 0
        while True:
            attempt += 1
            give_up = attempt > c.retries
            try:
                async with asyncio.timeout(c.timeout) as deadline:
                    result = await self._fetch_once(url, deadline)
            except _Transient as exc:
                failure = FetchResult("failed_to_download", url, str(exc), http_status=exc.http_status, retryable=True)
                delay = c.backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
                if exc.retry_after is not None:
                    if exc.retry_after > c.max_retry_after:
                        failure.error_message += f" (Retry-After {exc.retry_after:.0f}s exceeds max_retry_after)"
                        give_up = True  # still retryable by a later run
                    delay = max(delay, exc.retry_after)
            except TimeoutError:
                failure = FetchResult("failed_to_download", url, f"timeout after {c.timeout:g}s", retryable=True)
                delay = c.backoff * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
            else:
                result.fetch_ms = (time.perf_counter() - start) * 1000
                return result
            if give_up:
                failure.fetch_ms = (time.perf_counter() - start) * 1000
                if attempt > 1:
                    failure.error_message += f" (after {attempt} attempts)"
                return failure
            await asyncio.sleep(delay)

    # -- internals ---------------------------------------------------------------------------
    def _check_url(self, url: str) -> FetchResult | None:
        try:
            parts = urlsplit(url)
            host = parts.hostname
            _ = parts.port  # raises ValueError on a bad port
        except ValueError as exc:
            return FetchResult("invalid_url", url, f"unparseable URL: {exc}")
        if parts.scheme not in ("http", "https"):
            return FetchResult("invalid_url", url, f"scheme {parts.scheme!r} not allowed (http/https only)")
        if not host:
            return FetchResult("invalid_url", url, "URL has no host")
        if not self.config.allow_private_network:
            try:
                blocked = is_blocked_ip(host)
            except ValueError:
                blocked = False  # a name: checked by GuardedResolver when connecting
            if blocked:
                return FetchResult("skipped_private_network", url, f"non-public address {host}")
        return None

    async def _fetch_once(self, url: str, deadline: asyncio.Timeout) -> FetchResult:
        """One attempt, redirects included. Waiting for robots.txt, the host's rate limit or a free
        connection to the host is politeness, not network time: the deadline is paused meanwhile."""
        assert self._session is not None
        c = self.config
        seen = {url}
        for _ in range(c.max_redirects + 1):
            bad = self._check_url(url)
            if bad is not None:
                return bad
            parts = urlsplit(url)
            loop = asyncio.get_running_loop()
            when = deadline.when()
            remaining = None if when is None else when - loop.time()
            deadline.reschedule(None)
            delay = 0.0
            if c.respect_robots:
                robots = await self._robots_for(f"{parts.scheme}://{parts.netloc}")
                if isinstance(robots, str):  # robots.txt unreachable: a later run may succeed
                    return FetchResult("skipped_robots", url, robots, final_url=url, retryable=True)
                if robots is not None:
                    if not robots.can_fetch(url, USER_AGENT_TOKEN):
                        return FetchResult("skipped_robots", url, "disallowed by robots.txt", final_url=url)
                    delay = robots.crawl_delay(USER_AGENT_TOKEN) or 0.0
            if c.per_host_rate:
                delay = max(delay, 1.0 / c.per_host_rate)
            await self._rate.wait(parts.netloc, delay)
            slot = self._host_slots.setdefault(parts.netloc, asyncio.Semaphore(c.per_host_concurrency))
            async with slot:
                if remaining is not None:
                    deadline.reschedule(loop.time() + remaining)
                result = await self._request(url, seen)
            if isinstance(result, FetchResult):
                return result
            url = result  # the next hop of a redirect
        return FetchResult("failed_to_download", url, f"too many redirects (>{c.max_redirects})")

    async def _request(self, url: str, seen: set[str]) -> FetchResult | str:
        """GET one URL: its result, or the URL a redirect points to."""
        assert self._session is not None
        try:
            async with self._session.get(url, allow_redirects=False) as resp:
                if resp.status in REDIRECT_CODES:
                    location = resp.headers.get("Location")
                    if not location:
                        return FetchResult("failed_to_download", url, f"HTTP {resp.status} without Location",
                                           http_status=resp.status)
                    url = urljoin(str(resp.url), location)
                    if url in seen:
                        return FetchResult("failed_to_download", url, "redirect loop", http_status=resp.status)
                    seen.add(url)
                    return url
                return await self._read(resp, url)
        except aiohttp.ClientConnectorError as exc:
            if isinstance(getattr(exc, "os_error", None), BlockedAddress):
                return FetchResult("skipped_private_network", url, str(exc.os_error))
            if isinstance(exc, aiohttp.ClientConnectorDNSError):
                return FetchResult("failed_to_download", url, f"DNS: {exc.os_error}")
            raise _Transient(f"connection error: {exc.os_error}") from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError) as exc:
            raise _Transient(f"connection error: {type(exc).__name__}: {exc}") from exc
        except aiohttp.ClientResponseError as exc:  # malformed response
            return FetchResult("failed_to_download", url, f"bad response: {exc.message}")
        except aiohttp.InvalidURL as exc:
            return FetchResult("invalid_url", url, f"invalid URL: {exc}")

    async def _read(self, resp: aiohttp.ClientResponse, url: str) -> FetchResult:
        c = self.config
        ctype = resp.headers.get("Content-Type")
        base = dict(url=url, http_status=resp.status, content_type=ctype, final_url=url)
        if c.respect_opt_out:
            directive = opt_out_directive(resp.headers.getall("X-Robots-Tag", []), c.opt_out_directives)
            if directive:
                return FetchResult("skipped_opt_out", error_message=f"X-Robots-Tag: {directive}", **base)
        if resp.status == 429 or resp.status >= 500:
            raise _Transient(f"HTTP {resp.status}", resp.status, parse_retry_after(resp.headers.get("Retry-After")))
        if resp.status >= 400:
            return FetchResult("failed_to_download", error_message=f"HTTP {resp.status}", **base)
        if resp.content_length is not None and resp.content_length > c.max_bytes:
            return FetchResult("too_large", error_message=f"Content-Length {resp.content_length} > max_bytes={c.max_bytes}", **base)
        chunks, size = [], 0
        async for chunk in resp.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > c.max_bytes:
                return FetchResult("too_large", error_message=f"body exceeds max_bytes={c.max_bytes}", **base)
            chunks.append(chunk)
        return FetchResult("success", data=b"".join(chunks), headers=dict(resp.headers), **base)

    async def _robots_for(self, origin: str) -> Protego | str | None:
        """Parsed robots.txt of an origin (None: no rules; str: everything disallowed, with why).

        Loaded once per origin and kept for the worker process's later shards (RFC 9309 allows
        caching for 24 hours). Shielded: a request timing out while waiting must not cancel the
        load that the other requests to the origin share.
        """
        key = (origin, self.config.user_agent)
        cached = _ROBOTS_CACHE.get(key)
        if cached is not None and time.monotonic() - cached[0] < ROBOTS_TTL_S:
            return cached[1]
        fut = self._robots.get(origin)
        if fut is None:
            fut = self._robots[origin] = asyncio.ensure_future(self._load_robots(origin))

            def remember(f: asyncio.Future) -> None:
                # Server errors and unreachable hosts are temporary: only real answers outlive this task.
                if not f.cancelled() and f.exception() is None and f.result()[1]:
                    _ROBOTS_CACHE[key] = (time.monotonic(), f.result()[0])

            fut.add_done_callback(remember)
        rules, _ = await asyncio.shield(fut)
        return rules

    async def _load_robots(self, origin: str) -> tuple[Protego | str | None, bool]:
        """The rules and whether they may be cached (answers from the server, not outages)."""
        assert self._session is not None
        try:
            async with asyncio.timeout(self.config.timeout):
                async with self._session.get(origin + "/robots.txt", max_redirects=5) as resp:
                    if resp.status >= 500 or resp.status == 429:
                        # RFC 9309 2.3.1.4: an unreachable robots.txt means everything is disallowed.
                        return f"robots.txt unavailable (HTTP {resp.status})", False
                    if resp.status >= 400:
                        return None, True  # RFC 9309 2.3.1.3: no robots.txt, no rules
                    body = await resp.content.read(500 * 1024)  # RFC 9309: parse at least 500 KiB
                    return Protego.parse(body.decode("utf-8", errors="replace")), True
        except (TimeoutError, aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError,
                aiohttp.ClientOSError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorError):  # refused: the page fetch will say why
                return None, False
            # RFC 9309 2.3.1.4: robots.txt unreachable (the server answered nothing usable) -> disallow.
            return f"robots.txt unreachable ({type(exc).__name__})", False
        except (aiohttp.ClientError, OSError):
            return None, False  # the host itself is unreachable: the page fetch will report why
