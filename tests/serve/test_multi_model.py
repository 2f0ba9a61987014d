"""Several registered models behind one endpoint: a tiny diffusion model and a tiny LM in one replica.

`pipelines serve --model models:/tiny-sd@champion --also models:/lm@champion` on a real Ray Serve replica,
one server for the module: each request's `model` picks its model, /v1/models and /healthz list both, a
model asked for what its kind does not serve gets a 400 naming its kind, an adapter attaches to the base it
was trained on (the second model here), and the watcher follows an alias moved on one model without touching
the other.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from pipelines.serve.config import ServeConfig
from tests.serve.conftest import PORT, TEST_KV_CACHE_GIB, register, wait_for_port
from tests.serve.test_images import register_diffusion
from tests.serve.test_server import local_greedy, lora_folder, register_adapter
from tests.serve.tiny import tiny_diffusion

pytestmark = pytest.mark.timeout(300)

KEY = "sk-multi"
SD = {"model": "tiny-sd", "num_inference_steps": 2}  # few steps, the native 32x32
LM = {"model": "lm", "prompt": "the quick brown", "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Two diffusion pipeline folders that differ in their UNet's weights (seed 0, 1)."""
    root = tmp_path_factory.mktemp("diffusion")
    return {seed: tiny_diffusion(root / f"sd-{seed}", seed) for seed in (0, 1)}


@pytest.fixture(scope="module")
def url(ray_cluster: None, tracking: MlflowClient, folders: dict[int, Path], hf_folders: dict[int, Path],
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """tiny-sd@champion (v1) first, lm@champion (v1) beside it, an adapter trained on lm and one trained on a
    model this endpoint does not serve; the registry checked every second."""
    from ray import serve

    from pipelines.serve.app import serve_model

    assert register_diffusion(folders[0], 10.0) == 1
    assert register(hf_folders[0], "lm", 10.0) == 1
    other = register(hf_folders[1], "other", 10.0)
    root = tmp_path_factory.mktemp("lora")
    assert register_adapter(lora_folder(hf_folders[0], root / "lm-lora", seed=1), "lm-lora", "models:/lm/1") == 1
    register_adapter(lora_folder(hf_folders[1], root / "other-lora", seed=2), "other-lora", f"models:/other/{other}")
    wait_for_port()
    url = serve_model(ServeConfig(model="models:/tiny-sd@champion", also=["models:/lm@champion"],
                                  vllm_kv_cache_gib=TEST_KV_CACHE_GIB, vllm_compile=False,
                                  adapter=["models:/lm-lora@champion", "models:/other-lora@champion"], port=PORT,
                                  watch_interval_s=1.0, blocking=False, access={"api_keys": [KEY]}))
    assert url is not None
    yield url
    serve.shutdown()


def post(url: str, body: dict, path: str) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=300)


def image(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    [data] = response.json()["data"]
    with Image.open(io.BytesIO(base64.b64decode(data["b64_json"]))) as im:
        assert im.format == "PNG" and im.size == (32, 32)
        return np.asarray(im.convert("RGB"))


def health(url: str) -> dict:
    return httpx.get(f"{url}/healthz", timeout=10).json()


def test_one_endpoint_lists_every_model_and_its_adapters(url: str) -> None:
    # Closed before the server stops: a connection the server closes first keeps PORT busy for the next module.
    with openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60) as client:
        assert [m.id for m in client.models.list().data] == ["tiny-sd", "lm", "lm:lm-lora"]
    # The first model's keys as with one model; every adapter, and each model's version.
    assert health(url) == {"status": "ok", "model": "tiny-sd", "version": 1, "adapters": {"lm-lora": 1},
                           "models": {"tiny-sd": 1, "lm": 1}}


