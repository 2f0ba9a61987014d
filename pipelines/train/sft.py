"""Instruction data for fine-tuning: jsonl examples -> shards -> (input ids, labels) rows.

An example is `{"prompt": ..., "response": ...}` or `{"messages": [{"role", "content"}, ...]}`. A jsonl
file is first written as shards by `pipelines crawl text` (the rendered chat as `KEY.txt`, the
messages in `KEY.json`), so fine-tuning data streams, resumes and has lineage like pretraining data.

Rows are rendered with the tokenizer's chat template (ours, `CHAT_TEMPLATE`, when it has none) and
trained on the assistant turns only: every other token's label is -100. One example per row,
truncated to `seq_len` and padded after its end (padding is never attended to by earlier tokens in a
causal model, and its labels are -100).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterator

import numpy as np

from pipelines.errors import PipelineError
from pipelines.runtime import filesystem
from pipelines.shards import MANIFEST, ShardOutput, absolute
from pipelines.train.data import Cursor, ShardSet, TokenStream, iter_texts, open_shards, read_texts
from pipelines.train.tokenizer import CHAT_TEMPLATE, load_tokenizer

IGNORE = -100
ROLES = ("system", "user", "assistant")


def messages_of(example: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The example's conversation; PipelineError naming `where` (file and line) when it has none."""
    if "messages" in example:
        messages = example["messages"]
        if not isinstance(messages, list) or not messages:
            raise PipelineError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise PipelineError(f"{where}: messages[{i}] must be {{'role': one of {ROLES}, 'content': text}}")
        if not any(m["role"] == "assistant" for m in messages):
            raise PipelineError(f"{where}: no assistant message to learn from")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    prompt, response = example.get("prompt"), example.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise PipelineError(f"{where}: needs 'prompt' and 'response' (text) or 'messages'")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def chat_template(tokenizer: Any) -> str:
    return tokenizer.chat_template or CHAT_TEMPLATE


def encode_example(tokenizer: Any, messages: list[dict[str, str]], seq_len: int) -> np.ndarray | None:
    """A `[2, seq_len]` row: input ids, and labels that are the ids on assistant turns and -100
    elsewhere. None when truncation leaves no assistant token to learn from."""
    template = chat_template(tokenizer)

    def render(upto: int, generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(messages[:upto], chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    segments: list[tuple[str, bool]] = []  # (text, trained on)
    done = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = render(i, True)
            full = render(i + 1)
            segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        else:
            full = render(i + 1)
            segments.append((full[len(done):], False))
        done = full
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    ids, labels = ids[:seq_len], labels[:seq_len]
    if all(label == IGNORE for label in labels):
        return None
    pad = seq_len - len(ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return np.array([ids + [pad_id] * pad, labels + [IGNORE] * pad], dtype=np.int64)


def _rows(docs: Iterator[tuple[Cursor, str]], tokenizer: Any, seq_len: int) -> Iterator[tuple[np.ndarray, Cursor]]:
    for cursor, meta in docs:
        row = encode_example(tokenizer, json.loads(meta)["messages"], seq_len)
        if row is not None:
            yield row, cursor


class ExampleStream(TokenStream):
    """`TokenStream` over instruction shards: micro-batches of `[micro_batch, 2, seq_len]` (ids, labels),
    one example per row; same split, shuffle, endless epochs and exact resume."""

    member = "json"

    def _sequences(self, docs: Iterator[tuple[Cursor, str]], tokenizer: Any,
                   skip: int) -> Iterator[tuple[np.ndarray, Cursor]]:
        return _rows(docs, tokenizer, self.seq_len)


def heldout_examples(shards: ShardSet, tokenizer_dir: str, *, seq_len: int, max_examples: int,
                     heldout_percent: float) -> list[np.ndarray]:
    """The held-out examples' `[2, seq_len]` rows, in order, at most `max_examples`; the same on every call."""
    tokenizer = load_tokenizer(tokenizer_dir)
    rows: list[np.ndarray] = []
    if max_examples <= 0:
        return rows
    for _, meta in iter_texts(shards, heldout_percent, "heldout", member="json"):
        row = encode_example(tokenizer, json.loads(meta)["messages"], seq_len)
        if row is not None:
            rows.append(row)
            if len(rows) == max_examples:
                break
    return rows


def check_example_shards(shards: ShardSet) -> None:
    """Instruction shards carry `messages` in every sample's json: check the first one."""
    for url in shards.tars:
        samples = read_texts(url, "json")
        if samples:
            if "messages" not in json.loads(samples[0][1]):
                raise PipelineError(f"{shards.url}: its samples have no 'messages': not instruction data "
                                    "(give a jsonl of prompt/response or messages, or shards made from one)")
            return


def prepare_examples(data: str, storage: str, quiet: bool = True) -> ShardSet:
    """Instruction shards for `data` (a local path or fsspec URL): a shard folder as is, or a jsonl file
    written as shards once (under `{storage}/datasets/{sha256 of the file}`; the same file is not
    converted again)."""
    from pipelines.ingest.text import TextCrawlConfig, crawl_text

    fs, path = filesystem(data)
    if fs.isdir(path):
        shards = open_shards(data)
        check_example_shards(shards)
        return shards
    if not fs.isfile(path):
        raise PipelineError(f"{data}: no such file or shard folder")
    digest = hashlib.sha256(fs.cat_file(path)).hexdigest()
    out = f"{storage}/datasets/{digest[:16]}"
    rows = []
    with fs.open(path, "r", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PipelineError(f"{data}:{n}: not JSON ({exc.msg})") from None
            if not isinstance(example, dict):
                raise PipelineError(f"{data}:{n}: must be a JSON object")
            messages = messages_of(example, f"{data}:{n}")
            text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
            rows.append({"id": str(example.get("id", n)), "text": text, "messages": messages})
    if not rows:
        raise PipelineError(f"{data}: no examples")
    staged = f"{out}.jsonl"  # the crawl's input, kept beside its shards
    staged_fs, staged_path = filesystem(staged)
    staged_fs.makedirs(staged_path.rsplit("/", 1)[0], exist_ok=True)
    staged_fs.pipe_file(staged_path, "".join(json.dumps(r) + "\n" for r in rows).encode())
    result = crawl_text(TextCrawlConfig(input=staged, output=out, shard_size=1000, quiet=quiet))
    # The crawl's input is the staged file; `pipelines lineage` names the file the user gave too.
    manifest = {**result.manifest, "converted_from": {"path": absolute(data), "sha256": digest}}
    ShardOutput(out).write_bytes(MANIFEST, json.dumps(manifest, indent=2).encode())
    return open_shards(out)
