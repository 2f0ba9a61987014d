"""`pipelines`: one command with a subcommand per stage.

A command's options come from its config class, which lives in a light module (pydantic only); the stage itself
(Ray, torch, MLflow, ...) is imported when the command runs. So `--help` and `version` answer at once.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

from pipelines import __version__
from pipelines.config import config_command, one_line_errors
from pipelines.curate.config import CurateConfig
from pipelines.errors import PipelineError
from pipelines.evaluate.config import EvalConfig
from pipelines.ingest.config import ImageCrawlConfig, TextCrawlConfig
from pipelines.runtime import wide_when_piped
from pipelines.serve.config import ServeConfig
from pipelines.train.autoencoder_config import AutoencoderPretrainConfig
from pipelines.train.clip_config import ClipPretrainConfig
from pipelines.train.config import PretrainConfig
from pipelines.train.diffusion_config import DiffusionPretrainConfig
from pipelines.train.encode_config import EncodeConfig
from pipelines.train.finetune_config import FinetuneConfig


class _UserHelp:
    """Help for people: a docstring's paragraphs flow to the terminal's width (its line breaks are the source's),
    and a flag shows no `<bool>` type (it takes no value)."""

    help: str | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.help:
            paragraphs = inspect.cleandoc(self.help).split("\n\n")
            self.help = "\n\n".join(" ".join(p.split()) for p in paragraphs)

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False):
                param.metavar = ""
        return params


class Command(_UserHelp, TyperCommand):
    """A command of `pipelines`, its help as `_UserHelp` shows it."""


class Group(_UserHelp, TyperGroup):
    """A group of commands (`pipelines`, `pipelines crawl`), its help as `_UserHelp` shows it."""


if wide_when_piped():
    # ... but help and usage errors are prose in panels that rich would stretch to that width: give them a
    # reader's width instead (TERMINAL_WIDTH, typer's own setting, wins when the user set it).
    import typer.rich_utils

    typer.rich_utils.MAX_WIDTH = typer.rich_utils.MAX_WIDTH or 100
app = typer.Typer(cls=Group, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="From raw web data to a served generative model. `pipelines COMMAND --help` shows a "
                       "command's options; each can also be set in a YAML file given with --config.")
crawl_app = typer.Typer(cls=Group, no_args_is_help=True, help="Crawl URL lists and corpora into WebDataset shards.")
app.add_typer(crawl_app, name="crawl")


def exit_nonzero_on_failure(result: Any) -> None:
    """Exit code 1 when a job finished with failed shards (user mistakes exit 2 in `config_command`)."""
    if result is not None and not getattr(result, "ok", True):
        raise typer.Exit(1)


def crawl_done(result: Any) -> None:
    """End a crawl command: all its output is published, so the interpreter's exit need not look for garbage
    among the objects the crawl made (Ray's, pyarrow's, pydantic's), which took 0.2 s of a 5 s crawl. At exit
    they are frozen (`gc.freeze`): still freed when their last reference goes, only no longer searched for
    cycles. At exit only, so that a process the command runs in (a test's, through typer's runner) goes on
    collecting as usual."""
    import atexit
    import gc

    atexit.register(gc.freeze)  # runs before the local Ray's stop, registered earlier
    exit_nonzero_on_failure(result)


# -- the stages: thin wrappers that import the stage when it runs; their docstrings are the commands' help -----

def crawl_images(config: ImageCrawlConfig) -> None:
    """Download the images of a URL list into WebDataset shards.

    The list (jsonl, csv, tsv, parquet or txt) names each image's URL and caption. Images are fetched politely
    (robots.txt, X-Robots-Tag opt-outs, no private addresses), resized, and written as tar shards with a parquet
    file of per-row metadata and a manifest. A rerun resumes where the last one stopped. Exits 1 when shards
    failed."""
    from pipelines.ingest.images import crawl_images as run

    crawl_done(run(config))


def crawl_text(config: TextCrawlConfig) -> None:
    """Turn a text corpus, or the web pages of a URL list, into WebDataset shards.

    With --source files the documents are read from the input (jsonl, csv, tsv, parquet, or txt with one document
    per line); with --source urls each page is fetched (robots.txt and opt-outs obeyed) and its main text, title,
    language and date are extracted. A rerun resumes where the last one stopped. Exits 1 when shards failed."""
    from pipelines.ingest.text import crawl_text as run

    crawl_done(run(config))


def curate(config: CurateConfig) -> None:
    """Filter and deduplicate crawled shards into curated shards.

    The steps (filters, scorers, near-duplicate removal) are listed in the YAML file given with --config. Scores
    are cached, so a rerun with another threshold recomputes only what the threshold decides. Writes the kept
    rows as shards, removed.parquet with the reason each removed row went, and report.html. Exits 1 when shards
    failed, or when corrupt input shards were skipped (unless --allow-skipped-shards)."""
    from pipelines.curate.run import curate as run

    exit_nonzero_on_failure(run(config))


def encode(config: EncodeConfig) -> None:
    """Encode image shards into latent shards with an autoencoder, for training a diffusion model.

    Each image is encoded once: its latent and caption are stored (with --clip also the states of the caption
    in that CLIP's text tower), so training does not encode every image at every step. A rerun skips the shards
    already done. Exits 1 when shards failed."""
    from pipelines.train.encode import encode as run

    exit_nonzero_on_failure(run(config))


def pretrain(config: PretrainConfig) -> None:
    """Pretrain a model on Ray Train with DeepSpeed, then export it and register it in MLflow.

    --kind (or `kind:` in the config file) says what to train: lm, a causal language model on text shards (the
    default); clip, a CLIP-style image-text model on caption-image shards; autoencoder, a KL autoencoder on image
    shards; diffusion, a text-to-image latent diffusion model on latent shards (`pipelines encode`). Options
    marked (clip only) and the like belong to those kinds. A stopped run continues with --resume RUN_NAME."""
    from pipelines.train.pretrain import pretrain as run

    run(config)


def pretrain_clip(config: ClipPretrainConfig) -> None:
    """Pretrain a CLIP-style image-text model: `pipelines pretrain --kind clip`."""
    from pipelines.train.clip import pretrain_clip as run

    run(config)


def pretrain_autoencoder(config: AutoencoderPretrainConfig) -> None:
    """Pretrain a KL autoencoder on image shards: `pipelines pretrain --kind autoencoder`."""
    from pipelines.train.autoencoder import pretrain_autoencoder as run

    run(config)


def pretrain_diffusion(config: DiffusionPretrainConfig) -> None:
    """Pretrain a latent diffusion model on latent shards: `pipelines pretrain --kind diffusion`."""
    from pipelines.train.diffusion import pretrain_diffusion as run

    run(config)


def serve(config: ServeConfig) -> None:
    """Serve registered models over an OpenAI-compatible HTTP API, on Ray Serve.

    Language models answer chat and completion requests, CLIP models embeddings, diffusion models image
    generation; a request names the model it wants. Serves until Ctrl-C (or returns once up with --no-blocking);
    --emit-config writes a Ray Serve config file for a cluster instead."""
    from pipelines.serve.app import serve_model

    serve_model(config)


def finetune(config: FinetuneConfig) -> None:
    """Fine-tune a registered model with LoRA, then export the adapter and register it in MLflow.

    A language model learns from instruction data (--data: a jsonl of prompt/response or messages rows); a
    diffusion model from a folder of captioned images. The adapter is registered pinned to the base version it
    was trained on. A stopped run continues with --resume RUN_NAME."""
    from pipelines.train.finetune import finetune as run

    run(config)


def evaluate(config: EvalConfig) -> None:
    """Evaluate a registered language model with lm-evaluation-harness; log the scores to its MLflow run.

    The tasks are the harness's: those shipped in configs/eval (demo-cloze, multiple choice by log-likelihood;
    demo-qa, generated answers by exact match), any folder of task YAML files given with --include-path, and the
    harness's own when their data is at hand. The model is served here for the run (or asked at --endpoint); every
    score goes to the MLflow run that registered the version, and onto the version as a tag. With --metric and
    --threshold, --alias (champion) moves to the version only when the metric passes."""
    from pipelines.evaluate.run import evaluate as run

    run(config)


crawl_app.command("images", cls=Command)(config_command(ImageCrawlConfig, crawl_images))
crawl_app.command("text", cls=Command)(config_command(TextCrawlConfig, crawl_text))
app.command("curate", cls=Command)(config_command(CurateConfig, curate))
app.command("encode", cls=Command)(config_command(EncodeConfig, encode))
app.command("pretrain", cls=Command)(config_command(
    PretrainConfig, pretrain, (ClipPretrainConfig, pretrain_clip), (AutoencoderPretrainConfig, pretrain_autoencoder),
    (DiffusionPretrainConfig, pretrain_diffusion)))
app.command("pretrain-clip", cls=Command)(config_command(ClipPretrainConfig, pretrain_clip))
app.command("serve", cls=Command)(config_command(ServeConfig, serve))
app.command("finetune", cls=Command)(config_command(FinetuneConfig, finetune))
app.command("eval", cls=Command)(config_command(EvalConfig, evaluate))


FLOW_NAMES = ["end-to-end", "ingest", "curate", "pretrain", "pretrain-clip", "finetune", "deploy",
              "pretrain-autoencoder", "encode", "pretrain-diffusion", "eval"]


@app.command("flow", cls=Command)
def run_flow(
    name: str = typer.Argument(..., metavar="NAME", help="One of: " + ", ".join(FLOW_NAMES)),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file: the flow's config."),
    set_: list[str] = typer.Option([], "--set", metavar="<field=value>", help="Override a field: --set pretrain.engine.max_steps=50 "
                                   "(the value is read as YAML). Repeat for several."),
    summary_json: Optional[Path] = typer.Option(None, help="Also write what each stage did to this JSON file."),
) -> None:
    """Run a Prefect flow in this process: one stage, or several end to end.

    Each stage runs as a Prefect task with retries, and is cached by content: a stage whose input, config and
    code are unchanged is not run again. Uses Prefect's embedded API unless PREFECT_API_URL is set."""
    import json

    import yaml

    from pipelines.config import config_kind, load_config

    if name not in FLOW_NAMES:
        Console(stderr=True).print(f"[red]error:[/red] no flow {name!r}; flows: {', '.join(FLOW_NAMES)}")
        raise typer.Exit(2)
    with one_line_errors():
        overrides = {}
        for item in set_:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise PipelineError(f"--set {item!r}: expected KEY.PATH=VALUE")
            overrides[tuple(key.split("."))] = yaml.safe_load(value)
        from pipelines.flows import FLOWS, summary_table

        kind = config_kind(config, overrides) if name == "pretrain" else None
        if kind in ("clip", "autoencoder", "diffusion"):  # as `pipelines pretrain --kind` does
            name = f"pretrain-{kind}"
        model, flow = FLOWS[name]
        result = flow(config=load_config(model, config, overrides))
    outcomes = {result["stage"]: result} if "stage" in result else result
    if all(isinstance(o, dict) and "stage" in o for o in outcomes.values()):
        Console().print(summary_table(outcomes, title=name))
    else:
        print(json.dumps(result, indent=2))
    if summary_json:
        summary_json.write_text(json.dumps(result, indent=2, default=str))


@app.command("deploy-flows", cls=Command)
def deploy_flows(
    register_only: bool = typer.Option(False, "--register-only", show_default=False,
                                       help="Register the deployments and return, without running them."),
) -> None:
    """Register the flows' deployments on the Prefect server at PREFECT_API_URL, and run them.

    Each deployment is registered with its schedule and default parameters; then this process runs the scheduled
    runs and those started from the Prefect UI, until Ctrl-C."""
    from pipelines.deployments import deploy_flows as deploy

    with one_line_errors():
        for name in deploy(register_only=register_only):
            print(name)


@app.command(cls=Command)
def ui(
    prefect_port: int = typer.Option(4200, help="Port of the Prefect server and UI on 127.0.0.1."),
    mlflow_port: int = typer.Option(5000, help="Port of the MLflow UI on 127.0.0.1."),
) -> None:
    """Open the Prefect and MLflow UIs on this machine, over the records of earlier runs.

    Starts the Prefect server with its UI and the MLflow UI on 127.0.0.1 (the runs of `pipelines flow` and
    `make demo` are there), registers the flows' deployments and runs them, until Ctrl-C."""
    from pipelines.deployments import ui as run_ui

    with one_line_errors():
        run_ui(prefect_port=prefect_port, mlflow_port=mlflow_port)


@app.command(cls=Command)
def lineage(
    target: str = typer.Argument(..., help="A registered model, models:/NAME@ALIAS or models:/NAME/VERSION, or "
                                 "the base URL of a running endpoint (http://HOST:PORT)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="With an endpoint URL: the model as clients "
                                        "name it, NAME or NAME:ADAPTER (default: its base model)."),
    as_json: bool = typer.Option(False, "--json", help="Print the chain as JSON instead of lines."),
) -> None:
    """Print where a model came from, one line per step back.

    The version and its aliases, its training run and held-out figures, the models it was built on (LoRA base,
    CLIP text tower, autoencoder), every shard set it was trained on with its digest checked against the
    manifest on storage now, the curation steps, and the crawl's input list with its sha256."""
    import json

    from pipelines.lineage import endpoint_lineage, model_lineage, render

    with one_line_errors():
        if target.startswith(("http://", "https://")):
            chain = endpoint_lineage(target, model)
        else:
            chain = model_lineage(target)
    if as_json:
        print(json.dumps(chain, indent=2))
    else:
        print("\n".join(render(chain)))


@app.command(cls=Command)
def version() -> None:
    """Print the version of pipelines."""
    print(__version__)


if __name__ == "__main__":
    sys.exit(app())
