"""`pipelines lineage`: from a registered model (or a running endpoint's model) back to the crawl's input list.

A model version's tags name what it was made from (`lineage.*`, `base_model`); shard manifests name theirs
(`input`: the shards a curation or an encoding read, or the list a crawl read). Following both gives the
chain, one hop per line:

    model        tiny-diffusion v1 (candidate, champion) · diffusion model
    run          diffusion-run (pretrain-diffusion, finished) fef6a4e03e31 · heldout_fd_clip 12.5, loss 0.125
      text encoder tiny-clip v1 (candidate, champion) · CLIP
      ...
    shards       /data/latents  1200 samples, latents, digest 9eff5da96b54  (unchanged)
    encode       autoencoder models:/tiny-ae/1, text encoder models:/tiny-clip/1
    from         /data/curated  1200 samples, images, digest 1c0e4d2a77b1  (unchanged)
    curate       2 steps: image_size, exact_dedup · config 5d41402abc4b
    from         /data/crawled  1530 samples, images, digest 80482be4300d  (unchanged)
    crawl        /data/urls.parquet  sha256 3c5fd676810a · config 7fa3b767c460

Each shard set's digest is the one recorded when the model was trained, checked against the manifest on storage
now; a difference is shown, never hidden.
"""

from __future__ import annotations

import json
import unicodedata
import urllib.request
from typing import Any

from pipelines.errors import PipelineError

# Version tags that name a parent model, and what the parent is to this one.
PARENT_TAGS = {"base_model": "base", "lineage.text_encoder": "text encoder", "lineage.autoencoder": "autoencoder"}
# Version tags that name shards a model was trained on: (url tag, recorded digest tag, role).
DATA_TAGS = (("lineage.shards", "lineage.shards_digest", "shards"),
             ("lineage.examples", "lineage.examples_digest", "examples"))
KIND_NAMES = {"clip": "CLIP", "autoencoder": "autoencoder", "diffusion": "diffusion model",
              "lora-adapter": "LoRA adapter"}
MAX_METRICS = 4


def model_lineage(uri: str) -> dict[str, Any]:
    """The lineage of `models:/NAME@ALIAS` or `models:/NAME/VERSION`, as nested data."""
    from pipelines.train.registry import configure_tracking

    configure_tracking()
    return _model(uri, seen=set())


def endpoint_lineage(url: str, model: str | None) -> dict[str, Any]:
    """The lineage of the model an endpoint at `url` serves now (its `/healthz`); `model` as clients name it,
    `NAME` or `NAME:ADAPTER` (none: the first model it serves). The registry is this process's (MLFLOW_TRACKING_URI), which should be the
    endpoint's."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/healthz", timeout=10) as response:
            health = json.load(response)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{url}: cannot ask the endpoint what it serves ({exc})") from None
    base, sep, adapter = (model or health["model"]).partition(":")
    served = health.get("models") or {health.get("model"): health.get("version")}  # several models, or one
    if base not in served:
        raise PipelineError(f"{url} serves {', '.join(map(str, served))}, not {base}")
    if sep:
        adapters = health.get("adapters") or {}
        if adapter not in adapters:
            raise PipelineError(f"{url} serves no adapter {adapter!r} (it serves: {', '.join(adapters) or 'none'})")
        return model_lineage(f"models:/{adapter}/{adapters[adapter]}")
    return model_lineage(f"models:/{base}/{served[base]}")


def _model(uri: str, seen: set[str]) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipelines.train.registry import resolve_version

    name, version = resolve_version(uri)
    client = MlflowClient()
    mv = client.get_model_version(name, str(version))
    node: dict[str, Any] = {
        "model": f"models:/{name}/{version}", "name": name, "version": version, "aliases": sorted(mv.aliases),
        "kind": KIND_NAMES.get(mv.tags.get("pipelines.kind", ""), "language model"), "parents": [], "data": []}
    seen.add(node["model"])
    tags = dict(mv.tags)
    if mv.run_id:
        try:
            run = client.get_run(mv.run_id)
        except MlflowException as exc:
            node["run"] = {"id": mv.run_id, "error": f"run not found ({str(exc).splitlines()[0]})"}
        else:
            experiment = client.get_experiment(run.info.experiment_id)
            node["run"] = {"id": run.info.run_id, "name": run.info.run_name,
                           "experiment": experiment.name if experiment else None, "status": run.info.status,
                           "metrics": _key_metrics(run.data.metrics)}
            # Versions registered before the tags existed: the run's own lineage tags say the same.
            for context in ("train", "pretrain"):
                if f"lineage.{context}.url" in run.data.tags and "lineage.shards" not in tags:
                    tags["lineage.shards"] = run.data.tags[f"lineage.{context}.url"]
                    tags["lineage.shards_digest"] = run.data.tags.get(f"lineage.{context}.digest", "")
    for tag, role in PARENT_TAGS.items():
        parent = tags.get(tag)
        if not parent:
            continue
        if parent in seen:
            node["parents"].append({"role": role, "model": parent, "error": "already shown above"})
            continue
        try:
            node["parents"].append({"role": role, **_model(parent, seen)})
        except PipelineError as exc:
            node["parents"].append({"role": role, "model": parent, "error": str(exc)})
    for url_tag, digest_tag, role in DATA_TAGS:
        if tags.get(url_tag):
            node["data"].append({"role": role, **shards_lineage(tags[url_tag], tags.get(digest_tag) or None)})
    return node


def _key_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The held-out figures (what aliases move on), then the final loss."""
    keys = sorted(k for k in metrics if k.startswith("heldout_") and not k.endswith("_before"))[:MAX_METRICS]
    if "loss" in metrics and len(keys) < MAX_METRICS:
        keys.append("loss")
    return {k: metrics[k] for k in keys}


