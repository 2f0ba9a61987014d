"""The Fetcher against a real HTTP server on loopback: retries, deadlines, redirects, robots, opt-outs, caps."""

from __future__ import annotations

import asyncio
import email.utils
import time
from itertools import pairwise

import pytest

from pipelines.ingest.fetch import (
    DEFAULT_USER_AGENT,
    FetchConfig,
    Fetcher,
    FetchResult,
    is_blocked_ip,
    opt_out_directive,
    parse_retry_after,
)
from tests.conftest import closed_port_url

LOCAL = dict(allow_private_network=True, retries=0, backoff=0.01, timeout=2.0)


def fetch_all(urls: list[str], **config) -> list[FetchResult]:
    """Fetch `urls` concurrently with one Fetcher, as a shard task does."""
    async def main() -> list[FetchResult]:
        async with Fetcher(FetchConfig(**{**LOCAL, **config})) as fetcher:
            return await asyncio.gather(*(fetcher.fetch(u) for u in urls))
    return asyncio.run(main())


def fetch(url: str, **config) -> FetchResult:
    return fetch_all([url], **config)[0]


def timed_fetch_all(urls: list[str], **config) -> tuple[list[FetchResult], float]:
    start = time.monotonic()
    results = fetch_all(urls, **config)
    return results, time.monotonic() - start


def timed_fetch(url: str, **config) -> tuple[FetchResult, float]:
    start = time.monotonic()
    result = fetch(url, **config)
    return result, time.monotonic() - start


# -- success, headers ----------------------------------------------------------------------------
def test_fetch_returns_the_served_bytes_and_sends_an_honest_user_agent(web, photos):
    r = fetch(web.url("/img/2.jpg"))
    assert (r.status, r.http_status, r.content_type) == ("success", 200, "image/jpeg")
    assert r.data == photos[2].data
    assert r.final_url == web.url("/img/2.jpg")
    assert r.error_message is None and not r.retryable
    page = [q for q in web.requests if q.path == "/img/2.jpg"]
    assert [q.user_agent for q in page] == [DEFAULT_USER_AGENT]
    assert DEFAULT_USER_AGENT.startswith("pipelines-crawler/")


# -- retries and backoff -------------------------------------------------------------------------
def test_500_then_200_succeeds_on_the_second_attempt(web, photos):
    r = fetch(web.url("/flaky/a"), retries=1)
    assert r.status == "success" and r.data == photos[2].data
    assert web.hits("/flaky/a") == 2


def test_500_without_retries_fails_as_retryable(web):
    r = fetch(web.url("/flaky/b"), retries=0)
    assert (r.status, r.http_status, r.retryable) == ("failed_to_download", 500, True)
    assert r.error_message == "HTTP 500"
    assert web.hits("/flaky/b") == 1


def test_429_honours_retry_after(web, photos):
    r, elapsed = timed_fetch(web.url("/ratelimited/a"), retries=1, backoff=0.01)
    assert r.status == "success" and r.data == photos[3].data
    assert web.hits("/ratelimited/a") == 2
    assert elapsed >= 0.95  # Retry-After: 1, although the backoff alone would wait ~10 ms
    first, second = [q.at for q in web.requests if q.path == "/ratelimited/a"]
    assert second - first >= 0.95


def test_retry_after_longer_than_max_retry_after_gives_up_at_once(web):
    r, elapsed = timed_fetch(web.url("/ratelimited/b"), retries=2, max_retry_after=0.5)
    assert (r.status, r.http_status, r.retryable) == ("failed_to_download", 429, True)
    assert "exceeds max_retry_after" in r.error_message
    assert web.hits("/ratelimited/b") == 1
    assert elapsed < 0.9


def test_retry_after_give_up_reports_the_attempts_really_made(web):
    r = fetch(web.url("/ratelimited/c"), retries=2, max_retry_after=0.5)
    assert web.hits("/ratelimited/c") == 1
    assert "after 3 attempts" not in r.error_message


