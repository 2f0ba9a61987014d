"""Side-by-side serving latency: `pipelines serve` (Ray Serve) vs plain FastAPI+uvicorn vs the bare model call.

    .venv/bin/python benchmarks/serve_latency.py [--runs 3] [--requests 500] [--concurrency 50]
                                                 [--concurrent-requests 1000] [--max-tokens 4] [--port 8700]
                                                 [--workdir .bench/serve] [--skip-echo] [--modes bare,fastapi,...]

What it does:
  1. Registers the tiny model of the tests (2-layer Llama, hidden 32, byte-level BPE trained here) as
     models:/lm@champion in a fresh MLflow (SQLite) under WORKDIR.
  2. Model modes, all servers up at once (each Serve mode in a Ray of its own), measured in turns, RUNS rounds:
     - bare:          TextEngine.generate in this process (the model call every mode makes);
     - fastapi:       a plain FastAPI app on uvicorn (one POST route: tokenize, generate in a thread, JSON);
     - serve-direct:  `pipelines serve` as shipped (one replica, Serve's direct ingress);
     - serve-proxy:   `pipelines serve --ingress proxy` (Serve's HTTP proxy in front, gRPC to the replica);
     - serve-stock:   `--ingress proxy` with Ray's and Serve's defaults (actor calls to the replica, user code
                      on a second loop, workers at niceness 15).
     Every request is POST /v1/completions {"model": "lm", "prompt": "the quick brown", "max_tokens": N,
     "temperature": 0}. Latency: REQUESTS sequential requests on one keep-alive connection (after 50 warm-up
     ones), p50/p99. Throughput: CONCURRENT_REQUESTS requests from CONCURRENCY concurrent clients, requests/s.
     Torch runs one thread everywhere (a replica reserves one CPU).
  3. Echo modes (unless --skip-echo): the same comparison for a JSON echo handler, to split Serve's own cost
     by request path (plain FastAPI; proxy with Serve's defaults; proxy with gRPC; proxy with user code on
     the replica's loop; a DeploymentHandle call from the driver, no HTTP; direct ingress; direct ingress
     with user code on the replica's loop; and with Ray's workers at niceness 0), each in a fresh Ray.
  The servers and Ray run at the niceness each mode gives them; on a machine shared with other work,
  note the load average printed with the results (Ray's default niceness 15 loses the CPU to it).
  Prints markdown tables (medians over runs) and writes every figure to WORKDIR/results.json, the servers'
  logs to WORKDIR/logs/.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
BODY = {"model": "lm", "prompt": "the quick brown", "max_tokens": 4, "temperature": 0}

MODEL_MODES = ["bare", "fastapi", "serve-direct", "serve-proxy", "serve-stock"]
# Ray's and Serve's defaults, written out: `pipelines serve` changes these (pipelines.serve.app.TUNING).
STOCK = {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "0", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1",
         "RAY_worker_niceness": "15"}
ECHO_VARIANTS = {
    "fastapi": {},
    "proxy (Serve defaults)": {},
    "proxy + gRPC": {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"},
    "proxy + user code on replica loop": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"},
    "handle call (no HTTP)": {},
    "direct ingress": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},
    "direct ingress + user code on replica loop": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
                                                   "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"},
    "direct ingress + user code on replica loop + niceness 0": {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
        "RAY_worker_niceness": "0"},
}


# -- measuring -----------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def sequential(url: str, body: dict, n: int) -> dict:
    """p50/p99 (ms) of n requests one after another on one keep-alive connection."""
    with httpx.Client(timeout=60) as http:
        for _ in range(50):
            http.post(url, json=body).raise_for_status()
        lat = []
        for _ in range(n):
            t = time.perf_counter()
            r = http.post(url, json=body)
            lat.append(time.perf_counter() - t)
            r.raise_for_status()
    return {"p50_ms": percentile(lat, 0.5) * 1e3, "p99_ms": percentile(lat, 0.99) * 1e3, "rps_seq": n / sum(lat)}


def concurrent(url: str, body: dict, n: int, clients: int) -> dict:
    """Requests/s of n requests from `clients` concurrent clients; non-200s and dropped connections are counted."""

    async def run() -> tuple[float, int]:
        left = list(range(n))
        errors = 0

        async def client(http: httpx.AsyncClient) -> None:
            nonlocal errors
            while left:
                left.pop()
                try:
                    r = await http.post(url, json=body)
                    errors += r.status_code != 200
                except httpx.TransportError:  # counted, not fatal: a dropped connection is a result too
                    errors += 1

        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=clients)) as http:
            started = time.perf_counter()
            await asyncio.gather(*(client(http) for _ in range(clients)))
            return time.perf_counter() - started, errors

    elapsed, errors = asyncio.run(run())
    return {"rps": n / elapsed, "errors": errors}


def wait_up(url: str, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)  # not SIGINT: ignored when this script runs as a background job
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- the model modes -----------------------------------------------------------------------------
def register_tiny_model(workdir: Path, preset: str = "tests") -> dict[str, str]:
    """Register the tests' tiny model (or, with `preset`, a Llama of that `pipelines pretrain` preset shape, random
    weights, on the same tokenizer and context) as models:/lm@champion in a fresh MLflow under workdir; return the
    env."""
    sys.path.insert(0, str(REPO))
    from tests.serve.tiny import CONTEXT, tiny_model, tiny_tokenizer

    shutil.rmtree(workdir / "home", ignore_errors=True)
    (workdir / "mlflow.db").unlink(missing_ok=True)
    env = {"PIPELINES_HOME": str(workdir / "home"), "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1",
           "RAY_USAGE_STATS_ENABLED": "0"}
    os.environ.update(env)
    from pipelines.train.registry import register_model, training_run

    tokenizer = tiny_tokenizer()
    folder = workdir / "model"
    if preset == "tests":
        tiny_model(tokenizer, seed=0).save_pretrained(folder)
    else:
        import torch
        from transformers import LlamaForCausalLM

        from pipelines.train.config import ModelConfig
        from pipelines.train.model import model_config

        torch.manual_seed(0)
        LlamaForCausalLM(model_config(ModelConfig(preset=preset), len(tokenizer), CONTEXT, tokenizer.bos_token_id,
                                      tokenizer.eos_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with training_run("serve-bench", None, {}) as run_id:
        pass
    register_model(str(folder), "lm", run_id=run_id, metric="heldout_perplexity", value=1.0)
    return env


@functools.cache
def bare_engine() -> Any:
    import torch

    from pipelines.serve.engine import TextEngine
    from pipelines.train.registry import load_registered

    torch.set_num_threads(1)
    model, tokenizer = load_registered("models:/lm@champion")
    return TextEngine(model, tokenizer, "lm", 1)


def bare(n: int) -> dict:
    """The model call alone, in this process."""
    from pipelines.serve.engine import Generation

    engine = bare_engine()

    def call() -> None:
        engine.generate([Generation(engine.encode(BODY["prompt"]), BODY["max_tokens"], temperature=0.0)])

    for _ in range(50):
        call()
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        call()
        lat.append(time.perf_counter() - t)
    return {"p50_ms": percentile(lat, 0.5) * 1e3, "p99_ms": percentile(lat, 0.99) * 1e3, "rps_seq": n / sum(lat)}


class PlainCompletion(BaseModel):
    """The baseline's request body (module level: FastAPI reads the annotation by name)."""

    model: str
    prompt: str
    max_tokens: int = 16
    temperature: float = 1.0


