"""`pipelines serve` of a registered diffusion model: OpenAI's Images API on a real Ray Serve replica.

An untrained tiny StableDiffusionPipeline (tests/serve/tiny.py), registered as kind "diffusion", served on
loopback with API keys. Its images are checked against the same folder run locally with diffusers, a seed
against the same seed inside a batch of other requests, and the errors against OpenAI's bodies. The test that
moves the alias comes last.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from pipelines.serve.config import ServeConfig
from pipelines.serve.images import ImageEngine, Picture
from tests.serve.conftest import PORT, register, wait_for_port
from tests.serve.tiny import tiny_diffusion

pytestmark = pytest.mark.timeout(300)

KEYS = ["sk-images-1", "sk-images-2"]
FAST = {"model": "tiny-sd", "num_inference_steps": 2}  # every request here: few steps, the native 32x32


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Two pipeline folders that differ in their UNet's weights (seed 0, 1)."""
    root = tmp_path_factory.mktemp("diffusion")
    return {seed: tiny_diffusion(root / f"sd-{seed}", seed) for seed in (0, 1)}


def register_diffusion(folder: Path, value: float) -> int:
    from pipelines.train.registry import register_folder, training_run

    with training_run("images-serve-tests", None, {}) as run_id:
        pass
    return register_folder("diffusion", str(folder), "tiny-sd", run_id=run_id, metric="heldout_fd_clip",
                           value=value, lower_is_better=True).version


@pytest.fixture(scope="module")
def url(ray_cluster: None, tracking: MlflowClient, folders: dict[int, Path]) -> Iterator[str]:
    """models:/tiny-sd@champion (v1, seed 0) on 127.0.0.1:PORT (direct ingress), keys required. Batches wait
    0.1 s to fill, so requests sent together share a denoising loop."""
    from ray import serve

    from pipelines.serve.app import serve_model

    assert register_diffusion(folders[0], 10.0) == 1
    wait_for_port()
    url = serve_model(ServeConfig(model="models:/tiny-sd@champion", port=PORT, watch_interval_s=0, blocking=False,
                                  access={"api_keys": KEYS}, batching={"batch_wait_timeout_s": 0.1}))
    assert url is not None
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def proxy_url(url: str) -> str:
    """Serve's HTTP proxy in front of the same replica."""
    return f"http://127.0.0.1:{ServeConfig(model='models:/tiny-sd@champion', port=PORT).serve_proxy_port}"


def post(url: str, body: dict, path: str = "/v1/images/generations", key: str | None = KEYS[0],
         timeout: float = 120) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=timeout)


