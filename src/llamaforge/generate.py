"""Generation: prefill, batched decode over one KV cache, stop rules, streaming text.

`Batch` holds sequences that share a KV cache and decode together, one token each per step; a new
sequence can join between steps. `generate()` is a Batch of one, so the server's continuous
batching and single-prompt generation run the same code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence as Seq

import torch

from .sampling import SamplingParams, make_generator, sample


class ContextOverflow(ValueError):
    """The prompt does not fit in the model's context window."""


@dataclass
class TokenEvent:
    id: int
    text: str                    # text this token completed (may be "" while a character or stop string is pending)
    logprob: float | None = None
    finish_reason: str | None = None   # "stop" | "length" on the last event


class TextStream:
    """Incremental detokenization with stop strings.

    Decodes the generated ids after a few context ids so a leading space survives, holds back
    incomplete UTF-8 and any tail that could start a stop string.
    """

    def __init__(self, tokenizer, stop: Seq[str] = (), context_ids: Seq[int] = ()):
        self.tok = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ctx = list(context_ids)[-4:]
        self.ctx_text = tokenizer.decode(self.ctx) if self.ctx else ""
        self.ids: list[int] = []
        self.text = ""          # all text so far, truncated at a stop string
        self.sent = 0           # characters already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        full = self.tok.decode(self.ctx + self.ids)
        text = full[len(self.ctx_text):] if full.startswith(self.ctx_text) else self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        self.text = text
        hits = [i for s in self.stop if (i := text.find(s, max(0, self.sent - len(s) + 1))) >= 0]
        if hits:
            self.text = text[:min(hits)]
            self.stopped = True
        return self._release(final=self.stopped)

    def flush(self) -> str:
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            for s in self.stop:  # keep back a tail that may grow into a stop string
                for k in range(min(len(s) - 1, end), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out


@dataclass
class Sequence:
    prompt: list[int]
    params: SamplingParams
    slot: int
    stream: TextStream | None
    generator: torch.Generator | None
    stop_ids: frozenset[int]
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    next_logits: torch.Tensor | None = None   # [V] float32 for the next token
    # optional hook (generated ids so far, logits [V]) -> logits, applied before sampling (e.g. a grammar mask)
    logits_processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.out)