def plain_fastapi_server(port: int) -> None:
    """The baseline: FastAPI on uvicorn calling the same TextEngine (run as a subprocess)."""
    import asyncio as aio

    import torch
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from pipelines.serve.engine import Generation, TextEngine
    from pipelines.train.registry import load_registered

    torch.set_num_threads(1)
    model, tokenizer = load_registered("models:/lm@champion")
    engine = TextEngine(model, tokenizer, "lm", 1)
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(body: PlainCompletion) -> JSONResponse:
        row = Generation(engine.encode(body.prompt), body.max_tokens, temperature=body.temperature)
        await aio.to_thread(engine.generate, [row])
        return JSONResponse({"object": "text_completion", "model": body.model, "choices": [
            {"index": 0, "text": row.text, "finish_reason": row.finish_reason}]})

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def server_command(mode: str, port: int) -> tuple[list[str], dict[str, str]]:
    if mode == "fastapi":
        return [PYTHON, __file__, "--plain-fastapi-server", str(port)], {}
    serve = [PYTHON, "-m", "pipelines.cli", "serve", "--model", "models:/lm@champion", "--port", str(port),
             "--watch-interval-s", "0"]
    if mode == "serve-direct":
        return serve, {}
    if mode == "serve-proxy":
        return serve + ["--ingress", "proxy"], {}
    return serve + ["--ingress", "proxy"], STOCK  # serve-stock


