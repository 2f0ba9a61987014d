"""The cluster definitions under clusters/, checked offline so they do not rot.

- KubeRay: the fields KubeRay needs (head and worker groups, rayStartParams, a Ray container with an image,
  consistent replica bounds, GPU limits where GPU work is asked for), Serve's own schema for a RayService's
  serveConfigV2 and `pipelines serve --emit-config`'s current output for it.
- Ray's cluster launcher: the config as `ray up` prepares and validates it (Ray's JSON schema and its checks).
- Prefect: the work pool's template as the server validates it and the process worker renders it; the
  deployments as `prefect deploy` reads them, their flows and their parameters.
- Every `pipelines` command in a manifest, a comment or clusters/README.md is parsed by the real CLI and its
  config validated, so a renamed option or a bad value fails here.
- One image (the Dockerfile's tag) and one Ray version everywhere.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

import pytest
import typer.main
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from typer.testing import CliRunner

import pipelines
import pipelines.config
from pipelines.cli import app
from pipelines.config import load_config
from pipelines.curate.run import CurateConfig
from pipelines.errors import PipelineError
from pipelines.ingest.images import ImageCrawlConfig
from pipelines.ingest.text import TextCrawlConfig
from pipelines.serve.app import ray_serve_env
from pipelines.serve.config import ServeConfig
from pipelines.train.config import PretrainConfig
from pipelines.train.finetune import FinetuneConfig

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "clusters"
K8S_FILES = sorted([*(CLUSTERS / "kuberay").glob("*.yaml"), *(CLUSTERS / "kubernetes").glob("*.yaml")])
LAUNCHER_FILES = sorted((CLUSTERS / "launcher").glob("*.yaml"))
PREFECT_YAML = CLUSTERS / "prefect" / "prefect.yaml"
WORK_POOL_JSON = CLUSTERS / "prefect" / "work-pool.json"
DOCKERFILE = CLUSTERS / "Dockerfile"

# The config model behind each `config_command` of the CLI.
CONFIG_MODELS = {("crawl", "images"): ImageCrawlConfig, ("crawl", "text"): TextCrawlConfig,
                 ("curate",): CurateConfig, ("pretrain",): PretrainConfig, ("finetune",): FinetuneConfig,
                 ("serve",): ServeConfig}


# -- reading the files ---------------------------------------------------------------------------
def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects(kind: str | None = None) -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in K8S_FILES for doc in documents(path) if kind in (None, doc["kind"])]


def dockerfile() -> dict[str, str]:
    """The Dockerfile's base image, tag (from its build command), Ray version and PIPELINES_HOME."""
    text = DOCKERFILE.read_text()
    return {"from": re.search(r"^FROM (\S+)", text, re.M)[1],
            "image": re.search(r"docker build -f clusters/Dockerfile -t (\S+) \.", text)[1],
            "ray": re.search(r"^ARG RAY_VERSION=(\S+)", text, re.M)[1],
            "home": re.search(r"PIPELINES_HOME=(\S+)", text)[1], "text": text}


IMAGE = dockerfile()["image"]
RAY_VERSION = dockerfile()["ray"]


def cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every RayCluster spec: of a RayCluster, a RayJob's own cluster, a RayService's cluster."""
    specs = []
    for path, doc in k8s_objects():
        spec = doc.get("spec", {})
        inner = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}
        if inner.get(doc["kind"]) is not None:
            specs.append((f"{path.name}: {doc['kind']} {doc['metadata']['name']}", inner[doc["kind"]]))
    return specs


def groups(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod template's spec in the Kubernetes files (Ray groups and Deployments alike)."""
    for where, spec in cluster_specs():
        for group in groups(spec):
            yield f"{where} {group.get('groupName', 'head')}", group["template"]["spec"]
    for path, doc in k8s_objects("Deployment"):
        yield f"{path.name}: Deployment {doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def gpus(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def test_every_file_parses_and_every_kubernetes_object_is_whole():
    for path in CLUSTERS.rglob("*.yaml"):
        assert documents(path), f"{path}: empty"
    json.loads(WORK_POOL_JSON.read_text())
    for path, doc in k8s_objects():
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), path.name
        if doc["kind"].startswith("Ray"):
            assert doc["apiVersion"] == "ray.io/v1", f"{path.name}: {doc['kind']} {doc['apiVersion']}"
    kinds = sorted(doc["kind"] for _, doc in k8s_objects() if doc["kind"].startswith("Ray"))
    assert kinds == ["RayCluster", "RayJob", "RayJob", "RayService"]


