"""Curate: filter and deduplicate crawled shards with steps named in a config."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.curate.step import DedupStep, Duplicates, SignatureRef, Step, StepParams, reasons, threshold

__all__ = ["DedupStep", "Duplicates", "SignatureRef", "Step", "StepParams", "reasons", "threshold"]


def __getattr__(name: str) -> Any:
    """The step API (`from pipelines.curate import Step`), imported when first asked for: it brings pandas, which
    the CLI does not need to read `pipelines.curate.config` and answer `pipelines curate --help`."""
    if name in __all__:
        return getattr(importlib.import_module("pipelines.curate.step"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
