"""Evaluate stage: lm-evaluation-harness against a registered language model, its scores in MLflow.

- `config.py`  EvalConfig (`pipelines eval` options)
- `run.py`     `evaluate`, the entry: tasks, endpoint, the harness, the MLflow record, the gate
"""
