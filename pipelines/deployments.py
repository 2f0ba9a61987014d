"""Prefect deployments of the flows: what runs on a schedule, and what the Prefect UI can start.

`DEPLOYMENTS` is the whole list. Two run on a schedule: `nightly-crawl-curate` (the end-to-end flow
up to curation, daily at 02:00 UTC) and `weekly-finetune` (Sundays at 04:00 UTC). Every flow also has an
unscheduled `demo` deployment with the demo's parameters, so the Prefect UI's Run form opens filled
in; the form is typed by the flow's config model, and the API refuses a run whose values do not fit.

They are Prefect's own deployments (`flow.to_deployment`), run by a Prefect runner in the process
that serves them (`prefect.serve`): no work pool, no worker. `pipelines deploy-flows` registers and
serves them on the server at `PREFECT_API_URL`; `pipelines ui` first starts a Prefect server and the
MLflow UI on this machine. Relative paths in parameters are read from the runner's working directory.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from pipelines.errors import PipelineError
from pipelines.runtime import prefect_env, settings


@dataclass(frozen=True)
class Deployment:
    """A deployment of one of `pipelines.flows.FLOWS`: its config is a YAML file under configs/ (or
    `section` of one; none: the model's defaults) with `overrides` by dotted field path, where
    `{home}` stands for $PIPELINES_HOME; it runs on `cron` or only when started."""

    flow: str
    name: str
    description: str
    config: str | None = None
    section: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    cron: str | None = None
    tags: tuple[str, ...] = ()


SAMPLE = "demo-out/sample"  # what `make demo` writes
FLOWS_HOME = "{home}/flows"  # where the end-to-end flow keeps stage outputs: the stage deployments chain them too
_CRAWL = {"fetch": {"allow_private_network": True}}  # the sample web is on 127.0.0.1

DEPLOYMENTS = [
    Deployment("end-to-end", "nightly-crawl-curate", "Every day at 02:00: crawl the URL lists, then curate both.",
               config="flows/nightly-crawl-curate.yaml", cron="0 2 * * *", tags=("scheduled",)),
    Deployment("finetune", "weekly-finetune", "Sundays at 04:00: LoRA fine-tune demo-lm's champion into demo-chat.",
               config="flows/weekly-finetune.yaml", cron="0 4 * * 0", tags=("scheduled",)),
    Deployment("end-to-end", "demo", "What `make demo` runs: crawl, curate, pretrain, fine-tune, serve, one request.",
               config="flows/demo.yaml", overrides={
                   "images.input": f"{SAMPLE}/images.jsonl", "text.input": f"{SAMPLE}/pages.jsonl",
                   "finetune.examples.data": f"{SAMPLE}/instructions.jsonl"}),
    Deployment("ingest", "demo", "Crawl the demo's caption-image and page URL lists.", overrides={
        "images": {"input": f"{SAMPLE}/images.jsonl", "output": f"{FLOWS_HOME}/shards/images", "shard_size": 100,
                   **_CRAWL},
        "text": {"input": f"{SAMPLE}/pages.jsonl", "output": f"{FLOWS_HOME}/shards/text", "source": "urls",
                 "shard_size": 50, **_CRAWL}}),
    Deployment("curate", "demo", "Curate the crawled demo pages with the technical-documentation rules.",
               config="curate/text-docs.yaml", overrides={
                   "input": f"{FLOWS_HOME}/shards/text", "output": f"{FLOWS_HOME}/curated/text"}),
    Deployment("pretrain", "demo", "Pretrain the demo's tiny LM on the curated pages; register demo-lm.",
               config="flows/demo.yaml", section="pretrain", overrides={"data.shards": f"{FLOWS_HOME}/curated/text"}),
    Deployment("pretrain-clip", "demo", "Pretrain the demo's tiny CLIP on the curated photos; register demo-clip.",
               config="flows/demo.yaml", section="clip", overrides={"data.shards": f"{FLOWS_HOME}/curated/images"}),
    Deployment("finetune", "demo", "LoRA fine-tune demo-lm's champion on the demo's examples; register demo-chat.",
               config="flows/weekly-finetune.yaml"),
    Deployment("pretrain-autoencoder", "demo", "Pretrain the demo's tiny autoencoder on the curated photos; "
               "register demo-autoencoder.", config="flows/demo.yaml", section="diffusion.autoencoder",
               overrides={"data.shards": f"{FLOWS_HOME}/curated/images"}),
    Deployment("encode", "demo", "Encode the curated photos with demo-autoencoder's champion into latent shards.",
               overrides={"shards": f"{FLOWS_HOME}/curated/images", "output": f"{FLOWS_HOME}/latents/demo",
                          "autoencoder": "models:/demo-autoencoder@champion", "batch_size": 64, "quiet": True}),
    Deployment("pretrain-diffusion", "demo", "Pretrain the demo's tiny text-to-image model on the latents, "
               "conditioned on demo-clip; register demo-diffusion.", config="flows/demo.yaml",
               section="diffusion.diffusion", overrides={"data.shards": f"{FLOWS_HOME}/latents/demo",
                                                         "conditioning.text_encoder": "models:/demo-clip@champion"}),
    Deployment("deploy", "demo", "Serve demo-lm with the demo-chat adapter and send one request.", overrides={
        "model": "models:/demo-lm@champion", "adapter": ["models:/demo-chat@champion"]}),
    Deployment("eval", "demo", "Score demo-chat's champion on the shipped tasks (demo-cloze, demo-qa) with "
               "lm-evaluation-harness; scores to its MLflow run.", config="flows/demo.yaml", section="eval",
               overrides={"model": "models:/demo-chat@champion"}),
]


def parameters(deployment: Deployment) -> dict[str, Any]:
    """The deployment's flow parameters: its config, validated by the flow's model, as JSON."""
    import yaml

    from pipelines.config import load_config
    from pipelines.flows import CONFIGS, FLOWS

    def expand(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace("{home}", str(settings().home))
        if isinstance(value, dict):
            return {k: expand(v) for k, v in value.items()}
        return value

    overrides = {tuple(key.split(".")): expand(value) for key, value in deployment.overrides.items()}
    path = CONFIGS / deployment.config if deployment.config else None
    if path and deployment.section:
        section = yaml.safe_load(path.read_text())
        for key in deployment.section.split("."):
            section = section[key]
        overrides = {(key,): value for key, value in section.items()} | overrides
        path = None
    config = load_config(FLOWS[deployment.flow][0], path, overrides)
    return {"config": config.model_dump(mode="json")}


def runner_deployments() -> list[Any]:
    """`DEPLOYMENTS` as Prefect runner deployments, ready to register (`apply`) or to serve."""
    prefect_env()
    from prefect.types.entrypoint import EntrypointType

    from pipelines.flows import FLOWS

    return [FLOWS[d.flow][1].to_deployment(
        name=d.name, cron=d.cron, parameters=parameters(d), description=d.description, tags=["pipelines", *d.tags],
        entrypoint_type=EntrypointType.MODULE_PATH)  # `pipelines.flows.NAME`, from any working directory
        for d in DEPLOYMENTS]


def deploy_flows(register_only: bool = False) -> list[str]:
    """Register every deployment with the Prefect API (again: updated in place) and return their names,
    "flow/deployment"; unless `register_only`, then run them here until interrupted: their schedules,
    and the runs started from the UI."""
    if not register_only and not settings().prefect_api_url:
        raise PipelineError("deploy-flows: set PREFECT_API_URL to a Prefect server (`pipelines ui` starts one), "
                            "or give --register-only")
    deployments = runner_deployments()
    if register_only:
        for deployment in deployments:
            deployment.apply()
    else:
        from prefect import serve

        serve(*deployments)  # registers them, then polls for their runs
    return [deployment.full_name for deployment in deployments]


# -- pipelines ui ----------------------------------------------------------------------------------
def ui(prefect_port: int = 4200, mlflow_port: int = 5000, serve_deployments: bool = True) -> None:
    """Start a Prefect server on this machine's Prefect database (the runs of `pipelines flow` and `make
    demo` are there) and the MLflow UI, on 127.0.0.1; then register and serve the deployments, with the
    runs' links pointing at this MLflow UI. Ctrl-C or SIGTERM stops it all."""
    from rich.console import Console

    console = Console(soft_wrap=True, highlight=False)
    prefect_env()
    home, tracking = settings().home, settings().mlflow_tracking_uri
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    prefect_url = f"http://127.0.0.1:{prefect_port}"
    mlflow_url = tracking.rstrip("/") if tracking.startswith("http") else f"http://127.0.0.1:{mlflow_port}"
    # before Prefect is imported here, and inherited by the servers and the flow runs
    os.environ.update(PREFECT_API_URL=f"{prefect_url}/api", PIPELINES_MLFLOW_UI_URL=mlflow_url)
    servers = [("Prefect server", "prefect-server.log", f"{prefect_url}/api/health", [
        sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)])]
    if not tracking.startswith("http"):  # a tracking server has a UI already
        servers.append(("MLflow UI", "mlflow-ui.log", f"{mlflow_url}/health", [
            sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking, "--artifacts-destination",
            str(home / "mlartifacts"), "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"]))
    for (what, *_), port in zip(servers, (prefect_port, mlflow_port)):
        _check_free(port, what)
    processes: list[subprocess.Popen] = []
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        for _, log, _, command in servers:  # all at once: each takes a while to start
            processes.append(start_in_own_group(command, logs / log))
        for (what, log, health, _), process in zip(servers, processes):
            wait_until_up(process, health, f"{what} (log: {logs / log})")
        console.print(f"Prefect UI  {prefect_url}\nMLflow UI   {mlflow_url}\n"
                      f"[dim]server logs in {logs}; Ctrl-C stops everything[/dim]")
        if serve_deployments:
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings({PREFECT_API_URL: f"{prefect_url}/api"}):  # in case it was imported before
                deploy_flows()
        else:
            while all(process.poll() is None for process in processes):
                time.sleep(1)
            raise PipelineError("; ".join(f"{what} exited with code {process.returncode} (log: {logs / log})"
                                          for (what, log, _, _), process in zip(servers, processes)
                                          if process.returncode is not None))
    except KeyboardInterrupt:
        pass
    finally:
        stop_process_groups(processes)
        signal.signal(signal.SIGTERM, previous)
    console.print("stopped")


def _check_free(port: int, what: str) -> None:
    """Refuse a taken port: another server there would answer our health check."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: a closed one's port is free
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise PipelineError(f"{what}: port {port} on 127.0.0.1 is taken ({exc.strerror}); choose another") from exc


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM stops `ui` as Ctrl-C does


def start_in_own_group(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`command` in a process group of its own (Ctrl-C in the terminal is not for it: we stop it, with
    its workers), its output appended to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)


def stop_process_groups(processes: list[subprocess.Popen], timeout: float = 20) -> None:
    """SIGTERM to each process's group, all at once; SIGKILL to those still there after `timeout` s."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        running = [p for p in processes if p.poll() is None]
        for process in running:
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        for process in running:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass


def wait_until_up(process: subprocess.Popen, url: str, what: str, timeout: float = 180) -> None:
    """Until `url` answers 200; a server that exits first, or does not answer in time, is an error."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PipelineError(f"{what} exited with code {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise PipelineError(f"{what} did not answer {url} in {timeout:.0f} s")
