"""A polite, safe asynchronous HTTP fetcher shared by the image and text crawls.

Polite: an honest user agent; robots.txt fetched once per origin, cached and obeyed (protego,
RFC 9309), its Crawl-delay honoured; `X-Robots-Tag` opt-outs obeyed before the body is read; a
per-host concurrency limit and request rate; retries with exponential backoff and jitter on
timeouts, connection errors, 5xx and 429, honouring `Retry-After`.

Safe: http/https only; a hard deadline per attempt; a byte cap enforced while streaming; no
redirect followed by aiohttp: at most N, each hop re-checked by us (scheme, robots, address), for
robots.txt too. Non-public addresses (private, loopback, link-local, ... in any spelling) are refused
unless `allow_private_network` is set, by a `NetworkGuard` at two places: on the URL's host as
aiohttp parses it (so the row gets a clear status before any request), and on the very address each
socket connects to (`socket_factory`), which is what holds: whatever a URL's spelling, a name's DNS
answer (rebinding included) or aiohttp's IP-literal shortcut past the resolver, no socket to a
refused address is ever opened.

Bounded: every wait a server can ask for has a cap: the deadline per attempt (slow headers, slow
bodies), `max_retry_after`, `max_crawl_delay` and `max_host_wait` (a host's queue of requests spaced
by its Crawl-delay); past a cap the row fails with the reason and the other rows go on.

Limits apply per Fetcher, i.e. per shard task: with K shard tasks running at once, a host sees
at most K x per_host_concurrency connections.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import math
import random
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import aiohttp
from aiohttp.abc import AbstractResolver
from protego import Protego
from yarl import URL

from pipelines.ingest.config import DEFAULT_USER_AGENT, FETCH_RUN_OPTIONS, USER_AGENT_TOKEN, FetchConfig  # noqa: F401

REDIRECT_CODES = {301, 302, 303, 307, 308}
ROBOTS_MAX_REDIRECTS = 5  # RFC 9309 2.3.1.2: follow at least five
ROBOTS_MAX_BYTES = 500 * 1024  # RFC 9309 2.5: parse at least 500 KiB
ROBOTS_TTL_S = 24 * 3600
# robots.txt rules per (origin, user agent), kept across the shard tasks a worker process runs.
_ROBOTS_CACHE: dict[tuple[str, str], tuple[float, Any]] = {}


@dataclass
class FetchResult:
    status: str  # success or a failure status of the row
    url: str
    error_message: str | None = None
    http_status: int | None = None
    content_type: str | None = None
    final_url: str | None = None
    data: bytes | None = None
    fetch_ms: float = 0.0
    retryable: bool = False  # a transient failure that a later `--retry-failed` run may fix


class BlockedAddress(OSError):
    """A connection to an address the crawl may not reach."""


# Non-global ranges that Python's `is_global` (3.11) misses, and IPv6 forms embedding an IPv4
# address (IPv4-compatible, SIIT, NAT64 well-known prefix) whose IPv4 part is checked too.
_ALSO_BLOCKED = [ipaddress.ip_network(n) for n in (
    "192.0.0.0/24", "192.88.99.0/24", "fec0::/10", "64:ff9b:1::/48", "::/96", "::ffff:0:0:0/96")]
_EMBEDDING_IPV4 = [ipaddress.ip_network(n) for n in ("::/96", "::ffff:0:0:0/96", "64:ff9b::/96")]


def is_blocked_ip(ip: str) -> bool:
    """Whether `ip` (a strict IPv4 or IPv6 literal) is not a public unicast address; unparseable is blocked.

    Not global covers private, loopback, link-local, reserved, unspecified and shared (100.64/10);
    an IPv6 address carrying an IPv4 one (mapped, compatible, NAT64, 6to4, Teredo) is blocked when
    the IPv4 address is.
    """
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return True
    if not addr.is_global or addr.is_multicast or any(addr in net for net in _ALSO_BLOCKED):
        return True
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = [addr.ipv4_mapped, addr.sixtofour, *(addr.teredo or ())]
        embedded += [ipaddress.IPv4Address(addr.packed[-4:]) for net in _EMBEDDING_IPV4 if addr in net]
        return any(v4 is not None and is_blocked_ip(str(v4)) for v4 in embedded)
    return False


def _ip_or_none(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def legacy_ipv4(host: str) -> str | None:
    """The address of a host written in a legacy numeric IPv4 form (`2130706433`, `0x7f.1`, `0177.0.0.1`,
    `127.1`) that the C resolver, unlike a URL parser, reads as an IP address; None for anything else."""
    if not host or not host.isascii() or _ip_or_none(host) is not None:
        return None
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return None


class NetworkGuard:
    """Which addresses the crawl may connect to: public unicast ones and `allowed_networks`."""

    def __init__(self, allowed_networks: list[str]) -> None:
        self._allowed = [ipaddress.ip_network(n) for n in allowed_networks]

    def refuses(self, ip: str) -> bool:
        addr = _ip_or_none(ip)
        if addr is None:
            return True  # not a strict literal: never handed to connect()
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        if any(addr.version == net.version and addr in net for net in self._allowed):
            return False
        return is_blocked_ip(ip)

    def socket(self, addr_info: tuple) -> socket.socket:
        """aiohttp's `socket_factory`, called with the very address each new connection goes to: for
        names and IP literals alike (aiohttp skips the resolver for literals), redirects included."""
        family, type_, proto, _, address = addr_info
        if self.refuses(address[0]):
            raise BlockedAddress(f"connection to non-public address {address[0]} refused")
        return socket.socket(family, type_, proto)


class GuardedResolver(AbstractResolver):
    """aiohttp resolver refusing names with a non-public address, for a clear message before connecting
    (the socket factory is what enforces the rule, on every address actually connected to)."""

    def __init__(self, guard: NetworkGuard) -> None:
        self._guard = guard
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        infos = await self._inner.resolve(host, port, family)
        for info in infos:
            if self._guard.refuses(info["host"]):
                raise BlockedAddress(f"{host} resolves to non-public address {info['host']}")
        return infos

    async def close(self) -> None:
        await self._inner.close()


def network_guard(config: FetchConfig) -> NetworkGuard | None:
    """The guard a crawl with `config` runs under; None with `allow_private_network`."""
    return None if config.allow_private_network else NetworkGuard(config.allowed_networks)


def guarded_session(config: FetchConfig, accept: str = "*/*") -> aiohttp.ClientSession:
    """The crawler's HTTP session: every connection it opens is checked by the network guard, on the
    address connected to. No proxy from the environment (trust_env=False), so that address is the
    server's. Close it when done."""
    guard = network_guard(config)
    # The Fetcher limits connections per host itself, so that waiting for a slot pauses its deadline.
    connector = aiohttp.TCPConnector(
        limit=config.concurrency, limit_per_host=0, ttl_dns_cache=300,
        resolver=None if guard is None else GuardedResolver(guard),
        socket_factory=None if guard is None else guard.socket)
    return aiohttp.ClientSession(
        connector=connector, headers={"User-Agent": config.user_agent, "Accept": accept},
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=config.timeout), max_field_size=16384,
        trust_env=False)


