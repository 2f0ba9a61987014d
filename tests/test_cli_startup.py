"""What a new user meets first: `pipelines --help`, every command's `--help` and `pipelines version` answer without
importing any stage (Ray, torch, MLflow, Prefect, ...), and the help is written for people, not code.

Each command runs in a fresh interpreter, which reports the heavy packages it imported: a count, not a timing (the
timing is `benchmarks/cli_start.py`), so the test is the same on a busy machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from pipelines import __version__
from pipelines.cli import app

ROOT = Path(__file__).resolve().parents[1]
# The stages' packages, each a second or more to import (pandas, pyarrow and OpenCV a few tenths).
HEAVY = {"torch", "transformers", "ray", "mlflow", "prefect", "diffusers", "deepspeed", "peft", "pandas", "pyarrow",
         "cv2", "lm_eval"}
RUN = """
import json, sys
report, heavy, args = sys.argv[1], set(sys.argv[2].split(",")), sys.argv[3:]
from pipelines.cli import app
code = 0
try:
    app(args, prog_name="pipelines")
except SystemExit as exit:
    code = exit.code or 0
loaded = sorted({name.split(".")[0] for name in sys.modules} & heavy)
open(report, "w").write(json.dumps({"code": code, "heavy": loaded}))
"""


def command_paths(command: object, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command of the CLI as its words (`("crawl", "images")`), groups included."""
    paths = [path]
    for name, sub in getattr(command, "commands", {}).items():
        paths += command_paths(sub, path + (name,))
    return paths


COMMANDS = command_paths(typer.main.get_command(app))


def run_cli(args: list[str], tmp_path: Path) -> tuple[int, list[str], str]:
    """`pipelines ARGS` in a fresh interpreter: its exit code, the heavy packages it imported, its output."""
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-c", RUN, str(report), ",".join(sorted(HEAVY)), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = json.loads(report.read_text())
    return outcome["code"], outcome["heavy"], proc.stdout + proc.stderr


def test_there_is_a_command_of_every_stage() -> None:
    words = {" ".join(path) for path in COMMANDS}
    assert {"", "crawl images", "crawl text", "curate", "encode", "pretrain", "finetune", "serve", "eval",
            "flow", "lineage", "version"} <= words


@pytest.mark.parametrize("words", COMMANDS, ids=lambda words: " ".join(words) or "pipelines")
def test_help_imports_no_stage_and_reads_as_help(words: tuple[str, ...], tmp_path: Path) -> None:
    code, heavy, output = run_cli([*words, "--help"], tmp_path)

    assert code == 0, output
    assert heavy == [], f"`pipelines {' '.join(words)} --help` imported {heavy}"
    assert "Usage: pipelines" in output
    assert "PydanticUndefined" not in output
    assert "<bool>" not in output  # a flag takes no value
    assert "`config" not in output  # a docstring's parameter names (`config.input`) are not a user's words


def test_version_imports_no_stage(tmp_path: Path) -> None:
    code, heavy, output = run_cli(["version"], tmp_path)

    assert (code, heavy, output.strip()) == (0, [], __version__)


def option_helps(*words: str) -> dict[str, str]:
    command = typer.main.get_command(app)
    for word in words:
        command = command.commands[word]  # type: ignore[attr-defined]
    return {p.opts[0]: (p.help or "").replace("\\[", "[") for p in command.params}  # rich markup escaped


def test_every_option_says_what_it_does_and_its_default() -> None:
    for words in COMMANDS:
        for option, text in option_helps(*words).items():
            assert text.strip() and not text.startswith("["), f"pipelines {' '.join(words)} {option}: no help"
    curate, serve, pretrain = option_helps("curate"), option_helps("serve"), option_helps("pretrain")
    assert curate["--task-retries"].endswith("[default: 3]")
    assert curate["--quiet"].endswith("[default: --no-quiet]") and curate["--report"].endswith("[default: --report]")
    assert curate["--input"].endswith("[required]")
    assert serve["--host"].endswith("[default: 127.0.0.1]")  # as typed, not repr'd
    assert "[default" not in serve["--also"]  # an empty list (a default factory): nothing to show
    assert "[default" not in curate["--partitions"]  # None: the description says what unset means
    assert pretrain["--micro-batch"].endswith("[default: lm: 8; clip: 64; autoencoder: 16; diffusion: 32]")
    assert pretrain["--kind"].endswith("One of: lm, clip, autoencoder, diffusion [default: lm]")