def test_retries_exhausted_reports_attempts_and_backs_off(web):
    r, elapsed = timed_fetch(web.url("/unavailable/9/x"), retries=2, backoff=0.2)
    assert (r.status, r.http_status, r.retryable) == ("failed_to_download", 503, True)
    assert r.error_message == "HTTP 503 (after 3 attempts)"
    assert web.hits("/unavailable/9/x") == 3
    times = [q.at for q in web.requests if q.path == "/unavailable/9/x"]
    gaps = [b - a for a, b in pairwise(times)]
    # Exponential backoff with jitter in [0.5, 1.5): 0.2 s then 0.4 s nominal.
    assert 0.1 <= gaps[0] < 0.5 and 0.2 <= gaps[1] < 0.9, gaps
    assert elapsed >= 0.3


def test_503_until_the_last_retry_succeeds(web, photos):
    r = fetch(web.url("/unavailable/2/y"), retries=2)
    assert r.status == "success" and r.data == photos[1].data
    assert web.hits("/unavailable/2/y") == 3


def test_connection_problems_are_transient_failures_never_exceptions(web):
    closed = closed_port_url()
    reset, cut, garbage, refused = fetch_all([web.url("/reset"), web.url("/cut"), web.url("/garbage"), closed])
    assert (reset.status, reset.retryable) == ("failed_to_download", True)
    assert "ServerDisconnected" in reset.error_message
    assert (cut.status, cut.retryable) == ("failed_to_download", True)
    assert "payload" in cut.error_message.lower()
    assert garbage.status == "failed_to_download" and "bad response" in garbage.error_message
    assert (refused.status, refused.retryable) == ("failed_to_download", True)
    assert "connection error" in refused.error_message


# -- deadline ------------------------------------------------------------------------------------
def test_slow_response_fails_at_the_deadline(web):
    r, elapsed = timed_fetch(web.url("/slow"), timeout=0.5)
    assert (r.status, r.retryable) == ("failed_to_download", True)
    assert r.error_message == "timeout after 0.5s"
    assert 0.45 <= elapsed < 1.2


def test_deadline_covers_a_body_that_trickles_in(web):
    r, elapsed = timed_fetch(web.url("/drip"), timeout=0.5)  # the whole body would take 10 s
    assert r.status == "failed_to_download" and "timeout" in r.error_message
    assert 0.45 <= elapsed < 1.2


def test_deadline_is_per_attempt(web):
    r, elapsed = timed_fetch(web.url("/slow"), timeout=0.3, retries=1, backoff=0.01)
    assert r.error_message == "timeout after 0.3s (after 2 attempts)"
    assert web.hits("/slow") == 2
    assert 0.6 <= elapsed < 1.3


# -- politeness limits ---------------------------------------------------------------------------
def request_gaps(web, prefix: str) -> list[float]:
    times = sorted(q.at for q in web.requests if q.path.startswith(prefix))
    return [b - a for a, b in pairwise(times)]


def test_crawl_delay_spaces_requests_to_a_host(make_web):
    host = make_web(robots_body="User-agent: *\nCrawl-delay: 0.2\n")
    results = fetch_all([host.url(f"/img/{i}.jpg") for i in range(4)], timeout=3)
    assert [r.status for r in results] == ["success"] * 4
    assert all(gap >= 0.18 for gap in request_gaps(host, "/img/")), request_gaps(host, "/img/")


def test_per_host_rate_spaces_requests(web, make_web):
    other = make_web()
    urls = [web.url(f"/img/{i}.jpg") for i in range(4)] + [other.url(f"/img/{i}.jpg") for i in range(4)]
    start = time.monotonic()
    assert {r.status for r in fetch_all(urls, per_host_rate=5, timeout=3)} == {"success"}
    assert all(gap >= 0.18 for gap in request_gaps(web, "/img/")), request_gaps(web, "/img/")
    assert time.monotonic() - start < 1.2  # hosts are limited separately: 4 x 0.2 s, not 8 x 0.2 s


def test_per_host_concurrency_bounds_connections(make_web):
    host = make_web(image_delay=0.2)
    results = fetch_all([host.url(f"/img/{i}.jpg?{i}") for i in range(8)], per_host_concurrency=2, timeout=5)
    assert {r.status for r in results} == {"success"}
    assert host.max_active == 2


