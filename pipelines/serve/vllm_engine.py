"""Generation on vLLM: a `TextEngine` whose completions come from vLLM's engine in a child process.

vLLM lives in its own environment (`.venv-vllm`, from `requirements-vllm.lock`: vLLM pins transformers and
fastapi to versions older than ours), so the replica starts `vllm_worker.py` with that environment's Python and
talks to it over a Unix socket (one JSON line per message; see `vllm_worker`). What the replica does not hand over
stays as it was: tokenising, chat templates, text and stop strings (decoded here from vLLM's token ids, so a
completion streams the same pieces on either engine), the OpenAI formats, embeddings (the transformers model,
still loaded), adapters' registry and LRU. vLLM does the generating: continuous batching, paged KV cache, prefix
caching, LoRA (`LoRARequest`), per-request sampling, log-probabilities and guided decoding (JSON schema).

`vllm_available()` says whether the environment is there; `vllm_can_serve(model)` whether vLLM's CPU backend
takes the model (a head size of 32 or more, among the architectures vLLM knows).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.errors import PipelineError
from pipelines.serve.engine import (GREEDY_BELOW, AdapterError, Generation, RequestRefused, TextEngine,
                                   TokenLogprobs)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("vllm_worker.py")
VLLM_PYTHON_ENV = "PIPELINES_VLLM_PYTHON"
# vLLM's CPU attention kernels take these head sizes (vllm/v1/attention/backends/cpu_attn.py)
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# Causal LM architectures of our training and the usual families; vLLM knows many more, but these are tested.
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "GPT2LMHeadModel", "GPTNeoXForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM",
                 "PhiForCausalLM", "Phi3ForCausalLM", "OPTForCausalLM")
START_TIMEOUT_S = 600.0


def vllm_python() -> str | None:
    """The Python of the vLLM environment: $PIPELINES_VLLM_PYTHON, else `.venv-vllm` beside our `.venv`."""
    configured = os.environ.get(VLLM_PYTHON_ENV)
    if configured:
        return configured if Path(configured).exists() else None
    for root in (Path(sys.prefix).parent, Path(__file__).resolve().parents[2]):
        candidate = root / ".venv-vllm" / "bin" / "python"
        if candidate.exists():
            return str(candidate)
    return None


def vllm_available() -> bool:
    return vllm_python() is not None


def vllm_can_serve(model: PreTrainedModel) -> str | None:
    """None if vLLM can serve `model` here, else why not."""
    config = model.config
    archs = list(getattr(config, "architectures", None) or [type(model).__name__])
    if not any(a in ARCHITECTURES for a in archs):
        return f"architecture {archs[0]} is not among those served on vLLM here ({', '.join(ARCHITECTURES)})"
    text = config.get_text_config()
    heads = getattr(text, "num_attention_heads", None)
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
    if head_dim not in CPU_HEAD_SIZES:
        return f"head size {head_dim}: vLLM's CPU attention takes {', '.join(map(str, CPU_HEAD_SIZES))}"
    return None


class VllmStart:
    """vLLM's worker process, started before its model is known: it imports vLLM and torch (about 5 s) while the
    replica loads the model from the registry; `VllmEngine` then hands it the model. `close()`, or dropping it,
    stops the worker (a model that vLLM cannot serve after all)."""

    def __init__(self, *, python: str | None = None, max_loras: int = 0, max_lora_rank: int = 64,
                 kv_cache_gib: float = 1.0, schema_compile_s: float = 5.0, compile: bool = True):
        python = python or vllm_python()
        if python is None:
            raise PipelineError(f"the vLLM environment is not installed (make venv-vllm, or set {VLLM_PYTHON_ENV})")
        self.max_loras = max_loras
        self.dir = Path(tempfile.mkdtemp(prefix="pipelines-vllm-"))
        self.socket = str(self.dir / "engine.sock")
        args = [python, str(WORKER), "--model", "-", "--socket", self.socket, "--max-loras", str(max_loras),
                "--max-lora-rank", str(max_lora_rank), "--kv-cache-gib", str(kv_cache_gib),
                "--schema-compile-s", str(schema_compile_s), *([] if compile else ["--eager"])]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.log = open(self.dir / "worker.log", "wb")  # noqa: SIM115 (kept open for the child)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     env=env, start_new_session=True)
        # The worker leads its own process group (vLLM's engine processes are in it): when the worker exits, for
        # whatever reason, what is left of the group goes too. The worker kills the group if this process dies.
        # One thread waits for the worker (`_reap_group`); closing only closes its stdin and waits for that.
        self.exited = threading.Event()
        self.finalizer = weakref.finalize(self, _stop, self.proc, self.exited, self.log, self.dir)
        threading.Thread(target=_reap_group, args=(self.proc, self.exited), name="vllm-reap", daemon=True).start()

    def close(self) -> None:
        self.finalizer()


class VllmEngine(TextEngine):
    """`TextEngine` (tokenizer, chat template, embeddings) that generates on vLLM in a child process."""

    guided_decoding = True

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, version: int, *,
                 start: VllmStart | None = None, python: str | None = None, max_loras: int = 0,
                 max_lora_rank: int = 64, kv_cache_gib: float = 1.0, schema_compile_s: float = 5.0,
                 compile: bool = True):
        """`start`: a worker started beforehand (its settings win over the keyword arguments), else one starts."""
        super().__init__(model, tokenizer, name, version)
        start = start or VllmStart(python=python, max_loras=max_loras, max_lora_rank=max_lora_rank,
                                   kv_cache_gib=kv_cache_gib, schema_compile_s=schema_compile_s, compile=compile)
        self._start = start  # holds the worker: it stops when the engine is closed or dropped
        self._max_loras = start.max_loras
        self._dir, self._socket, self._proc, self._exited = start.dir, start.socket, start.proc, start.exited
        folder = self._dir / "model"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps({"model": str(folder), "max_model_len": self.context_length}).encode()
                                   + b"\n")
            self._proc.stdin.flush()
        except OSError:
            pass  # it exited: `_wait_ready` says why
        self._wait_ready(start.started)
        self._ids = itertools.count()
        self._lora_ids = itertools.count(1)
        self._loras: dict[str, tuple[int, str]] = {}  # adapter name -> (vLLM's id, folder)
        self._connections: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Connection] = \
            weakref.WeakKeyDictionary()
        self._conn_lock = threading.Lock()
        self._active = 0  # agenerate calls in flight
        self._retired = False  # no longer served: stop the worker when the last call is done
        log.info("%s: vLLM engine up in %.1f s", self.label, time.monotonic() - start.started)

    def _wait_ready(self, started: float) -> None:
        assert self._proc.stdout is not None
        while True:
            ready, _, _ = select.select([self._proc.stdout], [], [], 1.0)
            if ready:
                line = self._proc.stdout.readline()
                if line.strip() == b"ready":
                    return
                if not line:
                    break  # it exited
            if self._proc.poll() is not None or time.monotonic() - started > START_TIMEOUT_S:
                break
        tail = self.worker_log(40)
        self.close()
        raise PipelineError(f"{self.label}: vLLM's engine did not start:\n{tail}")

    def worker_log(self, lines: int = 40) -> str:
        try:
            return "\n".join((self._dir / "worker.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        self._start.close()

    def alive(self) -> bool:
        """Whether vLLM's worker is still running (False once closed, or if it died)."""
        return not self._exited.is_set()

    def retire(self) -> None:
        """This engine is no longer served (a new version replaced it): its worker and its memory go as soon as
        the requests it is generating are done, not whenever the garbage collector gets to it."""
        with self._conn_lock:
            self._retired = True
            idle = self._active == 0
        if idle:
            self.close()

    # -- generation ----------------------------------------------------------------------------
    def generate(self, rows: Sequence[Generation]) -> None:
        """`agenerate` from a thread without an event loop (the replica calls `agenerate` on its loop)."""

        async def once() -> None:
            conn = _Connection(self._socket)
            try:
                await asyncio.gather(*(self._run(conn, row) for row in rows))
            finally:
                conn.close()

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(once())
            return
        # Called on a running loop (the replica's constructor runs on its loop): a thread of its own.
        failure: list[BaseException] = []
        thread = threading.Thread(target=lambda: _catch(failure, asyncio.run, once()), name="vllm-generate")
        thread.start()
        thread.join()
        if failure:
            raise failure[0]

    async def agenerate(self, rows: Sequence[Generation]) -> None:
        """Generate every row (filled in place) on vLLM, all at once: its scheduler batches them with whatever else
        runs. A row that fails gets its `error`; the others finish."""
        with self._conn_lock:
            self._active += 1
        try:
            await self._agenerate(rows)
        finally:
            with self._conn_lock:
                self._active -= 1
                done = self._retired and self._active == 0
            if done:
                self.close()

    async def _agenerate(self, rows: Sequence[Generation]) -> None:
        conn = self._connection()
        if self._max_loras:
            # vLLM 0.32 on CPU with LoRA enabled fails (its engine dies) when it computes prompt log-probabilities
            # beside other requests; those rows are scored (and generated) by transformers on the same weights.
            scored = [row for row in rows if row.prompt_logprobs is not None]
            rows = [row for row in rows if row.prompt_logprobs is None]
            if scored:
                await asyncio.gather(asyncio.to_thread(TextEngine.generate, self, scored),
                                     *(self._run(conn, row) for row in rows))
                return
        await asyncio.gather(*(self._run(conn, row) for row in rows))

    def _connection(self) -> _Connection:
        loop = asyncio.get_running_loop()
        with self._conn_lock:
            conn = self._connections.get(loop)
            if conn is None or conn.broken:
                conn = self._connections[loop] = _Connection(self._socket)
            return conn

    async def _run(self, conn: _Connection, row: Generation) -> None:
        rid = f"{self.load_id}-{next(self._ids)}"
        try:
            await self._stream(conn, rid, row)
        except asyncio.CancelledError:
            conn.abort(rid)
            raise
        except Exception as e:
            row.error = e
        finally:
            if row.finish_reason is None and row.error is None:
                row.finish_reason = "length"
            del row.token_logprobs[len(row.token_ids):]
            if row.sink is not None:
                if row.error is None:
                    row._flush(done=True)
                row.sink(None)

    async def _stream(self, conn: _Connection, rid: str, row: Generation) -> None:
        if row.adapter is not None and not self._max_loras:
            raise AdapterError("this vLLM engine was started without LoRA (no adapters configured)")
        if row.adapter is not None and row.adapter not in self._loras:
            raise AdapterError(f"adapter {row.adapter} is not loaded")
        scoring_only = row.max_tokens == 0
        params: dict[str, Any] = {
            "max_tokens": max(row.max_tokens, 1), "temperature": 0.0 if row.temperature < GREEDY_BELOW else
            row.temperature, "top_p": row.top_p, "seed": row.seed, "presence_penalty": row.presence_penalty,
            "frequency_penalty": row.frequency_penalty}
        if row.logit_bias:
            params["logit_bias"] = {str(k): v for k, v in row.logit_bias.items()}
        if row.logprobs is not None and not scoring_only:
            params["logprobs"] = row.logprobs
        if row.prompt_logprobs is not None:
            params["prompt_logprobs"] = row.prompt_logprobs
        message: dict[str, Any] = {"op": "generate", "id": rid, "prompt": row.prompt_ids, "params": params}
        if row.adapter is not None:
            lora_id, folder = self._loras[row.adapter]
            message["lora"] = {"name": row.adapter, "id": lora_id, "path": folder}
        if row.json_schema is not None:
            message["json_schema"] = row.json_schema
        elif row.json_object:
            message["json_object"] = True
        queue = conn.send(rid, message)
        finished = False
        try:
            while True:
                reply = await queue.get()
                if reply is None:
                    raise RuntimeError(f"vLLM's engine went away:\n{self.worker_log(20)}")
                if "e" in reply:
                    if "status" in reply:  # the request's fault
                        raise RequestRefused(reply["e"], reply["status"], reply.get("param"))
                    raise RuntimeError(f"vLLM: {reply['e']}")
                if "plp" in reply:
                    row.prompt_token_logprobs = [None if e is None else _entry(*e) for e in reply["plp"]]
                    row.prompt_token_logprobs[:1] = [None]
                finished = reply.get("f") is not None
                if scoring_only:
                    if finished:
                        row.finish_reason = "length"
                        return
                    continue
                logprobs = reply.get("lp")
                for i, token in enumerate(reply["t"]):
                    if logprobs is not None:
                        lp, top = logprobs[i]
                        row.token_logprobs.append(TokenLogprobs(token, _logprob(lp), [(t, _logprob(p)) for t, p in top]))
                    if row.step(token, self.tokenizer, self.eos):
                        return
                if finished:
                    row.finish_reason = row.finish_reason or ("length" if reply["f"] == "length" else "stop")
                    return
        finally:
            conn.done(rid, abort=not finished)

    # -- adapters ------------------------------------------------------------------------------
    def load_adapter(self, name: str, folder: str | Path) -> None:
        """Keep a copy of the peft folder for vLLM (it loads an adapter when a request first names it)."""
        if name in self._loras:
            return
        config = Path(folder) / "adapter_config.json"
        if not config.exists():
            raise AdapterError(f"{folder} is not a LoRA adapter folder (no adapter_config.json)")
        base = json.loads(config.read_text()).get("peft_type", "LORA")
        if base != "LORA":
            raise AdapterError(f"adapter {name}: {base} adapters are not served on vLLM (LoRA only)")
        copy = self._dir / "adapters" / name
        shutil.copytree(folder, copy, dirs_exist_ok=True)
        super().load_adapter(name, folder)  # for the rows transformers scores (see agenerate)
        self._loras[name] = (next(self._lora_ids), str(copy))
        self.adapters.add(name)

    def unload_adapter(self, name: str) -> None:
        entry = self._loras.pop(name, None)
        super().unload_adapter(name)
        if entry is None:
            return
        lora_id, folder = entry
        for conn in list(self._connections.values()):
            conn.post({"op": "remove_lora", "id": lora_id})
            break
        shutil.rmtree(folder, ignore_errors=True)


