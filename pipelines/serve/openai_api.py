"""The OpenAI-compatible HTTP API: request schemas, errors, auth, rate limits and the routes.

`build_api(server)` returns a FastAPI app whose routes call a `ModelServer` (the Ray Serve replica;
the benchmark also mounts it on plain uvicorn). A server may serve several base models: each request's
`model` picks one. Routes:

- `GET  /v1/models`            every base model, and `NAME:ADAPTER` for each adapter of that base
- `GET  /v1/models/{id}`       one of them (404 if not served)
- `POST /v1/completions`       prompt (text, texts or token ids) -> text; `stream: true` for SSE; `logprobs`
                               (0-5 most likely per token), `echo` (with logprobs: the prompt's, the first null),
                               `max_tokens: 0` with echo (score the prompt only), `n`, `best_of`, penalties,
                               `logit_bias`
- `POST /v1/chat/completions`  messages -> the assistant's reply; `stream: true` for SSE; `logprobs` with
                               `top_logprobs` (0-20), `n`, penalties, `logit_bias`
- `POST /tokenize`             vLLM's: a prompt or messages -> token ids (`model` optional: the first served)
- `POST /detokenize`           vLLM's: token ids -> text
- `GET  /tokenizer_info`       vLLM's: the tokenizer's settings, special tokens and chat template
- `POST /v1/embeddings`        text(s) -> L2-normalised vectors (`encoding_format` float or base64); a CLIP
                               model also embeds images: `input: [{"image": BASE64 or data: URL}, "text", ...]`
- `POST /v1/similarity`        CLIP models: `{images: [...], texts: [...]}` -> the image x text cosine matrix
- `POST /v1/images/generations` diffusion models: OpenAI's Images API, PNGs as `b64_json`, at the model's native
                               size; extra fields `seed`, `num_inference_steps`, `guidance_scale`, `negative_prompt`
- `GET  /healthz`              the model version being served (no key needed): the first model's, and with
                               several models each one's under `models`
- `POST /admin/reload`         check the registry now for moved aliases (the replica that gets it)
- `GET  /openapi.json`         the OpenAPI document of all of these (no key needed)

Every error has OpenAI's body, `{"error": {"message", "type", "param", "code"}}`: malformed JSON 400,
a field of the wrong type or out of its range (NaN and infinities included, a seed outside
[-2**63, 2**64-1], text with a lone surrogate) 400 on every route (as OpenAI and vLLM answer; never
FastAPI's 422), an unknown model 404, a prompt longer than the context (or max_tokens
past it or past the server's limit) 400, a missing or wrong key 401, over the rate limit 429 with
Retry-After. A model asked for what its kind does not serve (completions of a CLIP or diffusion model,
images of an LM or CLIP model, similarity of anything but CLIP) gets a 400 naming its kind, as does an
image that does not decode. Nothing asked for is silently dropped: on the language model's routes an
unknown field is a 400 naming it (`unknown_parameter`), and OpenAI's fields this server does not implement
(`tools`, `response_format` json_object / json_schema on the transformers engine, `suffix`, `audio`...,
`CHAT_FIELDS_ALLOWED`) get a
400 naming the field unless set to what the server does anyway (`tools: []`, `tool_choice: "none"`); so do
OpenAI's image fields (`style`, `quality: "hd"`, `output_format: "jpeg"`...), while the other routes ignore
unknown fields. A client that leaves before its images are drawn stops them (`_unless_client_leaves`).

Logprobs are the model's own log-softmax (before penalties, bias and temperature, vLLM's default), -9999.0
for -inf; tokens are shown decoded one by one, and a final end-of-text token is counted in usage but not
listed (it has no text). Not with `stream` (a 400 names `logprobs`), nor is `best_of` above n.

Untrusted clients cannot stall the others (`RequestGuard`, `LimitsConfig`): the key and the rate limit
are checked before the body is read, a body past `max_body_bytes` gets 413 before it is read; texts past
`max_prompt_chars`, stop strings past `max_stop_chars`, more than `max_items` prompts or inputs and
images past `max_image_pixels` get 400 before any work; tokenising, chat templates and image decoding
run in threads, never on the event loop. Clamping rules: a temperature below `GREEDY_BELOW` (1e-5) is
greedy; top_p keeps at least the most likely token; empty stop strings are ignored.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import itertools
import json
import math
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipelines import __version__
from pipelines.serve.engine import GREEDY_BELOW, ClipEngine, Generation, TextEngine, TokenLogprobs
from pipelines.serve.images import ImageEngine, Picture, picture_seed

if TYPE_CHECKING:
    import torch

    from pipelines.serve.config import LimitsConfig, ServeConfig


_UNION_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|[\w-]+\[.*\])$")


# -- errors --------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"type": "invalid", "loc": (), "msg": "invalid request"}
    if first["type"] == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return error_response(400, f"request body is not valid JSON ({detail})", code="invalid_json")
    status = 400  # OpenAI's (and vLLM's) answer to a request that fails validation, on every route
    param = _param(first["loc"])
    if first["type"] == "extra_forbidden":
        return error_response(status, f"unknown parameter {param}: this server does not implement it", param=param,
                              code="unknown_parameter")
    # A union field fails once per member type: name the field once, with each reason.
    reasons = list(dict.fromkeys(e["msg"] for e in errors if _param(e["loc"]) == param))
    message = f"{param}: {' or '.join(reasons[:4])}" if param else first["msg"]
    return error_response(status, message, param=param, code=first["type"])


def _param(loc: Sequence[Any]) -> str | None:
    """A dotted field name from a pydantic error location, without `body` and union member tags."""
    parts = [str(p) for p in loc if p != "body" and not _UNION_TAG.match(str(p))]
    return ".".join(parts) or None


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code,
                          headers=getattr(exc, "headers", None))


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error",
                          code="internal_error")


# -- request schemas -----------------------------------------------------------------------------
# Strict: "0.5" is not a number and 1 is not a bool; NaN and infinities are not numbers. The language
# model's requests (`_LMRequest`) refuse unknown fields (a 400 naming them, as OpenAI answers); the others
# ignore them. Every text field refuses lone surrogates ("\\ud800" in JSON is no character: a tokenizer
# cannot encode it).
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _characters_only(cls, value: Any) -> Any:
        _check_text(value)
        return value


def _check_text(value: Any) -> None:
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise PydanticCustomError("invalid_unicode", "text holds a lone surrogate (U+D800-U+DFFF), not a "
                                      "character")
    elif isinstance(value, list) and value and not isinstance(value[0], int):  # token ids: nothing to check
        for item in value:
            _check_text(item)


class _LMRequest(_Request):
    model_config = ConfigDict(extra="forbid")


class _Sampling(_LMRequest):
    model: str
    max_tokens: int | None = Field(None, ge=1, description="At most the server's max_tokens_limit and what the "
                                   "context leaves after the prompt (400 beyond).")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description=f"Below {GREEDY_BELOW:g}: greedy, as 0.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Keeps the most likely tokens up to this mass, at least "
                         "one.")
    stop: str | Annotated[list[str], Field(max_length=4)] | None = Field(
        None, description="Up to 4 strings, each at most the server's max_stop_chars (400 beyond).")
    seed: int | None = Field(None, ge=-2**63, le=2**64 - 1, description="Reproduces a sampled row whatever "
                             "shares its batch.")
    n: int = Field(1, ge=1, le=8, description="Choices to return (of each prompt); with a seed, choice i is drawn "
                   "from seed + i.")
    stream: bool = False
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Subtracted from the logit of every token "
                                    "generated so far (OpenAI's formula).")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Subtracted from a token's logit once per "
                                     "time it was generated so far.")
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, description="Token id (as a string) -> a bias added to its logit before sampling; 100 forces it.")
    user: str | None = Field(None, description="The end user's id (accepted; nothing is done with it).")


class StreamOptions(_LMRequest):
    include_usage: bool = False


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A text, texts, token ids or lists of them; each text at most the server's max_prompt_chars.")
    max_tokens: int | None = Field(None, ge=0, description="At most the server's max_tokens_limit and what the "
                                   "context leaves after the prompt (400 beyond); 0 with echo: score the prompt only.")
    echo: bool = Field(False, description="The prompt before the completion, in the text and (with logprobs) its "
                       "tokens' logprobs, the first one null.")
    logprobs: int | None = Field(None, ge=0, le=5, description="Per token: its logprob and the k most likely tokens "
                                 "(the model's own log-softmax, before penalties, bias and temperature). Not with "
                                 "stream.")
    best_of: int | None = Field(None, ge=1, le=20, description="Completions generated per prompt, of which the n of "
                                "highest mean token logprob are returned (all count in usage); at least n, not with "
                                "stream.")
    suffix: str | None = Field(None, description="Not supported (400 when set).")
    stream_options: StreamOptions | None = None


class ContentPart(_LMRequest):
    type: Literal["text"]
    text: str


class ChatMessage(_LMRequest):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, description="The speaker's name, given to the chat template.")
    tool_call_id: str | None = Field(None, description="Given to the chat template.")
    # Tools are not implemented: set, a 400 names them.
    tool_calls: list[Any] | None = Field(None, description="Not supported (400 when not empty).")
    function_call: Any = Field(None, description="Not supported (400 when set).")
    refusal: str | None = Field(None, description="Not supported (400 when set).")
    audio: Any = Field(None, description="Not supported (400 when set).")
    annotations: list[Any] | None = Field(None, description="An earlier reply's citations: accepted, not read.")

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)

    def template_input(self) -> dict[str, str]:
        """The message as a chat template reads it."""
        extra = {k: v for k, v in [("name", self.name), ("tool_call_id", self.tool_call_id)] if v is not None}
        return {"role": self.role, "content": self.text(), **extra}


class ResponseFormat(_LMRequest):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="Per generated token: its logprob (the model's own log-softmax, "
                           "before penalties, bias and temperature), its bytes and top_logprobs. Not with stream.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="The most likely tokens listed at each "
                                     "position (with logprobs: true).")
    response_format: ResponseFormat | None = Field(None, description="json_object and json_schema: guided decoding "
                                                   "on the vLLM engine (400 on the transformers engine).")
    stream_options: StreamOptions | None = None
    # OpenAI's fields that this server does not implement: set to anything but the values in CHAT_FIELDS_ALLOWED,
    # a 400 names them.
    tools: list[Any] | None = Field(None, description="Not supported (400 when not empty).")
    tool_choice: Any = Field(None, description="none only.")
    parallel_tool_calls: bool | None = Field(None, description="Accepted (without tools, nothing to call).")
    functions: list[Any] | None = Field(None, description="Not supported (400 when not empty).")
    function_call: Any = Field(None, description="none only.")
    audio: Any = Field(None, description="Not supported (400 when set).")
    modalities: list[str] | None = Field(None, description='["text"] only.')
    prediction: Any = Field(None, description="Not supported (400 when set).")
    reasoning_effort: str | None = Field(None, description="Not supported (400 when set).")
    verbosity: str | None = Field(None, description="Not supported (400 when set).")
    web_search_options: Any = Field(None, description="Not supported (400 when set).")
    service_tier: str | None = Field(None, description="auto or default only.")
    store: bool | None = Field(None, description="false only: nothing is stored.")
    metadata: dict[str, str] | None = Field(None, description="Accepted (nothing is stored to tag).")
    safety_identifier: str | None = Field(None, description="Accepted; nothing is done with it.")
    prompt_cache_key: str | None = Field(None, description="Accepted; nothing is cached across requests.")
    prompt_cache_retention: str | None = Field(None, description="Accepted; nothing is cached across requests.")
    prompt_cache_options: Any = Field(None, description="Accepted; nothing is cached across requests.")
    moderation: Any = Field(None, description="Not supported (400 when set): nothing is moderated.")


# Each field's values that describe what the server does anyway; any other value gets a 400 naming the field.
COMPLETION_FIELDS_ALLOWED: dict[str, tuple[Any, ...]] = {"suffix": ()}
CHAT_FIELDS_ALLOWED: dict[str, tuple[Any, ...]] = {
    "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",), "audio": (),
    "modalities": (["text"],), "prediction": (), "reasoning_effort": (), "verbosity": (), "web_search_options": (),
    "service_tier": ("auto", "default"), "store": (False,), "moderation": ()}
MESSAGE_FIELDS_ALLOWED: dict[str, tuple[Any, ...]] = {"tool_calls": ([],), "function_call": (), "refusal": (),
                                                      "audio": ()}


class TokenizeRequest(_LMRequest):
    """vLLM's /tokenize: a prompt, or messages through the chat template."""

    model: str | None = Field(None, description="A served language model (NAME or NAME:ADAPTER); none: the first "
                              "model served.")
    prompt: str | None = Field(None, description="A text (or messages: not both).")
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = Field(
        None, description="A conversation, through the model's chat template (or prompt: not both).")
    add_special_tokens: bool | None = Field(None, description="Add the tokenizer's special tokens (BOS...); default "
                                            "true for a prompt, false for messages (the template has them).")
    add_generation_prompt: bool = Field(True, description="Messages: end ready for the assistant's turn.")
    continue_final_message: bool = Field(False, description="Messages: leave the last one open, to be continued "
                                         "(not with add_generation_prompt).")
    return_token_strs: bool = Field(False, description="Also return each token's string.")
    # vLLM's fields that this server does not implement: a 400 names them when set.
    chat_template: str | None = Field(None, description="Not supported (400 when set): the model's template only.")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="Not supported (400 when set).")
    tools: list[Any] | None = Field(None, description="Not supported (400 when not empty).")