# -- `pipelines` commands -----------------------------------------------------------------------
CLI = typer.main.get_command(app)
SHELL_OPERATORS = {"&&", "||", ";", "|"}


def pipelines_commands(line: str) -> Iterator[tuple[list[str], bool]]:
    """The `pipelines SUBCOMMAND ...` commands in a shell line: their arguments, and whether they are whole
    (a `...` argument stands for more, left out)."""
    tokens = shlex.split(line, comments=True)
    for i, token in enumerate(tokens):
        if token == "pipelines" and i + 1 < len(tokens) and tokens[i + 1] in CLI.commands:
            args, whole = [], True
            for arg in tokens[i + 1:]:
                if arg in SHELL_OPERATORS or arg == "...":
                    whole = arg != "..."
                    break
                args.append(arg)
            yield args, whole


def shell_lines(text: str, commented: bool) -> Iterator[str]:
    """The command lines of a file, `\\` continuations joined: in a YAML or Dockerfile, the comment lines
    indented by 3 or more spaces after `#`; in Markdown, the lines of ```bash blocks."""
    lines, in_block = [], False
    for raw in text.splitlines():
        if commented:
            match = re.match(r"^\s*#\s{3,}(\S.*)$", raw)
            line = match[1] if match else None
        else:
            if raw.strip().startswith("```"):
                in_block = raw.strip() == "```bash"
                continue
            line = raw.strip() if in_block else None
        if line is None:
            if lines:
                yield " ".join(lines)
                lines = []
            continue
        lines.append(line.removesuffix("\\").strip())
        if not line.endswith("\\"):
            yield " ".join(lines)
            lines = []
    if lines:
        yield " ".join(lines)


def config_path(given: str) -> Path:
    """A `--config` path of a command as the repository has it: `/app/configs/...` is the image's copy."""
    if given.startswith("/"):
        assert "/configs/" in given, f"--config {given}: not a path to the repository's configs/"
        return ROOT / "configs" / given.split("/configs/", 1)[1]
    return ROOT / given


class Parsed(Exception):
    """Raised in place of running a stage: the command got as far as a validated config."""


def check_command(args: list[str], where: str, whole: bool = True) -> tuple[str, ...]:
    """Parse `pipelines ARGS` with the real CLI (unknown options, bad values and missing arguments fail) and,
    for a whole command of a stage, build its config as the command does, stopping before the stage runs;
    return the subcommand's path."""
    command, path, rest = CLI, [], list(args)
    while hasattr(command, "get_command"):  # a group (typer ships its own click: no isinstance)
        assert rest, f"{where}: `pipelines {' '.join(args)}` names no subcommand"
        name = rest.pop(0)
        command = command.get_command(command.context_class(command), name)
        assert command is not None, f"{where}: `pipelines {' '.join(path + [name])}` is no command"
        path.append(name)
    shown = f"{where}: `pipelines {' '.join(args)}`"
    try:
        ctx = command.make_context(" ".join(["pipelines", *path]), list(rest))
    except Exception as exc:  # click's (typer's) usage errors
        raise AssertionError(f"{shown}: {exc}") from None
    if tuple(path) not in CONFIG_MODELS or not whole:
        return tuple(path)
    given = ctx.params["config"]
    file = config_path(str(given)) if given else None
    assert file is None or file.is_file(), f"{where}: --config {given}: no such file in the repository"
    if file is not None:
        rest[rest.index(str(given))] = str(file)

    def validate_only(model: Any, config: Any = None, overrides: Any = None) -> Any:
        assert model is CONFIG_MODELS[tuple(path)]
        try:
            raise Parsed(load_config(model, config, overrides))
        except PipelineError as exc:  # the command would print it and exit 2
            raise AssertionError(f"{shown}: {exc}") from None

    with mock.patch.object(pipelines.config, "load_config", validate_only):
        try:
            command.main(list(rest), prog_name="pipelines", standalone_mode=False)
        except Parsed:
            return tuple(path)
        except Exception as exc:
            raise AssertionError(f"{shown}: {exc}") from None
    raise AssertionError(f"{shown}: the command did not build its config")


