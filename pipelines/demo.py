"""`make demo`: build a small sample web on loopback and run the end-to-end flow on the embedded defaults.

The sample: real photographs (crops of scikit-image's sample photos) with captions, a few planted
faults (dead links, HTML served as JPEG, a robots.txt-disallowed folder, an `X-Robots-Tag: noai`
image); article pages made of real text (the descriptions of the packages installed in this venv);
and question/answer pairs about those packages for the fine-tune. It is served by a real HTTP server
on 127.0.0.1 (the crawls pass `allow_private_network` for that), and `end-to-end` (pipelines/flows.py)
crawls it, curates, pretrains, fine-tunes, registers, serves and sends one request. Running it again
takes every unchanged stage from Prefect's cache; `make ui` shows the records.
"""

from __future__ import annotations

import atexit
import email
import functools
import html
import importlib.util
import io
import json
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path

from rich.console import Console

from pipelines.errors import PipelineError

OUT = Path("demo-out")
# The printed commands work as typed: the venv's entry point, unless the venv is active.
BIN = "" if os.environ.get("VIRTUAL_ENV") or not Path(".venv/bin/pipelines").exists() else ".venv/bin/"


def sample_photos() -> list[tuple[str, "object"]]:
    """(name, PIL image) for scikit-image's colour sample photographs."""
    import numpy as np
    import skimage
    from PIL import Image

    folder = Path(skimage.__file__).parent / "data"
    photos = []
    for path in sorted(folder.glob("*")):
        if path.suffix not in (".png", ".jpg"):
            continue
        pixels = np.asarray(Image.open(path))
        if pixels.ndim == 3 and min(pixels.shape[:2]) >= 300:
            photos.append((path.stem.replace("_", " "), Image.fromarray(pixels[..., :3])))
    return photos


