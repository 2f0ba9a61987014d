"""`pipelines`: one command with a subcommand per stage."""

from __future__ import annotations

import sys
from typing import Any, Callable

import typer

from pipelines import __version__
from pipelines.config import config_command
from pipelines.curate.run import CurateConfig, curate
from pipelines.ingest.images import ImageCrawlConfig, crawl_images
from pipelines.ingest.text import TextCrawlConfig, crawl_text
from pipelines.serve.app import serve_model
from pipelines.serve.config import ServeConfig
from pipelines.train.config import PretrainConfig
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
app.command("pretrain")(config_command(PretrainConfig, pretrain))
app.command("serve")(config_command(ServeConfig, serve_model))
app.command("finetune")(config_command(FinetuneConfig, finetune))


@app.command()
def version() -> None:
    """Print the package version."""
    print(__version__)


if __name__ == "__main__":
    sys.exit(app())
