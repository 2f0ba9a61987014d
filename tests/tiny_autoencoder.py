"""A tiny KL autoencoder (diffusers' AutoencoderKL, f2, 4 latent channels) trained here in seconds on the drawn
shapes of tests/tiny_clip.py, for the encode and diffusion tests: a plain reconstruction + KL loop (the GAN
recipe is `pipelines pretrain --kind autoencoder`'s, tested on its own)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.tiny_clip import samples

IMAGE_SIZE = 32


def tiny_vae(seed: int = 0) -> object:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=IMAGE_SIZE)


def pixels(images: list) -> object:
    """PIL images as a [N, 3, 32, 32] tensor in [-1, 1]."""
    import torch
    from PIL import Image

    arrays = [np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC), np.float32) / 127.5 - 1
              for im in images]
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())


def train_tiny_autoencoder(folder: Path, steps: int = 200, batch: int = 32, seed: int = 0) -> Path:
    """Train the tiny autoencoder and save it (save_pretrained) with its scaling factor (1 / the latents' std,
    as Stable Diffusion's 0.18215 was found); return the folder."""
    import torch

    vae = tiny_vae(seed)
    x = pixels([im for im, _ in samples(480, seed)])
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            batch_x = x[torch.randperm(len(x), generator=gen)[:batch]]
            posterior = vae.encode(batch_x).latent_dist
            loss = (vae.decode(posterior.mean).sample - batch_x).abs().mean() \
                + 1e-6 * posterior.kl().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            std = vae.encode(x[:128]).latent_dist.mean.std().item()
    finally:
        torch.set_num_threads(threads)
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.eval().save_pretrained(folder)
    return folder
