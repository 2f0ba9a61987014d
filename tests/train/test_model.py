"""Model presets, FLOPs per token, activation checkpointing and the LR schedule."""

from __future__ import annotations

import math

import pytest
import torch

from pipelines.train.config import ModelConfig
from pipelines.train.model import build_model, count_parameters, flops_per_token, model_config
from pipelines.train.pretrain import lr_lambda


@pytest.mark.parametrize("preset, millions", [("125m", 125), ("350m", 355), ("1b", 1100)])
def test_presets_have_their_size(preset: str, millions: float) -> None:
    config = model_config(ModelConfig(preset=preset), 32000, 2048, 0, 0)
    with torch.device("meta"):
        model = build_model(config, seed=0)
    # GPT-3's 125M/350M count the embedding; ours add a 32k-token output head, so allow 15%.
    assert abs(count_parameters(model)["parameters"] / 1e6 - millions) / millions < 0.15


def test_flops_per_token_match_the_matmuls() -> None:
    """6 x (one multiply-add per matmul weight per token) + attention, counted by hand for a small model."""
    config = model_config(ModelConfig(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                                      intermediate_size=160), 500, 128, 0, 0)
    head_dim = 16
    per_layer = 64 * 64 * 2 + 64 * (2 * head_dim) * 2 + 3 * 64 * 160
    expected = 6 * (3 * per_layer + 64 * 500) + 12 * 3 * 64 * 128
    assert flops_per_token(config, 128) == expected


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    config = model_config(ModelConfig(hidden_size=64, intermediate_size=176), 300, 32, 0, 0)
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = build_model(config, seed=1, activation_checkpointing=checkpointing).train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


def test_same_seed_same_weights() -> None:
    config = model_config(ModelConfig(), 300, 32, 0, 0)
    a, b, c = build_model(config, seed=4), build_model(config, seed=4), build_model(config, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)


def test_warmup_then_cosine_to_the_floor() -> None:
    f = lr_lambda(warmup=10, total=110, min_ratio=0.1)
    assert [f(s) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 200)) and f(500) == pytest.approx(0.1)
    assert not math.isnan(lr_lambda(0, 1, 0.0)(0))
