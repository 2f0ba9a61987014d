"""The model side of serving: prompts to tokens, batched generation, embeddings, LoRA adapters.

Nothing here knows about HTTP or Ray: `TextEngine` wraps a Hugging Face causal LM and its tokenizer
and is called from the replica (and, in the benchmark, directly).

- Generation is transformers' `generate` over a left-padded batch, greedy at the token level, with
  two hooks doing the per-request parts: `RowSampler` (a logits processor) draws each row's token
  with the row's own temperature, top_p and `torch.Generator` (so a seed reproduces a completion
  whatever else shares the batch), and `RowStops` (a stopping criterion) ends each row at its own
  max_tokens, stop strings or end-of-text, and hands its new text to a streaming sink.
- A row fails alone: an error in its own sampling or stopping ends that row (`Generation.error`) while
  the batch goes on, and a batch that fails as a whole is run again row by row, so only the row that
  breaks the model call fails. Sampling runs in float64; a temperature below `GREEDY_BELOW` is greedy,
  and scores that are not finite give the most likely token.
- Chat prompts use the tokenizer's chat template when it has one; otherwise a plain one:
  one `role: content` line per message, then `assistant:` (`plain_chat_prompt`).
- Embeddings of a causal LM: the last hidden state, mean-pooled over the input's tokens and
  L2-normalised.
- Adapters are peft LoRA folders loaded onto the one base model under a name each; the rows of a
  batch may use different adapters (peft's `adapter_names`).

`ClipEngine` wraps a CLIP model (`pipelines.train.clip_model.ClipBundle`) instead: it embeds captions and
images into one space and generates nothing.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
# Below this temperature a row is greedy: softmax(scores / t) is then one-hot up to float precision anyway,
# and dividing by a denormal (1e-300, 1e-45) overflows to inf.
GREEDY_BELOW = 1e-5
# Characters at the end of the decoded text that can still change as tokens come (a multi-byte character
# completed, a tokenizer's clean-up of spaces): stop strings are searched again over them.
_UNSTABLE_TAIL = 8


class AdapterError(Exception):
    """An adapter that cannot be used with this model (wrong base, not a LoRA folder, peft missing)."""


@dataclass(eq=False)
class Generation:
    """One completion to produce: the request's side (prompt, sampling), then the result."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None
    adapter: str | None = None  # a name given to TextEngine.load_adapter
    sink: Callable[[str | None], None] | None = None  # streaming: new text as it comes, then None
    cancelled: bool = False  # set when the client went away: the row stops at its next token
    # results
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" or "length"
    error: Exception | None = None  # why this row (and only it) failed
    _sent: int = 0  # characters of `text` handed to the sink
    _searched: int = 0  # characters of `text` searched for stop strings

    def __post_init__(self) -> None:
        self.stop = [s for s in self.stop if s]  # "" would stop every row at once

    def step(self, token: int, tokenizer: PreTrainedTokenizerBase, eos: int | None) -> bool:
        """Take one generated token; return True when the row is done."""
        if self.cancelled:
            self.finish_reason = self.finish_reason or "stop"
            return True
        self.token_ids.append(token)
        if token == eos:
            self.finish_reason = "stop"
            return True
        text = tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cut = self._find_stop(text)
        if cut >= 0:
            self.text, self.finish_reason = text[:cut], "stop"
        elif len(self.token_ids) >= self.max_tokens:
            self.text, self.finish_reason = text, "length"
        else:
            self.text = text
        if self.sink is not None:
            self._flush(done=self.finish_reason is not None)
        return self.finish_reason is not None

    def _find_stop(self, text: str) -> int:
        """Where the first stop string starts in `text`, or -1. Only the part that is new since the last
        token (plus a stop string's length and the unstable tail) is searched: linear in the text overall."""
        if not self.stop:
            return -1
        start = max(0, min(self._searched, len(text)) - max(map(len, self.stop)) - _UNSTABLE_TAIL)
        self._searched = len(text)
        return min((i for s in self.stop if (i := text.find(s, start)) >= 0), default=-1)

    def _held(self) -> int:
        """How many characters at the end of the text could be the start of a stop string (held back)."""
        held = 0
        for s in self.stop:
            # The longest end of the text that s starts with: try each place of s[0] among its last len(s)-1.
            i = self.text.find(s[0], max(0, len(self.text) - len(s) + 1))
            while i >= 0 and len(self.text) - i > held:
                if s.startswith(self.text[i:]):
                    held = len(self.text) - i
                    break
                i = self.text.find(s[0], i + 1)
        return held

    def _flush(self, done: bool) -> None:
        """Send the text that can no longer change: not a half-decoded character, not a stop string's start."""
        end = len(self.text)
        if not done:
            if self.text.endswith("\ufffd"):  # a multi-byte character cut between tokens
                end = len(self.text.rstrip("\ufffd"))
            end = min(end, len(self.text) - self._held())
        if end > self._sent:
            assert self.sink is not None
            self.sink(self.text[self._sent:end])
            self._sent = end