def test_waiting_for_a_per_host_connection_does_not_count_against_the_deadline(make_web):
    host = make_web(image_delay=0.4)
    results = fetch_all([host.url(f"/img/{i}.jpg?{i}") for i in range(4)], per_host_concurrency=1, timeout=1.0)
    assert [r.status for r in results] == ["success"] * 4  # each response takes 0.4 s < 1 s
    assert host.max_active == 1


def test_waiting_for_crawl_delay_does_not_count_against_the_deadline(make_web):
    host = make_web(robots_body="User-agent: *\nCrawl-delay: 0.4\n")
    results = fetch_all([host.url(f"/img/{i}.jpg") for i in range(5)], timeout=1.0)
    assert [r.status for r in results] == ["success"] * 5
    times = sorted(q.at for q in host.requests if q.path.startswith("/img/"))
    assert all(b - a >= 0.35 for a, b in pairwise(times))  # Crawl-delay honoured


# -- waits a server asks for are capped ----------------------------------------------------------
@pytest.mark.timeout(20)  # before the cap, this crawl waited 100000 s
def test_crawl_delay_beyond_max_crawl_delay_skips_the_host_and_the_rest_goes_on(make_web):
    slow, other = make_web(robots_body="User-agent: *\nCrawl-delay: 100000\n"), make_web()
    urls = [slow.url(f"/img/{i}.jpg") for i in range(3)] + [other.url(f"/img/{i}.jpg") for i in range(3)]
    results, elapsed = timed_fetch_all(urls)
    assert [r.status for r in results] == ["skipped_robots"] * 3 + ["success"] * 3
    for r in results[:3]:
        assert r.error_message == "robots.txt Crawl-delay 100000s exceeds max_crawl_delay=10s"
        assert r.retryable  # a later run with a larger max_crawl_delay may fetch them
    assert slow.hits_under("/img/") == 0
    assert elapsed < 5


def test_max_crawl_delay_is_a_setting(make_web):
    host = make_web(robots_body="User-agent: *\nCrawl-delay: 0.3\n")
    over, = fetch_all([host.url("/img/0.jpg")], max_crawl_delay=0.2)
    assert over.status == "skipped_robots" and "max_crawl_delay=0.2s" in over.error_message
    assert FetchConfig().max_crawl_delay == 10


def test_a_host_queue_longer_than_max_host_wait_fails_its_later_rows(make_web):
    # Crawl-delay 0.5: turns at 0, 0.5, 1.0, 1.5 s; with max_host_wait 0.7 the last two do not queue.
    host, other = make_web(robots_body="User-agent: *\nCrawl-delay: 0.5\n"), make_web()
    urls = [host.url(f"/img/{i}.jpg") for i in range(4)] + [other.url("/img/0.jpg")]
    results, elapsed = timed_fetch_all(urls, max_host_wait=0.7)
    assert [r.status for r in results] == ["success", "success", "failed_to_download", "failed_to_download",
                                           "success"]
    for r in results[2:4]:
        assert r.retryable and "max_host_wait=0.7s" in r.error_message
    assert host.hits_under("/img/") == 2
    assert elapsed < 1.4


def test_max_host_wait_does_not_cap_the_users_own_per_host_rate(web):
    results, elapsed = timed_fetch_all([web.url(f"/img/{i}.jpg") for i in range(4)], per_host_rate=4,
                                       max_host_wait=0.3)
    assert [r.status for r in results] == ["success"] * 4  # turns at 0, 0.25, 0.5, 0.75 s
    assert elapsed >= 0.7


def test_robots_txt_larger_than_one_read_is_parsed_whole(make_web):
    # aiohttp's read(n) returns what has arrived: rules after the first chunk must not be lost.
    host = make_web(robots_body="#" + "x" * 300_000 + "\nUser-agent: *\nDisallow: /private/\n")
    r = fetch(host.url("/private/a.jpg"))
    assert (r.status, r.error_message) == ("skipped_robots", "disallowed by robots.txt")
    assert host.hits_under("/private/") == 0


