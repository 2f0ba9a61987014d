"""The end-to-end flow, run as a user runs it (`pipelines flow end-to-end` in its own process, Prefect's
ephemeral API, a local Ray, MLflow on SQLite) on a small sample web served on loopback.

Three runs on one state folder: the first with a planted transient failure in the text curation
(retried, the flow completes, the endpoint answers); the second unchanged (every stage from the
cache); the third with a changed text-curation config (curate-text and everything after it rerun).
What ran is read back from Prefect's own records, not only from the flow's summary.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from mlflow import MlflowClient

from pipelines.demo import build_sample, serve
from tests.curate.loading import assert_loadable
from tests.serve.conftest import _free_port_pair

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CACHED_STAGES = ["crawl-images", "crawl-text", "curate-images", "curate-text", "pretrain", "finetune", "pretrain-clip",
                 "pretrain-autoencoder", "encode", "pretrain-diffusion"]


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    root = tmp_path_factory.mktemp("sample")
    server = serve(root / "www", 0)
    paths = build_sample(root, f"http://127.0.0.1:{server.server_address[1]}", n_images=40, n_pages=60)
    yield paths
    server.shutdown()


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory, sample: dict[str, Path]) -> dict[str, Any]:
    """The state folder and config the three runs share."""
    root = tmp_path_factory.mktemp("e2e")
    config = yaml.safe_load((ROOT / "configs/flows/demo.yaml").read_text())
    config["workdir"] = str(root / "work")
    config["images"]["input"] = str(sample["images"])
    config["text"]["input"] = str(sample["pages"])
    config["finetune"]["examples"]["data"] = str(sample["instructions"])
    config["pretrain"]["data"]["heldout_percent"] = 20  # ~30 documents: keep some held out
    config["pretrain"]["engine"].update(max_steps=30, checkpoint_every=30, eval_batches=2)
    config["finetune"]["engine"].update(max_steps=20, checkpoint_every=20, eval_batches=2)
    config["clip"]["data"]["heldout_percent"] = 25  # ~35 photos: keep some held out
    config["clip"]["engine"].update(max_steps=20, checkpoint_every=20, micro_batch=8)
    images = config["diffusion"]
    images["autoencoder"]["data"]["heldout_percent"] = 25
    images["autoencoder"]["loss"]["disc_start"] = 10
    images["autoencoder"]["engine"].update(max_steps=20, checkpoint_every=20, micro_batch=8)
    images["diffusion"]["data"]["heldout_percent"] = 25
    images["diffusion"]["sampling"].update(eval_samples=4, sample_steps=2)
    images["diffusion"]["engine"].update(max_steps=20, checkpoint_every=20, micro_batch=8)
    config["eval"]["limit"] = 10  # items per task: the stage and its record, not the scores
    config["deploy"]["port"] = _free_port_pair()
    path = root / "e2e.yaml"
    path.write_text(yaml.safe_dump(config))
    return {"root": root, "config": path, "home": root / "home"}


def env_for(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment less the settings tests or Prefect put in it, so the run finds its
    own embedded defaults under `home`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "RAY_SERVE_", "PIPELINES_")) and k not in ("RAY_ADDRESS",
                                                                                              "RAY_worker_niceness")}
    return env | {"PIPELINES_HOME": str(home), "HF_HUB_OFFLINE": "1", **extra}


def run_flow(state: dict[str, Any], *args: str, **env: str) -> tuple[dict[str, Any], str]:
    summary = state["root"] / "summary.json"
    summary.unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "flow", "end-to-end", "-c", str(state["config"]),
         "--summary-json", str(summary), *args],
        cwd=ROOT, env=env_for(state["home"], **env), capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return json.loads(summary.read_text()), output


READ_RECORDS = textwrap.dedent("""
    import json, sys
    from pipelines.runtime import prefect_env
    prefect_env()
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort
    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        logs, page = [], None
        while page is None or len(page) == 200:  # all of them, a page at a time
            page = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])),
                                    limit=200, offset=len(logs))
            logs += page
        artifacts = client.read_artifacts()
    json.dump({"flow": run.name, "state": run.state.name,
               "tasks": [{"name": t.name, "state": t.state.name, "runs": t.run_count} for t in tasks],
               "logs": [l.message for l in logs], "artifacts": sorted({a.key for a in artifacts if a.key})},
              sys.stdout)
