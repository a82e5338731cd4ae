"""`llamaforge serve`: an OpenAI-compatible HTTP server with continuous batching and a web chat page.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (JSON or SSE streaming),
GET /health, POST /tokenize, POST /detokenize, GET /metrics (Prometheus text), GET / (chat page).
Every generation goes through one `Scheduler`, so concurrent requests decode in one batched forward.
Errors use OpenAI's shape: {"error": {"message", "type", "code", "param"}}.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Literal

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generate import ContextOverflow, TokenEvent
from ..sampling import SamplingParams
from .scheduler import Job, QueueFull, Scheduler
from .structured import Constrainer, StructuredOutputError, grammar_for

log = logging.getLogger(__name__)

WEB = Path(__file__).parent / "web"
DEFAULT_CTX = 2048          # KV cache per slot when --ctx is not given (the cache is slots x ctx)


# -- errors ----------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "code": self.code,
                                       "param": self.param}}, status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The client closed the connection before the answer was complete."""


# -- request bodies (unknown fields are accepted and ignored, as OpenAI clients send many) ------
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)                 # llama.cpp extensions
    min_p: float = Field(default=0.0, ge=0, lt=1)
    repetition_penalty: float = Field(default=1.0, gt=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)    # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    content: str | None = None                          # llama.cpp's name for prompt
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


# -- the server state --------------------------------------------------------------------------
@dataclass
class _Output:
    """What a finished generation hands back to the route."""
    text: str = ""
    finish_reason: str = "length"
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[str, float]] = field(default_factory=list)


class _TopLogprobs:
    """A logits processor that only watches: keeps the k most likely tokens at each step."""

    def __init__(self, k: int, tokenizer, inner=None):
        self.k, self.tok, self.inner, self.steps = k, tokenizer, inner, []

    def __call__(self, out: list[int], logits: torch.Tensor) -> torch.Tensor:
        if self.inner is not None:
            logits = self.inner(out, logits)
        lp = torch.log_softmax(logits.float(), -1)
        vals, ids = torch.topk(lp, self.k)
        self.steps.append({self.tok.decode([int(i)]): float(v) for v, i in zip(vals, ids)})
        return logits


class Server:
    """Routes' shared state: the model, its scheduler, options."""

    def __init__(self, llm, *, model_id: str, api_key: str | None, max_batch: int, ctx: int, max_queue: int,
                 guard=None):
        self.llm = llm
        self.tok = llm.tokenizer
        self.model_id = model_id
        self.api_key = api_key
        self.guard = guard
        self.scheduler = Scheduler(llm.model, llm.tokenizer, max_batch=max_batch, max_seq=ctx, max_queue=max_queue)
        self.constrainer = Constrainer(llm.tokenizer, llm.args.vocab_size)
        self.created = int(time.time())
        self.http_errors: dict[int, int] = {}

    # -- shared steps ---------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name and name != self.model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_id!r}",
                           code="model_not_found", param="model")

    def sampling(self, body: _Sampling, max_tokens: int | None, prompt_len: int, logprobs: bool) -> SamplingParams:
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        if body.presence_penalty or body.frequency_penalty:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported; "
                                "use repetition_penalty", param="presence_penalty")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 16:
            raise APIError(400, "at most 16 stop strings", param="stop")
        try:
            self.scheduler.check_prompt(prompt_len)
        except ContextOverflow as e:
            raise APIError(400, str(e), code="context_length_exceeded", param="messages") from e
        except ValueError as e:
            raise APIError(400, str(e), param="prompt") from e
        room = self.scheduler.max_seq - prompt_len
        try:
            return SamplingParams(max_tokens=room if max_tokens is None else min(max_tokens, max(room, 0)),
                                  temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                  min_p=body.min_p, repetition_penalty=body.repetition_penalty, seed=body.seed,
                                  stop=tuple(stop), logprobs=logprobs)
        except ValueError as e:
            raise APIError(400, str(e)) from e

    def submit(self, prompt: list[int], params: SamplingParams, processor=None) -> Job:
        try:
            return self.scheduler.submit(prompt, params, processor)
        except ContextOverflow as e:
            raise APIError(400, str(e), code="context_length_exceeded", param="messages") from e
        except QueueFull as e:
            raise APIError(429, str(e), type="server_overloaded", code="queue_full",
                           headers={"Retry-After": "1"}) from e
        except ValueError as e:
            raise APIError(400, str(e)) from e

    async def collect(self, request: Request, job: Job, top: _TopLogprobs | None = None) -> _Output:
        """Wait for a whole answer; a client that leaves meanwhile cancels it."""
        watcher = asyncio.create_task(self._watch_disconnect(request, job))
        out = _Output()
        pieces = []
        try:
            async for ev in self.scheduler.stream(job):
                pieces.append(ev.text)
                if ev.finish_reason:
                    out.finish_reason = ev.finish_reason
        finally:
            watcher.cancel()
        out.text = "".join(pieces)
        out.tokens = list(job.seq.out) if job.seq is not None else []
        out.logprobs = list(job.seq.logprobs) if job.seq is not None else []
        out.top = top.steps[:len(out.tokens)] if top is not None else []
        return out

    async def _watch_disconnect(self, request: Request, job: Job) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self.scheduler.cancel(job)
                job.events.put_nowait(ClientGone())
                return

    async def moderate(self, text: str, role: str, context: list[dict[str, Any]]) -> str | None:
        """The guard's refusal when text is unsafe, else None."""
        if self.guard is None:
            return None
        verdict = await asyncio.to_thread(self.guard.check, text, role=role, context=context)
        return None if verdict.safe else self.guard.refusal(verdict)

    def token_text(self, tid: int) -> str:
        return self.tok.decode([tid])

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _message_text(m: dict[str, Any]) -> dict[str, Any]:
    """A chat message with list-of-parts content flattened to text (only text parts are understood)."""
    content = m.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise APIError(400, "only text content parts are supported", param="messages")
            texts.append(str(part.get("text", "")))
        m = {**m, "content": "".join(texts)}
    elif content is None:
        m = {**m, "content": ""}
    elif not isinstance(content, str):
        raise APIError(400, "message content must be a string or a list of text parts", param="messages")
    return m


