"""The settings of `pipelines encode` (the run is `pipelines.train.encode`). Kept apart from the run, which imports
Ray, so that the CLI builds its options and answers `--help` without it."""

from __future__ import annotations

from pydantic import Field

from pipelines.config import ConfigModel


class EncodeConfig(ConfigModel):
    shards: str = Field(description=(
        "Image shards to encode (`pipelines crawl images` or `pipelines curate` output): folder or fsspec URL."))
    output: str = Field(description="Output folder for the latent shards (local or fsspec URL).")
    autoencoder: str = Field(description=(
        "The autoencoder: registered (models:/NAME@ALIAS or models:/NAME/VERSION, pinned to its exact version "
        "at the start) or a local diffusers AutoencoderKL folder."))
    clip: str | None = Field(None, description=(
        "A CLIP (models:/NAME@ALIAS or /VERSION, or a local folder): also store its text tower's per-token "
        "states of each caption (KEY.text.npy)."))
    image_size: int | None = Field(None, gt=0, description=(
        "Square images fed to the autoencoder, in pixels (default: its config's sample_size)."))
    batch_size: int = Field(32, gt=0, description="Images per autoencoder call.")
    use_gpu: bool | None = Field(None, description="One GPU per shard task (default: when the Ray cluster has GPUs).")
    max_in_flight: int | None = Field(None, gt=0, description=(
        "Shard tasks queued at once (default 2 x cluster CPUs, or 2 x GPUs)."))
    task_retries: int = Field(3, ge=0, description="Times Ray reruns a shard task whose worker died.")
    overwrite: bool = Field(False, description=(
        "Start over: remove the shards already in the output (else a rerun resumes, and refuses an output "
        "made from other input shards or with another autoencoder, image size or CLIP)."))
    quiet: bool = Field(False, description="No progress bar or summary.")

    run_options = {"output": True, "batch_size": True, "use_gpu": True, "max_in_flight": True,
                   "task_retries": True, "overwrite": True, "quiet": True}