# -- redirects -----------------------------------------------------------------------------------
def test_redirect_chain_is_followed(web, photos):
    r = fetch(web.url("/redirect/chain"))
    assert r.status == "success" and r.data == photos[1].data
    assert r.final_url == web.url("/img/1.jpg")
    assert web.hits("/redirect/chain") == web.hits("/redirect/chain/2") == web.hits("/img/1.jpg") == 1


def test_redirect_loop_is_detected(web):
    r = fetch(web.url("/redirect/loop"), max_redirects=10)
    assert (r.status, r.error_message) == ("failed_to_download", "redirect loop")
    assert web.hits("/redirect/loop") == 1 and web.hits("/redirect/loop/b") == 1
    assert not r.retryable


@pytest.mark.parametrize("max_redirects, status",
                         [(3, "success"), (2, "failed_to_download"), (0, "failed_to_download")])
def test_max_redirects(web, max_redirects, status):
    r = fetch(web.url("/redirect/hops/3"), max_redirects=max_redirects)
    assert r.status == status
    if status != "success":
        assert r.error_message == f"too many redirects (>{max_redirects})"
        assert web.hits("/redirect/hops/0") == 0
    assert web.hits_under("/redirect/hops/") == min(4, max_redirects + 1)


def test_redirect_without_location(web):
    r = fetch(web.url("/redirect/nolocation"))
    assert (r.status, r.http_status, r.error_message) == ("failed_to_download", 302, "HTTP 302 without Location")


def test_every_redirect_hop_is_checked_against_robots(web):
    r = fetch(web.url("/redirect/to-private"))
    assert r.status == "skipped_robots"
    assert r.final_url == web.url("/private/via-redirect.jpg")
    assert web.hits_under("/private/") == 0


# -- robots.txt ----------------------------------------------------------------------------------
def test_robots_disallow_is_obeyed_without_fetching_the_url(web):
    r = fetch(web.url("/private/secret.jpg"))
    assert (r.status, r.error_message) == ("skipped_robots", "disallowed by robots.txt")
    assert web.hits_under("/private/") == 0
    assert web.hits("/robots.txt") == 1


def test_robots_txt_is_fetched_once_per_origin(web, make_web):
    other = make_web()
    urls = [web.url(f"/img/{i}.jpg") for i in range(5)] + [web.url("/private/a.jpg"), web.url("/private/b.jpg")]
    urls += [other.url(f"/img/{i}.jpg") for i in range(3)]
    statuses = [r.status for r in fetch_all(urls)]
    assert statuses == ["success"] * 5 + ["skipped_robots"] * 2 + ["success"] * 3
    assert web.hits("/robots.txt") == 1 and other.hits("/robots.txt") == 1


def test_robots_rules_are_kept_for_later_fetchers_of_the_process(web):
    # A worker runs many shard tasks, each with its own Fetcher: the rules outlive the Fetcher.
    assert fetch(web.url("/private/a.jpg")).status == "skipped_robots"
    assert fetch(web.url("/img/0.jpg")).status == "success"
    assert web.hits("/robots.txt") == 1


def test_robots_txt_outage_is_not_remembered(make_web):
    host = make_web(robots_status=503)
    assert fetch(host.url("/img/0.jpg")).status == "skipped_robots"
    host.robots_status = 200  # the outage is over: the next Fetcher asks again
    assert fetch(host.url("/img/0.jpg")).status == "success"
    assert fetch(host.url("/private/a.jpg")).status == "skipped_robots"
    assert host.hits("/robots.txt") == 2


def test_respect_robots_false_ignores_robots_txt(web):
    assert fetch(web.url("/private/a.jpg"), respect_robots=False).status == "success"
    assert web.hits("/robots.txt") == 0


def test_unavailable_robots_txt_disallows_everything(make_web):
    host = make_web(robots_status=503)  # RFC 9309 2.3.1.4
    r = fetch(host.url("/img/0.jpg"))
    assert r.status == "skipped_robots" and "503" in r.error_message
    assert host.hits("/img/0.jpg") == 0


