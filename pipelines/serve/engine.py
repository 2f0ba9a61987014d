"""The model side of serving: prompts to tokens, batched generation, embeddings, LoRA adapters.

Nothing here knows about HTTP or Ray: `TextEngine` wraps a Hugging Face causal LM and its tokenizer
and is called from the replica (and, in the benchmark, directly).

- Generation is transformers' `generate` over a left-padded batch, greedy at the token level, with
  two hooks doing the per-request parts: `RowSampler` (a logits processor) picks each row's token
  (`next_token`: the row's presence/frequency penalties and logit bias, then its own temperature, top_p
  and `torch.Generator`, so a seed reproduces a completion whatever else shares the batch), and
  `RowStops` (a stopping criterion) ends each row at its own max_tokens, stop strings or end-of-text,
  and hands its new text to a streaming sink.
- Log-probabilities are the model's own (log-softmax of its logits, before penalties, bias and
  temperature, as vLLM reports them by default): per generated token when a row asks (`logprobs`: the
  k most likely beside the chosen one), and per prompt token (`prompt_logprobs`: one forward pass over
  the prompt, the first token has none). A row that scores its prompt and generates at most one token
  takes that token from the same forward pass (what lm-evaluation-harness asks for: no second prefill).
  The engine returns token ids and these numbers; the API formats them.
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

import functools
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

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


class RequestRefused(Exception):
    """The engine refused a request: for something in it (a JSON schema that does not compile; an HTTP status of
    the 4xx family and the field at fault), or for now (503: a part it needs failed; retry)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


class TokenLogprobs(NamedTuple):
    """A token's log-probability under the model, and the `k` most likely tokens at its place."""

    token: int
    logprob: float
    top: list[tuple[int, float]]  # (token, logprob), most likely first


@dataclass(eq=False)
class Generation:
    """One completion to produce: the request's side (prompt, sampling), then the result."""

    prompt_ids: list[int]
    max_tokens: int  # 0: score the prompt only (with prompt_logprobs)
    temperature: float = 1.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None
    adapter: str | None = None  # a name given to TextEngine.load_adapter
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated at least once
    frequency_penalty: float = 0.0  # subtracted from a token's logit once per time it was generated
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to these tokens' logits
    logprobs: int | None = None  # per generated token: its logprob and the k most likely; None: nothing
    prompt_logprobs: int | None = None  # the same for each prompt token after the first; None: nothing
    json_schema: dict[str, Any] | None = None  # guided decoding (vLLM engine only): output valid for this schema
    json_object: bool = False  # guided decoding (vLLM engine only): output is a JSON object
    sink: Callable[[str | None], None] | None = None  # streaming: new text as it comes, then None
    cancelled: bool = False  # set when the client went away: the row stops at its next token
    # results
    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token_ids, with `logprobs`
    prompt_token_logprobs: list[TokenLogprobs | None] = field(default_factory=list)  # [None, ...] per prompt token
    text: str = ""
    finish_reason: str | None = None  # "stop" or "length"
    error: Exception | None = None  # why this row (and only it) failed
    _sent: int = 0  # characters of `text` handed to the sink
    _searched: int = 0  # characters of `text` searched for stop strings

    def __post_init__(self) -> None:
        self.stop = [s for s in self.stop if s]  # "" would stop every row at once

    @property
    def adjusts(self) -> bool:
        """Whether the row's logits are changed before its token is chosen (penalties, bias)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """OpenAI's penalties and bias on a row's logits: logit[j] - count[j] * frequency_penalty -
        (count[j] > 0) * presence_penalty + logit_bias[j], count[j] the times j was generated so far."""
        logits = logits.clone()
        if (self.presence_penalty or self.frequency_penalty) and self.token_ids:
            counts = torch.bincount(torch.tensor(self.token_ids), minlength=logits.shape[-1])[:logits.shape[-1]]
            logits -= counts.to(logits.dtype) * self.frequency_penalty + (counts > 0).to(logits.dtype) * \
                self.presence_penalty
        if self.logit_bias:
            ids = torch.tensor(list(self.logit_bias))
            logits[ids] += torch.tensor(list(self.logit_bias.values()), dtype=logits.dtype)
        return logits

    def _reset(self) -> None:
        """Forget a failed attempt's results (before running the row again)."""
        self.token_ids, self.token_logprobs, self.prompt_token_logprobs = [], [], []
        self.text, self._searched = "", 0

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
    """Pick each row's next token (`next_token`).

    `generate` runs greedy (argmax), so a row whose token is picked here gets scores of -inf everywhere but
    that token; a plain greedy row (no penalties, bias or logprobs) is left to the argmax.
    """

    def __init__(self, rows: Sequence[Generation]):
        self.rows = rows
        self.generators = [sampler(r) for r in rows]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i, (row, gen) in enumerate(zip(self.rows, self.generators)):
            if row.finish_reason is not None or row.error is not None:
                continue
            if gen is None and not row.adjusts and row.logprobs is None:
                continue
            try:
                token = next_token(row, scores[i], gen)
            except Exception as e:  # this row's failure: its batch-mates go on
                row.error = e
                continue
            picked = torch.full_like(scores[i], float("-inf"))
            picked[token] = 0.0
            scores[i] = picked
        return scores


