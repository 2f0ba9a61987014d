"""The curation report: one self-contained HTML file with the counts, the steps and one PNG per plot."""

from __future__ import annotations

import base64
import re

import numpy as np
import pandas as pd
import pytest

from pipelines.curate.report import write_report

IMG = '<img src="data:image/png;base64,'
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def text_run() -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(0)
    kept = pd.DataFrame({"key": [f"doc{i}" for i in range(300)],
                         "text": ["word " * int(n) for n in rng.integers(1, 400, 300)]})
    kept["chars"] = kept["text"].str.len()
    kept["words"] = kept["text"].str.split().str.len()
    removed = pd.DataFrame({
        "key": [f"short{i}" for i in range(40)] + [f"dup{i}" for i in range(30)],
        "step": ["min_words"] * 40 + ["minhash_dedup"] * 30,
        "reason": ["too_few_words"] * 40 + ["near_duplicate"] * 30,
        # 10 clusters of 3 removed + their kept copy, and one cluster (c9) whose copies all went.
        "cluster_id": [None] * 40 + [f"c{i // 3}" for i in range(30)],
        "kept_key": [None] * 40 + [f"doc{i // 3}" if i < 27 else None for i in range(30)],
        "similarity": [None] * 40 + [0.91] * 30,
        "chars": list(rng.integers(0, 20, 40)) + list(rng.integers(100, 2000, 30)),
    })
    stats = {
        "input": {"shards": 4, "samples": 1370, "corrupt_shards": {"00002": "truncated tar <eof>"}},
        "output": {"samples": 300, "shards": 1},
        "elapsed_s": 75.5,
        "steps": [
            {"step": "min_words", "in": 1370, "kept": 1330, "dropped": {"too_few_words": 40}, "seconds": 1.25},
            {"step": "language", "in": 1330, "kept": 330, "dropped": {"not_english": 1000}, "seconds": 9.0},
            {"step": "minhash_dedup", "in": 330, "kept": 300, "dropped": {"near_duplicate": 30}, "seconds": 4.5},
        ],
    }
    return stats, kept, removed


def image_run() -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(1)
    n = 200
    ow, oh = rng.integers(200, 3000, n), rng.integers(200, 3000, n)
    kept = pd.DataFrame({"key": [f"img{i}" for i in range(n)], "text": ["a photo of a cat"] * n,
                         "width": np.minimum(ow, 256), "height": np.minimum(oh, 256),
                         "original_width": ow, "original_height": oh, "aspect_ratio": rng.uniform(1, 3, n)})
    removed = pd.DataFrame({
        "key": ["small0", "small1", "wide0", "same0", "same1"],
        "step": ["image_size", "image_size", "aspect_ratio", "exact_dedup", "exact_dedup"],
        "reason": ["image_too_small", "image_too_small", "aspect_ratio_too_high", "duplicate", "duplicate"],
        "cluster_id": [None, None, None, "sha-1", "sha-1"],
        "kept_key": [None, None, None, "img0", "img0"],
        "similarity": [None, None, None, 1.0, 1.0],
        "width": [64, 32, 256, 256, 256], "height": [64, 20, 40, 256, 256],
    })
    stats = {
        "input": {"shards": 2, "samples": 205, "corrupt_shards": {}},
        "output": {"samples": 200, "shards": 1},
        "elapsed_s": 3.0,
        "steps": [
            {"step": "image_size", "in": 205, "kept": 203, "dropped": {"image_too_small": 2}, "seconds": 0.1},
            {"step": "aspect_ratio", "in": 203, "kept": 202, "dropped": {"aspect_ratio_too_high": 1}, "seconds": 0.1},
            {"step": "exact_dedup", "in": 202, "kept": 200, "dropped": {"duplicate": 2}, "seconds": 0.2},
        ],
    }
    return stats, kept, removed


def write(tmp_path, stats, kept, removed, title="run") -> str:
    path = tmp_path / "report.html"
    write_report(str(path), title, stats, kept, removed)
    return path.read_text(encoding="utf-8")


def assert_self_contained(page: str) -> None:
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert not re.search(r"https?://", page)
    for data in re.findall(r'data:image/png;base64,([^"]+)"', page):
        assert base64.b64decode(data).startswith(PNG_MAGIC)


def section(page: str, title: str) -> str:
    """The HTML of the section titled `title`, up to the next section."""
    start = page.index(f"<h2>{title}</h2>")
    end = page.find("<h2>", start + 1)
    return page[start:end if end >= 0 else None]


