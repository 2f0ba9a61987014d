"""Typed configs: YAML files, command-line overrides, and errors that name the offending key or field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Literal
from unittest import mock

import pytest
import typer
import yaml
from typer.testing import CliRunner

from pipelines.cli import app
from pydantic import Field

from pipelines.config import ConfigModel, config_command, leaf_fields, load_config
from pipelines.errors import PipelineError
from pipelines.ingest.images import ImageCrawlConfig

PIPELINES = str(Path(sys.executable).with_name("pipelines"))
REPO = Path(__file__).resolve().parents[1]


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def config_error(*args, **kwargs) -> str:
    with pytest.raises(PipelineError) as info:
        load_config(ImageCrawlConfig, *args, **kwargs)
    return str(info.value)


# -- load_config ---------------------------------------------------------------------------------
def test_yaml_sets_nested_fields_and_keeps_defaults(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"input": "in.jsonl", "output": "out", "shard_size": 5,
                                            "image": {"image_size": 32, "resize_mode": "border"},
                                            "fetch": {"timeout": 3, "opt_out_directives": ["noai"]}})
    c = load_config(ImageCrawlConfig, path)
    assert (c.input, c.output, c.shard_size) == ("in.jsonl", "out", 5)
    assert (c.image.image_size, c.image.resize_mode, c.fetch.timeout) == (32, "border", 3.0)
    assert c.fetch.opt_out_directives == ["noai"]
    default = ImageCrawlConfig(input="x", output="y")
    assert (c.image.output_format, c.fetch.retries, c.url_col) == \
        (default.image.output_format, default.fetch.retries, default.url_col)


def test_overrides_win_over_the_file(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"input": "in.jsonl", "output": "out", "shard_size": 5,
                                            "image": {"image_size": 32, "resize_mode": "border"}})
    c = load_config(ImageCrawlConfig, path, {("image", "image_size"): 48, ("fetch", "retries"): 0,
                                             ("output",): "elsewhere"})
    assert (c.image.image_size, c.image.resize_mode) == (48, "border")  # the sibling from the file stays
    assert (c.fetch.retries, c.output, c.shard_size) == (0, "elsewhere", 5)


def test_shipped_example_config_is_valid():
    c = load_config(ImageCrawlConfig, REPO / "configs/crawl/images.yaml", {("input",): "a", ("output",): "b"})
    assert c.image.min_image_size == 64 and c.fetch.respect_robots


@pytest.mark.parametrize("data, key", [
    ({"input": "a", "output": "b", "shard_sise": 10}, "shard_sise"),
    ({"input": "a", "output": "b", "image": {"imagesize": 10}}, "image.imagesize"),
    ({"input": "a", "output": "b", "fetch": {"time_out": 1}}, "fetch.time_out"),
])
def test_unknown_key_is_an_error_naming_it(tmp_path, data, key):
    path = write_yaml(tmp_path / "c.yaml", data)
    error = config_error(path)
    assert error.startswith(f"invalid config ({path}): ") and f"{key}: Extra inputs are not permitted" in error


@pytest.mark.parametrize("overrides, field", [
    ({("image", "image_size"): -5}, "image.image_size"),
    ({("image", "resize_mode"): "sideways"}, "image.resize_mode"),
    ({("fetch", "timeout"): "soon"}, "fetch.timeout"),
    ({("image", "max_aspect_ratio"): 0.5}, "image.max_aspect_ratio"),
    ({("shard_size",): 0}, "shard_size"),
])
def test_bad_value_is_an_error_naming_the_field(overrides, field):
    error = config_error(None, {("input",): "a", ("output",): "b", **overrides})
    assert error.startswith("invalid config (command line): ") and f"{field}: " in error


def test_missing_required_fields_are_named():
    error = config_error(None, {})
    assert "input: Field required" in error and "output: Field required" in error


@pytest.mark.parametrize("text, message", [("- a\n- b\n", "must be a mapping"), ("a: [1,\n", "not valid YAML")])
def test_bad_yaml_files(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    error = config_error(path)
    assert str(path) in error and message in error


def test_missing_config_file(tmp_path):
    assert config_error(tmp_path / "nope.yaml").startswith(f"cannot read config {tmp_path / 'nope.yaml'}")


def test_digest_is_stable_and_follows_the_values():
    a = ImageCrawlConfig(input="x", output="y", image={"image_size": 64})
    b = ImageCrawlConfig(output="y", image={"image_size": 64}, input="x")
    assert a.digest() == b.digest() and len(a.digest()) == 64
    assert a.digest() != ImageCrawlConfig(input="x", output="y", image={"image_size": 65}).digest()


def test_digest_ignores_settings_that_only_change_how_the_crawl_runs():
    a = ImageCrawlConfig(input="x", output="y")
    b = ImageCrawlConfig(input="x", output="elsewhere", quiet=True, retry_failed=True, decode_threads=7,
                         max_in_flight=3, task_retries=0, fetch={"timeout": 3, "retries": 5, "concurrency": 2})
    assert a.digest() == b.digest()
    assert a.digest() != ImageCrawlConfig(input="x", output="y", shard_size=10).digest()


@pytest.mark.parametrize("fetch", [{"respect_robots": False}, {"respect_opt_out": False},
                                   {"opt_out_directives": ["noai"]}, {"max_bytes": 1000}])
def test_digest_follows_fetch_settings_that_decide_the_samples(fetch):
    assert ImageCrawlConfig(input="x", output="y").digest() != \
        ImageCrawlConfig(input="x", output="y", fetch=fetch).digest()


def test_assignment_is_validated_too():
    c = ImageCrawlConfig(input="x", output="y")
    with pytest.raises(ValueError):
        c.shard_size = -1


# -- the command line ----------------------------------------------------------------------------
def test_every_leaf_field_is_an_option():
    command = typer.main.get_command(app).commands["crawl"].commands["images"]
    options = {opt for p in command.params for opt in p.opts + p.secondary_opts}
    for path, field in leaf_fields(ImageCrawlConfig):
        flag = "--" + path[-1].replace("_", "-")
        assert flag in options, path
        if field.annotation is bool:
            assert "--no-" + path[-1].replace("_", "-") in options, path
    assert "--config" in options


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PIPELINES, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, field", [
    (["--image-size", "-5"], "image.image_size"),
    (["--resize-mode", "sideways"], "image.resize_mode"),
    (["--timeout", "0"], "fetch.timeout"),
])
def test_cli_bad_value_is_one_line_naming_the_field(tmp_path, args, field):
    proc = run_cli("crawl", "images", "--input", "in.jsonl", "--output", str(tmp_path / "o"), *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid config (command line): "), proc.stderr
    assert f"{field}: " in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_cli_unknown_key_in_the_file_is_one_line_naming_it(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"image": {"image_size": 64, "colour": "red"}})
    proc = run_cli("crawl", "images", "--config", str(path), "--input", "a", "--output", "b")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line == f"error: invalid config ({path}): image.colour: Extra inputs are not permitted"


def test_cli_overrides_the_file_end_to_end(tmp_path, web, ray_cluster):
    urls = tmp_path / "urls.jsonl"
    urls.write_text("".join(json.dumps({"url": web.url(p), "caption": p}) + "\n"
                            for p in ["/img/0.jpg", "/img/1.jpg", "/private/a.jpg"]))
    config = write_yaml(tmp_path / "c.yaml", {
        "input": str(urls), "output": str(tmp_path / "from-file"), "shard_size": 2,
        "image": {"image_size": 32, "resize_mode": "center_crop"},
        "fetch": {"allow_private_network": True, "respect_robots": True, "retries": 0}})
    out = tmp_path / "from-cli"
    result = CliRunner().invoke(app, ["crawl", "images", "--config", str(config), "--output", str(out),
                                      "--image-size", "48", "--no-respect-robots", "--quiet"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "from-file").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    c = manifest["config"]
    assert (c["output"], c["shard_size"], c["image"]["image_size"]) == (str(out), 2, 48)
    assert (c["image"]["resize_mode"], c["fetch"]["respect_robots"], c["fetch"]["retries"]) == ("center_crop", False, 0)
    assert manifest["samples"] == 3 and len(manifest["shards"]) == 2  # /private/ fetched: robots off
    assert web.hits("/robots.txt") == 0


# -- one command, several kinds of config (`pipelines pretrain` for an LM or a CLIP model) --------
class _Engine(ConfigModel):
    steps: int = Field(10, description="Steps.")


class _Lm(ConfigModel):
    kind: Literal["lm"] = Field("lm", description="What to train.")
    engine: _Engine = _Engine()
    preset: Literal["tiny", "125m"] = Field("tiny", description="LM size.")
    seq_len: int = Field(128, description="Tokens per sequence.")


class _Clip(ConfigModel):
    kind: Literal["clip"] = Field("clip", description="What to train.")
    engine: _Engine = _Engine(steps=20)
    preset: Literal["tiny", "base"] = Field("tiny", description="Tower sizes.")
    image_size: int = Field(64, description="Pixels.")


@pytest.fixture
def kinds_app() -> tuple[typer.Typer, list]:
    ran: list = []
    command = config_command(_Lm, lambda c: ran.append(("lm", c)), (_Clip, lambda c: ran.append(("clip", c))))
    test_app = typer.Typer()
    test_app.command("train")(command)
    test_app.command("other")(lambda: None)  # a group, so the command is called by name as in `pipelines`
    return test_app, ran


def test_kind_comes_from_the_file_the_option_or_the_first_config(tmp_path, kinds_app):
    test_app, ran = kinds_app
    clip_file = write_yaml(tmp_path / "clip.yaml", {"kind": "clip", "image_size": 32})
    for args in (["-c", str(clip_file)], ["--kind", "clip"], ["--steps", "5"]):
        result = CliRunner().invoke(test_app, ["train", *args])
        assert result.exit_code == 0, result.output
    (k1, c1), (k2, c2), (k3, c3) = ran
    assert (k1, type(c1), c1.image_size, c1.engine.steps) == ("clip", _Clip, 32, 20)  # its own section default
    assert (k2, type(c2), c2.image_size) == ("clip", _Clip, 64)
    assert (k3, type(c3), c3.engine.steps) == ("lm", _Lm, 5)
    # the option wins over the file: an LM config, which has no image_size
    result = CliRunner().invoke(test_app, ["train", "-c", str(clip_file), "--kind", "lm"])
    assert result.exit_code == 2 and len(ran) == 3
    assert "image_size: Extra inputs are not permitted" in result.output


def test_an_option_of_the_other_kind_is_refused_in_one_line(tmp_path, kinds_app):
    test_app, ran = kinds_app
    result = CliRunner().invoke(test_app, ["train", "--kind", "clip", "--seq-len", "64"])
    assert result.exit_code == 2 and not ran
    assert "--seq-len is not an option of a clip config (it is one of lm)" in result.output
    result = CliRunner().invoke(test_app, ["train", "--kind", "vit"])
    assert result.exit_code == 2 and "kind 'vit': expected one of lm, clip" in result.output
    result = CliRunner().invoke(test_app, ["train", "--preset", "base"])  # a CLIP preset, for the LM
    assert result.exit_code == 2 and "preset: Input should be 'tiny' or '125m'" in result.output


def test_help_of_a_command_with_kinds_names_what_belongs_to_which(kinds_app):
    test_app, _ = kinds_app
    command = typer.main.get_command(test_app).commands["train"]
    helps = {p.opts[0]: p.help.replace("\\[", "[") for p in command.params}  # rich markup escaped
    assert helps["--steps"] == "Steps. [default: lm: 10; clip: 20]"
    assert helps["--seq-len"].startswith("(lm only) Tokens per sequence.")
    assert helps["--image-size"].startswith("(clip only) Pixels.")
    assert helps["--preset"].startswith("lm: LM size. One of: tiny, 125m; clip: Tower sizes. One of: tiny, base")
    assert helps["--kind"] == "What to train. One of: lm, clip [default: lm]"


def test_pipelines_pretrain_runs_the_shipped_clip_config_as_a_clip_model():
    """`pipelines pretrain -c configs/pretrain/clip-tiny.yaml` builds the CLIP config (checked up to the run)."""
    from pipelines.train.clip import ClipPretrainConfig
    from pipelines.train.config import PretrainConfig

    command = typer.main.get_command(app).commands["pretrain"]
    seen = []
    with mock.patch("pipelines.config.load_config", lambda model, *a: seen.append(model) or (_ for _ in ()).throw(
            PipelineError("stop here"))):
        for config in ("configs/pretrain/clip-tiny.yaml", "configs/pretrain/lm-tiny.yaml"):
            with pytest.raises(SystemExit):
                command.main(["-c", str(REPO / config)], prog_name="pipelines", standalone_mode=True)
    assert seen == [ClipPretrainConfig, PretrainConfig]
