"""`llamaforge serve`: an OpenAI-compatible HTTP server with continuous batching and a web chat page.

Routes (routes.py): GET /v1/models, POST /v1/completions, POST /v1/chat/completions (JSON or SSE
streaming), POST /v1/embeddings, GET /health, POST /tokenize, POST /detokenize, GET /metrics
(Prometheus text), GET / (chat page). Every generation goes through one `Scheduler`, so concurrent
requests decode in one batched forward; embeddings run on its thread between decode steps. Errors use OpenAI's shape: {"error": {"message", "type", "code", "param"}}.
"""
from __future__ import annotations

import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import Weights
from ..commands import KVType, Quantize, load_model
from ..paths import default_model_path
from ..safety.guard import Guard
from ..speculative import as_lookup
from ..safety.taxonomy import Taxonomy, check_taxonomy
from .gate import MAX_BODY, Gate
from .routes import WEB, open_routes, router
from .schemas import APIError, ClientGone, validation_error
from .service import Server

DEFAULT_CTX = 2048          # KV cache per slot when --ctx is not given (the cache is slots x ctx)


def create_app(llm, *, model_id: str | None = None, api_key: str | None = None, max_batch: int = 8,
               ctx: int | None = None, max_queue: int = 64, guard=None, max_body: int = MAX_BODY,
               threads: int | None = None, adapters: dict[str, str] | None = None,
               lora_updates: bool = False, guard_taxonomy: Taxonomy = "llama-guard-1", lookup: int = 0,
               lookup_max_batch: int = 1) -> FastAPI:
    """The FastAPI app serving `llm` (a llamaforge.api.Llama); the scheduler runs while the app does.

    adapters: LoRA adapter folders by model name, served next to the base; lora_updates: allow
    loading and unloading adapters at run time (POST /v1/load_lora_adapter, /v1/unload_lora_adapter).
    guard_taxonomy: how the guard's refusals name the categories (llama-guard-1 O-codes or mlcommons S-codes).
    lookup: speculative decoding by prompt lookup, up to this many draft tokens per forward (0: off),
    while at most lookup_max_batch sequences are decoding.
    """
    check_taxonomy(guard_taxonomy)
    ctx = min(ctx or DEFAULT_CTX, llm.args.max_seq_len)
    srv = Server(llm, model_id=model_id or "llamaforge", api_key=api_key, max_batch=max_batch, ctx=ctx,
                 max_queue=max_queue, guard=guard, threads=threads, adapters=adapters, lora_updates=lora_updates,
                 guard_taxonomy=guard_taxonomy, lookup=lookup, lookup_max_batch=lookup_max_batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        srv.scheduler.start()
        try:
            yield
        finally:
            srv.scheduler.close()

    app = FastAPI(title="llamaforge", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = srv
    app.include_router(open_routes)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=WEB), name="static")
    app.add_middleware(Gate, server=srv, max_body=max_body)
    _error_handlers(app, srv)
    return app


def _error_handlers(app: FastAPI, srv: Server) -> None:
    """Every error in OpenAI's shape, counted by status for /metrics."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        srv.count_error(e.status)
        return e.response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        srv.count_error(500)
        return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").response()

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, e: ClientGone):
        return Response(status_code=499)   # nobody reads it: the connection is closed

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        srv.count_error(400)
        return validation_error(e.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        srv.count_error(e.status_code)
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return APIError(e.status_code, str(e.detail), code=code).response()


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
          weights: Weights | None = None, quantize: Quantize = "none", max_body: int = MAX_BODY,
          threads: int | None = None, kv_type: KVType | None = None, lora: list[str] | None = None,
          allow_lora_updates: bool = False, guard_taxonomy: Taxonomy = "llama-guard-1", lookup: int = 0,
          lookup_max_batch: int = 1) -> int:
    """Serve a model over an OpenAI-compatible HTTP API with continuous batching and a web chat page at /.

    model: checkpoint (Meta folder, HF folder or .gguf); the bundled SmolLM2 when omitted
    host: address to listen on (127.0.0.1 keeps it on this machine)
    port: TCP port
    api_key: require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize
    max_batch: sequences decoded together (KV cache slots)
    ctx: context window per sequence (default min(model's, 2048)); the KV cache holds max_batch x ctx tokens
    max_queue: requests that may wait for a slot; beyond it the server answers 429
    guard: moderate user input and model output with llamaforge's guard
    guard_taxonomy: the categories a guard refusal names: llama-guard-1 (O1-O7) or mlcommons (Llama Guard 2/3's S1-S14)
    weights: blocks computes with a GGUF's quantized blocks as they are (native kernels, the default); float dequantizes them to float32
    quantize: int8/int4 repack the weights for PyTorch's packed kernels; none keeps them (auto: deprecated spelling of --weights blocks)
    max_body: largest request body in bytes; larger ones get 413
    threads: CPU threads for the model (default: torch's, i.e. the cores or OMP_NUM_THREADS)
    kv_type: KV cache element type (f16 halves its memory, q8_0 keeps 34/128 of it: more tokens fit); default: f16 for GGUF models computed from their blocks (as llama.cpp), else the model's dtype
    lora: NAME=DIR: serve the PEFT LoRA adapter in DIR as model NAME next to the base (repeatable); rows of different adapters share each batch
    allow_lora_updates: let API clients load and unload adapters (POST /v1/load_lora_adapter {lora_name, lora_path}, /v1/unload_lora_adapter): it reads any adapter folder the server can
    lookup: speculative decoding by prompt lookup, up to K draft tokens per forward (e.g. 8; 0: off); the same tokens, faster when answers repeat their prompt
    lookup_max_batch: draft only while at most this many sequences are decoding (on a CPU each draft row costs the whole batch about a sequence's compute)
    """
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is not in 1..65535")
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    if ctx is not None and ctx < 2:
        raise ValueError("ctx must be >= 2")
    if max_body < 1:
        raise ValueError("max_body must be >= 1")
    if threads is not None and threads < 1:
        raise ValueError("threads must be >= 1")
    if lookup_max_batch < 1:
        raise ValueError("lookup_max_batch must be >= 1")
    as_lookup(lookup)   # a bad K fails before the model loads
    check_taxonomy(guard_taxonomy)
    adapters = {}
    for spec in lora or []:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--lora {spec!r}: expected NAME=DIR")
        if name in adapters:
            raise ValueError(f"--lora: the name {name!r} is given twice")
        adapters[name] = folder
    checker = None
    if guard:
        checker = _on_a_passing_thread(Guard.load)
    path = Path(model) if model else default_model_path()
    llm = _on_a_passing_thread(lambda: load_model(str(path), weights, quantize, progress=True, kv_type=kv_type))
    model_id = path.stem if path.is_file() else path.name
    app = create_app(llm, model_id=model_id, api_key=api_key, max_batch=max_batch, ctx=ctx, max_queue=max_queue,
                     guard=checker, max_body=max_body, threads=threads, adapters=adapters,
                     lora_updates=allow_lora_updates, guard_taxonomy=guard_taxonomy, lookup=lookup,
                     lookup_max_batch=lookup_max_batch)
    srv = app.state.server
    print(f"llamaforge: serving {model_id!r} on http://{host}:{port}  (batch {max_batch}, context "
          f"{srv.scheduler.max_seq}, queue {max_queue}{', guarded' if checker else ''}"
          f"{', adapters ' + ', '.join(adapters) if adapters else ''}"
          f"{f', prompt lookup {lookup}' if lookup else ''})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0
