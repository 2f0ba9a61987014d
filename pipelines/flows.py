"""The Prefect DAG: one flow per stage, and `end_to_end` composing them.

Every stage is a Prefect task that calls the stage's entry function, the one its CLI command calls
(`crawl_images`, `curate`, `pretrain`, ...), so the DAG and the CLI never drift apart. The Ray work
starts inside the task: a local Ray by default, the cluster when `RAY_ADDRESS` is set; what Ray's
workers print also goes to the task run's logs.

- Retries: a stage that fails for a reason other than the user's input (a worker lost, a storage or
  network error, shards a crawl could not finish) is retried with exponential backoff and jitter;
  crawls and training resume where they stopped. A `PipelineError` (bad config or input) is not.
- Caching: a stage's cache key is the digest of its input's content (the URL list's bytes, the input
  shards' manifest digest, the pinned base model), its config's digest (less the options that do not
  change the output) and the code version. The result (a small JSON document naming the output) is
  persisted under $PIPELINES_HOME/prefect/results, so a later run of any flow with the same inputs
  gets it without running the stage; a cached result whose output has since gone is recomputed.
- Artifacts: each stage publishes its figures as a table, and links to its outputs (the curation
  report, the MLflow run and model version, the endpoint).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import os
import sys
import time
from builtins import print as _builtin_print  # the unpatched one: Prefect's `log_prints` replaces builtins.print
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field

from pipelines.runtime import prefect_env

prefect_env()  # before Prefect reads its settings

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.context import TaskRunContext  # noqa: E402
from prefect.states import State  # noqa: E402
from prefect.tasks import exponential_backoff  # noqa: E402
import prefect.logging.loggers as _prefect_loggers  # noqa: E402

from pipelines.config import ConfigModel, load_config  # noqa: E402
from pipelines.curate.run import CurateConfig, curate  # noqa: E402
from pipelines.errors import PipelineError  # noqa: E402
from pipelines.evaluate.config import SHIPPED_TASKS, EvalConfig, GateConfig  # noqa: E402
from pipelines.ingest.images import ImageCrawlConfig, crawl_images  # noqa: E402
from pipelines.ingest.text import TextCrawlConfig, crawl_text  # noqa: E402
from pipelines.runtime import code_version, failpoint, filesystem, init_ray, settings, worker_logs_to  # noqa: E402
from pipelines.serve.config import ServeConfig  # noqa: E402
from pipelines.shards import MANIFEST, absolute, is_local, read_manifest  # noqa: E402
from pipelines.train.autoencoder_config import AutoencoderPretrainConfig  # noqa: E402
from pipelines.train.clip import ClipPretrainConfig  # noqa: E402
from pipelines.train.config import PretrainConfig  # noqa: E402
from pipelines.train.diffusion import DiffusionPretrainConfig  # noqa: E402
from pipelines.train.encode import EncodeConfig  # noqa: E402
from pipelines.train.finetune import FinetuneConfig  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class StageIncomplete(RuntimeError):
    """A stage finished without all of its work (shards that failed): worth a retry, which resumes."""


# -- printed lines in a run's log --------------------------------------------------------------------
def _print_unless_captured(*args: Any, **kwargs: Any) -> None:
    """`log_prints` sends a print to the run's log, less one that a library is capturing.

    Prefect's patched `print` logs whatever goes to `sys.stdout`, even while a library has pointed it at a
    buffer to read its own output back: dill (datasets' fingerprinting, in the eval stage) finds a function's
    globals by capturing `dis.dis`, so the bytecode went to the eval task's log and dill read nothing. A print
    to a `sys.stdout` that is a `StringIO` (`contextlib.redirect_stdout`, dill's `capture`) stays there."""
    if kwargs.get("file") is None and isinstance(sys.stdout, io.StringIO):
        return _builtin_print(*args, **kwargs)
    return _prefect_print_as_log(*args, **kwargs)


_prefect_print_as_log = _prefect_loggers.print_as_log
_prefect_loggers.print_as_log = _print_unless_captured  # `patch_print` installs the module's attribute


# -- caching and retries ---------------------------------------------------------------------------
# The source each stage's output depends on, besides the shared modules: its packages, and this file.
STAGE_CODE = {"crawl-images": ("ingest", "flows.py"), "crawl-text": ("ingest", "flows.py"),
              "curate": ("curate", "ingest", "flows.py"), "pretrain": ("train", "flows.py"),
              "pretrain-clip": ("train", "flows.py"),
              "finetune": ("train", "ingest", "flows.py"),
              "pretrain-autoencoder": ("train", "flows.py"), "encode": ("train", "flows.py"),
              "pretrain-diffusion": ("train", "flows.py"),
              # the engine computes the scores the harness aggregates: serving code is part of what made them
              "eval": ("evaluate", "serve", "flows.py")}


def stage_key(stage: str, inputs: str, config: ConfigModel) -> str:
    """What a stage's result depends on: its input's content, its config, the code that made it."""
    blob = json.dumps({"stage": stage, "inputs": inputs, "config": config.digest(),
                       "code": code_version(*STAGE_CODE[stage])}, sort_keys=True).encode()
    return f"{stage}-{hashlib.sha256(blob).hexdigest()[:40]}"


def _cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return stage_key(context.task.name, parameters["inputs"], parameters["config"])


def _transient(task: Any, task_run: Any, state: State) -> bool:
    """Retry anything but a user mistake: a bad config or input fails the same way every time."""
    try:
        state.result()
    except PipelineError:
        return False
    except BaseException:
        return True
    return False


STAGE_TASK: dict[str, Any] = dict(
    retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_jitter_factor=0.5,
    retry_condition_fn=_transient, cache_key_fn=_cache_key, persist_result=True, result_serializer="json",
)


def content_digest(url: str) -> str:
    """The digest of what is at `url`: a shard folder's manifest digest, a file's sha256, or the
    sha256 over a folder's files (names and bytes)."""
    fs, path = filesystem(url)
    path = path.rstrip("/")
    if fs.isfile(f"{path}/{MANIFEST}"):
        return read_manifest(url)["digest"]
    if fs.isfile(path):
        files = [path]
    elif fs.isdir(path):
        files = sorted(p for p in fs.find(path) if fs.isfile(p))
    else:
        raise PipelineError(f"{url}: no such file or folder")
    h = hashlib.sha256()
    for name in files:
        h.update(name[len(path):].encode() + b"\0")
        with fs.open(name, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _manifest_digest(url: str) -> str | None:
    try:
        return content_digest(url)
    except (PipelineError, OSError, ValueError, KeyError):
        return None


def _model_version_exists(uri: str) -> bool:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipelines.train.registry import configure_tracking

    configure_tracking()
    name, _, version = uri.removeprefix("models:/").rpartition("/")
    try:
        MlflowClient().get_model_version(name, version)
    except MlflowException:
        return False
    return True


# -- links and artifacts ---------------------------------------------------------------------------
def mlflow_ui_url() -> str:
    """Where the MLflow UI is: `PIPELINES_MLFLOW_UI_URL`, an http(s) tracking server, or the one
    `pipelines ui` starts."""
    tracking = settings().mlflow_tracking_uri
    default = tracking if tracking.startswith("http") else "http://127.0.0.1:5000"
    return os.environ.get("PIPELINES_MLFLOW_UI_URL", default).rstrip("/")


def _mlflow_links(stage: str, run_id: str, registered: Any) -> None:
    import mlflow

    experiment = mlflow.get_run(run_id).info.experiment_id
    create_link_artifact(key=f"{stage}-mlflow-run", link=f"{mlflow_ui_url()}/#/experiments/{experiment}/runs/{run_id}",
                         link_text=f"MLflow run {run_id}", description=f"{stage}: the MLflow run")
    if registered is not None:
        create_link_artifact(
            key=f"{stage}-model-version", link=f"{mlflow_ui_url()}/#/models/{registered.name}/versions/"
            f"{registered.version}", link_text=registered.uri, description=f"{stage}: the registered model version")


def _logs_to_run() -> Any:
    """Ray's worker output, into this task's or flow's run logs."""
    return worker_logs_to(get_run_logger().info)


def _flow_logs(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Ray's worker output during the whole flow run into its logs: the lines of a task's Ray work can
    reach the driver after the task has ended (Ray forwards them in the background)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with _logs_to_run():
            return fn(*args, **kwargs)

    return run


# -- the stages --------------------------------------------------------------------------------------
def _crawl(stage: str, run: Callable[[Any], Any], config: Any) -> dict[str, Any]:
    failpoint(stage)
    with _logs_to_run():
        result = run(config)
    if not result.ok:
        raise StageIncomplete(f"{len(result.failed_shards)} shard(s) of {config.output} failed "
                              f"({next(iter(result.failed_shards.values()))}); a rerun resumes them")
    m = result.manifest
    create_table_artifact(key=stage, description=f"{stage}: rows by status, {config.output}",
                          table=[{"status": k, "rows": v} for k, v in sorted(m["stats"]["status"].items())])
    return {"output": config.output, "digest": m["digest"], "rows": m["stats"]["total"], "samples": m["samples"]}


@task(name="crawl-images", **STAGE_TASK)
def crawl_images_task(config: ImageCrawlConfig, inputs: str) -> dict[str, Any]:
    """`pipelines crawl images`."""
    return _crawl("crawl-images", crawl_images, config)


@task(name="crawl-text", **STAGE_TASK)
def crawl_text_task(config: TextCrawlConfig, inputs: str) -> dict[str, Any]:
    """`pipelines crawl text`."""
    return _crawl("crawl-text", crawl_text, config)


@task(name="curate", **STAGE_TASK)
def curate_task(config: CurateConfig, inputs: str) -> dict[str, Any]:
    """`pipelines curate`."""
    stage = f"curate-{Path(config.output).name}".lower().replace("_", "-")
    failpoint(stage)
    with _logs_to_run():
        result = curate(config)
    if result.failed_shards:
        raise StageIncomplete(f"curating {config.input}: {len(result.failed_shards)} shard(s) failed; "
                              "a rerun resumes them")
    if not result.ok:  # corrupt input shards: a retry reads the same bytes
        raise PipelineError(f"curating {config.input}: {len(result.skipped_shards)} corrupt input shard(s) "
                            f"({', '.join(sorted(result.skipped_shards))}); set allow_skipped_shards to accept "
                            "the loss")
    s = result.stats
    create_table_artifact(key=stage, description=f"{stage}: samples in, kept and dropped per step", table=[
        {"step": x["step"], "in": x["in"], "kept": x["kept"],
         "dropped": ", ".join(f"{r} {n}" for r, n in x["dropped"].items()) or "-", "seconds": x["seconds"]}
        for x in s["steps"]])
    report = Path(config.output, "report.html")
    if config.report and is_local(filesystem(config.output)[0]):
        create_link_artifact(key=f"{stage}-report", link=report.absolute().as_uri(), link_text=str(report),
                             description=f"{stage}: the curation report (funnel, score histograms)")
    removed = {x["step"]: x["in"] - x["kept"] for x in s["steps"] if x["in"] > x["kept"]}
    return {"output": config.output, "digest": result.manifest["digest"], "samples_in": s["input"]["samples"],
            "kept": s["output"]["samples"], "removed": removed}


def _train(stage: str, run: Callable[[Any], Any], config: Any, inputs: str,
           figures: tuple[str, ...]) -> tuple[Any, dict]:
    from pipelines.train.pretrain import retry_name

    failpoint(stage)
    # The run is named after what it trains, so that a retry (a worker, node or storage lost mid-run)
    # continues it from its last checkpoint instead of starting over.
    config = retry_name(config, f"{config.registry.model_name}-{stage_key(stage, inputs, config)[-12:]}")
    with _logs_to_run():
        result = run(config)
    if result.stopped:
        raise PipelineError(f"{stage} run {result.run_name} stopped early (stop_after); resume it with the CLI")
    m, r = result.metrics, result.registered
    create_table_artifact(key=stage, description=f"{stage}: final figures",
                          table=[{"metric": k, "value": m[k]} for k in ("step", *figures) if k in m])
    _mlflow_links(stage, result.mlflow_run_id, r)
    return result, {"run_name": result.run_name, "mlflow_run_id": result.mlflow_run_id, "steps": result.steps,
                    **{k: m.get(k) for k in figures}, "champion": bool(r and r.champion)}


@task(name="pretrain", **STAGE_TASK)
def pretrain_task(config: PretrainConfig, inputs: str) -> dict[str, Any]:
    """`pipelines pretrain`."""
    from pipelines.train.pretrain import pretrain

    result, out = _train("pretrain", pretrain, config, inputs, ("loss", "heldout_loss", "heldout_perplexity"))
    return out | {"model_dir": result.model_dir, "model_uri": result.registered.uri if result.registered else None}


@task(name="pretrain-clip", **STAGE_TASK)
def pretrain_clip_task(config: ClipPretrainConfig, inputs: str) -> dict[str, Any]:
    """`pipelines pretrain --kind clip`."""
    from pipelines.train.clip import pretrain_clip

    result, out = _train("pretrain-clip", pretrain_clip, config, inputs, CLIP_FIGURES)
    return out | {"model_dir": result.model_dir, "model_uri": result.registered.uri if result.registered else None}


CLIP_FIGURES = ("loss", "heldout_i2t_recall_at_1", "heldout_t2i_recall_at_1", "heldout_i2t_recall_at_5",
                "heldout_t2i_recall_at_5")


@task(name="finetune", **STAGE_TASK)
def finetune_task(config: FinetuneConfig, inputs: str) -> dict[str, Any]:
    """`pipelines finetune`."""
    from pipelines.train.finetune import finetune

    result, out = _train("finetune", finetune, config, inputs, ("loss", "heldout_loss_before", "heldout_loss"))
    return out | {"base": result.base, "adapter_uri": result.registered.uri if result.registered else None}


AUTOENCODER_FIGURES = ("loss", "heldout_psnr", "heldout_l1", "heldout_fd_clip", "scaling_factor")
DIFFUSION_FIGURES = ("loss", "heldout_fd_clip", "heldout_clip_score")


@task(name="pretrain-autoencoder", **STAGE_TASK)
def pretrain_autoencoder_task(config: AutoencoderPretrainConfig, inputs: str) -> dict[str, Any]:
    """`pipelines pretrain --kind autoencoder`."""
    from pipelines.train.autoencoder import pretrain_autoencoder

    result, out = _train("pretrain-autoencoder", pretrain_autoencoder, config, inputs, AUTOENCODER_FIGURES)
    return out | {"model_dir": result.model_dir, "model_uri": result.registered.uri if result.registered else None}


@task(name="encode", **STAGE_TASK)
def encode_task(config: EncodeConfig, inputs: str) -> dict[str, Any]:
    """`pipelines encode`: image shards -> latent shards."""
    from pipelines.train.encode import encode

    failpoint("encode")
    with _logs_to_run():
        result = encode(config)
    if not result.ok:
        raise StageIncomplete(f"{len(result.failed_shards)} shard(s) of {config.output} failed "
                              f"({next(iter(result.failed_shards.values()))}); a rerun resumes them")
    m = result.manifest
    create_table_artifact(key="encode", description=f"encode: latent shards of {config.shards} in {config.output}",
                          table=[{"figure": k, "value": v} for k, v in (
                              ("samples", m["samples"]), ("shards", len(m["shards"])),
                              ("autoencoder", (m.get("autoencoder") or {}).get("uri")),
                              ("samples left out", result.rejected), ("seconds", round(result.elapsed_s, 1)))])
    return {"output": config.output, "digest": m["digest"], "samples": m["samples"],
            "autoencoder": (m.get("autoencoder") or {}).get("uri")}


@task(name="pretrain-diffusion", **STAGE_TASK)
def pretrain_diffusion_task(config: DiffusionPretrainConfig, inputs: str) -> dict[str, Any]:
    """`pipelines pretrain --kind diffusion`; the final sample grid becomes an artifact too."""
    from pipelines.train.diffusion import pretrain_diffusion

    result, out = _train("pretrain-diffusion", pretrain_diffusion, config, inputs, DIFFUSION_FIGURES)
    grid = _sample_grid(result.mlflow_run_id, result.steps)
    if grid:
        create_markdown_artifact(key="pretrain-diffusion-samples", description=(
            "pretrain-diffusion: images generated for held-out captions at the last step"),
            markdown=f"![samples at step {result.steps}](data:image/png;base64,{base64.b64encode(grid).decode()})\n\n"
                     f"FD-CLIP {out.get('heldout_fd_clip')}, CLIP score {out.get('heldout_clip_score')}")
    return out | {"model_dir": result.model_dir, "model_uri": result.registered.uri if result.registered else None}


def _sample_grid(run_id: str, step: int) -> bytes | None:
    """The PNG grid the diffusion run logged for `step` (`samples/step-NNNNNNN.png`), or None."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipelines.train.registry import configure_tracking

    configure_tracking()
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"samples/step-{step:07d}.png")
    except (MlflowException, OSError) as exc:
        get_run_logger().warning("no sample grid for step %d of run %s (%s)", step, run_id, exc)
        return None
    return Path(path).read_bytes()


@task(name="deploy", retries=2, retry_delay_seconds=5, retry_condition_fn=_transient)
def deploy_task(config: ServeConfig) -> str:
    """`pipelines serve`, returning once the endpoint answers."""
    from pipelines.serve.app import serve_model

    failpoint("deploy")
    with _logs_to_run():
        url = serve_model(config.model_copy(update={"blocking": False}))
    create_link_artifact(key="endpoint", link=f"{url}/v1/models", link_text=f"{url}/v1",
                         description=f"OpenAI-compatible endpoint serving {config.model}")
    return url


@task(name="smoke-request", retries=2, retry_delay_seconds=5)
def smoke_task(url: str, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One chat completion through the endpoint, as an application would send it."""
    import httpx

    started = time.perf_counter()
    response = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0})
    response.raise_for_status()
    body = response.json()
    answer = body["choices"][0]["message"]["content"]
    get_run_logger().info("%s answered %r with %r", model, prompt, answer)
    create_markdown_artifact(key="smoke-request", description="one request through the endpoint",
                             markdown=f"**{model}**\n\n> {prompt}\n\n{answer}")
    return {"model": model, "prompt": prompt, "answer": answer, "tokens": body["usage"]["completion_tokens"],
            "ms": round(1000 * (time.perf_counter() - started))}


@task(name="smoke-image", retries=2, retry_delay_seconds=5)
def smoke_image_task(url: str, model: str, prompt: str) -> dict[str, Any]:
    """One picture through the endpoint's Images API, as an application would ask for it (few steps: it
    checks the served model draws, not how well)."""
    import httpx
    from PIL import Image

    started = time.perf_counter()
    response = httpx.post(f"{url}/v1/images/generations", timeout=120, json={
        "model": model, "prompt": prompt, "n": 1, "response_format": "b64_json", "seed": 0,
        "num_inference_steps": 8})
    response.raise_for_status()
    png = base64.b64decode(response.json()["data"][0]["b64_json"])
    width, height = Image.open(io.BytesIO(png)).size
    get_run_logger().info("%s drew %r: a %dx%d PNG", model, prompt, width, height)
    create_markdown_artifact(key="smoke-image", description="one picture through the endpoint",
                             markdown=f"**{model}**\n\n> {prompt}\n\n![{prompt}](data:image/png;base64,"
                                      f"{base64.b64encode(png).decode()})")
    return {"model": model, "prompt": prompt, "size": f"{width}x{height}", "png_bytes": len(png),
            "ms": round(1000 * (time.perf_counter() - started))}


@task(name="eval", **STAGE_TASK)
def eval_task(config: EvalConfig, inputs: str) -> dict[str, Any]:
    """`pipelines eval`: lm-evaluation-harness's tasks against the model (through `config.endpoint` when set)."""
    from pipelines.evaluate.run import KEY_ENV, evaluate
    from pipelines.serve.config import AccessConfig

    failpoint("eval")
    keys = AccessConfig().resolve_keys()  # the deployed endpoint's keys, which the harness must send
    before = os.environ.get(KEY_ENV)
    if keys and not before:
        os.environ[KEY_ENV] = keys[0]
    try:
        with _logs_to_run():
            result = evaluate(config.model_copy(update={"quiet": True}))
    finally:
        if keys and not before:
            os.environ.pop(KEY_ENV, None)
    scores = {k: v for k, v in result.scores.items() if not k.split("/")[1].endswith("_stderr")}
    create_table_artifact(key="eval", description=f"eval: lm-evaluation-harness scores of {result.model_uri}",
                          table=[{"score": k, "value": round(v, 4),
                                  "stderr": _stderr_of(result.scores, k)} for k, v in scores.items()])
    gate = result.gate
    if gate is not None:
        get_run_logger().info("gate: %s", gate.message)
    return {"model_uri": result.model_uri, "served_as": result.served_as, "mlflow_run_id": result.run_id,
            "artifacts": result.artifacts, "scores": scores,
            "gate": None if gate is None else {"message": gate.message, "passed": gate.passed, "moved": gate.moved}}


def _stderr_of(scores: dict[str, float], name: str) -> float | None:
    task, metric, *rest = name.split("/")
    value = scores.get("/".join([task, f"{metric}_stderr", *rest]))
    return None if value is None else round(value, 4)


def _pinned_eval(config: EvalConfig) -> tuple[EvalConfig, str]:
    """The config with its model pinned to a version, and what the scores depend on: that version and the task
    definitions' content (configs/eval, include_path)."""
    from pipelines.evaluate.run import TASKS_DIR

    config = config.model_copy(update={"model": _pinned(config.model)})
    folders = [str(TASKS_DIR), *config.include_path]
    return config, " ".join([config.model, *(content_digest(f) for f in folders)])


# -- running a stage: submit, then check what a cached result points at still exists --------------
class Stage:
    """A submitted stage task; `settle()` waits for it, and recomputes a cached result whose output
    is gone (someone deleted the shards, or the model version)."""

    def __init__(self, task_fn: Any, config: ConfigModel, inputs: str, still_there: Callable[[dict], bool],
                 refresh: bool = False, wait_for: list | None = None):
        self.task_fn, self.config, self.inputs, self.still_there = task_fn, config, inputs, still_there
        self.wait_for = [f for f in (wait_for or []) if f is not None]
        fn = task_fn.with_options(refresh_cache=True) if refresh else task_fn
        self.future = fn.submit(config=config, inputs=inputs, wait_for=self.wait_for)

    def settle(self) -> tuple[dict[str, Any], State]:
        self.future.wait()
        state = self.future.state
        result = state.result()
        if state.name == "Cached" and not self.still_there(result):
            get_run_logger().warning("the cached result of %s points at outputs that are gone; recomputing",
                                     self.task_fn.name)
            self.future = self.task_fn.with_options(refresh_cache=True).submit(
                config=self.config, inputs=self.inputs, wait_for=self.wait_for)
            self.future.wait()
            state = self.future.state
            result = state.result()
        return result, state


def _shards_still_there(result: dict[str, Any]) -> bool:
    return _manifest_digest(result["output"]) == result["digest"]


def _model_still_there(key: str) -> Callable[[dict], bool]:
    return lambda result: bool(result.get(key)) and _model_version_exists(result[key])


def _run_count(state: State) -> int | None:
    """How many times the task ran (retries count), as the Prefect API recorded it (None: not known)."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    task_run_id = state.state_details.task_run_id
    if state.name == "Cached" or task_run_id is None:
        return 0
    with get_client(sync_client=True) as client:
        for _ in range(20):  # task runs reach the API as events: the record can lag the state a moment
            try:
                return client.read_task_run(task_run_id).run_count
            except ObjectNotFound:
                time.sleep(0.25)
    return None


def _outcome(stage: str, result: Any, state: State) -> dict[str, Any]:
    return {"stage": stage, "state": state.name, "cached": state.name == "Cached", "runs": _run_count(state),
            "result": result}


# -- per-stage flows (what the deployments and the Prefect UI's Run form start) --------------------
class IngestConfig(ConfigModel):
    """The ingest flow: a caption-image crawl, a text crawl, or both at once."""

    images: ImageCrawlConfig | None = None
    text: TextCrawlConfig | None = None
    refresh: bool = Field(False, description="Crawl again even when the URL list is unchanged (a recrawl).")


@flow(name="ingest", log_prints=True)
@_flow_logs
def ingest_flow(config: IngestConfig) -> dict[str, Any]:
    """Crawl caption-image URL lists and/or text corpora into WebDataset shards."""
    init_ray()
    stages = {}
    if config.images:
        stages["crawl-images"] = Stage(crawl_images_task, config.images, content_digest(config.images.input),
                                       _shards_still_there, config.refresh)
    if config.text:
        stages["crawl-text"] = Stage(crawl_text_task, config.text, content_digest(config.text.input),
                                     _shards_still_there, config.refresh)
    if not stages:
        raise PipelineError("ingest: give images and/or text")
    return {name: _outcome(name, *s.settle()) for name, s in stages.items()}


@flow(name="curate", log_prints=True)
@_flow_logs
def curate_flow(config: CurateConfig) -> dict[str, Any]:
    """Filter and dedupe a shard set with the configured steps."""
    init_ray()
    return _outcome("curate", *Stage(curate_task, config, content_digest(config.input), _shards_still_there).settle())


@flow(name="pretrain", log_prints=True)
@_flow_logs
def pretrain_flow(config: PretrainConfig) -> dict[str, Any]:
    """Pretrain a causal LM on (curated) text shards with DeepSpeed on Ray Train; register it in MLflow."""
    return _pretraining("pretrain", pretrain_task, config)


def _pretraining(stage: str, task_fn: Any, config: PretrainConfig | ClipPretrainConfig) -> dict[str, Any]:
    if not config.data.shards:
        raise PipelineError(f"{stage}: set data.shards")
    init_ray()
    return _outcome(stage, *Stage(task_fn, config, content_digest(config.data.shards),
                                  _model_still_there("model_uri")).settle())


@flow(name="pretrain-clip", log_prints=True)
@_flow_logs
def pretrain_clip_flow(config: ClipPretrainConfig) -> dict[str, Any]:
    """Pretrain a CLIP-style image-text model on (curated) caption-image shards; register it in MLflow."""
    return _pretraining("pretrain-clip", pretrain_clip_task, config)


@flow(name="pretrain-autoencoder", log_prints=True)
@_flow_logs
def pretrain_autoencoder_flow(config: AutoencoderPretrainConfig) -> dict[str, Any]:
    """Pretrain an image autoencoder (KL + patch GAN) on (curated) image shards; register it in MLflow."""
    return _pretraining("pretrain-autoencoder", pretrain_autoencoder_task, config)


@flow(name="encode", log_prints=True)
@_flow_logs
def encode_flow(config: EncodeConfig) -> dict[str, Any]:
    """Encode image shards with a registered autoencoder into latent shards (what diffusion trains on)."""
    init_ray()
    config, inputs = _pinned_encode(config)
    return _outcome("encode", *Stage(encode_task, config, inputs, _shards_still_there).settle())


def _pinned(uri: str | None) -> str | None:
    """A registered model's alias pinned to its version (an alias moving is a new input); others as given."""
    from pipelines.train.registry import configure_tracking, resolve_version

    if not uri or not uri.startswith("models:/"):
        return uri
    configure_tracking()
    name, version = resolve_version(uri)
    return f"models:/{name}/{version}"


def _model_input(uri: str | None) -> str:
    """What a stage's output depends on of a model it reads: its pinned version, or a folder's content."""
    if not uri:
        return "-"
    return uri if uri.startswith("models:/") else f"{uri} {content_digest(uri)}"


def _pinned_encode(config: EncodeConfig) -> tuple[EncodeConfig, str]:
    config = config.model_copy(update={"autoencoder": _pinned(config.autoencoder), "clip": _pinned(config.clip)})
    return config, " ".join([content_digest(config.shards), _model_input(config.autoencoder),
                             _model_input(config.clip)])


@flow(name="pretrain-diffusion", log_prints=True)
@_flow_logs
def pretrain_diffusion_flow(config: DiffusionPretrainConfig) -> dict[str, Any]:
    """Pretrain a text-to-image latent diffusion model on latent (or image) shards, conditioned on a registered
    CLIP's text tower; register it in MLflow with its samples."""
    if not config.data.shards:
        raise PipelineError("pretrain-diffusion: set data.shards")
    init_ray()
    config, inputs = _pinned_diffusion(config)
    return _outcome("pretrain-diffusion", *Stage(pretrain_diffusion_task, config, inputs,
                                                 _model_still_there("model_uri")).settle())


def _pinned_diffusion(config: DiffusionPretrainConfig) -> tuple[DiffusionPretrainConfig, str]:
    config = config.model_copy(deep=True)
    config.conditioning.text_encoder = _pinned(config.conditioning.text_encoder) or ""
    config.conditioning.autoencoder = _pinned(config.conditioning.autoencoder)
    return config, " ".join([content_digest(config.data.shards or ""), _model_input(config.conditioning.text_encoder),
                             _model_input(config.conditioning.autoencoder)])


@flow(name="finetune", log_prints=True)
@_flow_logs
def finetune_flow(config: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune (LoRA or full) a registered base on prompt/response examples; register the adapter."""
    if not config.base or not config.examples.data:
        raise PipelineError("finetune: set base (models:/NAME@ALIAS) and examples.data")
    init_ray()
    config, inputs = _pinned_finetune(config)
    return _outcome("finetune", *Stage(finetune_task, config, inputs, _model_still_there("adapter_uri")).settle())


def _pinned_finetune(config: FinetuneConfig) -> tuple[FinetuneConfig, str]:
    """The config with its base alias pinned to a version (an alias moving is a new input), and the
    content the fine-tune depends on."""
    from pipelines.train.registry import configure_tracking, resolve_version

    base = config.base or ""
    if base.startswith("models:/"):
        configure_tracking()
        name, version = resolve_version(base)
        base = f"models:/{name}/{version}"
        config = config.model_copy(update={"base": base})
    else:
        base = f"{base} {content_digest(base)}"
    return config, f"{base} {content_digest(config.examples.data)}"


@flow(name="deploy", log_prints=True)
@_flow_logs
def deploy_flow(config: ServeConfig, prompt: str = "Hello", max_tokens: int = 32) -> dict[str, Any]:
    """Serve a registered model (and adapters) on Ray Serve, then send one request through it.
    The endpoint lives as long as the Ray it runs on: a cluster's (`RAY_ADDRESS`) outlives the flow."""
    init_ray()
    url = deploy_task(config)
    model = config.model.removeprefix("models:/").split("/")[0].split("@")[0]
    return {"url": url, "smoke": smoke_task(url, model, prompt, max_tokens)}


@flow(name="eval", log_prints=True)
@_flow_logs
def eval_flow(config: EvalConfig) -> dict[str, Any]:
    """Score a registered language model or adapter with lm-evaluation-harness's tasks; log the scores to its
    MLflow run, and with a gate move an alias."""
    init_ray()
    config, inputs = _pinned_eval(config)
    return _outcome("eval", *Stage(eval_task, config, inputs, _model_still_there("model_uri")).settle())


# -- the end-to-end flow ---------------------------------------------------------------------------
class ImagesStage(ImageCrawlConfig):
    """Caption-image branch: crawl, then curate. Output defaults to WORKDIR/shards/images."""

    input: str | None = Field(None, description="Caption-image URL list; none: no image branch.")
    output: str = Field("", description="Shards (default WORKDIR/shards/images).")
    curate: str | None = Field("curate/images-default.yaml", description=(
        "Curation config (YAML; relative paths also looked up in the package's configs/); none: not curated."))


class TextStage(TextCrawlConfig):
    """Text branch: crawl, curate, then the language model trains on what is kept."""

    input: str | None = Field(None, description="Corpus (source=files) or page URL list (source=urls); none: no text.")
    output: str = Field("", description="Shards (default WORKDIR/shards/text).")
    curate: str | None = Field("curate/text-default.yaml", description=(
        "Curation config (YAML; relative paths also looked up in the package's configs/); none: not curated."))


class DeployStage(ConfigModel):
    port: int = Field(8000, ge=1, le=65535, description="Endpoint port on 127.0.0.1 (Serve's proxy on the next).")
    host: str = "127.0.0.1"
    prompt: str = Field("What is Ray?", description="The smoke request's question.")
    max_tokens: int = Field(48, ge=1)
    image_prompt: str = Field("a photo of coffee", description=(
        "The image model's smoke request (when the run has a `diffusion:` section)."))
    keep_serving: bool = Field(False, description="Keep the endpoint up after the summary, until Ctrl-C.")
    vllm_compile: bool = Field(True, description=ServeConfig.model_fields["vllm_compile"].description)


class EncodeStage(ConfigModel):
    """How the end-to-end flow encodes the (curated) photos for diffusion."""

    image_size: int | None = Field(None, gt=0, description=(
        "Square images fed to the autoencoder, in pixels (default: its config's sample_size)."))
    batch_size: int = Field(32, gt=0, description="Images per autoencoder call.")
    text_states: bool = Field(False, description=(
        "Also store the CLIP text tower's per-token states of each caption beside each latent."))


class DiffusionStage(ConfigModel):
    """Text-to-image after the CLIP model: an autoencoder trained on the (curated) photos, their latents, and a
    diffusion model trained on them, conditioned on this run's CLIP text tower."""

    autoencoder: AutoencoderPretrainConfig = AutoencoderPretrainConfig()
    encode: EncodeStage = EncodeStage()
    diffusion: DiffusionPretrainConfig = DiffusionPretrainConfig()


class EvalStage(ConfigModel):
    """lm-evaluation-harness on the fine-tuned adapter (or, without one, the pretrained LM) through the deployed
    endpoint, after the smoke request."""

    tasks: list[str] = Field(default_factory=lambda: list(SHIPPED_TASKS), description=(
        "Tasks, groups or tags: configs/eval's (demo-cloze, demo-qa), include_path's, or the harness's own."))
    limit: int | None = Field(None, gt=0, description="Items per task (default: all of them).")
    num_fewshot: int | None = Field(None, ge=0, description="Examples shown before each item (default: the task's).")
    include_path: list[str] = Field(default_factory=list, description="More folders of task YAML files.")
    gate: GateConfig = GateConfig()


class EndToEndConfig(ConfigModel):
    """Crawl images and text -> curate -> pretrain -> register -> fine-tune -> register -> deploy -> smoke request
    -> eval."""

    workdir: str = Field("", description="Where shards go (default $PIPELINES_HOME/flows).")
    until: Literal["curate", "pretrain", "finetune", "deploy"] = Field(
        "deploy", description="Last stage to run (curate: a crawl-and-curate run).")
    refresh: bool = Field(False, description="Run every stage again, cached or not (a recrawl, a retrain).")
    images: ImagesStage = ImagesStage()
    text: TextStage = TextStage()
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    clip: ClipPretrainConfig | None = Field(None, description=(
        "A CLIP model to pretrain on the (curated) images after the language model; none: no CLIP model."))
    diffusion: DiffusionStage | None = Field(None, description=(
        "Text-to-image after the CLIP model: autoencoder -> latents -> diffusion model; none: no image model."))
    deploy: DeployStage = DeployStage()
    eval: EvalStage | None = Field(None, description=(
        "Score the served LM (its fine-tuned adapter when there is one) with lm-evaluation-harness after the smoke "
        "request; none: no evaluation. Runs only when the flow deploys."))


def config_path(path: str) -> Path:
    """A config file as given, else under the package's configs/ folder."""
    given = Path(path)
    if given.is_file() or given.is_absolute():
        return given
    return CONFIGS / path if (CONFIGS / path).is_file() else given


def _curate_config(path: str, input: str, output: str) -> CurateConfig:
    return load_config(CurateConfig, config_path(path), {("input",): input, ("output",): output, ("quiet",): True})


def _deploy_serve_config(config: EndToEndConfig) -> ServeConfig:
    return ServeConfig(model="models:/unknown@champion", host=config.deploy.host, port=config.deploy.port,
                       vllm_compile=config.deploy.vllm_compile)


def start_ray(config: EndToEndConfig) -> None:
    """Ray for `end_to_end(config)`: a local Ray started with the settings its deploy stage's Serve needs (Ray's
    processes read them when they start). A caller may start it before the flow (the demo does, while Prefect's
    temporary API server starts); the flow then finds it up."""
    import ray

    from pipelines.serve.app import ray_serve_env

    if config.until == "deploy" and not ray.is_initialized() and not settings().ray_address:
        for k, v in ray_serve_env(_deploy_serve_config(config)).items():
            os.environ.setdefault(k, v)
    init_ray()


@flow(name="end-to-end", log_prints=True)
@_flow_logs
def end_to_end(config: EndToEndConfig) -> dict[str, Any]:
    """The whole chain on one config; stages whose inputs did not change come from the cache."""
    log = get_run_logger()
    workdir = config.workdir or str(settings().home / "flows")
    if not config.images.input and not config.text.input:
        raise PipelineError("end-to-end: give images.input and/or text.input")
    if config.until != "curate" and not (config.text.input and config.text.curate):
        raise PipelineError("end-to-end: training needs text.input and text.curate")
    if config.until != "curate" and (config.clip or config.diffusion) and not config.images.input:
        raise PipelineError("end-to-end: the CLIP and image models train on images: give images.input")
    serve = _deploy_serve_config(config) if config.until == "deploy" else None
    start_ray(config)
    outcomes: dict[str, dict[str, Any]] = {}

    # crawl both branches at once, then curate both at once
    crawls: dict[str, Stage] = {}
    branches = {"images": (config.images, ImageCrawlConfig, crawl_images_task),
                "text": (config.text, TextCrawlConfig, crawl_text_task)}
    for name, (section, model, task_fn) in branches.items():
        if section.input:
            given = section.model_dump(exclude={"curate"}, exclude_unset=True)  # unset stays unset (id_col)
            output = section.output or f"{workdir}/shards/{name}"
            crawl = model.model_validate(given | {"output": output, "quiet": True})
            crawls[name] = Stage(task_fn, crawl, content_digest(crawl.input), _shards_still_there, config.refresh)
    crawled = {}
    for name, stage in crawls.items():
        result, state = stage.settle()
        crawled[name] = result
        outcomes[f"crawl-{name}"] = _outcome(f"crawl-{name}", result, state)
    curations = {}
    for name, result in crawled.items():
        path = branches[name][0].curate
        if path:
            cfg = _curate_config(path, result["output"], f"{workdir}/curated/{name}")
            curations[name] = Stage(curate_task, cfg, result["digest"], _shards_still_there, config.refresh,
                                    wait_for=[crawls[name].future])
    for name, stage in curations.items():
        outcomes[f"curate-{name}"] = _outcome(f"curate-{name}", *stage.settle())

    if config.until != "curate":
        corpus = outcomes["curate-text"]["result"]
        pre = config.pretrain.model_copy(deep=True)
        pre.data.shards = absolute(corpus["output"])
        pretraining = Stage(pretrain_task, pre, corpus["digest"], _model_still_there("model_uri"), config.refresh,
                            wait_for=[curations["text"].future])
        outcomes["pretrain"] = _outcome("pretrain", *pretraining.settle())
        pretrained = outcomes["pretrain"]["result"]
        base_uri = pretrained["model_uri"]
        adapter_uri = None
        if config.until in ("finetune", "deploy") and config.finetune.examples.data:
            ft = config.finetune.model_copy(update={"base": base_uri})  # this run's version, not an alias
            ft, inputs = _pinned_finetune(ft)
            tuning = Stage(finetune_task, ft, inputs, _model_still_there("adapter_uri"), config.refresh,
                           wait_for=[pretraining.future])
            outcomes["finetune"] = _outcome("finetune", *tuning.settle())
            adapter_uri = outcomes["finetune"]["result"]["adapter_uri"]
        if config.clip:  # after the LM's training, not beside it: both would want the same CPUs
            images = outcomes.get("curate-images", outcomes["crawl-images"])["result"]
            clip = config.clip.model_copy(deep=True)
            clip.data.shards = absolute(images["output"])
            upstream = curations.get("images") or crawls["images"]
            clip_training = Stage(pretrain_clip_task, clip, images["digest"], _model_still_there("model_uri"),
                                  config.refresh, wait_for=[upstream.future, pretraining.future])
            outcomes["pretrain-clip"] = _outcome("pretrain-clip", *clip_training.settle())
        if config.diffusion:
            _image_model(config, outcomes, workdir, upstream=[(curations.get("images") or crawls["images"]).future,
                                                              (clip_training if config.clip else pretraining).future])
        if serve is not None and base_uri:
            drawer = outcomes.get("pretrain-diffusion", {}).get("result", {}).get("model_uri")
            serve = serve.model_copy(update={"model": base_uri, "adapter": [adapter_uri] if adapter_uri else [],
                                             "also": [drawer] if drawer else []})
            url = deploy_task(serve)
            served = base_uri.removeprefix("models:/").split("/")[0]
            if adapter_uri:
                served += ":" + adapter_uri.removeprefix("models:/").split("/")[0]
            smoke = smoke_task(url, served, config.deploy.prompt, config.deploy.max_tokens)
            outcomes["deploy"] = {"stage": "deploy", "state": "Completed", "cached": False, "runs": 1,
                                  "result": {"url": url, "model": served, **smoke}}
            if drawer:
                outcomes["deploy"]["result"]["image"] = smoke_image_task(
                    url, drawer.removeprefix("models:/").split("/")[0], config.deploy.image_prompt)
            if config.eval is not None:
                evaluation = EvalConfig(model=adapter_uri or base_uri, endpoint=url,
                                        **config.eval.model_dump(exclude_unset=True))
                evaluation, inputs = _pinned_eval(evaluation)
                outcomes["eval"] = _outcome("eval", *Stage(eval_task, evaluation, inputs,
                                                           _model_still_there("model_uri"), config.refresh).settle())
    log.info("end-to-end: %s", ", ".join(f"{k} {v['state']}" for k, v in outcomes.items()))
    return outcomes


def _image_model(config: EndToEndConfig, outcomes: dict[str, dict[str, Any]], workdir: str,
                 upstream: list[Any]) -> None:
    """autoencoder -> encode -> diffusion on the (curated) photos, after the CLIP model (the same CPUs)."""
    section = config.diffusion
    assert section is not None
    images = outcomes.get("curate-images", outcomes["crawl-images"])["result"]
    shards = absolute(images["output"])
    ae = section.autoencoder.model_copy(deep=True)
    ae.data.shards = shards
    ae_training = Stage(pretrain_autoencoder_task, ae, images["digest"], _model_still_there("model_uri"),
                        config.refresh, wait_for=upstream)
    outcomes["pretrain-autoencoder"] = _outcome("pretrain-autoencoder", *ae_training.settle())
    clip_uri = outcomes.get("pretrain-clip", {}).get("result", {}).get("model_uri")
    text_encoder = clip_uri or section.diffusion.conditioning.text_encoder
    encoding = EncodeConfig(shards=shards, output="", autoencoder=outcomes["pretrain-autoencoder"]["result"][
        "model_uri"], clip=text_encoder if section.encode.text_states else None,
        image_size=section.encode.image_size, batch_size=section.encode.batch_size, quiet=True)
    encoding, inputs = _pinned_encode(encoding)
    # One folder per input: a new autoencoder version writes new latents instead of being refused.
    encoding.output = f"{workdir}/latents/{stage_key('encode', inputs, encoding)[-12:]}"
    encoded = Stage(encode_task, encoding, inputs, _shards_still_there, config.refresh, wait_for=[ae_training.future])
    outcomes["encode"] = _outcome("encode", *encoded.settle())
    diffusion = section.diffusion.model_copy(deep=True)
    diffusion.data.shards = absolute(outcomes["encode"]["result"]["output"])
    diffusion.conditioning.text_encoder = text_encoder
    diffusion.conditioning.autoencoder = None  # the one the latents were encoded with
    diffusion, inputs = _pinned_diffusion(diffusion)
    training = Stage(pretrain_diffusion_task, diffusion, inputs, _model_still_there("model_uri"), config.refresh,
                     wait_for=[encoded.future])
    outcomes["pretrain-diffusion"] = _outcome("pretrain-diffusion", *training.settle())


# -- the summary -----------------------------------------------------------------------------------
FLOWS: dict[str, tuple[type[ConfigModel], Any]] = {
    "end-to-end": (EndToEndConfig, end_to_end), "ingest": (IngestConfig, ingest_flow),
    "curate": (CurateConfig, curate_flow), "pretrain": (PretrainConfig, pretrain_flow),
    "pretrain-clip": (ClipPretrainConfig, pretrain_clip_flow),
    "finetune": (FinetuneConfig, finetune_flow), "deploy": (ServeConfig, deploy_flow),
    "pretrain-autoencoder": (AutoencoderPretrainConfig, pretrain_autoencoder_flow),
    "encode": (EncodeConfig, encode_flow), "pretrain-diffusion": (DiffusionPretrainConfig, pretrain_diffusion_flow),
    "eval": (EvalConfig, eval_flow),
}


def _facts(stage: str, r: dict[str, Any]) -> str:
    """One line of what a stage produced."""
    if stage.startswith("crawl"):
        return f"{r['rows']} rows -> {r['samples']} samples in {r['output']}"
    if stage.startswith("curate"):
        removed = ", ".join(f"{k} -{v}" for k, v in r["removed"].items()) or "none removed"
        return f"{r['samples_in']} -> {r['kept']} kept ({removed}); report {r['output']}/report.html"
    if stage == "pretrain":
        return (f"{r['steps']} steps, loss {r['loss']:.3f}, held-out perplexity {r['heldout_perplexity']:.1f}; "
                f"{r['model_uri']}{' (champion)' if r['champion'] else ''}")
    if stage == "pretrain-clip":
        return (f"{r['steps']} steps, loss {r['loss']:.3f}, held-out recall@1 image->text "
                f"{r['heldout_i2t_recall_at_1']:.2f}, text->image {r['heldout_t2i_recall_at_1']:.2f}; "
                f"{r['model_uri']}{' (champion)' if r['champion'] else ''}")
    if stage == "finetune":
        return (f"{r['steps']} steps on {r['base']}, held-out loss {r['heldout_loss_before']:.3f} -> "
                f"{r['heldout_loss']:.3f}; {r['adapter_uri']}{' (champion)' if r['champion'] else ''}")
    if stage == "pretrain-autoencoder":
        return (f"{r['steps']} steps, held-out PSNR {_num(r.get('heldout_psnr'), '.1f')} dB, scaling factor "
                f"{_num(r.get('scaling_factor'), '.3f')}; {r['model_uri']}{' (champion)' if r['champion'] else ''}")
    if stage == "encode":
        return f"{r['samples']} latents in {r['output']} (autoencoder {r['autoencoder']})"
    if stage == "pretrain-diffusion":
        return (f"{r['steps']} steps, loss {_num(r.get('loss'), '.3f')}, held-out FD-CLIP "
                f"{_num(r.get('heldout_fd_clip'), '.3f')}, CLIP score {_num(r.get('heldout_clip_score'), '.3f')}; "
                f"{r['model_uri']}{' (champion)' if r['champion'] else ''}")
    if stage == "eval":
        scores = ", ".join(f"{k} {v:.3f}" for k, v in r["scores"].items())
        gate = f"; gate: {r['gate']['message']}" if r.get("gate") else ""
        return f"{r['model_uri']} through {r['served_as']}: {scores}{gate}"
    if stage == "deploy":
        return f"{r['url']}/v1 serving {r['model']}: {r['prompt']!r} -> {r['answer']!r} ({r['ms']} ms)"
    return json.dumps(r)[:200]


def _num(value: float | None, spec: str) -> str:
    return "?" if value is None else format(value, spec)


def summary_table(outcomes: dict[str, dict[str, Any]], title: str = "end-to-end") -> Any:
    """A rich table of what each stage did: its state (Completed or Cached), runs, and its figures."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("stage", "state", "runs", "result"):
        table.add_column(col, overflow="fold")
    for name, o in outcomes.items():
        table.add_row(name, o["state"], "?" if o["runs"] is None else str(o["runs"]), _facts(name, o["result"]))
    return table