class HostRateLimiter:
    """Spaces requests to one host at least `interval` seconds apart (per process)."""

    def __init__(self) -> None:
        self._next: dict[str, float] = {}

    def book(self, host: str, interval: float, max_wait: float) -> float | None:
        """Book the next turn at `host`: the seconds to wait for it, or None (nothing booked) when
        that is more than `max_wait`."""
        if interval <= 0:
            return 0.0
        now = time.monotonic()
        start = max(now, self._next.get(host, now))
        if start - now > max_wait:
            return None
        self._next[host] = start + interval
        return start - now


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
        self._guard = network_guard(config)
        self._robots: dict[str, asyncio.Future] = {}
        self._rate = HostRateLimiter()
        self._host_slots: dict[str, asyncio.Semaphore] = {}
        self._host_verdicts: dict[str, tuple[str, str] | bool] = {}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "Fetcher":
        self._session = guarded_session(self.config, self.accept)
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
    def _check_url(self, url: str) -> URL | FetchResult:
        """`url` parsed exactly as aiohttp will request it, or why it may not be requested.

        The address rule is applied to the host aiohttp will connect to: yarl's host, after IDNA
        and NFKC (fullwidth or other Unicode digits become ASCII ones), without trailing dots.
        """
        try:
            target = URL(url)
            host = target.raw_host
            _ = target.port
        except (ValueError, TypeError) as exc:
            return FetchResult("invalid_url", url, f"unparseable URL: {exc}")
        if target.scheme not in ("http", "https"):
            return FetchResult("invalid_url", url, f"scheme {target.scheme!r} not allowed (http/https only)")
        if not host:
            return FetchResult("invalid_url", url, "URL has no host")
        verdict = self._host_verdicts.get(host)
        if verdict is None:
            verdict = self._host_verdicts[host] = self._check_host(host)
        return target if verdict is True else FetchResult(verdict[0], url, verdict[1])

    def _check_host(self, host: str) -> tuple[str, str] | bool:
        """True if a URL's host (yarl's `raw_host`) may be requested, else the row's status and why. It depends
        on the host alone, so a Fetcher keeps it per host: parsing a host as an IP address in Python is most of
        `_check_url`'s cost, and many of a shard's rows share a host."""
        host = host.rstrip(".")
        legacy = legacy_ipv4(host)
        if legacy is not None:  # the resolver would read it as `legacy`, a URL parser as a name
            return "invalid_url", f"host {host!r} is a non-canonical IPv4 address ({legacy})"
        if _ip_or_none(host) is not None:
            if self._guard is not None and self._guard.refuses(host):
                return "skipped_private_network", f"non-public address {host}"
            return True
        if len(host) > 253 or not all(0 < len(label) <= 63 for label in host.split(".")):
            return "invalid_url", f"host {host!r} is not a valid DNS name"
        return True  # a name: its addresses are checked when connecting

    async def _fetch_once(self, url: str, deadline: asyncio.Timeout) -> FetchResult:
        """One attempt, redirects included. Waiting for robots.txt, the host's rate limit or a free
        connection to the host is politeness, not network time: the deadline is paused meanwhile."""
        assert self._session is not None
        c = self.config
        seen = {url}
        for _ in range(c.max_redirects + 1):
            target = self._check_url(url)
            if isinstance(target, FetchResult):
                return target
            host = f"{target.raw_host}:{target.port}"
            loop = asyncio.get_running_loop()
            when = deadline.when()
            remaining = None if when is None else when - loop.time()
            deadline.reschedule(None)
            crawl_delay = 0.0
            if c.respect_robots:
                robots = await self._robots_for(str(target.origin()))
                if isinstance(robots, str):  # robots.txt unreachable: a later run may succeed
                    return FetchResult("skipped_robots", url, robots, final_url=url, retryable=True)
                if robots is not None:
                    if not robots.can_fetch(url, USER_AGENT_TOKEN):
                        return FetchResult("skipped_robots", url, "disallowed by robots.txt", final_url=url)
                    crawl_delay = robots.crawl_delay(USER_AGENT_TOKEN) or 0.0
                    if not crawl_delay <= c.max_crawl_delay:  # NaN included
                        return FetchResult("skipped_robots", url, f"robots.txt Crawl-delay {crawl_delay:g}s exceeds "
                                           f"max_crawl_delay={c.max_crawl_delay:g}s", final_url=url, retryable=True)
            own_interval = 1.0 / c.per_host_rate if c.per_host_rate else 0.0
            # The queue a server's Crawl-delay makes is capped; the one the user's per_host_rate makes is theirs.
            max_wait = c.max_host_wait if crawl_delay > own_interval else math.inf
            wait = self._rate.book(host, max(crawl_delay, own_interval), max_wait)
            if wait is None:
                return FetchResult("failed_to_download", url, f"robots.txt Crawl-delay {crawl_delay:g}s: the next turn "
                                   f"at {target.raw_host} is more than max_host_wait={c.max_host_wait:g}s away",
                                   final_url=url, retryable=True)
            if wait:
                await asyncio.sleep(wait)
            slot = self._host_slots.setdefault(host, asyncio.Semaphore(c.per_host_concurrency))
            async with slot:
                if remaining is not None:
                    deadline.reschedule(loop.time() + remaining)
                result = await self._request(target, url, seen)
            if isinstance(result, FetchResult):
                return result
            url = result  # the next hop of a redirect
        return FetchResult("failed_to_download", url, f"too many redirects (>{c.max_redirects})")

    async def _request(self, target: URL, url: str, seen: set[str]) -> FetchResult | str:
        """GET one URL (never following a redirect): its result, or the URL a redirect points to."""
        assert self._session is not None
        try:
            async with self._session.get(target, allow_redirects=False) as resp:
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
            if _blocked(exc):
                return FetchResult("skipped_private_network", url, str(exc.os_error))
            if isinstance(exc, aiohttp.ClientConnectorDNSError):
                return FetchResult("failed_to_download", url, f"DNS: {exc.os_error}")
            raise _Transient(f"connection error: {exc.os_error}") from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError) as exc:
            raise _Transient(f"connection error: {type(exc).__name__}: {exc}") from exc
        except aiohttp.ClientResponseError as exc:  # malformed response
            return FetchResult("failed_to_download", url, f"bad response: {exc.message}")
        except (aiohttp.InvalidURL, UnicodeError) as exc:  # UnicodeError: a name the resolver cannot encode
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
        if resp.content_length is not None and "Content-Encoding" not in resp.headers:
            # The body is as long as its Content-Length says (checked above), never longer: aiohttp reads no more.
            # (A compressed body's length says nothing of what it inflates to, hence the streamed count below.)
            return FetchResult("success", data=await resp.read(), **base)
        chunks, size = [], 0
        async for chunk in resp.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > c.max_bytes:
                return FetchResult("too_large", error_message=f"body exceeds max_bytes={c.max_bytes}", **base)
            chunks.append(chunk)
        return FetchResult("success", data=b"".join(chunks), **base)

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
        """The rules and whether they may be cached (answers from the server, not outages).

        Redirects are followed here, hop by hop, each hop checked as a page URL is: a robots.txt
        redirecting to a refused address disallows the origin.
        """
        assert self._session is not None
        url = origin + "/robots.txt"
        try:
            async with asyncio.timeout(self.config.timeout):
                for hop in range(ROBOTS_MAX_REDIRECTS + 1):
                    target = self._check_url(url)
                    if isinstance(target, FetchResult):
                        return f"robots.txt redirects to a refused URL: {target.error_message}", True
                    try:
                        async with self._session.get(target, allow_redirects=False) as resp:
                            location = resp.headers.get("Location")
                            if resp.status in REDIRECT_CODES and location:
                                url = urljoin(str(resp.url), location)
                                continue
                            if resp.status >= 500 or resp.status == 429:
                                # RFC 9309 2.3.1.4: an unreachable robots.txt means everything is disallowed.
                                return f"robots.txt unavailable (HTTP {resp.status})", False
                            if resp.status >= 400 or resp.status in REDIRECT_CODES:
                                return None, True  # RFC 9309 2.3.1.3: no robots.txt, no rules
                            body = await _read_up_to(resp.content, ROBOTS_MAX_BYTES)
                            return Protego.parse(body.decode("utf-8", errors="replace")), True
                    except aiohttp.ClientConnectorError as exc:
                        if hop and _blocked(exc):
                            return f"robots.txt redirects to a refused address: {exc.os_error}", True
                        raise
                return None, False  # RFC 9309 2.3.1.2: too many redirects, robots.txt unavailable
        except (TimeoutError, aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError,
                aiohttp.ClientOSError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorError):  # refused: the page fetch will say why
                return None, False
            # RFC 9309 2.3.1.4: robots.txt unreachable (the server answered nothing usable) -> disallow.
            return f"robots.txt unreachable ({type(exc).__name__})", False
        except (aiohttp.ClientError, OSError, UnicodeError):
            return None, False  # the host itself is unreachable: the page fetch will report why


def _blocked(exc: aiohttp.ClientConnectorError) -> bool:
    """Whether a connection failed because the guard refused its address."""
    return isinstance(exc.os_error, BlockedAddress) or "non-public address" in str(exc.os_error)


async def _read_up_to(stream: aiohttp.StreamReader, limit: int) -> bytes:
    """The first `limit` bytes of a body (`StreamReader.read(n)` returns what has arrived so far)."""
    chunks, size = [], 0
    while size < limit:
        chunk = await stream.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