def test_text_report(tmp_path):
    stats, kept, removed = text_run()
    page = write(tmp_path, stats, kept, removed, title="Curate <news> run")
    assert_self_contained(page)
    assert "<h1>Curate &lt;news&gt; run</h1>" in page
    for name in ("min_words", "language", "minhash_dedup"):
        assert f"<td>{name}</td>" in page
    for count in ("1,370", "1,330", "330", "300", "1,000"):
        assert f">{count}<" in page
    assert "truncated tar &lt;eof&gt;" in page  # the corrupt shard, escaped
    assert "not_english: 1,000" in page
    # funnel, text length, cluster sizes; no image section for text
    assert page.count(IMG) == 3
    assert "Image size" not in page
    # 10 clusters: 9 of 3 removed + 1 kept (size 4), one of 3 removed with no survivor (size 3).
    assert "10 clusters, 30 duplicates removed, largest cluster 4 samples." in page
    examples = section(page, "Example removals")
    assert examples.count("<td>too_few_words</td>") == 5 and examples.count("<td>near_duplicate</td>") == 5
    assert '<td class="key">short0</td>' in examples and '<td class="key">doc0</td>' in examples
    assert examples.index("too_few_words") < examples.index("near_duplicate")  # pipeline order


def test_image_report(tmp_path):
    stats, kept, removed = image_run()
    page = write(tmp_path, stats, kept, removed)
    assert_self_contained(page)
    for name in ("image_size", "aspect_ratio", "exact_dedup"):
        assert f"<td>{name}</td>" in page
    assert ">205<" in page and ">200 (97.6% of input)<" in page
    assert "Corrupt shards" not in page
    # funnel, caption length (from text), image size, cluster sizes
    assert page.count(IMG) == 4
    assert IMG in section(page, "Image size")
    assert "1 clusters, 2 duplicates removed, largest cluster 3 samples." in page
    assert "aspect_ratio_too_high" in section(page, "Example removals")
    assert "<td>original_width</td>" in section(page, "Columns of the kept samples")


def test_report_escapes_every_text(tmp_path):
    stats, kept, removed = text_run()
    stats["steps"][0]["step"] = "<b>evil</b>"
    removed.loc[0, "reason"] = '"><img src=x onerror=alert(1)>'
    removed.loc[1, "key"] = "<script>"
    page = write(tmp_path, stats, kept, removed)
    assert "<b>evil</b>" not in page and "&lt;b&gt;evil&lt;/b&gt;" in page
    assert "onerror=alert(1)>" not in page and "<img src=x" not in page
    assert "<script>" not in page


def test_report_with_empty_frames(tmp_path):
    stats, _, _ = text_run()
    page = write(tmp_path, stats, pd.DataFrame(), pd.DataFrame())
    assert_self_contained(page)
    assert page.count(IMG) == 1  # only the funnel, from the stats
    for title in ("Caption / text length", "Duplicate clusters", "Example removals", "Columns of the kept samples"):
        assert "no data" in section(page, title)


def test_report_with_empty_frames_that_have_columns(tmp_path):
    stats, kept, removed = image_run()
    page = write(tmp_path, stats, kept.iloc[:0], removed.iloc[:0])
    assert_self_contained(page)
    assert page.count(IMG) == 1
    assert "no data" in section(page, "Image size")


def test_report_without_steps_or_text(tmp_path):
    stats = {"input": {"shards": 0, "samples": 0}, "output": {"samples": 0, "shards": 0}, "steps": []}
    kept = pd.DataFrame({"key": ["a"], "score": [0.5]})
    removed = pd.DataFrame(columns=["key", "step", "reason", "cluster_id", "kept_key", "similarity"])
    page = write(tmp_path, stats, kept, removed)
    assert_self_contained(page)
    assert IMG not in page
    assert "no data" in section(page, "Samples through the steps")
    assert "no data" in section(page, "Caption / text length")


@pytest.mark.parametrize("chars", [[0, 0, 0], [5, 5, 5], [1, 10_000_000, 3]])
def test_length_histogram_edge_values(tmp_path, chars):
    stats, _, _ = text_run()
    page = write(tmp_path, stats, pd.DataFrame({"chars": chars}), pd.DataFrame())
    assert IMG in section(page, "Caption / text length")
