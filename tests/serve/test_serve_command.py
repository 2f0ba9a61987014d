"""`pipelines serve` as a user runs it: a process that a SIGTERM (kill, a container stopping) stops cleanly, while
it starts and while it serves, leaving no process of its local Ray behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from pipelines.runtime import free_port
from tests.serve.conftest import register

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("when", ["starting", "serving"])
def test_sigterm_stops_the_server_cleanly(when: str, tracking: MlflowClient, hf_folders: dict[int, Path]) -> None:
    if not tracking.search_registered_models(filter_string="name = 'lm'"):
        register(hf_folders[0], "lm", 10.0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "serve", "--model", "models:/lm@champion", "--port",
         str(free_port()), "--engine", "transformers", "--watch-interval-s", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    # Ray is up once Serve says it started; the replica still loads the model then
    mark = "Started Serve" if when == "starting" else "serving models:/lm@champion at"
    output = []
    while not any(mark in line for line in output[-1:]):
        line = proc.stdout.readline()
        assert line, "".join(output)
        output.append(line)
    family = psutil.Process(proc.pid).children(recursive=True)
    assert family, "no process of the local Ray"
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    output.append(rest)
    text = "".join(output)
    assert "SIGTERM received" not in text, text[-3000:]  # Ray's native abort, with its stack dump
    # 0 once serving (the app deleted), 130 before (typer's code for an interrupt), as after Ctrl-C
    assert proc.returncode in ((0, 130) if when == "serving" else (130,)), text[-3000:]
    deadline = time.monotonic() + 30
    while (left := [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]):
        assert time.monotonic() < deadline, left
        time.sleep(0.2)