def commands_in_files() -> list[tuple[str, list[str], bool]]:
    found = []
    for path in sorted(CLUSTERS.rglob("*")):
        if path.suffix in (".yaml", ".md") or path.name == "Dockerfile":
            for line in shell_lines(path.read_text(), commented=path.suffix != ".md"):
                found += [(str(path.relative_to(ROOT)), *command) for command in pipelines_commands(line)]
    for path, doc in k8s_objects("RayJob"):
        found += [(f"{path.name}: entrypoint", *command) for command in pipelines_commands(doc["spec"]["entrypoint"])]
    return found


def test_every_pipelines_command_is_one_the_cli_accepts():
    found = commands_in_files()
    seen = {check_command(args, where, whole) for where, args, whole in found}
    # The extraction itself must work: these are all in the files.
    assert {("crawl", "text"), ("crawl", "images"), ("curate",), ("pretrain",), ("serve",), ("deploy-flows",)} <= seen
    assert len(found) >= 12


def test_a_renamed_option_or_bad_value_fails_the_check():
    with pytest.raises(AssertionError, match="no-such-option"):
        check_command(["pretrain", "--no-such-option", "1"], "here")
    with pytest.raises(AssertionError, match="zero_stage"):
        check_command(["pretrain", "--zero-stage", "4"], "here")
    with pytest.raises(AssertionError, match="no command"):
        check_command(["crawl", "video"], "here")
    with pytest.raises(AssertionError, match="output"):  # a whole command misses a required option
        check_command(["curate", "--input", "s3://b/x"], "here")
    check_command(["curate", "--input", "s3://b/x"], "here", whole=False)  # `...` stands for the rest
    assert list(pipelines_commands("RAY_ADDRESS=x pipelines crawl text --input a ... && pipelines curate -c b")) == [
        (["crawl", "text", "--input", "a"], False), (["curate", "-c", "b"], True)]


# -- the image ----------------------------------------------------------------------------------
def test_dockerfile_builds_this_package_and_names_its_version():
    d = dockerfile()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert d["from"] == "python:3.11-slim"
    assert Version("3.11") in Requirement(f"python{project['requires-python']}").specifier
    repository, _, tag = IMAGE.rpartition(":")
    assert repository.endswith("/pipelines") and tag == pipelines.__version__ == project["version"]
    ray = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "ray")
    assert Version(RAY_VERSION) in ray.specifier, f"RAY_VERSION {RAY_VERSION} is not within pyproject's {ray}"
    assert re.search(r'pip install [^\n]*-e "\.\[s3\]" "ray\[data,train,serve\]==\$\{RAY_VERSION\}"', d["text"])
    assert 's3' in project["optional-dependencies"]
    assert 'ENTRYPOINT ["pipelines"]' in d["text"] and project["scripts"]["pipelines"] == "pipelines.cli:app"
    for source in re.findall(r"^COPY (.+) \S+$", d["text"], re.M):
        for name in source.split():
            assert (ROOT / name).exists(), f"Dockerfile copies {name}, which the repository does not have"


def test_every_image_is_the_dockerfiles_and_every_ray_version_its_ray():
    images = []
    for where, pod in pod_specs():
        images += [(where, c["image"]) for c in pod.get("initContainers", []) + pod["containers"]]
    for path in LAUNCHER_FILES:
        docker = yaml.safe_load(path.read_text()).get("docker", {})
        images += [(path.name, docker[k]) for k in ("image", "head_image", "worker_image") if k in docker]
    assert len(images) >= 10
    assert {image for _, image in images} == {IMAGE}, [x for x in images if x[1] != IMAGE]
    versions = [(where, spec.get("rayVersion")) for where, spec in cluster_specs()]
    assert versions and all(v == RAY_VERSION for _, v in versions), versions
    local = (CLUSTERS / "launcher" / "local.yaml").read_text()
    assert f'"ray[data,train,serve]=={RAY_VERSION}"' in local


# -- KubeRay ------------------------------------------------------------------------------------
def configmap(name: str) -> dict[str, str]:
    found = [doc for _, doc in k8s_objects("ConfigMap") if doc["metadata"]["name"] == name]
    assert found, f"no ConfigMap {name} under clusters/"
    return found[0]["data"]


def env_names(container: dict[str, Any]) -> set[str]:
    """The variables a container gets: its `env` and the keys of the ConfigMaps in its `envFrom`."""
    names = {e["name"] for e in container.get("env", [])}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            names |= set(configmap(source["configMapRef"]["name"]))
    return names


