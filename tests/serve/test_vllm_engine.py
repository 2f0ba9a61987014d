"""The vLLM engine's processes: they never outlive the replica that started them, and an engine that dies is seen.

Real vLLM (the `.venv-vllm` environment `make venv` installs) on the tests' tiny model; no Ray: the replica side is
this process or a child process playing the replica.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.serve.engine import Generation
from pipelines.serve.vllm_engine import WORKER, VllmEngine, VllmStart, vllm_available, vllm_python
from tests.serve.tiny import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[2]
KV_CACHE_GIB = 0.0625


def group(pgid: int) -> set[int]:
    """The live processes of process group `pgid` (zombies excluded)."""
    members = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.add(int(entry.name))
    return members


def wait_gone(pgid: int, timeout: float = 20.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while (left := group(pgid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.fixture(scope="module", autouse=True)
def _needs_vllm() -> None:
    assert vllm_available(), "the vLLM environment (.venv-vllm) is missing: `make venv` installs it"


REPLICA = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from pipelines.serve.vllm_engine import VllmEngine
from tests.serve.tiny import tiny_model, tiny_tokenizer
tokenizer = tiny_tokenizer()
engine = VllmEngine(tiny_model(tokenizer, 0), tokenizer, "lm", 1, kv_cache_gib={KV_CACHE_GIB}, compile=False)
print("worker", engine._proc.pid, flush=True)
time.sleep(600)
"""


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        if stat and int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
            out.append(int(entry.name))
    return out


@pytest.mark.parametrize("when", ["serving", "starting", "serving, with its children"])
def test_vllm_processes_die_with_a_killed_replica(when: str) -> None:
    """SIGKILL on the replica (it closes nothing), once vLLM serves or while it is still starting, or on the
    replica and its children at once (as Ray kills a replica): vLLM's worker and its engine processes go within
    seconds."""
    replica = subprocess.Popen([sys.executable, "-c", REPLICA], stdout=subprocess.PIPE, text=True)
    try:
        assert replica.stdout is not None
        if when.startswith("serving"):
            line = ""
            while not line.startswith("worker "):
                line = replica.stdout.readline()
                assert line, "the replica exited before starting vLLM"
            worker = int(line.split()[1])
        else:  # as soon as the worker has started vLLM's engine core, before it is ready
            deadline = time.monotonic() + 300
            while not (started := children(replica.pid)) or len(group(started[0])) < 2:
                assert time.monotonic() < deadline and replica.poll() is None
                time.sleep(0.1)
            worker = started[0]
        members = group(worker)
        assert worker in members and len(members) >= 2, members  # the worker and vLLM's engine core at least
        replica.send_signal(signal.SIGKILL)
        if when.endswith("children"):
            os.kill(worker, signal.SIGKILL)
        replica.wait()
        assert wait_gone(worker) == set()
    finally:
        replica.kill()


def test_a_closed_engine_leaves_no_process() -> None:
    """close() (a replica stopping, a replaced version retired): the worker and vLLM's engine processes all exit
    (vLLM's own shutdown left its engine core behind in an earlier version of this code)."""
    tokenizer = tiny_tokenizer()
    engine = VllmEngine(tiny_model(tokenizer, 0), tokenizer, "lm", 1, kv_cache_gib=KV_CACHE_GIB, compile=False)
    worker = engine._proc.pid
    assert len(group(worker)) >= 2
    engine.close()
    assert wait_gone(worker) == set()


def test_a_worker_started_ahead_of_its_model_serves_it_or_goes_when_closed() -> None:
    """The replica starts vLLM's worker before it loads the model: given the model later it serves it; closed
    without one (a model vLLM cannot take) it exits at once."""
    tokenizer = tiny_tokenizer()
    waiting = VllmStart(kv_cache_gib=KV_CACHE_GIB, compile=False)
    time.sleep(1)
    assert waiting.proc.poll() is None  # importing vLLM, then waiting for a model
    waiting.close()
    assert wait_gone(waiting.proc.pid) == set()

    start = VllmStart(kv_cache_gib=KV_CACHE_GIB, compile=False)
    time.sleep(3)  # as the replica loading the model
    engine = VllmEngine(tiny_model(tokenizer, 0), tokenizer, "lm", 1, start=start)
    try:
        row = Generation(tokenizer.encode("the quick"), 4, temperature=0.0)
        engine.generate([row])
        assert row.error is None and len(row.token_ids) == 4
    finally:
        engine.close()
    assert wait_gone(start.proc.pid) == set()


