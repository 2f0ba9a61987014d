"""A byte-level BPE tokenizer (GPT-2's scheme) trained on our own shards with the `tokenizers` library.

Byte-level: every text is first mapped to bytes, so any string encodes and decodes back exactly,
with no unknown token. One special token, `<|endoftext|>`, ends every document in the packed
training stream and serves as bos, eos, unk and pad. Saved with `save_pretrained`, so
`transformers.AutoTokenizer.from_pretrained(out_dir)` loads it like any Hub tokenizer.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from pipelines.errors import PipelineError

EOS = "<|endoftext|>"
# Chat turns as plain lines, each assistant turn ending in eos (so generation stops there); a
# prefix-stable template: rendering the first k messages gives a prefix of rendering k + 1.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
MIN_VOCAB = 257  # the 256 byte symbols and <|endoftext|>


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of at most `vocab_size` tokens on `texts`; save it to `out_dir` and return it."""
    if vocab_size < MIN_VOCAB:
        raise PipelineError(f"vocab_size {vocab_size}: must be at least {MIN_VOCAB} (256 bytes and {EOS})")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                                        pad_token=EOS)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """The tokenizer saved at `path` by `train_tokenizer` (or any fast tokenizer saved with save_pretrained)."""
    try:
        return PreTrainedTokenizerFast.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: cannot load a tokenizer ({type(exc).__name__}: {exc})") from exc
