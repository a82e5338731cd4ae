"""The HTTP routes. Each reads the shared `Server` from the app's state; shaping is in responses.py."""
from __future__ import annotations

import asyncio
import base64
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse

from .metrics import prometheus
from .responses import ChatShape, CompletionShape, EventStream, collect, given, sse_chunks, tool_pieces
from .schemas import (APIError, ChatRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest, LoadLoraRequest,
                      TokenizeRequest, UnloadLoraRequest, message_text)
from .service import Piece, Server, TopLogprobs, generated
from .structured import StructuredOutputError, response_schema, schema_grammar
from .tools import check_history, grammar as tool_grammar, plan

WEB = Path(__file__).parent / "web"


def server(request: Request) -> Server:
    return request.app.state.server


open_routes = APIRouter()
router = APIRouter()         # /v1/*, /tokenize, /detokenize: behind the API key (gate.py)


# -- plain routes ----------------------------------------------------------------------------------
@open_routes.get("/health")
async def health(srv: Server = Depends(server)):
    s = srv.scheduler
    return {"status": "ok", "model": srv.model_id, "running": s.running, "waiting": s.waiting,
            "max_batch": s.max_batch, "slots": s.slots, "threads": s.threads_in_use}


@open_routes.get("/metrics")
async def metrics(srv: Server = Depends(server)):
    return PlainTextResponse(prometheus(srv), media_type="text/plain; version=0.0.4; charset=utf-8")


@open_routes.get("/", include_in_schema=False)
async def index():
    return FileResponse(WEB / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/v1/models")
async def models(srv: Server = Depends(server)):
    base = {"id": srv.model_id, "object": "model", "created": srv.created, "owned_by": "llamaforge",
            "max_model_len": srv.scheduler.max_seq}
    # LoRA adapters as models of their own, with the base as parent (vLLM's listing)
    return {"object": "list", "data": [base] + [{**base, "id": n, "parent": srv.model_id, "root": n}
                                                 for n in srv.adapter_names]}


@router.get("/v1/models/{name:path}")
async def model(name: str, srv: Server = Depends(server)):
    adapter = srv.check_model(name)
    out = {"id": adapter or srv.model_id, "object": "model", "created": srv.created, "owned_by": "llamaforge"}
    return {**out, "parent": srv.model_id} if adapter else out


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoraRequest, srv: Server = Depends(server)):
    """Load a PEFT adapter folder under a model name (only with serve --allow-lora-updates)."""
    await srv.load_adapter(body.lora_name, body.lora_path)
    return {"status": "ok", "lora_name": body.lora_name}


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraRequest, srv: Server = Depends(server)):
    await srv.unload_adapter(body.lora_name)
    return {"status": "ok", "lora_name": body.lora_name}


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, srv: Server = Depends(server)):
    srv.check_model(body.model)
    if body.messages is not None:
        ids = await srv.encode_chat([message_text(m) for m in body.messages])
    else:
        text = body.prompt if body.prompt is not None else body.content
        if text is None:
            raise APIError(400, "give 'prompt' (or 'content') or 'messages'", param="prompt")
        ids = await srv.encode(text, "prompt", bos=bool(srv.tok.add_bos and body.add_special_tokens))
    return {"tokens": ids, "count": len(ids), "max_model_len": srv.scheduler.max_seq}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, srv: Server = Depends(server)):
    srv.check_model(body.model)
    vocab = srv.llm.args.vocab_size
    if len(body.tokens) > srv.scheduler.max_seq:
        raise APIError(400, f"at most {srv.scheduler.max_seq} tokens (the context window)", param="tokens")
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token ids out of range [0, {vocab}): {bad[:5]}", param="tokens")
    return {"prompt": srv.tok.decode(body.tokens)}


