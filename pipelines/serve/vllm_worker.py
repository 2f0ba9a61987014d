"""vLLM's engine in a child process of a replica: `python vllm_worker.py --model DIR --socket PATH`.

With `--model -` it imports vLLM first and then reads the model's folder and length from a line on stdin: the
replica starts it while it loads the model.

Run by the interpreter of the separate vLLM environment (`.venv-vllm`, from `requirements-vllm.lock`): this file
imports only the standard library and vLLM, never `pipelines` (whose environment has other versions of
transformers and fastapi). `pipelines.serve.vllm_engine` starts it and speaks to it over a Unix socket, one JSON
object per line each way, many requests in flight on one connection:

- in: `{"op": "generate", "id": ID, "prompt": [token ids], "params": {SamplingParams fields}, "lora": {"name",
  "id", "path"} | null, "json_schema": SCHEMA | null, "json_object": bool}`; `{"op": "abort", "id": ID}`;
  `{"op": "remove_lora", "id": N}`.
- out, per generate, as tokens come (vLLM's DELTA outputs): `{"id": ID, "t": [new token ids], "lp": [[logprob,
  [[token, logprob], ...]], ...] | null, "plp": [null | [token, logprob, [[token, logprob], ...]], ...] (first
  message only, with prompt_logprobs), "f": finish reason | null}`; a failure: `{"id": ID, "e": "message"}`,
  with `"status": 400 | 429, "param": FIELD | null` where the request is at fault (a refused JSON schema).

Text, stop strings, streaming and the OpenAI formats stay with the replica (it decodes the token ids itself), so
vLLM runs without detokenizing. The first line written to stdout is `ready` once the engine has loaded; vLLM's own logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import logging
import math
import multiprocessing
import os
import queue
import re
import select
import signal
import sys
import threading
import time
import traceback
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def _kill_group() -> None:
    """SIGKILL this process group: this worker, vLLM's engine processes and the schema checker, at once."""
    os.killpg(0, signal.SIGKILL)


def _native_message(error: BaseException) -> str:
    """An error's message without the "[time] /project/cpp/file.cc:N: " that xgrammar's C++ puts in it."""
    return re.sub(r"\[[\d:]+\] \S+:\d+: ", "", str(error)).strip()


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _top(entry: dict[int, Any], k: int) -> list[list[Any]]:
    ranked = sorted(entry.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)
    out, seen = [], 0
    for token, lp in ranked:
        if seen >= k:
            break
        out.append([token, _finite(lp.logprob)])
        seen += 1
    return out


class Refused(Exception):
    """A request this worker refuses: its HTTP status (4xx: the client's fault; 503: ours, retry) and the field at
    fault."""

    def __init__(self, message: str, status: int = 400, param: str | None = "response_format"):
        super().__init__(message)
        self.status, self.param = status, param