def test_missing_robots_txt_allows_everything(make_web, photos):
    host = make_web(robots_status=404, robots_body="Disallow: /")  # a 404 body is not rules
    r = fetch(host.url("/private/a.jpg"))
    assert r.status == "success" and r.data == photos[0].data


def test_robots_rules_for_another_agent_do_not_apply(make_web):
    host = make_web(robots_body="User-agent: otherbot\nDisallow: /\n\n"
                                "User-agent: pipelines-crawler\nDisallow: /private/\n")
    ok, private = fetch_all([host.url("/img/0.jpg"), host.url("/private/x.jpg")])
    assert (ok.status, private.status) == ("success", "skipped_robots")


def test_robots_txt_timing_out_disallows_the_host(make_web):
    host = make_web(robots_delay=3)
    results = fetch_all([host.url("/img/0.jpg"), host.url("/img/1.jpg")], timeout=0.5, retries=1)
    assert host.hits_under("/img/") == 0
    assert all(r.status in ("skipped_robots", "failed_to_download") for r in results), results


def test_robots_txt_timing_out_does_not_raise(make_web):
    # Two requests share the robots.txt load; the first to time out must not cancel it for the other.
    host = make_web(robots_delay=3)
    results = fetch_all([host.url("/img/0.jpg"), host.url("/img/1.jpg")], timeout=0.5, retries=1)
    assert len(results) == 2 and all(isinstance(r, FetchResult) for r in results)


# -- X-Robots-Tag opt-outs -----------------------------------------------------------------------
def test_x_robots_tag_opt_outs(web):
    plain, ours, other = fetch_all([web.url("/noai.jpg"), web.url("/scoped-noai.jpg"), web.url("/otherbot-noai.jpg")])
    assert (plain.status, plain.error_message) == ("skipped_opt_out", "X-Robots-Tag: noai")
    assert (ours.status, ours.error_message) == ("skipped_opt_out", "X-Robots-Tag: noai")
    assert other.status == "success" and other.data
    assert plain.data is None and ours.data is None


def test_respect_opt_out_false_downloads_anyway(web, photos):
    r = fetch(web.url("/noai.jpg"), respect_opt_out=False)
    assert r.status == "success" and r.data == photos[0].data


@pytest.mark.parametrize("values, expected", [
    (["noai"], "noai"),
    (["NoImageAI"], "noimageai"),
    (["nofollow, noimageindex"], "noimageindex"),
    (["nofollow", "noindex"], "noindex"),
    (["pipelines-crawler: noai"], "noai"),
    (["Pipelines-Crawler: noindex, nofollow"], "noindex"),
    (["*: noai"], "noai"),
    (["otherbot: noai"], None),
    (["otherbot: noai", "noimageai"], "noimageai"),
    (["googlebot: noindex", "pipelines-crawler: nofollow"], None),
    (["unavailable_after: 25 Jun 2010 15:00:00 PST"], None),
    (["nofollow, noarchive"], None),
    ([], None),
])
def test_opt_out_directive(values, expected):
    assert opt_out_directive(values, ["noai", "noimageai", "noindex", "noimageindex"]) == expected


def test_opt_out_directive_uses_the_configured_list():
    assert opt_out_directive(["noindex"], ["noai"]) is None
    assert opt_out_directive(["noindex"], ["NOINDEX"]) == "noindex"


# -- byte cap ------------------------------------------------------------------------------------
def test_body_over_max_bytes_with_content_length_is_refused_before_reading(web):
    r = fetch(web.url("/huge.jpg"), max_bytes=2**20)
    assert r.status == "too_large" and r.error_message == f"Content-Length {3 * 2**20} > max_bytes={2**20}"
    assert r.data is None and not r.retryable


def test_body_over_max_bytes_without_content_length_is_cut_while_streaming(make_web):
    host = make_web(huge_size=256 * 2**20)  # more than any socket buffer: the server must block
    r, elapsed = timed_fetch(host.url("/huge-chunked.jpg"), max_bytes=2**20, timeout=10)
    assert r.status == "too_large" and r.error_message == f"body exceeds max_bytes={2**20}"
    assert elapsed < 5
    deadline = time.monotonic() + 5
    while "/huge-chunked.jpg" not in host.body_bytes_sent and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host.body_bytes_sent["/huge-chunked.jpg"] < 64 * 2**20  # the client hung up early