@pytest.mark.parametrize("given", ["not json", '{"model": "/nowhere/model", "max_model_len": 64}'])
def test_a_worker_that_fails_says_why_in_its_log(given: str, tmp_path: Path) -> None:
    """The worker kills its process group on the way out; what failed is written first (the replica shows the
    log's tail when the engine does not start)."""
    proc = subprocess.run([vllm_python(), str(WORKER), "--model", "-", "--socket", str(tmp_path / "s.sock")],
                          input=given + "\n", capture_output=True, text=True, timeout=300,
                          start_new_session=True)  # as the replica starts it: the group it kills is its own
    assert proc.returncode != 0 and "ready" not in proc.stdout
    assert "Traceback" in proc.stderr
    assert ("JSONDecodeError" if given == "not json" else "/nowhere/model") in proc.stderr


@pytest.mark.parametrize("killed", ["worker", "engine core"])
def test_an_engine_whose_process_died_fails_fast_and_is_reaped(killed: str) -> None:
    """vLLM's worker, or the engine core under it, killed: the next request fails with an error (no hang), what is
    left of the group exits, and `alive()` (what the replica's health check asks) says so."""
    tokenizer = tiny_tokenizer()
    engine = VllmEngine(tiny_model(tokenizer, 0), tokenizer, "lm", 1, kv_cache_gib=KV_CACHE_GIB, compile=False)
    try:
        worker = engine._proc.pid
        row = Generation(tokenizer.encode("the quick"), 4, temperature=0.0)
        engine.generate([row])
        assert row.error is None and len(row.token_ids) == 4 and engine.alive()
        core = sorted(group(worker) - {worker})
        assert core, "no vLLM engine process beside the worker"
        for pid in [worker] if killed == "worker" else core:
            os.kill(pid, signal.SIGKILL)
        started = time.monotonic()
        row = Generation(tokenizer.encode("the quick"), 4, temperature=0.0)
        engine.generate([row])
        assert row.error is not None and time.monotonic() - started < 30
        assert wait_gone(worker) == set()
        deadline = time.monotonic() + 5  # the replica's reaper has seen it go
        while engine.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not engine.alive()
    finally:
        engine.close()


def test_a_schema_checker_that_cannot_start_is_a_503_then_retried() -> None:
    """The JSON schema checker is the server's part: when it cannot start, a schema is refused with a 503 (retry),
    not judged, and the next schema tries to start it again."""
    from pipelines.serve.vllm_engine import vllm_python

    script = f"""
import asyncio, sys
sys.path.insert(0, {str(ROOT / "pipelines" / "serve")!r})
from vllm_worker import Refused, SchemaCheck

check = SchemaCheck("/nonexistent/model", 5.0)
for schema in ({{"type": "object"}}, {{"type": "string"}}):
    try:
        asyncio.run(check.check(schema))
        print("accepted")
    except Refused as e:
        print(e.status, e.param, e)
"""
    out = subprocess.run([vllm_python(), "-c", script], capture_output=True, text=True, timeout=120)
    lines = out.stdout.splitlines()
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(lines) == 2, out.stdout
    for line in lines:
        assert line.startswith("503 None the JSON schema checker failed"), line
        assert line.endswith("; retry"), line


def test_the_engine_refusing_for_now_is_a_503_with_retry_after() -> None:
    from pipelines.serve.app import _request_error
    from pipelines.serve.engine import RequestRefused

    error = _request_error(RequestRefused("the JSON schema checker failed (x); retry", 503))
    body = error.response()
    assert body.status_code == 503 and body.headers["Retry-After"] == "1"
    assert error.type == "server_error" and error.param is None
    refused = _request_error(RequestRefused("bad schema", 400, "response_format")).response()
    assert refused.status_code == 400 and "Retry-After" not in refused.headers