def shards_lineage(url: str, recorded: str | None = None, depth: int = 0) -> dict[str, Any]:
    """A shard set and everything upstream of it, from the manifests: the stage that wrote it (crawl, curate,
    encode), that stage's settings, and its input, recursively. `recorded`: the digest a model recorded when
    it was trained on these shards, compared with the manifest's now."""
    from pipelines.shards import read_manifest

    node: dict[str, Any] = {"url": url, "recorded_digest": recorded}
    try:
        manifest = read_manifest(url)
    except PipelineError as exc:
        return {**node, "error": str(exc)}
    # A manifest is data from storage: every value shown is made printable text, whatever its type.
    digest = _text(manifest["digest"])
    samples = manifest.get("samples")
    node.update(digest=digest, kind=_text(manifest.get("kind")), created=_text(manifest.get("created")),
                samples=samples if isinstance(samples, int) else None,
                matches=None if recorded is None else recorded == digest)
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    source = manifest.get("input") if isinstance(manifest.get("input"), dict) else {}
    source = {k: _text(source.get(k)) for k in ("path", "url", "digest")} | {
        "files": [f for f in source.get("files") or [] if isinstance(f, dict)] if isinstance(
            source.get("files"), list) else []}
    if manifest.get("kind") == "latents":
        autoencoder = manifest.get("autoencoder") or {}
        clip = manifest.get("clip")
        node["stage"] = {"name": "encode", "config_digest": _text(manifest.get("config_digest")),
                         "autoencoder": _text(autoencoder.get("uri") if isinstance(autoencoder, dict) else None),
                         "text_encoder": _text(clip.get("uri") if isinstance(clip, dict) else None)}
    elif "steps" in config or "run_digest" in manifest:
        steps = config.get("steps") if isinstance(config.get("steps"), list) else []
        node["stage"] = {"name": "curate", "config_digest": _text(manifest.get("config_digest")),
                         "steps": [_text(s.get("step")) for s in steps if isinstance(s, dict)]}
    else:
        node["stage"] = {"name": "crawl", "config_digest": _text(manifest.get("config_digest")),
                         "input": source.get("path") or _text(config.get("input")),
                         "input_digest": source.get("digest"),
                         "input_files": source.get("files", []), "converted_from": _converted(manifest.get("converted_from"))}
        return node
    upstream = source.get("path") or source.get("url")
    if upstream and depth < 16:
        node["input"] = shards_lineage(upstream, source.get("digest"), depth + 1)
    return node