# -- the app -----------------------------------------------------------------------------------
def create_app(llm, *, model_id: str | None = None, api_key: str | None = None, max_batch: int = 8,
               ctx: int | None = None, max_queue: int = 64, guard=None) -> FastAPI:
    """The FastAPI app serving `llm` (a llamaforge.api.Llama); the scheduler runs while the app does."""
    ctx = min(ctx or DEFAULT_CTX, llm.args.max_seq_len)
    srv = Server(llm, model_id=model_id or "llamaforge", api_key=api_key, max_batch=max_batch, ctx=ctx,
                 max_queue=max_queue, guard=guard)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        srv.scheduler.start()
        try:
            yield
        finally:
            srv.scheduler.close()

    app = FastAPI(title="llamaforge", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = srv

    # -- errors in OpenAI's shape --------------------------------------------------------------
    def _count(status: int) -> None:
        srv.http_errors[status] = srv.http_errors.get(status, 0) + 1

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        _count(e.status)
        return e.response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        _count(500)
        return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").response()

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, e: ClientGone):
        return Response(status_code=499)   # nobody reads it: the connection is closed

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errs = e.errors()
        if any(err.get("type") == "json_invalid" for err in errs):
            err = APIError(400, f"the request body is not valid JSON: {errs[0].get('ctx', {}).get('error', '')}".rstrip(": "))
        else:
            first = errs[0] if errs else {}
            # drop pydantic's union-branch tags ("stop.str", "prompt.list[int]") from the field path
            where = ".".join(str(x) for x in first.get("loc", ())[1:]
                             if str(x) not in ("str", "int", "float", "bool") and "[" not in str(x)) or "body"
            err = APIError(400, f"{where}: {first.get('msg', 'invalid request')}", param=where)
        _count(400)
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        _count(e.status_code)
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return APIError(e.status_code, str(e.detail), code=code).response()

    async def auth(request: Request) -> None:
        if srv.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), srv.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
                           if not header else "the API key is not valid", code="invalid_api_key")

    guarded = [Depends(auth)]

    # -- plain routes --------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        s = srv.scheduler
        return {"status": "ok", "model": srv.model_id, "running": s.running, "waiting": s.waiting,
                "max_batch": s.max_batch}

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        return {"object": "list", "data": [{"id": srv.model_id, "object": "model", "created": srv.created,
                                            "owned_by": "llamaforge", "max_model_len": srv.scheduler.max_seq}]}

    @app.get("/v1/models/{name:path}", dependencies=guarded)
    async def model(name: str):
        srv.check_model(name)
        return {"id": srv.model_id, "object": "model", "created": srv.created, "owned_by": "llamaforge"}

    @app.post("/tokenize", dependencies=guarded)
    async def tokenize(body: TokenizeRequest):
        srv.check_model(body.model)
        if body.messages is not None:
            ids = _encode_chat(srv, body.messages)
        else:
            text = body.prompt if body.prompt is not None else body.content
            if text is None:
                raise APIError(400, "give 'prompt' (or 'content') or 'messages'", param="prompt")
            ids = srv.tok.encode(text, bos=bool(srv.tok.add_bos and body.add_special_tokens))
        return {"tokens": ids, "count": len(ids), "max_model_len": srv.scheduler.max_seq}

    @app.post("/detokenize", dependencies=guarded)
    async def detokenize(body: DetokenizeRequest):
        srv.check_model(body.model)
        vocab = srv.llm.args.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids out of range [0, {vocab}): {bad[:5]}", param="tokens")
        return {"prompt": srv.tok.decode(body.tokens)}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_prometheus(srv), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(WEB / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=WEB), name="static")

    # -- completions ---------------------------------------------------------------------------
    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request):
        srv.check_model(body.model)
        prompts = _prompts(srv, body.prompt)
        if body.stream and len(prompts) > 1:
            raise APIError(400, "streaming takes a single prompt", param="prompt")
        want_lp = body.logprobs is not None
        jobs = []
        for text, ids in prompts:
            params = srv.sampling(body, body.max_tokens, len(ids), want_lp)
            top = _TopLogprobs(body.logprobs, srv.tok) if body.logprobs else None
            jobs.append((text, ids, params, top))
        refusal = await srv.moderate(prompts[0][0], "User", [{"role": "user", "content": prompts[0][0]}]) \
            if srv.guard is not None else None
        rid, created = _new_id("cmpl"), int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": srv.model_id}
        if refusal is not None:
            return _refused_completion(head, refusal, body.stream, srv.usage(len(prompts[0][1]), 0))
        submitted = [(text, ids, srv.submit(ids, params, top), top) for text, ids, params, top in jobs]
        if body.stream:
            text, ids, job, top = submitted[0]
            return _stream(_completion_chunks(srv, request, head, job, top, body, text, len(ids)))
        choices, n_prompt, n_out = [], 0, 0
        outs = await asyncio.gather(*(srv.collect(request, job, top) for _, _, job, top in submitted))
        for i, ((text, ids, job, top), out) in enumerate(zip(submitted, outs)):
            answer = out.text
            if srv.guard is not None:
                answer = await srv.moderate(answer, "Agent", [{"role": "user", "content": text},
                                                              {"role": "assistant", "content": answer}]) or answer
            choices.append({"index": i, "text": (text if body.echo else "") + answer,
                            "logprobs": _completion_logprobs(srv, out) if want_lp else None,
                            "finish_reason": out.finish_reason})
            n_prompt += len(ids)
            n_out += len(out.tokens)
        return {**head, "choices": choices, "usage": srv.usage(n_prompt, n_out)}

    # -- chat ----------------------------------------------------------------------------------
    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat(body: ChatRequest, request: Request):
        srv.check_model(body.model)
        messages = [_message_text(m) for m in body.messages]
        ids = _encode_chat(srv, messages)
        processor = None
        try:
            grammar = grammar_for(body.response_format)
            if grammar is not None:
                processor = await asyncio.to_thread(srv.constrainer.processor, grammar)
        except StructuredOutputError as e:
            raise APIError(400, str(e), param="response_format") from e
        top = _TopLogprobs(body.top_logprobs, srv.tok, processor) if body.logprobs and body.top_logprobs else None
        params = srv.sampling(body, body.max_completion_tokens if body.max_completion_tokens is not None
                              else body.max_tokens, len(ids), body.logprobs)
        rid, created = _new_id("chatcmpl"), int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": created, "model": srv.model_id}
        if srv.guard is not None:
            last_user = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
            refusal = await srv.moderate(last_user, "User", messages)
            if refusal is not None:
                return _refused_chat(head, refusal, body.stream, srv.usage(len(ids), 0))
        job = srv.submit(ids, params, top or processor)
        if body.stream:
            return _stream(_chat_chunks(srv, request, head, job, top, body, messages, len(ids)))
        out = await srv.collect(request, job, top)
        answer = out.text
        if srv.guard is not None:
            refusal = await srv.moderate(answer, "Agent", messages + [{"role": "assistant", "content": answer}])
            if refusal is not None:
                answer, out.finish_reason = refusal, "content_filter"
        return {**head, "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                     "logprobs": _chat_logprobs(srv, out) if body.logprobs else None,
                                     "finish_reason": out.finish_reason}],
                "usage": srv.usage(len(ids), len(out.tokens))}

    return app


