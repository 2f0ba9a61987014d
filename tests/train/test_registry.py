"""The MLflow side of training against a real MLflow (SQLite file in tmp_path) and a real tiny model.

The model is a 2-layer Llama built from a config and a byte-level BPE trained here: nothing comes
from the Hugging Face hub, and a guard fails the test if anything tries to resolve a remote host.
"""

from __future__ import annotations

import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipelines.errors import PipelineError
from pipelines.train.registry import (
    load_registered,
    log_metrics,
    log_shards_input,
    register_model,
    training_run,
)

EOS = "<|endoftext|>"
CORPUS = ["the quick brown fox jumps over the lazy dog", "a model reads the shards and learns the words",
          "hello world, tiny models generate tiny text"]
MANIFEST = {
    "format": "pipelines.shards/v1", "kind": "text", "digest": "f" * 8 + "0123456789abcdef" * 3 + "e" * 8,
    "created": "2026-01-01T00:00:00Z", "samples": 7,
    "shards": [{"name": 0, "tar": "00000.tar", "samples": 4, "sha256": "a" * 64},
               {"name": 1, "tar": "00001.tar", "samples": 3, "sha256": "b" * 64}],
}


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face folder as the trainer exports it: safetensors weights, config, tokenizer."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS, bos_token=EOS)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    folder = tmp_path_factory.mktemp("hf") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite file with its tables created (MLflow's migrations take seconds; a copy none)."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def tracking(tmp_path: Path, empty_db: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MlflowClient]:
    """A fresh MLflow on a SQLite file; any name lookup of a remote host fails the test."""
    db = tmp_path / "db" / "mlflow.db"
    db.parent.mkdir()
    shutil.copyfile(empty_db, db)
    monkeypatch.setenv("PIPELINES_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    remote: list[str] = []
    getaddrinfo = socket.getaddrinfo

    def local_only(host, *args, **kwargs):
        if host not in (None, "localhost", "127.0.0.1", "::1"):
            remote.append(str(host))
            raise OSError(f"test: no network ({host})")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", local_only)
    yield MlflowClient(f"sqlite:///{db}")
    assert remote == [], f"tried to reach {remote}"


def finished_run(experiment: str, metric: str | None = None, value: float | None = None) -> str:
    with training_run(experiment, None, {"model": {"preset": "tiny"}}) as run_id:
        if metric is not None:
            log_metrics({metric: value}, step=10)
    return run_id


# -- runs ----------------------------------------------------------------------------------------
def test_training_run_logs_the_whole_config_as_flat_params(tracking: MlflowClient, tmp_path: Path) -> None:
    params = {"model": {"preset": "tiny", "hidden_size": None}, "optim": {"lr": 1e-3, "betas": [0.9, 0.95]},
              "notes": "x" * 7000, "sweep": {f"p{i}": i for i in range(150)}}
    with training_run("pretrain", "first", params, tags={"stage": "pretrain"}) as run_id:
        log_metrics({"loss": 2.5, "lr": 1e-3}, step=1)
        log_metrics({"loss": 2.0}, step=2)

    run = tracking.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "first"
    assert run.data.tags["stage"] == "pretrain"
    logged = run.data.params
    assert logged["model.preset"] == "tiny" and logged["model.hidden_size"] == "None"
    assert logged["optim.lr"] == "0.001" and logged["optim.betas"] == "[0.9, 0.95]"
    assert len(logged["notes"]) == 6000 and logged["notes"].endswith("...[truncated]")
    assert all(logged[f"sweep.p{i}"] == str(i) for i in range(150))  # more than one batch
    assert [(m.step, m.value) for m in tracking.get_metric_history(run_id, "loss")] == [(1, 2.5), (2, 2.0)]
    full = mlflow.artifacts.load_dict(f"runs:/{run_id}/config/config.json")
    assert full["notes"] == "x" * 7000
    # Artifacts beside the SQLite file, never in the working directory.
    location = tracking.get_experiment(run.info.experiment_id).artifact_location
    assert location.startswith((tmp_path / "db" / "mlartifacts").as_uri())


def test_a_run_whose_body_raises_ends_failed(tracking: MlflowClient) -> None:
    with pytest.raises(ValueError, match="diverged"):
        with training_run("pretrain", "broken", {"lr": 10}) as run_id:
            raise ValueError("loss diverged")
    assert tracking.get_run(run_id).info.status == "FAILED"
    assert mlflow.active_run() is None


def test_resuming_a_run_keeps_its_params_and_adds_new_ones(tracking: MlflowClient) -> None:
    with training_run("pretrain", "job", {"engine": {"max_steps": 100, "stop_after": 10}}) as run_id:
        log_metrics({"loss": 3.0}, step=10)
    with training_run("pretrain", None, {"engine": {"max_steps": 100, "stop_after": None, "resumed": True}},
                      run_id=run_id) as resumed:
        log_metrics({"loss": 2.0}, step=20)

    assert resumed == run_id
    run = tracking.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"engine.max_steps": "100", "engine.stop_after": "10", "engine.resumed": "True"}
    assert [m.step for m in tracking.get_metric_history(run_id, "loss")] == [10, 20]
    assert len(tracking.search_runs([run.info.experiment_id])) == 1
    with pytest.raises(PipelineError, match="no-such-run"):
        with training_run("pretrain", None, {}, run_id="no-such-run"):
            pass