class SchemaCheck:
    """Every new JSON schema's grammar is compiled first here, in a process of its own and under a time limit,
    before vLLM's engine sees the schema.

    vLLM checks a schema's nesting and that xgrammar parses it, but compiles its grammar against the vocabulary in
    the engine process, without a time limit, on up to 8 threads: a hostile schema (200,000 enum values: 230 s;
    20,000 properties: over 9 min) held the machine's cores there that long. Here a schema that does
    not compile within `limit_s` on one thread is refused (a 400) and the checking process killed and started
    again; verdicts are kept (most recent 1024 schemas) so that a schema is compiled here once."""

    MAX_WAITING = 8  # schemas waiting for the checker beyond this are refused with a 429

    def __init__(self, model: str, limit_s: float):
        self.model, self.limit_s = model, limit_s
        self._proc: Any = None
        self._conn: Any = None
        self._lock = threading.Lock()  # one schema at a time in the checking process
        self._threads = ThreadPoolExecutor(self.MAX_WAITING, thread_name_prefix="schema-check")
        self._waiting = 0  # schemas queued or compiling (a cancelled request's schema is still compiled)
        self._count = threading.Lock()
        self._verdicts: OrderedDict[str, str | None] = OrderedDict()

    async def check(self, schema: Any) -> None:
        """Raise `Refused` if `schema`'s grammar does not compile (its error) or not within the time limit."""
        key = json.dumps(schema, sort_keys=True, separators=(",", ":"))
        if key not in self._verdicts:
            with self._count:
                if self._waiting >= self.MAX_WAITING:
                    raise Refused(f"{self._waiting} JSON schemas are waiting to be compiled; retry", status=429)
                self._waiting += 1
            try:
                await asyncio.get_running_loop().run_in_executor(self._threads, self._verdict, key)
            except Exception as e:  # the checker itself failed (it could not start): our fault, not the schema's
                raise Refused(f"the JSON schema checker failed ({type(e).__name__}: {e}); retry", status=503,
                              param=None) from e
        self._verdicts.move_to_end(key)
        if (verdict := self._verdicts[key]) is not None:
            raise Refused(f"response_format json_schema: {verdict}")

    def _verdict(self, key: str) -> None:
        try:
            with self._lock:
                if key not in self._verdicts:
                    self._verdicts[key] = self._compile(key)
                    while len(self._verdicts) > 1024:
                        self._verdicts.popitem(last=False)
        finally:
            with self._count:
                self._waiting -= 1

    def _compile(self, key: str) -> str | None:
        if self._proc is None or not self._proc.is_alive():
            self._start()
        # The limit is on the checker's CPU time (a busy machine does not make a schema too complex), and on its
        # wall time at four times that.
        spent, started = _cpu_seconds(self._proc.pid), time.monotonic()
        self._conn.send(key)
        while not self._conn.poll(0.05):
            if (_cpu_seconds(self._proc.pid) - spent > self.limit_s
                    or time.monotonic() - started > 4 * self.limit_s or not self._proc.is_alive()):
                self._proc.kill()
                self._proc.join()
                self._proc = None
                return f"its grammar did not compile within {self.limit_s:g} s (this server's limit); simplify it"
        try:
            return self._conn.recv()
        except EOFError:  # it died (out of its memory limit)
            self._proc = None
            return "its grammar is too large to compile"

    def warm(self) -> None:
        """Start the checking process now, in the background (it takes seconds: xgrammar imports torch and
        transformers)."""
        self._threads.submit(self._warm)

    def _warm(self) -> None:
        with self._lock:
            if self._proc is None:
                self._start()

    def _start(self) -> None:
        # Always from one of `_threads` (they live as long as this process): the checker dies with the thread that
        # started it (PR_SET_PDEATHSIG, vllm_site/sitecustomize.py), so never from a thread that ends.
        context = multiprocessing.get_context("spawn")  # (a fork of a process running vLLM's threads: no)
        self._conn, theirs = context.Pipe()
        self._proc = context.Process(target=_compile_schemas, args=(theirs, self.model), name="schema-check",
                                     daemon=True)
        self._proc.start()
        theirs.close()
        try:
            ready = self._conn.recv()
        except EOFError:
            ready = None
        if ready != "ready":
            self._proc.kill()
            self._proc = None  # started again for the next schema
            raise RuntimeError("its process exited while starting")

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of process `pid`, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _compile_schemas(conn: Any, model: str) -> None:
    """The checking process: compile each JSON schema received as vLLM's engine does (xgrammar, this model's
    vocabulary, no free whitespace), on one thread; answer None or the error's message."""
    import resource

    import xgrammar as xgr
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    vocab_size = AutoConfig.from_pretrained(model).get_text_config().vocab_size
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    # Memory too: 4 GiB over what this process maps once set up (a grammar past it is refused as too large).
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (mapped + 4 * 2**30, resource.RLIM_INFINITY))
    conn.send("ready")
    while True:
        try:
            schema = conn.recv()
        except EOFError:  # the worker is gone
            return
        try:
            compiler.compile_json_schema(schema, any_whitespace=False)
            conn.send(None)
        except MemoryError:
            conn.send("its grammar is too large to compile")
        except Exception as e:
            conn.send((_native_message(e).splitlines() or [type(e).__name__])[0])