TOKENIZE_FIELDS_ALLOWED: dict[str, tuple[Any, ...]] = {"chat_template": (), "chat_template_kwargs": (),
                                                       "tools": ([],)}


class DetokenizeRequest(_LMRequest):
    """vLLM's /detokenize: token ids to text."""

    model: str | None = Field(None, description="A served language model; none: the first model served.")
    tokens: list[int] = Field(description="Token ids, each in the model's vocabulary.")


class ImageInput(_Request):
    image: str = Field(description="An encoded image (JPEG, PNG, WebP...) in base64, or a data: URL of one.")


class EmbeddingRequest(_Request):
    model: str
    input: str | Annotated[list[str], Field(min_length=1)] | Annotated[list[int], Field(min_length=1)] | \
        Annotated[list[list[int]], Field(min_length=1)] | Annotated[list[str | ImageInput], Field(min_length=1)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


class SimilarityRequest(_Request):
    model: str
    images: Annotated[list[str], Field(min_length=1)]
    texts: Annotated[list[str], Field(min_length=1)]


class ImageRequest(_Request):
    model: str
    prompt: str = Field(description="What to draw; at most the server's max_prompt_chars (the model reads as many "
                        "tokens as its text encoder takes).")
    n: int = Field(1, ge=1, le=10)
    size: str | None = Field(None, description="WxH: the model's native size (a 400 names it); none or auto: that.")
    response_format: Literal["b64_json", "url"] = Field(
        "b64_json", description="b64_json: the PNG inline. url is a 400: this server keeps no images to link to.")
    user: str | None = None
    seed: int | None = Field(None, ge=-2**63, le=2**64 - 1, description="Image i is drawn from seed + i, whatever "
                             "shares its batch; none: a random seed per image (each answer names its seed).")
    num_inference_steps: int = Field(20, ge=1, le=100, description="Sampler steps.")
    guidance_scale: float = Field(4.0, ge=0.0, le=50.0, description="Classifier-free guidance scale; 1 or less: "
                                  "none (the negative prompt is then unused).")
    negative_prompt: str | None = Field(None, description="What to steer away from (with guidance_scale above 1).")
    # OpenAI's fields that this server does not implement: set to anything but these values, a 400 names them.
    quality: str | None = Field(None, description="auto or standard only.")
    style: str | None = Field(None, description="Not supported (400 when set).")
    background: str | None = Field(None, description="auto or opaque only.")
    output_format: str | None = Field(None, description="png only.")
    output_compression: int | None = Field(None, description="Not supported (400 when set).")
    moderation: str | None = Field(None, description="Not supported (400 when set): nothing is moderated.")
    partial_images: int | None = Field(None, description="0 only (no streaming).")
    stream: bool | None = Field(None, description="false only.")


# Each field's values that describe what the server does anyway; any other value gets a 400 naming the field.
IMAGE_FIELDS_ALLOWED: dict[str, tuple[Any, ...]] = {
    "quality": ("auto", "standard"), "style": (), "background": ("auto", "opaque"), "output_format": ("png",),
    "output_compression": (), "moderation": (), "partial_images": (0,), "stream": (False,)}


# -- response schemas (for /openapi.json: the routes answer these shapes as plain JSON) -------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(description="Each token decoded alone (with echo: the prompt's first).")
    token_logprobs: list[float | None] = Field(description="Each token's logprob; the echoed prompt's first: null.")
    top_logprobs: list[dict[str, float] | None] = Field(description="The k most likely tokens at each place, and "
                                                        "the token itself.")
    text_offset: list[int] = Field(description="Where each token starts in the choice's text.")


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] = Field(description="The token's own UTF-8 bytes (part of a character, for some tokens).")


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str = Field(description="Floats, or little-endian float32 in base64.")


