"""`pipelines serve` of a registered CLIP model: text and image embeddings, /v1/similarity, and the errors.

The tiny CLIP of tests/tiny_clip.py, registered with `register_clip` (tagged pipelines.kind=clip), served by a
real Ray Serve replica on loopback; its vectors are checked against the same folder run locally.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from mlflow import MlflowClient

from pipelines.serve.config import ServeConfig
from pipelines.train.clip_model import load_clip
from tests.serve.conftest import PORT, wait_for_port
from tests.tiny_clip import draw, jpeg

pytestmark = pytest.mark.timeout(300)

CAPTIONS = ["a red circle", "a green square", "a blue triangle", "a yellow circle"]


@pytest.fixture(scope="module")
def url(ray_cluster: None, tracking: MlflowClient, tiny_clip: Path) -> Iterator[str]:
    """models:/tiny-clip@champion served on 127.0.0.1:PORT (direct ingress)."""
    from ray import serve

    from pipelines.serve.app import serve_model
    from pipelines.train.registry import register_clip, training_run

    with training_run("clip-serve-tests", None, {}) as run_id:
        pass
    register_clip(str(tiny_clip), "tiny-clip", run_id=run_id, metric="recall_at_1", value=1.0)
    wait_for_port()
    url = serve_model(ServeConfig(model="models:/tiny-clip@champion", port=PORT, watch_interval_s=0, blocking=False))
    assert url is not None
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    """One drawing per caption of CAPTIONS, as JPEG."""
    rng = np.random.default_rng(1)
    return [jpeg(draw(c.split()[1], c.split()[2], rng)) for c in CAPTIONS]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60)


def vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([d["embedding"] for d in response.json()["data"]], np.float32)


def test_text_and_image_embeddings_match_the_model_run_locally(url: str, tiny_clip: Path, images) -> None:
    local = load_clip(str(tiny_clip), device="cpu")
    texts = vectors(post(url, "/v1/embeddings", {"model": "tiny-clip", "input": CAPTIONS}))
    assert texts.shape == (4, local.model.config.projection_dim)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(texts, local.embed_texts(CAPTIONS), atol=1e-5)

    # Images as base64 and as data: URLs, mixed with a text, answered in the order given.
    body = {"model": "tiny-clip", "input": [{"image": b64(images[0])}, "a red circle",
                                            {"image": f"data:image/jpeg;base64,{b64(images[1])}"}]}
    mixed = vectors(post(url, "/v1/embeddings", body))
    np.testing.assert_allclose(mixed[[0, 2]], local.embed_images(images[:2]), atol=1e-5)
    np.testing.assert_allclose(mixed[1], texts[0], atol=1e-5)

    every = vectors(post(url, "/v1/embeddings", {"model": "tiny-clip", "input": [{"image": b64(i)} for i in images]}))
    assert ((every @ texts.T).argmax(1) == np.arange(4)).all()  # each drawing is closest to its own caption


def test_openai_client_and_dimensions(url: str) -> None:
    # Closed before the server stops: a connection the server closes first keeps PORT busy for test_server.
    with openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60) as c:
        out = c.embeddings.create(model="tiny-clip", input=["a red circle", "a blue triangle"])  # base64 on the wire
        assert len(out.data) == 2 and abs(np.linalg.norm(out.data[0].embedding) - 1) < 1e-5
        short = c.embeddings.create(model="tiny-clip", input="a red circle", dimensions=8, encoding_format="float")
        assert len(short.data[0].embedding) == 8 and abs(np.linalg.norm(short.data[0].embedding) - 1) < 1e-5
        assert c.models.list().data[0].id == "tiny-clip"


def test_concurrent_requests_batched_together_each_get_their_own_vectors(url: str, tiny_clip: Path,
                                                                         images) -> None:
    """24 requests at once (captions, images, both, of different counts) are grouped into shared model calls
    by `serve.batch` and split back: every response holds exactly its own inputs' vectors, in order."""
    from concurrent.futures import ThreadPoolExecutor

    local = load_clip(str(tiny_clip), device="cpu")
    want_texts, want_images = local.embed_texts(CAPTIONS), local.embed_images(images)
    # k % 3 = 0: one image; 1: a caption and two images; 2: two captions
    requests = [([CAPTIONS[(k + j) % 4] for j in range(k % 3)], [(k + j) % 4 for j in range((k + 1) % 3)])
                for k in range(24)]

    def send(request: tuple[list[str], list[int]]) -> np.ndarray:
        texts, pictures = request
        body = {"model": "tiny-clip", "input": [*texts, *({"image": b64(images[p])} for p in pictures)]}
        return vectors(post(url, "/v1/embeddings", body))

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(send, requests))
    for (texts, pictures), got in zip(requests, answers, strict=True):
        want = np.concatenate([want_texts[[CAPTIONS.index(t) for t in texts]].reshape(-1, got.shape[1]),
                               want_images[pictures].reshape(-1, got.shape[1])])
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_similarity_is_the_image_by_text_cosine_matrix(url: str, images) -> None:
    body = {"model": "tiny-clip", "images": [b64(i) for i in images], "texts": CAPTIONS}
    r = post(url, "/v1/similarity", body)
    assert r.status_code == 200, r.text
    matrix = np.array(r.json()["similarity"])
    assert matrix.shape == (4, 4)
    np.testing.assert_allclose(r.json()["pairs"], np.diagonal(matrix))
    assert (matrix.argmax(1) == np.arange(4)).all()
    text = vectors(post(url, "/v1/embeddings", {"model": "tiny-clip", "input": CAPTIONS}))
    image = vectors(post(url, "/v1/embeddings", {"model": "tiny-clip", "input": [{"image": b64(images[0])}]}))
    np.testing.assert_allclose(matrix[0], text @ image[0], atol=1e-5)

    uneven = post(url, "/v1/similarity", {"model": "tiny-clip", "images": [b64(images[0])], "texts": CAPTIONS})
    assert np.array(uneven.json()["similarity"]).shape == (1, 4) and "pairs" not in uneven.json()