def model_modes(args: argparse.Namespace, env: dict[str, str]) -> dict[str, list[dict]]:
    """All servers up at once, measured in turns (bare, fastapi, serve-direct, ...) RUNS times over:
    load from other work on the machine then weighs on every mode alike."""
    modes = [m for m in MODEL_MODES[1:] if m in args.modes]
    servers: dict[str, tuple[subprocess.Popen, str, Any]] = {}
    try:
        for i, mode in enumerate(modes):
            # A port of its own per server (a port just closed lingers in TIME_WAIT, and Serve's
            # direct ingress binds without SO_REUSEADDR); each Serve mode in a Ray of its own.
            port = args.port + 10 * i
            command, extra = server_command(mode, port)
            log = open(Path(args.workdir) / "logs" / f"{mode}.log", "w")
            proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, **env, **extra}, stdout=log,
                                    stderr=subprocess.STDOUT)
            servers[mode] = (proc, f"http://127.0.0.1:{port}", log)
            wait_up(f"http://127.0.0.1:{port}/healthz", proc)
        results: dict[str, list[dict]] = {mode: [] for mode in (["bare"] if "bare" in args.modes else []) + modes}
        for run in range(args.runs):
            if "bare" in args.modes:
                results["bare"].append(bare(args.requests))
            for mode in modes:
                url = f"{servers[mode][1]}/v1/completions"
                figures = sequential(url, BODY, args.requests)
                figures.update(concurrent(url, BODY, args.concurrent_requests, args.concurrency))
                results[mode].append(figures)
            print(f"run {run + 1}: " + json.dumps({m: r[-1] for m, r in results.items()}), flush=True)
    finally:
        for proc, _, log in servers.values():
            stop(proc)
            log.close()
    return results


# -- the echo modes ------------------------------------------------------------------------------
def echo_server(variant: str, port: int, n: int) -> None:
    """One echo variant in a fresh process (and Ray); prints its figures as JSON on the last line."""
    from fastapi import FastAPI

    app = FastAPI()

    if variant == "fastapi":
        import threading

        import uvicorn

        @app.post("/echo")
        async def plain_echo(body: dict) -> dict:
            return body

        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        wait_up_plain(f"http://127.0.0.1:{port}/echo")
        print(json.dumps(sequential(f"http://127.0.0.1:{port}/echo", {"x": 1}, n)))
        server.should_exit = True
        return

    import ray
    from ray import serve

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")

    @serve.deployment(logging_config={"enable_access_log": False, "log_level": "WARNING"})
    @serve.ingress(app)
    class Echo:
        @app.post("/echo")
        async def echo(self, body: dict) -> dict:
            return body

        async def ping(self, body: dict) -> dict:
            return body

    serve.start(http_options={"host": "127.0.0.1", "port": port + 1 if "direct" in variant else port})
    serve.run(Echo.bind(), route_prefix="/")
    if variant.startswith("handle"):
        handle = serve.get_app_handle("default")
        for _ in range(50):
            handle.ping.remote({"x": 1}).result()
        lat = []
        for _ in range(n):
            t = time.perf_counter()
            handle.ping.remote({"x": 1}).result()
            lat.append(time.perf_counter() - t)
        figures = {"p50_ms": percentile(lat, 0.5) * 1e3, "p99_ms": percentile(lat, 0.99) * 1e3}
    else:
        wait_up_plain(f"http://127.0.0.1:{port}/echo")
        figures = sequential(f"http://127.0.0.1:{port}/echo", {"x": 1}, n)
    print(json.dumps(figures))
    serve.shutdown()
    ray.shutdown()


