"""`pipelines eval`: lm-evaluation-harness against the served tiny model, its scores in MLflow, the gate.

A 2-layer Llama (a 512-token context, so no item is truncated) with the serving tests' byte-level BPE, registered
twice (v1 champion, v2 candidate) and a LoRA adapter on v1, in MLflow on a SQLite file; real Ray Serve replicas on
loopback. The harness's per-item log-likelihoods are checked against the same weights run here with transformers.
"""

from __future__ import annotations

import functools
import gc
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from mlflow import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.errors import PipelineError
from pipelines.evaluate.config import EvalConfig
from pipelines.evaluate.run import EvalResult, evaluate
from pipelines.runtime import free_port
from pipelines.serve.vllm_engine import vllm_available
from tests.serve.tiny import tiny_tokenizer

pytestmark = pytest.mark.timeout(600)
TOLERANCE = 1e-4
CONTEXT = 512


# -- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowClient]:
    """A fresh MLflow on a SQLite file for the module; no hub."""
    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIPELINES_HOME", str(root / "home"))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.delenv("PIPELINES_API_KEYS", raising=False)
        mp.delenv("OPENAI_API_KEY", raising=False)
        yield MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def tiny_lm(folder: Path, seed: int) -> Path:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1,
        num_key_value_heads=1, max_position_embeddings=CONTEXT, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def lora(base: Path, folder: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))  # B != 0: it counts
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tracking: MlflowClient, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """models:/lm/1 (champion, seed 0), models:/lm/2 (candidate, seed 1), models:/lm-lora/1 on lm/1."""
    from pipelines.train.registry import register_adapter, register_model, training_run

    root = tmp_path_factory.mktemp("models")
    folders = {"lm/1": tiny_lm(root / "v1", 0), "lm/2": tiny_lm(root / "v2", 1)}
    folders["lm-lora/1"] = lora(folders["lm/1"], root / "lora")
    for value, key in ((10.0, "lm/1"), (20.0, "lm/2")):  # perplexity: v1 stays champion
        with training_run("pretrain", None, {}) as run_id:
            pass
        register_model(str(folders[key]), "lm", run_id=run_id, metric="heldout_perplexity", value=value)
    with training_run("finetune", None, {}) as run_id:
        pass
    register_adapter(str(folders["lm-lora/1"]), "lm-lora", run_id=run_id, base_uri="models:/lm/1",
                     metric="heldout_loss", value=1.0)
    aliases = tracking.get_registered_model("lm").aliases
    assert {k: int(v) for k, v in aliases.items()} == {"champion": 1, "candidate": 2}
    return folders


def loglikelihoods(model, tokenizer, arguments: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy) of each (context, continuation) with transformers, split into tokens as the harness
    splits them for a causal model (a context's trailing spaces go to the continuation; the continuation's tokens
    are those of the whole text after the context's)."""
    out = []
    for context, continuation in arguments:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ids = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
        assert len(ids) < CONTEXT, "the harness would truncate this item"
        with torch.no_grad():
            table = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        picked = [float(table[i - 1, ids[i]]) for i in range(start, len(ids))]
        greedy = all(int(table[i - 1].argmax()) == ids[i] for i in range(start, len(ids)))
        out.append((sum(picked), greedy))
    return out


def assert_harness_scored_the_weights(result: EvalResult, model, tokenizer) -> None:
    """Every choice's log-likelihood the harness got through the endpoint is the model's; acc (the likeliest choice
    is right) and acc_norm (the likeliest per character) follow from them."""
    samples = result.harness["samples"]["demo-cloze"]
    hits, hits_norm = [], []
    for sample in samples:
        expected = loglikelihoods(model, tokenizer, [tuple(a) for a in sample["arguments"]])
        served = [tuple(r) for r in sample["filtered_resps"]]
        assert [r[0] for r in sample["resps"]] == served
        assert max(abs(s[0] - e[0]) for s, e in zip(served, expected, strict=True)) < TOLERANCE
        assert [s[1] for s in served] == [e[1] for e in expected]
        hits.append(max(range(len(expected)), key=lambda i: expected[i][0]) == sample["target"])
        per_char = [e[0] / len(choice) for e, choice in zip(expected, sample["doc"]["choices"], strict=True)]
        hits_norm.append(max(range(len(per_char)), key=per_char.__getitem__) == sample["target"])
    assert result.scores["demo-cloze/acc"] == pytest.approx(sum(hits) / len(hits))
    assert result.scores["demo-cloze/acc_norm"] == pytest.approx(sum(hits_norm) / len(hits_norm))


class NetworkWatch:
    """Every host this process looks up or connects to while `active` (an audit hook: it sees every socket)."""

    LOCAL = {"127.0.0.1", "::1", "localhost", socket.gethostname()}

    def __init__(self) -> None:
        self.active, self.seen = False, set()
        sys.addaudithook(self._hook)  # hooks cannot be removed: this one only records while active

    def _hook(self, event: str, args: tuple) -> None:
        if not self.active:
            return
        if event == "socket.getaddrinfo":
            self.seen.add(str(args[0]))
        elif event == "socket.connect" and isinstance(args[1], tuple):
            self.seen.add(str(args[1][0]))

    def remote(self) -> set[str]:
        own = {socket.gethostbyname(socket.gethostname())}
        return {host for host in self.seen if host not in self.LOCAL | own and not host.startswith("127.")}


@functools.cache
def network_watch() -> NetworkWatch:
    """One watch for the session, made by the test that needs it (a hook sees every audited event after it)."""
    return NetworkWatch()


# -- the stage starts its own server (before the module's endpoint is up) ---------------------------------
def test_an_adapter_is_served_on_its_base_and_scored_through_it(ray_cluster: None, tracking: MlflowClient,
                                                                models: dict[str, Path]) -> None:
    """Without --endpoint the stage serves the adapter on its base itself, asks for BASE:ADAPTER, and stops the
    server; the harness's log-likelihoods are the adapted model's, and the scores go to the adapter's run."""
    from peft import PeftModel
    from ray import serve

    result = evaluate(EvalConfig(model="models:/lm-lora@champion", tasks=["demo-cloze"], limit=8, quiet=True))

    assert (result.model_uri, result.served_as) == ("models:/lm-lora/1", "lm:lm-lora")
    assert not serve.status().applications  # stopped
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["lm/1"]), models["lm-lora/1"])
    assert_harness_scored_the_weights(result, adapted.eval(), AutoTokenizer.from_pretrained(models["lm/1"]))
    adapter_run = tracking.get_model_version("lm-lora", "1").run_id
    assert result.run_id == adapter_run
    assert tracking.get_run(adapter_run).data.metrics["eval/demo-cloze/acc"] == result.scores["demo-cloze/acc"]
    base_run = tracking.get_model_version("lm", "1").run_id
    assert not any(k.startswith("eval/") for k in tracking.get_run(base_run).data.metrics)


