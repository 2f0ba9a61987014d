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
from dataclasses import dataclass, field
from pathlib import Path

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


def cluster_cpus() -> int:
    """CPUs Ray can schedule on, over the whole cluster."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path for a local path or any fsspec URL (`s3://...`)."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path
