"""The flows' parts: cache keys, content digests, the retry policy on a real Prefect API, failpoints,
and Ray worker output reaching a sink (what carries it into a task run's logs)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from pipelines import runtime
from pipelines.errors import PipelineError
from pipelines.flows import (STAGE_TASK, EndToEndConfig, config_path, content_digest, end_to_end, stage_key)
from pipelines.ingest.text import TextCrawlConfig
from pipelines.train.config import PretrainConfig


def test_content_digest_of_files_folders_and_shard_sets(tmp_path: Path) -> None:
    f = tmp_path / "urls.jsonl"
    f.write_text('{"url": "http://a/1.jpg"}\n')
    first = content_digest(str(f))
    assert content_digest(str(f)) == first
    f.write_text('{"url": "http://a/2.jpg"}\n')
    assert content_digest(str(f)) != first

    folder = tmp_path / "lists"
    folder.mkdir()
    (folder / "a.txt").write_text("x")
    before = content_digest(str(folder))
    (folder / "b.txt").write_text("y")
    assert content_digest(str(folder)) != before

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"digest": "abc123", "shards": []}))
    (shards / "00000.tar").write_bytes(b"anything")
    assert content_digest(str(shards)) == "abc123"  # a shard set is what its manifest says

    with pytest.raises(PipelineError, match="no such file"):
        content_digest(str(tmp_path / "missing"))


def test_stage_key_follows_inputs_config_and_code_not_run_options() -> None:
    crawl = TextCrawlConfig(input="pages.jsonl", output="out", source="urls")
    key = stage_key("crawl-text", "d1", crawl)
    assert key == stage_key("crawl-text", "d1", crawl.model_copy())
    assert key != stage_key("crawl-text", "d2", crawl)  # other input content
    assert key != stage_key("crawl-text", "d1", crawl.model_copy(update={"min_chars": 50}))  # other output
    assert key == stage_key("crawl-text", "d1", crawl.model_copy(update={"quiet": True}))  # same output

    pre = PretrainConfig()
    assert stage_key("pretrain", "d1", pre) == stage_key("pretrain", "d1", pre.model_copy(
        update={"run_name": "other", "quiet": True}))
    changed = pre.model_copy(deep=True)
    changed.engine.max_steps += 1
    assert stage_key("pretrain", "d1", pre) != stage_key("pretrain", "d1", changed)
    # each stage's code: the training code's digest is not the crawler's
    assert runtime.code_version("train") != runtime.code_version("ingest")


def test_failpoint_fails_the_first_n_times(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"point-{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv("PIPELINES_FAILPOINTS", f"other=5,{name}=2")
    for hit in (1, 2):
        with pytest.raises(runtime.InjectedFault, match=f"planted failure {hit} of 2"):
            runtime.failpoint(name)
    runtime.failpoint(name)  # the third time passes
    runtime.failpoint("not-planted")


def test_config_paths_resolve_in_the_package_configs(tmp_path: Path) -> None:
    assert config_path("curate/text-docs.yaml").is_file()
    local = tmp_path / "mine.yaml"
    local.write_text("steps: []\n")
    assert config_path(str(local)) == local


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    """A temporary Prefect API (its own database) for this module."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_retry_policy_retries_transient_failures_not_user_mistakes(prefect_api: None) -> None:
    from prefect import flow, task

    attempts = {"transient": 0, "mistake": 0}
    options = {**STAGE_TASK, "retry_delay_seconds": 0, "retry_jitter_factor": None}

    @task(name="curate", **options)
    def stage(config: TextCrawlConfig, inputs: str, kind: str) -> dict:
        attempts[kind] += 1
        if kind == "transient" and attempts[kind] < 3:
            raise ConnectionResetError("the storage went away")
        if kind == "mistake":
            raise PipelineError("pages.jsonl: column 'url' not found")
        return {"attempts": attempts[kind]}

    @flow
    def run(kind: str) -> dict:
        config = TextCrawlConfig(input="x", output=f"out-{uuid.uuid4().hex}")
        return stage(config, uuid.uuid4().hex, kind)

    assert run("transient") == {"attempts": 3}  # two retries, then it worked
    with pytest.raises(PipelineError):
        run("mistake")
    assert attempts["mistake"] == 1  # a user mistake fails the same way every time: not retried


