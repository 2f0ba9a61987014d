"""`crawl_images` end to end: a real server on loopback, real Ray, shards read back with webdataset."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipelines.errors import PipelineError
from pipelines.ingest.images import METADATA_SCHEMA, ImageCrawlConfig, crawl_images
from tests.conftest import closed_port_url

pytestmark = pytest.mark.usefixtures("ray_cluster")

PIPELINES = str(Path(sys.executable).with_name("pipelines"))
FAST_FETCH = dict(allow_private_network=True, timeout=1.5, retries=1, backoff=0.05, max_bytes=2**20)


# -- helpers -------------------------------------------------------------------------------------
def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    """Rows as JSON lines; a str row is written verbatim (for malformed lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def make_config(tmp_path: Path, rows: list[dict | str], *, out: str = "out", image: dict | None = None,
                fetch: dict | None = None, **options: Any) -> ImageCrawlConfig:
    source = tmp_path / "urls.jsonl"
    if not source.exists():
        write_jsonl(source, rows)
    return ImageCrawlConfig(input=str(source), output=str(tmp_path / out),
                            image={"image_size": 64, **(image or {})}, fetch={**FAST_FETCH, **(fetch or {})},
                            quiet=True, **{"shard_size": 8, **options})


def metadata(out: Path) -> list[dict]:
    """Every row of every shard's parquet, in shard then input order."""
    rows = []
    for p in sorted(out.glob("*.parquet")):
        rows.extend(pq.read_table(p).to_pylist())
    return rows


def samples(out: Path) -> list[dict]:
    """Every sample of the output, read the way a training job reads it."""
    tars = [str(p) for p in sorted(out.glob("*.tar"))]
    return list(wds.WebDataset(tars, shardshuffle=False, empty_check=False))


def files_of(sample: dict) -> dict:
    """A webdataset sample without the reader's own fields (`__url__`, ...)."""
    return {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(out: Path) -> dict[str, tuple[str, int]]:
    """Content digest and mtime of every shard file (not the manifest, which each run rewrites, nor the
    lock file, which names the run holding the output)."""
    return {p.name: (sha256(p), p.stat().st_mtime_ns) for p in sorted(out.iterdir())
            if p.name not in ("manifest.json", ".lock")}


def check_manifest(out: Path, result) -> dict:
    """The manifest on disk is the result's, lists every shard, and its digests match the tars."""
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == result.manifest
    tars = sorted(p.name for p in out.glob("*.tar"))
    assert [s["tar"] for s in manifest["shards"]] == tars
    for s in manifest["shards"]:
        tar = out / s["tar"]
        assert s["sha256"] == sha256(tar)
        with tarfile.open(tar) as t:  # opens fully: no partial tar
            names = t.getnames()
        assert s["samples"] == len({n.partition(".")[0] for n in names})
        assert s["rows"] == pq.read_metadata(out / s["parquet"]).num_rows
        stats = json.loads((out / s["stats"]).read_text())
        assert (stats["samples"], stats["count"], stats["tar_sha256"]) == (s["samples"], s["rows"], s["sha256"])
    assert manifest["samples"] == sum(s["samples"] for s in manifest["shards"])
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    return manifest


def img2dataset_size(mode: str, w: int, h: int, size: int) -> tuple[int, int]:
    """Output size in img2dataset: albumentations' SmallestMaxSize/LongestMaxSize, CenterCrop, PadIfNeeded."""
    if mode == "no":
        return w, h
    side = min(w, h) if mode in ("keep_ratio", "center_crop") else max(w, h)
    w, h = round(w * size / side), round(h * size / side)
    return (size, size) if mode in ("center_crop", "border") else (w, h)


# -- one crawl over every case -------------------------------------------------------------------
def every_case(web) -> list[tuple[Any, str]]:
    """(input row, expected status), covering every behaviour of the test web and of bad input."""
    u = web.url
    cases: list[tuple[Any, str]] = [
        (u("/img/0.jpg"), "success"), (u("/img/1.jpg"), "success"), (u("/img/2.jpg"), "success"),
        (u("/img/3.jpg"), "success"), (u("/img/4.jpg"), "filtered"),  # 300x560 > max_aspect_ratio 1.8
        (u("/flaky/1"), "success"), (u("/ratelimited/1"), "success"), (u("/redirect/chain"), "success"),
        (u("/otherbot-noai.jpg"), "success"),
        (u("/missing"), "failed_to_download"), (u("/slow"), "failed_to_download"),
        (u("/redirect/loop"), "failed_to_download"), (u("/redirect/hops/9"), "failed_to_download"),
        (u("/unavailable/9/a"), "failed_to_download"), (closed_port_url(), "failed_to_download"),
        (u("/private/a.jpg"), "skipped_robots"), (u("/redirect/to-private"), "skipped_robots"),
        (u("/noai.jpg"), "skipped_opt_out"), (u("/scoped-noai.jpg"), "skipped_opt_out"),
        (u("/truncated.jpg"), "failed_to_decode"), (u("/page.jpg"), "not_an_image"),
        (u("/bomb.png"), "too_large"), (u("/huge.jpg"), "too_large"), (u("/huge-chunked.jpg"), "too_large"),
        ("not a url", "invalid_url"), ("ftp://x", "invalid_url"), ("", "invalid_url"), ("   ", "invalid_url"),
    ]
    rows: list[tuple[Any, str]] = [
        ({"url": url, "caption": f"caption {i} – ein Bild 猫", "row": i, "license": f"cc-{i % 3}"}, status)
        for i, (url, status) in enumerate(cases)]
    rows.append(('{"url": "http://broken', "invalid_row"))  # malformed JSON line
    rows.append(({"link": u("/img/0.jpg"), "caption": "no url column", "row": len(rows)}, "invalid_url"))
    rows.append(({"url": u("/img/1.jpg?nocaption"), "row": len(rows)}, "success"))  # no caption: no .txt
    return rows


def test_crawl_writes_the_right_status_for_every_row(tmp_path, web, photos):
    cases = every_case(web)
    config = make_config(tmp_path, [r for r, _ in cases], image={"max_aspect_ratio": 1.8})
    result = crawl_images(config)
    out = Path(config.output)

    assert result.ok and result.failed_shards == {}
    n_shards = -(-len(cases) // 8)
    assert (result.written, result.skipped) == (n_shards, 0)

    # Every row, in input order, with its status.
    meta = metadata(out)
    assert len(meta) == len(cases)
    assert [m["status"] for m in meta] == [status for _, status in cases]
    assert [m["key"] for m in meta] == [f"{i // 8:05d}{i % 8}" for i in range(len(cases))]
    by_url = {m["url"]: m for m in meta if m["url"]}

    # Extra input columns are carried, types kept.
    assert set(meta[0]) == {f.name for f in METADATA_SCHEMA} | {"row", "license"}
    assert meta[-2]["link"] == web.url("/img/0.jpg") and meta[-2]["caption"] == "no url column"
    assert [m["row"] for m in meta if m["row"] is not None] == \
        [i for i, (r, _) in enumerate(cases) if isinstance(r, dict)]

    # Causes of failures, attempts and retryability.
    def row(path: str) -> dict:
        return by_url[web.url(path)]

    assert (row("/missing")["http_status"], row("/missing")["error_message"], row("/missing")["retryable"]) == \
        (404, "HTTP 404", False)
    assert row("/slow")["retryable"] and row("/slow")["error_message"] == "timeout after 1.5s (after 2 attempts)"
    assert row("/redirect/loop")["error_message"] == "redirect loop"
    assert row("/redirect/hops/9")["error_message"] == "too many redirects (>5)"
    assert row("/unavailable/9/a")["error_message"] == "HTTP 503 (after 2 attempts)"
    assert row("/unavailable/9/a")["retryable"]
    refused = next(m for m in meta if m["url"] == cases[14][0]["url"])
    assert refused["retryable"] and "connection error" in refused["error_message"]
    assert row("/private/a.jpg")["error_message"] == "disallowed by robots.txt"
    assert row("/redirect/to-private")["final_url"] == web.url("/private/via-redirect.jpg")
    assert row("/noai.jpg")["error_message"] == row("/scoped-noai.jpg")["error_message"] == "X-Robots-Tag: noai"
    assert "truncated" in row("/truncated.jpg")["error_message"]
    assert row("/page.jpg")["content_type"] == "image/jpeg"  # the header lied; the bytes decide
    assert "decompression bomb" in row("/bomb.png")["error_message"]
    assert row("/huge.jpg")["error_message"].startswith("Content-Length")
    assert row("/huge-chunked.jpg")["error_message"] == f"body exceeds max_bytes={2**20}"
    assert "aspect ratio 1.87" in row("/img/4.jpg")["error_message"]
    assert meta[-3]["error_message"].startswith(f"{config.input} line 29: malformed JSON")
    assert meta[-2]["error_message"] == "empty 'url'"
    assert {m["error_message"] for m in meta[24:26]} == {"scheme '' not allowed (http/https only)",
                                                          "scheme 'ftp' not allowed (http/https only)"}
    assert web.hits("/flaky/1") == 2 and web.hits("/ratelimited/1") == 2 and web.hits("/missing") == 1
    assert web.hits("/slow") == 2 and web.hits("/unavailable/9/a") == 2
    assert web.hits_under("/private/") == 0 and web.hits("/huge.jpg") == 1
    # robots.txt: fetched before anything else, and at most once per shard task.
    assert web.requests[0].path == "/robots.txt"
    assert 1 <= web.hits("/robots.txt") <= n_shards

    # Successes: metadata describes the stored image and the downloaded bytes.
    served = {"/img/0.jpg": 0, "/img/1.jpg": 1, "/img/2.jpg": 2, "/img/3.jpg": 3, "/flaky/1": 2,
              "/ratelimited/1": 3, "/redirect/chain": 1, "/otherbot-noai.jpg": 0, "/img/1.jpg?nocaption": 1}
    successes = {m["key"]: m for m in meta if m["status"] == "success"}
    assert len(successes) == len(served)
    for path, index in served.items():
        m, photo = row(path), photos[index]
        assert (m["original_width"], m["original_height"]) == (photo.width, photo.height)
        assert (m["width"], m["height"]) == img2dataset_size("keep_ratio", photo.width, photo.height, 64)
        assert (m["bytes"], m["sha256"]) == (len(photo.data), hashlib.sha256(photo.data).hexdigest())
        assert (m["http_status"], m["content_type"], m["error_message"], m["retryable"]) == \
            (200, "image/jpeg", None, False)
        assert m["fetch_ms"] > 0
    assert row("/redirect/chain")["final_url"] == web.url("/img/1.jpg")
    assert row("/ratelimited/1")["fetch_ms"] >= 950

    # The shards, read with webdataset: one sample per success, nothing else.
    got = samples(out)
    by_key_row = {m["key"]: i for i, m in enumerate(meta)}
    assert sorted(s["__key__"] for s in got) == sorted(successes)
    for s in got:
        m = successes[s["__key__"]]
        with Image.open(io.BytesIO(s["jpg"])) as im:
            im.load()
            assert (im.format, im.size) == ("JPEG", (m["width"], m["height"]))
        info = json.loads(s["json"])
        assert set(info) >= {f.name for f in METADATA_SCHEMA}
        assert {k: m[k] for k in info} == info  # the sample's json is its parquet row
        assert all(v is None for k, v in m.items() if k not in info)  # columns of other rows of the shard
        assert info["status"] == "success" and info["row"] == by_key_row[s["__key__"]]
        assert info.get("license") == (None if info["row"] == len(cases) - 1 else f"cc-{info['row'] % 3}")
        if m["caption"] is None:
            assert "txt" not in s
        else:
            assert s["txt"].decode() == m["caption"]
    assert [s["__key__"] for s in got if "txt" not in s] == [row("/img/1.jpg?nocaption")["key"]]

    # Manifest, stats and digests.
    manifest = check_manifest(out, result)
    assert manifest["kind"] == "images" and manifest["config"] == config.model_dump(mode="json")
    assert manifest["config_digest"] == config.digest()
    assert manifest["samples"] == len(successes)
    assert manifest["stats"]["status"] == dict(sorted(Counter(s for _, s in cases).items()))
    assert manifest["stats"]["total"] == len(cases)


def test_private_addresses_are_skipped_unless_allowed(tmp_path, web):
    rows = [{"url": web.url(f"/img/{i}.jpg"), "caption": "x"} for i in range(3)]
    rows.append({"url": f"http://localhost:{web.port}/img/0.jpg", "caption": "by name"})
    result = crawl_images(make_config(tmp_path, rows, fetch={"allow_private_network": False}))
    meta = metadata(tmp_path / "out")
    assert [m["status"] for m in meta] == ["skipped_private_network"] * 4
    assert meta[-1]["error_message"] == "localhost resolves to non-public address 127.0.0.1"
    assert web.requests == []  # nothing fetched, not even robots.txt
    assert result.ok and result.manifest["samples"] == 0


def test_rerun_skips_finished_shards_and_changes_nothing(tmp_path, web):
    rows = [{"url": web.url(f"/img/{i % 4}.jpg?n={i}"), "caption": f"c{i}"} for i in range(10)]
    rows += [{"url": web.url("/missing"), "caption": "gone"}]
    config = make_config(tmp_path, rows, shard_size=4)
    first = crawl_images(config)
    out = Path(config.output)
    before, requests = snapshot(out), len(web.requests)
    assert (first.written, first.skipped) == (3, 0)

    second = crawl_images(config)
    assert (second.written, second.skipped) == (0, 3) and second.ok
    assert snapshot(out) == before
    assert len(web.requests) == requests  # nothing fetched again
    assert second.manifest["shards"] == first.manifest["shards"]
    assert second.manifest["digest"] == first.manifest["digest"]
    check_manifest(out, second)


def test_rerun_with_settings_that_change_the_output_is_refused(tmp_path, web):
    rows = [{"url": web.url(f"/img/{i}.jpg"), "caption": str(i)} for i in range(4)]
    config = make_config(tmp_path, rows, shard_size=2)
    crawl_images(config)
    out = Path(config.output)
    before, requests = snapshot(out), len(web.requests)
    changed = config.model_copy(update={"image": config.image.model_copy(update={"image_size": 32})})
    with pytest.raises(PipelineError) as info:
        crawl_images(changed)
    assert str(info.value).startswith(f"{config.output}: shard 00000 was made with other settings")
    assert snapshot(out) == before and len(web.requests) == requests
    # Settings that change how the crawl runs, not what it writes, resume as before.
    rerun = crawl_images(config.model_copy(update={"fetch": config.fetch.model_copy(update={"timeout": 9.0}),
                                                   "decode_threads": 1, "task_retries": 0}))
    assert (rerun.written, rerun.skipped) == (0, 2)


def test_rerun_finishes_a_shard_missing_its_stats(tmp_path, web):
    rows = [{"url": web.url(f"/img/{i}.jpg"), "caption": f"c{i}"} for i in range(4)]
    config = make_config(tmp_path, rows, shard_size=2)
    crawl_images(config)
    out = Path(config.output)
    (out / "00001_stats.json").unlink()  # as if killed between the parquet and the stats
    (out / ".00001.tar.tmp-deadbeef").write_bytes(b"partial")  # a killed writer's temporary
    result = crawl_images(config)
    assert (result.written, result.skipped) == (1, 1)
    assert len(samples(out)) == 4
    check_manifest(out, result)


def test_retry_failed_refetches_only_transient_failures(tmp_path, web):
    rows = [{"url": web.url("/img/0.jpg"), "caption": "a"}, {"url": web.url("/unavailable/3/x"), "caption": "b"},
            {"url": web.url("/img/1.jpg"), "caption": "c"}, {"url": web.url("/missing"), "caption": "d"},
            {"url": web.url("/img/2.jpg"), "caption": "e"}, {"url": web.url("/img/3.jpg"), "caption": "f"}]
    config = make_config(tmp_path, rows, shard_size=3)  # retries=1: 2 attempts, but 3 failures in a row
    out = Path(config.output)
    crawl_images(config)
    meta1 = metadata(out)
    assert [m["status"] for m in meta1] == ["success", "failed_to_download", "success", "failed_to_download",
                                            "success", "success"]
    assert [m["retryable"] for m in meta1] == [False, True, False, False, False, False]
    samples1 = {s["__key__"]: s for s in samples(out)}
    shard1 = {n: v for n, v in snapshot(out).items() if n.startswith("00001")}

    again = crawl_images(config.model_copy(update={"retry_failed": True}))
    assert again.ok and again.skipped == 1  # shard 1's only failure (a 404) is not transient
    meta2 = metadata(out)
    assert meta2[1]["status"] == "success" and meta2[1]["retryable"] is False
    assert web.hits("/unavailable/3/x") == 4  # 2 + 2: the third failure, then success
    assert [m for i, m in enumerate(meta2) if i != 1] == [m for i, m in enumerate(meta1) if i != 1]
    samples2 = {s["__key__"]: s for s in samples(out)}
    assert set(samples2) == set(samples1) | {meta2[1]["key"]}
    for key, s in samples1.items():  # untouched samples are byte for byte the same
        assert files_of(samples2[key]) == files_of(s)
    assert {n: v for n, v in snapshot(out).items() if n.startswith("00001")} == shard1
    for path in ("/img/0.jpg", "/img/1.jpg", "/missing", "/img/2.jpg"):
        assert web.hits(path) == 1, path
    check_manifest(out, again)

    third = crawl_images(config.model_copy(update={"retry_failed": True}))  # nothing transient left
    assert third.skipped == 2


def test_retry_failed_counts_only_the_shards_it_rewrote(tmp_path, web):
    rows = [{"url": web.url("/unavailable/3/x"), "caption": "a"}, {"url": web.url("/img/1.jpg"), "caption": "b"}]
    config = make_config(tmp_path, rows, shard_size=1)
    crawl_images(config)
    again = crawl_images(config.model_copy(update={"retry_failed": True}))
    assert (again.written, again.skipped) == (1, 1)
    assert again.manifest["stats"]["shards_written"] == 1


@pytest.mark.parametrize("mode", ["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"])
def test_resize_modes_give_img2dataset_sizes(tmp_path, web, photos, mode):
    rows = [{"url": web.url(f"/img/{i}.jpg"), "caption": str(i)} for i in range(len(photos))]
    config = make_config(tmp_path, rows, image={"resize_mode": mode})
    assert crawl_images(config).ok
    for s in samples(Path(config.output)):
        photo = photos[int(s["txt"])]
        with Image.open(io.BytesIO(s["jpg"])) as im:
            assert im.size == img2dataset_size(mode, photo.width, photo.height, 64), (mode, photo.name)


def test_filters(tmp_path, web, photos):
    # 320x240 too small, 500x400 kept, 800x600 too elongated, 1024x700 too many pixels, 300x560 too elongated
    rows = [{"url": web.url(f"/img/{i}.jpg"), "caption": str(i)} for i in range(len(photos))]
    config = make_config(tmp_path, rows, image={"min_image_size": 250, "max_aspect_ratio": 1.3,
                                                "max_image_area": 600_000})
    crawl_images(config)
    meta = metadata(Path(config.output))
    assert [m["status"] for m in meta] == ["filtered", "success", "filtered", "filtered", "filtered"]
    assert "too small" in meta[0]["error_message"] and "aspect ratio 1.33" in meta[2]["error_message"]
    assert "area 716800" in meta[3]["error_message"] and "aspect ratio 1.87" in meta[4]["error_message"]
    assert all(m["width"] is None for m in meta if m["status"] == "filtered")
    assert [s["txt"] for s in samples(Path(config.output))] == [b"1"]


def test_require_caption_and_other_output_options(tmp_path, web):
    rows = [{"url": web.url("/img/0.jpg"), "caption": "ok", "extra": 1}, {"url": web.url("/img/1.jpg"), "caption": ""},
            {"url": web.url("/img/2.jpg"), "caption": "   "}, {"url": web.url("/img/3.jpg")}]
    config = make_config(tmp_path, rows, require_caption=True, save_additional_columns=False,
                         image={"output_format": "webp"})
    crawl_images(config)
    meta = metadata(Path(config.output))
    assert [m["status"] for m in meta] == ["success"] + ["missing_caption"] * 3
    assert "extra" not in meta[0]
    assert web.hits("/img/1.jpg") == web.hits("/img/2.jpg") == web.hits("/img/3.jpg") == 0
    (s,) = samples(Path(config.output))
    assert set(s) >= {"webp", "txt", "json"} and "jpg" not in s
    assert s["webp"][:4] == b"RIFF" and "extra" not in json.loads(s["json"])


def test_other_column_names_and_csv_input(tmp_path, web):
    source = tmp_path / "list.csv"
    source.write_text(f"image_link,alt,id\n{web.url('/img/0.jpg')},a cat,007\n{web.url('/img/1.jpg')},coffee,8\n")
    config = ImageCrawlConfig(input=str(source), output=str(tmp_path / "out"), url_col="image_link",
                              caption_col="alt", image={"image_size": 64}, fetch=FAST_FETCH, quiet=True)
    assert crawl_images(config).ok
    meta = metadata(tmp_path / "out")
    assert [(m["url"], m["caption"], m["id"], m["status"]) for m in meta] == [
        (web.url("/img/0.jpg"), "a cat", "007", "success"), (web.url("/img/1.jpg"), "coffee", "8", "success")]


def test_slow_robots_txt_on_one_host_does_not_fail_the_shard(tmp_path, web, make_web):
    slow_host = make_web(robots_delay=5)
    rows = [{"url": slow_host.url(f"/img/{i}.jpg"), "caption": "slow"} for i in range(2)]
    rows += [{"url": web.url(f"/img/{i}.jpg"), "caption": "fine"} for i in range(2)]
    result = crawl_images(make_config(tmp_path, rows, fetch={"timeout": 0.5}))
    assert result.ok
    meta = metadata(tmp_path / "out")
    assert [m["status"] for m in meta][2:] == ["success"] * 2


def test_robots_txt_is_not_fetched_again_for_every_shard(tmp_path, web):
    rows = [{"url": web.url(f"/img/{i % 5}.jpg?{i}"), "caption": "x"} for i in range(12)]
    assert crawl_images(make_config(tmp_path, rows, shard_size=2)).ok  # 6 shards on 2 worker processes
    assert web.hits("/robots.txt") < 6


# -- bad input -----------------------------------------------------------------------------------
def test_missing_column_names_file_and_column_before_any_work(tmp_path, web):
    config = make_config(tmp_path, [{"link": web.url("/img/0.jpg"), "caption": "x"}])
    with pytest.raises(PipelineError) as info:
        crawl_images(config)
    assert str(info.value) == f"{config.input}: column 'url' not found (columns: link, caption)"
    assert not Path(config.output).exists() and web.requests == []


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_input_is_an_error(tmp_path, content):
    (tmp_path / "urls.jsonl").write_text(content)
    config = make_config(tmp_path, [])
    with pytest.raises(PipelineError) as info:
        crawl_images(config)
    assert str(info.value) == f"{config.input}: input is empty (no rows)"


def test_empty_input_is_an_error_before_any_work(tmp_path):
    (tmp_path / "urls.jsonl").write_text("")
    config = make_config(tmp_path, [])
    with pytest.raises(PipelineError, match="input is empty"):
        crawl_images(config)
    assert not Path(config.output).exists()


def test_nonexistent_and_unreadable_inputs_are_errors(tmp_path):
    with pytest.raises(PipelineError, match="no such file or folder"):
        crawl_images(ImageCrawlConfig(input=str(tmp_path / "nope.jsonl"), output=str(tmp_path / "o"), quiet=True))
    bad = tmp_path / "urls.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(PipelineError, match=f"{bad}: cannot read as parquet"):
        crawl_images(ImageCrawlConfig(input=str(bad), output=str(tmp_path / "o"), quiet=True))


def test_output_that_is_not_a_folder_is_an_error_naming_it(tmp_path, web):
    config = make_config(tmp_path, [{"url": web.url("/img/0.jpg")}], out="taken")
    Path(config.output).write_text("a file where the output folder should be")
    with pytest.raises(PipelineError, match=str(config.output)):
        crawl_images(config)


@pytest.mark.parametrize("case", ["missing column", "empty", "nonexistent", "unreadable"])
def test_cli_reports_bad_input_in_one_line_and_exits_2(tmp_path, case):
    source = {"missing column": tmp_path / "a.jsonl", "empty": tmp_path / "b.jsonl",
              "nonexistent": tmp_path / "c.jsonl", "unreadable": tmp_path / "d.parquet"}[case]
    if case == "missing column":
        write_jsonl(source, [{"link": "http://example.com/a.jpg"}])
    elif case == "empty":
        source.write_text("")
    elif case == "unreadable":
        source.write_bytes(b"garbage")
    proc = subprocess.run([PIPELINES, "crawl", "images", "--input", str(source), "--output", str(tmp_path / "out"),
                           "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(source) in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert {"missing column": "column 'url' not found", "empty": "input is empty",
            "nonexistent": "no such file or folder", "unreadable": "cannot read as parquet"}[case] in lines[0]


# -- killed workers ------------------------------------------------------------------------------
def shard_worker_pids() -> list[int]:
    """Ray worker processes executing a shard task (Ray titles them `ray::crawl_image_shard`)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"ray::crawl_image_shard"):
            pids.append(int(entry))
    return pids


def crawl_and_kill_one_worker(config: ImageCrawlConfig, web) -> tuple[Any, int]:
    """Run the crawl in a thread; kill -9 a worker once it is inside a shard; return the result and the pid."""
    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: outcome.update(result=crawl_images(config)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    victim = None
    while victim is None and time.monotonic() < deadline:
        pids = shard_worker_pids()
        if pids and web.hits_under("/img/") >= 3:  # the task is fetching, mid-shard
            victim = pids[0]
        time.sleep(0.05)
    assert victim is not None, "no worker ever ran a shard task"
    os.kill(victim, signal.SIGKILL)
    thread.join(120)
    assert not thread.is_alive() and "result" in outcome
    return outcome["result"], victim


def check_every_sample_once(out: Path, n_rows: int, result) -> None:
    keys = Counter()
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as t:
            keys.update({n.partition(".")[0] for n in t.getnames()})
    assert len(keys) == n_rows and set(keys.values()) == {1}  # every sample, exactly once
    meta = metadata(out)
    assert len(meta) == n_rows and {m["status"] for m in meta} == {"success"}
    assert sorted(keys) == sorted(m["key"] for m in meta)
    assert [m["caption"] for m in meta] == [f"c{i}" for i in range(n_rows)]
    check_manifest(out, result)


def kill_test_config(tmp_path: Path, web, **options) -> ImageCrawlConfig:
    # 6 shards of 10 images; one fetch at a time, 80 ms each: a shard takes about a second.
    rows = [{"url": web.url(f"/img/{i % 5}.jpg?i={i}"), "caption": f"c{i}"} for i in range(60)]
    return make_config(tmp_path, rows, shard_size=10, fetch={"concurrency": 1}, **options)


@pytest.mark.slow
def test_killed_worker_is_retried_by_ray(tmp_path, make_web):
    web = make_web(image_delay=0.08)
    config = kill_test_config(tmp_path, web)
    result, victim = crawl_and_kill_one_worker(config, web)
    assert victim not in shard_worker_pids()
    assert result.ok and result.written == 6
    assert web.hits_under("/img/") > 60  # the killed shard was fetched again from its start
    out = Path(config.output)
    check_every_sample_once(out, 60, result)
    rerun = crawl_images(config)
    assert (rerun.written, rerun.skipped) == (0, 6)
    check_every_sample_once(out, 60, rerun)


@pytest.mark.slow
def test_killed_worker_without_retries_fails_its_shard_and_a_rerun_finishes(tmp_path, make_web):
    web = make_web(image_delay=0.08)
    config = kill_test_config(tmp_path, web, task_retries=0)
    result, _ = crawl_and_kill_one_worker(config, web)
    assert not result.ok and len(result.failed_shards) == 1
    (failed, why), = result.failed_shards.items()
    assert "Worker" in why or "died" in why.lower() or "crash" in why.lower(), why
    out = Path(config.output)
    assert f"{failed:05d}" not in [s["name"] for s in result.manifest["shards"]]
    assert len(result.manifest["shards"]) == 5

    rerun = crawl_images(config)
    assert rerun.ok and (rerun.written, rerun.skipped) == (1, 5)
    assert web.hits_under("/img/") > 60
    check_every_sample_once(out, 60, rerun)


# -- one output: whole shards, one input, one run at a time -----------------------------------------
def test_shard_that_cannot_be_published_leaves_nothing_named_like_a_shard(tmp_path, web):
    rows = [{"url": web.url(f"/img/{i % 4}.jpg?n={i}"), "caption": f"c{i}"} for i in range(6)]
    config = make_config(tmp_path, rows, shard_size=2)
    out = Path(config.output)
    out.mkdir()
    (out / "00001_stats.json").mkdir()  # a storage error at publication: the stats' name is taken by a folder
    for _ in range(2):  # the run, then a rerun that fails the same way
        result = crawl_images(config)
        assert list(result.failed_shards) == [1] and "IsADirectoryError" in result.failed_shards[1]
        assert sorted(p.name for p in out.iterdir() if p.name.startswith("00001")) == ["00001_stats.json"]
        assert sorted({s["__key__"][:5] for s in samples(out)}) == ["00000", "00002"]
        check_manifest(out, result)
    (out / "00001_stats.json").rmdir()
    result = crawl_images(config)
    assert result.ok and (result.written, result.skipped) == (1, 2)
    check_every_sample_once(out, 6, result)


def test_rerun_with_another_input_is_refused_and_never_mixed(tmp_path, web):
    rows = [{"url": web.url(f"/img/{i % 4}.jpg?n={i}"), "caption": f"c{i}"} for i in range(8)]
    config = make_config(tmp_path, rows, shard_size=4)
    crawl_images(config)
    out, source = Path(config.output), Path(config.input)
    before, requests = snapshot(out), len(web.requests)
    other = [{"url": web.url(f"/img/{i % 4}.jpg?m={i}"), "caption": f"c{i}"} for i in range(9)]
    changed = {  # input -> the first shard that no longer matches it
        "another list": (other, "00000"),
        "one row edited": (rows[:5] + [dict(rows[5], caption="edited")] + rows[6:], "00001"),
        "rows appended after a full last shard": (rows + other[:4], "00001"),
        "rows cut at a shard's end": (rows[:4], "00000"),
    }
    for case, (new_rows, shard) in changed.items():
        write_jsonl(source, new_rows)
        with pytest.raises(PipelineError) as info:
            crawl_images(config)
        message = str(info.value)
        assert message.startswith(f"{config.output}: shard {shard} was made from other input rows"), (case, message)
        assert "--output" in message and "--overwrite" in message and "\n" not in message
        assert snapshot(out) == before and len(web.requests) == requests, case

    write_jsonl(source, other)
    result = crawl_images(config.model_copy(update={"overwrite": True}))
    assert result.ok and (result.written, result.skipped) == (3, 0)
    check_every_sample_once(out, 9, result)
    assert [m["url"] for m in metadata(out)] == [r["url"] for r in other]
    assert (crawl_images(config).skipped, crawl_images(config).written) == (3, 0)  # and it resumes from there


def test_rerun_refuses_shards_beyond_a_shorter_input(tmp_path, web):
    rows = [{"url": web.url(f"/img/{i % 4}.jpg?n={i}"), "caption": f"c{i}"} for i in range(6)]
    config = make_config(tmp_path, rows, shard_size=2)
    crawl_images(config)
    out = Path(config.output)
    (out / "00001_stats.json").unlink()  # shard 1 unfinished: the shorter input's last shard is not among the done
    write_jsonl(Path(config.input), rows[:4])
    with pytest.raises(PipelineError, match=f"^{config.output}: shard 00002 was made from input rows that are no longer"):
        crawl_images(config)
    assert (out / "00002.tar").exists() and not (out / "00001.tar").exists()


def test_two_crawls_into_one_output_one_is_refused_the_other_completes(tmp_path, make_web):
    web = make_web(image_delay=0.05)
    rows = [{"url": web.url(f"/img/{i % 4}.jpg?i={i}"), "caption": f"c{i}"} for i in range(30)]
    config = make_config(tmp_path, rows, shard_size=10, fetch={"concurrency": 1})
    outcome: dict[str, Any] = {}
    first = threading.Thread(target=lambda: outcome.update(result=crawl_images(config)), daemon=True)
    first.start()
    deadline = time.monotonic() + 60
    while web.hits_under("/img/") < 2 and time.monotonic() < deadline:  # the first run is at work
        time.sleep(0.02)
    with pytest.raises(PipelineError) as info:
        crawl_images(config)
    message = str(info.value)
    assert message.startswith(f"{config.output}: in use by another run (pid {os.getpid()} on ") and "\n" not in message
    first.join(120)
    result = outcome["result"]
    assert result.ok and (result.written, result.skipped) == (3, 0)
    check_every_sample_once(Path(config.output), 30, result)
