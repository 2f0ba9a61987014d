"""Load on `pipelines serve`: N requests from C concurrent clients, a mix of good and hostile ones; no 5xx.

    .venv/bin/python benchmarks/serve_load.py [--requests 2000] [--concurrency 100] [--port 8750]
                                              [--workdir .bench/serve-load] [--hostile-every 10]

Registers the tiny model of the tests as models:/lm@champion in a fresh MLflow under WORKDIR, starts
`pipelines serve` (one replica, direct ingress, a key from PIPELINES_API_KEYS) and sends REQUESTS requests from
CONCURRENCY clients on their own connections: completions (sampled), chat (greedy) and embeddings in turn,
and every HOSTILE_EVERY-th request one of the hostile ones of issue 16 (temperature 1e-300, top_p 5e-324, a
seed past int64, a lone surrogate, NaN, a stop string of 1,000,000 characters, no key). Prints the statuses,
the 5xx count (target 0) and p50/p99 of the good requests' latency, and writes them to WORKDIR/results.json.
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
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_latency import PYTHON, REPO, register_tiny_model, stop, wait_up  # noqa: E402

KEY = "sk-bench"
GOOD = [("/v1/completions", {"model": "lm", "prompt": "hello world", "max_tokens": 4, "temperature": 0.7}),
        ("/v1/chat/completions", {"model": "lm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                  "temperature": 0}),
        ("/v1/embeddings", {"model": "lm", "input": ["a model reads", "the shards"]})]
HOSTILE = [('{"model": "lm", "prompt": "hi", "temperature": 1e-300}', True),
           ('{"model": "lm", "prompt": "hi", "top_p": 5e-324}', True),
           (f'{{"model": "lm", "prompt": "hi", "seed": {2**64}}}', True),
           ('{"model": "lm", "prompt": "hi \\ud800"}', True),
           ('{"model": "lm", "prompt": "hi", "temperature": NaN}', True),
           (json.dumps({"model": "lm", "prompt": "hi", "stop": "ab" * 500_000}), True),
           ('{"model": "lm", "prompt": ', False)]  # malformed, without a key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--port", type=int, default=8750)
    parser.add_argument("--workdir", type=Path, default=REPO / ".bench" / "serve-load")
    parser.add_argument("--hostile-every", type=int, default=10, help="0: good requests only")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **register_tiny_model(args.workdir), "PIPELINES_API_KEYS": KEY}
    log = open(args.workdir / "server.log", "w")
    server = subprocess.Popen([PYTHON, "-m", "pipelines.cli", "serve", "--model", "models:/lm@champion", "--port",
                               str(args.port), "--watch-interval-s", "0"], env=env, cwd=REPO, stdout=log,
                              stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{args.port}"
    try:
        wait_up(f"{url}/healthz", server)
        results = asyncio.run(load(url, args.requests, args.concurrency, args.hostile_every))
    finally:
        stop(server)
    results |= {"requests": args.requests, "concurrency": args.concurrency, "load_average": os.getloadavg()}
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


async def load(url: str, n: int, concurrency: int, hostile_every: int) -> dict:
    statuses: Counter = Counter()
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=300) as http:  # a connection per client
            while not queue.empty():
                i = queue.get_nowait()
                if hostile_every and i % hostile_every == hostile_every - 1:
                    body, keyed = HOSTILE[(i // hostile_every) % len(HOSTILE)]
                    headers = {"content-type": "application/json", **({"Authorization": f"Bearer {KEY}"}
                                                                       if keyed else {})}
                    r = await http.post("/v1/completions", content=body, headers=headers)
                    statuses[r.status_code] += 1
                    continue
                path, body = GOOD[i % len(GOOD)]
                started = time.monotonic()
                r = await http.post(path, json=body, headers={"Authorization": f"Bearer {KEY}"})
                latencies.append(time.monotonic() - started)
                statuses[r.status_code] += 1

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    cuts = statistics.quantiles(latencies, n=100)
    return {"statuses": dict(sorted(statuses.items())),
            "server_errors": sum(v for k, v in statuses.items() if k >= 500),
            "p50_ms": round(cuts[49] * 1000, 1), "p99_ms": round(cuts[98] * 1000, 1),
            "requests_per_s": round(n / elapsed, 1), "seconds": round(elapsed, 1)}


if __name__ == "__main__":
    main()
