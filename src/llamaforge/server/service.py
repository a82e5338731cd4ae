"""What the routes share: the model and its scheduler, request checks, moderation, and one job's
answer as a sequence of `Piece`s (the same for both endpoints, streamed or not)."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence

import torch
from fastapi import Request

from ..generate import ContextOverflow, TokenEvent
from ..sampling import SamplingParams
from .scheduler import Job, QueueFull, Scheduler
from .schemas import APIError, ClientGone, Sampling
from .structured import Constrainer


@dataclass
class Piece:
    """A part of an answer: text, the logprob entry of its token (when asked for), the finish reason."""
    text: str
    finish_reason: str | None = None
    token: dict[str, Any] | None = None   # {"token", "logprob", "bytes", "top_logprobs": [...]}


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
        self._eog = frozenset(getattr(self.tok, "eog_ids", ()) or ())

    def count_error(self, status: int) -> None:
        self.http_errors[status] = self.http_errors.get(status, 0) + 1

    # -- checks --------------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name and name != self.model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_id!r}",
                           code="model_not_found", param="model")

    def sampling(self, body: Sampling, max_tokens: int | None, prompt_len: int, logprobs: bool) -> SamplingParams:
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

    # -- moderation ----------------------------------------------------------------------------
    async def moderate(self, text: str, role: str, context: list[dict[str, Any]]) -> str | None:
        """The guard's refusal when text is unsafe, else None."""
        if self.guard is None:
            return None
        verdict = await asyncio.to_thread(self.guard.check, text, role=role, context=context)
        return None if verdict.safe else self.guard.refusal(verdict)

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

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}


def generated(job: Job | None) -> int:
    """Tokens a finished job generated (its answer, without the end-of-generation token)."""
    return len(job.seq.out) if job is not None and job.seq is not None else 0
