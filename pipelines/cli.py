"""`pipelines`: one command with a subcommand per stage."""

from __future__ import annotations

import sys
from typing import Any, Callable

import typer
from rich.console import Console

from pipelines import __version__
from pipelines.config import config_command
from pipelines.errors import PipelineError
from pipelines.ingest.images import ImageCrawlConfig, crawl_images

app = typer.Typer(help="From raw web data to a served generative model.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
crawl_app = typer.Typer(help="Crawl URL lists and corpora into WebDataset shards.", no_args_is_help=True)
app.add_typer(crawl_app, name="crawl")
err = Console(stderr=True)


def user_errors(run: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Turn a PipelineError into a one-line message and exit code 2; a crawl with failed shards exits 1."""

    def wrapper(config: Any) -> None:
        try:
            result = run(config)
        except PipelineError as exc:
            err.print(f"[red]error:[/red] {exc}", highlight=False)
            raise typer.Exit(2) from None
        if result is not None and not getattr(result, "ok", True):
            raise typer.Exit(1)

    wrapper.__doc__ = run.__doc__
    return wrapper


crawl_app.command("images")(config_command(ImageCrawlConfig, user_errors(crawl_images)))


@app.command()
def version() -> None:
    """Print the package version."""
    print(__version__)


if __name__ == "__main__":
    sys.exit(app())
