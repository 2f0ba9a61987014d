"""`pipelines pretrain` end to end on CPU: real Ray Train workers, real DeepSpeed (gloo), real MLflow on
a SQLite file, shards made by the real crawler."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.errors import PipelineError
from pipelines.ingest.text import TextCrawlConfig, crawl_text
from pipelines.train.config import PretrainConfig
from pipelines.train.pretrain import pretrain

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]

SUBJECTS = ["the cat", "a dog", "my neighbour", "the old farmer", "a small bird", "the teacher", "our robot"]
VERBS = ["sees", "likes", "follows", "paints", "feeds", "visits", "finds"]
OBJECTS = ["the river", "a red apple", "the garden", "an open window", "the village", "a wooden boat"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """~600 short documents of grammatical sentences from a tiny vocabulary (easy to learn) in 6 shards."""
    root = tmp_path_factory.mktemp("lm-corpus")
    rng = np.random.default_rng(7)
    rows = []
    for i in range(600):
        sentences = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
                     for _ in range(rng.integers(3, 8))]
        rows.append({"id": f"doc{i}", "text": " ".join(s.capitalize() for s in sentences)})
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "shards"
    crawl_text(TextCrawlConfig(input=str(root / "corpus.jsonl"), output=str(out), shard_size=100, quiet=True))
    return str(out)


def tiny_config(tmp_path: Path, shards: str, **engine: Any) -> PretrainConfig:
    return PretrainConfig.model_validate({
        "model": {"preset": "tiny", "hidden_size": 64, "intermediate_size": 176},
        "tokenizer": {"vocab_size": 400},
        "data": {"shards": shards, "seq_len": 64, "shuffle_buffer": 16, "heldout_percent": 10},
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "engine": {"workers": 2, "zero_stage": 2, "micro_batch": 4, "max_steps": 40, "checkpoint_every": 10,
                   "eval_batches": 4, **engine},
        "registry": {"experiment": "test-pretrain", "model_name": "tiny-lm"},
        "storage": str(tmp_path / "runs"), "quiet": True})


def loss_by_step(client: MlflowClient, run_id: str) -> dict[int, float]:
    """The last logged loss of each step (a restarted run logs the steps after its checkpoint again)."""
    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.timestamp)
    return {m.step: m.value for m in history}


def test_two_workers_zero2_learn_register_and_generate(tmp_path: Path, shards: str, tracking: MlflowClient) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.train.registry import load_registered

    result = pretrain(tiny_config(tmp_path, shards))

    assert not result.stopped and result.steps == 40
    losses = loss_by_step(tracking, result.mlflow_run_id)
    assert sorted(losses) == list(range(1, 41))
    first, last = np.mean([losses[s] for s in range(1, 6)]), np.mean([losses[s] for s in range(36, 41)])
    assert last < 0.5 * first, (first, last)  # it learns the grammar
    run = tracking.get_run(result.mlflow_run_id)
    assert run.data.params["engine.zero_stage"] == "2" and run.data.params["engine.workers"] == "2"
    assert {"tokens_per_s", "tflops_per_s", "lr", "heldout_perplexity"} <= set(run.data.metrics)
    assert "mfu" not in run.data.metrics  # no data-sheet peak for a CPU: no utilisation figure that could pass 100%
    assert 1 < run.data.metrics["heldout_perplexity"] < 20  # 400 tokens: chance would be ~400
    manifest = json.loads(Path(shards, "manifest.json").read_text())
    assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [manifest["digest"][:36]]  # MLflow's limit
    assert run.data.tags["lineage.training.digest"] == manifest["digest"]

    # The export loads with plain transformers; the registered version with our loader.
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert AutoTokenizer.from_pretrained(result.model_dir).eos_token == "<|endoftext|>"
    assert sorted(p.name for p in Path(result.model_dir).iterdir() if p.suffix == ".safetensors")
    version = result.registered
    assert version.champion and version.version == 1
    assert str(tracking.get_model_version_by_alias("tiny-lm", "candidate").version) == "1"
    registered, registered_tokenizer = load_registered("models:/tiny-lm@candidate")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(registered.state_dict()[name], tensor, rtol=0, atol=0)
    prompt = registered_tokenizer("The cat", return_tensors="pt")
    out = registered.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = registered_tokenizer.decode(out[0][prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(text.split()) >= 3 and set(text.lower().replace(".", " ").split()) <= {
        w for phrase in SUBJECTS + VERBS + OBJECTS for w in phrase.split()}, text


def train_worker_pids(since: float) -> list[int]:
    """Ray Train worker processes started after `since` (earlier tests' idle workers may linger)."""
    return [p.pid for p in psutil.process_iter(["cmdline", "create_time"])
            if p.info["create_time"] >= since and any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))]


