"""Fixtures of the serving tests: tiny registered models and a running server on loopback.

The models are 2-layer Llamas built from a config with a byte-level BPE trained here; MLflow is a
SQLite file in a temporary folder. Nothing comes from the Hugging Face hub.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines.runtime import free_port
from pipelines.serve.app import ray_serve_env
from pipelines.serve.config import ServeConfig
from pipelines.serve.vllm_engine import vllm_available
from tests.serve.tiny import tiny_model, tiny_tokenizer


def _free_port_pair() -> int:
    """A port P with P and P+1 free (the replica's direct-ingress port and Serve's proxy)."""
    while True:
        port = free_port()
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


PORT = _free_port_pair()
# engine "auto" serves the tiny LMs on vLLM where its environment (.venv-vllm) is installed, as `make venv` does
ON_VLLM = vllm_available()
# A tiny model's KV cache needs little: the default 1 GiB per engine, twice during an alias move, is memory a shared
# test machine may not have (Ray's monitor kills replicas at 95%)
TEST_KV_CACHE_GIB = 0.125


def wait_for_port(port: int = PORT, timeout: float = 120.0) -> None:
    """Wait until `port` can be bound again. The serving modules share PORT (Serve reads it when Ray
    starts), and a connection the previous module's server closed first holds it in TIME_WAIT for up to
    a minute; the replica binds without SO_REUSEADDR, so `serve_model` would refuse the port."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(1.0)
# Serve reads its settings when Ray's processes start: set them before any test of the session starts
# Ray (collection imports this file first). Ray's worker priority is left alone: other modules share it.
os.environ.update({k: v for k, v in ray_serve_env(ServeConfig(model="models:/lm@champion", port=PORT)).items()
                   if k != "RAY_worker_niceness"})


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Two Hugging Face folders of the same architecture and tokenizer, different weights (seed 0, 1)."""
    tokenizer = tiny_tokenizer()
    folders = {}
    for seed in (0, 1):
        folder = tmp_path_factory.mktemp("hf") / f"model-{seed}"
        tiny_model(tokenizer, seed).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[seed] = folder
    return folders


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowClient]:
    """A fresh MLflow on a SQLite file for the module."""
    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIPELINES_HOME", str(root / "home"))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def register(folder: Path, name: str, value: float) -> int:
    """Register `folder` as a new version of `name` (champion when `value` is the lowest so far)."""
    from pipelines.train.registry import register_model, training_run

    with training_run("serve-tests", None, {}) as run_id:
        pass
    return register_model(str(folder), name, run_id=run_id, metric="heldout_perplexity", value=value).version


@dataclass
class Server:
    url: str  # direct ingress: the replica itself
    proxy_url: str  # Serve's proxy in front of the same replica
    keys: list[str]
    config: ServeConfig
    _next_key: int = 0

    def key(self) -> str:
        """A key no other test used: the rate limit counts per key."""
        self._next_key += 1
        return self.keys[self._next_key]


@pytest.fixture(scope="module")
def server(ray_cluster: None, tracking: MlflowClient, hf_folders: dict[int, Path]) -> Iterator[Server]:
    """`pipelines serve` of models:/lm@champion (v1, seed 0) on 127.0.0.1:PORT, with keys and a rate limit."""
    from ray import serve

    from pipelines.serve.app import serve_model

    assert register(hf_folders[0], "lm", 10.0) == 1
    wait_for_port()
    keys = [f"sk-test-{i}" for i in range(100)]
    config = ServeConfig(model="models:/lm@champion", vllm_kv_cache_gib=TEST_KV_CACHE_GIB, vllm_compile=False,
                         adapter=["models:/lm-lora@champion", "models:/other-lora@champion"],
                         port=PORT, watch_interval_s=1.0, default_max_tokens=16, max_tokens_limit=48,
                         access={"api_keys": keys, "rate_limit": 60}, blocking=False)
    url = serve_model(config)
    assert url == f"http://127.0.0.1:{PORT}"
    yield Server(url=url, proxy_url=f"http://127.0.0.1:{config.serve_proxy_port}", keys=keys, config=config)
    serve.shutdown()
