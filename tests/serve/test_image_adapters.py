"""`pipelines serve` of a diffusion model with a LoRA adapter of its denoiser (what `pipelines finetune` on a
diffusion base registers), asked for per request as `BASE:ADAPTER`, as LM adapters are.

The base is the untrained tiny pipeline of tests/serve/tiny.py; the adapter is peft's LoRA of its UNet's
attention with random (non-zero) weights, saved and registered against the base's version as the fine-tune
saves and registers it. The served pictures are checked against diffusers drawing the same folder with the same
adapter loaded in process, and against the base's own pictures, alone and inside one batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from pipelines.serve.config import ServeConfig
from tests.serve.conftest import PORT, wait_for_port
from tests.serve.test_images import KEYS, assert_same_image, differ, images, post
from tests.serve.tiny import tiny_diffusion

pytestmark = pytest.mark.timeout(300)

BASE = "lora-sd"
ADAPTER = "lora-sd-bars"


def lora_folder(base: Path, folder: Path) -> Path:
    """peft's LoRA of the base UNet's attention (pipelines.train.diffusion_lora's targets), random B weights so
    that it changes what the denoiser predicts; saved as the fine-tune's export saves it."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model

    from pipelines.train.diffusion_lora import DEFAULT_TARGETS

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    lora = get_peft_model(unet, LoraConfig(r=4, lora_alpha=4, target_modules=DEFAULT_TARGETS,
                                           init_lora_weights=False))
    with torch.no_grad():
        for name, weight in lora.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.5)
    lora.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("image-adapters")
    base = tiny_diffusion(root / "base", seed=0)
    return {"base": base, "adapter": lora_folder(base, root / "adapter")}


@pytest.fixture(scope="module")
def url(ray_cluster: None, tracking: MlflowClient, folders: dict[str, Path]) -> Iterator[str]:
    """models:/lora-sd@champion with its adapter models:/lora-sd-bars@champion, keys required; batches wait
    0.1 s, so requests sent together share a batch."""
    from ray import serve

    from pipelines.serve.app import serve_model
    from pipelines.train.registry import register_adapter, register_folder, training_run

    with training_run("image-adapter-serve-tests", None, {}) as run_id:
        pass
    base = register_folder("diffusion", str(folders["base"]), BASE, run_id=run_id, metric="heldout_fd_clip",
                           value=1.0, lower_is_better=True)
    register_adapter(str(folders["adapter"]), ADAPTER, run_id=run_id, base_uri=f"models:/{BASE}/{base.version}",
                     metric="heldout_loss", value=1.0)
    wait_for_port()
    url = serve_model(ServeConfig(model=f"models:/{BASE}@champion", adapter=[f"models:/{ADAPTER}@champion"],
                                  port=PORT, watch_interval_s=0, blocking=False, access={"api_keys": KEYS},
                                  batching={"batch_wait_timeout_s": 0.1}))
    assert url is not None
    yield url
    serve.shutdown()


def local_image(folders: dict[str, Path], prompt: str, seed: int, steps: int, adapter: bool) -> np.ndarray:
    """What diffusers draws from the base folder, with the adapter loaded (the way `pipelines.train.
    diffusion_lora.load_diffusion_adapter` documents) or without."""
    from diffusers import DiffusionPipeline

    from pipelines.train.diffusion_lora import load_diffusion_adapter

    pipe = DiffusionPipeline.from_pretrained(folders["base"])
    pipe.set_progress_bar_config(disable=True)
    if adapter:
        load_diffusion_adapter(pipe, str(folders["adapter"]))
    out = pipe(prompt, num_inference_steps=steps, guidance_scale=4.0, generator=torch.Generator().manual_seed(seed))
    return np.asarray(out.images[0])


def draw(url: str, model: str, seed: int) -> np.ndarray:
    [image] = images(post(url, {"model": model, "prompt": "a red square", "seed": seed, "num_inference_steps": 3}))
    return image


def test_the_adapter_is_listed_and_draws_what_diffusers_draws_with_it(url: str, folders: dict[str, Path]) -> None:
    listed = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=30).json()
    assert [m["id"] for m in listed["data"]] == [BASE, f"{BASE}:{ADAPTER}"]

    tuned = draw(url, f"{BASE}:{ADAPTER}", 3)
    plain = draw(url, BASE, 3)
    assert_same_image(tuned, local_image(folders, "a red square", 3, 3, adapter=True))
    assert_same_image(plain, local_image(folders, "a red square", 3, 3, adapter=False))
    assert differ(tuned, plain)  # the adapter changes the picture
    assert_same_image(draw(url, BASE, 3), plain)  # and is switched off again for the base


def test_base_and_adapter_requests_in_one_batch_each_draw_their_own(url: str) -> None:
    alone = {model: draw(url, model, 5) for model in (BASE, f"{BASE}:{ADAPTER}")}
    models = [BASE, f"{BASE}:{ADAPTER}"] * 2
    with ThreadPoolExecutor(len(models)) as pool:
        together = list(pool.map(lambda m: draw(url, m, 5), models))
    for model, image in zip(models, together, strict=True):
        assert_same_image(image, alone[model])


def test_an_adapter_that_is_not_served_is_a_404(url: str) -> None:
    response = post(url, {"model": f"{BASE}:no-such-adapter", "prompt": "a red square", "num_inference_steps": 2})
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "model_not_found"
