"""Images API serving: `pipelines serve` of a diffusion model vs the same diffusers pipeline called in process.

    .venv/bin/python benchmarks/serve_images.py [--preset tiny] [--steps 20] [--runs 3] [--requests 10]
                                                [--concurrent-requests 32] [--port 8780] [--workdir .bench/images]

What it does:
  1. Builds the untrained text-to-image model of the tests (tests/serve/tiny.py `tiny_diffusion`: 32x32 images,
     16x16x4 latents, a one-layer CLIP text tower; the UNet preset `--preset`, tiny by default, or small) and
     registers it as models:/sd@champion in a fresh MLflow (SQLite) under WORKDIR.
  2. Starts `pipelines serve --model models:/sd@champion` as shipped (one replica, Serve's direct ingress, batching
     defaults: up to 8 requests per batch, no wait) in a subprocess, and loads the same registered pipeline here.
     Torch runs one thread on both sides (the replica reserves one CPU).
  3. RUNS rounds, the order of the two sides alternating from round to round, each round measuring:
     - serve, 1 client:   REQUESTS requests one after another on a keep-alive connection: POST
                          /v1/images/generations {"model": "sd", "prompt": ..., "n": 1, "num_inference_steps":
                          STEPS, "guidance_scale": 4, "seed": i}; p50 latency and images/s;
     - serve, 8 clients:  CONCURRENT_REQUESTS such requests from 8 concurrent clients: images/s and p50 latency;
     - in process, 1:     the pipeline called once per image (`pipe(prompt, num_inference_steps=STEPS,
                          guidance_scale=4, generator=seed)`, the image encoded as PNG, as the server does);
     - in process, "8":   CONCURRENT_REQUESTS images in that loop, one at a time, as a naive server answering
                          8 clients would: images/s;
     - in process, batched: the same images as calls of 8 prompts each: what batching at most can give.
     The load average is recorded around every round: the machine may be shared with other work.
  Prints a markdown table (medians over rounds) and writes every figure to WORKDIR/results.json, the server's log
  to WORKDIR/logs/serve.log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_latency import PYTHON, REPO, percentile, stop, wait_up  # noqa: E402

PROMPT = "a red circle on a blue square"
CLIENTS = 8


def register_model(workdir: Path, preset: str) -> dict[str, str]:
    """Build the test's text-to-image model with `preset` and register it as models:/sd@champion in a fresh
    MLflow under workdir; return the environment of both sides."""
    sys.path.insert(0, str(REPO))
    shutil.rmtree(workdir / "home", ignore_errors=True)
    shutil.rmtree(workdir / "model", ignore_errors=True)
    (workdir / "mlflow.db").unlink(missing_ok=True)
    env = {"PIPELINES_HOME": str(workdir / "home"), "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1",
           "RAY_USAGE_STATS_ENABLED": "0"}
    os.environ.update(env)
    from pipelines.train.registry import register_folder, training_run
    from tests.serve.tiny import tiny_diffusion

    folder = tiny_diffusion(workdir / "model", seed=0, preset=preset)
    with training_run("serve-images-bench", None, {}) as run_id:
        pass
    register_folder("diffusion", str(folder), "sd", run_id=run_id, metric="heldout_fd_clip", value=1.0,
                    lower_is_better=True)
    return env


def body(steps: int, seed: int) -> dict[str, Any]:
    return {"model": "sd", "prompt": PROMPT, "n": 1, "num_inference_steps": steps, "guidance_scale": 4.0,
            "seed": seed}


# -- through the endpoint ------------------------------------------------------------------------
def serve_sequential(url: str, steps: int, n: int) -> dict[str, float]:
    """p50 latency (ms) and images/s of n requests one after another on one keep-alive connection."""
    with httpx.Client(timeout=600) as http:
        http.post(url, json=body(steps, 0)).raise_for_status()  # warm-up
        lat = []
        for i in range(n):
            t = time.perf_counter()
            r = http.post(url, json=body(steps, i))
            lat.append(time.perf_counter() - t)
            r.raise_for_status()
    return {"p50_ms": percentile(lat, 0.5) * 1e3, "images_s": n / sum(lat)}


def serve_concurrent(url: str, steps: int, n: int, clients: int) -> dict[str, float]:
    """images/s and p50 latency (ms) of n requests from `clients` concurrent clients (any non-200 fails the run)."""

    async def run() -> tuple[float, list[float]]:
        left = list(range(n))
        lat: list[float] = []

        async def client(http: httpx.AsyncClient) -> None:
            while left:
                seed = left.pop()
                t = time.perf_counter()
                r = await http.post(url, json=body(steps, seed))
                lat.append(time.perf_counter() - t)
                r.raise_for_status()

        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
            started = time.perf_counter()
            await asyncio.gather(*(client(http) for _ in range(clients)))
            return time.perf_counter() - started, lat

    elapsed, lat = asyncio.run(run())
    return {"images_s": n / elapsed, "p50_ms": percentile(lat, 0.5) * 1e3}


# -- in process ----------------------------------------------------------------------------------
def load_pipeline() -> Any:
    import torch

    from pipelines.train.diffusion import load_diffusion

    torch.set_num_threads(1)
    pipe = load_diffusion("models:/sd@champion")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe: Any, steps: int, seeds: list[int]) -> None:
    """One pipeline call for the prompts of `seeds` (one image each), encoded as PNG like the server's."""
    import torch

    from pipelines.serve.images import png

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.inference_mode():
        images = pipe([PROMPT] * len(seeds), num_inference_steps=steps, guidance_scale=4.0, generator=generators).images
    for image in images:
        png(image)


