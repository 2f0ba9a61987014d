"""Image filters on the size the crawl recorded: no decoding, so they cost nothing per row.

Both read the size of the image as downloaded (`original_width`/`original_height`), row by row
falling back to the stored size (`width`/`height`, after the crawl's resize, so only a stand-in)
where the original is unknown: shards written by other tools may lack it. A row whose size is
missing or not positive is dropped as `image_size_unknown`: an image that cannot be measured is not
one we can vouch for, and on our own shards it only happens to broken rows.

Defaults follow DataComp's "basic filtering" baseline (Gadre et al. 2023, `baselines/apply_filter.py`
in mlfoundations/datacomp): keep images whose smaller side is at least 200 pixels and whose aspect
ratio is at most 3, both measured on the original size.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipelines.curate.step import Step, StepParams, reasons, threshold


def original_size(batch: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Per row, the original (width, height) as floats, else the stored pair (never one side of each,
    which would distort the ratio); NaN where unknown or not positive."""
    def size(wcol: str, hcol: str) -> tuple[pd.Series, pd.Series]:
        if wcol not in batch or hcol not in batch:
            unknown = pd.Series(np.nan, index=batch.index)
            return unknown, unknown
        w, h = (pd.to_numeric(batch[c], errors="coerce").astype("float64") for c in (wcol, hcol))
        known = (w > 0) & (h > 0)
        return w.where(known), h.where(known)

    w, h = size("original_width", "original_height")
    stored_w, stored_h = size("width", "height")
    known = w.notna()
    return w.where(known, stored_w), h.where(known, stored_h)


class ImageSize(Step):
    """Drop images smaller than `min_width`/`min_height`/`min_side` (the smaller side) or larger than
    `max_width`/`max_height`/`max_pixels` (width x height). `None` turns a maximum off.

    Reasons: `image_size_unknown`, `image_too_small`, `image_too_large` (the first that applies).
    """

    name = "image_size"
    columns = ("width", "height")  # original_width/original_height are read too where present

    class Params(StepParams):
        min_side: int = threshold(200, ge=0)
        min_width: int = threshold(0, ge=0)
        min_height: int = threshold(0, ge=0)
        max_width: int | None = threshold(None, gt=0)
        max_height: int | None = threshold(None, gt=0)
        max_pixels: int | None = threshold(None, gt=0)

    def drop(self, batch: pd.DataFrame) -> pd.Series:
        p = self.params
        w, h = original_size(batch)
        too_small = (np.minimum(w, h) < p.min_side) | (w < p.min_width) | (h < p.min_height)
        too_large = ((w > (p.max_width or np.inf)) | (h > (p.max_height or np.inf))
                     | (w * h > (p.max_pixels or np.inf)))
        return reasons((w.isna() | h.isna(), "image_size_unknown"), (too_small, "image_too_small"),
                       (too_large, "image_too_large"))


class AspectRatio(Step):
    """Score `aspect_ratio`, the original image's long side over its short side (1.0 for a square, NaN
    when the size is unknown), and drop images above `max_aspect_ratio`: banners, strips, long
    screenshots. The default, 3.0, is DataComp's basic filter (img2dataset leaves the ratio unbounded).

    Reasons: `image_size_unknown`, `aspect_ratio_too_high`.
    """

    name = "aspect_ratio"
    adds = ("aspect_ratio",)
    columns = ("width", "height")  # original_width/original_height are read too where present

    class Params(StepParams):
        max_aspect_ratio: float = threshold(3.0, ge=1.0)

    def score(self, batch: pd.DataFrame) -> dict[str, pd.Series]:
        w, h = original_size(batch)
        return {"aspect_ratio": np.maximum(w, h) / np.minimum(w, h)}

    def drop(self, batch: pd.DataFrame) -> pd.Series:
        ratio = batch["aspect_ratio"]
        return reasons((ratio.isna(), "image_size_unknown"),
                       (ratio > self.params.max_aspect_ratio, "aspect_ratio_too_high"))