def test_killed_worker_restarts_from_last_checkpoint(tmp_path: Path, shards: str, tracking: MlflowClient) -> None:
    config = tiny_config(tmp_path, shards, max_steps=150, checkpoint_every=10, max_failures=2)
    config.registry.register_model = False
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(pretrain(config)))
    started = time.time() - 1
    thread.start()
    runs = tmp_path / "runs"
    deadline = time.monotonic() + 240
    # Kill once Ray Train has committed the step-10 checkpoint (both ranks reported it).
    while time.monotonic() < deadline and thread.is_alive() and not any(
            "step-0000010" in p.read_text() for p in runs.glob("*/checkpoint_manager_snapshot.json")):
        time.sleep(0.05)
    pids = train_worker_pids(started)
    assert len(pids) == 2 and thread.is_alive(), "training finished before the kill"
    os.kill(pids[1], signal.SIGKILL)
    thread.join(timeout=300)

    assert results and results[0].steps == 150
    run = tracking.get_run(results[0].mlflow_run_id)
    restored = tracking.get_metric_history(run.info.run_id, "restored_from_step")
    assert len(restored) == 1 and restored[0].value >= 10  # it restarted once, from a checkpoint
    assert sorted(loss_by_step(tracking, run.info.run_id)) == list(range(1, 151))
    assert run.info.status == "FINISHED"


def test_stop_and_resume_equals_a_straight_run(tmp_path: Path, shards: str, tracking: MlflowClient) -> None:
    straight = pretrain(tiny_config(tmp_path / "a", shards, max_steps=16, checkpoint_every=4).model_copy(
        update={"run_name": "straight"}))
    stopped = pretrain(tiny_config(tmp_path / "b", shards, max_steps=16, checkpoint_every=4, stop_after=7)
                       .model_copy(update={"run_name": "interrupted"}))
    assert stopped.stopped and stopped.steps == 7 and stopped.registered is None

    resumed = pretrain(tiny_config(tmp_path / "b", shards).model_copy(update={"resume": "interrupted"}))

    assert resumed.mlflow_run_id == stopped.mlflow_run_id and resumed.steps == 16
    a, b = loss_by_step(tracking, straight.mlflow_run_id), loss_by_step(tracking, resumed.mlflow_run_id)
    assert sorted(a) == sorted(b) == list(range(1, 17))
    np.testing.assert_allclose([b[s] for s in range(1, 17)], [a[s] for s in range(1, 17)], rtol=0, atol=1e-5)
    assert resumed.metrics["heldout_loss"] == pytest.approx(straight.metrics["heldout_loss"], abs=1e-5)


@pytest.mark.parametrize("args, expected", [
    (["--preset", "huge"], "model.preset"),
    (["--zero-stage", "4"], "engine.zero_stage"),
    (["--shards", "/nonexistent/shards"], "/nonexistent/shards"),
    ([], "--shards"),
])
def test_bad_config_is_one_line_before_any_worker(tmp_path: Path, shards: str, args: list[str], expected: str,
                                                  tracking: MlflowClient) -> None:
    base = ["--shards", shards] if args and "--shards" not in args else []
    run = CliRunner().invoke(app, ["pretrain", "--storage", str(tmp_path / "runs"), "--quiet", *base, *args])

    assert run.exit_code == 2, run.output
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], run.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("step-*"))


def test_resume_of_an_unknown_run_is_an_error(tmp_path: Path, shards: str) -> None:
    with pytest.raises(PipelineError, match="no run named 'nope'"):
        pretrain(tiny_config(tmp_path, shards).model_copy(update={"resume": "nope"}))


def _subprocess_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This environment less the tests' Ray, Prefect and MLflow settings: the command starts its own."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "PIPELINES_", "RAY_SERVE_")) and k != "RAY_ADDRESS"}
    return env | {"PIPELINES_HOME": str(tmp_path / "home"), **extra}


