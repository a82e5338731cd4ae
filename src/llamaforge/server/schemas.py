"""OpenAI's request bodies and error shape: what a request may say, and how a refusal is worded.

Errors always take OpenAI's shape, {"error": {"message", "type", "code", "param"}}.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, field_validator, model_validator

from ..sampling import BIAS_MAX, PENALTY_MAX, SEED_MAX, SEED_MIN

MAX_STOP = 16               # stop strings per request
MAX_STOP_CHARS = 256        # characters per stop string (each is searched for after every token)
MAX_N = 16                  # choices per request (n, best_of); the server's --max-batch bounds them too
MAX_LOGIT_BIAS = 300        # logit_bias entries (OpenAI's limit)
# OpenAI fields that would change the answer and that this server does not implement: refused when
# set rather than ignored like other unknown fields (a client would take the answer for what it asked)
UNSUPPORTED = {"suffix": "insertion (suffix) is not supported by this server",
               "functions": "the legacy functions field is not supported: send tools instead",
               "function_call": "the legacy function_call field is not supported: send tool_choice instead"}


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The client closed the connection before the answer was complete."""


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """The 400 for a body FastAPI could not parse or validate (pydantic's error list)."""
    if any(err.get("type") == "json_invalid" for err in errors):
        detail = errors[0].get("ctx", {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON: {detail}".rstrip(": "))
    first = errors[0] if errors else {}
    # drop pydantic's union-branch tags ("stop.str", "prompt.list[int]") from the field path
    where = ".".join(str(x) for x in first.get("loc", ())[1:]
                     if str(x) not in ("str", "int", "float", "bool") and "[" not in str(x)) or "body"
    return APIError(400, f"{where}: {first.get('msg', 'invalid request')}", param=where)


# -- request bodies (unknown fields are accepted and ignored, as OpenAI clients send many) ------
def check_unicode(value: Any, where: str = "body") -> None:
    """Refuse text JSON can carry but UTF-8 cannot: lone surrogates such as "\\ud800"."""
    todo = [value]          # a stack, not recursion: JSON may nest deeper than Python recurses
    while todo:
        v = todo.pop()
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise ValueError(f"{where} contains a lone surrogate (U+{ord(v[e.start]):04X}); "
                                     "text must be valid Unicode") from None
        elif isinstance(v, dict):
            todo.extend(v.keys())
            todo.extend(v.values())
        elif isinstance(v, list) and not all(type(x) is int for x in v):   # token ids: nothing to see
            todo.extend(v)


class _Body(BaseModel):
    # strict: JSON types as written (true is not 1, 5.0 is not 5, "1" is not a number); no NaN/inf
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _valid_unicode(self):
        for name in type(self).model_fields:
            check_unicode(getattr(self, name), name)
        return self


class Sampling(_Body):
    """The generation options both generation routes take."""
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)                 # llama.cpp extensions
    min_p: float = Field(default=0.0, ge=0, lt=1)
    repetition_penalty: float = Field(default=1.0, gt=0)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float = Field(default=0.0, ge=-PENALTY_MAX, le=PENALTY_MAX)
    frequency_penalty: float = Field(default=0.0, ge=-PENALTY_MAX, le=PENALTY_MAX)
    # {"token id": bias}; the ids are checked against the vocabulary by the server
    logit_bias: dict[str, Annotated[float, Field(ge=-BIAS_MAX, le=BIAS_MAX)]] | None = None
    user: str | None = None           # OpenAI's end-user id: accepted, not used

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v and len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
        for key in v or ():
            if not (key.isascii() and key.isdigit() and len(key) <= 12):
                raise ValueError("keys must be token ids written as decimal strings such as \"1234\", "
                                 f"not {key[:20]!r}")
        return v

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def check_supported(self) -> None:
        """Refuse the UNSUPPORTED fields when set (other unknown fields are ignored)."""
        for name, why in UNSUPPORTED.items():
            if (self.model_extra or {}).get(name) not in (None, "", [], {}):
                raise APIError(400, f"{why}; leave {name} out", param=name)

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP:
            raise APIError(400, f"at most {MAX_STOP} stop strings", param="stop")
        if any(len(s) > MAX_STOP_CHARS for s in stop):
            raise APIError(400, f"a stop string may have at most {MAX_STOP_CHARS} characters", param="stop")
        return tuple(stop)


def _prompt(v: Any, name: str = "prompt") -> Any:
    """A completions prompt (or embeddings input): a string, a list of strings, a list of token ids, or a
    list of lists of ids. Checked in one pass (pydantic's union would list an error per element of a
    million ids)."""
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        first = v[0] if v else ""
        if isinstance(first, str) and all(isinstance(x, str) for x in v):
            return v
        if type(first) is int and all(type(x) is int for x in v):
            return v
        if isinstance(first, list) and all(isinstance(x, list) and all(type(t) is int for t in x) for x in v):
            return v
    raise ValueError(f"{name} must be a string, a list of strings, a list of token ids or a list of lists of token ids")


class CompletionRequest(Sampling):
    prompt: Annotated[Any, PlainValidator(_prompt)]
    max_tokens: int | None = Field(default=16, ge=0)    # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)

    def generated_choices(self) -> int:
        """Answers to generate per prompt: best_of, of which the n best are returned (checked here)."""
        if self.best_of is not None and self.best_of < self.n:
            raise APIError(400, f"best_of ({self.best_of}) must be at least n ({self.n})", param="best_of")
        if self.stream and self.best_of is not None and self.best_of > self.n:
            raise APIError(400, "best_of > n cannot be streamed (the best answers are known only at the end)",
                           param="best_of")
        return self.best_of or self.n


class EmbeddingRequest(_Body):
    input: Annotated[Any, PlainValidator(lambda v: _prompt(v, "input"))]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None           # accepted, not used


class ChatRequest(Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None          # checked by tools.plan
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    content: str | None = None                          # llama.cpp's name for prompt
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True


class LoadLoraRequest(_Body):
    lora_name: str
    lora_path: str


class UnloadLoraRequest(_Body):
    lora_name: str


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


def message_text(m: dict[str, Any]) -> dict[str, Any]:
    """A chat message with list-of-parts content flattened to text (only text parts are understood)."""
    content = m.get("content")
    if content is None and m.get("role") == "assistant" and m.get("tool_calls"):
        return {**m, "content": ""}         # a turn of tool calls only
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise APIError(400, "only text content parts are supported", param="messages")
            texts.append(str(part.get("text", "")))
        m = {**m, "content": "".join(texts)}
    elif not isinstance(content, str):
        raise APIError(400, "message content must be a string or a list of text parts", param="messages")
    return m
