"""Generation: prefill, batched decode over one KV cache, stop rules, streaming text.

`Batch` holds sequences that share a KV cache and decode together, one token each per step; a new
sequence can join between steps. `generate()` is a Batch of one, so the server's continuous
batching and single-prompt generation run the same code.
"""
from __future__ import annotations

import bisect
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence as Seq

import torch

from .sampling import SamplingParams, make_generator, sample
from .speculative import ATTN_GROUP, DraftModel, PromptLookup, as_lookup


class ContextOverflow(ValueError):
    """The prompt does not fit in the model's context window."""


def check_prompt(n: int, max_seq: int) -> None:
    """Refuse an empty prompt, or one that leaves no room in a max_seq window for a generated token."""
    if n == 0:
        raise ValueError("the prompt is empty")
    if n >= max_seq:
        raise ContextOverflow(f"the prompt has {n} tokens but the context window is {max_seq} "
                              f"(room must remain for at least one generated token)")


@dataclass
class TokenEvent:
    id: int
    text: str                    # text this token completed (may be "" while a character or stop string is pending)
    logprob: float | None = None
    finish_reason: str | None = None   # "stop" | "length" on the last event; "error" with error set
    error: Exception | None = None     # why this sequence failed (the batch's other sequences go on)


_WINDOW = 4   # ids of already-released text decoded again before a new token, for context


