"""Shared fixtures: one Ray session, real photographs, a real HTTP server and a real S3 API on loopback.

The server (`web`) is a stdlib ThreadingHTTPServer speaking HTTP/1.1 with keep-alive; every path
below is a behaviour of the web the crawler must handle. It logs each request so tests can count
attempts (`web.hits(path)`) and robots.txt fetches.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

ROBOTS_TXT = "User-agent: *\nDisallow: /private/\n"
HTML_PAGE = b"<!doctype html><html><head><title>not an image</title></head><body>hello</body></html>\n"


# -- Ray -----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray for the whole session (crawls call `init_ray()`, which then reuses it)."""
    import ray

    from pipelines.runtime import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny CLIP trained here on drawn shapes (tests/tiny_clip.py), saved as a model folder."""
    from tests.tiny_clip import train_tiny_clip

    return train_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


# -- photographs ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Photo:
    name: str
    data: bytes  # JPEG as served
    width: int
    height: int
    pixels: np.ndarray  # RGB, what was encoded


def _crop(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """A centred crop of `rgb` of the given size, upscaling first when the source is too small."""
    h, w = rgb.shape[:2]
    scale = max(width / w, height / h, 1.0)
    if scale > 1.0:
        rgb = np.asarray(Image.fromarray(rgb).resize((math.ceil(w * scale), math.ceil(h * scale)),
                                                     Image.Resampling.LANCZOS))
        h, w = rgb.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    return np.ascontiguousarray(rgb[top:top + height, left:left + width])


def jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="session")
def photos() -> list[Photo]:
    """Real JPEG photographs (crops of scikit-image's samples) in sizes and shapes a crawl meets."""
    import skimage.data

    specs = [("chelsea", skimage.data.chelsea, 320, 240),
             ("coffee", skimage.data.coffee, 500, 400),
             ("rocket", skimage.data.rocket, 800, 600),
             ("astronaut", skimage.data.astronaut, 1024, 700),
             ("hubble", skimage.data.hubble_deep_field, 300, 560)]  # portrait, aspect ratio 1.87
    out = []
    for name, load, w, h in specs:
        rgb = _crop(load(), w, h)
        assert rgb.shape == (h, w, 3)
        out.append(Photo(f"{name}_{w}x{h}", jpeg_bytes(rgb), w, h, rgb))
    return out


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit PNG declaring width x height pixels; all zeros, so ~50 KB on the wire."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    rows_per_call = 200
    parts = [z.compress(row * rows_per_call) for _ in range(height // rows_per_call)]
    parts.append(z.compress(row * (height % rows_per_call)))
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def bomb_png() -> bytes:
    return png_bomb()


# -- the web -------------------------------------------------------------------------------------
def closed_port_url(path: str = "/img/0.jpg") -> str:
    """A URL on a loopback port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}{path}"


@dataclass(frozen=True)
class Request:
    path: str  # path and query
    host: str
    user_agent: str
    at: float


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every response has a Content-Length or is chunked
    server: "_Server"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        web = self.server.web
        web.record(self)
        try:
            web.dispatch(self)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout, byte cap)
            self.close_connection = True
        finally:
            web.done()

    def log_message(self, format: str, *args: object) -> None:
        pass

    # -- responses -------------------------------------------------------------------------
    def send(self, status: int, body: bytes = b"", content_type: str = "text/plain",
             headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def send_chunked(self, parts: Iterator[bytes], content_type: str = "image/jpeg") -> int:
        """Stream `parts` with Transfer-Encoding: chunked (no Content-Length); return bytes sent."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0
        try:
            for part in parts:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                sent += len(part)
            self.wfile.write(b"0\r\n\r\n")
        finally:
            self.server.web.body_bytes_sent[urlsplit(self.path).path] = sent
        return sent

    def redirect(self, location: str, status: int = 302) -> None:
        self.send(status, b"", headers={"Location": location})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    web: "WebServer"

    def handle_error(self, request, client_address) -> None:  # a client hanging up is not news
        pass


# robots.txt rules are cached per origin in every process that fetched them (the test process and
# Ray's workers), so a server must never reuse the port, hence the origin, of an earlier one.
_USED_PORTS: set[int] = set()


def _bind_unused_port() -> _Server:
    held = []
    try:
        while True:
            server = _Server(("127.0.0.1", 0), _Handler)
            if server.server_address[1] not in _USED_PORTS:
                _USED_PORTS.add(server.server_address[1])
                return server
            held.append(server)  # keep it bound so the next bind gets another port
    finally:
        for s in held:
            s.server_close()


class WebServer:
    """A real HTTP server on 127.0.0.1 with one route per behaviour the crawler has to handle.

    Routes:
      /robots.txt                 ROBOTS_TXT (or `robots_body`/`robots_status`, after `robots_delay`)
      /img/N.jpg                  photo N (after `image_delay` seconds); any query string is ignored
      /private/...                a photo, but disallowed by robots.txt
      /missing                    404
      /flaky/X                    500 the first time per path, then a photo
      /ratelimited/X              429 with Retry-After: 1 the first time per path, then a photo
      /unavailable/K/X            503 for the first K requests of the path, then a photo
      /slow                       sleeps `slow_seconds` before answering
      /drip                       headers at once, then the body a few bytes every 0.1 s
      /redirect/chain             302 -> 302 -> photo 1
      /redirect/loop              302 -> /redirect/loop/b -> 302 -> /redirect/loop
      /redirect/hops/N            N redirects, then photo 2
      /redirect/to-private        302 to a robots-disallowed path
      /redirect/nolocation        302 without a Location
      /noai.jpg                   photo with X-Robots-Tag: noai
      /scoped-noai.jpg            photo with X-Robots-Tag: pipelines-crawler: noai
      /otherbot-noai.jpg          photo with X-Robots-Tag: otherbot: noai, noimageai
      /truncated.jpg              the first third of photo 1
      /page.jpg                   HTML served as image/jpeg
      /bomb.png                   a 20000x20000 PNG of ~50 KB
      /huge.jpg                   `huge_size` bytes with a Content-Length, streamed
      /huge-chunked.jpg           `huge_size` bytes, chunked (no Content-Length)
      /gzip-bomb.jpg              `huge_size` bytes gzip-compressed to ~3 KB (Content-Encoding: gzip)
      /sized/N, /sized-chunked/N  exactly N bytes, with a Content-Length / chunked
      /reset                      closes the connection without a response
      /cut                        Content-Length 100000, sends 1000 bytes, closes
      /garbage                    a response that is not HTTP
    """

    def __init__(self, photos: list[Photo], bomb: bytes, *, robots_body: str = ROBOTS_TXT,
                 robots_status: int = 200, robots_delay: float = 0.0, image_delay: float = 0.0,
                 slow_seconds: float = 30.0, huge_size: int = 3 * 2**20):
        self.photos, self.bomb = photos, bomb
        self.robots_body, self.robots_status, self.robots_delay = robots_body, robots_status, robots_delay
        self.image_delay, self.slow_seconds, self.huge_size = image_delay, slow_seconds, huge_size
        self.requests: list[Request] = []
        self.active = self.max_active = 0  # requests being answered now / at most at once
        self.body_bytes_sent: dict[str, int] = {}
        self._lock = threading.Lock()
        self._seen: Counter = Counter()
        self._stop = threading.Event()
        self._httpd = _bind_unused_port()
        self._httpd.web = self
        self.port = self._httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"web-{self.port}", daemon=True)
        self._thread.start()
        self._routes: list[tuple[re.Pattern, Callable[..., None]]] = [
            (re.compile(p + r"$"), f) for p, f in [
                (r"/robots\.txt", self._robots), (r"/img/(\d+)\.jpg", self._img),
                (r"/private/.*", lambda r: self._photo(r, 0)), (r"/missing", lambda r: r.send(404, b"not found")),
                (r"/flaky/.*", self._flaky), (r"/ratelimited/.*", self._ratelimited),
                (r"/unavailable/(\d+)/.*", self._unavailable), (r"/slow", self._slow), (r"/drip", self._drip),
                (r"/redirect/chain", lambda r: r.redirect("/redirect/chain/2")),
                (r"/redirect/chain/2", lambda r: r.redirect(self.url("/img/1.jpg"))),
                (r"/redirect/loop", lambda r: r.redirect("/redirect/loop/b")),
                (r"/redirect/loop/b", lambda r: r.redirect(self.url("/redirect/loop"))),
                (r"/redirect/hops/(\d+)", self._hops),
                (r"/redirect/to-private", lambda r: r.redirect("/private/via-redirect.jpg")),
                (r"/redirect/nolocation", lambda r: r.send(302)),
                (r"/noai\.jpg", lambda r: self._photo(r, 0, {"X-Robots-Tag": "noai"})),
                (r"/scoped-noai\.jpg", lambda r: self._photo(r, 0, {"X-Robots-Tag": "pipelines-crawler: noai"})),
                (r"/otherbot-noai\.jpg", lambda r: self._photo(r, 0, {"X-Robots-Tag": "otherbot: noai, noimageai"})),
                (r"/truncated\.jpg", lambda r: r.send(200, photos[1].data[:len(photos[1].data) // 3], "image/jpeg")),
                (r"/page\.jpg", lambda r: r.send(200, HTML_PAGE, "image/jpeg")),
                (r"/bomb\.png", lambda r: r.send(200, self.bomb, "image/png")),
                (r"/huge\.jpg", self._huge),
                (r"/huge-chunked\.jpg", lambda r: r.send_chunked(self._body(self.huge_size))),
                (r"/gzip-bomb\.jpg", self._gzip_bomb),
                (r"/sized/(\d+)", lambda r, n: r.send(200, b"".join(self._body(int(n))), "image/jpeg")),
                (r"/sized-chunked/(\d+)", lambda r, n: r.send_chunked(self._body(int(n)))),
                (r"/reset", self._reset), (r"/cut", self._cut), (r"/garbage", self._garbage),
            ]]

    # -- for tests -------------------------------------------------------------------------
    def url(self, path: str) -> str:
        return self.base + path

    def hits(self, path: str) -> int:
        """Requests whose path (query excluded) is exactly `path`."""
        with self._lock:
            return sum(1 for r in self.requests if urlsplit(r.path).path == path)

    def hits_under(self, prefix: str) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.path.startswith(prefix))

    def close(self) -> None:
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    # -- plumbing --------------------------------------------------------------------------
    def record(self, req: _Handler) -> None:
        with self._lock:
            self.requests.append(Request(req.path, req.headers.get("Host", ""),
                                         req.headers.get("User-Agent", ""), time.monotonic()))
            self.active += 1
            self.max_active = max(self.max_active, self.active)

    def done(self) -> None:
        with self._lock:
            self.active -= 1

    def dispatch(self, req: _Handler) -> None:
        path = urlsplit(req.path).path
        for pattern, handler in self._routes:
            m = pattern.match(path)
            if m:
                return handler(req, *m.groups())
        req.send(404, b"no such route")

    def _attempt(self, path: str) -> int:
        """1 for the first request of `path`, 2 for the second, ..."""
        with self._lock:
            self._seen[path] += 1
            return self._seen[path]

    def _body(self, size: int, part: int = 1 << 16) -> Iterator[bytes]:
        """`size` bytes that start like a JPEG (the content does not matter, only the size)."""
        head = b"\xff\xd8\xff\xe0"
        yield head[:size]
        left = size - min(size, len(head))
        while left > 0:
            n = min(part, left)
            yield b"\x00" * n
            left -= n

    # -- routes ----------------------------------------------------------------------------
    def _photo(self, req: _Handler, index: int, headers: dict[str, str] | None = None) -> None:
        req.send(200, self.photos[index].data, "image/jpeg", headers)

    def _robots(self, req: _Handler) -> None:
        if self.robots_delay:
            self._stop.wait(self.robots_delay)
        req.send(self.robots_status, self.robots_body.encode())

    def _img(self, req: _Handler, index: str) -> None:
        if self.image_delay:
            self._stop.wait(self.image_delay)
        self._photo(req, int(index) % len(self.photos))

    def _flaky(self, req: _Handler) -> None:
        if self._attempt(req.path) == 1:
            return req.send(500, b"try again")
        self._photo(req, 2)

    def _ratelimited(self, req: _Handler) -> None:
        if self._attempt(req.path) == 1:
            return req.send(429, b"slow down", headers={"Retry-After": "1"})
        self._photo(req, 3)

    def _unavailable(self, req: _Handler, k: str) -> None:
        if self._attempt(req.path) <= int(k):
            return req.send(503, b"unavailable")
        self._photo(req, 1)

    def _slow(self, req: _Handler) -> None:
        self._stop.wait(self.slow_seconds)
        self._photo(req, 0)

    def _drip(self, req: _Handler) -> None:
        req.send_response(200)
        req.send_header("Content-Type", "image/jpeg")
        req.send_header("Content-Length", "1000")
        req.end_headers()
        for _ in range(100):
            req.wfile.write(b"\x00" * 10)
            req.wfile.flush()
            if self._stop.wait(0.1):
                return

    def _hops(self, req: _Handler, n: str) -> None:
        if int(n) > 0:
            return req.redirect(f"/redirect/hops/{int(n) - 1}")
        self._photo(req, 2)

    def _huge(self, req: _Handler) -> None:
        req.send_response(200)
        req.send_header("Content-Type", "image/jpeg")
        req.send_header("Content-Length", str(self.huge_size))
        req.end_headers()
        sent = 0
        try:
            for part in self._body(self.huge_size):
                req.wfile.write(part)
                sent += len(part)
        finally:
            self.body_bytes_sent["/huge.jpg"] = sent

    def _gzip_bomb(self, req: _Handler) -> None:
        body = gzip.compress(b"".join(self._body(self.huge_size)), 9)
        req.send(200, body, "image/jpeg", {"Content-Encoding": "gzip"})

    def _reset(self, req: _Handler) -> None:
        req.close_connection = True

    def _cut(self, req: _Handler) -> None:
        req.send_response(200)
        req.send_header("Content-Type", "image/jpeg")
        req.send_header("Content-Length", "100000")
        req.end_headers()
        req.wfile.write(b"\xff\xd8\xff\xe0" + b"\x00" * 996)
        req.wfile.flush()
        req.close_connection = True

    def _garbage(self, req: _Handler) -> None:
        req.wfile.write(b"THIS IS NOT HTTP AT ALL\r\n\r\n")
        req.close_connection = True


@pytest.fixture
def make_web(photos: list[Photo], bomb_png: bytes) -> Iterator[Callable[..., WebServer]]:
    """Start extra servers with non-default behaviour (robots.txt, delays); all stopped at the end."""
    servers: list[WebServer] = []

    def make(**options) -> WebServer:
        servers.append(WebServer(photos, bomb_png, **options))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


@pytest.fixture
def web(make_web: Callable[..., WebServer]) -> WebServer:
    """A fresh server per test, so attempt counters and the request log start empty."""
    return make_web()


# -- S3 ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class S3Server:
    """A real S3 API (moto's server mode) in its own process on a loopback port."""

    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        """The standard variables that point boto3, s3fs and pyarrow (so Ray Train too) at it, with fake
        credentials and no AWS config files: nothing can reach real AWS."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "fake", "AWS_SECRET_ACCESS_KEY": "fake",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """The S3 server, for the whole session. A process of its own: Ray's workers and the pipelines
    commands the tests start reach it over HTTP like any other client."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"the S3 server did not start on {endpoint}") from None
            time.sleep(0.1)
    yield S3Server(endpoint)
    proc.terminate()
    proc.wait(10)


@dataclass(frozen=True)
class Bucket:
    """A bucket on the test S3 server, with a boto3 client to check what the pipelines wrote."""

    name: str
    client: Any

    def url(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}"

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()

    def objects(self, prefix: str = "") -> dict[str, dict[str, Any]]:
        """Key -> listing (Size, ETag, LastModified) of every object under `prefix`."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return {o["Key"]: o for page in pages for o in page.get("Contents", [])}


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bucket]:
    """A new, empty bucket, with this process's environment (and so that of the commands a test starts)
    pointing every S3 client at the test server."""
    import boto3
    import s3fs

    for key in ("AWS_ENDPOINT_URL_S3", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()  # an instance made before holds its settings and listings
    client = boto3.client("s3")
    name = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    yield Bucket(name, client)
    s3fs.S3FileSystem.clear_instance_cache()


# -- a scripted web on another loopback address ----------------------------------------------------
class ScriptedWeb:
    """A real HTTP server whose answer for each path a test scripts (`answer(path, status, ...)`);
    other paths get 404. It listens on 127.0.0.2 by default, so that a test can allow exactly this
    address to a guarded crawl (`allowed_networks=["127.0.0.2/32"]`) while 127.0.0.1, where `web`
    listens, stays a refused private address: a hostile "public" site and a private target."""

    def __init__(self, address: str = "127.0.0.2"):
        self.requests: list[Request] = []
        self._answers: dict[str, tuple[int, bytes, dict[str, str]]] = {}
        self._lock = threading.Lock()
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                with scripted._lock:
                    scripted.requests.append(Request(self.path, self.headers.get("Host", ""),
                                                     self.headers.get("User-Agent", ""), time.monotonic()))
                status, body, headers = scripted._answers.get(urlsplit(self.path).path, (404, b"no such path", {}))
                # Written by hand: http.server cannot send a non-Latin-1 header; hostile servers do (UTF-8).
                head = [f"HTTP/1.1 {status} Scripted", f"Content-Length: {len(body)}"]
                head += [f"{k}: {v}" for k, v in headers.items()]
                self.wfile.write("\r\n".join(head).encode() + b"\r\n\r\n" + body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        while True:  # robots.txt rules are cached per origin: never reuse an earlier server's port
            self._httpd = _Server((address, 0), Handler)
            if self._httpd.server_address[1] not in _USED_PORTS:
                break
            self._httpd.server_close()
        self.port = self._httpd.server_address[1]
        _USED_PORTS.add(self.port)
        self.base = f"http://{address}:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"scripted-{self.port}", daemon=True)
        self._thread.start()

    def answer(self, path: str, status: int = 200, body: bytes | str = b"", headers: dict[str, str] | None = None,
               ) -> "ScriptedWeb":
        self._answers[path] = (status, body.encode() if isinstance(body, str) else body, headers or {})
        return self

    def redirect(self, path: str, location: str, status: int = 302) -> "ScriptedWeb":
        return self.answer(path, status, headers={"Location": location})

    def url(self, path: str) -> str:
        return self.base + path

    def hits(self, path: str) -> int:
        with self._lock:
            return sum(1 for r in self.requests if urlsplit(r.path).path == path)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


@pytest.fixture
def make_scripted_web() -> Iterator[Callable[..., ScriptedWeb]]:
    """Start scripted servers (`ScriptedWeb`); all stopped at the end."""
    servers: list[ScriptedWeb] = []

    def make(address: str = "127.0.0.2") -> ScriptedWeb:
        servers.append(ScriptedWeb(address))
        return servers[-1]

    yield make
    for s in servers:
        s.close()