# -- helpers of the routes ---------------------------------------------------------------------
def _encode_chat(srv: Server, messages: list[dict[str, Any]]) -> list[int]:
    try:
        return srv.llm.encode_chat(messages)
    except ContextOverflow as e:
        raise APIError(400, str(e), code="context_length_exceeded", param="messages") from e
    except (ValueError, TypeError, KeyError) as e:   # ChatFormatError is a ValueError
        raise APIError(400, f"cannot format these messages: {e}", param="messages") from e


def _prompts(srv: Server, prompt) -> list[tuple[str, list[int]]]:
    """(text, ids) for each prompt of a completions request."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append((p, srv.tok.encode(p, bos=bool(srv.tok.add_bos))))
        else:
            vocab = srv.llm.args.vocab_size
            if any(not 0 <= t < vocab for t in p):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            out.append((srv.tok.decode(p), list(p)))
    return out


def _stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _lp_entries(srv: Server, ev: TokenEvent, top: _TopLogprobs | None, index: int) -> dict[str, Any]:
    text = srv.token_text(ev.id)
    tops = top.steps[index] if top is not None and index < len(top.steps) else {}
    return {"token": text, "logprob": ev.logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in tops.items()]}


def _answer_event(srv: Server, ev: TokenEvent) -> bool:
    """Whether the event's token belongs to the answer (the end-of-generation token does not)."""
    return ev.id >= 0 and not (ev.finish_reason == "stop" and ev.id in (getattr(srv.tok, "eog_ids", ()) or ()))