@pytest.mark.parametrize("path, body, status, param, code", [
    ("/v1/completions", {"model": "tiny-clip", "prompt": "a red"}, 400, "model", "model_not_supported"),
    ("/v1/chat/completions", {"model": "tiny-clip", "messages": [{"role": "user", "content": "hi"}]}, 400, "model",
     "model_not_supported"),
    ("/v1/embeddings", {"model": "tiny-clip", "input": [{"image": "not base64!"}]}, 400, "input.0.image",
     "invalid_image"),
    ("/v1/embeddings", {"model": "tiny-clip", "input": ["x", {"image": b64(b"not an image")}]}, 400, "input.1.image",
     "invalid_image"),
    ("/v1/embeddings", {"model": "tiny-clip", "input": [{"image": "data:image/png,abc"}]}, 400, "input.0.image",
     "invalid_image"),
    ("/v1/embeddings", {"model": "tiny-clip", "input": [{"picture": "abc"}]}, 400, "input", None),
    ("/v1/embeddings", {"model": "tiny-clip", "input": [1, 2, 3]}, 400, "input", "invalid_value"),
    ("/v1/embeddings", {"model": "tiny-clip", "input": "x", "dimensions": 4096}, 400, "dimensions", "invalid_value"),
    ("/v1/embeddings", {"model": "other", "input": "x"}, 404, "model", "model_not_found"),
    ("/v1/similarity", {"model": "tiny-clip", "images": [], "texts": ["x"]}, 400, "images", None),
    ("/v1/similarity", {"model": "tiny-clip", "images": ["@@"], "texts": ["x"]}, 400, "images.0", "invalid_image"),
    ("/v1/similarity", {"model": "tiny-clip", "texts": ["x"]}, 400, "images", "missing"),
])
def test_bad_input_gets_an_openai_error_never_a_500(url: str, path: str, body: dict, status: int, param: str,
                                                   code: str | None) -> None:
    r = post(url, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code


def test_healthz_names_the_version(url: str) -> None:
    assert httpx.get(f"{url}/healthz", timeout=10).json() == {"status": "ok", "model": "tiny-clip", "version": 1,
                                                               "adapters": {}}


def png(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("1", (width, height)).save(out, "PNG")  # a few KB, whatever the size: all one colour
    return out.getvalue()


def test_hostile_inputs_get_4xx_and_their_batch_mates_finish(url: str, images) -> None:
    """A huge image (refused from its header), a text that is no valid unicode, too many inputs: each gets its
    4xx, never a 500, and the good requests sent at the same moment all finish."""
    from concurrent.futures import ThreadPoolExecutor

    bad = [
        ("/v1/embeddings", {"model": "tiny-clip", "input": [{"image": b64(png(9000, 9000))}]}, 400, "input.0.image"),
        ("/v1/similarity", {"model": "tiny-clip", "images": [b64(png(9000, 9000))], "texts": ["x"]}, 400, "images.0"),
        ("/v1/embeddings", {"model": "tiny-clip", "input": [{"image": b64(images[0][:200])}]}, 400, "input.0.image"),
        ("/v1/embeddings", {"model": "tiny-clip", "input": ["a red \ud800"]}, 400, "input"),
        ("/v1/similarity", {"model": "tiny-clip", "images": [b64(images[0])], "texts": ["\udfff"]}, 400, "texts"),
        ("/v1/embeddings", {"model": "tiny-clip", "input": ["x"] * 1000}, 400, "input"),
        ("/v1/embeddings", {"model": "tiny-clip", "input": "x", "dimensions": 10**30}, 400, "dimensions"),
    ]
    good = {"model": "tiny-clip", "input": [CAPTIONS[0], {"image": b64(images[1])}]}

    def send(request: tuple[str, dict]) -> httpx.Response:
        path, body = request
        content = json.dumps(body)  # lone surrogates go on the wire as \ud800 escapes, as a client may send them
        return httpx.post(f"{url}{path}", content=content, headers={"content-type": "application/json"}, timeout=120)

    for path, body, status, param in bad:
        with ThreadPoolExecutor(11) as pool:
            answers = list(pool.map(send, [("/v1/embeddings", good)] * 5 + [(path, body)]
                                    + [("/v1/embeddings", good)] * 5))
        r = answers[5]
        assert r.status_code == status, (param, r.text[:300])
        assert r.json()["error"]["param"] == param, r.text[:300]
        assert [a.status_code for a in answers[:5] + answers[6:]] == [200] * 10, param