TINY_OPTIONS = ["--preset", "tiny", "--hidden-size", "64", "--intermediate-size", "176", "--vocab-size", "400",
                "--seq-len", "64", "--heldout-percent", "10", "--workers", "1", "--micro-batch", "4",
                "--eval-batches", "2", "--max-failures", "0", "--model-name", "tiny-lm", "--quiet"]


def test_failure_inside_training_is_an_infrastructure_error_and_a_resume_continues(
        tmp_path: Path, shards: str, tracking: MlflowClient) -> None:
    """A failure planted at step 7 of a run (the worker raises, no restarts left) exits 1, not 2 (worth a
    rerun, not the user's mistake), in one line naming the run to resume; the resume continues from the
    step-5 checkpoint to the end."""
    import subprocess
    import sys

    env = _subprocess_env(tmp_path, PIPELINES_FAILPOINTS="pretrain-step-7=1",
                          PIPELINES_FAILPOINTS_STATE=str(tmp_path / "failpoints"),
                          MLFLOW_TRACKING_URI=os.environ["MLFLOW_TRACKING_URI"])
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "pretrain", "--shards", shards, "--storage",
                           str(tmp_path / "runs"), "--run-name", "planted", "--max-steps", "12",
                           "--checkpoint-every", "5", *TINY_OPTIONS],
                          env=env, capture_output=True, text=True, timeout=600)

    assert proc.returncode == 1, (proc.stdout + proc.stderr)[-4000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training failed" in errors[0] and "planted failure 1 of 1" in errors[0], proc.stderr
    assert "--resume planted" in errors[0]
    assert proc.stderr.strip().splitlines()[-1] == errors[0]  # (Ray shows the worker's traceback before it)

    resumed = pretrain(tiny_config(tmp_path, shards, workers=1, zero_stage=0, max_steps=12, checkpoint_every=5)
                       .model_copy(update={"resume": "planted"}))
    assert resumed.steps == 12 and not resumed.stopped
    restored = tracking.get_metric_history(resumed.mlflow_run_id, "restored_from_step")
    assert [m.value for m in restored] == [5]
    assert sorted(loss_by_step(tracking, resumed.mlflow_run_id)) == list(range(1, 13))


def test_flow_retries_a_training_run_that_failed_inside_and_continues_it(tmp_path: Path, shards: str) -> None:
    """`pipelines flow pretrain` with a failure planted inside the training run: Prefect retries the stage
    (an infrastructure failure, not a user mistake), and the retry continues the same run from its last
    checkpoint rather than starting over; one model version comes out."""
    import subprocess
    import sys

    env = _subprocess_env(tmp_path, PIPELINES_FAILPOINTS="pretrain-step-7=1",
                          PIPELINES_FAILPOINTS_STATE=str(tmp_path / "failpoints"))
    sets = {"data.shards": shards, "model.hidden_size": 64, "model.intermediate_size": 176,
            "tokenizer.vocab_size": 400, "data.seq_len": 64, "data.heldout_percent": 10, "engine.workers": 1,
            "engine.micro_batch": 4, "engine.eval_batches": 2, "engine.max_steps": 12,
            "engine.checkpoint_every": 5, "engine.max_failures": 0, "registry.model_name": "flow-lm"}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    summary = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "flow", "pretrain", "-c",
                           str(Path(__file__).parents[2] / "configs/pretrain/lm-tiny.yaml"), *args,
                           "--summary-json", str(summary)],
                          env=env, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parents[2])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "planted failure 1 of 1" in output  # it did fail inside the run, once
    result = json.loads(summary.read_text())
    assert result["state"] == "Completed" and result["runs"] == 2 and result["result"]["steps"] == 12, result
    assert result["result"]["model_uri"] == "models:/flow-lm/1"
    client = MlflowClient(f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    run_id = result["result"]["mlflow_run_id"]
    assert [m.value for m in client.get_metric_history(run_id, "restored_from_step")] == [5]  # continued
    assert sorted(loss_by_step(client, run_id)) == list(range(1, 13))
    assert [str(v.version) for v in client.search_model_versions("name='flow-lm'")] == ["1"]
