"""`pipelines finetune` on CPU: LoRA on a tiny registered base with real Ray Train workers, DeepSpeed,
peft and MLflow; the examples go through the real shard writer."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.train import registry
from pipelines.train.config import ModelConfig
from pipelines.train.finetune import FinetuneConfig, finetune
from pipelines.train.model import build_model, model_config
from pipelines.train.tokenizer import train_tokenizer
from tests.train.test_pretrain import train_worker_pids

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]

WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "candle", "forest", "rocket", "garden",
         "silver"]


def answer(word: str) -> str:
    return f"<answer>{word}</answer>"


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowClient]:
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        registry.configure_tracking()  # also mlflow's process-wide URI, which an earlier module may have set
        yield MlflowClient(uri)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, tracking: MlflowClient) -> str:
    """A tiny Llama briefly pretrained (a plain loop, 150 steps) on sentences about the task's words and
    on bare `<answer>WORD</answer>` fragments, never after a question: it knows the tokens, not the
    task. Registered as tiny-base v1."""
    import mlflow

    folder = tmp_path_factory.mktemp("base")
    rng = np.random.default_rng(5)
    corpus = [" ".join(f"the {rng.choice(WORDS)} is near the {rng.choice(WORDS)}." if rng.random() < 0.7
                       else answer(str(rng.choice(WORDS))) for _ in range(6)) for _ in range(300)]
    tokenizer = train_tokenizer(corpus + [f"user: Name the word: {w}\nassistant: " for w in WORDS], 400, str(folder))
    config = model_config(ModelConfig(hidden_size=64, intermediate_size=176), len(tokenizer), 64,
                          tokenizer.bos_token_id, tokenizer.eos_token_id)
    model = build_model(config, seed=3)
    ids = torch.tensor([i for text in corpus for i in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]])
    sequences = ids[: len(ids) // 64 * 64].view(-1, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(150):
        batch = sequences[(step * 8) % (len(sequences) - 8):][:8]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder, safe_serialization=True)
    experiment = registry._experiment_id("test-base")
    with mlflow.start_run(experiment_id=experiment) as run:
        pass
    registered = registry.register_model(str(folder), "tiny-base", run_id=run.info.run_id, metric="heldout_loss",
                                         value=9.0)
    return registered.uri


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(11)
    path = tmp_path_factory.mktemp("examples") / "toy.jsonl"
    rows = []
    for i in range(240):
        word = str(rng.choice(WORDS))
        if i % 2:
            rows.append({"prompt": f"Name the word: {word}", "response": answer(word)})
        else:
            rows.append({"messages": [{"role": "user", "content": f"Name the word: {word}"},
                                      {"role": "assistant", "content": answer(word)}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lora_config(tmp_path: Path, base: str, examples: Path, **engine: Any) -> FinetuneConfig:
    return FinetuneConfig.model_validate({
        "base": base,
        "lora": {"rank": 8, "alpha": 16, "lora_dropout": 0.0,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "examples": {"data": str(examples), "seq_len": 32, "heldout_percent": 10},
        "optim": {"lr": 1e-2, "warmup_steps": 5},
        "engine": {"workers": 2, "zero_stage": 2, "micro_batch": 8, "max_steps": 80, "checkpoint_every": 20,
                   "eval_batches": 4, **engine},
        "registry": {"model_name": "toy-lora"},
        "storage": str(tmp_path / "runs"), "quiet": True})


def generate(model: Any, tokenizer: Any, word: str) -> str:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": f"Name the word: {word}"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_lora_learns_the_format_only_lora_changes_and_merge_matches(
        tmp_path: Path, base: str, examples: Path, tracking: MlflowClient) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = lora_config(tmp_path, base, examples)
    config.lora.merge = True

    result = finetune(config)

    assert result.base == "models:/tiny-base/1" and result.steps == 80
    before, after = result.metrics["heldout_loss_before"], result.metrics["heldout_loss"]
    assert after < 0.5 * before, (before, after)
    base_model, tokenizer = registry.load_registered(base)
    base_answers = [generate(base_model, tokenizer, w) for w in WORDS[:4]]
    assert not any(a.startswith("<answer>") for a in base_answers), base_answers  # the base does not know it

    # The adapter, from the registry by alias, pinned to the base version.
    version = tracking.get_model_version_by_alias("toy-lora", "candidate")
    assert version.tags["base_model"] == "models:/tiny-base/1" and result.registered.champion
    folder, pinned = registry.load_adapter("models:/toy-lora@candidate")
    assert pinned == "models:/tiny-base/1"
    tuned = PeftModel.from_pretrained(registry.load_registered(pinned)[0], folder).eval()
    answers = [generate(tuned, tokenizer, w) for w in WORDS]
    assert sum(a.startswith("<answer>") and a.endswith("</answer>") for a in answers) >= 0.8 * len(WORDS), answers

    # Only the LoRA matrices changed: the adapter holds r x (in + out) per adapted linear layer, nothing else,
    # and the base weights inside the tuned model are the registered base's.
    adapter = load_file(Path(folder) / "adapter_model.safetensors")
    linears = {n: m for n, m in base_model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1]
               in config.lora.target_modules}
    assert len(adapter) == 2 * len(linears) == 2 * 7 * 2
    assert sum(t.numel() for t in adapter.values()) == sum(8 * (m.in_features + m.out_features)
                                                          for m in linears.values())
    assert all(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)  # lora_B starts at zero: it trained
    base_state = base_model.state_dict()
    for name, tensor in tuned.state_dict().items():
        if "lora_" not in name:
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            torch.testing.assert_close(tensor, base_state[key], rtol=0, atol=0)

    # Merged and unmerged give the same logits.
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir).eval()
    assert AutoTokenizer.from_pretrained(result.merged_dir).chat_template == tokenizer.chat_template
    ids = tokenizer(["user: Name the word: tiger\nassistant: "], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, tuned(ids).logits, rtol=0, atol=1e-5)
    assert result.registered_merged.uri == "models:/toy-lora-merged/1"


def test_killed_worker_finishes_from_its_checkpoint(tmp_path: Path, base: str, examples: Path,
                                                    tracking: MlflowClient) -> None:
    config = lora_config(tmp_path, base, examples, max_steps=150, checkpoint_every=10, max_failures=2)
    config.registry.register_model = False
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(finetune(config)))
    started = time.time() - 1
    thread.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and thread.is_alive() and not any(
            "step-0000010" in p.read_text() for p in (tmp_path / "runs").glob("*/checkpoint_manager_snapshot.json")):
        time.sleep(0.05)
    pids = train_worker_pids(started)
    assert len(pids) == 2 and thread.is_alive(), "fine-tuning finished before the kill"
    os.kill(pids[0], signal.SIGKILL)
    thread.join(timeout=300)

    assert results and results[0].steps == 150 and Path(results[0].adapter_dir, "adapter_config.json").is_file()
    restored = tracking.get_metric_history(results[0].mlflow_run_id, "restored_from_step")
    assert len(restored) == 1 and restored[0].value >= 10
    assert results[0].metrics["heldout_loss"] < results[0].metrics["heldout_loss_before"]


@pytest.mark.parametrize("base_uri, expected", [
    ("models:/no-such-model@champion", "models:/no-such-model@champion"),
    ("models:/tiny-base@nope", "models:/tiny-base@nope"),
    ("/nonexistent/folder", "/nonexistent/folder"),
])
def test_a_base_that_does_not_exist_is_one_line(tmp_path: Path, base: str, examples: Path, base_uri: str,
                                               expected: str) -> None:
    run = CliRunner().invoke(app, ["finetune", "--base", base_uri, "--data", str(examples), "--storage",
                                   str(tmp_path / "runs"), "--quiet"])

    assert run.exit_code == 2, run.output
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], run.stderr
