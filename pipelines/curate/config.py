"""The settings of `pipelines curate` (the run is `pipelines.curate.run`). Kept apart from the run, which imports
Ray and pandas, so that the CLI builds its options and answers `--help` without them."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from pipelines.config import ConfigModel


class CurateConfig(ConfigModel):
    input: str = Field(description="Shards written by `pipelines crawl` (or curate): folder or fsspec URL.")
    output: str = Field(description="Output folder for the curated shards (local or fsspec URL).")
    steps: list[dict[str, Any]] = Field(default_factory=list, json_schema_extra={"cli": False}, description=(
        "Ordered steps: `{step: NAME, PARAM: VALUE, ...}` (set them in the YAML config)."))
    partitions: int | None = Field(None, gt=0, description="Partitions of the dedup shuffles (default 2 x cluster CPUs).")
    max_in_flight: int | None = Field(None, gt=0, description="Shard tasks queued at once (default 2 x cluster CPUs).")
    task_retries: int = Field(3, ge=0, description="Times Ray reruns a shard task whose worker died.")
    report: bool = Field(True, description="Write report.html next to the output.")
    quiet: bool = Field(False, description="No progress bar or summary.")
    force: bool = Field(False, description=(
        "Recompute everything: every score, signature, duplicate set and shard, cached or not."))
    allow_skipped_shards: bool = Field(False, description=(
        "Succeed (exit 0) even when corrupt input shards were skipped; by default they fail the run."))

    run_options = {"output": True, "partitions": True, "max_in_flight": True, "task_retries": True,
                   "report": True, "quiet": True, "force": True, "allow_skipped_shards": True}
