"""Decoder-only causal LMs built from a config (Llama-style, via transformers; no weights downloaded)."""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipelines.train.config import ModelConfig

# hidden, layers, heads, kv heads, MLP width. 125m/350m follow GPT-3's shapes (SwiGLU width ~8/3 x
# hidden, rounded to 256); 1b is Llama 3.2 1B's body.
PRESET_SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=352),
    "small": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6,
                  intermediate_size=1024),
    "125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                 intermediate_size=2048),
    "350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                 intermediate_size=2816),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192),
}


def model_config(cfg: ModelConfig, vocab_size: int, seq_len: int, bos: int, eos: int) -> LlamaConfig:
    shape = dict(PRESET_SHAPES[cfg.preset])
    for ours, theirs in (("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
                         ("num_heads", "num_attention_heads"), ("num_kv_heads", "num_key_value_heads"),
                         ("intermediate_size", "intermediate_size")):
        value = getattr(cfg, ours)
        if value is not None:
            shape[theirs] = value
            if ours == "num_heads" and cfg.num_kv_heads is None:
                shape["num_key_value_heads"] = value
    return LlamaConfig(vocab_size=vocab_size, max_position_embeddings=seq_len, bos_token_id=bos,
                       eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=cfg.preset in ("tiny", "small"),
                       attn_implementation="sdpa", use_cache=False, **shape)


def build_model(config: LlamaConfig, seed: int, activation_checkpointing: bool = False) -> LlamaForCausalLM:
    """A freshly initialised model: the same seed gives the same weights on every rank and machine."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x the matmul parameters, plus attention's scores and values
    (PaLM's appendix B formula, 6N + 12 L H Q T with H Q = hidden)."""
    h, layers, v = config.hidden_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * config.intermediate_size  # q, o, k, v; gate, up, down
    matmul_params = layers * per_layer + h * v  # the output head; the embedding lookup is free
    return 6 * matmul_params + 12 * layers * h * seq_len


# Dense peak TFLOPS by device name, for MFU: bf16 tensor cores (NVIDIA data sheets, without sparsity).
PEAK_TFLOPS_BF16 = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak FLOP/s from its data sheet (known NVIDIA GPUs, dense, no sparsity; fp32 counted at half the
    bf16 tensor-core rate), or None. A CPU has no figure to divide by that makes MFU a true utilisation: a matmul
    timed at start-up reads low under other load or fewer threads and gave MFU above 100%, so there MFU is left
    out and the achieved FLOP/s are reported instead."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS_BF16.items():
        if key in name:
            return tflops * 1e12 * (1.0 if dtype == torch.bfloat16 else 0.5)
    return None


def count_parameters(model: torch.nn.Module) -> dict[str, Any]:
    total = sum(p.numel() for p in model.parameters())
    return {"parameters": total, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