""")


def prefect_records(state: dict[str, Any]) -> dict[str, Any]:
    """The latest flow run as Prefect's API has it: its task runs (state, run count), logs, artifacts."""
    proc = subprocess.run([sys.executable, "-c", READ_RECORDS], cwd=ROOT, env=env_for(state["home"]),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def versions(state: dict[str, Any], name: str) -> list[str]:
    client = MlflowClient(f"sqlite:///{state['home'] / 'mlflow.db'}")
    return sorted(str(v.version) for v in client.search_model_versions(f"name='{name}'"))


def assert_shard_sets_load(state: dict[str, Any], summary: dict[str, Any], *stages: str) -> None:
    """Each stage's shard set, read with webdataset and Hugging Face datasets (tests/curate/loading.py)."""
    for stage in stages:
        result = summary[stage]["result"]
        cache = state["root"] / "hf-cache" / f"{stage}-{result['digest'][:12]}"  # one per content
        samples = assert_loadable(Path(result["output"]), cache)
        assert samples == result.get("samples", result.get("kept")), stage


def lineage(state: dict[str, Any], uri: str) -> dict[str, Any]:
    """`pipelines lineage URI --json` as a user runs it, on the flow's registry."""
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "lineage", uri, "--json"], cwd=ROOT,
                          env=env_for(state["home"]), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def crawl_hop(node: dict[str, Any]) -> dict[str, Any]:
    """The crawl at the end of a shard set's chain (following curate and encode hops)."""
    while node["stage"]["name"] != "crawl":
        node = node["input"]
    return node