def test_log_metrics_by_run_id_leaves_the_run_alone(tracking: MlflowClient) -> None:
    run_id = finished_run("pretrain")
    log_metrics({"heldout_loss": 1.25}, step=7, run_id=run_id)  # as a Ray worker would
    run = tracking.get_run(run_id)
    assert run.data.metrics["heldout_loss"] == 1.25 and run.info.status == "FINISHED"
    assert mlflow.active_run() is None
    with pytest.raises(RuntimeError, match="no run"):
        log_metrics({"loss": 1.0}, step=1)


# -- lineage -------------------------------------------------------------------------------------
def test_log_shards_input_records_the_dataset_and_keeps_the_manifest(tracking: MlflowClient, tmp_path: Path) -> None:
    shards = tmp_path / "data" / "curated"
    with training_run("pretrain", None, {}) as run_id:
        log_shards_input(str(shards), MANIFEST)

    run = tracking.get_run(run_id)
    [dataset_input] = run.inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert dataset.digest == MANIFEST["digest"][:36]  # MLflow keeps at most 36 characters
    assert dataset.name == "curated"
    assert json.loads(dataset.source) == {"uri": str(shards)} and dataset.source_type == "local"
    profile = json.loads(dataset.profile)
    assert profile["digest"] == MANIFEST["digest"]
    assert (profile["samples"], profile["shards"], profile["kind"]) == (7, 2, "text")
    assert [c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]] == ["key", "text"]
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"
    assert run.data.tags["lineage.training.digest"] == MANIFEST["digest"]
    assert run.data.tags["lineage.training.url"] == str(shards)
    assert mlflow.artifacts.load_dict(f"runs:/{run_id}/lineage/training/manifest.json") == MANIFEST


def test_log_shards_input_takes_any_fsspec_url_and_rejects_non_manifests(tracking: MlflowClient) -> None:
    with training_run("pretrain", None, {}) as run_id:
        log_shards_input("s3://bucket/crawl/shards/", MANIFEST, context="eval")
        log_shards_input("memory://scratch/heldout", MANIFEST, context="heldout")
        with pytest.raises(PipelineError, match="not a shard manifest"):
            log_shards_input("s3://bucket/x", {"shards": []})
    inputs = {i.dataset.name: i.dataset for i in tracking.get_run(run_id).inputs.dataset_inputs}
    assert inputs["shards"].source_type == "s3"
    assert json.loads(inputs["shards"].source) == {"uri": "s3://bucket/crawl/shards/"}
    assert inputs["heldout"].source_type == "fsspec"
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        log_shards_input("s3://bucket/x", MANIFEST)