async def _chat_chunks(srv: Server, request: Request, head: dict, job: Job, top: _TopLogprobs | None,
                       body: ChatRequest, messages: list[dict], n_prompt: int) -> AsyncIterator[str]:
    head = {**head, "object": "chat.completion.chunk"}
    yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None}]})
    n_out, held, reason = 0, [], "length"
    try:
        async for ev in srv.scheduler.stream(job):
            lp = None
            if _answer_event(srv, ev):
                if body.logprobs:
                    lp = {"content": [_lp_entries(srv, ev, top, n_out)]}
                n_out += 1
            reason = ev.finish_reason or reason
            if srv.guard is not None:   # moderated output is released only once it is checked
                held.append(ev.text)
                continue
            if ev.text or lp or ev.finish_reason:
                delta = {"content": ev.text} if ev.text else {}
                yield _sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": lp,
                                                 "finish_reason": ev.finish_reason}]})
    except Exception as e:  # noqa: BLE001 - the status line is gone; report the error in the stream
        log.exception("generation failed")
        yield _sse({"error": {"message": str(e), "type": "server_error", "code": None, "param": None}})
        yield "data: [DONE]\n\n"
        return
    if srv.guard is not None:
        text = "".join(held)
        refusal = await srv.moderate(text, "Agent", messages + [{"role": "assistant", "content": text}])
        if refusal is not None:
            text, reason = refusal, "content_filter"
        yield _sse({**head, "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None,
                                         "finish_reason": reason}]})
    if (body.stream_options or {}).get("include_usage"):
        yield _sse({**head, "choices": [], "usage": srv.usage(n_prompt, n_out)})
    yield "data: [DONE]\n\n"


