"""Response shaping: answers (`Piece`s) as OpenAI's chat or text-completion objects, whole or as
server-sent events. Both endpoints share `sse_chunks` and `collect`; a `Shape` says how each
endpoint words a choice. A request may have several choices (n, several prompts); each streamed
chunk carries its choice's index."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from .service import Piece
from .tools import ToolCallParser, merge_calls

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class EventStream(StreamingResponse):
    """A server-sent-event response that runs on_close however it ends: finished, failed, or its
    client gone before the first byte (when the chunk generator may never have started, so its own
    clean-up would not run)."""

    def __init__(self, chunks: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def given(*pieces: Piece) -> AsyncIterator[Piece]:
    """An answer known in advance (a refusal)."""
    for p in pieces:
        yield p


async def tool_pieces(pieces: AsyncIterator[Piece]) -> AsyncIterator[Piece]:
    """An answer's Pieces with its tool calls split out (Piece.tool_calls); a finished answer that
    made calls ends with finish_reason "tool_calls"."""
    parser = ToolCallParser()
    async for p in pieces:
        text, calls = parser.feed(p.text)
        reason = p.finish_reason
        if reason:
            text += parser.finish()
            if reason == "stop" and parser.called:
                reason = "tool_calls"
        if text or calls or p.token or reason:
            yield Piece(text, reason, p.token, calls or None)


class Shape:
    """How one endpoint words an answer: the response head, a streamed choice, a whole choice."""
    prefix = object_name = chunk_name = ""

    def __init__(self, model_id: str, logprobs: bool):
        self.head = {"id": f"{self.prefix}-{uuid.uuid4().hex[:24]}", "object": self.object_name,
                     "created": int(time.time()), "model": model_id}
        self.logprobs = logprobs

    def response(self, choices: list[dict[str, Any]], usage: dict[str, int]) -> dict[str, Any]:
        return {**self.head, "choices": choices, "usage": usage}

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {**self.head, "object": self.chunk_name, "choices": choices, **extra}

    def opening(self, index: int) -> list[dict[str, Any]]:
        """Streamed choices sent before choice index's answer."""
        return []

    def delta(self, index: int, piece: Piece) -> dict[str, Any]:
        raise NotImplementedError

    def whole(self, index: int, text: str, tokens: list[dict[str, Any]], reason: str,
              calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        raise NotImplementedError


class ChatShape(Shape):
    prefix, object_name, chunk_name = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def opening(self, index: int) -> list[dict[str, Any]]:
        return [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}]

    def delta(self, index: int, piece: Piece) -> dict[str, Any]:
        delta: dict[str, Any] = {"content": piece.text} if piece.text else {}
        if piece.tool_calls:
            delta["tool_calls"] = piece.tool_calls
        return {"index": index, "delta": delta, "logprobs": {"content": [piece.token]} if piece.token else None,
                "finish_reason": piece.finish_reason}

    def whole(self, index: int, text: str, tokens: list[dict[str, Any]], reason: str,
              calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:                           # OpenAI: content null when the answer is only calls
            message = {"role": "assistant", "content": text or None, "tool_calls": calls}
        return {"index": index, "message": message, "logprobs": {"content": tokens} if self.logprobs else None,
                "finish_reason": reason}


class CompletionShape(Shape):
    prefix, object_name, chunk_name = "cmpl", "text_completion", "text_completion"

    def __init__(self, model_id: str, logprobs: bool, *, top: bool, echo: list[str]):
        super().__init__(model_id, logprobs)
        self.top, self.echo = top, echo     # echo: the prompt text put before each choice's answer
        self._offset: dict[int, int] = {}   # streamed: where a choice's next token starts in its answer

    def opening(self, index: int) -> list[dict[str, Any]]:
        first = self.echo[index] if self.echo else ""
        return [{"index": index, "text": first, "logprobs": None, "finish_reason": None}] if first else []

    def delta(self, index: int, piece: Piece) -> dict[str, Any]:
        lp = None
        if piece.token is not None:
            lp = self._logprobs([piece.token], self._offset.get(index, 0))
            self._offset[index] = self._offset.get(index, 0) + len(piece.token["token"])
        return {"index": index, "text": piece.text, "logprobs": lp, "finish_reason": piece.finish_reason}

    def whole(self, index: int, text: str, tokens: list[dict[str, Any]], reason: str,
              calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {"index": index, "text": (self.echo[index] if self.echo else "") + text,
                "logprobs": self._logprobs(tokens, 0) if self.logprobs else None, "finish_reason": reason}

    def _logprobs(self, tokens: list[dict[str, Any]], start: int) -> dict[str, Any]:
        offsets, pos = [], start
        for t in tokens:
            offsets.append(pos)
            pos += len(t["token"])
        return {"tokens": [t["token"] for t in tokens], "token_logprobs": [t["logprob"] for t in tokens],
                "top_logprobs": [{e["token"]: e["logprob"] for e in t["top_logprobs"]} for t in tokens]
                if self.top and tokens else None,
                "text_offset": offsets}


async def merged(answers: list[AsyncIterator[Piece]]) -> AsyncIterator[tuple[int, Piece]]:
    """(choice index, piece) of several answers, each piece as soon as it is ready."""
    if len(answers) == 1:           # the common case, without tasks
        async for piece in answers[0]:
            yield 0, piece
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, answer: AsyncIterator[Piece]) -> None:
        try:
            async with aclosing(answer):
                async for piece in answer:
                    queue.put_nowait((index, piece))
        except Exception as e:  # noqa: BLE001 - raised again by the reader
            queue.put_nowait((index, e))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, a)) for i, a in enumerate(answers)]
    try:
        left = len(tasks)
        while left:
            index, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for t in tasks:
            t.cancel()


async def sse_chunks(shape: Shape, answers: list[AsyncIterator[Piece]],
                     usage: Callable[[], dict[str, int]] | None = None) -> AsyncIterator[str]:
    """The answers (choices 0, 1, ...) as server-sent events, ending with usage (when asked for) and [DONE]."""
    for index in range(len(answers)):
        for choice in shape.opening(index):
            yield sse(shape.chunk([choice]))
    try:
        async for index, piece in merged(answers):
            yield sse(shape.chunk([shape.delta(index, piece)]))
    except Exception as e:  # noqa: BLE001 - the status line is gone; report the error in the stream
        log.exception("generation failed")
        yield sse({"error": {"message": str(e), "type": "server_error", "code": None, "param": None}})
        yield DONE
        return
    if usage is not None:
        yield sse(shape.chunk([], usage=usage()))
    yield DONE


async def collect(pieces: AsyncIterator[Piece]) -> tuple[str, list[dict[str, Any]], str, list[dict[str, Any]]]:
    """A whole answer: its text, its tokens' logprob entries, its finish reason, its tool calls."""
    texts, tokens, reason, deltas = [], [], "length", []
    async for piece in pieces:
        texts.append(piece.text)
        if piece.token is not None:
            tokens.append(piece.token)
        deltas += piece.tool_calls or ()
        reason = piece.finish_reason or reason
    return "".join(texts), tokens, reason, merge_calls(deltas)
