"""Speculative decoding: prompt-lookup (n-gram) drafting, or a smaller draft model (`DraftModel`).

When the text being written repeats the context (a summary quoting its source, an edited copy,
an answer citing a passage, code), the tokens that followed the latest n-gram's earlier occurrence
are a good guess for what comes next. `PromptLookup` proposes up to k such tokens; one forward over
[last token + draft] scores them all, and the longest prefix the model itself would have produced
is kept, plus the model's own token after it. The forward is a `generate.Batch` step (`Batch(...,
lookup=...)`, `_drafts` and `_verify` there), so `generate()` and the server's continuous batching
draft alike. Rejected positions are dropped by bookkeeping: a slot's cache holds `seq.fed` valid
positions and the next forward overwrites the rest.

Exactness. Every emitted token is chosen by the ordinary sampler (`Batch.advance`: penalties,
logit bias, logits processors, stop rules) from the logits row of its own position, in order, and
a draft token is accepted only when that choice equals it. The verify forward runs each token as a
row of its own (a batch of one-token rows over the same slot), so every row takes the arithmetic of
a one-token decode step; on GGUF block models with the native kernels those logits are bitwise the
ones plain decoding computes (see `ATTN_GROUP` for the one condition). Hence greedy output, and
seeded sampled output, is token for token that of plain decoding. For temperature > 0 the rule
"sample x ~ p; accept the draft d if x == d, else emit x" is exact speculative sampling for a
deterministic draft: d is kept with probability p(d), and on rejection x follows p with d removed
and renormalised. Float (BLAS) models may differ from plain decoding in the last bits of a logit,
which matters only at an exact near-tie.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# The native decode attention sums a row's softmax terms 16 keys at a time (vector exp) and the
# keys past the last full group one by one (scalar exp). A verify row at position p attends to
# p + 1 keys in both plain decoding and the verify forward, but the forward's key count is that of
# its longest row (in a batch, over all its sequences); masked keys add exact zeros, so a row's sums
# are bitwise those of plain decoding only while the forward's key count stays in the group of 16
# it has without the draft. Drafts are cut to stay inside it (`Batch._drafts`).
ATTN_GROUP = 16


@dataclass
class LookupStats:
    """Counters over every sequence decoded with one PromptLookup (read them after generating)."""
    verifies: int = 0      # forwards that scored a draft
    drafted: int = 0       # draft tokens scored
    accepted: int = 0      # draft tokens kept (each saved one decode step)
    plain_steps: int = 0   # one-token forwards (no n-gram hit, or drafting paused)

    def count(self, drafted: int, kept: int) -> None:
        """One forward of a sequence: a verify of `drafted` tokens keeping `kept`, or a plain step (0)."""
        if drafted:
            self.verifies, self.drafted, self.accepted = self.verifies + 1, self.drafted + drafted, self.accepted + kept
        else:
            self.plain_steps += 1

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class PromptLookup:
    """Prompt-lookup drafting settings; its `stats` count drafts and acceptances.

    k: most draft tokens per verify forward (>= 1)
    ngram_max, ngram_min: the n-gram sizes tried, longest first
    adaptive: size each draft by the measured acceptance and forward costs (see `_Budget`), so text
        that does not repeat its context is decoded at plain speed; False drafts k tokens on every hit
    """
    k: int = 8
    ngram_max: int = 3
    # 1-gram hits are frequent and weak: 28% of their draft tokens were kept over the speculative
    # bench's seven tasks (3- and 2-grams: 70-80% on the grounded ones), so they never paid
    ngram_min: int = 2
    adaptive: bool = True
    stats: LookupStats = field(default_factory=LookupStats)

    def __post_init__(self):
        for name in ("k", "ngram_max", "ngram_min"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"lookup {name} must be an integer (got {v!r})")
        if self.k < 1:
            raise ValueError(f"lookup k (draft tokens per step) must be >= 1 (got {self.k})")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"lookup n-gram sizes need 1 <= ngram_min <= ngram_max "
                             f"(got {self.ngram_min}, {self.ngram_max})")

    def start(self, batch: Any, seq: Any) -> "_NgramDrafter":
        """The drafter of one sequence: an n-gram index of its tokens and its own draft budget."""
        return _NgramDrafter(self, seq.prompt)


class DraftModel:
    """Drafting by a second, smaller model with the target's vocabulary (greedy, k tokens per verify).

    The draft keeps its own KV cache of the sequence so far; each `propose` feeds only the tokens it
    has not seen (a rejected draft's positions are overwritten), then decodes k tokens. Only the
    target's verify forward decides what is emitted, so the output is the target's own (greedy:
    token for token plain decoding's), whatever the draft proposes.
    """

    def __init__(self, model, k: int = 4):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"draft tokens per verify must be an integer >= 1 (got {k!r})")
        self.model, self.k = model, k
        self.stats = LookupStats()
        self._cache = None
        self._ids: list[int] = []     # the tokens whose keys and values the draft's cache holds

    def begin(self, target, max_seq: int) -> None:
        """Check the draft against the target model and size its cache for sequences of max_seq."""
        if self.model.args.vocab_size != target.args.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({self.model.args.vocab_size} tokens) is not the "
                             f"target's ({target.args.vocab_size}): speculative decoding needs the same tokenizer")
        size = min(max_seq, self.model.args.max_seq_len)
        if self._cache is None or self._cache.max_seq < size:
            self._cache, self._ids = self.model.new_cache(1, size), []

    def start(self, batch: Any, seq: Any) -> "DraftModel":
        """The drafter of one sequence (the draft model itself: its cache follows the sequence)."""
        self.begin(batch.model, batch.max_seq)
        return self

    def draft(self, seq: Any, room: int) -> list[int]:
        return self.propose(seq.prompt + seq.out, room)

    def measured(self, drafted: int, kept: int, seconds: float | None) -> None:
        """Nothing to learn: the draft model always proposes k tokens."""

    @torch.inference_mode()
    def propose(self, context: list[int], n: int) -> list[int]:
        """Up to n (<= k) greedy draft tokens after context (all tokens so far, the last one included)."""
        n = min(n, self.k, self._cache.max_seq - len(context))
        if n <= 0:
            return []
        done = 0
        for a, b in zip(self._ids, context[:-1]):   # cached keys still valid: the common prefix
            if a != b:
                break
            done += 1
        self._ids = self._ids[:done]
        dev = self.model.rope_cos.device
        feed, out = context[done:], []
        while True:
            pos = torch.arange(len(self._ids), len(self._ids) + len(feed), device=dev)[None]
            h = self.model.hidden(torch.tensor([feed], device=dev), pos, self._cache)[:, -1]
            self._ids += feed
            out.append(int(self.model.output(h).float().argmax(-1)))
            if len(out) == n:
                return out
            feed = out[-1:]


def as_lookup(lookup: "int | PromptLookup | DraftModel | None") -> "PromptLookup | DraftModel | None":
    """A PromptLookup from an int k (None or 0: no speculative decoding); a DraftModel as it is."""
    if lookup is None or isinstance(lookup, (PromptLookup, DraftModel)):
        return lookup
    if isinstance(lookup, bool) or not isinstance(lookup, int) or lookup < 0:
        raise ValueError(f"lookup must be a number of draft tokens >= 1, 0 for none, or a PromptLookup "
                         f"(got {lookup!r})")
    return PromptLookup(k=lookup) if lookup else None


class NgramIndex:
    """Where each n-gram of a growing id list last occurred with a token after it.

    `draft` looks up the list's final n-gram (n from ngram_max down): that suffix itself has no
    continuation yet, so only earlier occurrences are found. Appending costs O(ngram sizes).
    """

    def __init__(self, ids: list[int], ngram_min: int, ngram_max: int):
        self.ids: list[int] = []
        self.sizes = range(ngram_max, ngram_min - 1, -1)
        self.last: dict[tuple[int, ...], int] = {}   # n-gram -> index of the token that followed it
        self.extend(ids)

    def extend(self, new: list[int]) -> None:
        ids = self.ids
        for t in new:
            end = len(ids)          # the n-grams ending here now get `t` as their continuation
            for n in self.sizes:
                if n <= end:
                    self.last[tuple(ids[end - n:end])] = end
            ids.append(t)

    def draft(self, k: int) -> tuple[list[int], int]:
        """Up to k ids that followed the latest earlier occurrence of the longest matching suffix
        n-gram, and that n (([], 0) when no suffix occurred before)."""
        ids = self.ids
        for n in self.sizes:
            if n <= len(ids):
                at = self.last.get(tuple(ids[-n:]))
                if at is not None:
                    return ids[at:at + k], n
        return [], 0


class _Budget:
    """How many draft tokens pay for themselves, from what this sequence has measured.

    A draft token is kept with probability a (a running mean per n-gram size), so a draft of d
    tokens yields 1 + a + ... + a^d tokens; a forward of 1 + d rows costs cost[1 + d] decode steps
    (a running mean of measured times over the one-row step's, from a prior: the bundled model
    on 2 cores pays ~0.45 of a step per extra row and ~0.25 for leaving the fused one-token path; a
    big model whose weights stream from memory pays far less per row). The length maximising
    tokens per cost is used, 0 (a plain step) unless it beats a plain step by 2%. A size whose
    estimate fell too low creeps back towards the prior on every hit it skips, so it is probed again
    now and then (one short draft every few dozen tokens at worst).
    """

    PRIOR = 0.8         # acceptance assumed before any draft of an n-gram size (hopeful: probe first)
    WEIGHT = 0.3        # running-mean weight of the newest draft's acceptance
    RECOVER = 0.02      # pull towards PRIOR per skipped hit
    COST_WEIGHT = 0.2   # running-mean weight of the newest timing
    ROW, SWITCH = 0.45, 0.25   # prior cost of an extra row, and of a multi-row forward, in steps

    def __init__(self, k: int, sizes: range, adaptive: bool):
        self.k, self.adaptive = k, adaptive
        self.rate = {n: self.PRIOR for n in sizes}
        self.step: float | None = None     # seconds of a one-row forward (running mean)
        self.cost = [1.0] + [1.0 + self.SWITCH + self.ROW * d for d in range(1, k + 1)]   # [d]: 1 + d rows

    def length(self, n: int, room: int) -> int:
        """Draft tokens to use after a hit of size n, with room for at most `room`."""
        room = min(room, self.k)
        if not self.adaptive or room <= 0:
            return max(room, 0)
        a = self.rate[n]
        best, best_gain, tokens = 0, 1.02, 1.0
        for d in range(1, room + 1):
            tokens += a ** d
            gain = tokens / self.cost[d]
            if gain > best_gain:
                best, best_gain = d, gain
        if best == 0:
            self.rate[n] += (self.PRIOR - a) * self.RECOVER
        return best

    def record(self, n: int, drafted: int, accepted: int) -> None:
        """One verify's outcome; the first rejection ends a draft, so it is a run of successes and
        its per-token rate is accepted / (accepted + 1) (1 for a draft kept whole)."""
        a = 1.0 if accepted == drafted else accepted / (accepted + 1)
        self.rate[n] += (a - self.rate[n]) * self.WEIGHT

    def timed(self, d: int, seconds: float) -> None:
        """A forward of 1 + d rows took `seconds` of this thread's CPU time (unlike wall time, not
        inflated by other processes on a shared machine; intra-op threads split rows alike, so
        the ratio to a one-row step holds)."""
        w = self.COST_WEIGHT
        if d == 0:
            self.step = seconds if self.step is None else self.step + (seconds - self.step) * w
        elif self.step is not None:    # in steps: needs one plain step measured first
            self.cost[d] += (seconds / self.step - self.cost[d]) * w


class _NgramDrafter:
    """Prompt-lookup drafting for one sequence: the tokens after the latest earlier occurrence of its
    final n-gram, as many as the budget says pay for themselves."""

    def __init__(self, lookup: PromptLookup, prompt: list[int]):
        self.k = lookup.k
        self.index = NgramIndex(prompt, lookup.ngram_min, lookup.ngram_max)
        self.budget = _Budget(lookup.k, self.index.sizes, lookup.adaptive)
        self.n = 0      # the n-gram size of the last draft's hit

    def draft(self, seq: Any, room: int) -> list[int]:
        """Up to room draft tokens after seq's tokens so far."""
        index = self.index
        index.extend(seq.out[len(index.ids) - len(seq.prompt):])
        draft, self.n = index.draft(self.k)
        return draft[:self.budget.length(self.n, min(len(draft), room))] if draft else []

    def measured(self, drafted: int, kept: int, seconds: float | None) -> None:
        """A forward of 1 + drafted rows took `seconds` of CPU time (None: it carried other sequences'
        rows too, so it says nothing of this draft's cost) and kept `kept` draft tokens."""
        if seconds is not None:
            self.budget.timed(drafted, seconds)
        if drafted:
            self.budget.record(self.n, drafted, kept)