def build_sample(root: Path, base_url: str, n_images: int = 240, n_pages: int = 200) -> dict[str, Path]:
    """Write the web root, the two URL lists and question/answer
    examples about them; return their paths."""
    rng = random.Random(0)
    www = root / "www"
    (www / "img").mkdir(parents=True, exist_ok=True)
    (www / "private").mkdir(exist_ok=True)
    (www / "pages").mkdir(exist_ok=True)
    (www / "robots.txt").write_text("User-agent: *\nDisallow: /private/\n")
    photos = sample_photos()
    rows = []
    for i in range(n_images):
        name, photo = rng.choice(photos)
        w, h = photo.size
        cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = photo.crop((x, y, x + cw, y + ch))
        folder = "private" if i % 40 == 7 else "img"
        path = f"{folder}/{i:05d}{'-noai' if i % 40 == 13 else ''}.jpg"
        if i % 40 == 21:
            path = f"img/{i:05d}-missing.jpg"  # never written: a dead link
        elif i % 40 == 29:
            (www / path).write_bytes(b"<html><body>this is not an image</body></html>")
        else:
            buf = io.BytesIO()
            crop.save(buf, "JPEG", quality=90)
            (www / path).write_bytes(buf.getvalue())
        rows.append({"url": f"{base_url}/{path}", "caption": f"a photo of {name}", "source": "demo"})
    images = root / "images.jsonl"
    images.write_text("".join(json.dumps(r) + "\n" for r in rows))

    docs, examples, seen = [], [], set()
    for dist in sorted(metadata.distributions(), key=lambda d: (d.metadata.get("Name") or "").lower()):
        name, summary = dist.metadata.get("Name"), (dist.metadata.get("Summary") or "").strip()
        if not name or name.lower() in seen:
            continue
        seen.add(name.lower())
        if len(summary.split()) >= 3:
            examples.append({"prompt": f"What is the Python package {name} for?", "response": summary})
        body = email.message_from_string(dist.read_text("METADATA") or "").get_payload() or ""
        if len(body.split()) >= 120 and len(docs) < n_pages:
            docs.append((name, body))
    pages = []
    for i, (name, body) in enumerate(docs):
        paras = "".join(f"<p>{html.escape(p.strip())}</p>\n" for p in body.split("\n\n") if p.strip())
        page = (f"<!doctype html><html lang='en'><head><title>{html.escape(name)}</title></head><body>"
                f"<nav><a href='/'>Home</a> | <a href='/about'>About</a></nav>"
                f"<article><h1>{html.escape(name)}</h1>\n{paras}</article>"
                f"<footer>Demo site footer</footer></body></html>")
        (www / "pages" / f"{i:04d}.html").write_text(page)
        pages.append({"url": f"{base_url}/pages/{i:04d}.html"})
    (root / "pages.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pages))
    (root / "instructions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in examples))
    return {"www": www, "images": images, "pages": root / "pages.jsonl",
            "instructions": root / "instructions.jsonl"}


class DemoHandler(SimpleHTTPRequestHandler):
    """Static files; paths containing `-noai` carry the `X-Robots-Tag: noai` opt-out."""

    def end_headers(self) -> None:
        if "-noai" in self.path:
            self.send_header("X-Robots-Tag", "noai")
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve(www: Path, port: int) -> ThreadingHTTPServer:
    """Serve `www` on 127.0.0.1:`port` (any free port if that one is taken)."""
    handler = functools.partial(DemoHandler, directory=str(www))
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# A fixed port keeps the URL lists, so a second `make demo` finds every stage in the cache.
SAMPLE_PORT = 8765


class _PrefectApi:
    """Prefect's temporary API server, started as Prefect starts it where no server is configured (its
    `SubprocessASGIServer`: uvicorn on Prefect's app factory, in a process of its own, the UI off), but first
    thing, before anything imports Prefect. Prefect's own way imports its whole server package in this process
    first (about 2 s, and 4 s beside the flow's imports, which it holds the GIL against) and is only then
    started; here its process starts at once and comes up while the flow's modules load and the local Ray
    starts. Prefect then finds it in PREFECT_API_URL. Where PREFECT_API_URL is already set, nothing is
    started."""

    def __init__(self) -> None:
        from pipelines.runtime import prefect_env

        prefect_env()
        self.proc: subprocess.Popen | None = None
        if os.environ.get("PREFECT_API_URL"):
            return
        self._start()
        atexit.register(self.stop)  # before Prefect registers its exit functions: after them, it stops

    def _start(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        spec = importlib.util.find_spec("prefect")
        assert spec is not None and spec.origin is not None
        self.url = f"http://127.0.0.1:{port}/api"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(spec.origin).parent.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "error", "--lifespan", "on"],
            env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                 "PREFECT__SERVER_FINAL": "1"})
        os.environ["PREFECT_API_URL"] = self.url
        # Prefect prints a flow run's page under this server, which has no UI and stops with the demo; `make ui`
        # serves the same records there.
        os.environ.setdefault("PREFECT_UI_URL", "http://127.0.0.1:4200")

    def wait(self) -> None:
        """Until the server answers; a start that failed (its port taken meanwhile) is tried again, twice."""
        if self.proc is None:
            return
        deadline = time.monotonic() + float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
        tries = 3
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                tries -= 1
                if not tries:
                    raise PipelineError(f"Prefect's temporary API server exited with code {self.proc.returncode} "
                                        "while starting (its output is above)")
                self._start()
            if time.monotonic() > deadline:
                raise PipelineError(f"Prefect's temporary API server did not answer at {self.url} within "
                                    f"{os.environ['PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS']} s")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def main() -> int:
    # Prefect's temporary API server takes the longest to come up (its own process, about 3 s here): it starts
    # first, and comes up while the flow's modules are imported, the sample is built and the local Ray starts.
    api = _PrefectApi()
    from pipelines.config import load_config
    from pipelines.flows import CONFIGS, EndToEndConfig, end_to_end, mlflow_ui_url, start_ray, summary_table
    from pipelines.runtime import wide_when_piped

    wide_when_piped()
    console = Console()
    sample_dir = OUT / "sample"
    # The handler looks its folder up per request, so it can serve before the sample exists;
    # the sample's URL lists need the port.
    server = serve(sample_dir / "www", SAMPLE_PORT)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    paths = build_sample(sample_dir, base)
    console.print(f"[bold]demo[/bold]: sample web served at {base} from {paths['www']}")
    config = load_config(EndToEndConfig, CONFIGS / "flows" / "demo.yaml", {
        ("workdir",): str(OUT.absolute()), ("images", "input"): str(paths["images"]),
        ("text", "input"): str(paths["pages"]), ("finetune", "examples", "data"): str(paths["instructions"])})
    try:
        start_ray(config)
        api.wait()
        outcomes = end_to_end(config)
    except PipelineError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return 2
    finally:
        server.shutdown()
    console.print(summary_table(outcomes, title="demo: end-to-end"))
    deployed = outcomes.get("deploy", {}).get("result", {})
    lm = outcomes["pretrain"]["result"]["model_uri"]
    chat = outcomes.get("finetune", {}).get("result", {}).get("adapter_uri")
    console.print(f"endpoint (up while the demo ran): {deployed.get('url')}/v1, model {deployed.get('model')!r}")
    console.print(f"answer: {deployed.get('answer')!r}")
    drawer = outcomes.get("pretrain-diffusion", {}).get("result", {})
    image = deployed.get("image")
    if image:
        console.print(f"the image model drew {image['prompt']!r} through the same endpoint: a {image['size']} PNG "
                      f"in {image['ms']} ms")
    also = f" --also {drawer['model_uri']}" if drawer.get("model_uri") else ""
    adapter = f" --adapter {chat}" if chat else ""
    console.print(f"serve them again: {BIN}pipelines serve --model {lm}{adapter}{also}", highlight=False,
                  soft_wrap=True)
    if drawer.get("model_uri"):
        from pipelines.flows import _sample_grid

        grid = _sample_grid(drawer["mlflow_run_id"], drawer["steps"])
        if grid:
            (OUT / "samples.png").write_bytes(grid)
            console.print(f"images the text-to-image model drew for held-out captions: {OUT / 'samples.png'} "
                          "(32x32 pixels after a few CPU minutes: blurry colour fields, by design)")
        name = drawer["model_uri"].removeprefix("models:/").split("/")[0]
        console.print("then ask it for a picture:")
        console.print("  curl -s http://127.0.0.1:8000/v1/images/generations -H 'Content-Type: application/json' "
                      f"-d '{{\"model\": \"{name}\", \"prompt\": \"a photo of coffee\"}}' | {BIN}python -c "
                      "\"import sys, json, base64; sys.stdout.buffer.write(base64.b64decode(json.load(sys.stdin)"
                      "['data'][0]['b64_json']))\" > coffee.png", highlight=False, soft_wrap=True)
    clip = outcomes.get("pretrain-clip", {}).get("result", {}).get("model_uri")
    if clip:
        console.print(f"the CLIP model (embeddings, image-caption similarity): {BIN}pipelines serve --model {clip}",
                      highlight=False, soft_wrap=True)
    console.print(f"browse the Prefect and MLflow records: make ui (Prefect http://127.0.0.1:4200, "
                  f"MLflow {mlflow_ui_url()})")
    console.print("[green]demo finished[/green]")
    from pipelines.runtime import stop_local_ray

    stop_local_ray()  # now, not from Ray's exit function, which waits 1.5 s for nothing (see there)
    return 0


# The interpreter's own teardown, after the exit functions have run (Prefect's server stop and log flush, Ray's
# shutdown, MLflow's), took about 2 s here, all in native code (no Python frame in it): the libraries' destructors.
# Once those functions have run nothing is left to clean up, so the demo leaves without it.
_exit_code: int | None = None


def _leave_without_teardown() -> None:
    if _exit_code is None:
        return  # main() raised: the usual way out, traceback and all
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()  # the one exit function registered before this one (when logging was imported)
    os._exit(_exit_code)


if __name__ == "__main__":
    atexit.register(_leave_without_teardown)  # before Ray, Prefect and MLflow register theirs: it runs last
    _exit_code = main()
    sys.exit(_exit_code)
