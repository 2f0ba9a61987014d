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


def wait_group(pgid: int, size: int, timeout: float = 60.0) -> set[int]:
    """Process group `pgid` once it has `size` live members (or as it is after `timeout` s)."""
    deadline = time.monotonic() + timeout
    while len(members := group(pgid)) < size and time.monotonic() < deadline:
        time.sleep(0.1)
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
    replica and its children at once (as Ray kills a replica): vLLM's worker and the processes it started (the JSON
    schema checker, once serving) go within seconds."""
    replica = subprocess.Popen([sys.executable, "-c", REPLICA], stdout=subprocess.PIPE, text=True)
    try:
        assert replica.stdout is not None
        if when.startswith("serving"):
            line = ""
            while not line.startswith("worker "):
                line = replica.stdout.readline()
                assert line, "the replica exited before starting vLLM"
            worker = int(line.split()[1])
        else:  # while the worker imports vLLM
            deadline = time.monotonic() + 300
            while not (started := children(replica.pid)):
                assert time.monotonic() < deadline and replica.poll() is None
                time.sleep(0.1)
            worker = started[0]
            time.sleep(1)
        # serving: the worker and its schema checker (started once vLLM is ready)
        members = wait_group(worker, 2 if when.startswith("serving") else 1)
        assert worker in members and len(members) >= (2 if when.startswith("serving") else 1), members
        replica.send_signal(signal.SIGKILL)
        if when.endswith("children"):
            os.kill(worker, signal.SIGKILL)
        replica.wait()
        assert wait_gone(worker) == set()
    finally:
        replica.kill()


def test_a_closed_engine_leaves_no_process() -> None:
    """close() (a replica stopping, a replaced version retired): the worker and the processes it started all exit
    (vLLM's own shutdown left its engine core behind in an earlier version of this code)."""
    tokenizer = tiny_tokenizer()
    engine = VllmEngine(tiny_model(tokenizer, 0), tokenizer, "lm", 1, kv_cache_gib=KV_CACHE_GIB, compile=False)
    worker = engine._proc.pid
    assert len(wait_group(worker, 2)) >= 2  # the worker and its schema checker
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


def test_an_engine_whose_process_died_fails_fast_and_is_reaped() -> None:
    """vLLM's worker killed: the next request fails with an error (no hang), what is left of the group (the schema
    checker) exits, and `alive()` (what the replica's health check asks) says so."""
    tokenizer = tiny_tokenizer()
    engine = VllmEngine(tiny_model(tokenizer, 0), tokenizer, "lm", 1, kv_cache_gib=KV_CACHE_GIB, compile=False)
    try:
        worker = engine._proc.pid
        row = Generation(tokenizer.encode("the quick"), 4, temperature=0.0)
        engine.generate([row])
        assert row.error is None and len(row.token_ids) == 4 and engine.alive()
        assert len(wait_group(worker, 2)) >= 2  # the worker and its schema checker
        os.kill(worker, signal.SIGKILL)
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


class _Engine:
    """Stands in for vLLM's LLMEngine under the worker's `Stepper` (the part under test here: the thread that steps
    the engine and hands requests and outputs between it and the event loop). Requests finish in one step, except
    "slow" and "unreplyable" (never, until aborted); "boom" makes the step fail as a broken model would; a prompt "bad" is refused
    when added, as vLLM's checks of a request refuse one."""

    LASTING = ("slow", "unreplyable")  # they run until aborted

    def __init__(self) -> None:
        self.running: list[str] = []
        self.aborted: list[str] = []

    def add_request(self, rid: str, prompt: str, params: object, lora_request: object = None) -> None:
        if prompt == "bad":
            raise ValueError("the prompt is too long")
        self.running.append(rid)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running)

    def step(self) -> list[object]:
        from types import SimpleNamespace

        if "boom" in self.running:
            raise RuntimeError("the model failed")
        time.sleep(0.001)
        outputs = [SimpleNamespace(request_id=rid, finished=rid not in self.LASTING) for rid in self.running]
        self.running = [rid for rid in self.running if rid in self.LASTING]
        return outputs

    def abort_request(self, ids: list[str]) -> None:
        self.aborted += ids
        self.running = [rid for rid in self.running if rid not in ids]

    def remove_lora(self, lora_id: int) -> bool:
        return lora_id == 1


class _Out:
    """Stands in for the worker's connection to the replica: what the engine's thread writes, in order."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.lines += data.decode().splitlines()

    def close(self) -> None:
        self.closed = True


def test_the_engine_thread_fails_one_request_for_its_own_error_and_all_for_the_engines() -> None:
    import asyncio
    import importlib.util

    spec = importlib.util.spec_from_file_location("vllm_worker", WORKER)
    assert spec is not None and spec.loader is not None
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    engine = _Engine()

    def reply(output: object) -> bytes:  # called on the engine's thread for each output
        rid = output.request_id  # type: ignore[attr-defined]
        if rid == "unreplyable":
            raise ValueError("this reply cannot be made")
        return f"{rid}\n".encode()

    async def scenario() -> None:
        stepper = worker.Stepper(lambda: engine, asyncio.get_running_loop())
        await asyncio.wrap_future(stepper.ready)
        out = _Out()
        await asyncio.gather(*(stepper.submit(r, "p", None, None, reply, out) for r in ("a", "b")))
        assert sorted(out.lines) == ["a", "b"]  # written by the engine's thread before the requests ended
        with pytest.raises(ValueError, match="too long"):  # this request's fault: it alone fails
            await stepper.submit("x", "bad", None, None, reply, out)
        with pytest.raises(ValueError, match="cannot be made"):  # its reply failed: it alone fails, and stops
            await stepper.submit("unreplyable", "p", None, None, reply, out)
        assert "unreplyable" not in engine.running
        assert stepper.failure is None and await stepper.call("remove_lora", 1) is True
        slow = stepper.submit("slow", "p", None, None, reply, out)
        await asyncio.sleep(0.05)
        with pytest.raises(ValueError, match="already running"):  # an id in use: refused, the first one untouched
            await stepper.submit("slow", "p", None, None, reply, out)
        assert not slow.done() and engine.running == ["slow"]
        stepper.abort("slow")
        await stepper.submit("c", "p", None, None, reply, out)  # the engine steps on after an abort
        assert engine.aborted == ["unreplyable", "slow"] and not slow.done()
        slow.cancel()
        stepper.send(out, b"sent from the loop\n")  # in order with the engine thread's replies
        await stepper.submit("c2", "p", None, None, reply, out)
        assert out.lines[-2:] == ["sent from the loop", "c2"]
        other = _Out()
        stepper.close(other)  # a connection gone: closed on the engine's thread, after what was sent before
        await stepper.call("remove_lora", 2)
        assert other.closed and not out.closed
        with pytest.raises(RuntimeError, match="model failed"):  # the engine's: every request fails, then and later
            await asyncio.gather(stepper.submit("boom", "p", None, None, reply, out),
                                 stepper.submit("d", "p", None, None, reply, out))
        assert isinstance(stepper.failure, RuntimeError)
        with pytest.raises(RuntimeError, match="model failed"):
            await stepper.submit("e", "p", None, None, reply, out)
        stepper.send(out, b"after the failure\n")  # the thread is gone: written at once, from the loop
        assert out.lines[-1] == "after the failure"
        stepper.stop()
        assert not stepper.thread.is_alive()

    asyncio.run(asyncio.wait_for(scenario(), 30))
