"""The OpenAI completions and chat-completions wire format: request bodies checked into a
prompt and :class:`~tasks.generation.params.SamplingParams`, and the answers and stream chunks.

Fields follow OpenAI's API (``max_tokens``, ``temperature`` default 1, ``top_p``, ``seed``,
``stop``, ``stream``, ``stream_options``, ``n`` = 1 only) with vLLM's extensions ``top_k``,
``stop_token_ids`` and ``ignore_eos``; OpenAI fields this server does not implement
(penalties, ``logprobs``, ``logit_bias``, ``echo``, ``best_of`` > 1, ``suffix``) are accepted
only at their neutral value, and any other field is refused by name. Every mistake is an
:class:`ApiError` (HTTP 400, OpenAI's ``{"error": {"message", "type", "param", "code"}}``).
Each choice also carries ``token_ids`` (the generated ids; in a stream chunk, that chunk's),
so models without a tokenizer can be served and clients can check tokens.

Chat prompts are rendered by ``transformers``' own ``apply_chat_template`` with the chat
template of an ``hf:`` folder's tokenizer (``tokenizer_config.json`` or
``chat_template.jinja``); our checkpoints' ``tokenizer.json`` carries none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from storage.errors import ConfigError
from tasks.generation.params import SamplingParams

OPENAI_DEFAULT_MAX_TOKENS = 16   # completions; chat defaults to what the context leaves


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.kind, self.headers = status, param, kind, headers

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.status}}


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    n: int = 1
    user: str | None = None
    # OpenAI fields accepted only at their neutral value
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None


class CompletionBody(_Common):
    prompt: Any = None
    echo: bool = False
    best_of: int | None = None
    logprobs: int | None = None
    suffix: str | None = None


class ChatBody(_Common):
    messages: Any = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


NEUTRAL = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": None, "echo": False, "best_of": 1,
           "logprobs": None, "suffix": None, "top_logprobs": None}


@dataclass
class Parsed:
    body: _Common
    prompt: list[int] | None        # token ids (completions); chat: rendered by the service
    params: SamplingParams

    @property
    def include_usage(self) -> bool:
        return bool((self.body.stream_options or {}).get("include_usage"))


def parse_body(raw: bytes, kind: type[_Common]) -> _Common:
    try:
        doc = orjson.loads(raw)
    except ValueError as exc:
        raise ApiError(400, f"the body is not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ApiError(400, f"the body is a JSON {type(doc).__name__}, not an object")
    try:
        body = kind.model_validate(doc)
    except ValidationError as exc:
        raise ApiError(400, *_describe(exc, kind)) from None
    for name, neutral in NEUTRAL.items():
        value = getattr(body, name, neutral)
        if value not in (neutral, None, 0, False) and not (name == "best_of" and value == 1):
            raise ApiError(400, f"{name} is not supported by this server (got {value!r}); leave it out", name)
    if body.n != 1:
        raise ApiError(400, f"n must be 1 (one choice per request; send several requests), got {body.n!r}", "n")
    return body


def _describe(exc: ValidationError, kind: type[BaseModel]) -> tuple[str, str | None]:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(sorted(kind.model_fields))
        return f"unknown field {field!r}; allowed: {allowed}", field
    return f"{field}: {first['msg']} (got {first.get('input')!r})", field


def sampling(body: _Common, max_tokens: int) -> SamplingParams:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    try:
        return SamplingParams(max_new_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k,
                              top_p=body.top_p, seed=body.seed, stop=stop,
                              stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos)
    except ConfigError as exc:
        raise ApiError(400, str(exc).replace("max_new_tokens", "max_tokens")) from None


def completion_prompt(body: CompletionBody, tokenizer) -> list[int]:
    prompt = body.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]    # a batch of one prompt
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send the prompt as a list of token ids", "prompt")
        if not prompt:
            raise ApiError(400, "the prompt is empty: give at least one token", "prompt")
        return tokenizer.encode(prompt).ids
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not prompt:
            raise ApiError(400, "the prompt is empty: give at least one token", "prompt")
        return prompt
    if prompt is None:
        raise ApiError(400, "the body has no prompt: give a string or a list of token ids", "prompt")
    raise ApiError(400, "prompt must be one string or one list of token ids (one prompt per request), "
                        f"got {_short(prompt)}", "prompt")


def chat_messages(body: ChatBody) -> list[dict[str, str]]:
    messages = body.messages
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {\"role\": ..., \"content\": ...}", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ApiError(400, f"messages[{i}] must be an object with a string role and a content, got {_short(m)}",
                           "messages")
        content = m["content"]
        if isinstance(content, list):   # OpenAI content parts: text parts only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string, got {_short(content)}", "messages")
        out.append({"role": m["role"], "content": content})
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class ChatTemplate:
    """An ``hf:`` folder's tokenizer with its chat template (transformers renders it)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - a template refusing these messages (roles out of order ...)
            raise ApiError(400, f"the model's chat template refused these messages: {exc}", "messages") from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def load_chat_template(url: str, storage_options: dict | None = None) -> ChatTemplate | None:
    from tasks.models.hf import PREFIX, local_folder

    if not url.startswith(PREFIX):
        return None
    folder = local_folder(url[len(PREFIX):], storage_options)
    if not any(os.path.isfile(os.path.join(folder, n)) for n in ("tokenizer_config.json", "chat_template.jinja")):
        return None
    from transformers import AutoTokenizer

    try:
        # A local folder, never the hub; tokenizer files are JSON / sentencepiece, never unpickled,
        # and no remote code runs (trust_remote_code stays False).
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{url}: its tokenizer cannot be loaded: {' '.join(str(exc).split())[:300]}") from None
    return ChatTemplate(tokenizer) if getattr(tokenizer, "chat_template", None) else None


# --------------------------------------------------------------------------- answers


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice(chat: bool, text: str, token_ids: list[int], finish_reason: str | None, delta: bool) -> dict:
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason, "token_ids": token_ids}
    key = "delta" if delta else "message"
    message = {"content": text} if delta else {"role": "assistant", "content": text}
    return {"index": 0, key: message, "logprobs": None, "finish_reason": finish_reason, "token_ids": token_ids}


def envelope(chat: bool, request_id: str, created: int, model: str, choices: list, stream: bool,
             usage_doc: dict | None = None) -> dict:
    obj = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
    doc = {"id": ("chatcmpl-" if chat else "cmpl-") + request_id, "object": obj, "created": created, "model": model,
           "choices": choices}
    if usage_doc is not None:
        doc["usage"] = usage_doc
    return doc


def sse(doc: dict | str) -> bytes:
    return b"data: " + (doc.encode() if isinstance(doc, str) else orjson.dumps(doc)) + b"\n\n"
