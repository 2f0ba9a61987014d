"""Where Ray, Prefect, MLflow and storage live.

Embedded defaults with no settings (an in-process local Ray, Prefect's ephemeral API, MLflow on a
SQLite file, shards on local disk); a cluster, a Prefect server, a remote MLflow or `s3://` storage
by configuration alone, through each tool's own standard variable:

- `RAY_ADDRESS`          a Ray cluster (`ray://host:10001` or `host:6379`, or `auto`)
- `PREFECT_API_URL`      a Prefect server (unset: Prefect's ephemeral API)
- `MLFLOW_TRACKING_URI`  an MLflow server (unset: `sqlite:///$PIPELINES_HOME/mlflow.db`)
- `PIPELINES_HOME`       local state directory (default `./.pipelines`)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import fsspec

from pipelines.errors import PipelineError


@dataclass(frozen=True)
class Settings:
    """The resolved runtime settings; read from the environment each time they are asked for."""

    home: Path = field(default_factory=lambda: Path(os.environ.get("PIPELINES_HOME", ".pipelines")).absolute())
    ray_address: str | None = field(default_factory=lambda: os.environ.get("RAY_ADDRESS") or None)
    prefect_api_url: str | None = field(default_factory=lambda: os.environ.get("PREFECT_API_URL") or None)
    mlflow_tracking_uri_env: str | None = field(default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI") or None)

    @property
    def mlflow_tracking_uri(self) -> str:
        return self.mlflow_tracking_uri_env or f"sqlite:///{self.home / 'mlflow.db'}"


def settings() -> Settings:
    return Settings()


def prefect_env() -> None:
    """Prefect's embedded defaults, set before Prefect is imported (it reads its settings then): its
    home (the ephemeral API's SQLite database, which `pipelines ui` serves afterwards) and persisted
    task results under $PIPELINES_HOME/prefect, telemetry off. Values already set are kept."""
    home = settings().home / "prefect"
    os.makedirs(os.environ.get("PREFECT_HOME", home), exist_ok=True)  # its database goes there: SQLite won't make it
    for key, value in {
        "PREFECT_HOME": str(home),
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "results"),
        "DO_NOT_TRACK": "1",  # the Prefect client's usage events
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The ephemeral API starts in a subprocess; on a busy 2-core machine that can take 20 s.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


# Modules every stage's output depends on, besides the stage's own package.
SHARED_MODULES = ("config.py", "errors.py", "runtime.py", "shards.py")


@functools.cache
def code_version(*parts: str) -> str:
    """The package version and a digest of the source of `parts` (folders or modules of `pipelines`,
    e.g. "ingest") and of the shared modules: what a cached stage result was made by. An edit elsewhere
    (another stage, the CLI) does not invalidate it."""
    from pipelines import __version__

    root = Path(__file__).parent
    files = [root / m for m in SHARED_MODULES]
    for part in parts:
        files += sorted((root / part).rglob("*.py")) if (root / part).is_dir() else [root / part]
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"


class InjectedFault(RuntimeError):
    """Raised by `failpoint`: a transient failure planted on purpose."""


_failpoint_hits: dict[str, int] = {}
_failpoint_lock = threading.Lock()


def failpoint(name: str) -> None:
    """Fail the first N times `name` is reached when `PIPELINES_FAILPOINTS` says `name=N` (comma-separated;
    `name=N:kill` kills the process with SIGKILL instead of raising).
    How the tests plant a transient failure in a real run, to see it retried.

    Hits are counted in this process, or across processes (Ray workers, restarted workers, retries) in
    the folder `PIPELINES_FAILPOINTS_STATE` when it is set: a planted failure then happens N times in all.
    """
    spec = os.environ.get("PIPELINES_FAILPOINTS")
    if not spec or name not in spec:
        return
    planted = dict(item.split("=", 1) for item in spec.split(",") if "=" in item)
    if name not in planted:
        return
    count, _, mode = planted[name].partition(":")
    limit = int(count)
    state = os.environ.get("PIPELINES_FAILPOINTS_STATE")
    if state:
        os.makedirs(state, exist_ok=True)
        for hits in range(1, limit + 1):
            try:  # O_EXCL: exactly one process takes each hit
                os.close(os.open(os.path.join(state, f"{name}.{hits}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                break
            except FileExistsError:
                continue
        else:
            return
    else:
        with _failpoint_lock:
            hits = _failpoint_hits[name] = _failpoint_hits.get(name, 0) + 1
        if hits > limit:
            return
    if mode == "kill":  # `name=N:kill`: the process dies as under the OOM killer, with no exception to catch
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"failpoint {name}: planted failure {hits} of {limit}")


def init_ray(num_cpus: int | None = None, *, lean: bool = False, api_server: bool = False) -> None:
    """Connect to Ray once per process: the cluster at `RAY_ADDRESS`, else a local Ray started in process.

    `lean`: a local Ray starts without the autoscaler's monitor and the dashboard's API server
    (`_lean_local_head`), and without task events (the record of each task's states that Ray's state API and
    dashboard show, which a lean Ray has not; sending the last of them held the driver's exit 0.25 s), for a
    command whose every request fits one node (a crawl's tasks need one CPU). The monitor is what reports a
    request no node can fulfil, so other commands keep it, or refuse such a request themselves.
    `api_server`: a lean Ray keeps the API server. Ray Train needs it there: its placement-group cleaner asks
    the state API whether the controller lives; started without the dashboard the server answers that it has
    no state API, at once, but with no server at all Ray looks for its address for seconds, and the end of a
    run waited 10 s for the cleaner to stop."""
    check_ray_numbers()  # before Ray is imported: the import is what crashes
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # DeepSpeed compiles its CPU ops on first use into a cache named by op, not by version: one per
    # environment, so two venvs on a machine never load each other's build.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    address = settings().ray_address
    kwargs: dict = dict(logging_level=logging.WARNING, log_to_driver=True, configure_logging=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Ray enables token auth on a local cluster by default and warns about it at every start.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # The local autoscaler's monitor writes the whole cluster status to its log every 5 s, which Ray
        # streams to the driver (`ray status` shows the same on demand); its events still come through.
        os.environ.setdefault("RAY_ENABLE_CLUSTER_STATUS_LOG", "0")
        # The raylet connects to its own object store as both start, and where it loses that race (half the
        # starts on two busy cores) it tries again after Ray's connect interval, 1 s, of ten tries: a local
        # start took 2.7 s instead of 1.7 s. The same 10 s in all, tried every 50 ms.
        os.environ.setdefault("RAY_raylet_client_connect_timeout_milliseconds", "50")
        os.environ.setdefault("RAY_raylet_client_num_connect_attempts", "200")
        # "local": always a fresh in-process Ray, never a cluster someone else started on this machine.
        skip = tuple(name for name in LEAN_SKIPPED if not (api_server and name == "start_api_server"))
        with _lean_local_head(skip) if lean else contextlib.nullcontext():
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
    _filter_worker_logs()


# Ray settings that our commands set defaults for, and an environment may set itself: Ray's C++ side reads them as
# whole numbers (leading blanks and a sign allowed, nothing after) and on anything else crashes the process with
# a segmentation fault, without a word, as soon as it imports Ray (tried: "abc", "", "5 ", Arabic-Indic digits).
# `init_ray` and every CLI command (`config.one_line_errors`) check them first.
RAY_NUMBERS = ("RAY_worker_niceness", "RAY_raylet_client_connect_timeout_milliseconds",
               "RAY_raylet_client_num_connect_attempts", "RAY_task_events_report_interval_ms")


def check_ray_numbers() -> None:
    """A clear error, before Ray starts, for a `RAY_NUMBERS` setting that Ray could not read."""
    for name in RAY_NUMBERS:
        value = os.environ.get(name)
        if value is not None and not re.fullmatch(r"[ \t\n\v\f\r]*[-+]?[0-9]+", value):
            raise PipelineError(f"environment variable {name}={value!r}: Ray reads it as a whole number")


# The head processes a lean local Ray does without (`_lean_local_head`), by the `Node` methods that start them.
LEAN_SKIPPED = ("start_monitor", "start_api_server")
TASK_EVENTS = "RAY_task_events_report_interval_ms"  # 0: no task events


@contextlib.contextmanager
def _lean_local_head(skip: tuple[str, ...] = LEAN_SKIPPED) -> Iterator[None]:
    """Start a local Ray head without the autoscaler's monitor and the dashboard's API server (the `Node` methods
    named in `skip`), and without the dashboard agent (`_lean_agents`).

    A local Ray has a fixed size, so its autoscaler has nothing to scale; with `include_dashboard=False` the API
    server loads only Ray's usage-stats module, which is off here. Yet `ray.init` starts both and waits for the
    API server: two more Python interpreters importing Ray's dashboard stack on the cores the first tasks wait
    for, 0.9 s of a 7.4 s crawl of 3000 URLs on two cores (median of 4, alternating). Ray has no setting for
    either (`ray start --no-monitor` skips only the first), so their start methods are replaced for the duration
    of this `ray.init` alone. Where a Ray version lacks one of them nothing is replaced and Ray starts as usual;
    `tests/test_runtime.py` checks that this Ray version starts lean."""
    try:
        from ray._private.node import Node
    except ImportError:
        yield
        return
    saved = {name: getattr(Node, name, None) for name in skip}
    if not all(callable(method) for method in saved.values()):
        yield
        return
    for name in skip:
        setattr(Node, name, lambda self, *args, **kwargs: None)
    agents = _lean_agents(Node) if callable(getattr(Node, "start_raylet", None)) else contextlib.nullcontext()
    # Read by every process this start spawns (the raylet hands its environment on to the workers it starts).
    events = os.environ.get(TASK_EVENTS)
    os.environ[TASK_EVENTS] = "0"
    try:
        with agents:
            yield
    finally:
        for name, method in saved.items():
            setattr(Node, name, method)
        if events is None:
            os.environ.pop(TASK_EVENTS, None)
        else:
            os.environ[TASK_EVENTS] = events


# What a lean local Ray runs instead of Ray's dashboard agent: a process that lives as long as its raylet (which
# stops it with SIGTERM, or dies and leaves it to init).
_AGENT_STAND_IN = "import os, time\nparent = os.getppid()\nwhile os.getppid() == parent:\n    time.sleep(0.5)"


@contextlib.contextmanager
def _lean_agents(Node: Any) -> Iterator[None]:
    """Start the raylet without waiting for its agents, and without the dashboard agent.

    The raylet starts two agents, Python processes that import much of Ray: the dashboard agent (metrics, and the
    job and log APIs an API server reads) and the runtime-env agent (sets up a task's `runtime_env`). Given no
    ports for them, it waits until each has started its servers on ports of its choosing and written them to
    files: 0.5 s of a lean `ray.init`'s 1.7 s on two cores went to waiting for the dashboard agent. So the ports
    are chosen here (`free_port`), as `ray start --dashboard-agent-listen-port` and the like would take them. Ray
    hands the raylet all but the dashboard agent's listen port; the raylet takes that one by a flag of its own.

    A lean Ray has no use for the dashboard agent (no API server to ask it anything, no one to read its metrics),
    yet its start would take a core for 0.8 s while the first tasks start. So the raylet runs a stand-in instead,
    and is told there is no metrics agent (port -1), so that neither it nor the GCS tries to reach one (each
    prints an error after 30 s of trying). A lean `ray.init` then takes 1.0 s instead of 1.7 s. The runtime-env
    agent is the real one: a task that asks for a `runtime_env` still gets it (a stand-in there hangs it)."""
    from ray._private import services

    start_raylet, start_process = Node.start_raylet, services.start_ray_process
    listen_port: list[int] = []

    def lean_start_raylet(self: Any, *args: Any, **kwargs: Any) -> Any:
        params = self._ray_params
        params.metrics_agent_port = params.metrics_agent_port or -1
        for name in ("metrics_export_port", "dashboard_agent_listen_port", "runtime_env_agent_port"):
            setattr(params, name, getattr(params, name) or free_port())
        listen_port.append(params.dashboard_agent_listen_port)
        return start_raylet(self, *args, **kwargs)

    def lean_start_process(command: list[str], process_type: str, *args: Any, **kwargs: Any) -> Any:
        if process_type == "raylet" and listen_port:
            stand_in = subprocess.list2cmdline([sys.executable, "-S", "-c", _AGENT_STAND_IN])
            command = [f"--dashboard_agent_command={stand_in}" if arg.startswith("--dashboard_agent_command=")
                       else arg for arg in command]
            command.append(f"--dashboard_agent_listen_port={listen_port[-1]}")
        return start_process(command, process_type, *args, **kwargs)

    Node.start_raylet, services.start_ray_process = lean_start_raylet, lean_start_process
    try:
        yield
    finally:
        Node.start_raylet, services.start_ray_process = start_raylet, start_process


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now, for a server started next to bind.

    Taken below the kernel's ephemeral range where there is room: a port from that range (what binding port 0
    gives) can be handed to any process that binds or connects without naming a port, such as the dozens of
    sockets a starting Ray opens, before the server binds it; "address already in use" then fails that start."""
    import random
    import socket

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default (other systems' ranges start higher)
    for _ in range(100 if low > 10000 else 0):
        port = random.randrange(10000, min(low, 65536))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_local_ray() -> None:
    """Stop the local Ray this process started, without the 1.5 s Ray's own exit hook waits: half a second for
    late worker messages (a caller has every result by then) and a second for the autoscaler's monitor, which
    ignores SIGTERM (here it gets SIGKILL at once; it holds no state)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    for info in node.all_processes.get("monitor", []) if node is not None else []:
        info.process.kill()
        try:
            info.process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass  # ray.shutdown tries again
    ray.shutdown()


# Lines Ray's own actors print on every run that tell a user nothing: the placement-group cleaner
# cannot use the state API without a dashboard; Ray Train announces each report; DeepSpeed says it
# runs on the CPU; botocore says where each worker found its S3 settings. Everything else from the
# workers (our progress lines, real errors) still shows.
_NOISE = re.compile(
    r"State API may be temporarily unavailable|Reporting training result|Checkpoint successfully created"
    r"|Setting accelerator to CPU|deepspeed_shm_comm_op built successfully|torch.distributed.\w+. is deprecated"
    r"|return func\(\*args, \*\*kwargs\)|has constructor arguments in the object store"
    r"|Ray deduplicates logs by default|RAY_TRAIN_ENABLE_PRINT_PATCH|is_gradient_checkpointing. is deprecated"
    r"|^\s*warnings.warn\($|The autoscaler took .* seconds to complete the update iteration"
    r"|^Found (credentials in|endpoint for \w+ via)"
    # transformers' advice to install torchvision for an image processor: the index's torchvision is a CUDA build
    # that breaks the CPU torch, and the PIL processor it falls back to is the one we use
    r"|requires torchvision \(not installed\); falling back to")


def _filter_worker_logs() -> None:
    """Drop `_NOISE` lines from what Ray forwards to the driver's console. Ray offers no filter hook,
    so this wraps its forwarding handler; if Ray's internals change, logs simply pass unfiltered."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        from ray._private.worker import filter_autoscaler_events
    except ImportError:
        return
    with dispatcher._lock:
        handlers = []
        for name, handler in dispatcher.handlers:
            if name == "ray_print_logs" and not getattr(handler, "_pipelines_filtered", False):
                handler = _filtered(handler, filter_autoscaler_events)
            handlers.append((name, handler))
        dispatcher.handlers = handlers


_log_sinks: list[Callable[[str], None]] = []


@contextlib.contextmanager
def worker_logs_to(sink: Callable[[str], None]) -> Iterator[None]:
    """Hand every line Ray's workers print (less `_NOISE`) to `sink` instead of the console while
    inside: how a Prefect run gets the logs of the Ray work it started. Nested: the innermost sink
    gets them (a task's, inside its flow's, which catches lines that arrive after the task ended)."""
    _log_sinks.append(sink)
    try:
        yield
    finally:
        _log_sinks.remove(sink)


def _filtered(handler: Any, autoscaler_events: Callable[[list[str]], Iterator[str]]) -> Any:
    def forward(data: dict) -> None:
        if data.get("actor_name") == "PlacementGroupCleaner":  # all it says is that it lacks the state API
            return
        lines = [line for line in data.get("lines", []) if not _NOISE.search(line)]
        sinks = list(_log_sinks)
        if lines and not sinks:
            handler({**data, "lines": lines})  # Ray's printer keeps only the autoscaler's events itself
        elif lines:  # a sink that logs also prints: once is enough
            pid = data.get("pid")
            if pid == "autoscaler":  # its whole log streams here; as Ray's printer does, pass only its events
                lines, who = list(autoscaler_events(lines)), "autoscaler"
            elif pid == "raylet":
                who = "raylet"
            else:
                who = f"{data.get('actor_name') or data.get('task_name') or 'worker'} pid={pid}"
            for line in lines:
                sinks[-1](f"({who}) {line}")

    forward._pipelines_filtered = True  # type: ignore[attr-defined]
    return forward


def cluster_cpus() -> int:
    """CPUs Ray can schedule on, over the whole cluster."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path for a local path or any fsspec URL (`s3://...`)."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def wide_when_piped() -> bool:
    """Output that is not a terminal (a file, a pipe, the Prefect logs) has no width to wrap to, and rich would
    fold table cells, paths included, at its default 80 columns: give it room (COLUMNS, which rich reads) unless
    the user set a width. True when it did."""
    import sys

    if sys.stdout.isatty() or "COLUMNS" in os.environ:
        return False
    os.environ["COLUMNS"] = "1000"
    return True
