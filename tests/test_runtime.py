"""Ray's own chatter stays out of what a person reads. The local autoscaler's status block (every 5 s) is not logged,
and where a monitor does log it (a cluster set up so) it is not forwarded to the console or the Prefect logs
(`worker_logs_to`); the workers' lines and the autoscaler's events (a request no node can fulfil) still are."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.runtime import _AGENT_STAND_IN, free_port

ROOT = Path(__file__).resolve().parents[1]
STATUS = "Autoscaler status"
RUN = """
import json, sys, time
from pathlib import Path

import ray

from pipelines.runtime import init_ray, worker_logs_to

init_ray(num_cpus=1)


@ray.remote
def hello():
    print("hello from a worker")
    # what transformers says when an image processor falls back to PIL (we have no torchvision, on purpose)
    print("[transformers] `CLIPImageProcessor` requires torchvision (not installed); falling back to "
          "`CLIPImageProcessorPil` for backward compatibility. Install torchvision to use the default backend.")


@ray.remote(num_cpus=64)
def too_big():
    pass


lines = []
with worker_logs_to(lines.append):
    ray.get(hello.remote())
    too_big.remote()
    deadline = time.time() + 90
    while time.time() < deadline and not any("fulfill" in line for line in lines):
        time.sleep(0.5)
    time.sleep(6)  # another round of the autoscaler, which would log its status every 5 s
monitor_log = Path(ray._private.worker._global_node.get_logs_dir_path(), "monitor.log").read_text()
ray.shutdown()
Path(sys.argv[1]).write_text(json.dumps({"sink": lines, "monitor_log": monitor_log}))
"""


@pytest.mark.parametrize("status_log", [None, "1"], ids=["local-default", "monitor-logs-status"])
def test_ray_status_stays_out_of_the_console_and_the_task_logs(status_log: str | None, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_CLUSTER_STATUS_LOG")}
    if status_log:
        env["RAY_ENABLE_CLUSTER_STATUS_LOG"] = status_log
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-c", RUN, str(report)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)

    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(report.read_text())
    sink = "\n".join(seen["sink"])
    assert "hello from a worker" in sink  # the workers' lines pass
    assert "torchvision" not in sink + proc.stdout + proc.stderr  # advice that would break the install does not
    assert "No available node types can fulfill resource request" in sink, sink  # and what a user can act on
    assert STATUS not in sink and STATUS not in proc.stdout + proc.stderr
    # By default the local monitor does not log it at all; when it does, the forwarding is what holds it back.
    assert (STATUS in seen["monitor_log"]) == bool(status_log)


LEAN = """
import json, os, sys

import psutil
import ray
from ray._private.node import Node

from pipelines.runtime import LEAN_SKIPPED, TASK_EVENTS, init_ray

before = {name: getattr(Node, name) for name in LEAN_SKIPPED}
init_ray(num_cpus=1, lean=True)
node = ray._private.worker._global_node


@ray.remote
def square(x):
    return x * x


@ray.remote
def task_events():
    return os.environ.get(TASK_EVENTS)


@ray.remote
def env_var():
    return os.environ.get("LEAN_TEST")


raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
children = {" ".join(p.cmdline()): p for p in raylet.children()}  # its agents and workers
report = {"processes": sorted(node.all_processes), "squares": ray.get([square.remote(i) for i in range(4)]),
          "restored": all(getattr(Node, name) is method for name, method in before.items()),
          "task_events_in_worker": ray.get(task_events.remote()), "task_events_after": os.environ.get(TASK_EVENTS),
          "runtime_env": ray.get(env_var.options(runtime_env={"env_vars": {"LEAN_TEST": "set"}}).remote()),
          "children": sorted(children), "metrics_agent_port": node.metrics_agent_port}
ray.shutdown()
psutil.wait_procs(list(children.values()), timeout=10)
report["children_left"] = [cmd for cmd, p in children.items() if p.is_running()]
print(json.dumps(report))
"""


def test_a_lean_local_ray_starts_without_the_monitor_and_the_api_server_and_runs_tasks() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_task_events_report_interval_ms"] = "1000"  # the user's own setting, for what comes after
    proc = subprocess.run([sys.executable, "-c", LEAN], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)

    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # This Ray version still has the start methods the lean start replaces: were one renamed, Ray would start
    # them again unnoticed, and this would fail.
    assert "raylet" in report["processes"] and "gcs_server" in report["processes"], report
    assert "monitor" not in report["processes"] and "dashboard" not in report["processes"], report
    assert report["squares"] == [0, 1, 4, 9]
    assert report["restored"]  # a later `ray.init` in the process (another command's) starts a whole head
    assert report["task_events_in_worker"] == "0"  # the lean Ray's processes keep no task events...
    assert report["task_events_after"] == "1000"  # ...and the user's setting is back for anything started later
    # The raylet's agents: a stand-in for the dashboard agent, whose ports (and the runtime-env agent's) were given
    # to the raylet so that it did not wait for them; no metrics agent; the runtime-env agent is Ray's own and
    # still sets up a task's runtime_env. All are gone with the raylet.
    children = report["children"]
    assert not any("dashboard/agent.py" in cmd or "DashboardAgent" in cmd for cmd in children), children
    assert sum(_AGENT_STAND_IN.splitlines()[-1].strip() in cmd for cmd in children) == 1, children
    assert report["metrics_agent_port"] == -1
    assert report["runtime_env"] == "set"
    assert report["children_left"] == []


def test_a_free_port_is_taken_below_the_kernels_ephemeral_range() -> None:
    """Ray's processes open dozens of sockets on ports from that range as they start: a server given one of those
    could find it taken before it binds it."""
    import socket

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_port() for _ in range(20)}
    assert all(10000 <= port < low for port in ports), ports
    assert len(ports) > 1  # not one fixed port
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))  # free now


TRAIN = """
import json, os, sys, time

