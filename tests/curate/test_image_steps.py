"""ImageSize and AspectRatio on hand-made batches: boundaries, fallbacks, reasons, the score cache key."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from pydantic import ValidationError

from pipelines.curate.steps.image import AspectRatio, ImageSize


def batch(*sizes: tuple, original: bool = True) -> pd.DataFrame:
    """Rows from (width, height[, original_width, original_height]) tuples, as nullable int columns."""
    rows = [tuple(s) + (None,) * (4 - len(s)) for s in sizes]
    frame = pd.DataFrame(rows, columns=["width", "height", "original_width", "original_height"]).astype("Int32")
    frame["key"] = [f"k{i}" for i in range(len(frame))]
    return frame if original else frame.drop(columns=["original_width", "original_height"])


def drops(step, frame: pd.DataFrame) -> list:
    scores = step.score(frame)
    if scores is not None:
        frame = frame.assign(**scores)
    out = step.drop(frame)
    assert list(out.index) == list(frame.index)
    return out.tolist()


# -- ImageSize ------------------------------------------------------------------------------------
def test_image_size_min_side_boundary_uses_original_size():
    # Stored sizes are small (the crawl resized); only the original decides.
    frame = batch((64, 64, 200, 200), (64, 64, 199, 400), (64, 64, 400, 199), (256, 256, 200, 5000))
    assert drops(ImageSize(), frame) == [None, "image_too_small", "image_too_small", None]


def test_image_size_min_width_and_height():
    step = ImageSize(ImageSize.Params(min_side=0, min_width=300, min_height=100))
    frame = batch((1, 1, 300, 100), (1, 1, 299, 100), (1, 1, 300, 99))
    assert drops(step, frame) == [None, "image_too_small", "image_too_small"]


def test_image_size_max_bounds():
    step = ImageSize(ImageSize.Params(min_side=0, max_width=1000, max_height=800, max_pixels=600_000))
    frame = batch((1, 1, 1000, 600), (1, 1, 1001, 10), (1, 1, 10, 801), (1, 1, 750, 800), (1, 1, 751, 800))
    assert drops(step, frame) == [None, "image_too_large", "image_too_large", None, "image_too_large"]


def test_image_size_no_maximum_by_default():
    assert drops(ImageSize(), batch((1, 1, 100_000, 50_000))) == [None]


def test_image_size_falls_back_to_stored_size_per_row():
    # Row 0: no original at all; row 1: half an original, so the stored pair is used (never mixed).
    frame = batch((256, 256), (150, 300, 1000, None), (256, 256, 1000, 1000))
    assert drops(ImageSize(), frame) == [None, "image_too_small", None]
    # Shards without the original columns at all.
    assert drops(ImageSize(), batch((256, 256), (100, 256), original=False)) == [None, "image_too_small"]


def test_image_size_unknown_is_dropped():
    frame = batch((None, None), (0, 256), (256, None, None, None), (256, 256, 0, 0), (-1, 300))
    # Row 3: a zero original is unknown, so the stored 256x256 stands in.
    assert drops(ImageSize(ImageSize.Params(min_side=0)), frame) == [
        "image_size_unknown", "image_size_unknown", "image_size_unknown", None, "image_size_unknown"]


def test_image_size_first_reason_wins():
    step = ImageSize(ImageSize.Params(min_side=100, max_width=1000))
    # Too short and too wide at once: the too-small rule comes first.
    assert drops(step, batch((1, 1, 2000, 50))) == ["image_too_small"]


def test_image_size_params_are_thresholds():
    base = ImageSize.Params().score_digest()
    changed = ImageSize.Params(min_side=10, min_width=5, min_height=5, max_width=9, max_height=9, max_pixels=81)
    assert changed.score_digest() == base
    with pytest.raises(ValidationError):
        ImageSize.Params(max_width=0)
    with pytest.raises(ValidationError):
        ImageSize.Params(min_sides=3)  # unknown keys are errors


def test_image_size_empty_batch():
    assert drops(ImageSize(), batch()) == []


# -- AspectRatio ----------------------------------------------------------------------------------
def test_aspect_ratio_score_is_long_over_short_side_of_the_original():
    frame = batch((256, 256, 300, 900), (256, 256, 900, 300), (100, 50), (512, 512, 1000, 1000))
    ratios = AspectRatio().score(frame)["aspect_ratio"].tolist()
    assert ratios == [3.0, 3.0, 2.0, 1.0]


def test_aspect_ratio_boundary():
    frame = batch((1, 1, 300, 900), (1, 1, 300, 901), (1, 1, 1000, 10))
    assert drops(AspectRatio(), frame) == [None, "aspect_ratio_too_high", "aspect_ratio_too_high"]
    relaxed = AspectRatio(AspectRatio.Params(max_aspect_ratio=100))
    assert drops(relaxed, frame) == [None, None, None]


def test_aspect_ratio_unknown_size():
    frame = batch((None, None), (0, 10), (10, 20, 0, 0))
    scores = AspectRatio().score(frame)["aspect_ratio"].tolist()
    assert math.isnan(scores[0]) and math.isnan(scores[1]) and scores[2] == 2.0
    assert drops(AspectRatio(), frame) == ["image_size_unknown", "image_size_unknown", None]


def test_aspect_ratio_threshold_does_not_change_score_digest():
    assert (AspectRatio.Params(max_aspect_ratio=1.5).score_digest()
            == AspectRatio.Params().score_digest())
    with pytest.raises(ValidationError):
        AspectRatio.Params(max_aspect_ratio=0.5)


def test_aspect_ratio_reads_object_and_float_columns():
    # Metadata read without nullable dtypes: None in object columns, NaN in float ones.
    frame = pd.DataFrame({"width": [256, None], "height": [128.0, float("nan")],
                          "original_width": [None, None], "original_height": [None, None]})
    scores = AspectRatio().score(frame)["aspect_ratio"]
    assert scores.iloc[0] == 2.0 and math.isnan(scores.iloc[1])


def test_step_names_and_columns():
    assert (ImageSize.name, AspectRatio.name) == ("image_size", "aspect_ratio")
    assert set(ImageSize.columns) == set(AspectRatio.columns) == {"width", "height"}
