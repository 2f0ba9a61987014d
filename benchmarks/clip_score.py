"""CLIP scoring throughput: images/s of `clip_score` through `pipelines curate` and of bare model calls.

    .venv/bin/python benchmarks/clip_score.py [--n-tiny 2000] [--n-base 192] [--shards 4] [--workdir .bench/clip-score]

What it does, per model (`tiny`: the tiny preset at 64 px, patch 8; `base`: ViT-B/16's shape at 224 px with a
12-layer 512-wide text tower; both built from `ClipModelConfig` with random weights, which cost what trained ones
do), on N synthetic 256x256 JPEGs with captions:
  1. forward only: `get_image_features` + `get_text_features` on already preprocessed tensors (batch 64);
  2. bundle: `ClipBundle.embed_images` + `embed_texts` from JPEG bytes (decode, resize, normalise, forward);
  3. curate: `pipelines curate` with one `clip_score` step over the images written as SHARDS image shards
     (Ray tasks, one per shard, each loading the model once; includes reading and writing the shards);
     the step's own seconds (summed over tasks, from stats.json) are reported too.
Prints a table and writes WORKDIR/results.json. On a GPU machine the same command measures the GPU (the step
asks Ray for one when the cluster has one).
"""

import argparse
import io
import json
import os
import shutil
import sys
import time

import numpy as np
from PIL import Image, ImageDraw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pipelines.curate.run import CurateConfig, curate  # noqa: E402
from pipelines.shards import ShardOutput, write_manifest, write_shard  # noqa: E402
from pipelines.train.clip_model import ClipBundle, ClipModelConfig, build_clip, image_processor, load_clip  # noqa: E402

WORDS = ["a", "photo", "of", "red", "green", "blue", "yellow", "circle", "square", "triangle", "on", "grey"]
MODELS = {"tiny": ClipModelConfig(preset="tiny", image_size=64, patch_size=8, max_text_len=32),
          "base": ClipModelConfig(preset="base", image_size=224, patch_size=16, max_text_len=77)}


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"</s>": 0, "[UNK]": 1} | {w: i + 2 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("</s>", "isolated"), pre_tokenizers.Whitespace()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>", unk_token="[UNK]")


def images(n, seed=0):
    """n (JPEG bytes, caption) pairs: random shapes on noise, 256x256."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        x, y = (int(v) for v in rng.integers(20, 180, 2))
        ImageDraw.Draw(im).ellipse((x, y, x + 60, y + 60), fill=colour)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
        out.append((buf.getvalue(), f"a photo of a {WORDS[3 + i % 4]} {WORDS[7 + i % 3]} on grey"))
    return out


def write_shards(root, data, shards):
    import pyarrow as pa

    out = ShardOutput(root)
    stats = []
    for sid, part in enumerate(np.array_split(np.arange(len(data)), shards)):
        keys = [f"{sid:05d}{i:05d}" for i in range(len(part))]
        table = pa.table({"key": keys, "caption": [data[i][1] for i in part], "status": ["success"] * len(part),
                          "width": [256] * len(part), "height": [256] * len(part)})
        files = [(k, {"jpg": data[i][0], "txt": data[i][1].encode()}) for k, i in zip(keys, part)]
        stats.append(write_shard(out, sid, files, table, {"count": len(part)}))
    write_manifest(out, "images", {}, "bench", stats, {})


def measure(name, config, data, args):
    import torch

    folder = os.path.join(args.workdir, f"model-{name}")
    if not os.path.exists(os.path.join(folder, "config.json")):
        tok = tokenizer()
        ClipBundle(build_clip(config, tok), tok, image_processor(config.image_size), config.max_text_len).save(folder)
    bundle = load_clip(folder)
    jpegs, captions = [d for d, _ in data], [c for _, c in data]
    result = {"model": name, "images": len(data), "device": str(bundle.device),
              "torch_threads": torch.get_num_threads(),
              "load_average": round(os.getloadavg()[0], 1),
              "parameters_m": round(sum(p.numel() for p in bundle.model.parameters()) / 1e6, 1)}

    pixels = bundle.pixels(jpegs[:64])
    tokens = bundle.tokenize(captions[:64])
    with torch.inference_mode():
        bundle.model.get_image_features(pixel_values=pixels)  # warm up
        bundle.model.get_text_features(**tokens)
        t0, done = time.perf_counter(), 0
        while done < len(data):
            bundle.model.get_image_features(pixel_values=pixels)
            bundle.model.get_text_features(**tokens)
            done += len(pixels)
        result["forward_only_img_s"] = round(done / (time.perf_counter() - t0), 1)

    t0 = time.perf_counter()
    (bundle.embed_images(jpegs, 64) * bundle.embed_texts(captions, 64)).sum(1)
    result["bundle_img_s"] = round(len(data) / (time.perf_counter() - t0), 1)

    shards = os.path.join(args.workdir, f"shards-{name}")
    shutil.rmtree(shards, ignore_errors=True)
    write_shards(shards, data, args.shards)
    out = os.path.join(args.workdir, f"out-{name}")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    run = curate(CurateConfig(input=shards, output=out, steps=[{"step": "clip_score", "model": folder}],
                              quiet=True, report=False))
    wall = time.perf_counter() - t0
    assert run.ok and run.stats["output"]["samples"] == len(data)
    step_s = next(s for s in run.stats["steps"] if s["step"] == "clip_score")["seconds"]
    result |= {"curate_wall_s": round(wall, 2), "curate_img_s": round(len(data) / wall, 1),
               "curate_step_s_summed": round(step_s, 2)}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-tiny", type=int, default=2000)
    parser.add_argument("--n-base", type=int, default=192)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--workdir", default=os.path.join(REPO, ".bench", "clip-score"))
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    results = []
    for name, n in (("tiny", args.n_tiny), ("base", args.n_base)):
        results.append(measure(name, MODELS[name], images(n), args))
        print(json.dumps(results[-1]), flush=True)
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print("\n| model | params | images | forward only | bundle (decode+preprocess+forward) | curate clip_score |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['model']} | {r['parameters_m']} M | {r['images']} | {r['forward_only_img_s']} img/s | "
              f"{r['bundle_img_s']} img/s | {r['curate_img_s']} img/s ({r['curate_wall_s']} s wall) |")


if __name__ == "__main__":
    main()
