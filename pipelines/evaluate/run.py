"""`pipelines eval`: lm-evaluation-harness against a registered language model, its scores in MLflow.

`evaluate(config)` is the stage's entry (the CLI and the flows call it):

1. the version: `models:/NAME@ALIAS` pinned to its number; a LoRA adapter is served on the base version it was
   trained on and asked for as `BASE:ADAPTER`;
2. the tasks, by name through the harness's `TaskManager`: the YAML files of configs/eval and `include_path`, and
   the harness's own tasks (indexed only when a name is not ours: that takes seconds);
3. the endpoint: `endpoint`, checked to serve that very version, or our serve stage's app started here
   (`serve_model`, not blocking) and stopped afterwards;
4. the harness's `local-completions` client against the endpoint's /v1/completions, `num_concurrent` requests at a
   time: log-likelihoods from `echo` with `logprobs` and `max_tokens` 1, generations greedy, token counts from the
   endpoint's /tokenize (`tokenizer_backend=remote`), the context from its `max_model_len`;
5. every score logged to the version's MLflow run as `eval/TASK/METRIC` (stderr as `eval/TASK/METRIC_stderr`), the
   results and each item's requests and responses as artifacts under `eval/`, the scores as tags of the version;
6. with a gate, an alias moved to the version only when the gate's metric passes its threshold.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from rich.console import Console
from rich.table import Table

from pipelines.errors import InfrastructureError, PipelineError
from pipelines.evaluate.config import EvalConfig, GateConfig
from pipelines.train.registry import BASE_MODEL_TAG, KIND_LABELS, configure_tracking, resolve_version, training_run


TASKS_DIR = Path(__file__).resolve().parents[2] / "configs" / "eval"
KEY_ENV = "OPENAI_API_KEY"  # what the harness's own OpenAI clients read
# The harness warns on every task with a `custom_dataset` (how configs/eval finds its files) that such a task takes
# arguments from --metadata: advice for its own command line, not ours.
logging.getLogger("lm_eval.api.task").addFilter(lambda record: "Custom kwargs can be passed" not in record.getMessage())
# It also advises `apply_chat_template` for any model whose name says "chat" or "instruct": an option of its own
# command line; our tasks (demo-qa) write their prompts in the format the model was fine-tuned on.
logging.getLogger("lm_eval.evaluator").addFilter(lambda record: "appears to be an" not in record.getMessage())


@dataclass(frozen=True)
class GateOutcome:
    """What the gate decided, and why, in `message`."""

    metric: str
    value: float
    threshold: float
    alias: str
    passed: bool
    moved: bool
    message: str


@dataclass
class EvalResult:
    """What `evaluate` did."""

    model_uri: str  # models:/NAME/VERSION: the version evaluated
    served_as: str  # the model the requests named: NAME, or BASE:ADAPTER for an adapter
    run_id: str  # the MLflow run the scores went to
    scores: dict[str, float]  # TASK/METRIC (and TASK/METRIC_stderr) -> value, logged as eval/TASK/METRIC
    artifacts: str  # where in that run's artifacts the results are (results.json, samples-TASK.jsonl)
    gate: GateOutcome | None
    harness: dict[str, Any]  # lm-evaluation-harness's own output; `samples`: every item's requests and responses


@dataclass(frozen=True)
class Target:
    """The version to evaluate and how the endpoint knows it."""

    name: str
    version: int
    run_id: str | None  # the run that registered it
    base: tuple[str, int] | None  # an adapter's base (name, version)

    @property
    def served_as(self) -> str:
        return f"{self.base[0]}:{self.name}" if self.base else self.name

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def evaluate(config: EvalConfig) -> EvalResult:
    """Run lm-evaluation-harness's tasks against the registered model of `config`, log the scores to the version's
    MLflow run and tag the version with them; with a gate, move its alias when the metric passes."""
    configure_tracking()
    target = find_target(config.model)
    tasks = load_tasks(config.tasks, config.include_path)
    if config.gate.metric is not None:
        task = config.gate.metric.split("/", 1)[0]
        if task not in tasks.names:
            raise PipelineError(f"gate metric {config.gate.metric}: task {task} is not among the tasks run "
                                f"({', '.join(sorted(tasks.names))})")
    with serving(target, config.endpoint) as (url, key):
        context = check_endpoint(url, key, target)
        harness = run_harness(config, url, key, target, context, tasks)
    scores = scores_of(harness)
    run_id, artifacts = record(target, config, harness, scores)
    outcome = apply_gate(config.gate, target, scores, harness) if config.gate.metric is not None else None
    if not config.quiet:
        Console().print(scores_table(target, harness, scores))
        print(f"scores logged to MLflow run {run_id} (eval/TASK/METRIC), results in its artifacts at {artifacts}")
    if outcome is not None:
        print(f"gate: {outcome.message}")
    return EvalResult(model_uri=target.uri, served_as=target.served_as, run_id=run_id, scores=scores,
                      artifacts=artifacts, gate=outcome, harness=harness)


# -- what is evaluated, on what --------------------------------------------------------------------
def find_target(uri: str) -> Target:
    """The registered version of `uri` (an adapter with its base); a PipelineError unless a language model."""
    client = MlflowClient()
    name, version = resolve_version(uri)
    mv = client.get_model_version(name, str(version))
    tags, base = mv.tags, None
    if tags.get(BASE_MODEL_TAG):
        base = resolve_version(tags[BASE_MODEL_TAG])
        tags = client.get_model_version(base[0], str(base[1])).tags
    kind = tags.get("pipelines.kind")
    if kind in KIND_LABELS:
        what = f"an adapter of {KIND_LABELS[kind]}" if base else KIND_LABELS[kind]
        raise PipelineError(f"{uri}: version {version} of {name} is {what}; lm-evaluation-harness evaluates "
                            "language models")
    return Target(name=name, version=version, run_id=mv.run_id or None, base=base)


@dataclass
class Tasks:
    """The tasks to run, as the harness takes them."""

    manager: Any  # lm_eval.tasks.TaskManager: configs/eval, include_path and perhaps the harness's own
    specs: list[Any]  # each named task or group, loaded (its data read); a tag's tasks
    names: set[str]  # every task and group among them, a group's and a tag's members included


def load_tasks(names: list[str], include_path: list[str]) -> Tasks:
    """The named tasks, groups and tags, found by the harness's TaskManager in configs/eval and `include_path`, or
    among the harness's own tasks (indexed only when a name is not found in ours: that takes seconds), and loaded.
    A PipelineError names an unknown task, or a task whose data cannot be read."""
    from lm_eval.tasks import TaskManager

    for folder in include_path:
        if not Path(folder).is_dir():
            raise PipelineError(f"include_path {folder}: no such folder")
    paths = [str(TASKS_DIR), *include_path]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if not set(names) <= set(manager.all_tasks):
        manager = TaskManager(include_path=paths)
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise PipelineError(f"unknown task {name!r}{hint}: not in configs/eval, include_path or "
                                "lm-evaluation-harness's own tasks")
    tasks = Tasks(manager, [], set())
    for name in names:
        try:
            loaded = manager.load([name])
        except Exception as e:  # the task's own YAML, code or data: what the user named, not our machinery
            raise PipelineError(f"task {name}: cannot load it ({type(e).__name__}: {_first_line(e)})") from None
        groups = loaded.get("groups", {})
        # A group or a task as itself (the harness reports a group's figures too); a tag stands for its tasks.
        if name in groups:
            tasks.specs.append(groups[name])
        elif name in loaded["tasks"]:
            tasks.specs.append(loaded["tasks"][name])
        else:
            tasks.specs.extend(loaded["tasks"].values())
        tasks.names |= set(loaded["tasks"]) | set(groups)
    return tasks


@contextlib.contextmanager
def serving(target: Target, endpoint: str | None) -> Iterator[tuple[str, str | None]]:
    """The endpoint's base URL and the API key to send it: `endpoint` with OPENAI_API_KEY, or the model served
    here by the serve stage (through Serve's proxy on a free port) until the block ends."""
    if endpoint:
        yield endpoint.rstrip("/"), os.environ.get(KEY_ENV) or None
        return
    import ray
    from ray import serve

    from pipelines.runtime import free_port, settings
    from pipelines.serve.app import serve_model
    from pipelines.serve.config import AccessConfig, ServeConfig

    if settings().ray_address:
        raise PipelineError(f"RAY_ADDRESS is set: serve {target.uri} on that cluster (`pipelines serve`) and give "
                            "its URL with --endpoint")
    running = list(serve.status().applications) if ray.is_initialized() else []
    if running:
        raise PipelineError(f"Ray Serve already runs here ({', '.join(running)}): give the URL of the endpoint "
                            f"serving {target.uri} with --endpoint")
    base = f"models:/{target.base[0]}/{target.base[1]}" if target.base else target.uri
    # Serve's proxy, not direct ingress: direct ingress fixes its ports when Ray starts, for every later server of
    # this process. Pinned versions: nothing to watch.
    config = ServeConfig(model=base, adapter=[target.uri] if target.base else [], port=free_port(),
                         ingress="proxy", watch_interval_s=0, blocking=False)
    keys = AccessConfig().resolve_keys()  # PIPELINES_API_KEYS, which the server would require
    # Serve's driver-side logger says at INFO that it started and connected: internals, not the evaluation's progress.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    try:
        url = serve_model(config)
        yield str(url), keys[0] if keys else None
    finally:
        if ray.is_initialized():
            serve.shutdown()


def check_endpoint(url: str, key: str | None, target: Target) -> int:
    """The model's context length at `url`, after checking that the endpoint answers, serves the target's very
    version (and an adapter's base) and that the harness's remote tokenizer (which names no model: the
    endpoint's first) is the target's."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        health = httpx.get(f"{url}/healthz", timeout=30)
    except httpx.HTTPError as e:
        raise PipelineError(f"endpoint {url} unreachable ({type(e).__name__}: {e})") from None
    if health.status_code != 200:
        raise PipelineError(f"endpoint {url}: /healthz answered {health.status_code}; not a `pipelines serve` endpoint")
    try:
        status = health.json()
        first = status["model"]
        versions = dict(status.get("models") or {first: status["version"]}) | status.get("adapters", {})
    except (ValueError, KeyError, TypeError):
        raise PipelineError(f"endpoint {url}: /healthz is not a `pipelines serve` endpoint's") from None
    wanted = [(target.name, target.version, target.uri)]
    if target.base:
        wanted.append((*target.base, f"the base {target.uri} was trained on"))
    for name, version, what in wanted:
        if versions.get(name) != version:
            now = f"version {versions[name]}" if name in versions else "no version"
            raise PipelineError(f"endpoint {url} serves {now} of {name}, not version {version} ({what})")
    try:
        r = httpx.post(f"{url}/tokenize", json={"model": target.served_as, "prompt": "a"}, headers=headers, timeout=30)
        if r.status_code == 401:
            raise PipelineError(f"endpoint {url} wants an API key: set {KEY_ENV}")
        if r.status_code != 200:
            raise PipelineError(f"endpoint {url}: /tokenize answered {r.status_code} ({r.text[:200]})")
        if target.served_as.partition(":")[0] != first:
            info = [httpx.get(f"{url}/tokenizer_info", params=p, headers=headers, timeout=30).json()
                    for p in ({}, {"model": target.served_as})]
            if info[0] != info[1]:
                raise PipelineError(f"endpoint {url}: lm-evaluation-harness tokenizes with the endpoint's first "
                                    f"model ({first}), whose tokenizer is not {target.served_as}'s: serve it first")
    except httpx.HTTPError as e:
        raise PipelineError(f"endpoint {url} unreachable ({type(e).__name__}: {e})") from None
    return int(r.json()["max_model_len"])


# -- the harness ---------------------------------------------------------------------------------------
def run_harness(config: EvalConfig, url: str, key: str | None, target: Target, context: int,
                tasks: Tasks) -> dict[str, Any]:
    """lm-evaluation-harness's `simple_evaluate` with its `local-completions` client against `url`; its output,
    every item's requests and responses included (`samples`), the key left out."""
    import aiohttp
    import lm_eval
    import requests
    from lm_eval.api.registry import get_model

    model_args: dict[str, Any] = {
        "base_url": f"{url}/v1/completions", "model": target.served_as, "tokenizer_backend": "remote",
        "num_concurrent": config.num_concurrent, "max_length": context}
    if key:
        model_args |= {"header": {"Authorization": f"Bearer {key}"}, "auth_token": key}
    lm = None
    try:
        with _progress_bars(not config.quiet):
            # the client made as `simple_evaluate(model="local-completions", ...)` makes it, kept to be closed
            lm = get_model("local-completions").create_from_arg_obj(
                model_args, {"batch_size": config.batch_size, "max_batch_size": None, "device": None})
            harness = lm_eval.simple_evaluate(
                model=lm, tasks=tasks.specs, task_manager=tasks.manager, batch_size=config.batch_size,
                limit=config.limit, num_fewshot=config.num_fewshot, log_samples=True)
    except (aiohttp.ClientError, requests.RequestException, TimeoutError) as e:  # after the harness's own retries
        raise InfrastructureError(f"lm-evaluation-harness's requests to {url} failed ({type(e).__name__}: "
                                  f"{_first_line(e)}); nothing was logged") from None
    finally:
        _close_remote_tokenizer(lm)
    harness["config"]["model"] = "local-completions"
    harness["config"]["model_args"] = {k: v for k, v in model_args.items() if k not in ("header", "auth_token")}
    return harness


def _close_remote_tokenizer(lm: Any) -> None:
    """Close the keep-alive connection of the harness's remote tokenizer (a `requests.Session` it never closes).

    Left open, the endpoint closes it when it stops, and the side that closes first keeps the port in TIME_WAIT
    for a minute: Serve's direct ingress binds without SO_REUSEADDR, so the next `make demo` within that minute
    could not serve on port 8000. Closed here, the wait is on this side's own ephemeral port."""
    session = getattr(getattr(lm, "tokenizer", None), "session", None)
    if session is not None:
        session.close()


def scores_of(harness: dict[str, Any]) -> dict[str, float]:
    """Every numeric result as TASK/METRIC (TASK/METRIC/FILTER for a filter other than `none`): the harness writes
    `acc,none` and `acc_stderr,none`; MLflow names have no commas."""
    scores = {}
    for task, results in harness["results"].items():
        for key, value in results.items():
            metric, sep, filter_name = key.partition(",")
            if not sep or isinstance(value, bool) or not isinstance(value, (int, float)):  # alias, N/A stderr
                continue
            name = f"{task}/{metric}" if filter_name == "none" else f"{task}/{metric}/{filter_name}"
            scores[re.sub(r"[^\w\-. :/]", "_", name)] = float(value)
    return scores


# -- the record: MLflow run, version tags, the gate ------------------------------------------------
def record(target: Target, config: EvalConfig, harness: dict[str, Any], scores: dict[str, float]) -> tuple[str, str]:
    """Log the scores and the results to the version's run (a new run of `config.experiment` when it has none)
    and tag the version with the scores (not their stderr); return the run and the artifacts' folder."""
    client = MlflowClient()
    run_id = target.run_id
    try:
        if run_id is not None and client.get_run(run_id).info.lifecycle_stage == "deleted":
            run_id = None
    except MlflowException:
        run_id = None
    if run_id is None:
        with training_run(config.experiment, f"eval-{target.name}-v{target.version}",
                          config.model_dump(mode="json")) as run_id:
            pass
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"eval/{name}", value, now, 0) for name, value in scores.items()])
    folder = f"eval/{time.strftime('%Y%m%dT%H%M%S')}-{config.digest()[:8]}"
    samples = harness.get("samples", {})
    results = json.loads(json.dumps({k: v for k, v in harness.items() if k != "samples"} |
                                    {"pipelines": config.model_dump(mode="json") | {"model_uri": target.uri}},
                                    default=str))
    client.log_dict(run_id, results, f"{folder}/results.json")
    for task, items in samples.items():
        client.log_text(run_id, "".join(json.dumps(item, default=str) + "\n" for item in items),
                        f"{folder}/samples-{task}.jsonl")
    for name, value in scores.items():
        if not name.split("/")[1].endswith("_stderr"):
            client.set_model_version_tag(target.name, str(target.version), f"eval/{name}", repr(value))
    return run_id, folder


