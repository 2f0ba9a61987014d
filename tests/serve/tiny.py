"""The tiny models of the serving tests and benchmark: a 2-layer Llama and a byte-level BPE trained here, and an
untrained text-to-image pipeline."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
CORPUS = ["the quick brown fox jumps over the lazy dog", "a model reads the shards and learns the words",
          "hello world, tiny models generate tiny text"]
CONTEXT = 64


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS, bos_token=EOS)


def tiny_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        # one head of 32: vLLM's CPU attention takes head sizes of 32 and up
        num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=CONTEXT,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def tiny_diffusion(folder: Path, seed: int = 0, preset: str = "tiny") -> Path:
    """An untrained tiny text-to-image model saved as a diffusers StableDiffusionPipeline folder (what
    `pipelines pretrain --kind diffusion` exports): the `tiny` UNet preset (or `preset`) on 16x16x4 latents,
    the tiny autoencoder (32x32 images), a one-layer CLIP text tower over the drawn shapes' words. `seed`
    picks the UNet's weights; return the folder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipelines.train.diffusion import DiffusionModelConfig, ObjectiveConfig, build_unet, make_pipeline
    from tests.tiny_autoencoder import tiny_vae
    from tests.tiny_clip import tokenizer

    words = tokenizer()
    words.model_max_length = 8
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()
    unet = build_unet(DiffusionModelConfig(preset=preset), 4, 16, text.config.hidden_size, seed=seed)
    make_pipeline(unet, tiny_vae(0).eval(), text, words, ObjectiveConfig()).save_pretrained(folder)
    return folder
