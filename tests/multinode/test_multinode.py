"""Multi-node on one machine: a Ray head and three worker nodes, each its own raylet (`local_cluster.py`), with
the stages run by the `pipelines` command with `RAY_ADDRESS` set, as a user runs them against a cluster; then a
worker node killed (all its processes at once, SIGKILL, as when its machine dies) in the middle of a crawl and
of a training run. Where work ran is read from the shards' stats (`node_id`) and from Ray's actor table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

PIPELINES = str(Path(sys.executable).with_name("pipelines"))
WORKER_NODES = 3  # two training workers and a spare that takes over when a node dies
SUBJECTS = ["the cat", "a dog", "my neighbour", "the old farmer", "a small bird", "the teacher", "our robot"]
VERBS = ["sees", "likes", "follows", "paints", "feeds", "visits", "finds"]
OBJECTS = ["the river", "a red apple", "the garden", "an open window", "the village", "a wooden boat"]

# A tiny model and a few steps: what is tested is where the workers run and how they recover.
PRETRAIN = {
    "model": {"preset": "tiny", "hidden_size": 64, "intermediate_size": 176},
    "tokenizer": {"vocab_size": 400},
    "data": {"seq_len": 64, "shuffle_buffer": 16, "heldout_percent": 10},
    "optim": {"lr": 3e-3, "warmup_steps": 5},
    "engine": {"workers": 2, "cpus_per_worker": 1, "zero_stage": 2, "micro_batch": 4, "max_steps": 20,
               "checkpoint_every": 10, "eval_batches": 4, "max_failures": 2},
    "registry": {"experiment": "multinode", "model_name": "mn-lm"},
}


# -- the cluster ---------------------------------------------------------------------------------
class LocalCluster:
    """`local_cluster.py` in a process of its own: a head with no CPUs and worker nodes of one CPU each."""

    def __init__(self, workers: int, cwd: Path):
        self.cwd = cwd
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("local_cluster.py")), str(workers)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=cwd)
        started = json.loads(self.proc.stdout.readline() or "null")
        assert started, "the cluster did not start"
        self.address: str = started["address"]
        self.head: str = started["head"]["node_id"]
        # raylet pid -> node id, of the live worker nodes
        self.raylets: dict[int, str] = {n["raylet_pid"]: n["node_id"] for n in started["workers"]}

    @property
    def workers(self) -> list[str]:
        return list(self.raylets.values())

    def ask(self, command: str) -> Any:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def actor_nodes(self, class_name: str, since: float = 0.0, alive: bool = False) -> dict[str, str]:
        """Actor id -> node id of the actors of `class_name` started at or after `since` (time.time())."""
        return {a["actor_id"]: a["node_id"] for a in self.ask(f"actors {class_name}")
                if a["start_time"] >= since and (a["state"] == "ALIVE" or not alive)}

    def kill(self, node_id: str) -> None:
        assert self.ask(f"kill {node_id}") == "killed"
        self.raylets = {pid: n for pid, n in self.raylets.items() if n != node_id}

    def add_worker(self) -> None:
        node = self.ask("add")
        self.raylets[node["raylet_pid"]] = node["node_id"]

    def node_of(self, pid: int) -> str | None:
        """The worker node whose raylet started process `pid`."""
        try:
            return next((self.raylets[p.pid] for p in psutil.Process(pid).parents() if p.pid in self.raylets), None)
        except psutil.NoSuchProcess:
            return None

    def shutdown(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def module_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # The nodes run in a folder of their own: a relative path resolved on a node instead of in the driver
    # would land there.
    cluster = LocalCluster(WORKER_NODES, tmp_path_factory.mktemp("nodes"))
    yield cluster
    cluster.shutdown()


@pytest.fixture
def cluster(module_cluster: LocalCluster) -> LocalCluster:
    """The module's cluster with all its worker nodes (a node an earlier test killed is replaced)."""
    while len(module_cluster.workers) < WORKER_NODES:
        module_cluster.add_worker()
    return module_cluster


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of the commands (the cluster's address is added per command): MLflow on a SQLite file."""
    home = tmp_path_factory.mktemp("home")
    return {**os.environ, "PIPELINES_HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"}


class Command:
    """`pipelines ARGS` run against a cluster from folder `cwd` (relative paths are read from there), its
    output in a log file there."""

    def __init__(self, address: str, env: dict[str, str], cwd: Path, *args: str):
        self.args = args
        self.log = cwd / f"{args[0]}-{time.monotonic_ns()}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([PIPELINES, *args], env={**env, "RAY_ADDRESS": address}, cwd=cwd,
                                         stdout=log, stderr=subprocess.STDOUT)

    def running(self) -> bool:
        return self.proc.poll() is None

    def finish(self, timeout: float = 300) -> None:
        """Wait for it to end; it must have succeeded."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.returncode == 0, (f"pipelines {' '.join(self.args)}: exit code {self.proc.returncode}\n"
                                           + self.log.read_text()[-4000:])


@pytest.fixture
def start(cluster: LocalCluster, env: dict[str, str]) -> Iterator[Callable[..., Command]]:
    """`start(cwd, *args)`: a command against the cluster (stopped at the end of the test if still running)."""
    commands: list[Command] = []

    def make(cwd: Path, *args: str) -> Command:
        commands.append(Command(cluster.address, env, cwd, *args))
        return commands[-1]

    yield make
    for c in commands:
        if c.running():
            c.proc.kill()
            c.proc.wait()


# -- data ----------------------------------------------------------------------------------------
def write_corpus(path: Path, docs: int = 560, short: int = 20, copies: int = 20) -> None:
    """`docs` documents of simple sentences (easy to learn), `short` one-line documents the length step drops
    and `copies` exact copies of earlier documents the exact dedup drops, mixed."""
    rng = np.random.default_rng(7)
    texts = [" ".join(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}.".capitalize()
                      for _ in range(rng.integers(3, 8))) for _ in range(docs)]
    texts += [f"{SUBJECTS[i % len(SUBJECTS)]}.".capitalize() for i in range(short)]
    texts += [texts[i] for i in rng.choice(docs, copies, replace=False)]
    order = rng.permutation(len(texts))
    path.write_text("".join(json.dumps({"id": f"doc{i}", "text": texts[j]}) + "\n" for i, j in enumerate(order)))


@pytest.fixture(scope="module")
def text_shards(module_cluster: LocalCluster, env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus crawled into 6 text shards on the cluster, with relative paths as a user types them: they
    mean the driver's folder, whichever node a task runs on."""
    root = tmp_path_factory.mktemp("text")
    write_corpus(root / "corpus.jsonl")
    Command(module_cluster.address, env, root, "crawl", "text", "--input", "corpus.jsonl", "--output", "shards",
            "--shard-size", "100", "--quiet").finish()
    return root / "shards"