def apply_gate(gate: GateConfig, target: Target, scores: dict[str, float], harness: dict[str, Any]) -> GateOutcome:
    """Move `gate.alias` to the version when the gate's metric reaches the threshold (at least it when higher is
    better, as the harness says of the metric; at most it otherwise); say why it moved or not."""
    assert gate.metric is not None and gate.threshold is not None
    if gate.metric not in scores:
        task = gate.metric.split("/", 1)[0]
        have = ", ".join(name for name in scores if name.startswith(f"{task}/") and "_stderr" not in name)
        raise PipelineError(f"gate metric {gate.metric}: no such score (the task has {have or 'none'}); the scores "
                            "are logged, no alias moved")
    value = scores[gate.metric]
    task, metric = gate.metric.split("/")[:2]
    higher = harness.get("higher_is_better", {}).get(task, {}).get(metric, True)
    passed = value >= gate.threshold if higher else value <= gate.threshold
    client = MlflowClient()
    current = client.get_registered_model(target.name).aliases.get(gate.alias)
    current = None if current is None else int(current)  # a string or a number, by MLflow's version
    sign = (">=" if higher else "<=") if passed else ("<" if higher else ">")
    verdict = (f"{gate.metric} = {value:g} {sign} {gate.threshold:g} "
               f"({'higher' if higher else 'lower'} is better)")
    moved = False
    if not passed:
        where = f"stays on version {current}" if current is not None else "is on no version"
        message = f"{verdict}: {gate.alias} not moved, it {where}"
    elif current == target.version:
        message = f"{verdict}: {gate.alias} already on version {target.version}"
    else:
        client.set_registered_model_alias(target.name, gate.alias, str(target.version))
        moved = True
        was = f" (was version {current})" if current is not None else ""
        message = f"{verdict}: {gate.alias} moved to {target.name} version {target.version}{was}"
    return GateOutcome(metric=gate.metric, value=value, threshold=gate.threshold, alias=gate.alias, passed=passed,
                       moved=moved, message=message)