from pipelines.train.config import EngineConfig
from pipelines.train.pretrain import fit, init_train_ray


def loop(args):
    import time

    import psutil

    time.sleep(3)  # the preemption watcher, where there is one, starts beside the loop
    driver = psutil.Process().parent().parent()  # the raylet's parent, which started every process of this Ray
    titles = []
    for p in driver.children(recursive=True):
        try:
            titles.append(" ".join(p.cmdline()))
        except psutil.Error:  # gone since
            pass
    with open(args["out"], "w") as f:
        json.dump(titles, f)


init_train_ray()
fit(loop, {"out": sys.argv[1]}, EngineConfig(workers=1, max_failures=0), "lean", sys.argv[2], False, 1)
print(time.time() - os.path.getmtime(sys.argv[1]))
"""


def test_a_local_training_run_has_no_ray_process_it_does_not_use(tmp_path: Path) -> None:
    """Every idle Ray process takes CPU from the training threads on the same cores; a local run has no
    autoscaler's monitor, dashboard agent, or Ray Train preemption watcher (no node of a local Ray is drained).
    The processes are listed from inside the training loop, among the descendants of the process that started
    this Ray."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_TRAIN_")}
    out = tmp_path / "processes.json"
    proc = subprocess.run([sys.executable, "-c", TRAIN, str(out), str(tmp_path / "runs")], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)

    assert proc.returncode == 0, proc.stderr[-3000:]
    titles = json.loads(out.read_text())
    assert any("ray::RayTrainWorker" in t for t in titles), titles  # what the training saw, from inside it
    assert any("raylet" in t for t in titles) and any("gcs_server" in t for t in titles), titles
    for absent in ("ray::PreemptionWatcher", "autoscaler/_private/monitor.py", "dashboard/agent.py",
                   "ray::DashboardAgent"):
        assert not any(absent in t for t in titles), (absent, titles)
    # What stays is enough for Ray Train: without the API server its placement-group cleaner hung on Ray's search
    # for the server's address, and the end of the run waited 10 s to stop it, printing a traceback.
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert float(proc.stdout.strip().splitlines()[-1]) < 8, proc.stdout  # seconds from the loop's end to fit's


@pytest.mark.parametrize("value", ["abc", "", "5 ", "\u0663", "1.5", "0x10"])
@pytest.mark.parametrize("name", ["RAY_worker_niceness", "RAY_task_events_report_interval_ms"])
def test_a_ray_number_ray_cannot_read_is_a_clear_error_not_a_crash(name: str, value: str) -> None:
    """Ray's C++ side crashes the process that starts it (SIGSEGV, no message) on such a value."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env[name] = value
    proc = subprocess.run([sys.executable, "-c", "from pipelines.runtime import init_ray; init_ray(num_cpus=1)"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)

    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert f"PipelineError: environment variable {name}={value!r}: Ray reads it as a whole number" in proc.stderr


def test_the_numbers_ray_reads_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.runtime import RAY_NUMBERS, check_ray_numbers

    for value in ("0", " 5", "-3", "+15", "99999999999999999999"):  # each started a local Ray (tried)
        for name in RAY_NUMBERS:
            monkeypatch.setenv(name, value)
        check_ray_numbers()


@pytest.mark.parametrize("argv", [["crawl", "images", "--input", "urls.tsv", "--output", "out"],
                                  ["pretrain", "--shards", "shards"], ["serve", "--model", "models:/m@champion"]])
def test_a_command_refuses_a_ray_number_ray_cannot_read_in_one_line(argv: list[str], tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_worker_niceness"] = "５"  # a fullwidth digit
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)

    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "error: environment variable RAY_worker_niceness='５': Ray reads it as a whole number" in proc.stderr
    assert "Traceback" not in proc.stderr