def shard_nodes(folder: Path) -> Counter:
    """Shards of a folder per node that wrote them (from their stats)."""
    return Counter(json.loads(p.read_text())["node_id"] for p in folder.glob("*_stats.json"))


def check_shards(folder: Path) -> dict[str, Any]:
    """The manifest lists every shard on disk; every key is in exactly one tar, once."""
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [s["tar"] for s in manifest["shards"]] == sorted(p.name for p in folder.glob("*.tar"))
    keys: Counter = Counter()
    for s in manifest["shards"]:
        with tarfile.open(folder / s["tar"]) as tar:
            in_tar = {n.partition(".")[0] for n in tar.getnames()}
        assert s["samples"] == len(in_tar)
        keys.update(in_tar)
    assert set(keys.values()) == {1} and len(keys) == manifest["samples"]
    assert not [p for p in folder.iterdir() if ".tmp-" in p.name]
    return manifest


def loss_by_step(client: MlflowClient, run_id: str) -> dict[int, float]:
    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.timestamp)
    return {m.step: m.value for m in history}


# -- work spreads over the nodes -----------------------------------------------------------------
def test_crawl_curate_and_train_spread_over_the_worker_nodes(tmp_path: Path, cluster: LocalCluster, start, env,
                                                              text_shards: Path) -> None:
    started = time.time()
    (tmp_path / "curate.yaml").write_text(yaml.safe_dump({"steps": [
        {"step": "length", "min_words": 5}, {"step": "exact_dedup", "match": "text"}]}))
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(PRETRAIN))
    start(tmp_path, "curate", "--input", str(text_shards), "--output", "curated", "--config", "curate.yaml",
          "--quiet").finish()
    start(tmp_path, "pretrain", "--config", "pretrain.yaml", "--shards", "curated", "--storage", "runs",
          "--run-name", "spread", "--quiet").finish()

    assert not list(cluster.cwd.iterdir())  # no relative path was resolved on a node
    assert check_shards(text_shards)["samples"] == 600
    assert check_shards(tmp_path / "curated")["samples"] == 560  # 20 too short, 20 copies
    workers = set(cluster.workers)
    # Shard tasks ran on several worker nodes (the head has no CPUs for them) ...
    for folder in (text_shards, tmp_path / "curated"):
        nodes = shard_nodes(folder)
        assert len(nodes) >= 2 and set(nodes) <= workers, (folder, nodes)
    # ... and so did the two training workers, one per node; the drivers' progress counters and Ray Train's
    # controller stay on the head, with the drivers.
    train_workers = cluster.actor_nodes("RayTrainWorker", since=started)
    assert len(train_workers) == 2 and len(set(train_workers.values())) == 2, train_workers
    assert set(train_workers.values()) <= workers
    assert set(cluster.actor_nodes("TrainController").values()) == {cluster.head}
    assert set(cluster.actor_nodes("ProgressCounter").values()) == {cluster.head}

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run_id = json.loads((tmp_path / "runs" / "spread" / "run.json").read_text())["mlflow_run_id"]
    assert sorted(loss_by_step(client, run_id)) == list(range(1, 21))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [v.run_id for v in client.search_model_versions("name = 'mn-lm'")].count(run_id) == 1  # registered


