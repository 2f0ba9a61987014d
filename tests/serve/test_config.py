"""ServeConfig, the deployment options it maps to, the emitted Ray Serve config and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.config import leaf_fields
from pipelines.errors import PipelineError
from pipelines.serve.app import DEPLOYMENT, build_app, deployment_options, ray_serve_env, emit_config
from pipelines.serve.config import ServeConfig


def test_every_leaf_is_a_distinct_option() -> None:
    names = [path[-1] for path, _ in leaf_fields(ServeConfig)]
    assert len(names) == len(set(names))
    assert {"model", "adapter", "host", "port", "replicas", "autoscale", "min_replicas", "max_replicas",
            "target_ongoing_requests", "max_batch_size", "batch_wait_timeout_s", "api_keys", "rate_limit",
            "max_loaded_adapters", "watch_interval_s", "emit_config"} <= set(names)


def test_replicas_or_autoscaling_and_the_ingress_they_get() -> None:
    one = ServeConfig(model="models:/lm@champion")
    assert deployment_options(one)["num_replicas"] == 1 and one.direct_ingress and one.serve_proxy_port == 8001
    three = ServeConfig(model="models:/lm@champion", replicas=3)
    assert not three.direct_ingress and three.serve_proxy_port == 8000  # the proxy balances them
    auto = ServeConfig(model="models:/lm@champion", scaling={"autoscale": True, "min_replicas": 0, "max_replicas": 6,
                                                           "target_ongoing_requests": 2})
    options = deployment_options(auto)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 6, "target_ongoing_requests": 2.0}
    forced = ServeConfig(model="models:/lm@champion", replicas=3, ingress="direct")
    assert forced.serve_proxy_port == 8003  # replicas on 8000-8002
    env = ray_serve_env(forced)
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == "8000"
    assert env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] == "8003"
    with pytest.raises(PipelineError, match="collides"):
        _ = ServeConfig(model="models:/lm@champion", replicas=3, ingress="direct", proxy_port=8001).serve_proxy_port


@pytest.mark.parametrize("bad", [{"model": "lm"}, {"model": "models:/lm@champion", "adapter": ["runs:/x/y"]},
                                 {"model": "models:/lm@champion", "replicas": 0},
                                 {"model": "models:/lm@champion", "scaling": {"min_replicas": 5, "max_replicas": 2}},
                                 {"model": "models:/lm@champion", "port": 70000},
                                 {"model": "models:/lm@champion", "ingress": "sideways"},
                                 {"model": "models:/lm@champion", "typo": 1}])
def test_bad_configs_are_rejected(bad: dict) -> None:
    with pytest.raises(ValueError):
        ServeConfig.model_validate(bad)


def test_emitted_config_is_a_serve_deploy_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    config = ServeConfig(model="models:/lm@champion", adapter=["models:/lm-lora@champion"], port=9000, replicas=2,
                         access={"api_keys": ["sk-1"], "rate_limit": 100}, batching={"max_batch_size": 4})
    out = emit_config(config, tmp_path / "serve" / "lm.yaml")
    text = out.read_text()
    assert text.startswith("# Ray Serve config") and "RAY_SERVE_ENABLE_DIRECT_INGRESS" not in text
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    [application] = schema.applications
    assert application.import_path == "pipelines.serve.app:build_app" and application.route_prefix == "/"
    assert schema.http_options.port == 9000
    assert application.runtime_env == {"env_vars": {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
    [deployment] = application.deployments
    assert (deployment.name, deployment.num_replicas, deployment.max_ongoing_requests) == (DEPLOYMENT, 2, 64)
    # What `serve deploy` does with it: call the builder with the args.
    # The keys stay out: the replicas get them from the cluster, and refuse to start without.
    unkeyed = config.access.model_copy(update={"api_keys": [], "keys_required": True})
    assert ServeConfig.model_validate(application.args) == config.model_copy(update={"emit_config": None,
                                                                                      "access": unkeyed})
    built = build_app(application.args)
    assert built._bound_deployment.num_replicas == 2
    single = emit_config(ServeConfig(model="models:/lm@champion"), tmp_path / "one.yaml").read_text()
    assert "#   RAY_SERVE_ENABLE_DIRECT_INGRESS=1" in single  # what the cluster's environment needs


def test_cli_serve_emits_the_config_and_reports_mistakes_in_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "serve.yaml"
    result = runner.invoke(app, ["serve", "--model", "models:/lm@champion", "--adapter", "models:/a@champion",
                                 "--adapter", "models:/b@champion", "--autoscale", "--max-replicas", "3",
                                 "--api-keys", "sk-1", "--emit-config", str(out)])
    assert result.exit_code == 0, result.output
    args = yaml.safe_load(out.read_text())["applications"][0]["args"]
    assert args["adapter"] == ["models:/a@champion", "models:/b@champion"]
    assert args["scaling"]["autoscale"] is True
    # The key is never written out; the replicas must get one on the cluster or refuse to start.
    assert "sk-1" not in out.read_text() and "api_keys" not in args["access"]
    assert args["access"]["keys_required"] is True
    bad = runner.invoke(app, ["serve", "--model", "lm", "--emit-config", str(out)])
    assert bad.exit_code == 2 and "not a registered model URI" in bad.output


def test_serving_a_model_that_is_not_registered_is_a_one_line_error(tmp_path: Path, monkeypatch) -> None:
    # Checked before Ray starts: the replica would otherwise fail in its constructor.
    from pipelines.serve.app import serve_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(PipelineError, match="no-such-model"):
        serve_model(ServeConfig(model="models:/no-such-model@champion", blocking=False))


def test_emitted_config_never_holds_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.serve.config import API_KEYS_ENV

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    secret = "sk-very-secret-0123456789"
    monkeypatch.setenv(API_KEYS_ENV, secret)
    key_file = tmp_path / "api-keys"  # a mounted Secret
    key_file.write_text(secret + "\n")
    for access in [{}, {"api_keys": [secret]}, {"api_keys_file": str(key_file)}]:
        out = emit_config(ServeConfig(model="models:/lm@champion", access=access), tmp_path / "serve.yaml")
        text = out.read_text()
        assert secret not in text, access
        args = yaml.safe_load(text)["applications"][0]["args"]
        assert args["access"]["keys_required"] is True and API_KEYS_ENV in text, access
        assert ServeConfig.model_validate(args).access.resolve_keys() == [secret]  # what a replica reads
    monkeypatch.delenv(API_KEYS_ENV)
    open_config = emit_config(ServeConfig(model="models:/lm@champion"), tmp_path / "open.yaml").read_text()
    assert yaml.safe_load(open_config)["applications"][0]["args"]["access"]["keys_required"] is False
    # Nor does any dump of the config (Prefect's parameters, digests) or its repr.
    config = ServeConfig(model="models:/lm@champion", access={"api_keys": [secret]})
    assert secret not in json.dumps(config.model_dump(mode="json")) and secret not in repr(config)


def test_keys_come_from_the_environment_a_file_or_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.serve.config import API_KEYS_ENV, AccessConfig

    monkeypatch.setenv(API_KEYS_ENV, "sk-a, sk-b\nsk-c")
    keys = tmp_path / "keys"
    keys.write_text("sk-d\n\nsk-a\n")
    access = AccessConfig(api_keys=["sk-z"], api_keys_file=str(keys))
    assert access.resolve_keys() == ["sk-z", "sk-a", "sk-b", "sk-c", "sk-d"]
    monkeypatch.delenv(API_KEYS_ENV)
    assert AccessConfig().resolve_keys() == []
    with pytest.raises(PipelineError, match="no API key"):
        AccessConfig(keys_required=True).resolve_keys()  # a replica refuses to start open
    with pytest.raises(PipelineError, match="api_keys_file"):
        AccessConfig(api_keys_file=str(tmp_path / "missing")).resolve_keys()
