"""Training configs: a section's own defaults survive a partial override, and `--help` shows them."""

from __future__ import annotations

from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.config import load_config
from pipelines.train.config import PretrainConfig
from pipelines.train.finetune import FinetuneConfig


def test_one_engine_option_keeps_the_sections_other_defaults(tmp_path) -> None:
    config = load_config(FinetuneConfig, None, {("engine", "workers"): 2, ("optim", "lr"): 0.5})

    assert (config.engine.workers, config.optim.lr) == (2, 0.5)
    defaults = FinetuneConfig()
    assert config.engine.model_dump(exclude={"workers"}) == defaults.engine.model_dump(exclude={"workers"})
    assert (config.engine.zero_stage, config.engine.max_steps, config.optim.weight_decay) == (0, 100, 0.0)
    # From YAML too; and pretraining keeps its own (different) defaults.
    (tmp_path / "c.yaml").write_text("engine:\n  micro_batch: 2\n")
    assert load_config(FinetuneConfig, tmp_path / "c.yaml").engine.zero_stage == 0
    assert load_config(PretrainConfig, tmp_path / "c.yaml").engine.zero_stage == 2


def test_a_partial_section_keeps_its_defaults_however_the_config_is_built() -> None:
    """Prefect validates a flow's parameters with the model itself, not through `load_config`."""
    direct = FinetuneConfig.model_validate({"engine": {"workers": 2}})
    assert (direct.engine.workers, direct.engine.zero_stage, direct.engine.eval_batches) == (2, 0, 8)
    from pipelines.flows import EndToEndConfig

    nested = EndToEndConfig.model_validate({"finetune": {"engine": {"workers": 2}}})
    assert nested.finetune.engine == direct.engine


def test_help_shows_the_defaults_that_apply() -> None:
    run = CliRunner().invoke(app, ["finetune", "--help"], env={"COLUMNS": "200"})
    line = next(line for line in run.output.splitlines() if "--zero-stage" in line)
    assert "[default: 0]" in line, line