def _catch(failure: list[BaseException], call: Any, *args: Any) -> None:
    try:
        call(*args)
    except BaseException as e:
        failure.append(e)


def _logprob(value: float | None) -> float:
    return float("-inf") if value is None else value


def _entry(token: int, logprob: float | None, top: list[list[Any]]) -> TokenLogprobs:
    return TokenLogprobs(token, _logprob(logprob), [(t, _logprob(p)) for t, p in top])


class _Connection:
    """One socket to the worker on one event loop: requests go out as lines, replies are routed by id."""

    def __init__(self, path: str):
        self.path = path
        self.loop = asyncio.get_running_loop()
        self.broken = False
        self._queues: dict[str, asyncio.Queue] = {}
        self._ready = asyncio.ensure_future(self._open())
        self._writer: asyncio.StreamWriter | None = None
        self._out: list[bytes] = []

    async def _open(self) -> None:
        try:
            reader, self._writer = await asyncio.open_unix_connection(self.path, limit=1 << 26)
        except OSError:
            self._fail()
            return
        if self._out:
            self._writer.write(b"".join(self._out))
            self._out.clear()
        asyncio.ensure_future(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                reply = json.loads(line)
                queue = self._queues.get(reply["id"])
                if queue is not None:
                    queue.put_nowait(reply)
        except (OSError, ValueError):
            pass
        self._fail()

    def _fail(self) -> None:
        self.broken = True
        for queue in self._queues.values():
            queue.put_nowait(None)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def post(self, message: dict[str, Any]) -> None:
        """Send `message` (from any thread: written on the connection's loop)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self.loop:
            if not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self.post, message)
            return
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        if self._writer is None:
            self._out.append(data)
        elif not self._writer.is_closing():
            self._writer.write(data)

    def send(self, rid: str, message: dict[str, Any]) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        if self.broken:
            queue.put_nowait(None)
            return queue
        self._queues[rid] = queue
        self.post(message)
        return queue

    def abort(self, rid: str) -> None:
        if self._queues.pop(rid, None) is not None:
            self.post({"op": "abort", "id": rid})

    def done(self, rid: str, abort: bool) -> None:
        if abort:
            self.abort(rid)
        else:
            self._queues.pop(rid, None)


def _reap_group(proc: subprocess.Popen, exited: threading.Event) -> None:
    proc.wait()
    exited.set()
    try:
        os.killpg(proc.pid, 9)
    except OSError:
        pass  # nothing left of the group


def _stop(proc: subprocess.Popen, exited: threading.Event, log_file: Any, folder: Path) -> None:
    """Close the worker's stdin (it exits); a thread kills its process group if it is still there after 15 s.
    Never blocks the caller: the finalizer may run on the replica's event loop (an old version dropped)."""
    try:
        if proc.stdin is not None:
            proc.stdin.close()
    except OSError:
        pass

    def clean_up() -> None:
        if not exited.wait(15):
            try:
                os.killpg(proc.pid, 9)  # still running (`exited` is set once it is reaped): its group
            except OSError:
                pass
            exited.wait()
        log_file.close()
        shutil.rmtree(folder, ignore_errors=True)

    threading.Thread(target=clean_up, name="vllm-stop", daemon=True).start()