# -- against a running endpoint ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def endpoint(ray_cluster: None, models: dict[str, Path]) -> Iterator[str]:
    """`pipelines serve` of models:/lm/2 through Serve's proxy on a free port."""
    from ray import serve

    from pipelines.serve.app import serve_model
    from pipelines.serve.config import ServeConfig

    url = serve_model(ServeConfig(model="models:/lm/2", port=free_port(), ingress="proxy", watch_interval_s=0,
                                  blocking=False))
    yield str(url)
    serve.shutdown()


def test_local_completions_scores_are_the_models_log_likelihoods(endpoint: str, models: dict[str, Path],
                                                                  tracking: MlflowClient) -> None:
    """The shipped multiple-choice task through lm-eval's local-completions, 4 requests at a time: every item's
    log-likelihoods equal (within 1e-4) those of the same weights run here; nothing but loopback is asked."""
    watch = network_watch()
    watch.active = True
    gc.disable()  # the harness's client sits in reference cycles: what a collection would close must be closed
    try:
        result = evaluate(EvalConfig(model="models:/lm/2", endpoint=endpoint, tasks=["demo-cloze"], limit=20,
                                     num_concurrent=4, quiet=True))
        port = int(endpoint.rsplit(":", 1)[1].split("/")[0])
        left = [c for c in psutil.Process().net_connections("tcp")
                if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED]
    finally:
        gc.enable()
        watch.active = False
    # no connection of the harness is left open to the endpoint: when the endpoint stops first, its side keeps
    # the port in TIME_WAIT, which Serve's direct ingress cannot bind for a minute
    assert left == [], left

    assert "127.0.0.1" in watch.seen and watch.remote() == set(), watch.seen  # it watched, and saw loopback
    # where the vLLM environment is installed (make venv), vLLM's engine computed these log-likelihoods
    engine = httpx.get(f"{endpoint}/healthz", timeout=10).json()["engine"]
    assert engine == ("vllm" if vllm_available() else "transformers")
    assert len(result.harness["samples"]["demo-cloze"]) == 20
    model = AutoModelForCausalLM.from_pretrained(models["lm/2"]).eval()
    assert_harness_scored_the_weights(result, model, AutoTokenizer.from_pretrained(models["lm/2"]))
    assert result.harness["config"]["model_args"]["max_length"] == CONTEXT  # the endpoint's max_model_len
    assert result.harness["config"]["model"] == "local-completions"