def pixels(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def images(response: httpx.Response) -> list[np.ndarray]:
    assert response.status_code == 200, response.text
    return [pixels(d["b64_json"]) for d in response.json()["data"]]


def assert_same_image(a: np.ndarray, b: np.ndarray) -> None:
    """The same image up to float rounding: a batched model call does not sum in the order of a lone one, so a
    few pixels may land one 8-bit level off (see pipelines/serve/images.py); another seed differs everywhere."""
    diff = np.abs(a.astype(int) - b)
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01, (diff.max(), (diff > 0).sum())


def differ(a: np.ndarray, b: np.ndarray) -> bool:
    """Another image, not the same one up to rounding: over a tenth of the pixels more than one level apart."""
    return bool((np.abs(a.astype(int) - b) > 1).mean() > 0.1)


def local_image(folder: Path, prompt: str, seed: int, steps: int, guidance: float = 4.0) -> np.ndarray:
    """What diffusers itself draws from `folder` for this prompt and seed."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(seed))
    return np.asarray(out.images[0])


def test_openai_client_draws_what_diffusers_draws(url: str, folders: dict[int, Path]) -> None:
    # Closed before the server stops: a connection the server closes first keeps PORT busy for the next module.
    with openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS[0], max_retries=0, timeout=120) as client:
        assert [m.id for m in client.models.list().data] == ["tiny-sd"]
        out = client.images.generate(model="tiny-sd", prompt="a red circle", n=2, size="32x32",
                                     response_format="b64_json", extra_body={"seed": 1, "num_inference_steps": 3})
    assert out.created > 0 and len(out.data) == 2
    first, second = (pixels(d.b64_json) for d in out.data)
    assert first.shape == second.shape == (32, 32, 3)
    assert [d.model_extra["seed"] for d in out.data] == [1, 2]  # image i from seed + i
    # Up to rounding: the replica drew both in one batch, and may split its sums across threads otherwise.
    assert_same_image(first, local_image(folders[0], "a red circle", 1, 3))
    assert_same_image(second, local_image(folders[0], "a red circle", 2, 3))
    assert differ(first, second)


def test_extra_fields_change_the_image(url: str) -> None:
    base = {**FAST, "prompt": "a red circle", "seed": 5}
    plain = images(post(url, base))[0]
    assert (images(post(url, base))[0] == plain).all()  # the same request: the same image
    for change in [{"seed": 6}, {"prompt": "a blue square"}, {"num_inference_steps": 3}, {"guidance_scale": 1.0},
                   {"negative_prompt": "red"}]:
        assert differ(images(post(url, base | change))[0], plain), change
    # Without a seed each image gets a random one, named in the answer; sent back, it draws the same image.
    drawn = post(url, {**FAST, "prompt": "a red circle"}).json()["data"][0]
    again = post(url, {**FAST, "prompt": "a red circle", "seed": drawn["seed"]}).json()["data"][0]
    assert (pixels(drawn["b64_json"]) == pixels(again["b64_json"])).all()
    # Fields OpenAI has and this server honours as they are (what it does anyway), and unknown ones, pass.
    accepted = {**base, "user": "u-1", "size": "auto", "quality": "standard", "background": "opaque",
                "output_format": "png", "stream": False, "response_format": "b64_json", "unknown_field": 1}
    assert (images(post(url, accepted))[0] == plain).all()


def test_a_seed_draws_the_same_image_alone_and_in_a_batch(url: str) -> None:
    """Requests sent together share one denoising loop (their loop settings agree) or run beside it (steps
    differ): the seed-7 image is the same either way, and every request gets its own images, in order."""
    lone = {**FAST, "prompt": "a red circle", "seed": 7}
    alone = images(post(url, lone))[0]
    others = [{**FAST, "prompt": "a blue square", "seed": 1}, {**FAST, "prompt": "dog", "seed": 7,
                                                              "num_inference_steps": 3},
              {**FAST, "prompt": "a red circle", "seed": 8, "n": 2, "negative_prompt": "blue"}]
    for _ in range(2):
        with ThreadPoolExecutor(4) as pool:
            answers = [images(r) for r in pool.map(lambda body: post(url, body), [others[0], lone, *others[1:]])]
        assert [len(a) for a in answers] == [1, 1, 1, 2]
        assert_same_image(answers[1][0], alone)
        assert all(differ(a[0], alone) for a in answers[:1] + answers[2:])
        assert differ(answers[3][0], answers[3][1])


def test_the_engine_draws_a_shared_loop_as_each_picture_alone(folders: dict[int, Path]) -> None:
    """The same, without Ray: one `draw` of four pictures (three of them one loop) against each drawn alone."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folders[0])
    pipe.set_progress_bar_config(disable=True)
    engine = ImageEngine(pipe, "tiny-sd", 1)
    assert engine.sizes == ["32x32"]

    def picture(prompt: str, seed: int, steps: int = 2, negative: str = "") -> Picture:
        return Picture(prompt, 32, 32, steps, 4.0, seed, negative_prompt=negative)

    batch = [picture("a blue square", 1), picture("a red circle", 7), picture("dog", 7, steps=3),
             picture("a red circle", 8, negative="blue")]
    engine.draw(batch)
    for shared in batch:
        alone = picture(shared.prompt, shared.seed, shared.steps, shared.negative_prompt)
        engine.draw([alone])
        assert shared.error is None and shared.png is not None
        assert_same_image(pixels(base64.b64encode(shared.png)), pixels(base64.b64encode(alone.png)))
    gone = [picture("a red circle", 1), picture("a red circle", 2)]
    gone[0].cancelled = True
    engine.draw(gone)
    assert gone[0].png is None and gone[1].png is not None  # a cancelled picture is neither decoded nor encoded


@pytest.mark.parametrize("ingress", ["direct", "proxy"])
def test_a_client_that_leaves_stops_its_loop(ingress: str, url: str, proxy_url: str) -> None:
    """A client that gives up on 8 images of 100 steps: its loop stops at the next step, so the next request
    is answered in about the time of a 10-step loop of 8, not after the 100 steps. The replica sees the client
    leave whether it answers HTTP itself or behind Serve's proxy."""
    url = url if ingress == "direct" else proxy_url
    eight = {**FAST, "prompt": "a red circle", "n": 8, "seed": 3}
    started = time.monotonic()
    images(post(url, eight | {"num_inference_steps": 10}))
    ten_steps = time.monotonic() - started
    with pytest.raises(httpx.ReadTimeout):
        post(url, eight | {"num_inference_steps": 100}, timeout=max(1.0, ten_steps))
    started = time.monotonic()
    assert len(images(post(url, {**FAST, "prompt": "a red circle", "num_inference_steps": 1}))) == 1
    waited = time.monotonic() - started
    assert waited < 3 * ten_steps + 1.0, (waited, ten_steps)


BAD = [
    ({"size": "64x64"}, 400, "size", "invalid_value", "32x32"),
    ({"size": "big"}, 400, "size", "invalid_value", "32x32"),
    ({"response_format": "url"}, 400, "response_format", "unsupported_value", "b64_json"),
    ({"response_format": "jpeg"}, 400, "response_format", None, None),
    ({"n": 0}, 400, "n", None, None),
    ({"n": 11}, 400, "n", None, None),
    ({"num_inference_steps": 0}, 400, "num_inference_steps", None, None),
    ({"num_inference_steps": 101}, 400, "num_inference_steps", None, None),
    ({"guidance_scale": float("nan")}, 400, "guidance_scale", None, None),
    ({"seed": "1"}, 400, "seed", None, None),
    ({"quality": "hd"}, 400, "quality", "unsupported_value", "standard"),
    ({"style": "vivid"}, 400, "style", "unsupported_parameter", None),
    ({"background": "transparent"}, 400, "background", "unsupported_value", None),
    ({"output_format": "jpeg"}, 400, "output_format", "unsupported_value", "png"),
    ({"output_compression": 50}, 400, "output_compression", "unsupported_parameter", None),
    ({"moderation": "low"}, 400, "moderation", "unsupported_parameter", None),
    ({"stream": True}, 400, "stream", "unsupported_value", None),
    ({"prompt": "a red \ud800"}, 400, "prompt", None, None),
    ({"prompt": None}, 400, "prompt", None, None),
    ({"model": "other"}, 404, "model", "model_not_found", None),
]


@pytest.mark.parametrize("change, status, param, code, named", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_requests_get_an_openai_error(url: str, change: dict, status: int, param: str, code: str | None,
                                          named: str | None) -> None:
    body = {k: v for k, v in ({**FAST, "prompt": "a red circle"} | change).items() if v is not None}
    r = httpx.post(f"{url}/v1/images/generations", timeout=60, headers={
        "Authorization": f"Bearer {KEYS[1]}", "content-type": "application/json"},
        content=json.dumps(body))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    if code is not None:
        assert error["code"] == code, error
    if named is not None:
        assert named in error["message"], error


@pytest.mark.parametrize("path, body, asked", [
    ("/v1/completions", {"model": "tiny-sd", "prompt": "a red"}, "completions"),
    ("/v1/chat/completions", {"model": "tiny-sd", "messages": [{"role": "user", "content": "hi"}]}, "completions"),
    ("/v1/embeddings", {"model": "tiny-sd", "input": "a red circle"}, "embeddings"),
    ("/v1/similarity", {"model": "tiny-sd", "images": ["x"], "texts": ["a"]}, "similarity"),
])
def test_a_diffusion_model_asked_for_text_names_its_kind(url: str, path: str, body: dict, asked: str) -> None:
    r = post(url, body, path=path)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == ("model", "model_not_supported")
    assert "is a diffusion model" in error["message"] and "/v1/images/generations" in error["message"]
    assert f"not {asked}" in error["message"]


def test_keys_are_required(url: str) -> None:
    body = {**FAST, "prompt": "a red circle"}
    assert post(url, body, key=None).json()["error"]["code"] == "invalid_api_key"
    assert post(url, body, key="sk-wrong").status_code == 401
    with openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0, timeout=60) as client:
        with pytest.raises(openai.AuthenticationError):
            client.images.generate(model="tiny-sd", prompt="a red circle")
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok", "model": "tiny-sd", "version": 1, "adapters": {}}


def test_alias_moves_are_followed_even_to_another_kind(url: str, folders: dict[int, Path], tracking: MlflowClient,
                                                       hf_folders: dict[int, Path]) -> None:
    body = {**FAST, "prompt": "a red circle", "seed": 4}
    before = images(post(url, body))[0]
    assert register_diffusion(folders[1], 5.0) == 2  # better: champion moves
    assert post(url, {}, path="/admin/reload").json()["version"] == 2
    assert differ(images(post(url, body))[0], before)

    # A language model as the next version: the same routes now answer as for an LM, and refuse images by kind.
    version = register(hf_folders[0], "tiny-sd", 1.0)
    tracking.set_registered_model_alias("tiny-sd", "champion", str(version))
    assert post(url, {}, path="/admin/reload").json()["version"] == version
    r = post(url, body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_supported", r.text
    assert "is a language model" in r.json()["error"]["message"]
    assert post(url, {"model": "tiny-sd", "prompt": "the", "max_tokens": 2}, path="/v1/completions").status_code == 200
