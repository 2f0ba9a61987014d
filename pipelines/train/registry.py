"""MLflow for training: one run per training job, lineage back to the shards, registered models.

- `training_run` opens (or resumes) the job's run and logs its whole resolved config as params.
- `log_shards_input` records the shards the job read as the run's input dataset (digest, source,
  a small profile) and keeps their manifest with the run.
- `register_model` logs the exported Hugging Face folder with MLflow's transformers flavor, registers
  it as a new version, points alias `candidate` at it and moves `champion` only when it is better.
- `load_registered` loads `models:/NAME@ALIAS` or `models:/NAME/VERSION` back as model + tokenizer.

Where MLflow lives is `pipelines.runtime.settings().mlflow_tracking_uri`: a SQLite file under
`PIPELINES_HOME` by default (artifacts beside it, in `mlartifacts/`), any MLflow server by
`MLFLOW_TRACKING_URI`. Nothing here reaches the Hugging Face hub: models are read from local folders.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow import MlflowClient
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

from pipelines import __version__
from pipelines.errors import PipelineError
from pipelines.runtime import filesystem, settings
from pipelines.shards import absolute

if TYPE_CHECKING:
    from mlflow.models.model import ModelInfo
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
CHAMPION = "champion"
ADAPTER_PATH = "adapter"  # where an adapter folder goes in its run's artifacts
CLIP_PATH = "clip"  # where a CLIP model folder goes in its run's artifacts
BASE_MODEL_TAG = "base_model"  # an adapter version's tag: models:/BASE/VERSION it was trained on
# MLflow 3 refuses longer param values (the client already splits batches at its 100-item limit).
PARAM_VALUE_LIMIT = 6000
TAG_VALUE_LIMIT = 8000
DATASET_DIGEST_LIMIT = 36
_TRUNCATED = "...[truncated]"
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
# Requirements of the logged model, given rather than left to MLflow: its default list adds
# torchvision (logging fails where it is not installed) and its inference loads the model again.
_MODEL_REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors")


# -- tracking ------------------------------------------------------------------------------------
def configure_tracking() -> str:
    """Point MLflow at the configured tracking URI (creating a SQLite file's folder); return the URI.

    Ray workers are other processes: give them this URI (as `MLFLOW_TRACKING_URI`) so a relative
    `PIPELINES_HOME` cannot resolve to another folder there.
    """
    uri = settings().mlflow_tracking_uri
    # MLflow draws a progress bar for every download of a model's files (a few small files here): lines in the
    # console and the Prefect logs that are not the user's progress. A user who sets it keeps theirs.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    db = _sqlite_file(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return uri


@contextmanager
def training_run(experiment: str, run_name: str | None, params: Mapping[str, Any],
                 tags: Mapping[str, Any] | None = None, run_id: str | None = None) -> Iterator[str]:
    """Run the body inside one MLflow run of `experiment` (or inside `run_id`, resumed); yield its id.

    `params` is the full resolved config: nested dicts become dotted keys, values strings (cut to
    MLflow's limit; the untruncated config is kept as the artifact `config/config.json`). A resumed
    run keeps the params it was started with (MLflow params cannot change): new keys are added,
    changed values are logged as a warning and kept in `config/resumed-<time>.json`.
    A body that raises ends the run FAILED, as MLflow's own run context does.
    """
    configure_tracking()
    flat = flatten_params(params)
    run_tags = {"pipelines.version": __version__, **{k: str(v) for k, v in (tags or {}).items()}}
    if run_id is None:
        active = mlflow.start_run(experiment_id=_experiment_id(experiment), run_name=run_name, tags=run_tags)
    else:
        try:
            active = mlflow.start_run(run_id=run_id)
        except MlflowException as e:
            raise PipelineError(f"MLflow run {run_id}: cannot resume it ({_first_line(e)})") from None
    resumed = run_id is not None
    with active:
        config_artifact = "config/config.json"
        if resumed:
            mlflow.set_tags(run_tags)
            changed = sorted(k for k, v in flat.items() if k in active.data.params and active.data.params[k] != v)
            if changed:
                log.warning("run %s resumed with other values for %s: its params keep the first ones",
                            run_id, ", ".join(changed))
            flat = {k: v for k, v in flat.items() if k not in active.data.params}
            config_artifact = f"config/resumed-{time.strftime('%Y%m%dT%H%M%S')}.json"
        mlflow.log_params(flat)
        mlflow.log_dict(json.loads(json.dumps(dict(params), default=str)), config_artifact)
        yield active.info.run_id


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings as dotted keys, every value a string no longer than MLflow accepts."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = _truncate(_param_text(value), PARAM_VALUE_LIMIT)
    return flat


def log_metrics(metrics: Mapping[str, float], step: int, run_id: str | None = None) -> None:
    """Log `metrics` at `step` to `run_id`, else the active run, else the run in `MLFLOW_RUN_ID`.

    Never starts a run (MLflow's `log_metrics` would, outside a run): a Ray worker (rank 0) logs
    into the driver's run by its id without changing the run's status.
    """
    run_id = run_id or ((run := mlflow.active_run()) and run.info.run_id) or os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        raise RuntimeError("log_metrics: no run (pass run_id, log inside training_run, or set MLFLOW_RUN_ID)")
    now = int(time.time() * 1000)
    MlflowClient(settings().mlflow_tracking_uri).log_batch(
        run_id, metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()])


# -- lineage -------------------------------------------------------------------------------------
def log_shards_input(shards_url: str, manifest: Mapping[str, Any], context: str = "training") -> None:
    """Record the shards as an input dataset of the active run, with their manifest as an artifact.

    The dataset's digest is the manifest's `digest` (cut to MLflow's 36 characters; the profile and
    the run tag `lineage.<context>.digest` hold it whole), its name the shards folder's, its source
    the shards URL; its profile counts samples and shards. The manifest is kept as
    `lineage/<context>/manifest.json`.
    """
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_shards_input: no active MLflow run (call it inside training_run)")
    if not isinstance(manifest.get("digest"), str) or not isinstance(manifest.get("shards"), list):
        raise PipelineError(f"{shards_url}: not a shard manifest (no `digest` or `shards` list)")
    source = _dataset_source(shards_url)
    name = absolute(shards_url).rstrip("/").rsplit("/", 1)[-1] or "shards"
    digest = manifest["digest"]
    profile = {
        "digest": digest,
        "samples": manifest.get("samples"),
        "shards": len(manifest["shards"]),
        "kind": manifest.get("kind", "text"),
        "format": manifest.get("format"),
        "created": manifest.get("created"),
    }
    columns = [ColSpec(DataType.string, "key"), ColSpec(DataType.string, "text")]
    if profile["kind"] == "images":
        columns.append(ColSpec(DataType.binary, "image"))
    dataset = ShardsDataset(source, name=name, digest=digest[:DATASET_DIGEST_LIMIT], schema=Schema(columns),
                            profile={k: v for k, v in profile.items() if v is not None})
    mlflow.log_input(dataset, context=context)
    mlflow.set_tags({f"lineage.{context}.digest": digest, f"lineage.{context}.url": absolute(shards_url)})
    mlflow.log_dict(dict(manifest), f"lineage/{context}/manifest.json")


class ShardsDataset(MetaDataset):
    """A shard set as MLflow sees it: metadata only (the shards stay where they are), with a profile."""

    def __init__(self, source: DatasetSource, name: str, digest: str, schema: Schema, profile: dict[str, Any]):
        self._profile = profile
        super().__init__(source=source, name=name, digest=digest, schema=schema)

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


class FsspecDatasetSource(DatasetSource):
    """Shards at an fsspec URL that MLflow has no source type for (`memory://`, `abfs://`, ...)."""

    def __init__(self, url: str):
        self.url = url

    @staticmethod
    def _get_source_type() -> str:
        return "fsspec"

    def load(self, dst_path: str | None = None) -> str:
        fs, path = filesystem(self.url)
        dst = dst_path or os.path.abspath(path.rstrip("/").rsplit("/", 1)[-1])
        fs.get(path, dst, recursive=True)
        return dst

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False  # only ever chosen explicitly, when no MLflow source type fits

    @classmethod
    def _resolve(cls, raw_source: Any) -> FsspecDatasetSource:
        return cls(str(raw_source))

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url}

    @classmethod
    def from_dict(cls, source_dict: dict[str, Any]) -> FsspecDatasetSource:
        return cls(source_dict["url"])


def _dataset_source(shards_url: str) -> DatasetSource:
    uri = absolute(shards_url)
    try:
        with warnings.catch_warnings():
            # MLflow registers two equivalent resolvers for local paths and warns about the tie.
            warnings.simplefilter("ignore", UserWarning)
            return resolve_dataset_source(uri)
    except MlflowException:
        return FsspecDatasetSource(uri)


# -- registry ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Registered:
    """What `register_model` did."""

    name: str
    version: int
    uri: str  # models:/NAME/VERSION
    champion: bool  # whether alias `champion` now points at this version
    previous_champion: int | None
    previous_metric: float | None  # the previous champion's value of the metric, when it had one


def register_model(model_dir: str, name: str, *, run_id: str, metric: str, value: float,
                   lower_is_better: bool = True, lineage: Mapping[str, Any] | None = None,
                   extra_tags: Mapping[str, Any] | None = None) -> Registered:
    """Log the Hugging Face folder `model_dir` to `run_id`, register it as a new version of `name`.

    The version gets alias `candidate`, the tags `{metric: value}`, `lineage.*` (from `lineage`,
    e.g. the shards digest and URL) and `extra_tags`. Alias `champion` moves to it only when `value`
    is better than the champion's (its version tag, else its run's metric) or there is no champion;
    a champion without a value for `metric`, or a tie, keeps the alias.

    The model is logged with MLflow's transformers flavor (task text-generation), so
    `mlflow.transformers.load_model("models:/NAME@candidate")` gives a generation pipeline and
    `mlflow.pyfunc.load_model(...).predict(["prompt"], params={"max_new_tokens": 20})` text.
    """
    configure_tracking()
    client = MlflowClient()
    folder = Path(model_dir).absolute()  # never a valid hub repo id: nothing asks the hub about it
    if not (folder / "config.json").is_file():
        raise PipelineError(f"{model_dir}: not a Hugging Face model folder (no config.json)")
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise PipelineError(f"MLflow run {run_id}: {_first_line(e)}") from None
    value = float(value)
    if metric not in run.data.metrics:
        client.log_metric(run_id, metric, value)

    info = _log_transformers_model(folder, name, run, card=_model_card(folder, name, run_id, metric, value, lineage))
    return _register_version(client, info.model_uri, name, metric, value, lower_is_better, lineage, extra_tags)


def _log_folder(client: MlflowClient, run_id: str, folder: Path, path: str, name: str) -> str:
    """Log `folder` under the run's artifacts at `path`, make sure registered model `name` exists, and
    return the artifacts' location as a version source. Plain artifacts, not an MLflow model: MLflow 3's
    register_model wants a logged model for a runs:/ URI, so versions are created from the location itself."""
    try:
        client.get_run(run_id)
    except MlflowException as e:
        raise PipelineError(f"MLflow run {run_id}: {_first_line(e)}") from None
    client.log_artifacts(run_id, str(folder), path)
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name)
        except MlflowException:  # created meanwhile
            pass
    return f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{path}"


def register_adapter(adapter_dir: str, name: str, *, run_id: str, base_uri: str, metric: str, value: float,
                     lower_is_better: bool = True, lineage: Mapping[str, Any] | None = None) -> Registered:
    """Register a peft adapter folder (adapter_config.json + adapter_model.safetensors) as a new
    version of its own model `name`, its tag `base_model` pinning the exact base version
    (`models:/BASE/VERSION`); aliases as in `register_model`. `load_adapter` gets it back."""
    configure_tracking()
    client = MlflowClient()
    folder = Path(adapter_dir).absolute()
    if not (folder / "adapter_config.json").is_file():
        raise PipelineError(f"{adapter_dir}: not a peft adapter folder (no adapter_config.json)")
    source = _log_folder(client, run_id, folder, ADAPTER_PATH, name)
    return _register_version(client, source, name, metric, float(value), lower_is_better, lineage,
                             {BASE_MODEL_TAG: base_uri, "pipelines.kind": "lora-adapter"}, run_id=run_id)


def load_adapter(uri: str, dst: str | None = None) -> tuple[str, str]:
    """The local folder of adapter `models:/NAME@ALIAS` (or `/VERSION`) and the base it was trained on."""
    configure_tracking()
    name, version = resolve_version(uri)
    mv = MlflowClient().get_model_version(name, str(version))
    base = mv.tags.get(BASE_MODEL_TAG)
    if not base:
        raise PipelineError(f"{uri}: version {version} of {name} is not a LoRA adapter (no {BASE_MODEL_TAG} tag)")
    try:
        folder = mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=dst)
    except MlflowException as e:
        raise PipelineError(f"{uri}: cannot download version {version} of {name} ({_first_line(e)})") from None
    return folder, base


# Model kinds registered as plain folders (not MLflow transformers models): for each, the files that make a
# folder of that kind, and where it goes in its run's artifacts. `pipelines.kind` tags the version.
FOLDER_KINDS: dict[str, tuple[tuple[str, ...], str]] = {
    "clip": (("config.json", "preprocessor_config.json"), CLIP_PATH),
    # diffusers' AutoencoderKL.save_pretrained
    "autoencoder": (("config.json", "diffusion_pytorch_model.safetensors"), "autoencoder"),
    # a diffusers pipeline folder: DiffusionPipeline.from_pretrained loads it
    "diffusion": (("model_index.json",), "diffusion"),
}
KIND_LABELS = {"clip": "a CLIP model", "autoencoder": "an autoencoder", "diffusion": "a diffusion model"}


def register_folder(kind: str, model_dir: str, name: str, *, run_id: str, metric: str, value: float,
                    lower_is_better: bool, lineage: Mapping[str, Any] | None = None,
                    extra_tags: Mapping[str, Any] | None = None) -> Registered:
    """Register the `kind` folder `model_dir` (see FOLDER_KINDS) as a new version of `name`, tagged
    `pipelines.kind=KIND`; aliases as in `register_model`. `registered_folder` gets it back."""
    configure_tracking()
    client = MlflowClient()
    folder = Path(model_dir).absolute()
    files, path = FOLDER_KINDS[kind]
    if not all((folder / f).is_file() for f in files):
        raise PipelineError(f"{model_dir}: not {KIND_LABELS[kind]} folder (needs {', '.join(files)})")
    source = _log_folder(client, run_id, folder, path, name)
    return _register_version(client, source, name, metric, float(value), lower_is_better, lineage,
                             {"pipelines.kind": kind, **(extra_tags or {})}, run_id=run_id)


def registered_folder(kind: str, uri: str, dst: str | None = None) -> str:
    """The local folder of the `kind` model `models:/NAME@ALIAS` (or `/VERSION`)."""
    configure_tracking()
    name, version = resolve_version(uri)
    mv = MlflowClient().get_model_version(name, str(version))
    if mv.tags.get("pipelines.kind") != kind:
        found = KIND_LABELS.get(mv.tags.get("pipelines.kind", ""), "a language model")
        raise PipelineError(f"{uri}: version {version} of {name} is {found}, not {KIND_LABELS[kind]}")
    try:
        return mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=dst)
    except MlflowException as e:
        raise PipelineError(f"{uri}: cannot download version {version} of {name} ({_first_line(e)})") from None


def register_clip(model_dir: str, name: str, *, run_id: str, metric: str, value: float,
                  lower_is_better: bool = False, lineage: Mapping[str, Any] | None = None) -> Registered:
    """Register a CLIP folder (`ClipBundle.save`: model, tokenizer, image processor); by default a higher
    `metric`, e.g. held-out recall@1, is better. `clip_folder` gets it back."""
    return register_folder("clip", model_dir, name, run_id=run_id, metric=metric, value=value,
                           lower_is_better=lower_is_better, lineage=lineage)


def clip_folder(uri: str, dst: str | None = None) -> str:
    """The local folder of the CLIP model `models:/NAME@ALIAS` (or `/VERSION`)."""
    return registered_folder("clip", uri, dst)


def _register_version(client: MlflowClient, source: str, name: str, metric: str, value: float,
                      lower_is_better: bool, lineage: Mapping[str, Any] | None,
                      extra_tags: Mapping[str, Any] | None, run_id: str | None = None) -> Registered:
    """A new version of `name` from `source` (a logged model's URI; with `run_id`, an artifact
    location): alias candidate, and champion when `value` beats the champion's."""
    tags = {metric: repr(value), **_prefixed("lineage", lineage), **{k: str(v) for k, v in (extra_tags or {}).items()}}
    tags = {k: _truncate(v, TAG_VALUE_LIMIT) for k, v in tags.items()}
    if run_id is None:
        mv = mlflow.register_model(source, name, tags=tags)
    else:
        mv = client.create_model_version(name, source, run_id=run_id, tags=tags)
    version = int(mv.version)
    client.set_registered_model_alias(name, CANDIDATE, str(version))

    previous = client.get_registered_model(name).aliases.get(CHAMPION)
    previous_champion = int(previous) if previous is not None else None
    previous_metric = _version_metric(client, name, previous, metric) if previous is not None else None
    if not math.isfinite(value):
        promote = False
    elif previous_champion is None:
        promote = True
    elif previous_metric is None:
        log.warning("%s: champion v%s has no %s; it stays champion", name, previous, metric)
        promote = False
    else:
        promote = value < previous_metric if lower_is_better else value > previous_metric
    if promote:
        client.set_registered_model_alias(name, CHAMPION, str(version))
    return Registered(name=name, version=version, uri=f"models:/{name}/{version}", champion=promote,
                      previous_champion=previous_champion, previous_metric=previous_metric)


def load_registered(uri: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer of `models:/NAME@ALIAS` or `models:/NAME/VERSION`."""
    configure_tracking()
    name, version = resolve_version(uri)
    try:
        components = mlflow.transformers.load_model(f"models:/{name}/{version}", return_type="components")
    except MlflowException as e:  # e.g. its artifacts were deleted
        raise PipelineError(f"{uri}: cannot load version {version} of {name} ({_first_line(e)})") from None
    return components["model"], components["tokenizer"]


def resolve_version(uri: str) -> tuple[str, int]:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` as (name, version); PipelineError if none."""
    match = _MODELS_URI.match(uri)
    if match is None:
        raise PipelineError(f"{uri}: not a registered model URI (models:/NAME@ALIAS or models:/NAME/VERSION)")
    name, alias = match["name"], match["alias"]
    client = MlflowClient()
    try:
        if alias:
            mv = client.get_model_version_by_alias(name, alias)
        else:
            mv = client.get_model_version(name, match["version"])
    except MlflowException as e:
        raise PipelineError(f"{uri}: no such registered model version ({_first_line(e)})") from None
    return name, int(mv.version)


def _log_transformers_model(folder: Path, name: str, run: Any, card: Any) -> ModelInfo:
    """Log the folder as a transformers-flavor model of the run (in the run's experiment)."""
    import transformers

    # MLflow's own path-to-checkpoint mode would avoid loading the weights, but it breaks on
    # transformers 5 (it reads the pipeline class from `check_task`, now a string); a component
    # dict works, and the weights are written back exactly as loaded.
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    # Created here so that the model lands in the run's experiment even when the run is not the
    # active one (registration after the training run has ended, or in another process).
    logged = mlflow.initialize_logged_model(name=name, source_run_id=run.info.run_id,
                                            experiment_id=run.info.experiment_id, model_type="causal-lm")
    signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.string)]),
        outputs=Schema([ColSpec(DataType.string)]),
        params=ParamSchema([ParamSpec("max_new_tokens", DataType.long, 64),
                            ParamSpec("do_sample", DataType.boolean, False),
                            ParamSpec("temperature", DataType.double, 1.0),
                            ParamSpec("top_p", DataType.double, 1.0)]))
    return mlflow.transformers.log_model(
        {"model": model, "tokenizer": tokenizer}, name=name, task="text-generation",
        model_id=logged.model_id, run_id=run.info.run_id, signature=signature, model_card=card,
        pip_requirements=_pinned(_MODEL_REQUIREMENTS))