async def _completion_chunks(srv: Server, request: Request, head: dict, job: Job, top: _TopLogprobs | None,
                             body: CompletionRequest, prompt_text: str, n_prompt: int) -> AsyncIterator[str]:
    n_out, held, reason = 0, [], "length"
    if body.echo and prompt_text:
        yield _sse({**head, "choices": [{"index": 0, "text": prompt_text, "logprobs": None, "finish_reason": None}]})
    try:
        async for ev in srv.scheduler.stream(job):
            lp = None
            if _answer_event(srv, ev):
                if body.logprobs is not None:
                    e = _lp_entries(srv, ev, top, n_out)
                    lp = {"tokens": [e["token"]], "token_logprobs": [e["logprob"]],
                          "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]}] if top else None,
                          "text_offset": [0]}
                n_out += 1
            reason = ev.finish_reason or reason
            if srv.guard is not None:
                held.append(ev.text)
                continue
            if ev.text or lp or ev.finish_reason:
                yield _sse({**head, "choices": [{"index": 0, "text": ev.text, "logprobs": lp,
                                                 "finish_reason": ev.finish_reason}]})
    except Exception as e:  # noqa: BLE001
        log.exception("generation failed")
        yield _sse({"error": {"message": str(e), "type": "server_error", "code": None, "param": None}})
        yield "data: [DONE]\n\n"
        return
    if srv.guard is not None:
        text = "".join(held)
        refusal = await srv.moderate(text, "Agent", [{"role": "user", "content": prompt_text},
                                                     {"role": "assistant", "content": text}])
        if refusal is not None:
            text, reason = refusal, "content_filter"
        yield _sse({**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]})
    if (body.stream_options or {}).get("include_usage"):
        yield _sse({**head, "choices": [], "usage": srv.usage(n_prompt, n_out)})
    yield "data: [DONE]\n\n"


def _completion_logprobs(srv: Server, out: _Output) -> dict[str, Any]:
    tokens = [srv.token_text(t) for t in out.tokens]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": out.logprobs[:len(tokens)],
            "top_logprobs": out.top if out.top else None, "text_offset": offsets}


def _chat_logprobs(srv: Server, out: _Output) -> dict[str, Any]:
    content = []
    for i, (tid, lp) in enumerate(zip(out.tokens, out.logprobs)):
        text = srv.token_text(tid)
        tops = out.top[i] if i < len(out.top) else {}
        content.append({"token": text, "logprob": lp, "bytes": list(text.encode()),
                        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in tops.items()]})
    return {"content": content}


def _refused_chat(head: dict, refusal: str, stream: bool, usage: dict) -> Any:
    if not stream:
        return {**head, "choices": [{"index": 0, "message": {"role": "assistant", "content": refusal},
                                     "logprobs": None, "finish_reason": "content_filter"}], "usage": usage}
    head = {**head, "object": "chat.completion.chunk"}

    async def chunks():
        yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": refusal},
                                         "logprobs": None, "finish_reason": "content_filter"}]})
        yield "data: [DONE]\n\n"
    return _stream(chunks())


def _refused_completion(head: dict, refusal: str, stream: bool, usage: dict) -> Any:
    choice = {"index": 0, "text": refusal, "logprobs": None, "finish_reason": "content_filter"}
    if not stream:
        return {**head, "choices": [choice], "usage": usage}

    async def chunks():
        yield _sse({**head, "choices": [choice]})
        yield "data: [DONE]\n\n"
    return _stream(chunks())