class RowSampler(LogitsProcessor):
    """Draw each row's next token by its own temperature / top_p / generator; greedy at temperature 0.

    `generate` runs greedy (argmax), so a sampled row's scores are made -inf everywhere but the token
    drawn here.
    """

    def __init__(self, rows: Sequence[Generation]):
        self.rows = rows
        self.generators = [_generator(r.seed) if r.temperature >= GREEDY_BELOW else None for r in rows]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i, (row, gen) in enumerate(zip(self.rows, self.generators)):
            if gen is None or row.finish_reason is not None or row.error is not None:
                continue
            try:
                token = draw(scores[i], row.temperature, row.top_p, gen)
            except Exception as e:  # this row's failure: its batch-mates go on
                row.error = e
                continue
            picked = torch.full_like(scores[i], float("-inf"))
            picked[token] = 0.0
            scores[i] = picked
        return scores


def draw(scores: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """A token from softmax(scores / temperature) cut to the top_p mass (at least the top token), in
    float64; the most likely token when the scores are not finite (a model that overflowed)."""
    logits = torch.nan_to_num(scores.double(), nan=float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
        return int(logits.argmax())
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > top_p  # keeps at least the top token
        probs[order[outside]] = 0.0
    return int(torch.multinomial(probs, 1, generator=generator))


class RowStops(StoppingCriteria):
    """Feed each new token to its row; a row is done at its own limit (the others go on)."""

    def __init__(self, rows: Sequence[Generation], tokenizer: PreTrainedTokenizerBase, eos: int | None):
        self.rows, self.tokenizer, self.eos = rows, tokenizer, eos

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        done = torch.ones(len(self.rows), dtype=torch.bool, device=input_ids.device)
        last = input_ids[:, -1].tolist()
        for i, row in enumerate(self.rows):
            if row.finish_reason is not None or row.error is not None:
                continue
            try:
                done[i] = row.step(last[i], self.tokenizer, self.eos)
            except Exception as e:  # this row's failure: its batch-mates go on
                row.error = e
        return done


class TextEngine:
    """A registered model and its tokenizer, ready to generate and embed."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, version: int):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name, self.version = name, version
        self.load_id = uuid.uuid4().hex[:12]  # tells two loads of one version apart
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or tokenizer.model_max_length)
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.peft: Any = None  # the PeftModel wrapping `model` once an adapter is loaded
        self.adapters: set[str] = set()
        # One model call at a time: CPU threads are shared anyway, and adapters must not change
        # under a running batch.
        self._lock = threading.Lock()

    @property
    def label(self) -> str:
        return f"{self.name}/v{self.version}"

    # -- prompts -------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a conversation, ready for the assistant's turn."""
        if self.has_chat_template:
            ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in transformers 5
                ids = ids["input_ids"]
            return list(ids)
        return self.encode(plain_chat_prompt(messages))

    # -- generation ----------------------------------------------------------------------------
    def generate(self, rows: Sequence[Generation]) -> None:
        """Generate every row (its text, tokens and finish reason are filled in place). A row that fails
        gets its `error`; the others finish. Only `AdapterError` (adapters not loaded) is raised."""
        try:
            with self._lock, torch.inference_mode():
                try:
                    self._generate(rows)
                except AdapterError:
                    raise
                except Exception as e:
                    if len(rows) == 1:
                        rows[0].error = e
                    else:  # run each unfinished row alone: the one that broke the batch fails alone
                        log.warning("a batch of %d rows failed (%s: %s); running them one by one", len(rows),
                                    type(e).__name__, e)
                        for row in rows:
                            self._generate_alone(row)
        finally:
            for row in rows:
                if row.finish_reason is None and row.error is None:
                    row.finish_reason = "length"
                if row.sink is not None:
                    if row.error is None:
                        row._flush(done=True)
                    row.sink(None)

    def _generate_alone(self, row: Generation) -> None:
        if row.finish_reason is not None or row.error is not None:
            return
        if row._sent:  # part of it is streamed already: a rerun would not continue it
            row.error = RuntimeError("generation failed after part of the text was sent")
            return
        row.token_ids, row.text, row._searched = [], "", 0
        try:
            self._generate([row])
        except Exception as e:
            row.error = e

    def _generate(self, rows: Sequence[Generation]) -> None:
        width = max(len(r.prompt_ids) for r in rows)
        input_ids = torch.tensor([[self.pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows])
        attention_mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows])
        config = GenerationConfig(do_sample=False, max_new_tokens=max(r.max_tokens for r in rows),
                                  pad_token_id=self.pad, eos_token_id=self.eos,
                                  bos_token_id=self.tokenizer.bos_token_id)
        model, extra = self._model_for([r.adapter for r in rows])
        model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                       logits_processor=LogitsProcessorList([RowSampler(rows)]),
                       stopping_criteria=StoppingCriteriaList([RowStops(rows, self.tokenizer, self.eos)]), **extra)

    # -- embeddings ----------------------------------------------------------------------------
    def embed(self, inputs: Sequence[list[int]], adapter: str | None = None) -> torch.Tensor:
        """One L2-normalised vector per input: the mean of the last hidden state over its tokens."""
        width = max(len(ids) for ids in inputs)
        input_ids = torch.tensor([ids + [self.pad] * (width - len(ids)) for ids in inputs])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in inputs])
        with self._lock, torch.inference_mode():
            model, extra = self._model_for([adapter] * len(inputs))
            out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, **extra)
            hidden = out.hidden_states[-1]
            summed = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
            return torch.nn.functional.normalize(summed.float(), dim=-1)

    # -- adapters ------------------------------------------------------------------------------
    def load_adapter(self, name: str, folder: str | Path) -> None:
        """Load the peft LoRA folder under `name` (rows then pick it by `Generation.adapter`)."""
        try:
            from peft import PeftModel
        except ImportError:
            raise AdapterError("serving adapters needs peft (pip install peft)") from None
        with self._lock:
            if name in self.adapters:
                return
            try:
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name,
                                                          is_trainable=False)
                    self.peft.eval()
                else:
                    self.peft.load_adapter(str(folder), adapter_name=name, is_trainable=False)
            except (ValueError, OSError, KeyError, RuntimeError) as e:
                raise AdapterError(f"{folder}: cannot load as a LoRA adapter of {self.label} ({e})") from None
            self.adapters.add(name)

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name in self.adapters:
                self.adapters.discard(name)
                self.peft.delete_adapter(name)

    def _model_for(self, adapters: Sequence[str | None]) -> tuple[Any, dict[str, Any]]:
        """The model to call for rows using these adapters, and their names once peft wraps it."""
        missing = {a for a in adapters if a is not None} - self.adapters
        if missing:
            raise AdapterError(f"adapter(s) {sorted(missing)} not loaded on {self.label}")
        if self.peft is None:
            return self.model, {}
        # Once peft has injected its layers, the base model runs through them too: name the rows.
        return self.peft, {"adapter_names": [a or BASE for a in adapters]}


def plain_chat_prompt(messages: Sequence[dict[str, str]]) -> str:
    """The prompt of a conversation for a tokenizer without a chat template."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()  # fresh entropy per request
    else:
        gen.manual_seed(seed)
    return gen


class ClipEngine:
    """A registered CLIP model, ready to embed captions and images (L2-normalised, one shared space)."""

    def __init__(self, bundle: Any, name: str, version: int):
        self.bundle = bundle
        self.name, self.version = name, version
        self.load_id = uuid.uuid4().hex[:12]
        self.width = int(bundle.model.config.projection_dim)
        self._lock = threading.Lock()  # one model call at a time, as for TextEngine

    @property
    def label(self) -> str:
        return f"{self.name}/v{self.version}"

    def tokens(self, text: str) -> int:
        """Tokens of a caption as the model sees it (longer captions are cut at the model's length)."""
        return min(len(self.bundle.tokenizer(text)["input_ids"]) + 1, self.bundle.max_text_len)

    def embed(self, texts: Sequence[str], images: Sequence[Any]) -> tuple[Any, Any]:
        """(caption embeddings, image embeddings) as float32 numpy rows; images are PIL images."""
        with self._lock:
            return self.bundle.embed_texts(list(texts)), self.bundle.embed_images(list(images))
