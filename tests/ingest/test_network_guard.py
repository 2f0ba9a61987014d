"""The network guard against real servers on loopback: no spelling of a private address, no redirect
(of a page or of robots.txt) and no shortcut of aiohttp's gets a request to a refused address.

`web` (tests/conftest.py) listens on 127.0.0.1 and plays the private target: a test passes only if it
received no request at all. `make_scripted_web` listens on 127.0.0.2, which the tests allow with
`allowed_networks`, and plays a hostile public site redirecting into the private network.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pydantic
import pytest

from pipelines.ingest.fetch import (
    BlockedAddress,
    FetchConfig,
    Fetcher,
    FetchResult,
    guarded_session,
    is_blocked_ip,
)

GUARDED = dict(retries=0, timeout=3.0)  # allow_private_network stays False
PUBLIC = ["127.0.0.2/32"]  # the scripted "public" site
REFUSED = {"skipped_private_network", "invalid_url"}

# Every way we know to write the loopback address (or a name for it) in a URL's authority. `{port}` is
# the private server's. Names must not reach it either, whether or not this machine resolves them.
LOOPBACK_SPELLINGS = [
    "127.0.0.1", "１２７.０.０.１", "①②⑦.⓪.⓪.①", "𝟏𝟐𝟕.𝟎.𝟎.𝟏", "127。0。0。1", "127．0．0．1", "127.0.0.1.",
    "127.0.0.1..", "2130706433", "0177.0.0.1", "0x7f.1", "0x7f000001", "0x7f.0x0.0x0.0x1", "017700000001",
    "127.1", "127.0.1", "0", "0.0.0.0", "127.000.000.001", "0000127.0.0.1", "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]", "[0:0:0:0:0:ffff:7f00:1]", "[::FFFF:127.0.0.1]", "[::1]", "[::]",
    "[0000:0000:0000:0000:0000:0000:0000:0001]", "[::127.0.0.1]", "[::ffff:0:127.0.0.1]",
    "[64:ff9b::127.0.0.1]", "[2002:7f00:1::]", "[fe80::1%25lo]", "a@127.0.0.1", "a:b@127.0.0.1",
    "user@１２７.０.０.１", "%31%32%37.0.0.1", "127.0.0.1%2e", "localhost", "LOCALHOST", "localhost.",
    "ｌｏｃａｌｈｏｓｔ", "lOcAlHoSt",
]
NAMES = {"%31%32%37.0.0.1", "127.0.0.1%2e", "localhost", "LOCALHOST", "localhost.", "ｌｏｃａｌｈｏｓｔ", "lOcAlHoSt"}


def expected_statuses(spelling: str) -> set[str]:
    # A name that does not resolve here fails as a DNS error: never a request either.
    return REFUSED | {"failed_to_download"} if spelling in NAMES else REFUSED


def fetch_all(urls: list[str], **config) -> list[FetchResult]:
    async def main() -> list[FetchResult]:
        async with Fetcher(FetchConfig(**{**GUARDED, **config})) as fetcher:
            return await asyncio.gather(*(fetcher.fetch(u) for u in urls))
    return asyncio.run(main())


# -- URLs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", LOOPBACK_SPELLINGS)
def test_no_spelling_of_loopback_gets_a_request(web, spelling):
    r, = fetch_all([f"http://{spelling}:{web.port}/img/0.jpg"])
    assert r.status in expected_statuses(spelling), r
    assert web.requests == []  # not even robots.txt


@pytest.mark.parametrize("spelling", ["１２７.０.０.１", "①②⑦.⓪.⓪.①", "127.0.0.1.", "[::ffff:127.0.0.1]"])
def test_unicode_and_dotted_spellings_are_refused_as_the_address_they_are(web, spelling):
    r, = fetch_all([f"http://{spelling}:{web.port}/img/0.jpg"])
    assert r.status == "skipped_private_network", r
    assert "non-public address" in r.error_message


@pytest.mark.parametrize("spelling", ["2130706433", "0x7f.1", "0177.0.0.1", "127.1"])
def test_legacy_numeric_ipv4_hosts_are_invalid(web, spelling):
    r, = fetch_all([f"http://{spelling}:{web.port}/img/0.jpg"], allow_private_network=True)
    assert r.status == "invalid_url" and "non-canonical IPv4" in r.error_message, r
    assert web.requests == []


# -- redirects -----------------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", LOOPBACK_SPELLINGS)
def test_no_redirect_into_the_private_network_is_followed(web, make_scripted_web, spelling):
    site = make_scripted_web().redirect("/a.jpg", f"http://{spelling}:{web.port}/img/0.jpg")
    r, = fetch_all([site.url("/a.jpg")], allowed_networks=PUBLIC)
    assert r.status in expected_statuses(spelling), r
    assert site.hits("/a.jpg") == 1
    assert web.requests == []


@pytest.mark.parametrize("spelling", ["127.0.0.1", "１２７.０.０.１", "[::ffff:127.0.0.1]", "localhost", "0x7f.1"])
def test_robots_txt_redirecting_into_the_private_network_is_not_followed(web, make_scripted_web, spelling):
    site = make_scripted_web().redirect("/robots.txt", f"http://{spelling}:{web.port}/robots.txt")
    site.answer("/a.jpg", 200, b"\xff\xd8\xff\xe0", {"Content-Type": "image/jpeg"})
    r, = fetch_all([site.url("/a.jpg")], allowed_networks=PUBLIC)
    assert web.requests == []
    # Robots rules that cannot be read safely disallow the site (RFC 9309: unreachable robots.txt).
    assert (r.status, r.retryable) == ("skipped_robots", True), r
    assert "refused" in r.error_message
    assert site.hits("/a.jpg") == 0


def test_robots_txt_redirects_to_allowed_hosts_are_followed_hop_by_hop(make_scripted_web):
    site, rules = make_scripted_web(), make_scripted_web()
    site.redirect("/robots.txt", site.url("/robots/1"), 301).redirect("/robots/1", rules.url("/rules.txt"), 308)
    rules.answer("/rules.txt", 200, "User-agent: *\nDisallow: /private/\n")
    site.answer("/a.jpg", 200, b"\xff\xd8\xff\xe0")
    ok, private = fetch_all([site.url("/a.jpg"), site.url("/private/b.jpg")], allowed_networks=PUBLIC)
    assert (ok.status, private.status) == ("success", "skipped_robots")
    assert rules.hits("/rules.txt") == 1 and site.hits("/private/b.jpg") == 0


def test_robots_txt_redirecting_more_than_five_times_means_no_rules(make_scripted_web):
    site = make_scripted_web()
    for i in range(7):
        site.redirect(f"/robots/{i}" if i else "/robots.txt", site.url(f"/robots/{i + 1}"))
    site.answer("/robots/7", 200, "User-agent: *\nDisallow: /\n").answer("/a.jpg", 200, b"jpeg")
    r, = fetch_all([site.url("/a.jpg")], allowed_networks=PUBLIC)
    assert r.status == "success"
    assert site.hits("/robots/5") == 1 and site.hits("/robots/6") == 0  # RFC 9309: at least five followed


# -- the connection layer ------------------------------------------------------------------------
@pytest.mark.parametrize("spelling", ["127.0.0.1", "１２７.０.０.１", "[::ffff:127.0.0.1]", "[::1]", "localhost"])
def test_the_session_itself_refuses_to_connect_to_private_addresses(web, spelling):
    # Below the Fetcher's URL checks: whatever request the crawler's session makes, the socket
    # factory sees the address it connects to (for IP literals, which skip the resolver, too).
    async def main() -> None:
        async with guarded_session(FetchConfig(**GUARDED)) as session:
            with pytest.raises(aiohttp.ClientConnectorError) as refused:
                await session.get(f"http://{spelling}:{web.port}/img/0.jpg")
            assert isinstance(refused.value.os_error, BlockedAddress), refused.value.os_error
    asyncio.run(main())
    assert web.requests == []


def test_the_session_refuses_redirects_that_aiohttp_follows_itself(web, make_scripted_web):
    site = make_scripted_web().redirect("/a.jpg", f"http://１２７.０.０.１:{web.port}/img/0.jpg")

    async def main() -> None:
        async with guarded_session(FetchConfig(**GUARDED, allowed_networks=PUBLIC)) as session:
            with pytest.raises(aiohttp.ClientConnectorError) as refused:
                await session.get(site.url("/a.jpg"), allow_redirects=True)
            assert isinstance(refused.value.os_error, BlockedAddress), refused.value.os_error
    asyncio.run(main())
    assert site.hits("/a.jpg") == 1 and web.requests == []


def test_allowed_networks_allow_only_themselves(web, make_scripted_web):
    site = make_scripted_web().answer("/a.jpg", 200, b"jpeg")
    public, private = fetch_all([site.url("/a.jpg"), web.url("/img/0.jpg")], allowed_networks=PUBLIC)
    assert public.status == "success" and public.data == b"jpeg"
    assert private.status == "skipped_private_network"
    assert web.requests == []


def test_allowed_networks_must_be_networks():
    with pytest.raises(pydantic.ValidationError, match="allowed_networks"):
        FetchConfig(allowed_networks=["10.0.0.0/33"])


# -- addresses -----------------------------------------------------------------------------------
@pytest.mark.parametrize("ip", [
    "::7f00:1",  # IPv4-compatible ::127.0.0.1
    "::ffff:0:7f00:1",  # IPv4-translated (SIIT)
    "64:ff9b::7f00:1", "64:ff9b::a00:1",  # NAT64 well-known prefix to 127.0.0.1, 10.0.0.1
    "64:ff9b:1::1",  # NAT64 local-use prefix
    "2002:7f00:1::", "2002:a00:1::1",  # 6to4 of 127.0.0.1, 10.0.0.1
    "fec0::1",  # deprecated site-local
    "192.0.0.8", "255.255.255.255", "0.1.2.3", "ff02::1", "fe80::1%lo",
    "127.1", "１２７.０.０.１", "not an address",  # not strict literals: refused, never dialled
])
def test_is_blocked_ip_blocks_ipv4_hidden_in_ipv6_and_other_non_public_addresses(ip):
    assert is_blocked_ip(ip)


@pytest.mark.parametrize("ip", ["64:ff9b::808:808", "2002:808:808::1", "::ffff:8.8.8.8"])
def test_is_blocked_ip_allows_public_ipv4_in_ipv6(ip):
    assert not is_blocked_ip(ip)
