"""The settings of `pipelines eval` (the run is `pipelines.evaluate.run`). Kept apart from the run, which imports
lm-evaluation-harness, MLflow and Ray, so that the CLI builds its options and answers `--help` without them."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, model_validator

from pipelines.config import ConfigModel

SHIPPED_TASKS = ["demo-cloze", "demo-qa"]  # configs/eval


class GateConfig(ConfigModel):
    """Move an alias to the evaluated version only when one metric passes a threshold."""

    metric: str | None = Field(None, description=(
        "The metric that decides, TASK/METRIC as the results table names it (its task and metric columns: "
        "demo-qa/exact_match); unset: no gate."))
    threshold: float | None = Field(None, description=(
        "The value the metric must reach: at least this for a metric where higher is better, at most this for one "
        "where lower is (lm-evaluation-harness says which)."))
    alias: str = Field("champion", description="The alias moved to the evaluated version when the metric passes.")

    @model_validator(mode="after")
    def _both_or_neither(self) -> GateConfig:
        if (self.metric is None) != (self.threshold is None):
            raise ValueError("a gate needs both metric and threshold")
        if self.metric is not None and "/" not in self.metric:
            raise ValueError(f"gate metric {self.metric!r}: expected TASK/METRIC, e.g. demo-qa/exact_match")
        return self


class EvalConfig(ConfigModel):
    """`pipelines eval`: lm-evaluation-harness against a registered language model (or LoRA adapter), through our
    OpenAI-compatible endpoint."""

    model: str = Field(description=(
        "The registered model to evaluate: models:/NAME@ALIAS or models:/NAME/VERSION, a language model or a LoRA "
        "adapter (served on the base it was trained on)."))
    tasks: list[str] = Field(default_factory=lambda: list(SHIPPED_TASKS), description=(
        "lm-evaluation-harness tasks, groups or tags: the ones in configs/eval (demo-cloze, demo-qa; the tag demo is "
        "both), those of --include-path, or any of the harness's own whose data is at hand (hellaswag, ...)."))
    limit: int | None = Field(None, gt=0, description="Items per task (default: all of them).")
    num_fewshot: int | None = Field(None, ge=0, description=(
        "Examples shown before each item (default: each task's own, else none)."))
    include_path: list[str] = Field(default_factory=list, description=(
        "More folders of task YAML files, besides configs/eval."))
    endpoint: str | None = Field(None, description=(
        "Base URL of a running `pipelines serve` that serves the model (http://HOST:PORT; a key, if it needs one, "
        "from OPENAI_API_KEY). Default: serve the model here for the evaluation, then stop."))
    num_concurrent: int = Field(4, ge=1, description="Requests in flight at once.")
    batch_size: int = Field(1, ge=1, description="Prompts per request.")
    gate: GateConfig = GateConfig()
    experiment: str = Field("eval", description=(
        "MLflow experiment of the run the scores go to when the version has no run of its own (else: its run, the "
        "one that registered it)."))
    quiet: bool = Field(False, description="No progress bars or results table.")

    # How the requests are sent does not change the scores (see ConfigModel.digest).
    run_options: ClassVar[dict[str, Any]] = {"endpoint": True, "num_concurrent": True, "batch_size": True,
                                             "quiet": True}

    @model_validator(mode="after")
    def _checks(self) -> EvalConfig:
        if not self.model.startswith("models:/"):
            raise ValueError(f"{self.model!r} is not a registered model URI (models:/NAME@ALIAS or "
                             "models:/NAME/VERSION)")
        if not self.tasks:
            raise ValueError("no tasks to run")
        if self.endpoint is not None and not self.endpoint.startswith(("http://", "https://")):
            raise ValueError(f"endpoint {self.endpoint!r}: expected http://HOST:PORT")
        return self