def test_byte_cap_counts_decompressed_bytes(web):
    # 3 MB of zeros gzip-compressed to a few KB: the Content-Length passes, the content must not.
    r = fetch(web.url("/gzip-bomb.jpg"), max_bytes=2**20)
    assert r.status == "too_large" and r.error_message == f"body exceeds max_bytes={2**20}"


@pytest.mark.parametrize("route", ["/sized/{n}", "/sized-chunked/{n}"])
def test_max_bytes_boundary(web, route):
    n = 100_000
    exact, over = fetch_all([web.url(route.format(n=n)), web.url(route.format(n=n + 1))], max_bytes=n)
    assert exact.status == "success" and len(exact.data) == n
    assert over.status == "too_large"


# -- private networks ----------------------------------------------------------------------------
def test_loopback_address_is_refused_unless_allowed(web):
    r = fetch(web.url("/img/0.jpg"), allow_private_network=False)
    assert (r.status, r.error_message) == ("skipped_private_network", "non-public address 127.0.0.1")
    assert web.requests == []  # not even robots.txt
    assert fetch(web.url("/img/0.jpg"), allow_private_network=True).status == "success"


def test_name_resolving_to_loopback_is_refused_at_connection_time(web, photos):
    url = f"http://localhost:{web.port}/img/0.jpg"
    r = fetch(url, allow_private_network=False)
    assert r.status == "skipped_private_network"
    assert r.error_message == "localhost resolves to non-public address 127.0.0.1"
    assert web.requests == []
    allowed = fetch(url, allow_private_network=True)
    assert allowed.status == "success" and allowed.data == photos[0].data


@pytest.mark.parametrize("ip", ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
                                "0.0.0.0", "::1", "fe80::1", "fd00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
                                "224.0.0.1", "240.0.0.1",
                                "100.64.0.1", "100.100.100.200"])  # shared space; Alibaba Cloud's metadata
def test_is_blocked_ip_blocks_non_public_addresses(ip):
    assert is_blocked_ip(ip)


@pytest.mark.parametrize("ip", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "93.184.216.34"])
def test_is_blocked_ip_allows_public_addresses(ip):
    assert not is_blocked_ip(ip)


# -- malformed URLs ------------------------------------------------------------------------------
@pytest.mark.parametrize("url, message", [
    ("not a url", "scheme '' not allowed"),
    ("ftp://example.com/a.jpg", "scheme 'ftp' not allowed"),
    ("file:///etc/passwd", "scheme 'file' not allowed"),
    ("http://", "URL has no host"),
    ("http://example.com:99999/a.jpg", "unparseable URL"),
    ("http://[::1/a.jpg", "unparseable URL"),
    # Names the resolver's IDNA codec cannot encode: they used to raise UnicodeError out of fetch().
    ("http://a..b/a.jpg", "not a valid DNS name"),
    ("http://.example.com/a.jpg", "not a valid DNS name"),
    ("http://" + "a" * 64 + ".com/a.jpg", "not a valid DNS name"),
    ("http://" + "a." * 127 + "com/a.jpg", "not a valid DNS name"),
])
def test_malformed_urls_are_invalid_without_any_request(web, url, message):
    r = fetch(url)
    assert r.status == "invalid_url" and message in r.error_message
    assert not r.retryable


# -- Retry-After parsing -------------------------------------------------------------------------
def test_parse_retry_after_seconds():
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 7 ") == 7.0
    assert parse_retry_after("0") == 0.0


def test_parse_retry_after_http_date():
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= parse_retry_after(future) <= 30.5
    past = email.utils.formatdate(time.time() - 3600, usegmt=True)
    assert parse_retry_after(past) == 0.0


@pytest.mark.parametrize("value", [None, "", "soon", "-5", "1.5e3x"])
def test_parse_retry_after_garbage(value):
    assert parse_retry_after(value) is None
