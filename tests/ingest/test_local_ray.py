"""A crawl run as a command starts its own local Ray: shard tasks at niceness 0 (Ray's default of 15 starves them
beside any other busy process), the counter actor only when progress shows, every Ray process gone when the
command exits (stopped without Ray's own exit waits), and a rerun resumes and counts the same."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

PIPELINES = str(Path(sys.executable).with_name("pipelines"))


def run_watching(cmd: list[str]) -> tuple[subprocess.CompletedProcess, dict[int, set[tuple[str, int]]]]:
    """Run `cmd`; every process under it seen while it ran, as pid -> the (title, niceness) it had."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[int, set[tuple[str, int]]] = {}
    while proc.poll() is None:
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for child in children:
            try:
                seen.setdefault(child.pid, set()).add((" ".join(child.cmdline()), child.nice()))
            except psutil.Error:  # gone meanwhile
                continue
        time.sleep(0.05)
    out, err = proc.communicate(timeout=180)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), seen


def alive(pids: list[int]) -> list[int]:
    living = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                living.append(pid)
        except psutil.NoSuchProcess:
            continue
    return living


def test_command_crawl_owns_a_local_ray_stops_it_at_exit_and_resumes(tmp_path, make_web):
    web = make_web(image_delay=0.05)  # shards last long enough to be seen at work
    source = tmp_path / "urls.jsonl"
    source.write_text("".join(json.dumps({"url": web.url(f"/img/{i % 5}.jpg?i={i}"), "caption": f"c{i}"}) + "\n"
                              for i in range(24)))
    out = tmp_path / "out"
    cmd = [PIPELINES, "crawl", "images", "--input", str(source), "--output", str(out), "--shard-size", "8",
           "--image-size", "64", "--allow-private-network", "--concurrency", "2", "--quiet"]

    proc, seen = run_watching(cmd)
    assert proc.returncode == 0, proc.stderr
    states = set().union(*seen.values())
    assert {nice for title, nice in states if title.startswith("ray::crawl_image_shard")} == {0}, states
    assert not [title for title, _ in states if "ProgressCounter" in title]  # quiet: no progress, no counter
    deadline = time.monotonic() + 10
    while alive(list(seen)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(list(seen)), [seen[p] for p in alive(list(seen))]
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    assert (stats["total"], stats["success"], stats["shards_written"], stats["shards_skipped"]) == (24, 24, 3, 0)

    rerun, _ = run_watching(cmd)
    assert rerun.returncode == 0, rerun.stderr
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    assert (stats["total"], stats["success"], stats["shards_written"], stats["shards_skipped"]) == (24, 24, 0, 3)
    assert web.hits_under("/img/") == 24  # the rerun fetched nothing
