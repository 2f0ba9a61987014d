"""`pipelines serve` end to end: a real Ray Serve replica on loopback, called with the openai client and httpx.

One server for the module (models:/lm@champion, adapters lm-lora and other-lora, keys, 60 requests
a minute per key). Tests that move the alias come last: until then the replica serves version 1,
whose outputs are checked against the same weights run locally.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from mlflow import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipelines.serve.engine import plain_chat_prompt
from tests.serve.conftest import ON_VLLM, Server, register
from tests.serve.tiny import CONTEXT

pytestmark = pytest.mark.timeout(300)


def client(server: Server, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key or server.key(), max_retries=0, timeout=60)


def local_greedy(folder: Path, prompt_ids: list[int], n: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def tokenizer(hf_folders: dict[int, Path]):
    return AutoTokenizer.from_pretrained(hf_folders[0])


def text_of(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode([t for t in ids if t != tokenizer.eos_token_id], skip_special_tokens=True)


# -- the openai client ---------------------------------------------------------------------------
def test_models_lists_the_served_model(server: Server) -> None:
    assert [m.id for m in client(server).models.list().data] == ["lm"]  # no adapter registered yet
    health = httpx.get(f"{server.url}/healthz").json()  # no key needed
    assert health["status"] == "ok" and (health["model"], health["version"]) == ("lm", 1)
    assert health["engine"] == ("vllm" if ON_VLLM else "transformers")  # engine auto: vLLM where installed


def test_completion_is_the_models_greedy_output(server: Server, hf_folders, tokenizer) -> None:
    prompt = "the quick brown"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    expected = local_greedy(hf_folders[0], ids, 12)
    out = client(server).completions.create(model="lm", prompt=prompt, max_tokens=12, temperature=0)
    [choice] = out.choices
    assert choice.text == text_of(tokenizer, expected)
    assert choice.finish_reason == ("stop" if tokenizer.eos_token_id in expected else "length")
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), len(expected))
    assert out.model == "lm" and out.system_fingerprint == "lm/v1" and out.object == "text_completion"
    # Several prompts and n: one choice each, in order.
    many = client(server).completions.create(model="lm", prompt=[prompt, "hello"], max_tokens=12, temperature=0, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text == choice.text


def test_seed_reproduces_a_sampled_completion(server: Server) -> None:
    c = client(server)

    def sample(seed: int) -> str:
        return c.completions.create(model="lm", prompt="hello world", max_tokens=16, temperature=1.5,
                                    top_p=0.95, seed=seed).choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(6)}) > 1


def test_stop_strings_cut_the_output(server: Server) -> None:
    c = client(server)
    full = c.completions.create(model="lm", prompt="a model", max_tokens=16, temperature=0).choices[0].text
    assert len(full) > 4
    stop = full[2:4]
    cut = c.completions.create(model="lm", prompt="a model", max_tokens=16, temperature=0, stop=[stop, "zzz"])
    assert cut.choices[0].text == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_chat_uses_the_plain_template(server: Server, hf_folders, tokenizer) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    prompt_ids = tokenizer(plain_chat_prompt(messages), add_special_tokens=False)["input_ids"]
    expected = local_greedy(hf_folders[0], prompt_ids, 10)
    out = client(server).chat.completions.create(model="lm", messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == text_of(tokenizer, expected)
    assert out.usage.prompt_tokens == len(prompt_ids) and out.object == "chat.completion"
    # max_completion_tokens is the newer name of max_tokens.
    newer = client(server).chat.completions.create(model="lm", messages=messages, max_completion_tokens=3,
                                                   temperature=0)
    assert newer.usage.completion_tokens <= 3


def test_chat_streams_server_sent_events(server: Server) -> None:
    c = client(server)
    messages = [{"role": "user", "content": "the quick brown fox"}]
    whole = c.chat.completions.create(model="lm", messages=messages, max_tokens=12, temperature=0)
    chunks = list(c.chat.completions.create(model="lm", messages=messages, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole.choices[0].message.content
    finished = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finished == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({ch.id for ch in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"

    # On the wire: `data: {...}` events, then `data: [DONE]`.
    with httpx.stream("POST", f"{server.url}/v1/completions", headers=auth(server.key()), json={
            "model": "lm", "prompt": "hello", "max_tokens": 5, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])
    pieces = [json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]]
    plain = c.completions.create(model="lm", prompt="hello", max_tokens=5, temperature=0).choices[0].text
    assert "".join(pieces) == plain


def test_embeddings_are_normalised_mean_pooled_hidden_states(server: Server, hf_folders, tokenizer) -> None:
    texts = ["hello world", "the quick brown fox jumps"]
    c = client(server)
    out = c.embeddings.create(model="lm", input=texts)  # the client asks for base64 and decodes it
    floats = c.embeddings.create(model="lm", input=texts, encoding_format="float")
    model = AutoModelForCausalLM.from_pretrained(hf_folders[0]).eval()
    for i, text in enumerate(texts):
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        expected = torch.nn.functional.normalize(hidden.mean(0), dim=0).numpy()
        np.testing.assert_allclose(out.data[i].embedding, expected, atol=1e-5)
        np.testing.assert_allclose(floats.data[i].embedding, expected, atol=1e-5)
    assert out.usage.prompt_tokens == sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    short = c.embeddings.create(model="lm", input="hello", dimensions=8, encoding_format="float").data[0].embedding
    assert len(short) == 8 and abs(np.linalg.norm(short) - 1) < 1e-5
    raw = httpx.post(f"{server.url}/v1/embeddings", headers=auth(server.key()),
                     json={"model": "lm", "input": [[5, 6, 7]], "encoding_format": "base64"}).json()
    assert len(np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")) == 32


# -- bad input -----------------------------------------------------------------------------------
LONG = "the quick brown fox " * 40
BAD = [
    # (what, path, body, status, param, code): a field that fails validation is a 400 on every route (as
    # OpenAI's), never FastAPI's 422
    ("malformed JSON", "/v1/completions", '{"model": "lm", "prompt": ', 400, None, "invalid_json"),
    ("not an object", "/v1/completions", "[1, 2]", 400, None, "model_attributes_type"),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "model", "model_not_found"),
    ("unknown adapter", "/v1/chat/completions", {"model": "lm:nope", "messages": [{"role": "user", "content": "x"}]},
     404, "model", "model_not_found"),
    ("prompt longer than the context", "/v1/completions", {"model": "lm", "prompt": LONG}, 400, "prompt",
     "context_length_exceeded"),
    ("chat longer than the context", "/v1/chat/completions",
     {"model": "lm", "messages": [{"role": "user", "content": LONG}]}, 400, "messages", "context_length_exceeded"),
    ("prompt + max_tokens past the context", "/v1/completions",
     {"model": "lm", "prompt": "the quick brown fox jumps over the lazy dog", "max_tokens": CONTEXT - 20}, 400,
     "max_tokens",
     "context_length_exceeded"),
    ("max_tokens over the server's limit", "/v1/completions", {"model": "lm", "prompt": "x", "max_tokens": 10_000},
     400, "max_tokens", "invalid_value"),
    ("max_tokens 0 without echo", "/v1/completions", {"model": "lm", "prompt": "x", "max_tokens": 0}, 400,
     "max_tokens", "invalid_value"),
    ("max_tokens a string", "/v1/completions", {"model": "lm", "prompt": "x", "max_tokens": "10"}, 400,
     "max_tokens", "int_type"),
    ("temperature out of range", "/v1/completions", {"model": "lm", "prompt": "x", "temperature": 3}, 400,
     "temperature", "less_than_equal"),
    ("top_p 0", "/v1/completions", {"model": "lm", "prompt": "x", "top_p": 0}, 400, "top_p", "greater_than"),
    ("stream not a bool", "/v1/completions", {"model": "lm", "prompt": "x", "stream": "yes"}, 400, "stream",
     "bool_type"),
    ("prompt a number", "/v1/completions", {"model": "lm", "prompt": 5}, 400, "prompt", None),
    ("token id out of the vocabulary", "/v1/completions", {"model": "lm", "prompt": [1, 10**6]}, 400, "prompt",
     "invalid_value"),
    ("no model", "/v1/completions", {"prompt": "x"}, 400, "model", "missing"),
    ("five stop strings", "/v1/completions", {"model": "lm", "prompt": "x", "stop": list("abcde")}, 400, "stop", None),
    ("n 0", "/v1/completions", {"model": "lm", "prompt": "x", "n": 0}, 400, "n", "greater_than_equal"),
    ("streaming several choices", "/v1/completions", {"model": "lm", "prompt": "x", "n": 2, "stream": True}, 400, "n",
     "invalid_value"),
    ("no messages", "/v1/chat/completions", {"model": "lm", "messages": []}, 400, "messages", "too_short"),
    ("unknown role", "/v1/chat/completions", {"model": "lm", "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages.0.role", "literal_error"),
    ("messages not a list", "/v1/chat/completions", {"model": "lm", "messages": "hi"}, 400, "messages", "list_type"),
    ("embedding input too long", "/v1/embeddings", {"model": "lm", "input": LONG}, 400, "input",
     "context_length_exceeded"),
    ("embedding input empty list", "/v1/embeddings", {"model": "lm", "input": []}, 400, "input", None),
    ("embedding format unknown", "/v1/embeddings", {"model": "lm", "input": "x", "encoding_format": "hex"}, 400,
     "encoding_format", "literal_error"),
    ("embedding dimensions too many", "/v1/embeddings", {"model": "lm", "input": "x", "dimensions": 4096}, 400,
     "dimensions", "invalid_value"),
    ("unknown route", "/v1/engines", {}, 404, None, "not_found"),
]


def test_bad_input_gets_an_openai_error_never_a_500(server: Server) -> None:
    headers = {**auth(server.key()), "content-type": "application/json"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
        for what, path, body, status, param, code in BAD:
            content = body if isinstance(body, str) else json.dumps(body)
            r = http.post(path, content=content)
            assert r.status_code == status, (what, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, what
            assert error["message"] and error["type"] == "invalid_request_error", (what, error)
            assert error["param"] == param, (what, error)
            if code is not None:
                assert error["code"] == code, (what, error)
        r = http.get("/v1/completions")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    # The client raises its typed errors on them.
    with pytest.raises(openai.NotFoundError):
        client(server).completions.create(model="gpt-9", prompt="x")
    with pytest.raises(openai.BadRequestError, match="context"):
        client(server).completions.create(model="lm", prompt=LONG)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_are_required_when_configured(server: Server) -> None:
    body = {"model": "lm", "prompt": "x", "max_tokens": 1}
    for headers in [{}, auth("sk-wrong"), {"Authorization": "Basic abc"}, {"Authorization": "Bearer"}]:
        r = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    # The key is checked before the body is read.
    assert httpx.post(f"{server.url}/v1/completions", content="{not json").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(server, key="sk-wrong").models.list()
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_rate_limit_per_key(server: Server) -> None:
    key, other = server.key(), server.key()
    with httpx.Client(base_url=server.url, headers=auth(key)) as http:
        statuses = [http.get("/v1/models").status_code for _ in range(65)]
        assert statuses[:60] == [200] * 60 and statuses[-1] == 429
        r = http.get("/v1/models")
        assert r.json()["error"]["code"] == "rate_limit_exceeded" and int(r.headers["Retry-After"]) >= 1
    assert httpx.get(f"{server.url}/v1/models", headers=auth(other)).status_code == 200
    with pytest.raises(openai.RateLimitError):
        client(server, key=key).models.list()


def test_serve_proxy_answers_too(server: Server) -> None:
    direct = client(server).completions.create(model="lm", prompt="hello", max_tokens=6, temperature=0)
    via_proxy = openai.OpenAI(base_url=f"{server.proxy_url}/v1", api_key=server.key(), max_retries=0)
    assert via_proxy.completions.create(model="lm", prompt="hello", max_tokens=6, temperature=0).choices[0].text == \
        direct.choices[0].text


# -- adapters ------------------------------------------------------------------------------------
def lora_folder(base: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))  # B != 0: it changes outputs
    model.save_pretrained(out)
    return out


def register_adapter(folder: Path, name: str, base_uri: str) -> int:
    from pipelines.train.registry import register_adapter, training_run

    with training_run("serve-tests", None, {}) as run_id:
        pass
    return register_adapter(str(folder), name, run_id=run_id, base_uri=base_uri, metric="heldout_loss",
                            value=1.0).version


def test_adapters_load_on_demand_per_request(server: Server, hf_folders, tokenizer, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    from peft import PeftModel

    lora = lora_folder(hf_folders[0], tmp_path / "lora", seed=1)
    register_adapter(lora, "lm-lora", "models:/lm/1")
    other_base = register(hf_folders[1], "other", 5.0)
    register_adapter(lora_folder(hf_folders[1], tmp_path / "other-lora", seed=2), "other-lora",
                     f"models:/other/{other_base}")
    reload = httpx.post(f"{server.url}/admin/reload", headers=auth(server.key())).json()
    assert reload["adapters"] == {"lm-lora": 1}  # other-lora was trained on another base: not served
    assert [m.id for m in client(server).models.list().data] == ["lm", "lm:lm-lora"]
    # `pipelines lineage URL --model NAME:ADAPTER`: the versions this endpoint serves now.
    from pipelines.lineage import endpoint_lineage

    chain = endpoint_lineage(server.url, "lm:lm-lora")
    assert chain["model"] == "models:/lm-lora/1" and chain["kind"] == "LoRA adapter"
    assert [(p["role"], p["model"]) for p in chain["parents"]] == [("base", "models:/lm/1")]
    assert endpoint_lineage(server.url, None)["model"] == "models:/lm/1"

    ids = tokenizer("the quick brown", add_special_tokens=False)["input_ids"]
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_folders[0]), str(lora)).eval()
    expected = reference.generate(input_ids=torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                  pad_token_id=0)[0, len(ids):].tolist()
    c = client(server)
    adapted = c.completions.create(model="lm:lm-lora", prompt="the quick brown", max_tokens=10, temperature=0)
    base = c.completions.create(model="lm", prompt="the quick brown", max_tokens=10, temperature=0)
    assert adapted.choices[0].text == text_of(tokenizer, expected)
    # ... which is the merged model's (on vLLM the adapter runs as LoRA layers beside the base weights)
    merged = reference.merge_and_unload().eval()
    assert merged.generate(input_ids=torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                           pad_token_id=0)[0, len(ids):].tolist() == expected
    assert adapted.choices[0].text != base.choices[0].text
    assert base.choices[0].text == text_of(tokenizer, local_greedy(hf_folders[0], ids, 10))  # base rows: no LoRA

    async def mixed() -> list[str]:  # base and adapter requests batched together
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.key(), max_retries=0) as ac:
            outs = await asyncio.gather(*(ac.completions.create(
                model=m, prompt="the quick brown", max_tokens=10, temperature=0) for m in ["lm", "lm:lm-lora"] * 4))
        return [o.choices[0].text for o in outs]

    assert asyncio.run(mixed()) == [base.choices[0].text, adapted.choices[0].text] * 4
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="lm:other-lora", prompt="x", max_tokens=2)
    emb = c.embeddings.create(model="lm:lm-lora", input="hello", encoding_format="float").data[0].embedding
    assert abs(np.linalg.norm(emb) - 1) < 1e-5


# -- the registry moves under the server ---------------------------------------------------------
def test_alias_move_is_picked_up_without_dropping_requests(server: Server, hf_folders) -> None:
    statuses: Counter = Counter()
    fingerprints: list[str] = []
    stop = threading.Event()

    def keep_asking(key: str) -> None:
        with httpx.Client(base_url=server.url, headers=auth(key), timeout=60) as http:
            while not stop.is_set():
                r = http.post("/v1/completions", json={"model": "lm", "prompt": "hello", "max_tokens": 4,
                                                       "temperature": 0})
                statuses[r.status_code] += 1
                if r.status_code == 200:
                    fingerprints.append(r.json()["system_fingerprint"])
                time.sleep(1.1)  # under the rate limit (60 a minute per key) however long the reload takes

    threads = [threading.Thread(target=keep_asking, args=(server.key(),)) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        assert register(hf_folders[1], "lm", 5.0) == 2  # better than v1: champion moves
        # (on vLLM a new version starts its own engine: tens of seconds on a busy 2-core machine)
        r = httpx.post(f"{server.url}/admin/reload", headers=auth(server.key()), timeout=300).json()
        assert r["version"] == 2
        time.sleep(2.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert set(statuses) == {200}, statuses
    assert fingerprints[0] == "lm/v1" and fingerprints[-1] == "lm/v2"
    assert httpx.get(f"{server.url}/healthz").json()["version"] == 2


def test_the_watcher_follows_the_alias_by_itself(server: Server, hf_folders, tracking: MlflowClient) -> None:
    version = register(hf_folders[0], "lm", 1.0)
    deadline = time.monotonic() + 300  # two loads; on vLLM each starts an engine
    while httpx.get(f"{server.url}/healthz").json()["version"] != version:
        assert time.monotonic() < deadline, "the replica did not follow the alias"
        time.sleep(0.2)
    tracking.set_registered_model_alias("lm", "champion", "2")  # moved back by hand: followed too
    while httpx.get(f"{server.url}/healthz").json()["version"] != 2:
        assert time.monotonic() < deadline, "the replica did not follow the alias back"
        time.sleep(0.2)


# -- load ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bounded_load_has_no_server_errors(server: Server) -> None:
    keys = [server.key() for _ in range(10)]  # 50 requests per key: under the limit of 60 a minute
    bodies = [("/v1/completions", {"model": "lm", "prompt": "hello world", "max_tokens": 4, "temperature": 0.7}),
              ("/v1/chat/completions", {"model": "lm", "messages": [{"role": "user", "content": "hi"}],
                                        "max_tokens": 4, "temperature": 0}),
              ("/v1/embeddings", {"model": "lm", "input": ["a model reads", "the shards"]})]

    async def run() -> Counter:
        statuses: Counter = Counter()
        queue: asyncio.Queue = asyncio.Queue()
        for i in range(500):
            queue.put_nowait(i)

        async def worker(http: httpx.AsyncClient) -> None:
            while not queue.empty():
                i = queue.get_nowait()
                path, body = bodies[i % len(bodies)]
                r = await http.post(path, json=body, headers=auth(keys[i % len(keys)]))
                statuses[r.status_code] += 1

        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as http:
            await asyncio.gather(*(worker(http) for _ in range(50)))
        return statuses

    started = time.monotonic()
    statuses = asyncio.run(run())
    elapsed = time.monotonic() - started
    assert sum(statuses.values()) == 500
    assert statuses == Counter({200: 500}), statuses
    print(f"500 requests at 50 concurrent in {elapsed:.1f} s ({500 / elapsed:.0f}/s)")
