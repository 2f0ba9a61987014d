"""The serving config: what to serve, where, how many replicas, batching, keys and limits.

Every leaf field is also a `pipelines serve` option (`max_batch_size` -> `--max-batch-size`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from pipelines.config import ConfigModel
from pipelines.errors import PipelineError


class AutoscaleConfig(ConfigModel):
    """Ray Serve autoscaling, used when `autoscale` is on (else `replicas` fixed replicas)."""

    autoscale: bool = Field(False, description="Scale replicas with load between min and max.")
    min_replicas: int = Field(1, ge=0, description="Fewest replicas autoscaling keeps (0: none while idle).")
    max_replicas: int = Field(4, ge=1, description="Most replicas autoscaling starts.")
    target_ongoing_requests: float = Field(
        4.0, gt=0, description="Requests in flight per replica that autoscaling aims for.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscaleConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class BatchConfig(ConfigModel):
    """Request batching (`serve.batch`) of generation and embedding calls within a replica."""

    max_batch_size: int = Field(8, ge=1, description="Most requests run as one model call.")
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, description="How long a batch waits to fill. 0: take whatever queued while the "
        "previous batch ran, so a lone request never waits.")


API_KEYS_ENV = "PIPELINES_API_KEYS"


class AccessConfig(ConfigModel):
    """Optional API keys and a per-key rate limit.

    Keys are secrets: they come from the environment variable `PIPELINES_API_KEYS` or a file (a mounted
    Kubernetes Secret), `api_keys` (the command line shows in `ps`) only for a quick local run; none of
    them is ever written out (`--emit-config` writes `keys_required` instead, so a deployment without
    its keys refuses to start rather than serving openly).
    """

    # exclude: no dump of a config (a file, Prefect's parameters, a digest) carries them.
    api_keys: list[str] = Field(
        default_factory=list, exclude=True, repr=False, description=f"Bearer keys accepted (prefer "
        f"{API_KEYS_ENV} or api_keys_file: the command line shows in ps); never written by --emit-config.")
    api_keys_file: str | None = Field(
        None, description="A file of keys, one per line (a mounted Secret); read by each replica at start.")
    keys_required: bool = Field(
        False, description=f"Refuse to start without a key (from {API_KEYS_ENV}, api_keys_file or api_keys). "
        "--emit-config turns it on when keys are given.")
    rate_limit: int | None = Field(
        None, ge=1, description="Requests per key (per client address without keys) per minute, per replica "
        "(default: no limit).")

    def resolve_keys(self) -> list[str]:
        """Every key from `api_keys`, `PIPELINES_API_KEYS` (comma, space or newline separated) and the file."""
        keys = list(self.api_keys) + _split_keys(os.environ.get(API_KEYS_ENV, ""))
        if self.api_keys_file:
            try:
                keys += _split_keys(Path(self.api_keys_file).read_text())
            except OSError as e:
                raise PipelineError(f"api_keys_file {self.api_keys_file}: {e.strerror or e}") from None
        keys = list(dict.fromkeys(k for k in keys if k))
        if self.keys_required and not keys:
            raise PipelineError(f"keys_required, but no API key was given ({API_KEYS_ENV}, api_keys_file "
                                f"{self.api_keys_file or '(none)'} or api_keys)")
        return keys


def _split_keys(text: str) -> list[str]:
    return [k for k in re.split(r"[\s,]+", text) if k]


class LimitsConfig(ConfigModel):
    """Sizes a request may have, checked before any work on it (before its body is read, for the body)."""

    max_body_bytes: int = Field(
        16 * 2**20, ge=1024, description="Largest request body (413 above it, read no further; images "
        "travel in base64 inside it).")
    max_prompt_chars: int = Field(
        1_000_000, ge=1, description="Longest prompt text (each prompt, all chat messages together, each "
        "embedding input) in characters; 400 above it, before tokenising.")
    max_stop_chars: int = Field(1000, ge=1, description="Longest stop string in characters (400 above it).")
    max_items: int = Field(
        256, ge=1, description="Most choices of one completion request (prompts x n), inputs of one embedding "
        "request, images plus texts of one similarity request (400 above it).")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Largest image (width x height) decoded; 400 above it, from the header.")
    max_schema_bytes: int = Field(
        100_000, ge=1, description="Largest response_format JSON schema, as compact JSON, in bytes (400 above it).")
    max_schema_depth: int = Field(
        64, ge=1, le=64, description="Deepest nesting of objects and arrays in a response_format JSON schema "
        "(400 above it; vLLM's own limit is 64).")
    max_schema_compile_s: float = Field(
        5.0, gt=0, description="Longest a new response_format JSON schema's grammar may take to compile, in "
        "CPU seconds on one thread, before vLLM sees it (400 above it; each schema is compiled once).")


def model_name(uri: str) -> str:
    """The registered NAME of models:/NAME@ALIAS or models:/NAME/VERSION."""
    return re.split(r"[@/]", uri.removeprefix("models:/"), maxsplit=1)[0]


class ServeConfig(ConfigModel):
    """`pipelines serve`: an OpenAI-compatible HTTP API for registered models, on Ray Serve.

    `model` and the models of `also` are served together behind one base URL (every replica holds all of
    them); a request's `model` picks one by its registered NAME. In a file, `model` may be a list: its first
    URI is `model`, the rest go before `also`.
    """

    model: str = Field(description="Registered model to serve: models:/NAME@ALIAS or models:/NAME/VERSION.")
    also: list[str] = Field(
        default_factory=list, description="More registered models served beside --model at the same endpoint "
        "(models:/NAME@ALIAS), each requested as its NAME; every replica holds them all.")
    adapter: list[str] = Field(
        default_factory=list, description="LoRA adapters to serve (models:/ADAPTER@ALIAS), requested as model "
        "NAME:ADAPTER.")
    host: str = Field("127.0.0.1", description="Address the endpoint listens on (0.0.0.0: every interface).")
    port: int = Field(8000, ge=1, le=65535, description=(
        "Port of the endpoint (under direct ingress, replicas take this port and the ones after it)."))
    ingress: Literal["auto", "direct", "proxy"] = Field(
        "auto", description="direct: each replica answers HTTP itself (Serve's direct ingress, no proxy hop); "
        "proxy: Serve's HTTP proxy in front; auto: direct for one fixed replica, else proxy.")
    proxy_port: int | None = Field(
        None, ge=1, le=65535, description="Serve's proxy port under direct ingress (default: right after "
        "the replicas' ports).")
    replicas: int = Field(1, ge=1, description="Fixed number of replicas (without autoscale).")
    scaling: AutoscaleConfig = AutoscaleConfig()
    batching: BatchConfig = BatchConfig()
    access: AccessConfig = AccessConfig()
    limits: LimitsConfig = LimitsConfig()
    engine: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="What generates text: vllm (vLLM's engine in a child process, from the .venv-vllm "
        "environment), transformers (generate with static batching), auto: vLLM where it is installed and can "
        "serve the model, else transformers.")
    vllm_kv_cache_gib: float = Field(1.0, gt=0, description="Memory of vLLM's KV cache per model, in GiB.")
    vllm_compile: bool = Field(
        True, description="Compile each model for vLLM (torch.compile; CUDA graphs on a GPU), as vLLM does by "
        "default; off: eager, a faster start (26-29 s against 42-66 s for the tiny model on 2 cores).")
    replica_cpus: float = Field(1.0, gt=0, description="CPUs reserved per replica (torch threads follow).")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests a replica accepts at once.")
    max_loaded_adapters: int = Field(4, ge=1, description="Adapters kept loaded per replica (LRU).")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request sets none.")
    max_tokens_limit: int = Field(4096, ge=1, description="Largest max_tokens a request may ask for.")
    watch_interval_s: float = Field(
        30.0, ge=0, description="How often a replica checks the registry for moved aliases; 0: only "
        "on POST /admin/reload.")
    emit_config: str | None = Field(
        None, description="Write a Ray Serve config YAML (serve run / serve deploy / RayService) here "
        "instead of serving.")
    blocking: bool = Field(True, description="Keep serving until interrupted (off: return once up).")

    run_options: ClassVar[dict] = {"emit_config": True, "blocking": True}

    @model_validator(mode="before")
    @classmethod
    def _model_list(cls, data: Any) -> Any:
        """`model: [a, b, c]` is `model: a` with `also: [b, c]` (before any `also` given)."""
        if isinstance(data, dict) and isinstance(data.get("model"), list) and data["model"]:
            first, *rest = data["model"]
            data = {**data, "model": first, "also": [*rest, *data.get("also", [])]}
        return data

    @model_validator(mode="after")
    def _model_uri(self) -> ServeConfig:
        for uri in [*self.models, *self.adapter]:
            if not uri.startswith("models:/"):
                raise ValueError(f"{uri!r} is not a registered model URI (models:/NAME@ALIAS or models:/NAME/VERSION)")
        names = [model_name(uri) for uri in self.models]
        for name in names:
            if names.count(name) > 1:
                twice = [uri for uri in self.models if model_name(uri) == name]
                raise ValueError(f"model {name} is asked for twice ({' and '.join(twice)}): requests name a model "
                                 "by its registered name, so one endpoint serves one version of it")
        return self

    @property
    def models(self) -> list[str]:
        """Every model served: `model`, then `also`."""
        return [self.model, *self.also]

    @property
    def direct_ingress(self) -> bool:
        """Whether replicas answer HTTP themselves (no proxy hop)."""
        if self.ingress == "auto":
            return self.replicas == 1 and not self.scaling.autoscale
        return self.ingress == "direct"

    @property
    def most_replicas(self) -> int:
        return self.scaling.max_replicas if self.scaling.autoscale else self.replicas

    @property
    def serve_proxy_port(self) -> int:
        """Where Serve's own HTTP proxy listens: `port`, or past the replicas' ports under direct ingress."""
        if not self.direct_ingress:
            return self.port
        port = self.proxy_port or self.port + self.most_replicas
        if self.port <= port < self.port + self.most_replicas:
            raise PipelineError(f"proxy_port {port} collides with the replicas' ports "
                                f"{self.port}-{self.port + self.most_replicas - 1}")
        return port
