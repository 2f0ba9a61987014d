"""A curation step from outside the `pipelines` package, as a plugin would ship one.

Ray's workers cannot import it (its folder is only on the test driver's sys.path), so the driver
must send the class to them by value. `pipelines_wordfilter-0.1.dist-info` installs it as a plugin.
"""

from __future__ import annotations

import re

import pandas as pd

from pipelines.curate.step import Step, StepParams, reasons, threshold


class DropWord(Step):
    """Drop documents that contain `word` (as a whole word, in any case)."""

    name = "drop_word"

    class Params(StepParams):
        word: str = threshold("spam")

    def drop(self, batch: pd.DataFrame) -> pd.Series:
        return reasons(batch["text"].str.contains(rf"(?i)\b{re.escape(self.params.word)}\b"), "contains_word")
