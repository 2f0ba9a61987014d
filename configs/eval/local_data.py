"""Loads a task's jsonl from this folder, whatever the working directory: lm-evaluation-harness reads a task's
`dataset_kwargs.data_files` relative to the working directory, and a `custom_dataset` function beside the YAML is
what it resolves relative to the YAML instead (`custom_dataset: !function local_data.jsonl`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets


def jsonl(data_files: str, split: str = "test", **metadata: Any) -> datasets.DatasetDict:
    """The rows of `data_files` (a jsonl file, relative to this folder) as the task's `split`; the task's
    metadata (its version) comes along in `metadata`, unused. Read with json, not `datasets.load_dataset`: no
    cache folder is written and nothing asks the network."""
    path = Path(__file__).parent / data_files
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})