def test_first_run_retries_a_failed_stage_and_serves(state: dict[str, Any], sample: dict[str, Path]) -> None:
    summary, output = run_flow(state, PIPELINES_FAILPOINTS="curate-text=1")

    assert "failpoint curate-text: planted failure 1 of 1" in output
    assert summary["curate-text"]["runs"] == 2 and summary["curate-text"]["state"] == "Completed"
    for stage in CACHED_STAGES:
        assert summary[stage]["state"] == "Completed", stage
    assert summary["crawl-images"]["result"]["samples"] > 0
    assert 0 < summary["curate-text"]["result"]["kept"] <= summary["crawl-text"]["result"]["samples"]
    state["first_text_digest"] = summary["curate-text"]["result"]["digest"]
    assert_shard_sets_load(state, summary, "crawl-images", "crawl-text", "curate-images", "curate-text")
    assert summary["pretrain"]["result"]["model_uri"] == "models:/demo-lm/1"
    assert summary["finetune"]["result"]["base"] == "models:/demo-lm/1"
    assert summary["finetune"]["result"]["adapter_uri"] == "models:/demo-chat/1"
    clip = summary["pretrain-clip"]["result"]
    assert clip["model_uri"] == "models:/demo-clip/1" and clip["steps"] == 20
    assert 0 <= clip["heldout_i2t_recall_at_1"] <= clip["heldout_i2t_recall_at_5"] <= 1
    # The image chain after CLIP: autoencoder -> latents -> diffusion conditioned on this run's CLIP.
    assert summary["pretrain-autoencoder"]["result"]["model_uri"] == "models:/demo-autoencoder/1"
    latents = summary["encode"]["result"]
    assert latents["autoencoder"] == "models:/demo-autoencoder/1"
    assert latents["samples"] == summary["curate-images"]["result"]["kept"]
    drawn = summary["pretrain-diffusion"]["result"]
    assert drawn["model_uri"] == "models:/demo-diffusion/1" and drawn["steps"] == 20
    assert drawn["heldout_fd_clip"] >= 0 and 0 <= drawn["heldout_clip_score"] <= 100  # 100 x cosine, floored
    deployed = summary["deploy"]["result"]
    # the endpoint generated (what a 30-step model says is another matter)
    assert deployed["model"] == "demo-lm:demo-chat" and deployed["tokens"] > 0 and isinstance(deployed["answer"], str)
    # the image model behind the same endpoint drew a picture of the size it was trained at
    assert deployed["image"]["model"] == "demo-diffusion" and deployed["image"]["size"] == "32x32"

    # lm-evaluation-harness scored the served adapter through the endpoint; the scores are on its version's run
    evaluated = summary["eval"]["result"]
    assert summary["eval"]["state"] == "Completed"
    assert evaluated["model_uri"] == "models:/demo-chat/1" and evaluated["served_as"] == "demo-lm:demo-chat"
    assert 0 <= evaluated["scores"]["demo-cloze/acc"] <= 1 and 0 <= evaluated["scores"]["demo-qa/exact_match"] <= 1
    client = MlflowClient(f"sqlite:///{state['home'] / 'mlflow.db'}")
    logged = client.get_run(client.get_model_version("demo-chat", "1").run_id).data.metrics
    assert logged["eval/demo-cloze/acc"] == evaluated["scores"]["demo-cloze/acc"]

    # `pipelines lineage` from the served adapter back to the crawl's input lists, as they are on disk.
    def sha256(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    adapter = lineage(state, "models:/demo-chat/1")
    assert adapter["kind"] == "LoRA adapter" and adapter["parents"][0]["model"] == "models:/demo-lm/1"
    text = adapter["parents"][0]["data"][0]
    assert text["digest"] == summary["curate-text"]["result"]["digest"] and text["matches"] is True
    assert text["stage"]["name"] == "curate" and text["input"]["digest"] == summary["crawl-text"]["result"]["digest"]
    assert crawl_hop(text)["stage"]["input_digest"] == sha256(sample["pages"])
    examples = adapter["data"][0]
    assert examples["role"] == "examples" and examples["matches"] is True
    assert crawl_hop(examples)["stage"]["converted_from"]["sha256"] == sha256(sample["instructions"])
    clip = lineage(state, "models:/demo-clip@champion")["data"][0]
    assert clip["digest"] == summary["curate-images"]["result"]["digest"] and clip["matches"] is True
    assert crawl_hop(clip)["stage"]["input_digest"] == sha256(sample["images"])
    diffusion = lineage(state, "models:/demo-diffusion@champion")
    assert {p["role"]: p["model"] for p in diffusion["parents"]} == {
        "text encoder": "models:/demo-clip/1", "autoencoder": "models:/demo-autoencoder/1"}
    encoded = diffusion["data"][0]
    assert encoded["digest"] == latents["digest"] and encoded["stage"]["autoencoder"] == "models:/demo-autoencoder/1"
    assert encoded["input"]["digest"] == summary["curate-images"]["result"]["digest"]
    assert crawl_hop(encoded)["stage"]["input_digest"] == sha256(sample["images"])

    records = prefect_records(state)
    assert records["flow"] and records["state"] == "Completed"
    runs = {t["name"].rsplit("-", 1)[0]: t for t in records["tasks"]}
    assert {"crawl-images", "crawl-text", "curate", "pretrain", "pretrain-clip", "finetune", "deploy",
            "smoke-request", "eval"} <= set(runs)
    curate_runs = sorted(t["runs"] for t in records["tasks"] if t["name"].startswith("curate-"))
    assert curate_runs == [1, 2]  # images once; text failed once and was retried
    # Ray's worker output reached the flow run's logs (the training loop prints its progress there)
    assert any("RayTrainWorker" in m and "loss" in m for m in records["logs"])
    assert {"crawl-images", "curate-text", "pretrain", "pretrain-mlflow-run", "pretrain-model-version",
            "finetune-model-version", "pretrain-clip-model-version", "curate-text-report", "endpoint",
            "smoke-request", "smoke-image", "pretrain-autoencoder", "encode", "pretrain-diffusion", "pretrain-diffusion-samples",
            "pretrain-diffusion-model-version", "eval"} <= set(records["artifacts"])


def test_second_run_with_unchanged_inputs_comes_from_the_cache(state: dict[str, Any]) -> None:
    summary, output = run_flow(state)

    assert {stage: summary[stage]["state"] for stage in CACHED_STAGES} == {stage: "Cached" for stage in CACHED_STAGES}
    assert summary["deploy"]["result"]["tokens"] > 0  # the endpoint is live again, on the same versions
    assert summary["deploy"]["result"]["image"]["size"] == "32x32"
    assert summary["eval"]["state"] == "Cached"  # the same version on the same tasks: the scores it had
    assert summary["pretrain"]["result"]["model_uri"] == "models:/demo-lm/1"
    assert versions(state, "demo-lm") == ["1"] and versions(state, "demo-chat") == ["1"]
    assert versions(state, "demo-clip") == ["1"]
    records = prefect_records(state)
    states = {t["name"].rsplit("-", 1)[0]: t["state"] for t in records["tasks"]}
    assert states["pretrain"] == states["finetune"] == states["crawl-text"] == "Cached"
    assert states["deploy"] == "Completed"
    # The summary table, piped (not a terminal): each path on one line, not folded at 80 columns.
    report = f"{state['root']}/work/curated/text/report.html"
    assert any(report in line for line in output.splitlines()), output[-3000:]


def curate_text_with(state: dict[str, Any], min_words: int) -> tuple[dict[str, Any], str]:
    """The flow up to the fine-tune with the text curation's length rule at `min_words`."""
    config = yaml.safe_load((ROOT / "configs/curate/text-docs.yaml").read_text())
    assert config["steps"][0]["step"] == "length"
    config["steps"][0]["min_words"] = min_words
    path = state["root"] / f"text-docs-{min_words}.yaml"
    path.write_text(yaml.safe_dump(config))
    return run_flow(state, "--set", f"text.curate={path}", "--set", "until=finetune")


def test_changed_curation_config_reruns_curate_and_what_follows(state: dict[str, Any]) -> None:
    # a rule that now drops documents: curate-text and everything after it run again
    summary, _ = curate_text_with(state, 200)
    assert {s: summary[s]["state"] for s in CACHED_STAGES} == {
        "crawl-images": "Cached", "crawl-text": "Cached", "curate-images": "Cached",
        "curate-text": "Completed", "pretrain": "Completed", "finetune": "Completed",
        "pretrain-clip": "Cached", "pretrain-autoencoder": "Cached", "encode": "Cached",
        "pretrain-diffusion": "Cached"}  # the image branch did not change
    assert summary["curate-text"]["result"]["removed"].get("length", 0) > 0
    assert_shard_sets_load(state, summary, "curate-text")
    assert summary["pretrain"]["result"]["model_uri"] == "models:/demo-lm/2"
    assert summary["finetune"]["result"]["base"] == "models:/demo-lm/2"
    assert versions(state, "demo-lm") == ["1", "2"]
    assert "deploy" not in summary


def test_a_config_change_that_keeps_the_same_shards_stops_at_curate(state: dict[str, Any]) -> None:
    """Keys are on content: a curation config that changed but kept the same documents (every page here
    has well over 60 words) reruns curate-text, whose shards have the digest they had, so training is not
    repeated."""
    summary, _ = curate_text_with(state, 60)
    assert summary["curate-text"]["state"] == "Completed"
    assert summary["curate-text"]["result"]["digest"] == state["first_text_digest"]
    assert summary["pretrain"]["state"] == summary["finetune"]["state"] == "Cached"
    assert summary["pretrain"]["result"]["model_uri"] == "models:/demo-lm/1"  # what the same shards trained
    assert versions(state, "demo-lm") == ["1", "2"]