def in_process(pipe: Any, steps: int, n: int, concurrent_n: int) -> dict[str, float]:
    draw(pipe, steps, [0])  # warm-up
    lat = []
    for i in range(n):
        t = time.perf_counter()
        draw(pipe, steps, [i])
        lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(concurrent_n):
        draw(pipe, steps, [i])
    loop = time.perf_counter() - t
    t = time.perf_counter()
    for start in range(0, concurrent_n, CLIENTS):
        draw(pipe, steps, list(range(start, min(start + CLIENTS, concurrent_n))))
    batched = time.perf_counter() - t
    return {"p50_ms": percentile(lat, 0.5) * 1e3, "images_s": n / sum(lat), "loop_images_s": concurrent_n / loop,
            "batched_images_s": concurrent_n / batched}


# -- report --------------------------------------------------------------------------------------
def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def report(results: dict[str, list[dict]], args: argparse.Namespace) -> str:
    serve, local = results["serve"], results["in_process"]
    s1, l1 = median(serve, "p50_ms"), median(local, "p50_ms")
    s8, l8 = median(serve, "images_s_8"), median(local, "loop_images_s")
    loads = [r["load_before"][0] for r in serve + local] + [r["load_after"][0] for r in serve + local]
    lines = [f"UNet preset {args.preset}, 32x32 images, {args.steps} steps, guidance 4, n=1 per request; "
             f"1 client: {args.requests} sequential requests, 8 clients: {args.concurrent_requests} requests; "
             f"medians of {args.runs} rounds (sides alternating); torch 1 thread on both sides.", "",
             "| side | 1 client p50 ms | 1 client images/s | 8 clients p50 ms | 8 clients images/s |",
             "|---|---|---|---|---|",
             f"| pipelines serve | {s1:.0f} | {median(serve, 'images_s'):.2f} | {median(serve, 'p50_ms_8'):.0f} | "
             f"{s8:.2f} |",
             f"| in process, one image per call | {l1:.0f} | {median(local, 'images_s'):.2f} | | {l8:.2f} |",
             f"| in process, 8 prompts per call (reference) | | | | {median(local, 'batched_images_s'):.2f} |", "",
             f"Overhead at 1 client: {s1 - l1:+.0f} ms p50 ({(s1 / l1 - 1) * 100:+.1f}%; goal at most +5%: "
             f"{'met' if s1 <= 1.05 * l1 else 'MISSED'}).",
             f"8 clients: serve {s8:.2f} images/s vs {l8:.2f} in process one at a time ({s8 / l8:.2f}x; goal more: "
             f"{'met' if s8 > l8 else 'MISSED'}).",
             f"1-minute load average during the rounds: {min(loads):.1f} to {max(loads):.1f} "
             f"({os.cpu_count()} CPUs)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--concurrent-requests", type=int, default=32)
    parser.add_argument("--port", type=int, default=8780)
    parser.add_argument("--workdir", default=str(REPO / ".bench" / "images"))
    args = parser.parse_args()

    workdir = Path(args.workdir).absolute()
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    env = register_model(workdir, args.preset)
    command = [PYTHON, "-m", "pipelines.cli", "serve", "--model", "models:/sd@champion", "--port", str(args.port),
               "--watch-interval-s", "0"]
    url = f"http://127.0.0.1:{args.port}"
    results: dict[str, list[dict]] = {"serve": [], "in_process": []}
    with open(workdir / "logs" / "serve.log", "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_up(f"{url}/healthz", proc)
            pipe = load_pipeline()
            for run in range(args.runs):
                sides = ["in_process", "serve"] if run % 2 == 0 else ["serve", "in_process"]
                for side in sides:
                    before = os.getloadavg()
                    if side == "serve":
                        figures = serve_sequential(f"{url}/v1/images/generations", args.steps, args.requests)
                        eight = serve_concurrent(f"{url}/v1/images/generations", args.steps,
                                                 args.concurrent_requests, CLIENTS)
                        figures |= {"images_s_8": eight["images_s"], "p50_ms_8": eight["p50_ms"]}
                    else:
                        figures = in_process(pipe, args.steps, args.requests, args.concurrent_requests)
                    results[side].append(figures | {"load_before": before, "load_after": os.getloadavg()})
                print(f"round {run + 1}: " + json.dumps({side: r[-1] for side, r in results.items()}), flush=True)
        finally:
            stop(proc)
    table = report(results, args)
    print("\n" + table)
    (workdir / "results.json").write_text(json.dumps({"args": vars(args), "results": results, "table": table},
                                                     indent=2))


if __name__ == "__main__":
    main()