def sampler(row: Generation) -> torch.Generator | None:
    """The generator a sampled row draws from (seeded by its seed); None for a greedy row."""
    return _generator(row.seed) if row.temperature >= GREEDY_BELOW else None


def next_token(row: Generation, scores: torch.Tensor, generator: torch.Generator | None) -> int:
    """The row's next token from the model's scores (one row): penalties and bias applied, then drawn with
    `generator` or, without one, the most likely; its logprob (before any of that) recorded when asked."""
    adjusted = row.adjust(scores) if row.adjusts else scores
    if generator is None:
        token = int(torch.nan_to_num(adjusted.double(), nan=float("-inf")).argmax())
    else:
        token = draw(adjusted, row.temperature, row.top_p, generator)
    if row.logprobs is not None:
        row.token_logprobs.append(scored(torch.log_softmax(scores.float(), dim=-1), token, row.logprobs))
    return token


def scored(logprobs: torch.Tensor, token: int, k: int) -> TokenLogprobs:
    """`token`'s entry of one position's log-probabilities, with the k most likely tokens."""
    top = logprobs.topk(k) if k else None
    return TokenLogprobs(token, float(logprobs[token]),
                         list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else [])


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

    guided_decoding = False  # JSON schema / JSON object outputs (response_format): the vLLM engine's

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
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def chat_prompt(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True,
                    continue_final_message: bool = False, add_special_tokens: bool = False) -> list[int]:
        """Token ids of a conversation, ready for the assistant's turn (or without it, or with the last message
        left open to be continued); `add_special_tokens` adds the tokenizer's (BOS...) on top of the template's."""
        if not self.has_chat_template:
            text = plain_chat_prompt(messages, add_generation_prompt, continue_final_message)
            return self.encode(text, add_special_tokens)
        if not add_special_tokens and not continue_final_message:
            ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                                     tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in transformers 5
                ids = ids["input_ids"]
            return list(ids)
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=continue_final_message, tokenize=False)
        return self.encode(text, add_special_tokens)

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
                del row.token_logprobs[len(row.token_ids):]  # a token picked, then not taken (cancelled)
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
        row._reset()
        try:
            self._generate([row])
        except Exception as e:
            row.error = e

    def _generate(self, rows: Sequence[Generation]) -> None:
        scoring = [r for r in rows if r.prompt_logprobs is not None]
        for batch in _batches(scoring, self._score_batch_elements):
            self._score(batch)
        rows = [r for r in rows if r.max_tokens > 0 and r.finish_reason is None and r.error is None]
        if not rows:
            return
        width = max(len(r.prompt_ids) for r in rows)
        input_ids = torch.tensor([[self.pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows])
        attention_mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows])
        # Neutral values, not the model's generation_config defaults: the rows' own settings are all there is.
        config = GenerationConfig(do_sample=False, max_new_tokens=max(r.max_tokens for r in rows),
                                  pad_token_id=self.pad, eos_token_id=self.eos,
                                  bos_token_id=self.tokenizer.bos_token_id, repetition_penalty=1.0,
                                  no_repeat_ngram_size=0)
        model, extra = self._model_for([r.adapter for r in rows])
        model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                       logits_processor=LogitsProcessorList([RowSampler(rows)]),
                       stopping_criteria=StoppingCriteriaList([RowStops(rows, self.tokenizer, self.eos)]), **extra)

    def _score(self, rows: Sequence[Generation]) -> None:
        """Each row's prompt logprobs from one forward pass over the right-padded prompts; a row that
        generates a single token takes it from the same pass (the last position's scores)."""
        width = max(len(r.prompt_ids) for r in rows)
        input_ids = torch.tensor([r.prompt_ids + [self.pad] * (width - len(r.prompt_ids)) for r in rows])
        mask = torch.tensor([[1] * len(r.prompt_ids) + [0] * (width - len(r.prompt_ids)) for r in rows])
        model, extra = self._model_for([r.adapter for r in rows])
        logits = model(input_ids=input_ids, attention_mask=mask, **extra).logits
        for i, row in enumerate(rows):
            n = len(row.prompt_ids)
            logprobs = torch.log_softmax(logits[i, :n - 1].float(), dim=-1)
            k = row.prompt_logprobs or 0
            chosen = logprobs.gather(1, input_ids[i, 1:n, None])[:, 0].tolist()
            top = logprobs.topk(k, dim=-1) if k else None
            row.prompt_token_logprobs = [None, *(
                TokenLogprobs(t, p, list(zip(top.indices[j].tolist(), top.values[j].tolist())) if top is not None
                              else []) for j, (t, p) in enumerate(zip(row.prompt_ids[1:], chosen)))]
            if row.max_tokens == 1 and not row.cancelled:
                row.step(next_token(row, logits[i, n - 1].float(), sampler(row)), self.tokenizer, self.eos)

    @property
    def _score_batch_elements(self) -> int:
        """How many logits (rows x positions x vocabulary) one scoring pass may hold: 2**28 floats, 1 GiB."""
        return 2**28 // max(1, int(self.model.config.get_text_config().vocab_size))

    # -- tokens as text --------------------------------------------------------------------------
    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each token decoded alone (special tokens as their text), as vLLM shows them in logprobs."""
        return self.tokenizer.batch_decode([[t] for t in ids], skip_special_tokens=False,
                                           clean_up_tokenization_spaces=False)

    def token_bytes(self, ids: Sequence[int]) -> list[list[int]]:
        """Each token's own UTF-8 bytes: exact for byte-level BPE (a token may hold part of a character),
        else its decoded text's bytes."""
        decoder = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "decoder", None)
        if type(decoder).__name__ != "ByteLevel":
            return [list(text.encode()) for text in self.token_texts(ids)]
        table, added = _byte_level_table(), self.tokenizer.added_tokens_decoder  # added tokens: their own text
        return [list(added[t].content.encode()) if t in added else
                [b for c in piece or "" for b in ([table[c]] if c in table else c.encode())]
                for t, piece in zip(ids, self.tokenizer.convert_ids_to_tokens(list(ids)))]

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


def _batches(rows: Sequence[Generation], elements: int) -> list[list[Generation]]:
    """Rows in groups whose padded width times their number stays within `elements` (at least one row each)."""
    out: list[list[Generation]] = []
    for row in sorted(rows, key=lambda r: len(r.prompt_ids)):
        if out and (len(out[-1]) + 1) * len(row.prompt_ids) <= elements:
            out[-1].append(row)
        else:
            out.append([row])
    return out


@functools.cache
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character that stands for each byte, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def plain_chat_prompt(messages: Sequence[dict[str, str]], add_generation_prompt: bool = True,
                      continue_final_message: bool = False) -> str:
    """The prompt of a conversation for a tokenizer without a chat template: a `role: content` line per
    message (`role (name): content` for a named speaker), then `assistant:`; or, continuing, the last
    message without its line end."""
    text = "".join(f"{m['role']}{f' ({n})' if (n := m.get('name')) else ''}: {m['content']}\n" for m in messages)
    if continue_final_message:
        return text.removesuffix("\n")
    return text + "assistant:" if add_generation_prompt else text


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