def _model_card(folder: Path, name: str, run_id: str, metric: str, value: float,
                lineage: Mapping[str, Any] | None) -> Any:
    """The folder's README.md as the model card, else a short one; MLflow would ask the hub for one."""
    from huggingface_hub import ModelCard

    readme = folder / "README.md"
    if readme.is_file():
        return ModelCard.load(readme)
    lines = [f"# {name}", "", f"Causal language model trained by MLflow run `{run_id}`.", "",
             f"- {metric}: {value:g}"]
    lines += [f"- {key}: {val}" for key, val in _prefixed("lineage", lineage).items()]
    return ModelCard("---\nlibrary_name: transformers\npipeline_tag: text-generation\n---\n" + "\n".join(lines) + "\n")


def _version_metric(client: MlflowClient, name: str, version: str, metric: str) -> float | None:
    """A version's value of `metric`: its tag, else its run's metric, else None."""
    mv = client.get_model_version(name, version)
    if metric in mv.tags:
        try:
            return float(mv.tags[metric])
        except ValueError:
            pass
    if mv.run_id:
        try:
            return client.get_run(mv.run_id).data.metrics.get(metric)
        except MlflowException:
            return None
    return None


# -- helpers -------------------------------------------------------------------------------------
def _experiment_id(name: str) -> str:
    """The experiment's id, creating it (artifacts beside a SQLite store, not in the cwd) if needed."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(name))
        except MlflowException:  # created meanwhile by another process
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise PipelineError(f"MLflow experiment {name!r} is deleted: restore it or use another name")
    return experiment.experiment_id


def _artifact_location(experiment: str) -> str | None:
    """`<folder of the SQLite file>/mlartifacts/<experiment>`; None (the server decides) otherwise."""
    db = _sqlite_file(mlflow.get_tracking_uri())
    if db is None:
        return None
    return (db.parent / "mlartifacts" / re.sub(r"[^\w.-]+", "_", experiment)).as_uri()


def _sqlite_file(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path).absolute() if path and path != ":memory:" else None


def _param_text(value: Any) -> str:
    if isinstance(value, (list, tuple, Mapping)):
        return json.dumps(value, default=str)
    return str(value)


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(_TRUNCATED)] + _TRUNCATED


def _prefixed(prefix: str, values: Mapping[str, Any] | None) -> dict[str, str]:
    return {f"{prefix}.{k}": v for k, v in flatten_params(values or {}).items()}


def _pinned(packages: tuple[str, ...]) -> list[str]:
    pins = []
    for package in packages:
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")  # no local versions (+cpu)
        except PackageNotFoundError:
            pins.append(package)
    return pins


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
