"""The deployments on a real Prefect server: registered (twice: updated in place) with their
schedules and typed parameters, shown by the Prefect UI as headless Chromium renders it, and run by
a runner serving them."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from pipelines.config import load_config
from pipelines.deployments import DEPLOYMENTS, start_in_own_group, stop_process_groups, wait_until_up

ROOT = Path(__file__).resolve().parents[2]
REGISTER = "import json; from pipelines.deployments import deploy_flows; print(json.dumps(deploy_flows(True)))"
SERVE = "from pipelines.deployments import deploy_flows; deploy_flows()"
SCHEDULES = {"end-to-end/nightly-crawl-curate": "0 2 * * *", "finetune/weekly-finetune": "0 4 * * 0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """`prefect server start` on a free loopback port, with its own Prefect home; and the environment
    of a process that talks to it."""
    home = tmp_path_factory.mktemp("pipelines-home")
    url = f"http://127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PIPELINES_", "MLFLOW_"))}
    env |= {"PIPELINES_HOME": str(home), "PREFECT_HOME": str(home / "prefect"), "PREFECT_API_URL": f"{url}/api",
            "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    process = start_in_own_group([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                  "--port", url.rsplit(":", 1)[1]], home / "prefect-server.log", env)
    try:
        wait_until_up(process, f"{url}/api/health", f"prefect server (log: {home / 'prefect-server.log'})")
        with httpx.Client(base_url=f"{url}/api", timeout=30) as api:
            yield SimpleNamespace(url=url, api=api, env=env, home=home)
    finally:
        stop_process_groups([process])


@pytest.fixture(scope="module")
def registered(server: SimpleNamespace) -> dict[str, Any]:
    """`deploy_flows(register_only=True)` run twice in a fresh process, as `pipelines deploy-flows
    --register-only` would; what it returned the second time, and the deployments the API then has,
    by "flow/deployment"."""
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", REGISTER], env=server.env, cwd=ROOT, capture_output=True,
                              text=True, timeout=180, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
    flows = {f["id"]: f["name"] for f in server.api.post("/flows/filter", json={}).raise_for_status().json()}
    deployments = server.api.post("/deployments/filter", json={}).raise_for_status().json()
    return {"returned": json.loads(done.stdout.strip().splitlines()[-1]),
            "by_name": {f"{flows[d['flow_id']]}/{d['name']}": d for d in deployments}, "count": len(deployments)}


def test_every_deployment_is_registered_once(registered: dict[str, Any]) -> None:
    from pipelines.flows import FLOWS

    expected = [f"{d.flow}/{d.name}" for d in DEPLOYMENTS]
    assert registered["returned"] == expected
    assert sorted(registered["by_name"]) == sorted(expected)
    assert registered["count"] == len(expected)  # registering again updated them
    unscheduled = {name.split("/")[0] for name, d in registered["by_name"].items() if not d["schedules"]}
    assert unscheduled == set(FLOWS)  # the UI can start every flow
    for d in registered["by_name"].values():
        assert d["entrypoint"].startswith("pipelines.flows.") and "pipelines" in d["tags"]


def test_schedules(registered: dict[str, Any]) -> None:
    for name, d in registered["by_name"].items():
        crons = [(s["schedule"]["cron"], s["active"]) for s in d["schedules"]]
        assert crons == ([(SCHEDULES[name], True)] if name in SCHEDULES else []), name
        assert not d["paused"]


def test_parameters_are_the_flow_configs_typed(registered: dict[str, Any]) -> None:
    from pipelines.flows import CONFIGS, FLOWS, EndToEndConfig
    from pipelines.train.finetune import FinetuneConfig

    for name, d in registered["by_name"].items():
        model = FLOWS[name.split("/")[0]][0]
        schema = d["parameter_openapi_schema"]
        assert schema["required"] == ["config"]
        assert schema["properties"]["config"]["$ref"] == f"#/definitions/{model.__name__}"
        assert set(schema["definitions"][model.__name__]["properties"]) == set(model.model_fields)
        assert d["enforce_parameter_schema"]
        model.model_validate(d["parameters"]["config"])
    nightly = registered["by_name"]["end-to-end/nightly-crawl-curate"]["parameters"]["config"]
    assert nightly == load_config(EndToEndConfig, CONFIGS / "flows/nightly-crawl-curate.yaml").model_dump(mode="json")
    assert nightly["until"] == "curate"
    assert (nightly["images"]["input"], nightly["text"]["input"]) == ("demo-out/sample/images.jsonl",
                                                                      "demo-out/sample/pages.jsonl")
    weekly = registered["by_name"]["finetune/weekly-finetune"]["parameters"]["config"]
    assert weekly == load_config(FinetuneConfig, CONFIGS / "flows/weekly-finetune.yaml").model_dump(mode="json")
    assert (weekly["base"], weekly["lora"]["rank"], weekly["registry"]["model_name"]) == (
        "models:/demo-lm@champion", 8, "demo-chat")


@pytest.mark.parametrize("name, config, field", [
    ("finetune/weekly-finetune", {"lora": {"rank": 0}}, "config.lora.rank"),
    ("end-to-end/nightly-crawl-curate", {"until": "tomorrow"}, "config.until"),
])
def test_the_api_refuses_a_run_whose_config_does_not_fit(server: SimpleNamespace, registered: dict[str, Any],
                                                        name: str, config: dict, field: str) -> None:
    d = registered["by_name"][name]
    response = server.api.post(f"/deployments/{d['id']}/create_flow_run", json={"parameters": {"config": config}})
    assert response.status_code == 409
    assert field in response.json()["detail"]


# -- the Prefect UI ----------------------------------------------------------------------------------
def rendered_text(url: str, expected: list[str], profile: Path, tries: int = 3) -> str:
    """The page's text as headless Chromium renders it (the UI's scripts run and call the API); tried
    again while some `expected` text is missing, in case the API answered after the time budget."""
    chromium = shutil.which("chromium")
    assert chromium, "no chromium on PATH: `make test` installs Debian's"
    for attempt in range(tries):
        done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                               f"--user-data-dir={profile}", f"--virtual-time-budget={15000 * (attempt + 1)}",
                               "--dump-dom", url],
                              capture_output=True, text=True, timeout=120, check=False)
        page = re.sub(r"<(script|style)\b.*?</\1>", " ", done.stdout, flags=re.DOTALL)
        text = html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)))
        if all(e in text for e in expected):
            break
    return text


@pytest.mark.parametrize("name, shown", [
    ("end-to-end/nightly-crawl-curate", "At 02:00 AM every day"),
    ("finetune/weekly-finetune", "At 04:00 AM, only on Sunday"),
    ("pretrain-diffusion/demo", "Entrypoint pipelines.flows.pretrain_diffusion_flow"),  # the image chain too
])
def test_the_ui_shows_the_deployment_and_its_schedule(server: SimpleNamespace, registered: dict[str, Any],
                                                      name: str, shown: str) -> None:
    d = registered["by_name"][name]
    flow, deployment = name.split("/")
    expected = [f"Deployments {deployment}", f"Flow {flow}", shown, d["entrypoint"]]
    text = rendered_text(f"{server.url}/deployments/deployment/{d['id']}", expected, server.home / "chromium")
    for e in expected:
        assert e in text, f"{e!r} not on the page: {text[:2000]}"


def test_the_ui_run_form_has_the_config_fields(server: SimpleNamespace, registered: dict[str, Any]) -> None:
    from pipelines.train.finetune import FinetuneConfig, LoraSettings

    d = registered["by_name"]["finetune/weekly-finetune"]
    expected = ["Parameters", FinetuneConfig.model_fields["base"].description,
                LoraSettings.model_fields["rank"].description]
    text = rendered_text(f"{server.url}/deployments/deployment/{d['id']}/run", expected, server.home / "chromium")
    for e in expected:
        assert e in text, f"{e!r} not in the run form: {text[:2000]}"


# -- serving -----------------------------------------------------------------------------------------
def test_a_served_deployment_runs_what_the_api_starts(server: SimpleNamespace, registered: dict[str, Any]) -> None:
    """`deploy_flows()` serves the deployments: a run created through the API (as the UI's Run button
    does) runs the flow with its typed config; the runner pauses the schedules when it stops."""
    env = server.env | {"PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    runner = start_in_own_group([sys.executable, "-c", SERVE], server.home / "serve.log", env)
    try:
        d = registered["by_name"]["finetune/demo"]
        # no base model: the flow's own check fails it at once, before any training starts
        run = server.api.post(f"/deployments/{d['id']}/create_flow_run",
                              json={"parameters": {"config": {"base": None}}}).raise_for_status().json()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            state = server.api.get(f"/flow_runs/{run['id']}").raise_for_status().json()["state"]
            if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            assert runner.poll() is None, (server.home / "serve.log").read_text()[-3000:]
            time.sleep(1)
        assert state["type"] == "FAILED", (state, (server.home / "serve.log").read_text()[-3000:])
        assert "PipelineError: finetune: set base" in state["message"]
    finally:
        stop_process_groups([runner], timeout=60)
    assert runner.returncode == 0, (server.home / "serve.log").read_text()[-3000:]
    paused = [d["paused"] for d in server.api.post("/deployments/filter", json={}).raise_for_status().json()]
    assert len(paused) == len(DEPLOYMENTS) and all(paused)  # nothing serves them now: no late runs pile up
