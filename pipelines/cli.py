"""`pipelines`: one command with a subcommand per stage."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console

from pipelines import __version__
from pipelines.config import config_command, one_line_errors
from pipelines.curate.run import CurateConfig, curate
from pipelines.errors import PipelineError
from pipelines.ingest.images import ImageCrawlConfig, crawl_images
from pipelines.ingest.text import TextCrawlConfig, crawl_text
from pipelines.serve.app import serve_model
from pipelines.serve.config import ServeConfig
from pipelines.train.autoencoder import AutoencoderPretrainConfig, pretrain_autoencoder
from pipelines.train.clip import ClipPretrainConfig, pretrain_clip
from pipelines.train.config import PretrainConfig
from pipelines.train.diffusion import DiffusionPretrainConfig, pretrain_diffusion
from pipelines.train.encode import EncodeConfig, encode
from pipelines.train.finetune import FinetuneConfig, finetune
from pipelines.train.pretrain import pretrain

app = typer.Typer(help="From raw web data to a served generative model.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
crawl_app = typer.Typer(help="Crawl URL lists and corpora into WebDataset shards.", no_args_is_help=True)
app.add_typer(crawl_app, name="crawl")


def exit_nonzero_on_failure(run: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Exit code 1 when a job finished with failed shards (user mistakes exit 2 in `config_command`)."""

    def wrapper(config: Any) -> None:
        result = run(config)
        if result is not None and not getattr(result, "ok", True):
            raise typer.Exit(1)

    wrapper.__doc__ = run.__doc__
    return wrapper


crawl_app.command("images")(config_command(ImageCrawlConfig, exit_nonzero_on_failure(crawl_images)))
crawl_app.command("text")(config_command(TextCrawlConfig, exit_nonzero_on_failure(crawl_text)))
app.command("curate")(config_command(CurateConfig, exit_nonzero_on_failure(curate)))
app.command("encode")(config_command(EncodeConfig, exit_nonzero_on_failure(encode)))
pretrain_command = config_command(PretrainConfig, pretrain, (ClipPretrainConfig, pretrain_clip),
                                  (AutoencoderPretrainConfig, pretrain_autoencoder),
                                  (DiffusionPretrainConfig, pretrain_diffusion))
pretrain_command.__doc__ = """Pretrain a model with DeepSpeed on Ray Train, export it and register it in MLflow:
a causal LM on text shards, or with `kind: clip` (in the config file, or --kind clip) a CLIP-style image-text
model on caption-image shards. Options marked (lm only) or (clip only) belong to one kind."""
app.command("pretrain")(pretrain_command)
app.command("pretrain-clip", help="`pipelines pretrain --kind clip`: " + (pretrain_clip.__doc__ or ""))(
    config_command(ClipPretrainConfig, pretrain_clip))
app.command("serve")(config_command(ServeConfig, serve_model))
app.command("finetune")(config_command(FinetuneConfig, finetune))


FLOW_NAMES = ["end-to-end", "ingest", "curate", "pretrain", "pretrain-clip", "finetune", "deploy"]


@app.command("flow")
def run_flow(
    name: str = typer.Argument(..., help="One of: " + ", ".join(FLOW_NAMES)),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file: the flow's config."),
    set_: list[str] = typer.Option([], "--set", help="Override a field: --set pretrain.engine.max_steps=50 "
                                   "(the value is read as YAML). Repeat for several."),
    summary_json: Optional[Path] = typer.Option(None, help="Also write what each stage did to this JSON file."),
) -> None:
    """Run a Prefect flow in this process (Prefect's ephemeral API unless PREFECT_API_URL is set):
    the stages it runs are tasks with retries and content-keyed caching."""
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

        if name == "pretrain" and config_kind(config, overrides) == "clip":  # as `pipelines pretrain` does
            name = "pretrain-clip"
        model, flow = FLOWS[name]
        result = flow(config=load_config(model, config, overrides))
    outcomes = {result["stage"]: result} if "stage" in result else result
    if all(isinstance(o, dict) and "stage" in o for o in outcomes.values()):
        Console().print(summary_table(outcomes, title=name))
    else:
        print(json.dumps(result, indent=2))
    if summary_json:
        summary_json.write_text(json.dumps(result, indent=2, default=str))


@app.command("deploy-flows")
def deploy_flows(
    register_only: bool = typer.Option(False, help="Register the deployments and return (no runner)."),
) -> None:
    """Register the flows' deployments (with their schedules and default parameters) on the Prefect
    API at PREFECT_API_URL, and run what executes their scheduled and UI-started runs, until Ctrl-C."""
    from pipelines.deployments import deploy_flows as deploy

    with one_line_errors():
        for name in deploy(register_only=register_only):
            print(name)


@app.command()
def ui(
    prefect_port: int = typer.Option(4200, help="Port of the Prefect server and UI on 127.0.0.1."),
    mlflow_port: int = typer.Option(5000, help="Port of the MLflow UI on 127.0.0.1."),
) -> None:
    """Start the Prefect server with its UI and the MLflow UI on loopback (over the records of earlier
    runs, `make demo`'s included), register the deployments and run them, until Ctrl-C."""
    from pipelines.deployments import ui as run_ui

    with one_line_errors():
        run_ui(prefect_port=prefect_port, mlflow_port=mlflow_port)


@app.command()
def lineage(
    target: str = typer.Argument(..., help="A registered model, models:/NAME@ALIAS or models:/NAME/VERSION, or "
                                 "the base URL of a running endpoint (http://HOST:PORT)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="With an endpoint URL: the model as clients "
                                        "name it, NAME or NAME:ADAPTER (default: its base model)."),
    as_json: bool = typer.Option(False, "--json", help="Print the chain as JSON instead of lines."),
) -> None:
    """Print where a model came from, one line per hop: the version and its aliases, its training run and
    held-out figures, the models it was built on (LoRA base, CLIP text tower, autoencoder), every shard set
    it was trained on with its digest checked against the manifest on storage now, the curation steps, and
    the crawl's input list with its sha256."""
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


@app.command()
def version() -> None:
    """Print the package version."""
    print(__version__)


if __name__ == "__main__":
    sys.exit(app())
