"""The image side of serving: a registered diffusion model (a diffusers `StableDiffusionPipeline` folder, as
`pipelines pretrain --kind diffusion` exports it) drawing prompts in batches.

Nothing here knows about HTTP or Ray: `ImageEngine.draw` takes the `Picture`s of one batch (from several
requests) and fills in each one's PNG.

- Pictures that share steps, guidance and size run as one denoising loop (one UNet call per step for all of
  them); pictures that differ in any of these cannot share a loop, so each such group gets its own.
- A seed reproduces a picture whatever shares its loop: each picture's initial latents are drawn from its own
  `torch.Generator` (the seed, or a fresh random one) and handed to the pipeline (`latents=`), so no random
  draw depends on the batch's make-up or order. The same request alone gives the same PNG bytes every time;
  inside a batch the pixels agree up to float rounding: batched UNet and VAE calls do not sum in the same
  order as a lone one (measured on CPU, 1 thread or 2, oneDNN on or off: ~1e-6 per call, ~5e-5 in the latents
  after a few steps), so now and then a pixel lands one 8-bit level off.
- A picture whose client went away (`cancelled`) is not drawn when its batch starts, not decoded or encoded
  when it ends, and when every picture of a loop is cancelled the loop stops at its next step (diffusers'
  `interrupt`). A loop that still has live pictures runs on: its tensors are batched.
- A picture fails alone: a loop that fails is run again picture by picture.
- LoRA adapters of the denoiser (`pipelines finetune` on a diffusion base) load by name through diffusers' LoRA
  support; a picture names its adapter (or none: the base), and pictures of different adapters run in different
  loops (a UNet call applies one set of adapters to the whole batch).
"""

from __future__ import annotations

import io
import itertools
import logging
import secrets
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.errors import PipelineError
from pipelines.serve.engine import AdapterError

log = logging.getLogger(__name__)

SEEDS = 2**64  # torch.Generator.manual_seed takes [0, 2**64); a negative seed s is 2**64 - 1 + s to it


@dataclass(eq=False)
class Picture:
    """One image to draw: the request's side, then the result."""

    prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    negative_prompt: str = ""
    adapter: str | None = None  # a name given to ImageEngine.load_adapter; None: the base model
    cancelled: bool = False  # set when the client went away
    # results
    png: bytes | None = None
    error: Exception | None = None

    @property
    def loop(self) -> tuple[int, int, int, float, str]:
        """What pictures must share to run in one denoising loop."""
        return self.width, self.height, self.steps, self.guidance, self.adapter or ""


def picture_seed(seed: int | None, index: int) -> int:
    """The seed of a request's picture `index`: its `seed` + `index` (modulo 2**64), or a fresh random seed."""
    if seed is None:
        return secrets.randbelow(SEEDS)
    if seed < 0:  # as manual_seed reads it, so index 0 is the very seed given
        seed += SEEDS - 1
    return (seed + index) % SEEDS