# -- registry ------------------------------------------------------------------------------------
def test_champion_moves_only_to_a_better_version(tracking: MlflowClient, hf_folder: Path) -> None:
    lineage = {"shards_digest": MANIFEST["digest"], "shards_url": "/data/curated"}

    def register(value: float) -> tuple:
        run_id = finished_run("pretrain")
        reg = register_model(str(hf_folder), "lm-tiny", run_id=run_id, metric="heldout_perplexity", value=value,
                             lineage=lineage, extra_tags={"preset": "tiny"})
        return run_id, reg

    run1, first = register(40.0)
    assert (first.version, first.champion, first.previous_champion, first.previous_metric) == (1, True, None, None)
    assert first.uri == "models:/lm-tiny/1"
    _, worse = register(55.0)
    assert (worse.version, worse.champion, worse.previous_champion, worse.previous_metric) == (2, False, 1, 40.0)
    assert int(tracking.get_model_version_by_alias("lm-tiny", "candidate").version) == 2
    assert int(tracking.get_model_version_by_alias("lm-tiny", "champion").version) == 1
    _, better = register(31.5)
    assert (better.version, better.champion, better.previous_champion, better.previous_metric) == (3, True, 1, 40.0)
    aliases = tracking.get_registered_model("lm-tiny").aliases
    assert {alias: int(v) for alias, v in aliases.items()} == {"candidate": 3, "champion": 3}

    v1 = tracking.get_model_version("lm-tiny", "1")
    assert v1.run_id == run1 and float(v1.tags["heldout_perplexity"]) == 40.0
    assert v1.tags["lineage.shards_digest"] == MANIFEST["digest"] and v1.tags["lineage.shards_url"] == "/data/curated"
    assert v1.tags["preset"] == "tiny"
    assert tracking.get_run(run1).data.metrics["heldout_perplexity"] == 40.0  # recorded on the run too

    # Without its tag, the champion's value comes from its run's metric; a tie keeps the champion.
    tracking.delete_model_version_tag("lm-tiny", "3", "heldout_perplexity")
    _, tie = register(31.5)
    assert (tie.champion, tie.previous_champion, tie.previous_metric) == (False, 3, 31.5)

    run_id = finished_run("pretrain")  # higher is better: accuracy, on another model
    up = [register_model(str(hf_folder), "lm-acc", run_id=run_id, metric="accuracy", value=v, lower_is_better=False)
          for v in (0.5, 0.4, 0.6)]
    assert [r.champion for r in up] == [True, False, True]


def test_a_registered_model_loads_back_and_generates(tracking: MlflowClient, hf_folder: Path) -> None:
    reg = register_model(str(hf_folder), "lm-gen", run_id=finished_run("pretrain"), metric="heldout_perplexity",
                         value=12.0)
    assert reg.champion

    model, tokenizer = load_registered("models:/lm-gen@candidate")
    saved = load_file(hf_folder / "model.safetensors")
    loaded = model.state_dict()
    assert saved.keys() <= loaded.keys()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())
    assert tokenizer.eos_token == EOS and tokenizer("the quick")["input_ids"]
    prompt = tokenizer("the quick brown", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 6
    same, _ = load_registered(reg.uri)
    assert all(torch.equal(same.state_dict()[k], v) for k, v in loaded.items())

    # The version is an MLflow transformers model: its own loaders work on the alias too.
    generator = mlflow.transformers.load_model("models:/lm-gen@champion")
    assert generator("the quick", max_new_tokens=4, do_sample=False)[0]["generated_text"].startswith("the quick")
    predictor = mlflow.pyfunc.load_model("models:/lm-gen@champion")
    [text] = predictor.predict(["hello world"], params={"max_new_tokens": 4})
    assert isinstance(text, str) and text.startswith("hello world")


def test_an_unknown_model_uri_is_a_pipeline_error(tracking: MlflowClient, hf_folder: Path) -> None:
    register_model(str(hf_folder), "lm-x", run_id=finished_run("pretrain"), metric="ppl", value=1.0)
    for uri in ["models:/no-such-model@candidate", "models:/lm-x@no-such-alias", "models:/lm-x/99",
                "runs:/abc/model", "models:/lm-x"]:
        with pytest.raises(PipelineError) as err:
            load_registered(uri)
        assert uri in str(err.value) and "\n" not in str(err.value)


def test_register_model_names_a_bad_folder_or_run(tracking: MlflowClient, hf_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="no config.json"):
        register_model(str(tmp_path), "lm-bad", run_id=finished_run("pretrain"), metric="ppl", value=1.0)
    with pytest.raises(PipelineError, match="no-such-run"):
        register_model(str(hf_folder), "lm-bad", run_id="no-such-run", metric="ppl", value=1.0)
