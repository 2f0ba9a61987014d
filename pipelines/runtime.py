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

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec


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


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to Ray once per process: the cluster at `RAY_ADDRESS`, else a local Ray started in process."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = settings().ray_address
    kwargs: dict = dict(logging_level=logging.WARNING, log_to_driver=True, configure_logging=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Ray enables token auth on a local cluster by default and warns about it at every start.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # "local": always a fresh in-process Ray, never a cluster someone else started on this machine.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
    _filter_worker_logs()


# Lines Ray's own actors print on every run that tell a user nothing: the placement-group cleaner
# cannot use the state API without a dashboard; Ray Train announces each report; DeepSpeed says it
# runs on the CPU. Everything else from the workers (our progress lines, real errors) still shows.
_NOISE = re.compile(
    r"State API may be temporarily unavailable|Reporting training result|Checkpoint successfully created"
    r"|Setting accelerator to CPU|deepspeed_shm_comm_op built successfully|torch.distributed.\w+. is deprecated"
    r"|return func\(\*args, \*\*kwargs\)|has constructor arguments in the object store"
    r"|Ray deduplicates logs by default|RAY_TRAIN_ENABLE_PRINT_PATCH|is_gradient_checkpointing. is deprecated"
    r"|^\s*warnings.warn\($")


def _filter_worker_logs() -> None:
    """Drop `_NOISE` lines from what Ray forwards to the driver's console. Ray offers no filter hook,
    so this wraps its forwarding handler; if Ray's internals change, logs simply pass unfiltered."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    with dispatcher._lock:
        handlers = []
        for name, handler in dispatcher.handlers:
            if name == "ray_print_logs" and not getattr(handler, "_pipelines_filtered", False):
                handler = _filtered(handler)
            handlers.append((name, handler))
        dispatcher.handlers = handlers


def _filtered(handler: Any) -> Any:
    def forward(data: dict) -> None:
        if data.get("actor_name") == "PlacementGroupCleaner":  # all it says is that it lacks the state API
            return
        lines = [line for line in data.get("lines", []) if not _NOISE.search(line)]
        if lines:
            handler({**data, "lines": lines})

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