# -- generation ------------------------------------------------------------------------------------
@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, srv: Server = Depends(server)):
    adapter = srv.check_model(body.model)    # a LoRA adapter's name runs the request with it
    k = body.generated_choices()       # answers generated per prompt (best_of), n of them returned
    srv.check_choices(body, k, "best_of" if body.best_of else "n")
    prompts = await _prompts(srv, body.prompt, k)
    if body.stream and len(prompts) > 1:
        raise APIError(400, "streaming takes a single prompt", param="prompt")
    want_lp = body.logprobs is not None
    # best_of ranks answers by their tokens' logprobs, so they are recorded even when not returned
    params = [srv.sampling(body, body.max_tokens, len(ids), want_lp or k > body.n, "prompt") for _, ids in prompts]
    # one job per (prompt, choice), prompt-major: choice j of prompt i is job i * k + j
    runs = [(i, p) for i, base in enumerate(params) for p in srv.per_choice(base, k)]
    tops = [TopLogprobs(body.logprobs, srv.tok) if body.logprobs else None for _ in runs]
    shape = CompletionShape(adapter or srv.model_id, want_lp, top=bool(body.logprobs),
                            echo=[text for text, _ in prompts for _ in range(body.n)] if body.echo else [])
    refusals = await srv.screen([("User", text) for text, _ in prompts])
    todo = [r for r, (i, _) in enumerate(runs) if refusals[i] is None]
    jobs: list = [None] * len(runs)
    for r, job in zip(todo, srv.submit_all([(prompts[runs[r][0]][1], runs[r][1], tops[r]) for r in todo], adapter)):
        jobs[r] = job
    answers = [given(Piece(refusals[i], "content_filter")) if job is None else
               srv.pieces(job, top, want_lp, [{"role": "user", "content": prompts[i][0]}])
               for job, top, (i, _) in zip(jobs, tops, runs)]
    n_prompt = sum(len(ids) for _, ids in prompts)     # each prompt once, however many choices

    def usage() -> dict[str, int]:    # every generated answer counts, best_of's discarded ones too
        return srv.usage(n_prompt, sum(generated(j) for j in jobs))
    if body.stream:
        return EventStream(sse_chunks(shape, answers, usage if body.include_usage else None),
                           lambda: srv.cancel_all(jobs))
    outs = await _collect_all(srv, request, jobs, answers)
    if k > body.n:
        outs = [out for i in range(len(prompts)) for out in _best(outs[i * k:(i + 1) * k], jobs[i * k:(i + 1) * k],
                                                                   body.n)]
    choices = [shape.whole(i, *out) for i, out in enumerate(outs)]
    return shape.response(choices, usage())