@pytest.mark.parametrize("where,spec", cluster_specs(), ids=[w for w, _ in cluster_specs()])
def test_ray_cluster_spec_has_what_kuberay_needs(where: str, spec: dict[str, Any]):
    head = spec["headGroupSpec"]
    names = [g["groupName"] for g in spec.get("workerGroupSpecs", [])]
    assert len(names) == len(set(names)), f"{where}: group names repeat: {names}"
    for group in groups(spec):
        params = group["rayStartParams"]
        # KubeRay's CRD types them map[string]string: a bare number is refused.
        assert all(isinstance(v, str) for v in params.values()), f"{where}: rayStartParams {params}"
        pod = group["template"]["spec"]
        ray = pod["containers"][0]  # KubeRay runs Ray in the first container
        assert ray["name"] and ray["image"]
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for mount in ray.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{where}: mount {mount['name']} has no volume"
        requests = ray.get("resources", {}).get("requests", {})
        if "nvidia.com/gpu" in requests:  # an extended resource: Kubernetes wants requests == limits
            assert requests["nvidia.com/gpu"] == gpus(ray) > 0
        # Storage, MLflow and Prefect reach every pod: s3:// paths and tracking work from any node.
        assert {"MLFLOW_TRACKING_URI", "PREFECT_API_URL", "AWS_DEFAULT_REGION"} <= env_names(ray), where
        assert {"secretRef": {"name": "pipelines-s3"}} in ray.get("envFrom", []), where
    assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0", f"{where}: jobs are submitted to the dashboard"
    for group in spec.get("workerGroupSpecs", []):
        low, n, high = group["minReplicas"], group["replicas"], group["maxReplicas"]
        assert 0 <= low <= n <= high and high >= 1, f"{where} {group['groupName']}: min {low}, replicas {n}, max {high}"
        if not spec.get("enableInTreeAutoscaling"):
            assert low == n == high, f"{where} {group['groupName']}: bounds without autoscaling mean nothing"


def test_raycluster_autoscales_cpu_and_gpu_workers_and_has_serves_env():
    [(_, cluster)] = k8s_objects("RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    workers = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu_groups = [g for g in workers.values() if gpus(g["template"]["spec"]["containers"][0]) > 0]
    cpu_groups = [g for g in workers.values() if gpus(g["template"]["spec"]["containers"][0]) == 0]
    assert gpu_groups and cpu_groups
    assert any(g["minReplicas"] < g["maxReplicas"] for g in gpu_groups + cpu_groups)
    # `pipelines serve --ingress proxy` against it: Serve's settings must be in Ray's environment when it starts.
    proxied = ray_serve_env(ServeConfig(model="models:/m@champion", ingress="proxy"))
    for group in groups(spec):
        env = {e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0].get("env", [])}
        assert proxied.items() <= env.items(), group.get("groupName", "head")


def test_rayjobs_run_on_a_cluster_with_what_their_command_asks_for():
    jobs = k8s_objects("RayJob")
    clusters = {doc["metadata"]["name"] for _, doc in k8s_objects("RayCluster")}
    assert len(jobs) >= 2
    for path, job in jobs:
        spec = job["spec"]
        assert spec["entrypoint"].split()[0] == "pipelines", path.name
        assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), f"{path.name}: one of the two"
        if "clusterSelector" in spec:
            assert spec["clusterSelector"]["ray.io/cluster"] in clusters, f"{path.name}: selects no RayCluster here"
            continue
        assert spec.get("shutdownAfterJobFinishes") is True, f"{path.name}: its own cluster should go with it"
        for args, _ in pipelines_commands(spec["entrypoint"]):
            if args[0] in ("pretrain", "finetune") and "--use-gpu" in args:
                workers = int(args[args.index("--workers") + 1]) if "--workers" in args else 1
                capacity = sum(g["maxReplicas"] * gpus(g["template"]["spec"]["containers"][0])
                               for g in spec["rayClusterSpec"]["workerGroupSpecs"])
                assert capacity >= workers, f"{path.name}: {workers} GPU workers asked, {capacity} GPUs at most"
            if args[0] in ("pretrain", "finetune"):  # several nodes: checkpoints must go where all reach
                assert args[args.index("--storage") + 1].startswith("s3://"), path.name


def serve_command(service: dict[str, Any]) -> list[str]:
    return shlex.split(service["metadata"]["annotations"]["pipelines/serve-command"])