def wait_up_plain(url: str) -> None:
    for _ in range(600):
        try:
            httpx.post(url, json={}, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def echo_modes(args: argparse.Namespace) -> dict[str, list[dict]]:
    results: dict[str, list[dict]] = {}
    for variant, extra in ECHO_VARIANTS.items():
        env = {**os.environ, **STOCK, **extra, "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(args.port),
               "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(args.port + 1),
               "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0.5", "RAY_USAGE_STATS_ENABLED": "0"}
        results[variant] = []
        for _ in range(args.runs):
            out = subprocess.run([PYTHON, __file__, "--echo-server", variant, str(args.port), str(args.requests)],
                                 cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            if out.returncode != 0:
                raise RuntimeError(f"echo {variant}: {out.stderr[-2000:]}")
            figures = [line for line in out.stdout.splitlines() if line.startswith('{"p50_ms"')]
            results[variant].append(json.loads(figures[-1]))
        print(f"echo {variant}: {results[variant]}", flush=True)
    return results


# -- report --------------------------------------------------------------------------------------
def median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return statistics.median(values) if values else None


def report(model: dict[str, list[dict]], echo: dict[str, list[dict]], args: argparse.Namespace) -> str:
    lines = [f"Model: POST /v1/completions, max_tokens {BODY['max_tokens']}, greedy; {args.requests} sequential "
             f"requests (latency), {args.concurrent_requests} at {args.concurrency} concurrent (throughput); "
             f"medians of {args.runs} runs.", "",
             "| mode | p50 ms | p99 ms | p50 over fastapi ms | req/s sequential | req/s concurrent | errors |",
             "|---|---|---|---|---|---|---|"]
    base = median(model["fastapi"], "p50_ms") if model.get("fastapi") else None
    for mode, runs in model.items():
        p50, p99 = median(runs, "p50_ms"), median(runs, "p99_ms")
        over = f"{p50 - base:+.2f}" if base is not None and mode != "bare" else ""
        rps = median(runs, "rps")
        errors = sum(r.get("errors", 0) for r in runs)
        lines.append(f"| {mode} | {p50:.2f} | {p99:.2f} | {over} | {median(runs, 'rps_seq'):.0f} | "
                     f"{'' if rps is None else f'{rps:.0f}'} | {errors if rps is not None else ''} |")
    if echo:
        lines += ["", "Echo (JSON echo handler, sequential keep-alive requests):", "",
                  "| path | p50 ms | p99 ms | p50 over fastapi ms |", "|---|---|---|---|"]
        base = median(echo["fastapi"], "p50_ms")
        for variant, runs in echo.items():
            p50 = median(runs, "p50_ms")
            lines.append(f"| {variant} | {p50:.2f} | {median(runs, 'p99_ms'):.2f} | {p50 - base:+.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--concurrent-requests", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--port", type=int, default=8700)
    parser.add_argument("--workdir", default=str(REPO / ".bench" / "serve"))
    parser.add_argument("--skip-echo", action="store_true")
    parser.add_argument("--modes", default=",".join(MODEL_MODES), help="model modes to run, comma-separated")
    parser.add_argument("--plain-fastapi-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--echo-server", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_fastapi_server:
        return plain_fastapi_server(args.plain_fastapi_server)
    if args.echo_server:
        variant, port, n = args.echo_server
        return echo_server(variant, int(port), int(n))

    BODY["max_tokens"] = args.max_tokens
    args.modes = args.modes.split(",")
    workdir = Path(args.workdir).absolute()
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    env = register_tiny_model(workdir)
    model = model_modes(args, env)
    echo = {} if args.skip_echo else echo_modes(args)
    table = report(model, echo, args) + f"\n\nLoad average after the runs: {os.getloadavg()}"
    print("\n" + table)
    (workdir / "results.json").write_text(json.dumps({"args": vars(args), "model": model, "echo": echo,
                                                      "table": table}, indent=2))


if __name__ == "__main__":
    main()