def scores_table(target: Target, harness: dict[str, Any], scores: dict[str, float]) -> Table:
    """Task, items, metric, value and standard error, one row per score (values as the harness gives them: a
    fraction, not a percentage, for accuracy and exact match)."""
    base = f" on models:/{target.base[0]}/{target.base[1]}" if target.base else ""
    table = Table(title=f"{target.uri}{base}")
    for column in ("task", "items", "metric", "value", "stderr"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    counts = harness.get("n-samples", {})
    for name, value in scores.items():
        task, metric = name.split("/", 1)
        if metric.split("/")[0].endswith("_stderr"):
            continue
        stderr_name = "/".join([task, metric.split("/")[0] + "_stderr", *metric.split("/")[1:]])
        stderr = scores.get(stderr_name)
        items = counts.get(task, {}).get("effective")
        table.add_row(task, "" if items is None else str(items), metric, _figure(value),
                      "" if stderr is None else _figure(stderr))
    return table


# -- helpers ---------------------------------------------------------------------------------------
def _figure(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else str(value)


class _WithoutBars(io.TextIOBase):
    """A stream that passes what is written on to `target` except tqdm's progress bars (writes that start with a
    carriage return, as every refresh of a bar does, and the bar's closing newline)."""

    def __init__(self, target: Any):
        self.target, self._in_bar = target, False

    def write(self, text: str) -> int:
        if text.startswith("\r"):
            self._in_bar = True
        elif self._in_bar and text == "\n":
            self._in_bar = False
        else:
            self._in_bar = False
            self.target.write(text)
        return len(text)

    def flush(self) -> None:
        self.target.flush()


@contextlib.contextmanager
def _progress_bars(shown: bool) -> Iterator[None]:
    """The harness's tqdm bars shown or not. Not with TQDM_DISABLE: tqdm reads it when it is imported, and the
    harness passes `disable=False` to some bars; the bars write to sys.stderr when they start, so a stream that
    drops them stands in for it meanwhile (warnings and everything else still reach stderr)."""
    if shown:
        yield
        return
    with contextlib.redirect_stderr(_WithoutBars(sys.stderr)):
        yield


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