def test_scores_go_to_the_versions_run_and_the_gate_moves_the_alias_only_when_the_metric_passes(
        endpoint: str, tracking: MlflowClient, capsys: pytest.CaptureFixture[str]) -> None:
    def run(threshold: float | None) -> EvalResult:
        gate = {"metric": "demo-cloze/acc", "threshold": threshold} if threshold is not None else {}
        return evaluate(EvalConfig(model="models:/lm@candidate", endpoint=endpoint, tasks=["demo-cloze"], limit=12,
                                   gate=gate))

    first = run(None)
    acc = first.scores["demo-cloze/acc"]
    assert first.gate is None and first.model_uri == "models:/lm/2"
    run_id = tracking.get_model_version("lm", "2").run_id
    assert first.run_id == run_id
    metrics = tracking.get_run(run_id).data.metrics
    assert metrics["eval/demo-cloze/acc"] == acc and "eval/demo-cloze/acc_stderr" in metrics
    assert "eval/demo-cloze/acc_norm" in metrics
    assert tracking.get_model_version("lm", "2").tags["eval/demo-cloze/acc"] == repr(acc)
    artifacts = {f.path for f in tracking.list_artifacts(run_id, first.artifacts)}
    assert artifacts == {f"{first.artifacts}/results.json", f"{first.artifacts}/samples-demo-cloze.jsonl"}
    printed = capsys.readouterr().out
    assert "demo-cloze" in printed and f"{acc:.4f}" in printed and run_id in printed

    # A threshold above the score: champion stays on v1.
    missed = run(acc + 0.05)
    assert missed.gate is not None and (missed.gate.passed, missed.gate.moved) == (False, False)
    assert int(tracking.get_registered_model("lm").aliases["champion"]) == 1
    assert missed.gate.message == (f"demo-cloze/acc = {acc:g} < {acc + 0.05:g} (higher is better): champion not "
                                   "moved, it stays on version 1")
    assert f"gate: {missed.gate.message}" in capsys.readouterr().out

    # The score itself is enough (at least the threshold): champion moves to v2.
    passed = run(acc)
    assert passed.gate is not None and (passed.gate.passed, passed.gate.moved) == (True, True)
    assert int(tracking.get_registered_model("lm").aliases["champion"]) == 2
    assert passed.gate.message.endswith("champion moved to lm version 2 (was version 1)")
    history = tracking.get_metric_history(run_id, "eval/demo-cloze/acc")
    assert [m.value for m in history][-3:] == [acc] * 3  # one per evaluation, the same items each time
    tracking.set_registered_model_alias("lm", "champion", "1")


def test_the_command_and_its_one_line_errors(endpoint: str, tracking: MlflowClient) -> None:
    # The tag `demo`: both shipped tasks; the generation task decides.
    args = ["eval", "--model", "models:/lm/2", "--endpoint", endpoint, "--tasks", "demo", "--limit", "3",
            "--metric", "demo-qa/exact_match", "--threshold", "1.0", "--alias", "best"]
    run = CliRunner().invoke(app, args)

    assert run.exit_code == 0, run.output
    assert "gate: demo-qa/exact_match = 0 < 1 (higher is better): best not moved, it is on no version" in run.stdout
    metrics = tracking.get_run(tracking.get_model_version("lm", "2").run_id).data.metrics
    for name in ("demo-qa/exact_match", "demo-cloze/acc", "demo-cloze/acc_norm"):
        assert name.split("/")[1] in run.stdout and f"eval/{name}" in metrics

    def one_line_error(*args: str) -> str:
        run = CliRunner().invoke(app, ["eval", *args])
        assert run.exit_code == 2, run.output
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
        return lines[0]

    assert "unknown task 'demo-qaa' (did you mean demo-qa " in one_line_error(
        "--model", "models:/lm/2", "--endpoint", endpoint, "--tasks", "demo-qaa")
    assert "models:/nope@champion: no such registered model version" in one_line_error(
        "--model", "models:/nope@champion")
    closed = f"http://127.0.0.1:{free_port()}"
    assert f"endpoint {closed} unreachable" in one_line_error("--model", "models:/lm/2", "--endpoint", closed)
    assert f"endpoint {endpoint} serves version 2 of lm, not version 1 (models:/lm/1)" in one_line_error(
        "--model", "models:/lm/1", "--endpoint", endpoint)
    assert f"endpoint {endpoint} serves no version of lm-lora, not version 1 (models:/lm-lora/1)" in one_line_error(
        "--model", "models:/lm-lora/1", "--endpoint", endpoint)
    assert "gate metric demo-qa/acc: task demo-qa is not among the tasks run (demo-cloze)" in one_line_error(
        "--model", "models:/lm/2", "--tasks", "demo-cloze", "--metric", "demo-qa/acc", "--threshold", "0.5")


def test_without_an_endpoint_it_will_not_replace_a_running_app(endpoint: str, models: dict[str, Path]) -> None:
    with pytest.raises(PipelineError, match="Ray Serve already runs here .*give the URL of the endpoint"):
        evaluate(EvalConfig(model="models:/lm/2", tasks=["demo-cloze"], limit=2))