# -- a node dies ---------------------------------------------------------------------------------
def shard_task_on(cluster: LocalCluster, node: str, port: int) -> int | None:
    """The pid of a crawl shard task on `node` that is fetching from the server on `port` now, if any."""
    for p in psutil.process_iter(["cmdline"]):
        if (p.info["cmdline"] or [""])[0].startswith("ray::crawl_image_shard") and cluster.node_of(p.pid) == node:
            try:
                if any(c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
                       for c in p.net_connections("tcp")):
                    return p.pid
            except psutil.NoSuchProcess:
                pass
    return None


def test_node_killed_mid_crawl_every_sample_once(tmp_path: Path, cluster: LocalCluster, start, make_web) -> None:
    web = make_web(image_delay=0.1)  # one fetch at a time: a shard of 10 images takes a second or more
    rows = 120
    (tmp_path / "urls.jsonl").write_text("".join(
        json.dumps({"url": web.url(f"/img/{i % 5}.jpg?i={i}"), "caption": f"c{i}"}) + "\n" for i in range(rows)))
    (tmp_path / "crawl.yaml").write_text(yaml.safe_dump({
        "shard_size": 10, "image": {"image_size": 64},
        "fetch": {"allow_private_network": True, "concurrency": 1, "timeout": 5, "retries": 1, "backoff": 0.05}}))
    out = tmp_path / "out"

    crawl = start(tmp_path, "crawl", "images", "--config", "crawl.yaml", "--input", "urls.jsonl", "--output", "out",
                  "--quiet")
    # Kill a node once it has written a shard and is in the middle of its next one (fetching).
    deadline, victim = time.monotonic() + 120, None
    while victim is None and crawl.running() and time.monotonic() < deadline:
        victim = next((n for n in shard_nodes(out) if shard_task_on(cluster, n, web.port)), None)
        time.sleep(0.05)
    assert victim and crawl.running(), "no node was ever in the middle of a shard"
    survivors = set(cluster.workers) - {victim}
    cluster.kill(victim)
    crawl.finish(timeout=180)

    manifest = check_shards(out)
    assert len(manifest["shards"]) == rows // 10 and manifest["samples"] == rows
    meta = [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert [m["caption"] for m in meta] == [f"c{i}" for i in range(rows)]
    assert {m["status"] for m in meta} == {"success"}
    nodes = shard_nodes(out)
    assert victim in nodes and set(nodes) - {victim} <= survivors, nodes
    assert web.hits_under("/img/") > rows  # the shard lost with the node was fetched again, elsewhere


def committed(run_dir: Path, checkpoint: str) -> bool:
    """Ray Train has committed `checkpoint` (every rank reported it)."""
    try:
        return checkpoint in (run_dir / "checkpoint_manager_snapshot.json").read_text()
    except FileNotFoundError:
        return False


def test_node_killed_mid_training_resumes_from_the_checkpoint_on_the_others(tmp_path: Path, cluster: LocalCluster,
                                                                            start, env, text_shards: Path) -> None:
    config = {**PRETRAIN, "engine": {**PRETRAIN["engine"], "max_steps": 80}}
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump(config))
    started = time.time()
    train = start(tmp_path, "pretrain", "--config", "pretrain.yaml", "--shards", str(text_shards), "--storage", "runs",
                  "--run-name", "killed", "--quiet")
    # Kill the node of one training worker once Ray Train has committed the step-10 checkpoint.
    deadline, first = time.monotonic() + 300, {}
    while train.running() and time.monotonic() < deadline and not committed(tmp_path / "runs" / "killed",
                                                                             "step-0000010"):
        first = cluster.actor_nodes("RayTrainWorker", since=started, alive=True)
        time.sleep(0.05)
    assert train.running() and len(first) == 2, f"training ended or never started before the kill: {first}"
    victim = sorted(first.values())[0]
    killed_at = time.time()
    cluster.kill(victim)
    train.finish(timeout=420)

    # Two new workers took over, on the two nodes left.
    second = cluster.actor_nodes("RayTrainWorker", since=killed_at)
    assert len(second) == 2 and set(second.values()) == set(cluster.workers), (first, second)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    run_id = json.loads((tmp_path / "runs" / "killed" / "run.json").read_text())["mlflow_run_id"]
    restored = client.get_metric_history(run_id, "restored_from_step")
    assert len(restored) == 1 and restored[0].value >= 10, restored  # restarted once, from a checkpoint
    assert sorted(loss_by_step(client, run_id)) == list(range(1, 81))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [v.run_id for v in client.search_model_versions("name = 'mn-lm'")].count(run_id) == 1  # registered
