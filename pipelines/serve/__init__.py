"""Serve stage: an OpenAI-compatible HTTP API for a registered model, on Ray Serve.

- `config.py`      ServeConfig (`pipelines serve` options)
- `engine.py`      the model side: batched generation, streaming, embeddings, LoRA adapters
- `openai_api.py`  the HTTP side: OpenAI request schemas and errors, keys and rate limits, routes
- `app.py`         the Ray Serve deployment, the config-file builder and `serve_model`, the entry
"""