@router.post("/v1/chat/completions")
async def chat(body: ChatRequest, request: Request, srv: Server = Depends(server)):
    adapter = srv.check_model(body.model)
    srv.check_choices(body, body.n)
    tools = await asyncio.to_thread(plan, body.tools, body.tool_choice, body.parallel_tool_calls)
    calling = tools is not None and tools.active       # the answer may hold tool calls
    check_history(body.messages)
    messages = [message_text(m) for m in body.messages]
    ids = await srv.encode_chat(messages, tools)
    try:
        schema = response_schema(body.response_format)
        if calling:
            grammar = await asyncio.to_thread(tool_grammar, tools, schema)
        else:
            grammar = None if schema is None else await asyncio.to_thread(schema_grammar, schema)
        # a grammar's matcher follows one answer: one per choice
        processors = [None if grammar is None else await asyncio.to_thread(srv.constrainer.processor, grammar)
                      for _ in range(body.n)]
    except StructuredOutputError as e:
        raise APIError(400, str(e), param="response_format") from e
    tops = [TopLogprobs(body.top_logprobs, srv.tok, p) if body.logprobs and body.top_logprobs else None
            for p in processors]
    params = srv.sampling(body, body.max_completion_tokens if body.max_completion_tokens is not None
                          else body.max_tokens, len(ids), body.logprobs, "messages")
    shape = ChatShape(adapter or srv.model_id, body.logprobs)
    # every turn the client sends is input, its own "assistant" turns included
    verdicts = await srv.screen([("Agent" if m.get("role") == "assistant" else "User", m["content"])
                                 for m in messages])
    refusal = next((r for r in verdicts if r is not None), None)
    if refusal is not None:
        jobs: list = [None] * body.n
        answers = [given(Piece(refusal, "content_filter")) for _ in jobs]
    else:
        jobs = srv.submit_all([(ids, p, top or proc)
                               for p, top, proc in zip(srv.per_choice(params, body.n), tops, processors)], adapter)
        answers = [srv.pieces(job, top, body.logprobs, messages) for job, top in zip(jobs, tops)]
        if calling:
            answers = [tool_pieces(a) for a in answers]

    def usage() -> dict[str, int]:    # the prompt once, every choice's answer
        return srv.usage(len(ids), sum(generated(j) for j in jobs))
    if body.stream:
        return EventStream(sse_chunks(shape, answers, usage if body.include_usage else None),
                           lambda: srv.cancel_all(jobs))
    outs = await _collect_all(srv, request, jobs, answers)
    return shape.response([shape.whole(i, *out) for i, out in enumerate(outs)], usage())


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request, srv: Server = Depends(server)):
    if srv.check_model(body.model) is not None:
        raise APIError(400, "embeddings come from the base model; name it (or leave model out), not an adapter",
                       param="model")
    dim = srv.llm.args.dim
    if body.dimensions is not None and body.dimensions != dim:
        # truncating would only suit models trained for it (Matryoshka): refused, not approximated
        raise APIError(400, f"dimensions={body.dimensions} is not supported: this model's embeddings have {dim} "
                            "dimensions (leave dimensions out or set it to that)", param="dimensions")
    seqs = await srv.embedding_ids(body.input)
    vecs = await srv.embed(request, seqs)
    if body.encoding_format == "base64":      # little-endian float32, as OpenAI sends it
        rows = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vecs.numpy()]
    else:
        rows = vecs.tolist()
    n = sum(len(s) for s in seqs)
    # JSONResponse as is: FastAPI's encoder would walk every float of a large answer in Python
    return JSONResponse({"object": "list", "model": srv.model_id,
                         "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(rows)],
                         "usage": {"prompt_tokens": n, "total_tokens": n}})


# -- helpers -----------------------------------------------------------------------------------------
async def _collect_all(srv: Server, request: Request, jobs: list, answers: list) -> list[tuple[str, list, str]]:
    """Every answer whole. A client that leaves meanwhile, or one answer failing, cancels all of the
    request's jobs: none is left running for nobody."""
    watcher = asyncio.create_task(srv.watch(request, [j for j in jobs if j is not None]))
    try:
        return await asyncio.gather(*(collect(a) for a in answers))
    finally:
        watcher.cancel()
        srv.cancel_all(jobs)


def _best(outs: list, jobs: list, n: int) -> list:
    """The n answers of highest mean token logprob (the end-of-generation token counted), best first."""
    def score(job) -> float:
        seq = job.seq if job is not None else None
        lps = (seq.logprobs + ([seq.end_logprob] if seq.end_logprob is not None else [])) if seq else []
        return sum(lps) / len(lps) if lps else float("-inf")   # a refusal (no job) ranks last
    return [outs[r] for r in sorted(range(len(outs)), key=lambda r: -score(jobs[r]))[:n]]


async def _prompts(srv: Server, prompt, choices: int = 1) -> list[tuple[str, list[int]]]:
    """(text, ids) for each prompt of a completions request (each to be answered `choices` times)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt")
    if len(prompt) * choices > srv.max_prompts:
        raise APIError(400, f"at most {srv.max_prompts} answers per request (batch slots + queue): "
                            f"{len(prompt)} prompts x {choices} choices", param="prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append((p, await srv.encode(p, "prompt", bos=bool(srv.tok.add_bos))))
        else:
            if len(p) >= srv.scheduler.max_seq:   # before looking at a million ids
                raise APIError(400, f"the prompt has {len(p)} tokens but the context window is "
                                    f"{srv.scheduler.max_seq}", code="context_length_exceeded", param="prompt")
            vocab = srv.llm.args.vocab_size
            if any(not 0 <= t < vocab for t in p):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            out.append((srv.tok.decode(p), list(p)))
    return out
