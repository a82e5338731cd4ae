"""What the routes share: the model and its scheduler, request checks, moderation, and one job's
answer as a sequence of `Piece`s (the same for both endpoints, streamed or not)."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Sequence

import torch
from fastapi import Request

from ..embedding import check_inputs
from ..generate import ContextOverflow, TokenEvent
from ..multilora import AdapterBank
from ..sampling import SamplingParams, choice_seed
from .scheduler import Job, QueueFull, Scheduler
from .schemas import APIError, ClientGone, Sampling
from .structured import Constrainer
from .tools import ToolPlan, encode as encode_tools


MAX_EMBED_INPUTS = 2048        # inputs per embeddings request (OpenAI's limit)
MAX_EMBED_TOKENS = 300_000     # tokens per embeddings request, all inputs together (OpenAI's limit)


@dataclass
class Piece:
    """A part of an answer: text, the logprob entry of its token (when asked for), the finish reason."""
    text: str
    finish_reason: str | None = None
    token: dict[str, Any] | None = None   # {"token", "logprob", "bytes", "top_logprobs": [...]}
    tool_calls: list[dict[str, Any]] | None = None   # OpenAI's tool-call deltas (tools.py)


class TopLogprobs:
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


def _token_entry(text: str, logprob: float | None, tops: dict[str, float]) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in tops.items()]}


class Server:
    """Routes' shared state: the model, its scheduler, options, limits."""

    def __init__(self, llm, *, model_id: str, api_key: str | None, max_batch: int, ctx: int, max_queue: int,
                 guard=None, threads: int | None = None, adapters: dict[str, str] | None = None,
                 lora_updates: bool = False, guard_taxonomy: str = "llama-guard-1", lookup: int = 0,
                 lookup_max_batch: int = 1):
        self.llm = llm
        self.tok = llm.tokenizer
        self.model_id = model_id
        self.api_key = api_key
        self.guard = guard
        self.guard_taxonomy = guard_taxonomy   # how refusals name the categories (guard.relabel)
        if guard is not None and guard_taxonomy != "llama-guard-1":
            guard.require_taxonomy(guard_taxonomy)   # a custom taxonomy fails now, not per request
        self.lora_updates = lora_updates
        bank = AdapterBank(llm.model) if adapters or lora_updates else None
        for name, path in (adapters or {}).items():
            if name == model_id:
                raise ValueError(f"adapter name {name!r} is the base model's id; choose another")
            bank.load(name, path)
        self.scheduler = Scheduler(llm.model, llm.tokenizer, max_batch=max_batch, max_seq=ctx, max_queue=max_queue,
                                   threads=threads, adapters=bank, lookup=lookup, lookup_max_batch=lookup_max_batch)
        self.constrainer = Constrainer(llm.tokenizer, llm.args.vocab_size)
        self.created = int(time.time())
        self.http_errors: dict[int, int] = {}
        self._eog = frozenset(getattr(self.tok, "eog_ids", ()) or ())
        # No token covers more than this many bytes of text, so a text of more characters than
        # max_seq times it cannot fit the context: refused before the tokenizer runs (which holds the
        # GIL for seconds on megabytes, stalling every stream)
        longest = max((len(self.tok.decode([i], skip_special=False).encode()) for i in range(self.tok.vocab_size)),
                      default=1)
        self.max_prompt_chars = self.scheduler.max_seq * (longest + 1)   # +1: a SentencePiece word's space
        self.max_prompts = max_batch + max_queue     # more could never be admitted at once

    def count_error(self, status: int) -> None:
        self.http_errors[status] = self.http_errors.get(status, 0) + 1

    # -- checks --------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        bank = self.scheduler.adapters
        return bank.names if bank is not None else []

    def check_model(self, name: str | None) -> str | None:
        """The LoRA adapter a request's model names (None: the base model); 404 for an unknown name."""
        if not name or name == self.model_id:
            return None
        if name in self.adapter_names:
            return name
        served = ", ".join(repr(n) for n in [self.model_id, *self.adapter_names])
        raise APIError(404, f"the model {name!r} does not exist; this server serves {served}",
                       code="model_not_found", param="model")

    # -- adapters at run time (--allow-lora-updates) -------------------------------------------
    def _check_updates(self) -> AdapterBank:
        if not self.lora_updates:
            raise APIError(404, "loading adapters at run time is off; start the server with --allow-lora-updates",
                           code="not_found")
        return self.scheduler.adapters

    async def load_adapter(self, name: str, path: str) -> None:
        bank = self._check_updates()
        if name == self.model_id or name in bank.names:
            raise APIError(400, f"the model name {name!r} is taken", param="lora_name")
        try:   # between two decode steps: loading replaces modules of the model the steps run
            await self.scheduler.call(lambda: bank.load(name, path))
        except (ValueError, FileNotFoundError, OSError) as e:
            raise APIError(400, f"cannot load the adapter: {e}", param="lora_path") from e

    async def unload_adapter(self, name: str) -> None:
        bank = self._check_updates()
        if name not in bank.names:
            raise APIError(404, f"no adapter named {name!r} is loaded", code="model_not_found", param="lora_name")
        if self.scheduler.adapter_in_use(name):
            raise APIError(409, f"the adapter {name!r} is serving requests; retry when they finish",
                           param="lora_name")
        await self.scheduler.call(lambda: bank.unload(name))

    def check_size(self, chars: int, param: str) -> None:
        """Refuse a text too long for any prompt before tokenizing it."""
        if chars > self.max_prompt_chars:
            raise APIError(400, f"the {param} has {chars} characters, more than a {self.scheduler.max_seq}-token "
                                "context window can hold", code="context_length_exceeded", param=param)

    async def encode(self, text: str, param: str, *, bos: bool) -> list[int]:
        """Token ids of a prompt, tokenized on a worker thread (size checked first)."""
        self.check_size(len(text), param)
        return await asyncio.to_thread(self.tok.encode, text, bos=bos)

    async def encode_chat(self, messages: list[dict[str, Any]], tools: ToolPlan | None = None) -> list[int]:
        """Token ids of a conversation (with its tools) through the model's template, rendered on a
        worker thread."""
        calls = [json.dumps(m.get("tool_calls")) for m in messages if m.get("tool_calls")]
        self.check_size(sum(len(m["content"]) for m in messages) + sum(map(len, calls))
                        + (len(json.dumps(tools.tools)) if tools is not None else 0), "messages")
        try:
            return await asyncio.to_thread(encode_tools, self.llm, messages, tools)
        except ContextOverflow as e:
            raise APIError(400, str(e), code="context_length_exceeded", param="messages") from e
        except (ValueError, TypeError, KeyError, RecursionError) as e:   # ChatFormatError is a ValueError
            raise APIError(400, f"cannot format these messages: {e}", param="messages") from e

    def check_choices(self, body: Sampling, count: int, param: str = "n") -> None:
        """The request asks for nothing unsupported, and its choices (decoded side by side) fit the batch."""
        body.check_supported()
        if count > self.scheduler.max_batch:
            raise APIError(400, f"{param}={count} is more than this server decodes at once "
                                f"(--max-batch {self.scheduler.max_batch})", param=param)

    def sampling(self, body: Sampling, max_tokens: int | None, prompt_len: int, logprobs: bool,
                 param: str) -> SamplingParams:
        """The request's SamplingParams for a prompt of prompt_len tokens (param names the prompt)."""
        stop = body.stop_strings()
        vocab = self.llm.args.vocab_size
        bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
        bad = sorted(t for t in bias if t >= vocab)
        if bad:
            raise APIError(400, f"logit_bias token ids must be in [0, {vocab}): {bad[:5]}", param="logit_bias")
        try:
            self.scheduler.check_prompt(prompt_len)
        except ContextOverflow as e:
            raise APIError(400, str(e), code="context_length_exceeded", param=param) from e
        except ValueError as e:
            raise APIError(400, str(e), param=param) from e
        room = self.scheduler.max_seq - prompt_len
        try:
            return SamplingParams(max_tokens=room if max_tokens is None else min(max_tokens, max(room, 0)),
                                  temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                  min_p=body.min_p, repetition_penalty=body.repetition_penalty, seed=body.seed,
                                  stop=stop, logprobs=logprobs, presence_penalty=body.presence_penalty,
                                  frequency_penalty=body.frequency_penalty, logit_bias=bias)
        except ValueError as e:
            raise APIError(400, str(e)) from e

    @staticmethod
    def per_choice(params: SamplingParams, count: int) -> list[SamplingParams]:
        """Each choice's params: with a seed, choice i draws from its own seed, so it is the same
        whenever the request is repeated, whatever else shares the batch."""
        return [replace(params, seed=choice_seed(params.seed, i)) for i in range(count)]

    def submit_all(self, requests: list[tuple[list[int], SamplingParams, Any]], adapter: str | None = None
                   ) -> list[Job]:
        """Queue a request's jobs, all or none (429 when they do not all fit), with their LoRA adapter."""
        try:
            return self.scheduler.submit_all(requests, adapter)
        except QueueFull as e:
            raise APIError(429, str(e), type="server_overloaded", code="queue_full",
                           headers={"Retry-After": "1"}) from e
        except ValueError as e:
            raise APIError(400, str(e)) from e

    def cancel_all(self, jobs: Sequence[Job | None]) -> None:
        """Free whatever the jobs still hold (a no-op for finished ones)."""
        for job in jobs:
            if job is not None and (job.seq is None or not job.seq.finish_reason):
                self.scheduler.cancel(job)

    # -- moderation ----------------------------------------------------------------------------
    async def screen(self, turns: list[tuple[str, str]]) -> list[str | None]:
        """The guard's refusal for each unsafe (role, text) input turn, else None; one worker thread,
        one guard batch per role."""
        if self.guard is None:
            return [None] * len(turns)

        def run() -> list[str | None]:
            out: list[str | None] = [None] * len(turns)
            for role in ("User", "Agent"):
                idx = [i for i, (r, t) in enumerate(turns) if r == role and t.strip()]
                if idx:
                    for i, v in zip(idx, self.guard.check_batch([turns[i][1] for i in idx], role=role)):
                        out[i] = self._refusal(v, turns[i][1])
            return out
        return await asyncio.to_thread(run)

    async def moderate(self, text: str, role: str, context: list[dict[str, Any]]) -> str | None:
        """The guard's refusal when text is unsafe, else None."""
        if self.guard is None:
            return None
        verdict = await asyncio.to_thread(self.guard.check, text, role=role, context=context)
        return self._refusal(verdict, text)

    def _refusal(self, verdict, text: str) -> str | None:
        """None for a safe verdict, else the guard's refusal naming the categories in the server's taxonomy."""
        if verdict.safe:
            return None
        if self.guard_taxonomy != "llama-guard-1":
            verdict = self.guard.relabel(verdict, text, self.guard_taxonomy)
        return self.guard.refusal(verdict)

    # -- answers -------------------------------------------------------------------------------
    async def pieces(self, job: Job, top: TopLogprobs | None, logprobs: bool,
                     context: list[dict[str, Any]]) -> AsyncIterator[Piece]:
        """One job's answer as Pieces. With a guard, nothing is released until the guard has seen the
        whole answer (context: the conversation it answers); an unsafe one becomes the refusal."""
        held: list[Piece] = []
        n = 0          # answer tokens so far (the index into top.steps)
        async for ev in self.scheduler.stream(job):
            entry = None
            if self._in_answer(ev):
                if logprobs:
                    tops = top.steps[n] if top is not None and n < len(top.steps) else {}
                    entry = _token_entry(self.tok.decode([ev.id]), ev.logprob, tops)
                n += 1
            if not (ev.text or entry or ev.finish_reason):
                continue
            piece = Piece(ev.text, ev.finish_reason, entry)
            if self.guard is None:
                yield piece
            else:
                held.append(piece)
        if self.guard is not None:
            text = "".join(p.text for p in held)
            refusal = await self.moderate(text, "Agent", context + [{"role": "assistant", "content": text}])
            if refusal is not None:
                held = [Piece(refusal, "content_filter")]
            for p in held:
                yield p

    def _in_answer(self, ev: TokenEvent) -> bool:
        """Whether the event's token belongs to the answer (the end-of-generation token does not)."""
        return ev.id >= 0 and not (ev.finish_reason == "stop" and ev.id in self._eog)

    async def watch(self, request: Request, jobs: Sequence[Job]) -> None:
        """Cancel the request's jobs when its client disconnects (run as a task while waiting)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                for job in jobs:
                    self.scheduler.cancel(job)
                    job.events.put_nowait(ClientGone())
                return

    # -- embeddings ----------------------------------------------------------------------------
    async def embedding_ids(self, inputs: Any) -> list[list[int]]:
        """Token ids of each input of an embeddings request, checked: count, sizes (before tokenizing),
        context window, vocabulary, total tokens."""
        if isinstance(inputs, str) or (inputs and type(inputs[0]) is int):
            inputs = [inputs]
        if not inputs:
            raise APIError(400, "input is empty: give a string, a list of strings or token ids", param="input")
        if len(inputs) > MAX_EMBED_INPUTS:
            raise APIError(400, f"at most {MAX_EMBED_INPUTS} inputs per request (got {len(inputs)})", param="input")
        ctx = self.scheduler.max_seq
        for i, x in enumerate(inputs):
            if isinstance(x, str):
                self.check_size(len(x), "input")
            elif len(x) > ctx:       # before looking at a million ids
                raise APIError(400, f"input {i} has {len(x)} tokens but the context window is {ctx}",
                               code="context_length_exceeded", param="input")
        if sum(len(x) for x in inputs if isinstance(x, str)) > MAX_EMBED_TOKENS * self.max_prompt_chars // ctx:
            raise APIError(400, f"the inputs hold more text than {MAX_EMBED_TOKENS} tokens can", param="input")
        seqs = await asyncio.to_thread(self.llm.embedding_ids, inputs)
        try:
            check_inputs(seqs, ctx, self.llm.args.vocab_size)
        except ContextOverflow as e:
            raise APIError(400, str(e), code="context_length_exceeded", param="input") from e
        except ValueError as e:
            raise APIError(400, str(e), param="input") from e
        total = sum(len(s) for s in seqs)
        if total > MAX_EMBED_TOKENS:
            raise APIError(400, f"the inputs have {total} tokens; at most {MAX_EMBED_TOKENS} per request",
                           param="input")
        return seqs

    async def embed(self, request: Request, seqs: list[list[int]]) -> torch.Tensor:
        """[n, D] embeddings computed by the scheduler thread between decode steps; a client that leaves
        cancels the rest of the work."""
        try:
            job = self.scheduler.submit_embed(seqs)
        except QueueFull as e:
            raise APIError(429, str(e), type="server_overloaded", code="queue_full",
                           headers={"Retry-After": "1"}) from e

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.cancelled = True
        watcher = asyncio.create_task(watch())
        try:
            return await job.future
        finally:
            watcher.cancel()
            job.cancelled = True    # a no-op once done; else the scheduler drops it

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}


def generated(job: Job | None) -> int:
    """Tokens a finished job generated (its answer, without the end-of-generation token)."""
    return len(job.seq.out) if job is not None and job.seq is not None else 0
