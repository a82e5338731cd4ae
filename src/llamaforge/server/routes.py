"""The HTTP routes. Each reads the shared `Server` from the app's state; shaping is in responses.py."""
from __future__ import annotations

import asyncio
import hmac
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, PlainTextResponse

from ..generate import ContextOverflow
from .metrics import prometheus
from .responses import ChatShape, CompletionShape, collect, event_stream, given, sse_chunks
from .schemas import APIError, ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, message_text
from .service import Piece, Server, TopLogprobs, generated
from .structured import StructuredOutputError, grammar_for

WEB = Path(__file__).parent / "web"


def server(request: Request) -> Server:
    return request.app.state.server


async def auth(request: Request, srv: Server = Depends(server)) -> None:
    if srv.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), srv.api_key.encode()):
        raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
                       if not header else "the API key is not valid", code="invalid_api_key")


open_routes = APIRouter()
router = APIRouter(dependencies=[Depends(auth)])    # /v1/*, /tokenize, /detokenize


# -- plain routes ----------------------------------------------------------------------------------
@open_routes.get("/health")
async def health(srv: Server = Depends(server)):
    s = srv.scheduler
    return {"status": "ok", "model": srv.model_id, "running": s.running, "waiting": s.waiting,
            "max_batch": s.max_batch}


@open_routes.get("/metrics")
async def metrics(srv: Server = Depends(server)):
    return PlainTextResponse(prometheus(srv), media_type="text/plain; version=0.0.4; charset=utf-8")


@open_routes.get("/", include_in_schema=False)
async def index():
    return FileResponse(WEB / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/v1/models")
async def models(srv: Server = Depends(server)):
    return {"object": "list", "data": [{"id": srv.model_id, "object": "model", "created": srv.created,
                                        "owned_by": "llamaforge", "max_model_len": srv.scheduler.max_seq}]}


@router.get("/v1/models/{name:path}")
async def model(name: str, srv: Server = Depends(server)):
    srv.check_model(name)
    return {"id": srv.model_id, "object": "model", "created": srv.created, "owned_by": "llamaforge"}


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, srv: Server = Depends(server)):
    srv.check_model(body.model)
    if body.messages is not None:
        ids = _encode_chat(srv, body.messages)
    else:
        text = body.prompt if body.prompt is not None else body.content
        if text is None:
            raise APIError(400, "give 'prompt' (or 'content') or 'messages'", param="prompt")
        ids = srv.tok.encode(text, bos=bool(srv.tok.add_bos and body.add_special_tokens))
    return {"tokens": ids, "count": len(ids), "max_model_len": srv.scheduler.max_seq}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, srv: Server = Depends(server)):
    srv.check_model(body.model)
    vocab = srv.llm.args.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token ids out of range [0, {vocab}): {bad[:5]}", param="tokens")
    return {"prompt": srv.tok.decode(body.tokens)}


# -- generation ------------------------------------------------------------------------------------
@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, srv: Server = Depends(server)):
    srv.check_model(body.model)
    prompts = _prompts(srv, body.prompt)
    if body.stream and len(prompts) > 1:
        raise APIError(400, "streaming takes a single prompt", param="prompt")
    want_lp = body.logprobs is not None
    jobs = []
    for text, ids in prompts:
        params = srv.sampling(body, body.max_tokens, len(ids), want_lp)
        jobs.append((text, ids, params, TopLogprobs(body.logprobs, srv.tok) if body.logprobs else None))
    shape = CompletionShape(srv.model_id, want_lp, top=bool(body.logprobs),
                            echo=[text for text, _ in prompts] if body.echo else [])
    refusal = await srv.moderate(prompts[0][0], "User", [{"role": "user", "content": prompts[0][0]}])
    if refusal is not None:
        answers = [given(Piece(refusal, "content_filter"))]
        submitted = [None]
    else:
        submitted = [srv.submit(ids, params, top) for _, ids, params, top in jobs]
        answers = [srv.pieces(job, top, want_lp, [{"role": "user", "content": text}])
                   for job, (text, _, _, top) in zip(submitted, jobs)]
    n_prompt = sum(len(ids) for _, ids in prompts)
    if body.stream:
        usage = (lambda: srv.usage(n_prompt, generated(submitted[0]))) if body.include_usage else None
        return event_stream(sse_chunks(shape, answers[0], usage))
    outs = await _collect_all(srv, request, [j for j in submitted if j is not None], answers)
    choices = [shape.whole(i, *out) for i, out in enumerate(outs)]
    return shape.response(choices, srv.usage(n_prompt, sum(generated(j) for j in submitted)))


@router.post("/v1/chat/completions")
async def chat(body: ChatRequest, request: Request, srv: Server = Depends(server)):
    srv.check_model(body.model)
    messages = [message_text(m) for m in body.messages]
    ids = _encode_chat(srv, messages)
    processor = None
    try:
        grammar = grammar_for(body.response_format)
        if grammar is not None:
            processor = await asyncio.to_thread(srv.constrainer.processor, grammar)
    except StructuredOutputError as e:
        raise APIError(400, str(e), param="response_format") from e
    top = TopLogprobs(body.top_logprobs, srv.tok, processor) if body.logprobs and body.top_logprobs else None
    params = srv.sampling(body, body.max_completion_tokens if body.max_completion_tokens is not None
                          else body.max_tokens, len(ids), body.logprobs)
    shape = ChatShape(srv.model_id, body.logprobs)
    job = None
    last_user = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    refusal = await srv.moderate(last_user, "User", messages)
    if refusal is not None:
        answer = given(Piece(refusal, "content_filter"))
    else:
        job = srv.submit(ids, params, top or processor)
        answer = srv.pieces(job, top, body.logprobs, messages)
    if body.stream:
        usage = (lambda: srv.usage(len(ids), generated(job))) if body.include_usage else None
        return event_stream(sse_chunks(shape, answer, usage))
    (out,) = await _collect_all(srv, request, [job] if job is not None else [], [answer])
    return shape.response([shape.whole(0, *out)], srv.usage(len(ids), generated(job)))


# -- helpers -----------------------------------------------------------------------------------------
async def _collect_all(srv: Server, request: Request, jobs: list, answers: list) -> list[tuple[str, list, str]]:
    """Every answer whole; a client that leaves meanwhile cancels all of the request's jobs."""
    watcher = asyncio.create_task(srv.watch(request, jobs))
    try:
        return await asyncio.gather(*(collect(a) for a in answers))
    finally:
        watcher.cancel()


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
