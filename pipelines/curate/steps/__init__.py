"""The built-in curation steps, one file per family."""

from pipelines.curate.step import Step
from pipelines.curate.steps.dedup import ExactDedup, MinHashDedup, PHashDedup
from pipelines.curate.steps.image import AspectRatio, ImageSize

BUILTIN_STEPS: list[type[Step]] = [
    ImageSize, AspectRatio,
    ExactDedup, MinHashDedup, PHashDedup,
]