class SocketOut:
    """The writing half of a connection to the replica, used by the engine's thread (and, once the engine has
    failed, by the event loop): blocking writes on a duplicate of the connection's descriptor, whose reading half
    the event loop keeps. A replica that has gone (a broken pipe) or a connection closed here makes writes no-ops."""

    def __init__(self, fd: int):
        self.fd: int | None = os.dup(fd)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self.fd is not None:
            try:
                view = view[os.write(self.fd, view):]
            except BlockingIOError:  # the socket is non-blocking (the event loop's): wait until it takes more
                select.select([], [self.fd], [])
            except OSError:  # the replica closed its end
                self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Stepper:
    """vLLM's `LLMEngine` in this process, stepped by a thread of its own. Requests come from the event loop; the
    thread writes each step's replies itself, one write per connection per step, and wakes the event loop only
    when requests end.

    Why not vLLM's `AsyncLLM`: it always runs the engine core (scheduler and model) in a process of its own, behind
    ZeroMQ, with one more process to start (it imports vLLM and torch: 4-5 s) and one more hop per step. On this
    machine's tiny model, 1 client, 32 tokens a request, its loop gave 988 output tokens/s against 1300-1360 for
    this one, and 5957 against 8386 at 8 clients (benchmarks/README.md). The replica is already a process apart
    from HTTP, so the engine core's process bought nothing here.

    Why the thread writes the replies: handing each step's outputs to the event loop (`call_soon_threadsafe`) woke
    the loop every step, and the loop then held the GIL (its wake-up, the replies, the write) while the engine
    waited to step again: 13% of the engine thread's samples were that hand-over at 1 client (py-spy)."""

    _STOP = object()

    def __init__(self, make_engine: Any, loop: asyncio.AbstractEventLoop):
        self.engine: Any = None
        self.loop = loop
        self.ready: concurrent.futures.Future = concurrent.futures.Future()  # the engine built (or why not)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.requests: dict[str, asyncio.Future] = {}  # the loop's side: id -> its future
        self.live: dict[str, tuple[Any, Any]] = {}  # the engine thread's side: id -> (reply, out)
        self.failure: BaseException | None = None  # what killed the engine: nothing more can be served
        # The engine is built on the thread that steps it: vLLM binds the OpenMP threads of the thread that loads
        # the model, and torch runs the model's ops on those of the thread that calls it.
        self.thread = threading.Thread(target=self._run, args=(make_engine,), name="vllm-engine", daemon=True)
        self.thread.start()

    # on the event loop

    def submit(self, rid: str, prompt: Any, params: Any, lora: Any, reply: Any, out: Any) -> asyncio.Future:
        """Queue a request. For each of its outputs the engine's thread calls `reply(RequestOutput)` and writes
        the bytes it returns to `out` (`out.write`); the future returned ends with the request, or with the error
        vLLM raised while taking it, or with a failing `reply`'s error."""
        done = self.loop.create_future()
        if self.failure is not None:
            done.set_exception(self.failure)
            return done
        if rid in self.requests:  # its outputs would go to the other request, which would never end
            done.set_exception(ValueError(f"request id {rid!r} is already running"))
            return done
        self.requests[rid] = done
        self.inbox.put(("add", rid, prompt, params, lora, reply, out))
        return done

    def abort(self, rid: str) -> None:
        if self.requests.pop(rid, None) is not None:
            self.inbox.put(("abort", rid))

    def send(self, out: Any, data: bytes) -> None:
        """Write `data` to `out` in order with the replies the engine's thread writes there."""
        if self.failure is not None:  # the thread has stopped: nothing else writes
            out.write(data)
        else:
            self.inbox.put(("send", out, data))

    def close(self, out: Any) -> None:
        """Close `out` (its connection is gone) once what was sent before is written."""
        if self.failure is not None:
            out.close()
        else:
            self.inbox.put(("close", out))

    async def call(self, method: str, *args: Any) -> Any:
        """Run `engine.method(*args)` between two steps; its result."""
        result: concurrent.futures.Future = concurrent.futures.Future()
        self.inbox.put(("call", result, method, args))
        return await asyncio.wrap_future(result)

    def stop(self) -> None:
        self.inbox.put(self._STOP)
        self.thread.join(10)

    def _end(self, ended: list[tuple[str, BaseException | None]]) -> None:
        for rid, error in ended:
            done = self.requests.pop(rid, None)
            if done is not None and not done.done():
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(error)

    def _fail(self, error: BaseException) -> None:
        self.failure = error
        self._end([(rid, error) for rid in list(self.requests)])

    # on the engine's thread

    def _run(self, make_engine: Any) -> None:
        try:
            engine = self.engine = make_engine()
        except BaseException as e:
            self.ready.set_exception(e)
            return
        self.ready.set_result(None)
        try:
            while True:
                busy = engine.has_unfinished_requests()
                while True:  # what came since the last step, waiting for something when idle
                    try:
                        command = self.inbox.get(block=not busy)
                    except queue.Empty:
                        break
                    if command is self._STOP:
                        return
                    self._apply(command)
                    busy = busy or engine.has_unfinished_requests()
                if busy:
                    self._write(engine.step())
        except BaseException as e:  # the engine itself failed (the model, the scheduler)
            traceback.print_exc()
            self.live.clear()
            self.loop.call_soon_threadsafe(self._fail, e)

    def _write(self, outputs: list[Any]) -> None:
        """One step's replies: one write per connection; the requests that ended, to the loop in one call."""
        replies: dict[Any, list[bytes]] = {}
        ended: list[tuple[str, BaseException | None]] = []
        for output in outputs:
            entry = self.live.get(output.request_id)
            if entry is None:
                continue  # aborted meanwhile
            reply, out = entry
            try:
                replies.setdefault(out, []).append(reply(output))
            except Exception as e:  # this request's reply could not be made: it fails alone
                self.engine.abort_request([output.request_id])
                del self.live[output.request_id]
                ended.append((output.request_id, e))
                continue
            if output.finished:
                del self.live[output.request_id]
                ended.append((output.request_id, None))
        for out, parts in replies.items():
            out.write(b"".join(parts))
        if ended:
            self.loop.call_soon_threadsafe(self._end, ended)

    def _apply(self, command: tuple) -> None:
        op = command[0]
        if op == "add":
            _, rid, prompt, params, lora, reply, out = command
            try:
                self.engine.add_request(rid, prompt, params, lora_request=lora)
            except Exception as e:  # vLLM's checks of the request: this request's error, not the engine's
                self.loop.call_soon_threadsafe(self._end, [(rid, e)])
            else:
                self.live[rid] = (reply, out)
        elif op == "abort":
            if self.live.pop(command[1], None) is not None:
                self.engine.abort_request([command[1]])
        elif op == "send":
            command[1].write(command[2])
        elif op == "close":
            command[1].close()
        elif op == "call":
            _, result, method, args = command
            try:
                result.set_result(getattr(self.engine, method)(*args))
            except Exception as e:
                result.set_exception(e)