def test_cache_serves_the_same_inputs_without_running(prefect_api: None) -> None:
    from prefect import flow, task

    calls: list[str] = []

    @task(name="crawl-text", **{**STAGE_TASK, "retries": 0})
    def stage(config: TextCrawlConfig, inputs: str) -> dict:
        calls.append(inputs)
        return {"output": config.output}

    @flow
    def run(inputs: str, min_chars: int) -> str:
        return stage(TextCrawlConfig(input="x", output="out", min_chars=min_chars), inputs, return_state=True).name

    digest = uuid.uuid4().hex
    assert run(digest, 1) == "Completed"
    assert run(digest, 1) == "Cached"
    assert run(digest, 2) == "Completed"  # another config
    assert run(uuid.uuid4().hex, 1) == "Completed"  # another input
    assert len(calls) == 3


def test_end_to_end_needs_an_input(prefect_api: None) -> None:
    with pytest.raises(PipelineError, match="give images.input and/or text.input"):
        end_to_end(EndToEndConfig())
    with pytest.raises(PipelineError, match="training needs text.input"):
        end_to_end(EndToEndConfig(images={"input": "urls.jsonl"}))


def _wait_for(marker: str, lines: list[str], timeout: float = 20) -> bool:
    deadline = time.time() + timeout
    while not any(marker in line for line in lines) and time.time() < deadline:
        time.sleep(0.2)
    return any(marker in line and "pid=" in line for line in lines)


@pytest.mark.usefixtures("ray_cluster")
def test_ray_worker_output_reaches_the_innermost_sink() -> None:
    """A task's sink inside its flow's: the task gets its lines; lines after it go to the flow."""
    import ray

    @ray.remote
    def speak(text: str) -> None:
        print(text)

    flow_lines: list[str] = []
    task_lines: list[str] = []
    during, after = (f"{when} a task {uuid.uuid4().hex}" for when in ("during", "after"))
    with runtime.worker_logs_to(flow_lines.append):
        with runtime.worker_logs_to(task_lines.append):
            ray.get(speak.remote(during))
            assert _wait_for(during, task_lines)
        ray.get(speak.remote(after))
        assert _wait_for(after, flow_lines)
    assert not any(during in line for line in flow_lines)  # once, not twice
    assert not any(after in line for line in task_lines)


def test_the_command_names_every_flow() -> None:
    from pipelines.cli import FLOW_NAMES  # the CLI lists them without importing Prefect
    from pipelines.flows import FLOWS

    assert sorted(FLOW_NAMES) == sorted(FLOWS)


def test_a_print_a_library_captures_stays_out_of_the_run_log(prefect_api: None) -> None:
    """dill finds a function's globals by capturing `dis.dis` (datasets' fingerprinting does this in the eval
    stage): under `log_prints` the bytecode went to the run's log and dill found no globals."""
    import contextlib
    import io
    import logging

    import dill.detect
    from prefect import flow

    def uses_a_global() -> Any:
        return json.dumps

    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())  # type: ignore[method-assign]

    @flow(log_prints=True)
    def run() -> tuple[list[str], str]:
        logging.getLogger("prefect").addHandler(handler)
        try:
            found = sorted(dill.detect.nestedglobals(uses_a_global))
            with contextlib.redirect_stdout(io.StringIO()) as out:
                print("captured line")
            print("a line for the log")
        finally:
            logging.getLogger("prefect").removeHandler(handler)
        return found, out.getvalue()

    found, captured = run()
    assert found == ["json"]
    assert captured == "captured line\n"
    assert "a line for the log" in logged  # log_prints still works
    assert not any("LOAD_GLOBAL" in line or "captured line" in line for line in logged)


DEMO_API = """
import os, sys
from pipelines.demo import _PrefectApi

api = _PrefectApi()
from prefect import flow  # after: Prefect reads PREFECT_API_URL when imported

@flow
def answer() -> int:
    return 42

api.wait()
print(api.url, api.proc.pid, answer(), flush=True)
"""


def test_the_demos_prefect_api_records_its_flow_runs_and_stops_with_it(tmp_path: Path) -> None:
    """`make demo` starts Prefect's temporary API server itself, before Prefect is imported: a flow run in that
    process is recorded in the database under PIPELINES_HOME (what `make ui` serves), and the server's process
    stops when the process exits."""
    import os
    import sqlite3
    import subprocess
    import sys

    import psutil

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PIPELINES_"))}
    env["PIPELINES_HOME"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", DEMO_API], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    url, pid, answer = done.stdout.split()
    assert url.startswith("http://127.0.0.1:") and url.endswith("/api") and answer == "42"
    assert "Starting temporary server" not in done.stderr  # Prefect used this server, it did not start its own
    deadline = time.monotonic() + 10
    while psutil.pid_exists(int(pid)) and psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the API server outlived the process that started it"
        time.sleep(0.1)
    with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as db:
        states = db.execute("select state_name from flow_run where name is not null").fetchall()
    assert states == [("Completed",)]