class EmbeddingList(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: Usage


class Similarity(BaseModel):
    object: Literal["similarity"]
    model: str
    similarity: list[list[float]] = Field(description="images x texts cosine similarities.")
    pairs: list[float] | None = Field(None, description="Image i with text i, when the lists are as long.")
    usage: Usage


class GeneratedImage(BaseModel):
    b64_json: str = Field(description="A PNG of the asked size, in base64.")
    seed: int = Field(description="The seed it was drawn from: the same request with it draws it again.")


class ImagesResponse(BaseModel):
    created: int
    data: list[GeneratedImage]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None = Field(None, description="An adapter's base model (NAME of NAME:ADAPTER).")


class Tokens(BaseModel):
    count: int
    max_model_len: int = Field(description="The model's context in tokens.")
    tokens: list[int]
    token_strs: list[str] | None = Field(None, description="With return_token_strs: each token as the tokenizer "
                                         "writes it.")


class Detokenized(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    tokenizer_class: str
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    chat_template: str | None = None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
    model: str = Field(description="The first model served.")
    version: int = Field(description="Its version.")
    adapters: dict[str, int] = Field(description="Every adapter served (whatever its base) and its version.")
    models: dict[str, int] | None = Field(None, description="With several models: each one's version.")
    engine: Literal["vllm", "transformers"] | None = Field(
        None, description="What generates the first model's text, when it is a language model.")


class ReloadedModel(BaseModel):
    version: int
    previous_version: int


class Reloaded(BaseModel):
    model: str = Field(description="The first model served.")
    version: int
    previous_version: int
    adapters: dict[str, int]
    models: dict[str, ReloadedModel] | None = Field(None, description="With several models: each one's versions.")


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses: OpenAI's error body for each status."""
    what = {400: "Invalid request (a field of the wrong type or out of its range, a value the server cannot "
                 "serve, too long, not decodable, a field not implemented)",
            401: "Missing or wrong API key", 404: "Unknown model", 413: "Body larger than max_body_bytes",
            429: "Over the rate limit (Retry-After)",
            503: "An adapter could not be loaded now; retry"}
    return {status: {"model": ErrorBody, "description": what[status]} for status in statuses}


def _streamed(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI 200 of a route that answers JSON, or server-sent events with `stream: true`."""
    return {200: {"model": model, "description": "The answer; with stream: true, server-sent events of its chunks",
                  "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


# -- what the routes call ------------------------------------------------------------------------
class ModelServer(Protocol):
    """The replica as the routes see it."""

    config: ServeConfig
    access: AccessControl

    def model_ids(self) -> list[str]: ...
    async def resolve(self, model: str) -> tuple[TextEngine | ClipEngine | ImageEngine, str | None]: ...
    async def generate(self, engine: TextEngine, rows: Sequence[Generation]) -> None: ...
    async def embed(self, engine: TextEngine, inputs: Sequence[list[int]], adapter: str | None) -> torch.Tensor: ...
    async def clip_embed(self, engine: ClipEngine, texts: Sequence[str],
                         images: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]: ...
    async def draw(self, engine: ImageEngine, pictures: Sequence[Picture]) -> None: ...
    async def reload(self) -> dict[str, Any]: ...
    def health(self) -> dict[str, Any]: ...


class AccessControl:
    """Bearer keys (none configured: open) and a token bucket of `rate_limit` requests a minute per key."""

    def __init__(self, api_keys: Sequence[str], rate_limit: int | None):
        self.keys = [k.encode() for k in api_keys]
        self.rate_limit = rate_limit
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)

    def check(self, headers: Headers, client: str | None) -> None:
        """Raise 401 without a valid key, 429 over the limit."""
        who = client or "unknown"
        if self.keys:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            given = token.strip().encode(errors="surrogateescape")
            if scheme.lower() != "bearer" or not given:
                raise APIError(401, "missing API key: send Authorization: Bearer KEY", code="invalid_api_key")
            if not any(hmac.compare_digest(given, k) for k in self.keys):
                raise APIError(401, "invalid API key", code="invalid_api_key")
            who = "key:" + token.strip()
        if self.rate_limit is not None:
            self._take(who)

    def _take(self, who: str) -> None:
        assert self.rate_limit is not None
        now = time.monotonic()
        per_second = self.rate_limit / 60.0
        tokens, then = self._buckets.get(who, (float(self.rate_limit), now))
        tokens = min(float(self.rate_limit), tokens + (now - then) * per_second)
        if tokens < 1.0:
            self._buckets[who] = (tokens, now)
            retry = max(1, math.ceil((1.0 - tokens) / per_second))
            raise APIError(429, f"rate limit of {self.rate_limit} requests per minute exceeded",
                           type="requests", code="rate_limit_exceeded", headers={"Retry-After": str(retry)})
        self._buckets[who] = (tokens - 1.0, now)


class RequestGuard:
    """ASGI middleware: the key, the rate limit and the body's size are checked before the app reads a
    byte of the body, so a caller without a key learns nothing and costs nothing (a malformed body without
    a key gets 401). A body past `max_body_bytes` gets 413: at once from its Content-Length, or as soon as
    a chunked body passes the limit (the app then sees the client gone)."""

    OPEN = frozenset({"/healthz", "/openapi.json"})

    def __init__(self, app: ASGIApp, access: AccessControl, max_body_bytes: int):
        self.app, self.access, self.max_body_bytes = app, access, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        client = scope.get("client")
        try:
            self.access.check(headers, client[0] if client else None)
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                raise self._too_large()
        except APIError as e:
            await e.response()(scope, receive, send)
            return
        received, answered = 0, False

        async def limited_receive() -> Message:
            nonlocal received, answered
            if answered:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    answered = True
                    await self._too_large().response()(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not answered:  # once the 413 is sent, whatever the app answers goes nowhere
                await send(message)

        await self.app(scope, limited_receive, guarded_send)

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than this server's limit of {self.max_body_bytes} "
                        "bytes", code="request_too_large")


# -- the app -------------------------------------------------------------------------------------
def build_api(server: ModelServer) -> FastAPI:
    """The FastAPI app of `server`'s OpenAI-compatible routes, with its OpenAPI document at /openapi.json."""
    limits = server.config.limits
    app = FastAPI(title="pipelines serve", version=__version__, openapi_url="/openapi.json", docs_url=None,
                  redoc_url=None, description="OpenAI-compatible API of a model served by `pipelines serve`.")
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.add_middleware(RequestGuard, access=server.access, max_body_bytes=limits.max_body_bytes)

    @app.get("/healthz", response_model=Health)
    async def healthz() -> JSONResponse:
        return JSONResponse(server.health())

    # RequestGuard checks keys and the rate limit; the dependency only declares them in the OpenAPI document.
    guarded = [Depends(HTTPBearer(auto_error=False))] if server.access.keys else []
    denied = (401, 413, 429) if server.access.keys else (413, 429)

    @app.get("/v1/models", dependencies=guarded, response_model=ModelList, responses=_errors(*denied))
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [_card(m) for m in server.model_ids()]})

    @app.get("/v1/models/{model:path}", dependencies=guarded, response_model=ModelCard,
             responses=_errors(*denied, 404))
    async def model_card(model: str) -> JSONResponse:
        if model not in server.model_ids():
            raise APIError(404, f"model {model!r} not found; served: {', '.join(server.model_ids())}", param="model",
                           code="model_not_found")
        return JSONResponse(_card(model))

    async def text_engine(model: str) -> tuple[TextEngine, str | None]:
        engine, adapter = await server.resolve(model)
        if not isinstance(engine, TextEngine):
            raise _wrong_kind(model, engine, "completions")
        return engine, adapter

    generation_errors = _errors(400, *denied, 404, 503)

    @app.post("/v1/completions", dependencies=guarded, responses=_streamed(Completion) | generation_errors)
    async def completions(body: CompletionRequest) -> Response:
        _refuse_unsupported(body, COMPLETION_FIELDS_ALLOWED)
        best_of = _best_of(body)
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens 0 generates nothing: with echo it scores the prompt", param="max_tokens",
                           code="invalid_value")
        if body.stream and body.logprobs is not None:
            raise APIError(400, "logprobs are not streamed: ask without stream", param="logprobs",
                           code="unsupported_value")
        engine, adapter = await text_engine(body.model)
        stop = _stop_strings(body.stop, limits)
        prompts = _prompt_list(body.prompt)
        _check_count(len(prompts) * best_of, limits, "prompt", "prompts times best_of (or n)")
        _check_chars(prompts, limits, "prompt")
        prompt_ids = await asyncio.to_thread(_prompt_ids, prompts, engine, "prompt")  # CPU work: off the loop
        bias = _logit_bias(body.logit_bias, engine)
        # Ranking best_of's candidates takes each generated token's logprob.
        logprobs = body.logprobs if best_of == body.n else body.logprobs or 0
        prompt_logprobs = body.logprobs if body.echo else None
        candidates = [(prompt, _row(server.config, engine, ids, body, body.max_tokens, stop, adapter, "prompt",
                                    choice=i, logit_bias=bias, logprobs=logprobs, prompt_logprobs=prompt_logprobs))
                      for prompt, ids in zip(prompts, prompt_ids) for i in range(best_of)]
        rows = [row for _, row in candidates]
        meta = _meta("cmpl", body.model, engine)
        if body.stream:
            _single_choice(rows)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            echo = _echo_text(prompts[0], engine) if body.echo else ""
            return _sse(_completion_chunks(server, engine, rows[0], meta, include_usage, echo))
        await server.generate(engine, rows)

        def answer() -> list[dict[str, Any]]:  # decoding tokens for logprobs: off the loop
            return [_completion_choice(i, prompt, row, engine, body.echo, body.logprobs)
                    for i, (prompt, row) in enumerate(_best(candidates, best_of, body.n))]

        choices = await asyncio.to_thread(answer)
        return JSONResponse({**meta, "object": "text_completion", "choices": choices, "usage": _usage(rows)})

    @app.post("/v1/chat/completions", dependencies=guarded, responses=_streamed(ChatCompletion) | generation_errors)
    async def chat(body: ChatRequest) -> Response:
        _refuse_unsupported(body, CHAT_FIELDS_ALLOWED)
        _refuse_unsupported_in_messages(body.messages)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        if body.stream and body.logprobs:
            raise APIError(400, "logprobs are not streamed: ask without stream", param="logprobs",
                           code="unsupported_value")
        engine, adapter = await text_engine(body.model)
        guide = _guided(body.response_format, engine, limits)
        stop = _stop_strings(body.stop, limits)
        messages = [m.template_input() for m in body.messages]
        _check_message_chars(messages, limits)
        _check_count(body.n, limits, "n", "n")
        ids = await asyncio.to_thread(engine.chat_prompt, messages)  # the template and tokenizer: off the loop
        bias = _logit_bias(body.logit_bias, engine)
        max_tokens = body.max_completion_tokens or body.max_tokens
        top = body.top_logprobs or 0
        rows = [_row(server.config, engine, ids, body, max_tokens, stop, adapter, "messages", choice=i,
                     logit_bias=bias, logprobs=top if body.logprobs else None) for i in range(body.n)]
        for row in rows:
            row.json_schema, row.json_object = guide
        meta = _meta("chatcmpl", body.model, engine)
        if body.stream:
            _single_choice(rows)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(_chat_chunks(server, engine, rows[0], meta, include_usage))
        await server.generate(engine, rows)

        def answer() -> list[dict[str, Any]]:  # decoding tokens for logprobs: off the loop
            return [{"index": i, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason,
                     "logprobs": _chat_logprobs(engine, r, top) if body.logprobs else None}
                    for i, r in enumerate(rows)]

        choices = await asyncio.to_thread(answer)
        return JSONResponse({**meta, "object": "chat.completion", "choices": choices, "usage": _usage(rows)})

    # vLLM's tokenizer routes (lm-evaluation-harness's `tokenizer_backend=remote` reads them).
    async def tokenizer_of(model: str | None) -> TextEngine:
        """The language model whose tokenizer `model` uses (an adapter's is its base's); none: the first served."""
        served = server.model_ids()
        model = served[0] if model is None else model
        if model not in served:
            raise APIError(404, f"model {model!r} not found; served: {', '.join(served)}", param="model",
                           code="model_not_found")
        engine, _ = await server.resolve(model.partition(":")[0])
        if not isinstance(engine, TextEngine):
            raise _wrong_kind(model, engine, "tokenization")
        return engine

    tokenize_errors = _errors(400, *denied, 404)

    @app.post("/tokenize", dependencies=guarded, response_model=Tokens, responses=tokenize_errors)
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        _refuse_unsupported(body, TOKENIZE_FIELDS_ALLOWED)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give a prompt or messages (one of them)", param="prompt", code="invalid_value")
        engine = await tokenizer_of(body.model)
        if body.prompt is not None:
            _check_chars([body.prompt], limits, "prompt")
            add_special = True if body.add_special_tokens is None else body.add_special_tokens
            ids = await asyncio.to_thread(engine.encode, body.prompt, add_special)
        else:
            assert body.messages is not None
            if body.continue_final_message and body.add_generation_prompt and \
                    "add_generation_prompt" in body.model_fields_set:
                raise APIError(400, "continue_final_message and add_generation_prompt cannot both be true",
                               param="continue_final_message", code="invalid_value")
            _refuse_unsupported_in_messages(body.messages)
            messages = [m.template_input() for m in body.messages]
            _check_message_chars(messages, limits)
            ids = await asyncio.to_thread(
                engine.chat_prompt, messages, add_generation_prompt=body.add_generation_prompt and not
                body.continue_final_message, continue_final_message=body.continue_final_message,
                add_special_tokens=bool(body.add_special_tokens))
        strs = engine.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return JSONResponse({"count": len(ids), "max_model_len": engine.context_length, "tokens": ids,
                             "token_strs": strs})

    @app.post("/detokenize", dependencies=guarded, response_model=Detokenized, responses=tokenize_errors)
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        engine = await tokenizer_of(body.model)
        vocab = len(engine.tokenizer)
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"token ids must lie in [0, {vocab})", param="tokens", code="invalid_value")
        return JSONResponse({"prompt": await asyncio.to_thread(engine.tokenizer.decode, body.tokens)})

    @app.get("/tokenizer_info", dependencies=guarded, response_model=TokenizerInfo, responses=tokenize_errors)
    async def tokenizer_info(model: str | None = None) -> JSONResponse:
        return JSONResponse(_tokenizer_info(await tokenizer_of(model)))

    @app.post("/v1/embeddings", dependencies=guarded, response_model=EmbeddingList,
              responses=_errors(400, *denied, 404, 503))
    async def embeddings(body: EmbeddingRequest) -> JSONResponse:
        engine, adapter = await server.resolve(body.model)
        if isinstance(engine, ImageEngine):
            raise _wrong_kind(body.model, engine, "embeddings")
        items = [body.input] if isinstance(body.input, str) or isinstance(body.input[0], int) else list(body.input)
        _check_count(len(items), limits, "input", "inputs")
        _check_chars([x for x in items if isinstance(x, str)], limits, "input")
        if isinstance(engine, ClipEngine):
            return await _clip_embeddings(server, engine, body, items)
        if any(isinstance(x, ImageInput) for x in items):
            raise APIError(400, f"model {body.model!r} embeds text only (images need a CLIP model)", param="input",
                           code="model_not_supported")
        inputs = await asyncio.to_thread(_prompt_ids, items, engine, "input")  # type: ignore[arg-type]
        for i, ids in enumerate(inputs):
            if len(ids) > engine.context_length:
                raise APIError(400, f"input {i} has {len(ids)} tokens; the model's context is "
                               f"{engine.context_length}", param="input", code="context_length_exceeded")
        width = engine.model.config.hidden_size
        if body.dimensions is not None and body.dimensions > width:
            raise APIError(400, f"dimensions {body.dimensions} > the model's {width}", param="dimensions",
                           code="invalid_value")
        vectors = (await server.embed(engine, inputs, adapter)).numpy()
        data = _embedding_data(vectors, body.dimensions, body.encoding_format)
        tokens = sum(len(ids) for ids in inputs)
        return JSONResponse({"object": "list", "data": data, "model": body.model,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.post("/v1/similarity", dependencies=guarded, response_model=Similarity,
              responses=_errors(400, *denied, 404, 503))
    async def similarity(body: SimilarityRequest) -> JSONResponse:
        engine, _ = await server.resolve(body.model)
        if not isinstance(engine, ClipEngine):
            raise _wrong_kind(body.model, engine, "similarity")
        _check_count(len(body.images) + len(body.texts), limits, "images", "images and texts")
        _check_chars(body.texts, limits, "texts")

        def prepare() -> tuple[list[Any], int]:  # decoding and tokenising: off the loop
            images = [_decode_image(v, f"images.{i}", limits.max_image_pixels) for i, v in enumerate(body.images)]
            return images, sum(engine.tokens(t) for t in body.texts)

        images, tokens = await asyncio.to_thread(prepare)
        texts, images = await server.clip_embed(engine, body.texts, images)
        matrix = np.nan_to_num(images @ texts.T)
        out: dict[str, Any] = {"object": "similarity", "model": body.model, "similarity": matrix.tolist()}
        if len(body.images) == len(body.texts):
            out["pairs"] = np.diagonal(matrix).tolist()  # image i with text i
        return JSONResponse(out | {"usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.post("/v1/images/generations", dependencies=guarded, response_model=ImagesResponse,
              responses=_errors(400, *denied, 404, 503))
    async def images(body: ImageRequest, request: Request) -> JSONResponse:
        engine, adapter = await server.resolve(body.model)
        if not isinstance(engine, ImageEngine):
            raise _wrong_kind(body.model, engine, "images")
        _refuse_unimplemented(body)
        width, height = _image_size(body.size, engine, body.model)
        _check_count(body.n, limits, "n", "images")
        _check_chars([body.prompt], limits, "prompt")
        _check_chars([body.negative_prompt], limits, "negative_prompt")
        pictures = [Picture(body.prompt, width, height, body.num_inference_steps, body.guidance_scale,
                            picture_seed(body.seed, i), body.negative_prompt or "", adapter) for i in range(body.n)]
        await _unless_client_leaves(server.draw(engine, pictures), request, pictures)
        data = [{"b64_json": base64.b64encode(p.png or b"").decode(), "seed": p.seed} for p in pictures]
        return JSONResponse({"created": int(time.time()), "data": data})

    @app.post("/admin/reload", dependencies=guarded, response_model=Reloaded, responses=_errors(*denied))
    async def reload() -> JSONResponse:
        return JSONResponse(await server.reload())

    fastapi_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's document without the 422 it adds to every route with inputs: validation errors are 400s."""
        if app.openapi_schema is None:
            schema = fastapi_openapi()
            for operation in (op for item in schema["paths"].values() for op in item.values()):
                listed = operation["responses"].get("422", {}).get("content", {}).get("application/json", {})
                if listed.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                    del operation["responses"]["422"]
            for unused in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(unused, None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


# -- helpers -------------------------------------------------------------------------------------
# What each kind of model serves, for the 400 of a request that asks a model for something else.
_KINDS = {TextEngine: ("a language model", "/v1/completions, /v1/chat/completions, /v1/embeddings and /tokenize"),
          ClipEngine: ("a CLIP model", "/v1/embeddings and /v1/similarity"),
          ImageEngine: ("a diffusion model", "/v1/images/generations")}


def _guided(response_format: ResponseFormat | None, engine: TextEngine,
            limits: LimitsConfig) -> tuple[dict[str, Any] | None, bool]:
    """(JSON schema, JSON object) of `response_format`: guided decoding, on the vLLM engine only. The schema's
    depth and size are checked here; whether its grammar compiles in time, by the vLLM worker."""
    if response_format is None or response_format.type == "text":
        return None, False
    if not engine.guided_decoding:
        raise APIError(400, f"response_format {response_format.type}: guided decoding needs the vLLM engine; "
                       f"{engine.label} is served by transformers", param="response_format", code="unsupported_value")
    if response_format.type == "json_object":
        return None, True
    schema = (response_format.json_schema or {}).get("schema")
    if not isinstance(schema, dict):
        raise APIError(400, "response_format json_schema needs json_schema.schema (a JSON schema object)",
                       param="response_format", code="invalid_value")
    if _nesting_exceeds(schema, limits.max_schema_depth):  # (first: no recursion into a document of any depth)
        raise APIError(400, f"response_format json_schema: objects and arrays nest more than "
                       f"{limits.max_schema_depth} levels deep in the schema (this server's limit)",
                       param="response_format", code="invalid_value")
    size = len(json.dumps(schema, separators=(",", ":")).encode())
    if size > limits.max_schema_bytes:
        raise APIError(400, f"response_format json_schema: the schema is {size} bytes as compact JSON; this server "
                       f"takes at most {limits.max_schema_bytes}", param="response_format", code="invalid_value")
    return schema, False


def _nesting_exceeds(document: Any, limit: int) -> bool:
    """Whether objects and arrays nest deeper than `limit` levels in `document` (level by level, no recursion)."""
    level = [document]
    for _ in range(limit):
        level = [child for node in level for child in (node.values() if isinstance(node, dict) else node)
                 if isinstance(child, (dict, list))]
        if not level:
            return False
    return True


def _wrong_kind(model: str, engine: Any, asked: str) -> APIError:
    kind, serves = next(v for k, v in _KINDS.items() if isinstance(engine, k))  # VllmEngine is a TextEngine
    return APIError(400, f"model {model!r} is {kind}: it serves {serves}, not {asked}", param="model",
                    code="model_not_supported")


def _refuse_unimplemented(body: ImageRequest) -> None:
    """400 naming the first of OpenAI's image fields set to a value this server does not implement."""
    for name, allowed in IMAGE_FIELDS_ALLOWED.items():
        value = getattr(body, name)
        if value is None or value in allowed:  # (strict types: no 0 for False, no True for 1)
            continue
        supported = f"only {' or '.join(json.dumps(a) for a in allowed)} is supported" if allowed else \
            "this server does not implement it"
        raise APIError(400, f"{name} {json.dumps(value)}: {supported}", param=name,
                       code="unsupported_value" if allowed else "unsupported_parameter")
    if body.response_format == "url":
        raise APIError(400, "response_format \"url\": this server keeps no images to link to; use b64_json",
                       param="response_format", code="unsupported_value")


def _image_size(size: str | None, engine: ImageEngine, model: str) -> tuple[int, int]:
    """(width, height) of a request's `size`: one of the model's sizes, or its native size for none or auto."""
    if size is None or size == "auto":
        return engine.width, engine.height
    if size not in engine.sizes:
        raise APIError(400, f"size {json.dumps(size)}: model {model!r} draws {' or '.join(engine.sizes)}",
                       param="size", code="invalid_value")
    width, _, height = size.partition("x")
    return int(width), int(height)


async def _unless_client_leaves(work: Any, request: Request, pictures: Sequence[Picture]) -> None:
    """Await `work` (the drawing of `pictures`); if the client goes away first (or this request is cancelled),
    mark the pictures cancelled, so they are not decoded nor encoded and a loop of nothing but theirs stops,
    and cancel `work`, so the ones not started leave their batches."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            for picture in pictures:
                picture.cancelled = True
            task.cancel()
    if not task.done() or task.cancelled():
        # Nobody reads this answer: nginx's "client closed request".
        raise APIError(499, "the client went away", code="client_closed_request")
    task.result()


async def _disconnected(request: Request) -> None:
    """Return when the client goes away (the body is read already: what comes next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _clip_embeddings(server: ModelServer, engine: ClipEngine, body: EmbeddingRequest,
                           items: list[Any]) -> JSONResponse:
    """Texts and images into the CLIP model's shared space, in the order given."""
    if any(not isinstance(x, (str, ImageInput)) for x in items):
        raise APIError(400, "a CLIP model takes texts and images, not token ids", param="input", code="invalid_value")
    if body.dimensions is not None and body.dimensions > engine.width:
        raise APIError(400, f"dimensions {body.dimensions} > the model's {engine.width}", param="dimensions",
                       code="invalid_value")
    text_at = [i for i, x in enumerate(items) if isinstance(x, str)]
    image_at = [i for i, x in enumerate(items) if isinstance(x, ImageInput)]
    max_pixels = server.config.limits.max_image_pixels

    def prepare() -> tuple[list[Any], int]:  # decoding and tokenising: off the loop
        images = [_decode_image(items[i].image, f"input.{i}.image", max_pixels) for i in image_at]
        return images, sum(engine.tokens(items[i]) for i in text_at)

    images, tokens = await asyncio.to_thread(prepare)
    texts, images = await server.clip_embed(engine, [items[i] for i in text_at], images)
    vectors = np.zeros((len(items), engine.width), np.float32)
    vectors[text_at], vectors[image_at] = texts, images
    return JSONResponse({"object": "list", "data": _embedding_data(vectors, body.dimensions, body.encoding_format),
                         "model": body.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _embedding_data(vectors: np.ndarray, dimensions: int | None, encoding: str) -> list[dict[str, Any]]:
    """OpenAI's embedding objects, cut to `dimensions` (then normalised again) when asked."""
    vectors = np.nan_to_num(vectors)  # JSON has no NaN: a model that overflowed gives zeros, not a 500
    if dimensions is not None:
        vectors = vectors[:, :dimensions]
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return [{"object": "embedding", "index": i, "embedding": _encode_vector(v, encoding)}
            for i, v in enumerate(vectors)]


def _decode_image(value: str, param: str, max_pixels: int) -> Any:
    """A PIL RGB image from base64 or a data: URL; 400 naming `param` when it is neither, is larger than
    `max_pixels` (read from its header, before decoding) or does not decode."""
    from PIL import Image

    if value.startswith("data:"):
        header, _, value = value.partition(",")
        if not header.endswith(";base64"):
            raise APIError(400, f"{param}: a data: URL must be base64 (data:image/png;base64,...)", param=param,
                           code="invalid_image")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: not base64", param=param, code="invalid_image") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:
                raise APIError(400, f"{param}: {im.width}x{im.height} pixels, more than this server's limit of "
                               f"{max_pixels}", param=param, code="image_too_large")
            return im.convert("RGB")
    except APIError:
        raise
    except Exception as e:  # PIL's decoders raise many kinds for bad data: all of them are the input's fault
        raise APIError(400, f"{param}: not an image that decodes ({type(e).__name__})", param=param,
                       code="invalid_image") from None


def _prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The prompts of a completion request: a text, texts, token ids or lists of them."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt", code="invalid_value")
    return list(prompt)  # type: ignore[arg-type]


def _check_count(count: int, limits: LimitsConfig, param: str, what: str) -> None:
    if count > limits.max_items:
        raise APIError(400, f"{count} {what}: this server takes at most {limits.max_items} per request",
                       param=param, code="too_many_items")


def _check_chars(texts: Sequence[Any], limits: LimitsConfig, param: str) -> None:
    """400 for a text past max_prompt_chars: checked before anything tokenises it."""
    for i, text in enumerate(texts):
        if isinstance(text, str) and len(text) > limits.max_prompt_chars:
            raise APIError(400, f"{param} {i} has {len(text)} characters, more than this server's limit of "
                           f"{limits.max_prompt_chars}", param=param, code="string_too_long")


def _stop_strings(stop: str | list[str] | None, limits: LimitsConfig) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    for s in stops:
        if len(s) > limits.max_stop_chars:
            raise APIError(400, f"a stop string of {len(s)} characters: this server's limit is "
                           f"{limits.max_stop_chars}", param="stop", code="string_too_long")
    return [s for s in stops if s]


def _prompt_ids(prompts: Sequence[str | list[int]], engine: TextEngine, param: str) -> list[list[int]]:
    """Token ids of each prompt (a text or token ids); CPU work, so called in a thread."""
    vocab = len(engine.tokenizer)
    out = []
    for p in prompts:
        ids = engine.encode(p) if isinstance(p, str) else list(p)
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"token ids must lie in [0, {vocab})", param=param, code="invalid_value")
        out.append(ids or [engine.tokenizer.bos_token_id if engine.tokenizer.bos_token_id is not None else engine.eos])
    return out


def _row(config: ServeConfig, engine: TextEngine, ids: list[int], body: _Sampling, max_tokens: int | None,
         stop: list[str], adapter: str | None, prompt_param: str, *, choice: int = 0,
         logit_bias: dict[int, float] | None = None, logprobs: int | None = None,
         prompt_logprobs: int | None = None) -> Generation:
    """The row of one choice (`choice` of the prompt's choices: with a seed, it draws from seed + choice)."""
    room = engine.context_length - len(ids)
    if room < (0 if max_tokens == 0 else 1):
        raise APIError(400, f"the prompt has {len(ids)} tokens; the model's context is {engine.context_length}",
                       param=prompt_param, code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(config.default_max_tokens, room)
    elif max_tokens > config.max_tokens_limit:
        raise APIError(400, f"max_tokens {max_tokens} > this server's limit of {config.max_tokens_limit}",
                       param="max_tokens", code="invalid_value")
    elif max_tokens > room:
        raise APIError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                       f"context of {engine.context_length}", param="max_tokens", code="context_length_exceeded")
    seed = None if body.seed is None else picture_seed(body.seed, choice)  # the pictures' rule: seed + i, mod 2**64
    return Generation(ids, max_tokens, temperature=body.temperature, top_p=body.top_p, stop=stop, seed=seed,
                      adapter=adapter, presence_penalty=body.presence_penalty,
                      frequency_penalty=body.frequency_penalty, logit_bias=logit_bias or {}, logprobs=logprobs,
                      prompt_logprobs=prompt_logprobs)


def _best_of(body: CompletionRequest) -> int:
    """How many completions to generate per prompt: best_of (at least n, not streamed), else n."""
    if body.best_of is None or body.best_of == body.n:
        return body.n
    if body.best_of < body.n:
        raise APIError(400, f"best_of {body.best_of} < n {body.n}: best_of is how many to choose the n from",
                       param="best_of", code="invalid_value")
    if body.stream:
        raise APIError(400, "best_of above n is not streamed (the best are known at the end)", param="best_of",
                       code="unsupported_value")
    return body.best_of


def _best(candidates: list[tuple[Any, Generation]], best_of: int, n: int) -> list[tuple[Any, Generation]]:
    """Of each prompt's best_of candidates (consecutive), the n of highest mean token logprob, best first."""
    if best_of == n:
        return candidates
    out = []
    for start in range(0, len(candidates), best_of):
        group = candidates[start:start + best_of]
        out += sorted(group, key=lambda c: _mean_logprob(c[1]), reverse=True)[:n]
    return out


def _mean_logprob(row: Generation) -> float:
    return sum(_finite(t.logprob) for t in row.token_logprobs) / len(row.token_logprobs) if row.token_logprobs \
        else 0.0


def _logit_bias(bias: dict[str, float] | None, engine: TextEngine) -> dict[int, float]:
    """logit_bias's token ids (JSON keys are strings) as ints; 400 for a key that is not a token id."""
    vocab = len(engine.tokenizer)
    out = {}
    for key, value in (bias or {}).items():
        if not (key.isascii() and key.isdigit() and len(key) < 12 and int(key) < vocab):
            raise APIError(400, f"logit_bias: {key[:40]!r} is not a token id in [0, {vocab})", param="logit_bias",
                           code="invalid_value")
        out[int(key)] = value
    return out


def _refuse_unsupported(body: BaseModel, allowed: dict[str, tuple[Any, ...]], prefix: str = "") -> None:
    """400 naming the first of `allowed`'s fields that is set to a value this server does not implement."""
    for name, values in allowed.items():
        value = getattr(body, name)
        if value is None or value in values:  # (strict types: no 0 for False)
            continue
        accepted = f" (accepted only as {' or '.join(json.dumps(v) for v in values)})" if values else ""
        raise APIError(400, f"{prefix}{name}: this server does not implement it{accepted}", param=prefix + name,
                       code="unsupported_value" if values else "unsupported_parameter")


def _refuse_unsupported_in_messages(messages: Sequence[ChatMessage]) -> None:
    for i, message in enumerate(messages):
        _refuse_unsupported(message, MESSAGE_FIELDS_ALLOWED, f"messages.{i}.")


def _check_message_chars(messages: Sequence[dict[str, str]], limits: LimitsConfig) -> None:
    if sum(len(m["content"]) for m in messages) > limits.max_prompt_chars:
        raise APIError(400, f"the messages hold more than this server's limit of {limits.max_prompt_chars} "
                       "characters", param="messages", code="string_too_long")


def _card(model: str) -> dict[str, Any]:
    base, sep, _ = model.partition(":")
    return {"id": model, "object": "model", "created": 0, "owned_by": "pipelines", "parent": base if sep else None}


# -- logprobs: what the engine measured, in OpenAI's shapes ----------------------------------------
def _finite(logprob: float) -> float:
    """JSON has no -inf nor NaN: -9999.0 for them, as OpenAI and vLLM write it."""
    return logprob if logprob > -9999.0 else -9999.0


def _generated(row: Generation, engine: TextEngine) -> tuple[list[int], list[TokenLogprobs]]:
    """The row's generated tokens and their logprobs as listed: all but a final end-of-text (it has no text;
    usage counts it)."""
    n = len(row.token_ids) - (1 if row.token_ids and row.token_ids[-1] == engine.eos else 0)
    return row.token_ids[:n], row.token_logprobs[:n]


def _echo_text(prompt: str | list[int], engine: TextEngine) -> str:
    return prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt)


def _completion_choice(index: int, prompt: str | list[int], row: Generation, engine: TextEngine, echo: bool,
                       k: int | None) -> dict[str, Any]:
    """A completion choice: the text (after the prompt, with echo) and, with `k`, its logprobs."""
    text = _echo_text(prompt, engine) + row.text if echo else row.text
    logprobs = None
    if k is not None:
        ids, entries = _generated(row, engine)
        if echo:
            ids, entries = [*row.prompt_ids, *ids], [*row.prompt_token_logprobs, *entries]
        logprobs = _completion_logprobs(engine, ids, entries, k)
    return {"index": index, "text": text, "finish_reason": row.finish_reason, "logprobs": logprobs}


def _completion_logprobs(engine: TextEngine, ids: list[int], entries: Sequence[TokenLogprobs | None],
                         k: int) -> dict[str, Any]:
    """OpenAI's completion logprobs: each token decoded alone, its logprob, the k most likely tokens and the
    token itself, and where each token starts in the text (decoded tokens laid end to end, as vLLM counts)."""
    texts = _token_texts(engine, [*ids, *(t for e in entries if e is not None for t, _ in e.top[:k])])
    tokens = [texts[t] for t in ids]
    top: list[dict[str, float] | None] = []
    for entry in entries:
        if entry is None:
            top.append(None)
            continue
        alternatives = {texts[t]: _finite(lp) for t, lp in entry.top[:k]}
        alternatives.setdefault(texts[entry.token], _finite(entry.logprob))
        top.append(alternatives)
    return {"tokens": tokens, "token_logprobs": [None if e is None else _finite(e.logprob) for e in entries],
            "top_logprobs": top, "text_offset": list(itertools.accumulate(map(len, tokens), initial=0))[:-1]}


def _chat_logprobs(engine: TextEngine, row: Generation, k: int) -> dict[str, Any]:
    """OpenAI's chat logprobs: per generated token its text, logprob, bytes and the k most likely tokens."""
    ids, entries = _generated(row, engine)
    everything = sorted({*ids, *(t for e in entries for t, _ in e.top[:k])})
    texts = dict(zip(everything, engine.token_texts(everything)))
    raw = dict(zip(everything, engine.token_bytes(everything)))

    def token(t: int, logprob: float) -> dict[str, Any]:
        return {"token": texts[t], "logprob": _finite(logprob), "bytes": raw[t]}

    return {"content": [token(e.token, e.logprob) | {"top_logprobs": [token(t, lp) for t, lp in e.top[:k]]}
                        for e in entries], "refusal": None}


def _token_texts(engine: TextEngine, ids: Sequence[int]) -> dict[int, str]:
    unique = sorted(set(ids))
    return dict(zip(unique, engine.token_texts(unique)))


def _tokenizer_info(engine: TextEngine) -> dict[str, Any]:
    """vLLM's /tokenizer_info: the tokenizer's settings (no file paths), its class, special tokens and chat
    template."""
    tokenizer = engine.tokenizer
    settings = getattr(tokenizer, "init_kwargs", None) or {}
    info = {k: _jsonable(v) for k, v in settings.items() if not k.endswith("_file") and k != "name_or_path"}
    info |= {"tokenizer_class": type(tokenizer).__name__, "eos_token": tokenizer.eos_token,
             "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token}
    if engine.has_chat_template:
        info["chat_template"] = _jsonable(tokenizer.chat_template)
    return info


def _jsonable(value: Any) -> Any:
    """A tokenizer setting as JSON: special tokens as their text, non-finite numbers as null, the rest as text."""
    if hasattr(value, "content"):  # tokenizers' AddedToken
        return value.content
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _single_choice(rows: list[Generation]) -> None:
    if len(rows) != 1:
        raise APIError(400, "streaming takes one prompt and n=1", param="n", code="invalid_value")


def _meta(prefix: str, model: str, engine: TextEngine) -> dict[str, Any]:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model,
            "system_fingerprint": engine.label}


def _usage(rows: Sequence[Generation]) -> dict[str, int]:
    # n choices of one prompt count the prompt once, as OpenAI does.
    prompt = sum(len(ids) for ids in {id(r.prompt_ids): r.prompt_ids for r in rows}.values())
    completion = sum(len(r.token_ids) for r in rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _encode_vector(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.tolist()


def _sse(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield _event(event)
        except APIError as e:  # the status line is sent already: the error comes as the last event
            yield _event(json.loads(e.response().body))
        except Exception as e:
            yield _event(json.loads(error_response(500, f"internal error: {type(e).__name__}: {e}",
                                                   type="server_error", code="internal_error").body))
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _event(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


async def _pieces(server: ModelServer, engine: TextEngine, row: Generation) -> AsyncIterator[str]:
    """The row's text as it is generated (the generation runs in the server's batches)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    loop_thread = threading.get_ident()

    def sink(piece: str | None) -> None:  # from a batch's thread (transformers) or this loop (vLLM: no wake-up)
        if threading.get_ident() == loop_thread:
            queue.put_nowait(piece)
        else:
            loop.call_soon_threadsafe(queue.put_nowait, piece)

    row.sink = sink
    task = asyncio.ensure_future(server.generate(engine, [row]))
    task.add_done_callback(lambda _: queue.put_nowait(None))  # ends the loop below if it failed early
    try:
        while (piece := await queue.get()) is not None:
            yield piece
        await task
    finally:
        row.cancelled = True  # a client that went away stops the row at its next token


async def _completion_chunks(server: ModelServer, engine: TextEngine, row: Generation, meta: dict[str, Any],
                             include_usage: bool, echo: str = "") -> AsyncIterator[dict[str, Any]]:
    head = {**meta, "object": "text_completion"}
    if echo:
        yield {**head, "choices": [{"index": 0, "text": echo, "finish_reason": None, "logprobs": None}]}
    async for piece in _pieces(server, engine, row):
        yield {**head, "choices": [{"index": 0, "text": piece, "finish_reason": None, "logprobs": None}]}
    yield {**head, "choices": [{"index": 0, "text": "", "finish_reason": row.finish_reason, "logprobs": None}]}
    if include_usage:
        yield {**head, "choices": [], "usage": _usage([row])}


async def _chat_chunks(server: ModelServer, engine: TextEngine, row: Generation, meta: dict[str, Any],
                       include_usage: bool) -> AsyncIterator[dict[str, Any]]:
    head = {**meta, "object": "chat.completion.chunk"}
    yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    async for piece in _pieces(server, engine, row):
        yield {**head, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
    yield {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": row.finish_reason}]}
    if include_usage:
        yield {**head, "choices": [], "usage": _usage([row])}