class ImageEngine:
    """A registered diffusion pipeline, ready to draw batches of prompts at its native size."""

    def __init__(self, pipe: Any, name: str, version: int):
        self.pipe = pipe
        self.name, self.version = name, version
        self.load_id = uuid.uuid4().hex[:12]
        self.latent_channels = int(pipe.unet.config.in_channels)
        side = pipe.unet.config.sample_size
        latent_h, latent_w = (side, side) if isinstance(side, int) else side
        # The size it was trained at: a UNet of this kind draws other sizes badly, if at all.
        self.width, self.height = latent_w * pipe.vae_scale_factor, latent_h * pipe.vae_scale_factor
        self._lock = threading.Lock()  # one model call at a time, as for TextEngine
        self.adapters: set[str] = set()

    @property
    def label(self) -> str:
        return f"{self.name}/v{self.version}"

    @property
    def sizes(self) -> list[str]:
        """The sizes this model draws, as OpenAI writes them ("WxH")."""
        return [f"{self.width}x{self.height}"]

    # -- adapters ------------------------------------------------------------------------------
    def load_adapter(self, name: str, folder: str | Path) -> None:
        """Load the LoRA folder of the denoiser (`pipelines finetune` on a diffusion base) under `name`
        (pictures then pick it by `Picture.adapter`)."""
        from pipelines.train.diffusion_lora import load_diffusion_adapter

        with self._lock:
            if name in self.adapters:
                return
            try:
                load_diffusion_adapter(self.pipe, str(folder), adapter_name=name)
            except (PipelineError, ValueError, OSError, KeyError, RuntimeError) as e:
                raise AdapterError(f"{folder}: cannot load as a LoRA adapter of {self.label} ({e})") from None
            self.adapters.add(name)

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name in self.adapters:
                self.adapters.discard(name)
                self.pipe.unet.delete_adapters(name)

    def _use(self, adapter: str | None) -> None:
        """Make the denoiser the base (None) or the base with `adapter`, before a loop (under the lock)."""
        if adapter is not None and adapter not in self.adapters:
            raise AdapterError(f"adapter {adapter} not loaded on {self.label}")
        if not self.adapters:  # no LoRA layers in the UNet at all
            return
        if adapter is None:
            self.pipe.unet.disable_lora()
        else:
            self.pipe.unet.enable_lora()
            self.pipe.unet.set_adapters([adapter])

    def draw(self, pictures: Sequence[Picture]) -> None:
        """Draw every picture that is not cancelled (each one's `png` or `error` is filled in place); one
        denoising loop per group of pictures sharing steps, guidance and size. Raises nothing."""
        done: list[tuple[Picture, Any]] = []
        with self._lock, torch.inference_mode():
            for _, group in itertools.groupby(sorted(pictures, key=lambda p: p.loop), key=lambda p: p.loop):
                live = [p for p in group if not p.cancelled and p.png is None and p.error is None]
                if not live:
                    continue
                try:
                    done += self._draw(live)
                except Exception as e:
                    if len(live) == 1:
                        live[0].error = e
                        continue
                    log.warning("a loop of %d pictures failed (%s: %s); drawing them one by one", len(live),
                                type(e).__name__, e)
                    for picture in live:
                        try:
                            done += self._draw([picture])
                        except Exception as e:
                            picture.error = e
        for picture, image in done:  # PNG encoding: CPU work that needs no model, outside the lock
            if picture.cancelled:
                continue
            try:
                picture.png = png(image)
            except Exception as e:
                picture.error = e

    def _draw(self, group: list[Picture]) -> list[tuple[Picture, Any]]:
        """One denoising loop for `group` (same loop settings); the decoded PIL images of its live pictures."""
        pipe = self.pipe
        width, height, steps, guidance, _ = group[0].loop
        self._use(group[0].adapter)
        shape = (self.latent_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(p.seed)) for p in group])

        def stop_when_all_gone(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            if all(p.cancelled for p in group):
                pipe._interrupt = True  # diffusers' way: the remaining steps are skipped
            return tensors

        guided = guidance > 1.0  # diffusers' classifier-free guidance: the negative prompt counts only then
        out = pipe([p.prompt for p in group], negative_prompt=[p.negative_prompt for p in group] if guided else None,
                   height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                   latents=latents.to(pipe.unet.device, pipe.unet.dtype), output_type="latent",
                   callback_on_step_end=stop_when_all_gone)
        keep = [i for i, p in enumerate(group) if not p.cancelled]
        if not keep:
            return []
        # Decoded here rather than by the pipeline: only the pictures whose clients are still there.
        latents = out.images[keep] / pipe.vae.config.scaling_factor
        images = pipe.image_processor.postprocess(pipe.vae.decode(latents).sample, output_type="pil")
        return [(group[i], image) for i, image in zip(keep, images, strict=True)]


def png(image: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()