def _converted(value: Any) -> dict[str, str | None] | None:
    if not isinstance(value, dict):
        return None
    return {"path": _text(value.get("path")), "sha256": _text(value.get("sha256")) or "?"}


def _text(value: Any) -> str | None:
    """A manifest's value as printable text (None stays None): lone surrogates and other unencodable
    characters replaced, so one odd manifest cannot break the printing of the chain."""
    if value is None:
        return None
    text = str(value).encode("utf-8", "replace").decode("utf-8")
    # Control and format characters (newlines, terminal escapes, right-to-left overrides) could fake lines.
    return "".join("?" if unicodedata.category(c) in ("Cc", "Cf") else c for c in text)


# -- text -----------------------------------------------------------------------------------------

def render(node: dict[str, Any]) -> list[str]:
    """The lineage as lines: one hop each, parents indented under their model."""
    return _render_model(node, "model", 0)


def _render_model(node: dict[str, Any], role: str, depth: int) -> list[str]:
    pad = "  " * depth
    if node.get("error"):
        return [f"{pad}{role:<13}{node['model']}  ({node['error']})"]
    aliases = f" ({', '.join(node['aliases'])})" if node["aliases"] else ""
    lines = [f"{pad}{role:<13}{node['name']} v{node['version']}{aliases} · {node['kind']}"]
    run = node.get("run")
    if run and run.get("error"):
        lines.append(f"{pad}{'run':<13}{run['id']}  ({run['error']})")
    elif run:
        figures = ", ".join(f"{k} {_figure(v)}" for k, v in run["metrics"].items())
        lines.append(f"{pad}{'run':<13}{run['name']} ({run['experiment']}, {run['status'].lower()}) "
                     f"{run['id'][:12]}" + (f" · {figures}" if figures else ""))
    for parent in node["parents"]:
        lines += _render_model(parent, parent["role"], depth + 1)
    for data in node["data"]:
        lines += _render_shards(data, data["role"], depth)
    return lines


def _render_shards(node: dict[str, Any], role: str, depth: int) -> list[str]:
    pad = "  " * depth
    if node.get("error"):
        return [f"{pad}{role:<13}{node['url']}  (cannot read: {node['error']})"]
    check = ""  # against the digest the next hop recorded when it read these shards
    if node.get("matches") is False:
        check = f"  CHANGED since it was read (then digest {node['recorded_digest'][:12]})"
    elif node.get("matches"):
        check = "  (unchanged)"
    samples = f"{node['samples']} samples, " if node.get("samples") is not None else ""
    lines = [f"{pad}{role:<13}{node['url']}  {samples}{node.get('kind')}, digest {node['digest'][:12]}{check}"]
    stage = node["stage"]
    if stage["name"] == "encode":
        lines.append(f"{pad}{'encode':<13}autoencoder {stage['autoencoder']}"
                     + (f", text encoder {stage['text_encoder']}" if stage.get("text_encoder") else ""))
    elif stage["name"] == "curate":
        steps = ", ".join(str(s) for s in stage["steps"]) or "no steps"
        lines.append(f"{pad}{'curate':<13}{len(stage['steps'])} steps: {steps} · config {_short(stage)}")
    else:
        digest = stage.get("input_digest")
        lines.append(f"{pad}{'crawl':<13}{stage.get('input')}  "
                     + (f"sha256 {digest[:12]}" if digest else "input digest not recorded (crawled before it was)")
                     + f" · config {_short(stage)}")
        if stage.get("converted_from"):  # fine-tuning examples: the user's file, staged as the crawl's input
            source = stage["converted_from"]
            lines.append(f"{pad}{'converted':<13}{source['path']}  sha256 {source['sha256'][:12]}")
    if node.get("input"):
        lines += _render_shards(node["input"], "from", depth)
    return lines


def _short(stage: dict[str, Any]) -> str:
    return str(stage.get("config_digest") or "?")[:12]


def _figure(value: float) -> str:
    return f"{value:.4g}"