async def serve(args: argparse.Namespace) -> None:
    from vllm import SamplingParams
    from vllm.config import StructuredOutputsConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.exceptions import VLLMClientError
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
    from vllm.v1.engine.llm_engine import LLMEngine

    loop = asyncio.get_running_loop()
    if args.model == "-":  # started before the model was saved: vLLM is imported, now the model
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return  # the replica closed our stdin first (it went, or the model is not for vLLM)
        given = json.loads(line)
        args.model, args.max_model_len = given["model"], given["max_model_len"]
    engine_args = EngineArgs(
        model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=0,
        enable_lora=args.max_loras > 0, max_loras=max(args.max_loras, 1), max_lora_rank=args.max_lora_rank,
        max_logprobs=args.max_logprobs, enable_prefix_caching=True, disable_log_stats=True,
        max_num_seqs=args.max_num_seqs, kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30),
        enforce_eager=args.eager,
        # guided JSON without free whitespace between tokens (compact, as OpenAI's): the engine's setting
        structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True))
    # in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set in main)
    stepper = Stepper(lambda: LLMEngine.from_engine_args(engine_args), loop)
    await asyncio.wrap_future(stepper.ready)
    schemas = SchemaCheck(args.model, args.schema_compile_s)

    def line(obj: dict[str, Any]) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode() + b"\n"

    async def run(msg: dict[str, Any], out: SocketOut) -> None:
        rid = msg["id"]
        structured = None
        try:
            params = dict(msg.get("params") or {})
            if params.get("logit_bias"):  # JSON keys are strings
                params["logit_bias"] = {int(k): v for k, v in params["logit_bias"].items()}
            logprobs, prompt_logprobs = params.get("logprobs"), params.get("prompt_logprobs")
            if msg.get("json_schema") is not None:
                await schemas.check(msg["json_schema"])
                structured = StructuredOutputsParams(json=msg["json_schema"])
            elif msg.get("json_object"):
                structured = StructuredOutputsParams(json_object=True)
            sp = SamplingParams(**params, detokenize=False, structured_outputs=structured,
                                output_kind=RequestOutputKind.DELTA)
            lora = None
            if msg.get("lora"):
                lora = LoRARequest(msg["lora"]["name"], msg["lora"]["id"], msg["lora"]["path"])
            first = True

            def reply(output: Any) -> bytes:  # on the engine's thread
                nonlocal first
                c = output.outputs[0]
                obj: dict[str, Any] = {"id": rid, "t": list(c.token_ids), "f": c.finish_reason}
                if logprobs is not None and c.logprobs is not None:
                    obj["lp"] = [[_finite(e[t].logprob), _top(e, logprobs)] for t, e in zip(c.token_ids, c.logprobs)]
                if first and prompt_logprobs is not None and output.prompt_logprobs is not None:
                    obj["plp"] = [None if e is None else [t, _finite(e[t].logprob), _top(e, prompt_logprobs)]
                                  for t, e in zip(msg["prompt"], output.prompt_logprobs)]
                first = False
                return line(obj)

            done = stepper.submit(rid, TokensPrompt(prompt_token_ids=msg["prompt"]), sp, lora, reply, out)
            try:
                await done
            except asyncio.CancelledError:
                stepper.abort(rid)
                raise
        except asyncio.CancelledError:
            raise
        except Refused as e:
            stepper.send(out, line({"id": rid, "e": str(e), "status": e.status, "param": e.param}))
        except VLLMClientError as e:  # vLLM's checks of the request (a schema nested too deep, a bad regex...)
            stepper.send(out, line({"id": rid, "e": _native_message(e), "status": 400,
                                    "param": "response_format" if structured is not None
                                    else getattr(e, "parameter", None)}))
        except Exception as e:
            stepper.send(out, line({"id": rid, "e": f"{type(e).__name__}: {e}"}))
            if stepper.failure is not None:  # the engine failed: nothing more can be served; the replica sees us go
                _kill_group()

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Replies are written by the engine's thread (`Stepper`), on a descriptor of its own; this loop only reads.
        out = SocketOut(writer.get_extra_info("socket").fileno())
        tasks: dict[str, asyncio.Task] = {}
        try:
            while line_in := await reader.readline():
                msg = json.loads(line_in)
                op = msg.get("op")
                if op == "generate":
                    task = asyncio.create_task(run(msg, out))
                    tasks[msg["id"]] = task
                    task.add_done_callback(lambda _, rid=msg["id"]: tasks.pop(rid, None))
                elif op == "abort":
                    task = tasks.pop(msg["id"], None)
                    if task is not None:
                        task.cancel()  # its `run` aborts it in vLLM
                elif op == "remove_lora":
                    await stepper.call("remove_lora", int(msg["id"]))
        finally:
            for task in list(tasks.values()):
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)  # their aborts queued first
            stepper.close(out)
            writer.close()

    if os.path.exists(args.socket):
        os.unlink(args.socket)
    server = await asyncio.start_unix_server(client, path=args.socket, limit=1 << 26)
    os.write(args.ready_fd, b"ready\n")
    schemas.warm()
    # The replica closes our stdin when it goes (or dies): then we go too.
    stdin_closed = loop.run_in_executor(None, sys.stdin.read)
    async with server:
        await stdin_closed
    schemas.close()
    await asyncio.to_thread(stepper.stop)