def test_rayservice_serve_config_is_valid_for_serve_and_this_package():
    from ray.serve.schema import ServeDeploySchema

    [(_, service)] = k8s_objects("RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    assert service["spec"]["rayClusterConfig"]["headGroupSpec"]
    [application] = config["applications"]
    module, _, attr = application["import_path"].partition(":")
    assert application["import_path"] == "pipelines.serve.app:build_app"
    assert callable(getattr(importlib.import_module(module), attr))
    ServeConfig.model_validate(application["args"])


def test_rayservice_serve_config_is_what_pipelines_serve_emits(tmp_path, monkeypatch):
    """serveConfigV2 must be what its annotated command writes today: a change of `emit_config` or of a
    serving option shows up here, and the fix is to regenerate it."""
    [(_, service)] = k8s_objects("RayService")
    args = serve_command(service)
    assert args[:2] == ["pipelines", "serve"] and "--emit-config" not in args
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # else it goes into the config's runtime_env
    out = tmp_path / "serve.yaml"
    result = CliRunner().invoke(app, [*args[1:], "--emit-config", str(out)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == yaml.safe_load(out.read_text()), (
        f"regenerate serveConfigV2 of clusters/kuberay/rayservice.yaml: {' '.join(args)} --emit-config FILE")


def test_rayservice_builds_the_app_and_its_pods_have_serves_env_and_port(monkeypatch):
    import pipelines.train.registry as registry
    from pipelines.serve.app import build_app
    from ray.serve import Application

    [(_, service)] = k8s_objects("RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    [application] = config["applications"]
    monkeypatch.setattr(registry, "configure_tracking", lambda: "http://mlflow:5000")  # no global MLflow state
    assert isinstance(build_app(application["args"]), Application)  # what Serve calls on deploy
    serve = ServeConfig.model_validate(application["args"])
    assert not serve.direct_ingress, "KubeRay routes to Serve's proxy: serve through it on a cluster"
    spec = service["spec"]["rayClusterConfig"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "serve", "containerPort": config["http_options"]["port"]} in head["ports"]
    assert config["http_options"]["host"] == "0.0.0.0"
    for group in groups(spec):
        env = {e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0].get("env", [])}
        assert ray_serve_env(serve).items() <= env.items(), group.get("groupName", "head")
    autoscaling = application["deployments"][0].get("autoscaling_config")
    if autoscaling:  # replicas beyond the first nodes need the Ray autoscaler to add nodes
        assert spec.get("enableInTreeAutoscaling") is True


def test_rayservice_takes_its_api_keys_from_a_secret():
    """Keys never sit in a manifest: the Serve config requires them and every pod reads them from a Secret."""
    from pipelines.serve.config import API_KEYS_ENV

    [(path, service)] = k8s_objects("RayService")
    [application] = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    access = application["args"]["access"]
    assert "api_keys" not in access and access["keys_required"] is True, "a replica without keys must not start"
    for group in groups(service["spec"]["rayClusterConfig"]):
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0].get("env", [])}
        where = group.get("groupName", "head")
        assert API_KEYS_ENV in env and "value" not in env[API_KEYS_ENV], where
        ref = env[API_KEYS_ENV]["valueFrom"]["secretKeyRef"]
        assert ref["name"] and ref["key"], where


# -- Ray's cluster launcher ---------------------------------------------------------------------
@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=[p.name for p in LAUNCHER_FILES])
def test_launcher_config_is_what_ray_up_accepts(path: Path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` does: Ray's JSON schema and checks
    for local in config.get("file_mounts", {}).values():
        assert (ROOT / local).exists(), f"{path.name}: file_mounts source {local} (from the repository root)"


def test_aws_launcher_has_cpu_and_gpu_workers():
    from ray.autoscaler._private.util import prepare_config

    config = prepare_config(yaml.safe_load((CLUSTERS / "launcher" / "aws.yaml").read_text()))
    assert config["provider"]["type"] == "aws"
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert any(v["resources"].get("GPU", 0) >= 1 for v in workers.values())
    assert any(v["resources"].get("GPU", 0) == 0 and v["resources"].get("CPU", 0) > 0 for v in workers.values())
    assert all(v["max_workers"] > v.get("min_workers", 0) for v in workers.values())
    # The image's entrypoint is `pipelines`: the launcher's `docker run IMAGE bash` must clear it.
    assert "--entrypoint=" in config["docker"]["run_options"]


def test_local_launcher_is_on_prem_and_installs_the_package():
    config = yaml.safe_load((CLUSTERS / "launcher" / "local.yaml").read_text())
    assert config["provider"]["type"] == "local"
    assert config["provider"]["head_ip"] and config["provider"]["worker_ips"]
    assert any("pip install" in c and "pipelines[s3]" in c for c in config["setup_commands"])


# -- Prefect ------------------------------------------------------------------------------------
def work_pool_template() -> dict[str, Any]:
    return json.loads(WORK_POOL_JSON.read_text())


def prefect_worker() -> dict[str, Any]:
    [deployment] = [d for _, d in k8s_objects("Deployment") if d["metadata"]["name"] == "prefect-worker"]
    return deployment["spec"]["template"]["spec"]


def test_work_pool_template_is_a_valid_process_pool_template():
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    template = work_pool_template()
    WorkPoolCreate(name="pipelines", type="process", base_job_template=template)  # the server's own check
    default = ProcessWorker.get_default_base_job_template()
    assert template["job_configuration"] == default["job_configuration"]
    assert set(default["variables"]["properties"]) <= set(template["variables"]["properties"])


def test_work_pool_runs_flows_against_the_cluster():
    from prefect.workers.process import ProcessJobConfiguration

    # As the worker renders a flow run's job; no client: nothing in the template may need the API.
    job = asyncio.run(ProcessJobConfiguration.from_template_and_values(work_pool_template(), {}, client=object()))
    [(_, cluster)] = k8s_objects("RayCluster")
    assert job.env["RAY_ADDRESS"] == f"ray://{cluster['metadata']['name']}-head-svc:10001"
    assert job.env["MLFLOW_TRACKING_URI"] == configmap("pipelines-env")["MLFLOW_TRACKING_URI"]
    assert job.env["PIPELINES_HOME"] == dockerfile()["home"] and str(job.working_dir) == "/app"
    mounts = {m["mountPath"] for m in prefect_worker()["containers"][0]["volumeMounts"]}
    assert job.env["PIPELINES_HOME"] in mounts, "the stage cache must outlive the worker's pod"


def test_prefect_worker_polls_the_pool_made_from_work_pool_json():
    pod = prefect_worker()
    [create] = pod["initContainers"]
    assert create["command"][:4] == ["prefect", "work-pool", "create", "pipelines"]
    template = create["command"][create["command"].index("--base-job-template") + 1]
    [mount] = [m for m in create["volumeMounts"] if template.startswith(m["mountPath"] + "/")]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert template.endswith("/" + WORK_POOL_JSON.name) and volume["configMap"]["name"] == "pipelines-work-pool"
    readme = (CLUSTERS / "README.md").read_text()
    assert f"kubectl create configmap pipelines-work-pool --from-file=clusters/prefect/{WORK_POOL_JSON.name}" in readme
    worker = pod["containers"][0]["command"]
    assert worker[:3] == ["prefect", "worker", "start"] and worker[worker.index("--pool") + 1] == "pipelines"


def prefect_deployments() -> list[dict[str, Any]]:
    from prefect.cli.deploy._models import PrefectYamlModel

    raw = yaml.safe_load(PREFECT_YAML.read_text())
    PrefectYamlModel.model_validate(raw)  # what `prefect deploy` reads the file with
    return raw["deployments"]


def test_prefect_deployments_load_their_flows_and_validate_their_parameters(tmp_path):
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.schema_tools import validate

    from pipelines.flows import FLOWS

    template = work_pool_template()
    models = {flow.name: model for model, flow in FLOWS.values()}
    deployments = prefect_deployments()
    assert len({d["name"] for d in deployments}) == len(deployments) >= 2
    for d in deployments:
        flow = load_flow_from_entrypoint(d["entrypoint"])
        assert d["work_pool"]["name"] == "pipelines"
        validate(d["work_pool"].get("job_variables", {}), template["variables"], raise_on_error=True,
                 ignore_required=True)
        for schedule in d.get("schedules", []):
            CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))
        # What the flow run gets (Prefect validates the parameters) must be what `pipelines flow -c` would
        # make of the same config: a partly given section completed the same way.
        by_prefect = flow.validate_parameters(d["parameters"])["config"]
        file = tmp_path / f"{d['name']}.yaml"
        file.write_text(yaml.safe_dump(d["parameters"]["config"]))
        assert by_prefect == load_config(models[flow.name], file), d["name"]


def test_prefect_deployments_use_shared_storage():
    for d in prefect_deployments():
        text = json.dumps(d["parameters"])
        assert "s3://" in text and "demo-out" not in text and "127.0.0.1" not in text, d["name"]
