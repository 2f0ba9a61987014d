"""Curate: filter and deduplicate crawled shards with steps named in a config."""

from pipelines.curate.step import DedupStep, Duplicates, SignatureRef, Step, StepParams, reasons, threshold

__all__ = ["DedupStep", "Duplicates", "SignatureRef", "Step", "StepParams", "reasons", "threshold"]