class TextStream:
    """Incremental detokenization with stop strings.

    Each token is decoded in a short window after the last few ids already turned into text (the
    last prompt ids at first), so a leading space survives and a token costs the same at
    position 10 or 10,000.
    Holds back incomplete UTF-8 and any tail that could start a stop string.
    """

    def __init__(self, tokenizer, stop: Seq[str] = (), context_ids: Seq[int] = ()):
        self.tok = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self._all = list(context_ids)[-_WINDOW:]   # context ids, then the generated ones
        self._n_ctx = len(self._all)
        self._prefix = 0                      # the decode window starts here ...
        self._read = len(self._all)           # ... and its text up to here is already in self.text
        self._prefix_text = tokenizer.decode(self._all) if self._all else ""
        self.text = ""          # all text so far, truncated at a stop string
        self.sent = 0           # characters already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self.stopped:       # the text ended at a stop string: later tokens add nothing
            return ""
        self._all.append(token_id)
        window = self.tok.decode(self._all[self._prefix:])
        if window.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        if window.startswith(self._prefix_text):
            text = self.text + window[len(self._prefix_text):]
        else:  # a tokenizer that rewrites across the window edge: decode everything once
            full = self.tok.decode(self._all)
            ctx_text = self.tok.decode(self._all[:self._n_ctx]) if self._n_ctx else ""
            text = full[len(ctx_text):] if full.startswith(ctx_text) else self.tok.decode(self.ids)
        # the next window starts a few ids back: SentencePiece drops the space of a window's first
        # word, and a control id decodes to nothing, so one id of context is not always enough
        self._read = len(self._all)
        self._prefix = max(0, self._read - _WINDOW)
        self._prefix_text = self.tok.decode(self._all[self._prefix:self._read])
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


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    params: SamplingParams
    slot: int
    stream: TextStream | None
    generator: torch.Generator | None
    stop_ids: frozenset[int]
    out: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    end_logprob: float | None = None          # the end-of-generation token's (not in out nor logprobs)
    finish_reason: str | None = None
    next_logits: torch.Tensor | None = None   # [V] float32 for the next token
    # optional hook (generated ids so far, logits [V]) -> logits, applied before sampling (e.g. a grammar mask)
    logits_processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None
    reused: int = 0      # prompt tokens whose keys/values were copied from another sequence, not computed
    fed: int = 0         # tokens (prompt, then generated) whose keys/values are in the cache
    adapter: str | None = None   # the LoRA adapter of Batch.adapters this sequence runs with (None: the base)
    drafter: Any = None          # its speculative drafter (Batch.lookup's, made at its first draft)

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.out)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that needs the logits row on its own: an argmax over the batch does it."""
        p = self.params
        return p.greedy and self.logits_processor is None and not p.adjusts_logits and not p.logprobs


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists (slice comparisons run in C)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n          # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class Batch:
    """Sequences decoding together over one preallocated KV cache (continuous batching).

    With prefix_reuse, a new sequence starts from the cached keys/values of the longest prefix of
    its prompt held by any slot (a running sequence, or a finished one whose slot is still
    untouched), e.g. a shared system prompt or the earlier turns of a conversation, and prefills
    only the rest.

    With adapters (a multilora.AdapterBank over model), each sequence may name its own LoRA adapter:
    rows of different adapters decode in one forward, and cached keys are reused only between
    sequences of the same adapter.

    With a lookup (speculative decoding: a PromptLookup or a DraftModel, see speculative.py), a step
    with at most lookup_max_batch sequences going adds each one's draft as extra rows of the forward
    and keeps the part of it the model would have produced; the tokens are those of plain decoding.
    """

    def __init__(self, model, tokenizer=None, max_batch: int = 1, max_seq: int | None = None,
                 prefill_chunk: int = 512, prefix_reuse: bool = False, adapters=None,
                 lookup: "PromptLookup | DraftModel | None" = None, lookup_max_batch: int = 1):
        self.model, self.tok = model, tokenizer
        self.max_seq = min(max_seq or model.args.max_seq_len, model.args.max_seq_len)
        self.cache = model.new_cache(max_batch, self.max_seq)
        self.size = max_batch
        self.free = list(range(max_batch))   # kept sorted: the lowest slot goes first, so rows stay contiguous
        self.active: list[Sequence] = []
        self.prefill_chunk = prefill_chunk
        self.device = model.rope_cos.device
        self.prefix_reuse = prefix_reuse
        self.reused_tokens = 0                # prompt tokens taken from the cache instead of prefilled
        self.adapters = adapters
        self.lookup, self.lookup_max_batch = lookup, lookup_max_batch
        # ids whose keys/values a free slot still holds (its last sequence's, with its adapter), for prefix reuse
        self._kept: dict[int, tuple[str | None, list[int]]] = {}
        self._last: tuple[torch.Tensor, list[Sequence]] | None = None   # the last decode's logits and rows

    def check_prompt(self, n: int) -> None:
        check_prompt(n, self.max_seq)

    def slot_counts(self) -> tuple[int, int, int]:
        """(free, busy, total) slots; free + busy == total unless a slot has leaked."""
        return len(self.free), len(self.active), self.size

    @torch.inference_mode()
    def add(self, prompt: Seq[int], params: SamplingParams, stop_ids: Seq[int] | None = None,
            adapter: str | None = None) -> Sequence:
        """Prefill a new sequence into a free slot; its first token is sampled at the next step().

        adapter: the name of a LoRA adapter of self.adapters to run this sequence with.
        """
        prompt = [int(t) for t in prompt]
        self.check_prompt(len(prompt))
        if adapter is not None and (self.adapters is None or adapter not in self.adapters.names):
            raise ValueError(f"no LoRA adapter named {adapter!r} is loaded")
        if not self.free:
            raise RuntimeError("no free slot in the batch")
        if stop_ids is None:
            stop_ids = getattr(self.tok, "eog_ids", ()) or ()
        twin = self._twin(prompt, adapter)
        slot, start = self._take_slot(prompt, twin, adapter)
        try:   # from here on, any failure gives the slot back
            stream = TextStream(self.tok, params.stop, prompt) if self.tok is not None else None
            seq = Sequence(prompt, params, slot, stream, make_generator(params.seed),
                           frozenset() if params.ignore_eos else frozenset(stop_ids), reused=start, adapter=adapter)
            for begin in range(start, len(prompt), self.prefill_chunk):
                logits = self._run(seq, prompt[begin:begin + self.prefill_chunk], begin)
        except BaseException:
            self._give_back(slot)
            raise
        seq.fed = len(prompt)
        self.reused_tokens += start
        # a twin's whole prompt was copied: its logits (read-only everywhere) give this first token too
        seq.next_logits = twin.next_logits if start == len(prompt) else logits[0, -1]
        if params.max_tokens == 0:
            seq.finish_reason = "length"
        self.active.append(seq)
        return seq

    def release(self, seq: Sequence) -> None:
        """Free a sequence's slot (finished, or its client went away)."""
        if seq in self.active:
            self.active.remove(seq)
            if self.prefix_reuse and seq.fed:
                self._kept[seq.slot] = (seq.adapter, (seq.prompt + seq.out)[:seq.fed])
            self._give_back(seq.slot)

    def _give_back(self, slot: int) -> None:
        bisect.insort(self.free, slot)

    def _adapter_rows(self, rows: list[Sequence]):
        """The context a forward over these sequences' rows runs in: each row's own adapter."""
        if self.adapters is None:
            return contextlib.nullcontext()
        return self.adapters.rows([s.adapter for s in rows])

    def _twin(self, prompt: list[int], adapter: str | None = None) -> Sequence | None:
        """A running sequence with this very prompt, prefilled and not yet sampled (another choice of
        the same request, n > 1): its keys/values and first-token logits serve the new one whole."""
        if not self.prefix_reuse:
            return None
        return next((s for s in self.active if not s.out and not s.finish_reason and s.next_logits is not None
                     and s.fed == len(prompt) and s.prompt == prompt and s.adapter == adapter), None)

    def _take_slot(self, prompt: list[int], twin: Sequence | None = None,
                   adapter: str | None = None) -> tuple[int, int]:
        """A free slot for prompt and how many of its first tokens already sit in that slot's cache
        (all of them when copied from a twin, see _twin)."""
        if not self.prefix_reuse:
            self._kept.pop(self.free[0], None)
            return self.free.pop(0), 0
        if twin is not None:
            slot = self.free.pop(0)
            self._kept.pop(slot, None)
            return slot, len(prompt) if self._copy_prefix(twin.slot, slot, len(prompt)) else 0
        limit = len(prompt) - 1       # the last prompt token is always run: its logits give the first token
        best, src = 0, None           # longest reusable prefix and the slot holding it
        for slot in self.free:        # lowest first: among equal prefixes, the lowest free slot wins
            kept_adapter, kept = self._kept.get(slot, (None, []))
            n = min(_common_prefix(prompt, kept), limit) if kept_adapter == adapter else 0
            if n > best:
                best, src = n, slot
        for seq in self.active:
            if seq.adapter != adapter:    # another adapter's keys and values differ from this one's
                continue
            held = (seq.prompt + seq.out)[:seq.fed]
            n = min(_common_prefix(prompt, held), limit)
            if n > best:
                best, src = n, seq.slot
        if src in self.free:          # a finished sequence left it: prefill on top of it, no copy
            self.free.remove(src)
            self._kept.pop(src, None)
            return src, best
        slot = self.free.pop(0)
        self._kept.pop(slot, None)
        if best and not self._copy_prefix(src, slot, best):
            best = 0
        return slot, best

    def _copy_prefix(self, src: int, dst: int, n: int) -> bool:
        """Copy the keys/values of positions [0, n) from slot src to slot dst; False if the cache can't."""
        copy = getattr(self.cache, "copy_prefix", None)
        if copy is not None:
            copy(src, dst, n)
            return True
        k, v = getattr(self.cache, "k", None), getattr(self.cache, "v", None)
        # only the layout cache.py documents, [layers, slots, kv_heads, max_seq, head_dim]; another
        # layout means no copy (the prompt is then prefilled in full), never a wrong one
        if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and k.dim() == v.dim() == 5
                and k.shape == v.shape and k.shape[1] == getattr(self.cache, "slots", None)
                and k.shape[3] == getattr(self.cache, "max_seq", None) and n <= k.shape[3]):
            return False
        k[:, dst, :, :n] = k[:, src, :, :n]
        v[:, dst, :, :n] = v[:, src, :, :n]
        return True

    @torch.inference_mode()
    def step(self, emit: Callable[[list[tuple[Sequence, TokenEvent]]], None] | None = None
             ) -> list[tuple[Sequence, TokenEvent]]:
        """Sample one token for every active sequence, then run one batched forward for those going on.

        emit, if given, gets the events as soon as they are sampled, before the forward, so a server
        can stream them (and release finished sequences) while the forward runs. With a lookup, a
        sequence's draft is verified after the forward: the tokens it keeps, and the one after them,
        go to a second emit call (and that sequence samples nothing at the next step's start).
        """
        live = [s for s in self.active if not s.finish_reason]
        if not live:
            return []
        events = []
        todo = [s for s in live if s.next_logits is not None]   # the others' next token came from a verify
        for seq, tid in zip(todo, self._greedy_ids(todo)):
            try:
                events.append((seq, self.advance(seq, tid)))
                events += [(seq, ev) for ev in self._fast_forward(seq)]
            except Exception as e:  # noqa: BLE001 - a row's failure ends that row only
                seq.finish_reason, seq.next_logits = "error", None
                events.append((seq, TokenEvent(-1, "", None, "error", e)))
        if emit is not None and events:
            emit(events)
        # rows in slot order: when the slots are 0..B-1 the cache is read in place, not gathered
        going = sorted((s for s in live if not s.finish_reason), key=lambda s: s.slot)
        self._last = None
        if not going:
            return events
        drafts = self._drafts(going)
        # every token not yet in the cache is a one-token row in its sequence's slot: the last
        # sampled one, and before it any a grammar forced (jump-forward), whose keys join this
        # forward instead of one of their own, and after it a draft to verify (rows of a slot see
        # its earlier rows through the mask); only each sequence's last sampled row is projected
        # at once, and a draft's rows only if its first token was right
        rows, first, later = [], [], {}
        for s in going:
            pending, draft = s.out[s.fed - len(s.prompt):], drafts.get(s, [])
            first.append(len(rows) + len(pending) - 1)
            if draft:
                later[s] = slice(first[-1] + 1, first[-1] + 1 + len(draft))
            rows += [(s, t, s.fed + j) for j, t in enumerate(pending + draft)]
        toks = torch.tensor([[t] for _, t, _ in rows], device=self.device)
        pos = torch.tensor([[p] for _, _, p in rows], device=self.device)
        slots = [s.slot for s, _, _ in rows]
        slot_t = None if slots == list(range(len(slots))) else torch.tensor(slots, device=self.device)
        t0 = time.thread_time()
        with self._adapter_rows([s for s, _, _ in rows]):
            h = self.model.hidden(toks, pos, self.cache, slot_t)[:, -1]           # [rows, D]
        logits = self.model.output(h if len(rows) == len(going) else h[torch.tensor(first, device=self.device)]
                                   ).float()                                      # [B, V]
        spent = time.thread_time() - t0
        plain, after = [], []
        for s, row in zip(going, logits):
            s.next_logits = row
            s.fed = s.length
            if s in drafts:
                after += self._verify(s, drafts[s], h, later.get(s), spent if len(going) == 1 else None)
            else:
                plain.append(s)
        if plain:   # _greedy_ids reads the plain rows' argmax from here, one host sync for all
            self._last = (logits if len(plain) == len(going) else torch.stack([s.next_logits for s in plain]), plain)
        if emit is not None and after:
            emit(after)
        return events + after

    def _drafts(self, going: list[Sequence]) -> dict[Sequence, list[int]]:
        """The draft of each sequence the lookup drafts for this step ([] when drafting does not pay):
        while at most lookup_max_batch sequences are going (each draft row costs the whole batch
        time), for those without a grammar's forced tokens."""
        if self.lookup is None or len(going) > self.lookup_max_batch:
            return {}
        widest = max(s.length for s in going)     # the forward's attended keys without drafts
        out = {}
        for s in going:
            if getattr(s.logits_processor, "forced", None) is not None:
                continue
            if s.drafter is None:
                s.drafter = self.lookup.start(self, s)
            L = s.length       # keys its last sampled token's row attends (that token is not cached yet)
            room = min(s.params.max_tokens - len(s.out) - 1,   # the forward yields up to room + 1 tokens
                       self.max_seq - L,                       # the last row's position stays in the cache
                       widest // ATTN_GROUP * ATTN_GROUP + ATTN_GROUP - 1 - L)   # see speculative.ATTN_GROUP
            out[s] = s.drafter.draft(s, room) if room > 0 else []
        return out

    def _verify(self, seq: Sequence, draft: list[int], h: torch.Tensor, rows: slice | None,
                spent: float | None) -> list[tuple[Sequence, TokenEvent]]:
        """Emit seq's tokens from its logits rows in order, each chosen by the ordinary sampler, while
        they equal the draft: the kept draft tokens (their keys are cached) and the model's own token
        after them (the next step's first row). spent: CPU seconds of the forward when seq was its
        only sequence (the drafter's cost model learns from those), else None."""
        events, kept = [], 0
        try:
            for i in range(len(draft) + 1):
                if i == 1:   # the vocabulary projection is a third of a row's cost: only once needed
                    t0 = time.thread_time()
                    rest = self.model.output(h[rows]).float()
                    spent = None if spent is None else spent + time.thread_time() - t0
                if i:
                    seq.next_logits = rest[i - 1]
                ev = self.advance(seq, int(seq.next_logits.argmax()) if seq.plain_greedy else None)
                events.append((seq, ev))
                if seq.finish_reason or i == len(draft) or ev.id != draft[i]:
                    break
                kept += 1
        except Exception as e:  # noqa: BLE001 - a row's failure ends that row only
            seq.finish_reason, seq.next_logits = "error", None
            events.append((seq, TokenEvent(-1, "", None, "error", e)))
        # the kept tokens' keys are cached; the rejected ones' positions hold stale keys that no row
        # attends (each attends up to its own position) and the next forward overwrites
        seq.fed += kept
        seq.drafter.measured(len(draft), kept, spent)
        self.lookup.stats.count(len(draft), kept)
        return events

    def _fast_forward(self, seq: Sequence) -> list[TokenEvent]:
        """Append the tokens seq's logits processor forces next (a grammar's fixed text, such as a
        tool call's markup) without a decode step each: events for them; their keys are computed
        in the next batched forward, one row each (jump-forward decoding)."""
        forced = getattr(seq.logits_processor, "forced", None)
        if forced is None or seq.finish_reason or seq.params.logprobs:
            return []
        out = []
        for tid in forced(seq.out):
            if seq.finish_reason or seq.length >= self.max_seq:
                break
            out.append(self.advance(seq, tid))
        return out

    def _run(self, seq: Sequence, ids: list[int], begin: int) -> torch.Tensor:
        """One forward of ids (a prompt chunk) as one row at positions begin.. of seq's slot; logits
        [1, 1, V] of the last."""
        toks = torch.tensor([ids], device=self.device)
        pos = torch.arange(begin, begin + len(ids), device=self.device)[None]
        with self._adapter_rows([seq]):
            return self.model(toks, pos, self.cache, torch.tensor([seq.slot], device=self.device), last_only=True)

    def _greedy_ids(self, live: list[Sequence]) -> list[int | None]:
        """Argmax ids for the plainly greedy rows, with one host sync for all; None for the others."""
        ids: list[int | None] = [None] * len(live)
        want = [i for i, s in enumerate(live) if s.plain_greedy]
        if not want:
            return ids
        last = self._last
        row_of = {id(s): r for r, s in enumerate(last[1])} if last is not None else {}
        from_batch = [i for i in want if id(live[i]) in row_of]
        if from_batch:   # rows of the last batched forward: one argmax over the whole batch
            top = last[0].argmax(-1).tolist()
            for i in from_batch:
                ids[i] = top[row_of[id(live[i])]]
        for i in want:   # just prefilled: their own logits
            if ids[i] is None:
                ids[i] = int(torch.argmax(live[i].next_logits))
        return ids

    def advance(self, seq: Sequence, tid: int | None = None) -> TokenEvent:
        """Choose seq's next token from seq.next_logits (tid: already chosen by a greedy argmax),
        append it and apply the stop rules; the token's keys are not computed here."""
        p = seq.params
        lp = None
        if tid is None:
            logits = seq.next_logits
            if seq.logits_processor is not None:
                logits = seq.logits_processor(seq.out, logits)
            seen = generated = None
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(seq.prompt + seq.out, device=logits.device).unique()
            if p.presence_penalty or p.frequency_penalty:
                generated = torch.tensor(seq.out, dtype=torch.long, device=logits.device)
            tid = sample(logits, p, seq.generator, seen, generated)
            lp = float(torch.log_softmax(logits, -1)[tid]) if p.logprobs else None
        seq.next_logits = None     # a row of the last forward's logits: let that tensor go
        seq.out.append(tid)
        if lp is not None:
            seq.logprobs.append(lp)
        text, reason = "", None
        if tid in seq.stop_ids:
            reason = "stop"
            seq.out.pop()  # the end-of-generation token is not part of the answer
            if lp is not None:
                seq.end_logprob = seq.logprobs.pop()
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
             stop_ids: Seq[int] | None = None, max_seq: int | None = None,
             lookup: "int | PromptLookup | DraftModel | None" = None) -> Iterator[TokenEvent]:
    """Yield one TokenEvent per generated token; the last carries finish_reason.

    lookup: speculative decoding (llamaforge.speculative): a prompt-lookup draft length k, a
    PromptLookup (whose stats then count the drafts) or a DraftModel; the same tokens, fewer forwards.
    """
    lookup = as_lookup(lookup)
    n = len(prompt)
    need = min(n + max(params.max_tokens, 1), model.args.max_seq_len)
    batch = Batch(model, tokenizer, max_batch=1, max_seq=max(need, min(max_seq or need, model.args.max_seq_len)),
                  lookup=lookup)
    seq = batch.add(prompt, params, stop_ids)
    while not seq.finish_reason:
        for _, ev in batch.step():
            if ev.error is not None:
                raise ev.error
            yield ev


def generate_batch(model, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams], tokenizer=None,
                   stop_ids: Seq[int] | None = None) -> list[Sequence]:
    """Generate for several prompts at once (one batched forward per step); returns finished Sequences."""
    plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    need = max(len(p) + max(sp.max_tokens, 1) for p, sp in zip(prompts, plist))
    batch = Batch(model, tokenizer, max_batch=len(prompts), max_seq=min(need, model.args.max_seq_len))
    seqs = [batch.add(p, sp, stop_ids) for p, sp in zip(prompts, plist)]
    while any(not s.finish_reason for s in seqs):
        for _, ev in batch.step():
            if ev.error is not None:
                raise ev.error
    return seqs
