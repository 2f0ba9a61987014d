"""`make demo`: build a small sample web on loopback and run the pipeline on the embedded defaults.

The sample: real photographs (crops of scikit-image's sample photos) with captions, a few planted
faults (dead links, HTML served as JPEG, a robots.txt-disallowed folder, an `X-Robots-Tag: noai`
image), and article pages made of real text (the package descriptions installed in this venv).
It is served by a real HTTP server on 127.0.0.1; the crawls pass `allow_private_network` for that.
Running it again resumes: finished shards are skipped.
"""

from __future__ import annotations

import email
import functools
import html
import io
import json
import random
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path

from rich.console import Console
from rich.table import Table

OUT = Path("demo-out")


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


def build_sample(root: Path, base_url: str, n_images: int = 240, n_pages: int = 60) -> dict[str, Path]:
    """Write the web root and the two URL lists plus a small text corpus; return their paths."""
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

    docs = []
    for dist in sorted(metadata.distributions(), key=lambda d: d.metadata["Name"] or ""):
        body = email.message_from_string(dist.read_text("METADATA") or "").get_payload() or ""
        if len(body.split()) >= 120:
            docs.append((dist.metadata["Name"], body))
        if len(docs) >= n_pages:
            break
    pages, corpus = [], []
    for i, (name, body) in enumerate(docs):
        paras = "".join(f"<p>{html.escape(p.strip())}</p>\n" for p in body.split("\n\n") if p.strip())
        page = (f"<!doctype html><html lang='en'><head><title>{html.escape(name)}</title></head><body>"
                f"<nav><a href='/'>Home</a> | <a href='/about'>About</a></nav>"
                f"<article><h1>{html.escape(name)}</h1>\n{paras}</article>"
                f"<footer>Demo site footer</footer></body></html>")
        (www / "pages" / f"{i:04d}.html").write_text(page)
        pages.append({"url": f"{base_url}/pages/{i:04d}.html"})
        corpus.append({"id": f"pkg-{name}", "text": body})
    (root / "pages.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pages))
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    return {"www": www, "images": images, "pages": root / "pages.jsonl", "corpus": root / "corpus.jsonl"}


class DemoHandler(SimpleHTTPRequestHandler):
    """Static files; paths containing `-noai` carry the `X-Robots-Tag: noai` opt-out."""

    def end_headers(self) -> None:
        if "-noai" in self.path:
            self.send_header("X-Robots-Tag", "noai")
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve(www: Path) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(DemoHandler, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> int:
    from pipelines.ingest.images import ImageCrawlConfig, crawl_images
    from pipelines.ingest.text import TextCrawlConfig, crawl_text

    console = Console()
    sample_dir = OUT / "sample"
    # The handler looks its folder up per request, so it can serve before the sample exists;
    # the sample's URL lists need the port.
    server = serve(sample_dir / "www")
    base = f"http://127.0.0.1:{server.server_address[1]}"
    paths = build_sample(sample_dir, base)
    console.print(f"[bold]demo[/bold]: sample web served at {base} from {paths['www']}")
    try:
        fetch = {"allow_private_network": True}
        jobs = [
            ("images", crawl_images, ImageCrawlConfig(input=str(paths["images"]), output=str(OUT / "shards/images"),
                                                      shard_size=100, fetch=fetch)),
            ("web pages", crawl_text, TextCrawlConfig(input=str(paths["pages"]), output=str(OUT / "shards/pages"),
                                                      source="urls", shard_size=50, fetch=fetch)),
            ("text files", crawl_text, TextCrawlConfig(input=str(paths["corpus"]),
                                                       output=str(OUT / "shards/corpus"), shard_size=50)),
        ]
        runs = [(name, config.output, crawl(config)) for name, crawl, config in jobs]
    finally:
        server.shutdown()
    table = Table(title="demo: ingest")
    for col in ("crawl", "rows", "samples", "shards", "manifest digest", "output"):
        table.add_column(col)
    for name, output, result in runs:
        m = result.manifest
        table.add_row(name, str(m["stats"]["total"]), str(m["samples"]), str(len(m["shards"])),
                      m["digest"][:12], output)
    console.print(table)

    from pipelines.config import load_config
    from pipelines.curate.run import CurateConfig, curate

    configs = Path(__file__).resolve().parent.parent / "configs" / "curate"
    curated = []
    for name, source, config in (("images", "shards/images", "images-default.yaml"),
                                 ("text files", "shards/corpus", "text-default.yaml")):
        overrides = {("input",): str(OUT / source), ("output",): str(OUT / "curated" / source.split("/")[1])}
        curated.append((name, curate(load_config(CurateConfig, configs / config, overrides))))
    table = Table(title="demo: curate")
    for col in ("shards", "samples in", "kept", "removed by", "report"):
        table.add_column(col)
    for name, result in curated:
        removed = ", ".join(f"{s['step']} {s['in'] - s['kept']}" for s in result.stats["steps"] if s["in"] > s["kept"])
        table.add_row(name, str(result.stats["input"]["samples"]), str(result.stats["output"]["samples"]),
                      removed or "-", f"{result.stats['output']['path']}/report.html")
    console.print(table)
    ok = all(r.ok for _, _, r in runs) and all(r.ok for _, r in curated)
    console.print("[green]demo finished[/green]" if ok else "[red]demo finished with failed shards[/red]")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
