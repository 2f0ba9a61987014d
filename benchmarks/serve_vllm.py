"""Streaming generation throughput and latency: `pipelines serve` on vLLM, on transformers, and bare vLLM's server.

    .venv/bin/python benchmarks/serve_vllm.py [--runs 3] [--clients 1,8,64] [--max-tokens 32] [--requests-per-client 4]
                                              [--requests 256] [--settle-s 2]
                                              [--port 8800] [--workdir .bench/serve-vllm] [--servers ours-vllm,...]
                                              [--preset tests|small|125m]

What it does:
  1. Registers the tiny model of the tests (2-layer Llama, hidden 32 in one head, byte-level BPE trained here) as
     models:/lm@champion in a fresh MLflow (SQLite) under WORKDIR, and saves its folder for bare vLLM; with
     `--preset small` (or 125m, ...) a Llama of that `pipelines pretrain` preset's shape, random weights, the same
     tokenizer and 64-token context.
  2. Starts the three servers at once, each on its own port:
     - ours-vllm:         `pipelines serve --engine vllm` (one replica, direct ingress; vLLM's engine in a child
                          process of the replica, from .venv-vllm);
     - ours-transformers: `pipelines serve --engine transformers --max-batch-size 64` (static batches);
     - bare-vllm:         vLLM's own OpenAI server (`.venv-vllm/bin/python -m vllm.entrypoints.openai.api_server`)
                          on the same folder, with the engine settings ours-vllm gives its child (float32, 1 GiB
                          of KV cache, max_model_len = the model's context, prefix caching);
     - bare-vllm-uni:     the same, with `VLLM_ENABLE_V1_MULTIPROCESSING=0`, which ours-vllm's worker sets: on
                          CPU the model then runs in vLLM's engine-core process instead of a third process (not
                          in the default list; `--servers ours-vllm,ours-transformers,bare-vllm,bare-vllm-uni`).
  3. RUNS rounds; in each, for every number of clients, every server in turn (the order rotating each round):
     after SETTLE_S idle seconds, CLIENTS concurrent clients, each sending REQUESTS_PER_CLIENT streaming
     completions one after the other (at least REQUESTS (256) in all: 256 one after the other for 1 client)
     (POST /v1/completions, prompt "the quick brown", max_tokens MAX_TOKENS, temperature 0, stream with usage).
     Measured: output tokens/s (the usage's completion tokens over the wall time of the whole load), time to first
     token (request sent to first text chunk) and per-token latency ((last chunk - first chunk) / (tokens - 1)) at
     p50 and p99 over all requests of the load.
  Prints a markdown table of medians over the rounds, the load average before and after, and writes every
  figure to WORKDIR/results.json, the servers' logs to WORKDIR/logs/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_latency import PYTHON, REPO, percentile, register_tiny_model, stop, wait_up  # noqa: E402

SERVERS = ["ours-vllm", "ours-transformers", "bare-vllm"]
PROMPT = "the quick brown"


# what a server's process gets on top of the environment
SERVER_ENV = {"bare-vllm-uni": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}


def server_command(name: str, port: int, workdir: Path) -> list[str]:
    if name.startswith("bare-vllm"):
        from pipelines.serve.vllm_engine import vllm_python

        python = vllm_python()
        if python is None:
            raise SystemExit("no vLLM environment (.venv-vllm): make venv")
        return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(workdir / "model"),
                "--served-model-name", "lm", "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32",
                "--kv-cache-memory-bytes", str(2**30), "--max-model-len", "64", "--seed", "0",
                "--enable-prefix-caching", "--disable-log-stats", "--uvicorn-log-level", "warning"]
    engine = name.removeprefix("ours-")
    command = [PYTHON, "-m", "pipelines.cli", "serve", "--model", "models:/lm@champion", "--port", str(port),
               "--watch-interval-s", "0", "--engine", engine, "--max-ongoing-requests", "256",
               "--max-tokens-limit", "64"]
    if engine == "transformers":
        command += ["--max-batch-size", "64"]
    return command


async def load(url: str, clients: int, per_client: int, max_tokens: int) -> dict[str, Any]:
    """CLIENTS concurrent streaming clients, PER_CLIENT requests each; throughput and latency figures."""
    body = {"model": "lm", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    ttft: list[float] = []
    per_token: list[float] = []
    tokens = errors = 0

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal tokens, errors
        sent = time.perf_counter()
        first = last = None
        used = 0
        async with session.post(url, json=body) as r:
            if r.status != 200:
                errors += 1
                await r.read()
                return
            async for line in r.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    used = event["usage"]["completion_tokens"]
                if any(c.get("text") for c in event.get("choices", [])):
                    last = time.perf_counter()
                    first = first or last
        if first is None:
            errors += 1
            return
        tokens += used
        ttft.append(first - sent)
        if used > 1:
            per_token.append((last - first) / (used - 1))

    async def client(session: aiohttp.ClientSession) -> None:
        for _ in range(per_client):
            await one(session)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        await one(session)  # a warm-up request, not counted
        ttft.clear()
        per_token.clear()
        tokens = errors = 0
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return {"tokens_per_s": tokens / elapsed, "ttft_p50_ms": percentile(ttft, 0.5) * 1e3,
            "ttft_p99_ms": percentile(ttft, 0.99) * 1e3, "tpot_p50_ms": percentile(per_token, 0.5) * 1e3,
            "tpot_p99_ms": percentile(per_token, 0.99) * 1e3, "tokens": tokens, "errors": errors,
            "seconds": elapsed}


def report(results: dict[str, dict[str, list[dict]]], args: argparse.Namespace, loads: list[str]) -> str:
    lines = [f"model {args.preset}, {args.runs} rounds, {args.max_tokens} output tokens per request, max({args.requests_per_client}, "
             f"{args.requests} / clients) requests per client, {args.settle_s:g} s idle before each load; medians over the rounds. Load average: {' -> '.join(loads)}", "",
             "| clients | server | output tok/s | x bare vLLM | TTFT p50 / p99 ms | per-token p50 / p99 ms | errors |",
             "|---|---|---|---|---|---|---|"]
    for clients in args.clients:
        bare = results.get("bare-vllm", {}).get(str(clients))
        bare_tps = statistics.median(r["tokens_per_s"] for r in bare) if bare else None
        for name in args.servers:
            runs = results[name][str(clients)]

            def med(key: str, runs: list[dict] = runs) -> float:
                return statistics.median(r[key] for r in runs)

            ratio = f"{med('tokens_per_s') / bare_tps:.2f}" if bare_tps else "-"
            lines.append(f"| {clients} | {name} | {med('tokens_per_s'):.0f} | {ratio} | {med('ttft_p50_ms'):.1f} / "
                         f"{med('ttft_p99_ms'):.1f} | {med('tpot_p50_ms'):.2f} / {med('tpot_p99_ms'):.2f} | "
                         f"{sum(r['errors'] for r in runs)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", default="1,8,64")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--requests", type=int, default=256, help="requests per load, at least")
    parser.add_argument("--settle-s", type=float, default=2.0, help="idle seconds before each load")
    parser.add_argument("--port", type=int, default=8800)
    parser.add_argument("--workdir", default=str(REPO / ".bench" / "serve-vllm"))
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--preset", default="tests", choices=["tests", "tiny", "small", "125m", "350m", "1b"], help="the model: the tests' tiny one (2 layers, hidden 32), "
                        "or a `pipelines pretrain` preset shape with random weights (small: 6 layers, hidden 384)")
    args = parser.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    args.servers = args.servers.split(",")
    workdir = Path(args.workdir)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    env = register_tiny_model(workdir, args.preset)
    env.pop("OMP_NUM_THREADS")  # vLLM sizes its own threads; the replica's torch follows replica_cpus
    servers: dict[str, tuple[subprocess.Popen, str, Any]] = {}
    loads = [os.getloadavg()[0].__format__(".2f")]
    try:
        for i, name in enumerate(args.servers):
            port = args.port + 10 * i
            log = open(workdir / "logs" / f"{name}.log", "w")  # noqa: SIM115
            proc = subprocess.Popen(server_command(name, port, workdir), cwd=REPO, env={**os.environ, **env, **SERVER_ENV.get(name, {})},
                                    stdout=log, stderr=subprocess.STDOUT)
            servers[name] = (proc, f"http://127.0.0.1:{port}", log)
            wait_up(f"http://127.0.0.1:{port}/health" + ("z" if name.startswith("ours") else ""), proc, 600)
        results: dict[str, dict[str, list[dict]]] = {name: {str(c): [] for c in args.clients} for name in args.servers}
        for run in range(args.runs):
            order = args.servers[run % len(args.servers):] + args.servers[:run % len(args.servers)]
            for clients in args.clients:
                for name in order:
                    # The last load's vLLM processes busy-wait for their next step for 1 s after it (vLLM's
                    # shm_broadcast), on the core each server's CPU worker is bound to (the same one): settle first.
                    time.sleep(args.settle_s)
                    per_client = max(args.requests_per_client, args.requests // clients)
                    figures = asyncio.run(load(f"{servers[name][1]}/v1/completions", clients, per_client,
                                               args.max_tokens))
                    results[name][str(clients)].append(figures)
                    print(f"run {run + 1} clients {clients} {name}: {json.dumps(figures)}", flush=True)
    finally:
        for proc, _, log in servers.values():
            stop(proc)
            log.close()
    loads.append(os.getloadavg()[0].__format__(".2f"))
    (workdir / "results.json").write_text(json.dumps({"args": vars(args), "load": loads, "results": results},
                                                     indent=1))
    print(report(results, args, loads))


if __name__ == "__main__":
    main()
