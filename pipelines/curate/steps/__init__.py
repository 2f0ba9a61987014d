"""The built-in curation steps, one file per family."""

from pipelines.curate.step import Step
from pipelines.curate.steps.blocklist import UrlBlocklist
from pipelines.curate.steps.c4 import C4Lines
from pipelines.curate.steps.clip import ClipScore, SemanticDedup
from pipelines.curate.steps.dedup import ExactDedup, MinHashDedup, PHashDedup
from pipelines.curate.steps.gopher import GopherQuality, GopherRepetition
from pipelines.curate.steps.image import AspectRatio, ImageSize
from pipelines.curate.steps.language import Language
from pipelines.curate.steps.length import Length
from pipelines.curate.steps.pii import PiiRedact

BUILTIN_STEPS: list[type[Step]] = [
    Length, Language, GopherQuality, GopherRepetition, C4Lines, UrlBlocklist, PiiRedact,
    ImageSize, AspectRatio,
    ExactDedup, MinHashDedup, PHashDedup,
    ClipScore, SemanticDedup,
]
