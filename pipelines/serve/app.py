"""The Ray Serve application: one deployment whose replicas hold the models and answer HTTP.

- `OpenAIServer` is the deployment: each replica loads every registered model of the config (`model` and
  `also`, behind one base URL: a request's `model` names one), each a causal LM, a CLIP
  model when the version is tagged `pipelines.kind=clip`: embeddings and similarity only, or a diffusion
  model when tagged `pipelines.kind=diffusion`: images only), builds the FastAPI app of `openai_api` over
  itself (`serve.ingress` with `__serve_build_asgi_app__`), batches generation, embedding and drawing
  calls (`serve.batch`), loads adapters on demand into a per-replica LRU
  (`serve.multiplexed`; an adapter attaches to the served base it was trained on) and watches the
  registry: when a model's alias moves it loads the new version beside the old one and switches over,
  leaving the other models alone; requests in flight finish on the version they started on.
- `build_app(args)` is the application builder that `serve run` / `serve deploy` / a RayService
  import (`pipelines.serve.app:build_app`); `emit_config` writes that config file.
- `serve_model(config)` is the stage's entry (`pipelines serve`): Serve on the local Ray of
  `pipelines.runtime.init_ray()`, or on the cluster at `RAY_ADDRESS`.

Request path (measured by benchmarks/serve_latency.py, 2-core machine): Serve's HTTP proxy is a
separate actor, so a request through it parses HTTP there, then crosses to the replica as an actor
call carrying the ASGI messages and back: +5.8 ms p50 over plain FastAPI for a JSON echo, 2.6 ms of it
the actor call alone (a DeploymentHandle call, no HTTP). With one replica, `serve_model` turns on
Serve's direct ingress instead: the replica runs the HTTP server itself on `port` and the request path
is the FastAPI app alone (+0.1 to +0.3 ms). With several replicas (or autoscaling) the proxy balances
them (`ingress: proxy`), or, with direct ingress forced, each replica listens on port+i behind a load
balancer of your own.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import socket
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import yaml
from ray import serve
from ray.serve import Application

from pipelines.errors import PipelineError
from pipelines.serve.config import API_KEYS_ENV, ServeConfig
from pipelines.serve.engine import AdapterError, ClipEngine, Generation, RequestRefused, TextEngine
from pipelines.serve.images import ImageEngine, Picture
from pipelines.serve.openai_api import AccessControl, APIError, build_api
from pipelines.serve.vllm_engine import VllmEngine, VllmStart, vllm_available, vllm_can_serve

log = logging.getLogger(__name__)

APP_NAME = "pipelines-serve"
DEPLOYMENT = "OpenAIServer"


class LoadedAdapter:
    """An adapter loaded on one engine; unloaded when the LRU of `serve.multiplexed` evicts it.

    It holds its engine weakly: after a version switch the old model is freed once its requests are
    done, even while stale entries wait in the LRU (their keys name the old engine: never asked again).
    """

    def __init__(self, engine: TextEngine, name: str):
        self._engine, self.name = weakref.ref(engine), name
        # serve.multiplexed calls `model.__del__()` on eviction. An instance attribute, so the GC
        # never calls it (it could, from the thread that holds the engine's lock).
        self.__del__ = self.unload

    @property
    def engine(self) -> TextEngine | None:
        return self._engine()

    def unload(self) -> None:
        engine = self._engine()
        if engine is not None:
            engine.unload_adapter(self.name)


@dataclass(eq=False)
class ServedModel:
    """One base model of the deployment: what the config asks for, its registered name, the engine of the
    version served now, and the adapters trained on it."""

    uri: str
    name: str
    engine: TextEngine | ClipEngine | ImageEngine
    adapters: dict[str, int] = field(default_factory=dict)  # adapter name -> its version for this base


@serve.deployment(name=DEPLOYMENT)
@serve.ingress()
class OpenAIServer:
    """A replica: the models (and adapters) of `config`, served by the app of `openai_api`."""

    def __init__(self, config: dict[str, Any], tracking_uri: str | None = None):
        from pipelines.train.registry import configure_tracking, resolve_version

        if tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        configure_tracking()
        quiet_loading()
        self._resolve_version = resolve_version
        self.config = ServeConfig.model_validate(config)
        self.access = AccessControl(self.config.access.resolve_keys(), self.config.access.rate_limit)
        self.served: dict[str, ServedModel] = {}  # registered name -> model, `model` first
        # A replica holds them all. They load side by side: vLLM's engine starts in processes of its own (10 s and
        # more) while the others load here.
        resolved = [(uri, *resolve_version(uri)) for uri in self.config.models]
        with ThreadPoolExecutor(max_workers=len(resolved), thread_name_prefix="load") as pool:
            engines = list(pool.map(lambda r: self._load(r[1], r[2]), resolved))
        for (uri, name, _), engine in zip(resolved, engines):
            self.served[name] = ServedModel(uri, name, engine)
        self._adapter_problems: dict[str, str] = {}  # adapter URI -> why it is not (or not quite) served
        self._resolve_adapters()
        self._generate_batch.set_max_batch_size(self.config.batching.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(self.config.batching.batch_wait_timeout_s)
        for batched in (self._embed_batch, self._clip_batch, self._draw_batch):
            batched.set_max_batch_size(self.config.batching.max_batch_size)
            batched.set_batch_wait_timeout_s(self.config.batching.batch_wait_timeout_s)

        async def open_adapter(key: str) -> LoadedAdapter:  # a plain function: multiplexed keeps its LRU on it
            return await self._open_adapter(key)

        self._adapter = serve.multiplexed(max_num_models_per_replica=self.config.max_loaded_adapters)(open_adapter)
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        if self.config.watch_interval_s > 0:
            threading.Thread(target=self._watch, name="registry-watch", daemon=True).start()

    def __serve_build_asgi_app__(self) -> Any:
        return build_api(self)

    def __del__(self) -> None:
        self._stop.set()

    def check_health(self) -> None:
        """Serve's health check: a replica whose vLLM engine died is unhealthy, and Serve replaces it."""
        for served in self.served.values():
            if isinstance(served.engine, VllmEngine) and not served.engine.alive():
                raise RuntimeError(f"{served.engine.label}: vLLM's engine process exited:\n"
                                   f"{served.engine.worker_log(20)}")

    # -- what the routes call ------------------------------------------------------------------
    def model_ids(self) -> list[str]:
        return [m for served in self.served.values()
                for m in [served.name, *(f"{served.name}:{a}" for a in sorted(served.adapters))]]

    async def resolve(self, model: str) -> tuple[TextEngine | ClipEngine | ImageEngine, str | None]:
        """The engine for `model` (NAME or NAME:ADAPTER) and the adapter's loaded name."""
        base, sep, adapter = model.partition(":")
        served = self.served.get(base)
        if served is None or (sep and adapter not in served.adapters):
            raise APIError(404, f"model {model!r} not found; served: {', '.join(self.model_ids())}",
                           param="model", code="model_not_found")
        engine = served.engine
        if not sep:
            return engine, None
        loaded = await self._adapter(f"{adapter}/{served.adapters[adapter]}@{engine.load_id}")
        return engine, loaded.name

    async def generate(self, engine: TextEngine, rows: Sequence[Generation]) -> None:
        """Generate the rows of one request in the replica's batches (vLLM: in its own scheduler); raise the first
        row's failure."""
        if isinstance(engine, VllmEngine):
            await engine.agenerate(rows)
        elif len(rows) == 1:  # the common case, without a task per row
            await self._generate_batch((engine, rows[0]))
        else:
            await asyncio.gather(*(self._generate_batch((engine, row)) for row in rows))
        for row in rows:
            if row.error is not None:
                raise _request_error(row.error)

    async def embed(self, engine: TextEngine, inputs: Sequence[list[int]], adapter: str | None) -> torch.Tensor:
        vectors = await asyncio.gather(*(self._embed_batch((engine, ids, adapter)) for ids in inputs))
        for vector in vectors:
            if isinstance(vector, Exception):
                raise _request_error(vector)
        return torch.stack(vectors)

    async def clip_embed(self, engine: ClipEngine, texts: Sequence[str],
                         images: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        out = await self._clip_batch((engine, list(texts), list(images)))
        if isinstance(out, Exception):
            raise _request_error(out)
        return out

    async def draw(self, engine: ImageEngine, pictures: Sequence[Picture]) -> None:
        """Draw the pictures of one request in the replica's batches; raise the first picture's failure.
        Cancelled (the client went away), the pictures not started yet leave their batches."""
        await asyncio.gather(*(self._draw_batch((engine, picture)) for picture in pictures))
        for picture in pictures:
            if picture.error is not None:
                raise _request_error(picture.error)

    async def reload(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.refresh)

    def health(self) -> dict[str, Any]:
        """The first model's name and version, every adapter's version and, with several models, each one's."""
        first = self._first
        out = {"status": "ok", "model": first.name, "version": first.engine.version, "adapters": self._adapters()}
        if isinstance(first.engine, TextEngine):
            out["engine"] = "vllm" if isinstance(first.engine, VllmEngine) else "transformers"
        if len(self.served) > 1:
            out["models"] = {name: served.engine.version for name, served in self.served.items()}
        return out

    @property
    def _first(self) -> ServedModel:
        return next(iter(self.served.values()))

    def _adapters(self) -> dict[str, int]:
        """Every adapter served, whatever its base: adapter name -> version (a registered name has one base)."""
        return {name: version for served in self.served.values() for name, version in served.adapters.items()}

    # -- batches -------------------------------------------------------------------------------
    # A row fails alone: each batch returns, per item, its result or the exception of that item only
    # (`engine.generate` sets a failed row's `error`; the embedding batches rerun a failed call per item).
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _generate_batch(self, items: list[tuple[TextEngine, Generation]]) -> list[None]:
        # Requests that started before a version switch finish on the engine they started on.
        for engine, group in itertools.groupby(items, key=lambda item: item[0]):
            rows = [row for _, row in group]
            try:
                await asyncio.to_thread(engine.generate, rows)
            except AdapterError as e:  # evicted between resolve and run: the LRU is too small for the load
                for row in rows:
                    row.error = e
        return [None] * len(items)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _embed_batch(self, items: list[tuple[TextEngine, list[int], str | None]]
                           ) -> list[torch.Tensor | Exception]:
        out: list[torch.Tensor | Exception] = []
        for (engine, adapter), group in itertools.groupby(items, key=lambda item: (item[0], item[2])):
            inputs = [ids for _, ids, _ in group]
            out.extend(await _each_alone(lambda batch: engine.embed(batch, adapter), inputs))
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _clip_batch(self, items: list[tuple[ClipEngine, list[str], list[Any]]]
                          ) -> list[tuple[np.ndarray, np.ndarray] | Exception]:
        """Concurrent CLIP requests' captions and images as one model call per tower, split back per request."""
        out: list[tuple[np.ndarray, np.ndarray] | Exception] = []
        for engine, group in itertools.groupby(items, key=lambda item: item[0]):
            out.extend(await _each_alone(partial(_clip_call, engine), [(texts, images) for _, texts, images in group]))
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _draw_batch(self, items: list[tuple[ImageEngine, Picture]]) -> list[None]:
        """Concurrent requests' pictures as shared denoising loops (`ImageEngine.draw` groups them)."""
        for engine, group in itertools.groupby(items, key=lambda item: item[0]):
            await asyncio.to_thread(engine.draw, [picture for _, picture in group])
        return [None] * len(items)

    # -- the registry --------------------------------------------------------------------------
    def _load(self, name: str, version: int) -> TextEngine | ClipEngine | ImageEngine:
        from mlflow import MlflowClient

        from pipelines.train.registry import load_registered

        started = time.monotonic()
        kind = MlflowClient().get_model_version(name, str(version)).tags.get("pipelines.kind")
        if kind == "diffusion":
            from pipelines.train.diffusion import load_diffusion

            images = ImageEngine(load_diffusion(f"models:/{name}/{version}"), name, version)
            images.draw([Picture("warm up", images.width, images.height, steps=1, guidance=1.0, seed=0)])
            log.info("loaded %s (diffusion) in %.1f s", images.label, time.monotonic() - started)
            return images
        if kind == "clip":
            from PIL import Image

            from pipelines.train.clip_model import load_clip

            clip = ClipEngine(load_clip(f"models:/{name}/{version}"), name, version)
            clip.embed(["warm up"], [Image.new("RGB", (8, 8))])
            log.info("loaded %s (CLIP) in %.1f s", clip.label, time.monotonic() - started)
            return clip
        # vLLM's worker imports vLLM while the model loads here (the model and its length come after)
        start = self._vllm_start()
        engine = None
        try:
            model, tokenizer = load_registered(f"models:/{name}/{version}")
            engine = self._vllm_engine(model, tokenizer, name, version, start)
        finally:
            if start is not None and engine is None:
                start.close()  # not for vLLM after all
        if engine is None:
            engine = TextEngine(model, tokenizer, name, version)
        engine.generate([Generation(engine.encode("warm up") or [engine.eos], 1, temperature=0.0)])
        log.info("loaded %s (%s) in %.1f s", engine.label, "vLLM" if isinstance(engine, VllmEngine) else
                 "transformers", time.monotonic() - started)
        return engine

    def _vllm_start(self) -> VllmStart | None:
        """vLLM's worker, started ahead of its model; None where vLLM is not to be tried."""
        if self.config.engine == "transformers" or not vllm_available():
            return None
        try:
            return VllmStart(kv_cache_gib=self.config.vllm_kv_cache_gib,
                             schema_compile_s=self.config.limits.max_schema_compile_s,
                             compile=self.config.vllm_compile,
                             max_loras=self.config.max_loaded_adapters if self.config.adapter else 0)
        except (OSError, PipelineError) as e:
            log.warning("vLLM's worker did not start: %s", e)
            return None

    def _vllm_engine(self, model: Any, tokenizer: Any, name: str, version: int,
                     start: VllmStart | None) -> VllmEngine | None:
        """The vLLM engine of this model on `start`'s worker, or None where the transformers engine serves it
        (`engine`: auto where vLLM is not installed, cannot take the model or fails to start; transformers)."""
        choice = self.config.engine
        if choice == "transformers":
            return None
        why = None if start is not None else ("vLLM's worker did not start" if vllm_available() else
                                              "vLLM's environment (.venv-vllm) is not installed")
        why = why or vllm_can_serve(model)
        if why is None:
            try:
                return VllmEngine(model, tokenizer, name, version, start=start)
            except PipelineError as e:
                why = str(e)
        if choice == "vllm":
            raise PipelineError(f"{name}/v{version} cannot be served on vLLM: {why}")
        log.warning("%s/v%d served by transformers: %s", name, version, why)
        return None

    def refresh(self) -> dict[str, Any]:
        """Follow moved aliases: for each model whose alias moved, load the new version, then switch to it
        (the other models are not touched); re-resolve the adapters. A model that fails to resolve or load
        keeps its version and does not hold back the others; the first such failure is raised after."""
        with self._refresh_lock:
            previous = {name: served.engine.version for name, served in self.served.items()}
            failed: list[Exception] = []
            for served in self.served.values():
                try:
                    _, version = self._resolve_version(served.uri)
                    if version != served.engine.version:
                        old, served.engine = served.engine, self._load(served.name, version)
                        if isinstance(old, VllmEngine):
                            old.retire()
                        log.warning("%s: now serving version %d (was %d)", served.uri, version,
                                    previous[served.name])
                except Exception as e:
                    failed.append(e)
            self._resolve_adapters()
            if failed:
                raise failed[0]
            first = self._first
            out = {"model": first.name, "version": first.engine.version, "previous_version": previous[first.name],
                   "adapters": self._adapters()}
            if len(self.served) > 1:
                out["models"] = {name: {"version": served.engine.version, "previous_version": previous[name]}
                                 for name, served in self.served.items()}
            return out

    def _resolve_adapters(self) -> None:
        """Each adapter's version, attached to the served base it was trained on; adapters of a base not
        served are left out, with a warning."""
        found: dict[str, dict[str, int]] = {name: {} for name in self.served}
        problems: dict[str, str] = {}
        for uri in self.config.adapter:
            try:
                name, version = self._resolve_version(uri)
                base_name, base_version = self._adapter_base(name, version)
            except PipelineError as e:
                problems[uri] = f"adapter {uri} not served: {e}"
                continue
            base = self.served.get(base_name)
            if base is None:
                problems[uri] = f"adapter {uri} not served: trained on {base_name}, not {', '.join(self.served)}"
                continue
            if base_version != base.engine.version:
                problems[uri] = (f"adapter {uri} was trained on {base_name}/{base_version}, served on version "
                                 f"{base.engine.version}")
            found[base_name][name] = version
        for uri, problem in problems.items():
            if self._adapter_problems.get(uri) != problem:  # once, not at every check
                log.warning(problem)
        self._adapter_problems = problems
        for name, served in self.served.items():
            served.adapters = found[name]

    def _adapter_base(self, name: str, version: int) -> tuple[str, int]:
        """The base (name, version) an adapter version was trained on: its `base_model` tag."""
        from mlflow import MlflowClient

        from pipelines.train.registry import BASE_MODEL_TAG

        base = MlflowClient().get_model_version(name, str(version)).tags.get(BASE_MODEL_TAG)
        if not base:
            raise PipelineError(f"models:/{name}/{version} is not a LoRA adapter (no {BASE_MODEL_TAG} tag)")
        return self._resolve_version(base)

    async def _open_adapter(self, key: str) -> LoadedAdapter:
        """Load `ADAPTER/VERSION@ENGINE` (the key of the multiplexed LRU) onto the current engine."""
        from pipelines.train.registry import load_adapter

        ref, _, load_id = key.partition("@")
        name, _, version = ref.partition("/")
        engine = next((s.engine for s in self.served.values() if s.engine.load_id == load_id), None)
        if engine is None:  # its base moved to another version meanwhile
            raise APIError(503, "the model version changed while loading the adapter; retry", type="server_error",
                           code="model_reloading")
        loaded_name = f"{name}_v{version}"  # peft: no dots in adapter names

        def fetch_and_load() -> None:
            with tempfile.TemporaryDirectory(prefix="pipelines-adapter-") as tmp:  # weights end up in memory
                folder, _ = load_adapter(f"models:/{name}/{version}", tmp)
                engine.load_adapter(loaded_name, folder)

        try:
            await asyncio.to_thread(fetch_and_load)
        except (PipelineError, AdapterError) as e:
            raise APIError(503, f"adapter {name} v{version} cannot be loaded: {e}", type="server_error",
                           code="adapter_unavailable") from None
        return LoadedAdapter(engine, loaded_name)

    def _watch(self) -> None:
        while not self._stop.wait(self.config.watch_interval_s):
            try:
                self.refresh()
            except Exception as e:  # a registry hiccup must not stop the watching
                log.warning("registry check failed: %s", e)


def _clip_call(engine: ClipEngine, requests: list[tuple[list[str], list[Any]]]
               ) -> list[tuple[np.ndarray, np.ndarray]]:
    """One call per tower for all the requests' captions and images, split back per request."""
    texts, images = engine.embed([t for ts, _ in requests for t in ts], [i for _, ims in requests for i in ims])
    out, t, i = [], 0, 0
    for ts, ims in requests:
        out.append((texts[t:t + len(ts)], images[i:i + len(ims)]))
        t, i = t + len(ts), i + len(ims)
    return out


async def _each_alone(call: Callable[[list[Any]], Sequence[Any]], items: list[Any]) -> list[Any]:
    """`call(items)` in a thread; if it fails, each item again on its own, so only the item that breaks
    the call gets an exception (as its result)."""
    try:
        return list(await asyncio.to_thread(call, items))
    except Exception as e:
        if len(items) == 1:
            return [e]
        log.warning("a batch of %d failed (%s: %s); running its items one by one", len(items), type(e).__name__, e)
    out: list[Any] = []
    for item in items:
        try:
            out.extend(await asyncio.to_thread(call, [item]))
        except Exception as e:
            out.append(e)
    return out


def _request_error(error: Exception) -> APIError:
    """What a request whose own row failed answers: 503 for an adapter evicted under it, else 500."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, AdapterError):
        return APIError(503, f"{error}; retry", type="server_error", code="adapter_unavailable")
    if isinstance(error, RequestRefused) and error.status >= 500:
        return APIError(error.status, str(error), type="server_error", code="service_unavailable",
                        headers={"Retry-After": "1"})
    if isinstance(error, RequestRefused):
        return APIError(error.status, str(error), param=error.param,
                        code="rate_limit_exceeded" if error.status == 429 else "invalid_value",
                        headers={"Retry-After": "1"} if error.status == 429 else None)
    return APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error",
                    code="internal_error")


# -- building and running ------------------------------------------------------------------------
def deployment_options(config: ServeConfig) -> dict[str, Any]:
    """Ray Serve options of the deployment: replicas or autoscaling, resources, queue size."""
    options: dict[str, Any] = {
        "max_ongoing_requests": config.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": config.replica_cpus},
        # Startup logs only: a log line per request is on the request path.
        "logging_config": {"enable_access_log": False, "log_level": "WARNING"},
    }
    if config.scaling.autoscale:
        options["autoscaling_config"] = {
            "min_replicas": config.scaling.min_replicas, "max_replicas": config.scaling.max_replicas,
            "target_ongoing_requests": config.scaling.target_ongoing_requests}
    else:
        options["num_replicas"] = config.replicas
    return options


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application for `args` (a ServeConfig as a dict): the builder `serve run/deploy` import."""
    from pipelines.train.registry import configure_tracking

    config = ServeConfig.model_validate(args)
    return OpenAIServer.options(**deployment_options(config)).bind(replica_args(config), configure_tracking())


def replica_args(config: ServeConfig) -> dict[str, Any]:
    """`config` as the replica's constructor gets it: with the keys given in it (dumps leave them out),
    handed over in memory, never written to a file."""
    args = config.model_dump(mode="json")
    args["access"]["api_keys"] = list(config.access.api_keys)
    return args


# Measured in benchmarks/serve_latency.py: the deployment's code runs on the replica's own event loop
# rather than on a second one in another thread (ours never blocks it: model calls go to a worker
# thread), and Ray's workers run at normal priority: Ray starts them at niceness 15 (to keep its own
# daemons responsive), which makes a replica, the serving work itself, lose the CPU to any other
# process on the machine. (gRPC between proxy and replica, RAY_SERVE_USE_GRPC_BY_DEFAULT, gained
# nothing consistent there.) An environment that sets these already keeps its values.
TUNING = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_worker_niceness": "0"}


def quiet_loading() -> None:
    """No progress bars for downloading a model's files and loading its weights: they fill the replica's log
    (and the Prefect logs of a deploy task) with lines that are not the user's progress."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()


def ray_serve_env(config: ServeConfig) -> dict[str, str]:
    """Serve's settings for `config`, read by Ray's processes when they start (so: set before Ray starts).

    `TUNING` always; with direct ingress, replica i answers HTTP on port+i.
    """
    if not config.direct_ingress:
        return dict(TUNING)
    return TUNING | {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(config.port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(config.port + config.most_replicas),
        # Defaults fit a cloud load balancer in front (30 s drain, 150 s before a port is reused);
        # here nothing has to deregister the replica.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
    }


def emit_config(config: ServeConfig, path: str | Path) -> Path:
    """Write the Ray Serve config file for `config`: `serve run FILE`, `serve deploy FILE`, or a
    RayService's `serveConfigV2`. The direct-ingress variables go in the cluster's environment.

    API keys are never written: the replicas read them from `PIPELINES_API_KEYS` or `api_keys_file` on
    the cluster (a Secret), and when keys were given here the file says `keys_required`, so a cluster
    without them refuses to start rather than serving without keys."""
    args = config.model_dump(mode="json", exclude={"emit_config", "blocking"})
    if config.access.api_keys or os.environ.get(API_KEYS_ENV) or config.access.api_keys_file:
        args["access"]["keys_required"] = True
    options = deployment_options(config)
    deployment = {"name": DEPLOYMENT, **{k: v for k, v in options.items() if k != "logging_config"}}
    env_vars = {}
    tracking = os.environ.get("MLFLOW_TRACKING_URI")
    if tracking:
        env_vars["MLFLOW_TRACKING_URI"] = tracking
    serve_config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": config.host, "port": config.serve_proxy_port},
        "logging_config": options["logging_config"],
        "applications": [{
            "name": APP_NAME, "route_prefix": "/", "import_path": "pipelines.serve.app:build_app",
            "args": args, **({"runtime_env": {"env_vars": env_vars}} if env_vars else {}),
            "deployments": [deployment]}],
    }
    header = ["# Ray Serve config written by `pipelines serve --emit-config`.",
              "# Run: serve run FILE  |  serve deploy FILE  |  a KubeRay RayService's spec.serveConfigV2."]
    if config.host in ("127.0.0.1", "localhost", "::1"):
        header.append(f"# host {config.host} takes local connections only: --host 0.0.0.0 for a cluster.")
    if args["access"]["keys_required"]:
        header.append(f"# API keys are not in this file: give them to every node in {API_KEYS_ENV} (a Secret) "
                      "or in api_keys_file.")
    header.append("# Set these in the Ray cluster's environment (every node) before it starts:")
    header += [f"#   {k}={v}" for k, v in ray_serve_env(config).items()]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(header) + "\n" + yaml.safe_dump(serve_config, sort_keys=False))
    return out


def serve_model(config: ServeConfig) -> str | None:
    """Serve `config` on Ray Serve; return the base URL (or write the config file when `emit_config`)."""
    import ray

    from pipelines.runtime import init_ray, settings

    if config.emit_config:
        out = emit_config(config, config.emit_config)
        print(f"wrote {out}")
        return None
    from pipelines.train.registry import configure_tracking, resolve_version

    # The keys of every source, resolved here (a replica of the local Ray may not see this environment).
    config = config.model_copy(update={"access": config.access.model_copy(
        update={"api_keys": config.access.resolve_keys()})})
    configure_tracking()
    for uri in config.models:  # fails here, in one line, rather than in the replica's constructor
        resolve_version(uri)
    direct = config.direct_ingress
    if not ray.is_initialized() and not settings().ray_address:
        for key, value in ray_serve_env(config).items():  # the local Ray's processes inherit them
            os.environ[key] = os.environ.get(key, value) if key in TUNING else value
    if direct and not settings().ray_address and os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "1":
        # This process's Ray started before without it (a cluster's environment is its own to set).
        log.warning("direct ingress needs RAY_SERVE_ENABLE_DIRECT_INGRESS=1 where Ray starts; "
                    "serving through the proxy")
        config = config.model_copy(update={"ingress": "proxy"})
        direct = False
    if direct:
        for port in range(config.port, config.port + config.most_replicas):
            _check_port_free(config.host, port)
    init_ray()
    if config.blocking:
        # SIGTERM (kill, a container stopping) stops it as cleanly as Ctrl-C, from here on: Ray's driver handles
        # SIGTERM by aborting with a native stack dump. A shell starts a background job with SIGINT ignored.
        signal.signal(signal.SIGTERM, _interrupt)
    # Serve's controller and proxies log every replica added and route updated at INFO: internals, not progress.
    serve.start(http_options={"host": config.host, "port": config.serve_proxy_port},
                logging_config={"log_level": "WARNING", "enable_access_log": False})
    try:
        serve.run(build_app(replica_args(config)), name=APP_NAME, route_prefix="/", blocking=False)
    except RuntimeError as e:  # the replica's constructor failed (e.g. no such model): its error, one line
        raise PipelineError(f"cannot start serving {', '.join(config.models)}: {_root_cause(e)}") from None
    url = f"http://{config.host}:{config.port}"
    _wait_until_up(url)
    where = "direct ingress" if direct else "Serve's proxy"
    print(f"serving {', '.join(config.models)} at {url}/v1 ({where})", flush=True)
    if not config.blocking:
        return url

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(APP_NAME)
    return url


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _check_port_free(host: str, port: int) -> None:
    """Fail early, in one line: a replica cannot bind a port in use (or one just closed, in TIME_WAIT:
    Serve's direct ingress binds without SO_REUSEADDR), and Serve would only say the deployment failed."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise PipelineError(f"cannot serve on {host}:{port}: {e.strerror} (a server that just stopped "
                                "there leaves it busy for a minute)") from None


def _wait_until_up(url: str, timeout_s: float = 120.0) -> None:
    """Replicas are RUNNING before their direct-ingress server listens: wait for /healthz."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise PipelineError(f"{url}/healthz did not answer within {timeout_s:.0f} s")
        time.sleep(0.1)


def _root_cause(exc: BaseException) -> str:
    text = str(exc)
    for line in reversed(text.splitlines()):
        if "PipelineError:" in line:
            return line.split("PipelineError:", 1)[1].strip()
    return text.splitlines()[-1] if text else type(exc).__name__