def _prometheus(srv: Server) -> str:
    s, st = srv.scheduler, srv.scheduler.stats
    lines: list[str] = []

    def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value}")

    metric("llamaforge_requests_running", "gauge", "Sequences decoding in the batch.", [("", s.running)])
    metric("llamaforge_requests_waiting", "gauge", "Requests queued for a batch slot.", [("", s.waiting)])
    metric("llamaforge_batch_slots", "gauge", "Batch slots (max concurrent sequences).", [("", s.max_batch)])
    metric("llamaforge_context_tokens", "gauge", "Context window per sequence.", [("", s.max_seq)])
    metric("llamaforge_requests_total", "counter", "Requests admitted into the batch.", [("", st.requests_total)])
    metric("llamaforge_requests_rejected_total", "counter", "Requests refused because the queue was full.",
           [("", st.rejected_total)])
    metric("llamaforge_requests_cancelled_total", "counter", "Requests whose client left before the end.",
           [("", st.cancelled_total)])
    metric("llamaforge_requests_failed_total", "counter", "Requests that failed in the scheduler.",
           [("", st.failed_total)])
    metric("llamaforge_requests_finished_total", "counter", "Requests finished, by finish_reason.",
           [(f'{{finish_reason="{k}"}}', v) for k, v in sorted(dict(st.finished).items())] or [('{finish_reason="stop"}', 0)])
    metric("llamaforge_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.",
           [("", st.prompt_tokens_total)])
    metric("llamaforge_prompt_tokens_reused_total", "counter",
           "Prompt tokens whose keys/values were copied from a cached common prefix instead of prefilled.",
           [("", st.prompt_tokens_reused_total)])
    metric("llamaforge_generation_tokens_total", "counter", "Tokens generated.", [("", st.generated_tokens_total)])
    metric("llamaforge_decode_steps_total", "counter", "Batched decode steps.", [("", st.steps_total)])
    metric("llamaforge_decode_rows_total", "counter", "Sequences advanced, summed over steps (mean batch = rows/steps).",
           [("", st.step_rows_total)])
    metric("llamaforge_decode_seconds_total", "counter", "Time in decode steps.", [("", round(st.step_seconds_total, 6))])
    metric("llamaforge_prefill_seconds_total", "counter", "Time prefilling prompts.",
           [("", round(st.prefill_seconds_total, 6))])
    metric("llamaforge_queue_wait_seconds_total", "counter", "Time requests waited for a slot.",
           [("", round(st.queue_wait_seconds_total, 6))])
    metric("llamaforge_time_to_first_token_seconds", "summary", "Submission to first generated token.",
           [("_sum", round(st.ttft_seconds_total, 6)), ("_count", st.ttft_count)])
    metric("llamaforge_http_errors_total", "counter", "Error responses, by status.",
           [(f'{{status="{k}"}}', v) for k, v in sorted(srv.http_errors.items())] or [('{status="400"}', 0)])
    return "\n".join(lines) + "\n"


# -- the command -------------------------------------------------------------------------------
def _on_a_passing_thread(fn):
    """fn() on a thread that then exits, so this (main) thread never runs torch ops.

    libgomp gives every thread that runs parallel torch ops an OpenMP team of its own, kept until
    that thread exits. Loading on the main thread and decoding on the scheduler thread made two
    teams; with more team threads than cores libgomp stops spinning between ops, and decode on
    2 cores ran at the passive-wait speed. The loader's team goes away with its thread.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = e
    t = threading.Thread(target=run, name="llamaforge-load", daemon=True)   # Ctrl-C still ends the process
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def serve(*, model: str | None = None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 8, ctx: int | None = None, max_queue: int = 64, guard: bool = False,
          quantize: Literal["auto", "none", "int8", "int4"] = "auto") -> int:
    """Serve a model over an OpenAI-compatible HTTP API with continuous batching and a web chat page at /.

    model: checkpoint (Meta folder, HF folder or .gguf); the bundled SmolLM2 when omitted
    host: address to listen on (127.0.0.1 keeps it on this machine)
    port: TCP port
    api_key: require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize
    max_batch: sequences decoded together (KV cache slots)
    ctx: context window per sequence (default min(model's, 2048)); the KV cache holds max_batch x ctx tokens
    max_queue: requests that may wait for a slot; beyond it the server answers 429
    guard: moderate user input and model output with llamaforge's guard
    quantize: auto computes with a GGUF's quantized blocks (native kernels); none dequantizes to float32; int8/int4 repack any checkpoint for PyTorch's kernels
    """
    import uvicorn

    from ..commands import _quantize

    from ..api import Llama
    from ..paths import default_model_path
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is not in 1..65535")
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    if ctx is not None and ctx < 2:
        raise ValueError("ctx must be >= 2")
    if quantize not in ("auto", "none", "int8", "int4", None):
        raise ValueError(f"quantize must be auto, none, int8 or int4 (got {quantize!r})")
    checker = None
    if guard:
        try:
            from ..safety.guard import Guard
        except ImportError as e:
            raise ValueError("--guard needs llamaforge.safety.guard, which is not available in this install") from e
        checker = _on_a_passing_thread(Guard.load)
    path = Path(model) if model else default_model_path()
    llm = _on_a_passing_thread(lambda: Llama.load(path, quantize=_quantize(quantize), progress=True))
    model_id = path.stem if path.is_file() else path.name
    app = create_app(llm, model_id=model_id, api_key=api_key, max_batch=max_batch, ctx=ctx, max_queue=max_queue,
                     guard=checker)
    srv = app.state.server
    print(f"llamaforge: serving {model_id!r} on http://{host}:{port}  (batch {max_batch}, context "
          f"{srv.scheduler.max_seq}, queue {max_queue}{', guarded' if checker else ''})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
