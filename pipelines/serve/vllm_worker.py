"""vLLM's engine in a child process of a replica: `python vllm_worker.py --model DIR --socket PATH`.

Run by the interpreter of the separate vLLM environment (`.venv-vllm`, from `requirements-vllm.lock`): this file
imports only the standard library and vLLM, never `pipelines` (whose environment has other versions of
transformers and fastapi). `pipelines.serve.vllm_engine` starts it and speaks to it over a Unix socket, one JSON
object per line each way, many requests in flight on one connection:

- in: `{"op": "generate", "id": ID, "prompt": [token ids], "params": {SamplingParams fields}, "lora": {"name",
  "id", "path"} | null, "json_schema": SCHEMA | null, "json_object": bool}`; `{"op": "abort", "id": ID}`;
  `{"op": "remove_lora", "id": N}`.
- out, per generate, as tokens come (vLLM's DELTA outputs): `{"id": ID, "t": [new token ids], "lp": [[logprob,
  [[token, logprob], ...]], ...] | null, "plp": [null | [token, logprob, [[token, logprob], ...]], ...] (first
  message only, with prompt_logprobs), "f": finish reason | null}`; a failure: `{"id": ID, "e": "message"}`.

Text, stop strings, streaming and the OpenAI formats stay with the replica (it decodes the token ids itself), so
vLLM runs without detokenizing. The first line written to stdout is `ready` once the engine has loaded; vLLM's own logs go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from typing import Any


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


async def writer_drain_all(writers: set[asyncio.StreamWriter]) -> None:
    for writer in list(writers):
        try:
            await asyncio.wait_for(writer.drain(), 1.0)
        except (OSError, asyncio.TimeoutError):
            pass


async def serve(args: argparse.Namespace) -> None:
    from vllm import SamplingParams
    from vllm.config import StructuredOutputsConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
    from vllm.v1.engine.async_llm import AsyncLLM

    engine_args = AsyncEngineArgs(
        model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=0,
        enable_lora=args.max_loras > 0, max_loras=max(args.max_loras, 1), max_lora_rank=args.max_lora_rank,
        max_logprobs=args.max_logprobs, enable_prefix_caching=True, disable_log_stats=True,
        max_num_seqs=args.max_num_seqs, kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30),
        # guided JSON without free whitespace between tokens (compact, as OpenAI's): the engine's setting
        structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True))
    engine = AsyncLLM.from_engine_args(engine_args)
    writers: set[asyncio.StreamWriter] = set()

    async def run(msg: dict[str, Any], send: Any) -> None:
        rid = msg["id"]
        try:
            params = dict(msg.get("params") or {})
            if params.get("logit_bias"):  # JSON keys are strings
                params["logit_bias"] = {int(k): v for k, v in params["logit_bias"].items()}
            logprobs, prompt_logprobs = params.get("logprobs"), params.get("prompt_logprobs")
            structured = None
            if msg.get("json_schema") is not None:
                structured = StructuredOutputsParams(json=msg["json_schema"])
            elif msg.get("json_object"):
                structured = StructuredOutputsParams(json_object=True)
            sp = SamplingParams(**params, detokenize=False, structured_outputs=structured,
                                output_kind=RequestOutputKind.DELTA)
            lora = None
            if msg.get("lora"):
                lora = LoRARequest(msg["lora"]["name"], msg["lora"]["id"], msg["lora"]["path"])
            first = True
            async for out in engine.generate(TokensPrompt(prompt_token_ids=msg["prompt"]), sp, rid,
                                             lora_request=lora):
                c = out.outputs[0]
                reply: dict[str, Any] = {"id": rid, "t": list(c.token_ids), "f": c.finish_reason}
                if logprobs is not None and c.logprobs is not None:
                    reply["lp"] = [[_finite(e[t].logprob), _top(e, logprobs)] for t, e in zip(c.token_ids, c.logprobs)]
                if first and prompt_logprobs is not None and out.prompt_logprobs is not None:
                    reply["plp"] = [None if e is None else [t, _finite(e[t].logprob), _top(e, prompt_logprobs)]
                                    for t, e in zip(msg["prompt"], out.prompt_logprobs)]
                first = False
                send(reply)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            send({"id": rid, "e": f"{type(e).__name__}: {e}"})
            if engine.errored:  # vLLM's engine process died: nothing more can be served; the replica sees us go
                await writer_drain_all(writers)
                os.killpg(0, signal.SIGKILL)

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        tasks: dict[str, asyncio.Task] = {}

        def send(obj: dict[str, Any]) -> None:
            if not writer.is_closing():
                writer.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")

        try:
            while line := await reader.readline():
                msg = json.loads(line)
                op = msg.get("op")
                if op == "generate":
                    task = asyncio.create_task(run(msg, send))
                    tasks[msg["id"]] = task
                    task.add_done_callback(lambda _, rid=msg["id"]: tasks.pop(rid, None))
                elif op == "abort":
                    task = tasks.pop(msg["id"], None)
                    if task is not None:
                        task.cancel()  # vLLM aborts a request whose generator is closed
                elif op == "remove_lora":
                    await engine.remove_lora(int(msg["id"]))
                await writer.drain()
        finally:
            for task in list(tasks.values()):
                task.cancel()
            writers.discard(writer)
            writer.close()

    if os.path.exists(args.socket):
        os.unlink(args.socket)
    server = await asyncio.start_unix_server(client, path=args.socket, limit=1 << 26)
    os.write(args.ready_fd, b"ready\n")
    # The replica closes our stdin when it goes (or dies): then we go too.
    loop = asyncio.get_running_loop()
    stdin_closed = loop.run_in_executor(None, sys.stdin.read)
    async with server:
        await stdin_closed
    await asyncio.wait_for(asyncio.to_thread(engine.shutdown), 10)


def _die_with(parent: int) -> None:
    """Kill this process group (this worker and vLLM's engine processes: the replica started us as its leader)
    as soon as the replica that started us is gone, however it went (SIGKILL included: then it closes nothing)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="watch-parent", daemon=True).start()


def main() -> None:
    _die_with(os.getppid())
    # The processes vLLM starts die with their parent even when nothing of ours runs (vllm_site/sitecustomize.py)
    site = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_site")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))
    os.environ["PIPELINES_VLLM_DIE_WITH_PARENT"] = "1"
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))  # the whole group, at once
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-loras", type=int, default=0)
    parser.add_argument("--max-lora-rank", type=int, default=16)
    parser.add_argument("--max-logprobs", type=int, default=20)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    args = parser.parse_args()
    # vLLM logs to stdout (its engine processes inherit it): stdout becomes stderr, and only "ready" goes to the
    # replica's pipe.
    args.ready_fd = os.dup(1)
    os.dup2(2, 1)
    logging.basicConfig(level=logging.WARNING)
    try:
        asyncio.run(serve(args))
    finally:
        # However we leave (stdin closed, an error, the replica gone while vLLM was still starting), vLLM's engine
        # processes leave with us: its own shutdown does not always take them (orphans were seen).
        os.killpg(0, signal.SIGKILL)


if __name__ == "__main__":
    main()