def test_each_request_goes_to_the_model_it_names(url: str, hf_folders: dict[int, Path]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_folders[0])
    r = post(url, LM, "/v1/completions")
    assert r.status_code == 200, r.text
    ids = tokenizer(LM["prompt"], add_special_tokens=False)["input_ids"]
    expected = [t for t in local_greedy(hf_folders[0], ids, LM["max_tokens"]) if t != tokenizer.eos_token_id]
    assert r.json()["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert r.json()["system_fingerprint"] == "lm/v1"
    adapted = post(url, {**LM, "model": "lm:lm-lora"}, "/v1/completions")
    assert adapted.status_code == 200 and adapted.json()["choices"][0]["text"] != r.json()["choices"][0]["text"]
    body = {**SD, "prompt": "a red circle", "seed": 3}
    first = image(post(url, body, "/v1/images/generations"))
    assert np.array_equal(image(post(url, body, "/v1/images/generations")), first)  # alone: the same bytes
    assert post(url, {**LM, "model": "other"}, "/v1/completions").json()["error"]["message"] == (
        "model 'other' not found; served: tiny-sd, lm, lm:lm-lora")
    assert post(url, {**LM, "model": "lm:other-lora"}, "/v1/completions").status_code == 404  # not lm's


@pytest.mark.parametrize(("path", "body", "kind", "asked"), [
    ("/v1/images/generations", {"model": "lm", "prompt": "a red circle"}, "a language model", "images"),
    ("/v1/completions", {**LM, "model": "tiny-sd"}, "a diffusion model", "completions"),
    ("/v1/embeddings", {"model": "tiny-sd", "input": "a red circle"}, "a diffusion model", "embeddings"),
    ("/v1/similarity", {"model": "lm", "images": ["x"], "texts": ["y"]}, "a language model", "similarity")])
def test_a_model_asked_for_another_kinds_work_is_a_400_naming_its_kind(url: str, path: str, body: dict, kind: str,
                                                                     asked: str) -> None:
    r = post(url, body, path)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == ("model", "model_not_supported")
    assert f"model {body['model']!r} is {kind}" in error["message"] and f"not {asked}" in error["message"]


def test_lineage_of_each_model_the_endpoint_serves(url: str) -> None:
    from pipelines.errors import PipelineError
    from pipelines.lineage import endpoint_lineage

    assert endpoint_lineage(url, None)["model"] == "models:/tiny-sd/1"  # the first model
    assert endpoint_lineage(url, "lm")["model"] == "models:/lm/1"
    assert endpoint_lineage(url, "lm:lm-lora")["model"] == "models:/lm-lora/1"
    with pytest.raises(PipelineError, match="serves tiny-sd, lm, not other"):
        endpoint_lineage(url, "other")


def test_an_alias_moved_on_one_model_leaves_the_other_alone(url: str, folders: dict[int, Path],
                                                            hf_folders: dict[int, Path]) -> None:
    body = {**SD, "prompt": "a red circle", "seed": 3}
    before = image(post(url, body, "/v1/images/generations"))
    answers: list[tuple[int, str]] = []
    stop = threading.Event()

    def keep_asking_the_lm() -> None:
        while not stop.is_set():
            r = post(url, LM, "/v1/completions")
            answers.append((r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text))
            time.sleep(0.05)

    asker = threading.Thread(target=keep_asking_the_lm)
    asker.start()
    try:
        time.sleep(0.5)
        assert register_diffusion(folders[1], 5.0) == 2  # better: tiny-sd's champion moves, lm's does not
        deadline = time.monotonic() + 60
        while health(url)["models"]["tiny-sd"] != 2:  # the watcher, by itself
            assert time.monotonic() < deadline, "the replica did not follow tiny-sd's alias"
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        stop.set()
        asker.join()
    assert health(url) == {"status": "ok", "model": "tiny-sd", "version": 2, "adapters": {"lm-lora": 1},
                           "models": {"tiny-sd": 2, "lm": 1}}
    after = image(post(url, body, "/v1/images/generations"))
    assert (np.abs(after.astype(int) - before) > 1).mean() > 0.1  # the new weights draw another image
    # The LM answered throughout, the same text on the same version.
    assert len(answers) > 5 and {status for status, _ in answers} == {200} and len({t for _, t in answers}) == 1
    assert post(url, LM, "/v1/completions").json()["system_fingerprint"] == "lm/v1"

    # And the other way: the LM's alias moves, tiny-sd stays on version 2.
    assert register(hf_folders[1], "lm", 5.0) == 2
    deadline = time.monotonic() + 300  # on vLLM the new version starts its own engine
    while (reloaded := post(url, {}, "/admin/reload").json())["models"]["lm"]["version"] != 2:
        assert time.monotonic() < deadline, "the replica did not follow lm's alias"
        time.sleep(0.2)
    assert reloaded["models"]["tiny-sd"] == {"version": 2, "previous_version": 2}
    assert (reloaded["model"], reloaded["version"], reloaded["previous_version"]) == ("tiny-sd", 2, 2)
    assert post(url, LM, "/v1/completions").json()["system_fingerprint"] == "lm/v2"
    assert np.array_equal(image(post(url, body, "/v1/images/generations")), after)
    # lm-lora was trained on lm/1: still served on lm/2 (with a warning), and still lm's.
    assert health(url)["models"] == {"tiny-sd": 2, "lm": 2}
    assert post(url, {**LM, "model": "lm:lm-lora"}, "/v1/completions").status_code == 200


def test_the_same_model_twice_is_a_one_line_error(tmp_path: Path) -> None:
    from pipelines.cli import app

    with pytest.raises(ValueError, match="model lm is asked for twice"):
        ServeConfig(model="models:/lm@champion", also=["models:/lm/2"])
    runner = CliRunner()
    bad = runner.invoke(app, ["serve", "--model", "models:/lm@champion", "--also", "models:/sd@champion",
                              "--also", "models:/lm/2", "--emit-config", str(tmp_path / "x.yaml")])
    assert bad.exit_code == 2 and "model lm is asked for twice (models:/lm@champion and models:/lm/2)" in bad.output
    assert len(bad.output.strip().splitlines()) == 1, bad.output


def test_several_models_in_a_file_and_in_the_emitted_config(tmp_path: Path) -> None:
    from pipelines.config import load_config
    from pipelines.serve.app import build_app, emit_config

    listed = tmp_path / "serve.yaml"
    listed.write_text("model: [models:/lm@champion, models:/sd@champion]\nalso: [models:/clip@champion]\n")
    config = load_config(ServeConfig, listed)
    assert (config.model, config.also) == ("models:/lm@champion", ["models:/sd@champion", "models:/clip@champion"])
    assert load_config(ServeConfig, None, {("model",): "models:/lm@champion"}).also == []  # one model: as before
    args = yaml.safe_load(emit_config(config, tmp_path / "out.yaml").read_text())["applications"][0]["args"]
    assert ServeConfig.model_validate(args).models == config.models
    assert build_app(args)._bound_deployment.init_args[0]["also"] == config.also  # what each replica gets