class Batch:
    """Sequences decoding together over one preallocated KV cache (continuous batching)."""

    def __init__(self, model, tokenizer=None, max_batch: int = 1, max_seq: int | None = None,
                 prefill_chunk: int = 512):
        self.model, self.tok = model, tokenizer
        self.max_seq = min(max_seq or model.args.max_seq_len, model.args.max_seq_len)
        self.cache = model.new_cache(max_batch, self.max_seq)
        self.free = list(range(max_batch))[::-1]
        self.active: list[Sequence] = []
        self.prefill_chunk = prefill_chunk
        self.device = model.rope_cos.device

    def check_prompt(self, n: int) -> None:
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.max_seq:
            raise ContextOverflow(f"the prompt has {n} tokens but the context window is {self.max_seq} "
                                  f"(room must remain for at least one generated token)")

    @torch.inference_mode()
    def add(self, prompt: Seq[int], params: SamplingParams, stop_ids: Seq[int] | None = None) -> Sequence:
        """Prefill a new sequence into a free slot; its first token is sampled at the next step()."""
        prompt = [int(t) for t in prompt]
        self.check_prompt(len(prompt))
        if not self.free:
            raise RuntimeError("no free slot in the batch")
        if stop_ids is None:
            stop_ids = getattr(self.tok, "eog_ids", ()) or ()
        slot = self.free.pop()
        stream = TextStream(self.tok, params.stop, prompt) if self.tok is not None else None
        seq = Sequence(prompt, params, slot, stream, make_generator(params.seed),
                       frozenset() if params.ignore_eos else frozenset(stop_ids))
        slots = torch.tensor([slot], device=self.device)
        for start in range(0, len(prompt), self.prefill_chunk):
            chunk = prompt[start:start + self.prefill_chunk]
            toks = torch.tensor([chunk], device=self.device)
            pos = torch.arange(start, start + len(chunk), device=self.device)[None]
            logits = self.model(toks, pos, self.cache, slots, last_only=True)
        seq.next_logits = logits[0, -1]
        if params.max_tokens == 0:
            seq.finish_reason = "length"
        self.active.append(seq)
        return seq

    def release(self, seq: Sequence) -> None:
        """Free a sequence's slot (finished, or its client went away)."""
        if seq in self.active:
            self.active.remove(seq)
            self.free.append(seq.slot)

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, TokenEvent]]:
        """Sample one token for every active sequence, then run one batched forward for those going on."""
        events = []
        for seq in self.active:
            if seq.finish_reason:
                continue
            events.append((seq, self._advance(seq)))
        going = [s for s in self.active if not s.finish_reason]
        if going:
            toks = torch.tensor([[s.out[-1]] for s in going], device=self.device)
            pos = torch.tensor([[s.length - 1] for s in going], device=self.device)
            slots = [s.slot for s in going]
            slot_t = None if slots == list(range(len(going))) else torch.tensor(slots, device=self.device)
            logits = self.model(toks, pos, self.cache, slot_t, last_only=True)[:, -1]
            for s, row in zip(going, logits):
                s.next_logits = row
        return events

    def _advance(self, seq: Sequence) -> TokenEvent:
        p = seq.params
        logits = seq.next_logits
        if seq.logits_processor is not None:
            logits = seq.logits_processor(seq.out, logits)
        seen = None
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(seq.prompt + seq.out, device=logits.device).unique()
        tid = sample(logits, p, seq.generator, seen)
        lp = float(torch.log_softmax(logits, -1)[tid]) if p.logprobs else None
        seq.out.append(tid)
        if lp is not None:
            seq.logprobs.append(lp)
        text, reason = "", None
        if tid in seq.stop_ids:
            reason = "stop"
            seq.out.pop()  # the end-of-generation token is not part of the answer
            if lp is not None:
                seq.logprobs.pop()
            text = seq.stream.flush() if seq.stream else ""
        else:
            if seq.stream is not None:
                text = seq.stream.push(tid)
                if seq.stream.stopped:
                    reason = "stop"
            if reason is None and (len(seq.out) >= p.max_tokens or seq.length >= self.max_seq):
                reason = "length"
                if seq.stream is not None:
                    text += seq.stream.flush()
        seq.finish_reason = reason
        return TokenEvent(tid, text, lp, reason)


def generate(model, prompt: Seq[int], params: SamplingParams = SamplingParams(), tokenizer=None,
             stop_ids: Seq[int] | None = None, max_seq: int | None = None) -> Iterator[TokenEvent]:
    """Yield one TokenEvent per generated token; the last carries finish_reason."""
    n = len(prompt)
    need = min(n + max(params.max_tokens, 1), model.args.max_seq_len)
    batch = Batch(model, tokenizer, max_batch=1, max_seq=max(need, min(max_seq or need, model.args.max_seq_len)))
    seq = batch.add(prompt, params, stop_ids)
    if seq.finish_reason:
        return
    while not seq.finish_reason:
        for _, ev in batch.step():
            yield ev


def generate_batch(model, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams], tokenizer=None,
                   stop_ids: Seq[int] | None = None) -> list[Sequence]:
    """Generate for several prompts at once (one batched forward per step); returns finished Sequences."""
    plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    need = max(len(p) + max(sp.max_tokens, 1) for p, sp in zip(prompts, plist))
    batch = Batch(model, tokenizer, max_batch=len(prompts), max_seq=min(need, model.args.max_seq_len))
    seqs = [batch.add(p, sp, stop_ids) for p, sp in zip(prompts, plist)]
    while any(not s.finish_reason for s in seqs):
        batch.step()
    return seqs
