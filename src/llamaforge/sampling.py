"""Sampling as pure functions on logits. Each row of a batch may use its own settings."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1     # what torch.Generator.manual_seed accepts
PENALTY_MAX = 2.0           # presence/frequency penalties lie in [-2, 2], as in OpenAI's API
BIAS_MAX = 100.0            # a logit_bias value lies in [-100, 100]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings (the OpenAI / llama.cpp knobs)."""
    max_tokens: int = 128
    temperature: float = 0.0          # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 disables
    min_p: float = 0.0
    repetition_penalty: float = 1.0   # CTRL-style: divide positive logits, multiply negative ones
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    logprobs: bool = False
    ignore_eos: bool = False
    presence_penalty: float = 0.0     # OpenAI's: subtracted once from each token already generated
    frequency_penalty: float = 0.0    # OpenAI's: subtracted once per time a token was generated
    # (token id, value added to its logit), sorted by id; a {id: value} mapping is accepted
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):   # NaN passes every comparison below
                raise ValueError(f"{name} must be a finite number")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}]")
        if self.max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 <= self.min_p < 1:
            raise ValueError("min_p must be in [0, 1)")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -PENALTY_MAX <= getattr(self, name) <= PENALTY_MAX:
                raise ValueError(f"{name} must be in [{-PENALTY_MAX:g}, {PENALTY_MAX:g}]")
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Whether the logits change before sampling (bias or a penalty), so a row needs its own pass."""
        return bool(self.logit_bias or self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0)


def _bias_pairs(bias: Mapping[int, float] | Sequence[tuple[int, float]]) -> tuple[tuple[int, float], ...]:
    """logit_bias as sorted (id, value) pairs, each id once, each value finite and in range."""
    items = bias.items() if isinstance(bias, Mapping) else bias
    out = {}
    for tid, value in items:
        if isinstance(tid, bool) or not isinstance(tid, int) or tid < 0:
            raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {tid!r}")
        value = float(value)
        if not (math.isfinite(value) and -BIAS_MAX <= value <= BIAS_MAX):
            raise ValueError(f"logit_bias values must be in [{-BIAS_MAX:g}, {BIAS_MAX:g}], got {value!r} for {tid}")
        out[tid] = value
    return tuple(sorted(out.items()))


def apply_logit_bias(logits: torch.Tensor, bias: Sequence[tuple[int, float]]) -> torch.Tensor:
    """logits [V] plus each (id, value) of bias (OpenAI's logit_bias: -100 all but bans a token,
    +100 all but forces it; a token masked to -inf stays masked)."""
    if not bias:
        return logits
    ids = torch.tensor([t for t, _ in bias], device=logits.device)
    values = torch.tensor([v for _, v in bias], dtype=logits.dtype, device=logits.device)
    return logits.index_add(0, ids, values)


def apply_presence_frequency(logits: torch.Tensor, generated: torch.Tensor, presence: float,
                             frequency: float) -> torch.Tensor:
    """OpenAI's penalties on logits [V]: logit[j] -= c[j] * frequency + (c[j] > 0) * presence, where
    c[j] counts token j among the generated ids (the prompt does not count)."""
    if (presence == 0.0 and frequency == 0.0) or generated.numel() == 0:
        return logits
    ids, counts = torch.unique(generated, return_counts=True)
    return logits.index_add(0, ids, -(counts.to(logits.dtype) * frequency + presence))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [V], seen: ids already in the context."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    info = torch.finfo(logits.dtype)
    # within the dtype's normal range, and the result finite: a penalty of 1e-300 must not make an
    # inf logit (inf - inf is NaN in the softmax), nor 1e300 a NaN (0 * inf)
    penalty = min(max(penalty, info.tiny), info.max)
    logits = logits.clone()
    vals = logits[seen]
    logits[seen] = torch.where(vals > 0, vals / penalty, vals * penalty).clamp(max=info.max)
    return logits


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Mask (to -inf) what top-k, min-p and top-p exclude; logits [V] already temperature-scaled."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if min_p > 0:
        probs = torch.softmax(logits, -1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= top_p   # keep the smallest prefix reaching top_p
        drop[0] = False   # and always the most likely token (a top_p below float32's range rounds to 0)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, idx, drop), float("-inf"))
    return logits


def adjust_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
                  generated: torch.Tensor | None = None) -> torch.Tensor:
    """logit_bias, then the penalties (as vLLM orders them): repetition over seen (the ids in the
    context), presence/frequency over generated (the ids generated so far)."""
    logits = apply_logit_bias(logits, params.logit_bias)
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if generated is not None:
        logits = apply_presence_frequency(logits, generated, params.presence_penalty, params.frequency_penalty)
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None, generated: torch.Tensor | None = None) -> int:
    """Pick the next id from logits [V] (float32) under params (seen, generated: see adjust_logits)."""
    logits = adjust_logits(logits, params, seen, generated)
    if params.greedy:
        return int(torch.argmax(logits))
    # the largest logit shifted to 0 before scaling: a tiny temperature then sends the others to
    # -inf instead of the largest to +inf (which makes the softmax NaN)
    logits = filter_logits((logits - logits.max()) / params.temperature, params.top_k, params.top_p, params.min_p)
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int | None) -> torch.Generator | None:
    return torch.Generator().manual_seed(seed) if seed is not None else None


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` of a request with `seed` (n > 1): choice 0 keeps the seed itself,
    so it equals the n = 1 answer; the others get distinct seeds derived from it."""
    if seed is None or index == 0:
        return seed
    return (seed + index * 0x9E3779B97F4A7C15) % 2 ** 64   # golden-ratio stride; manual_seed takes mod 2^64 too