def _die_with(parent: int) -> None:
    """Kill this process group (this worker and vLLM's engine processes: the replica started us as its leader)
    as soon as the replica that started us is gone, however it went (SIGKILL included: then it closes nothing)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        _kill_group()

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def main() -> None:
    _die_with(os.getppid())
    # The processes vLLM starts die with their parent even when nothing of ours runs (vllm_site/sitecustomize.py)
    site = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_site")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))
    os.environ["PIPELINES_VLLM_DIE_WITH_PARENT"] = "1"
    # vLLM's engine core (scheduler and model) runs in this process (`Stepper`), not in processes of its own: on
    # CPU vLLM would start one for the engine core and one more for the model, each importing vLLM and torch (4-5 s
    # each), and hop between them every step. With the third process, the engine core at times also sent all of a
    # request's outputs at its end, so that its tokens reached the client in one burst (benchmarks/README.md).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    signal.signal(signal.SIGTERM, lambda *_: _kill_group())
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True,
                        help='the model folder; "-": read {"model": DIR, "max_model_len": N} as a line on stdin')
    parser.add_argument("--socket", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-loras", type=int, default=0)
    parser.add_argument("--max-lora-rank", type=int, default=16)
    parser.add_argument("--max-logprobs", type=int, default=20)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--schema-compile-s", type=float, default=5.0)
    parser.add_argument("--eager", action="store_true", help="no torch.compile / CUDA graphs: a faster start")
    args = parser.parse_args()
    # vLLM logs to stdout (its engine processes inherit it): stdout becomes stderr, and only "ready" goes to the
    # replica's pipe.
    args.ready_fd = os.dup(1)
    os.dup2(2, 1)
    logging.basicConfig(level=logging.WARNING)
    try:
        asyncio.run(serve(args))
    except Exception:
        # into worker.log, which the replica shows when the engine does not start: the group kill below ends this
        # process before Python would print it
        traceback.print_exc()
        sys.stderr.flush()
    finally:
        # However we leave (stdin closed, an error, the replica gone while vLLM was still starting), vLLM's engine
        # processes leave with us: its own shutdown does not always take them (orphans were seen).
        _kill_group()


if __name__ == "__main__":
    main()
