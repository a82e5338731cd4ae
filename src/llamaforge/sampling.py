"""Sampling as pure functions on logits. Each row of a batch may use its own settings."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1     # what torch.Generator.manual_seed accepts


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

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
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
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None) -> int:
    """Pick the next id from logits [V] (float32) under params."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return int(torch.argmax(logits))
    # the largest logit shifted to 0 before scaling: a tiny temperature then sends the others to
    # -inf instead of the largest to +inf (which makes the softmax NaN)
    logits = filter_logits((logits - logits.max()) / params.temperature, params.top_k, params.top_p, params.min_p)
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int | None) -> torch.Generator | None:
    return torch.Generator().manual_seed(seed) if seed is not None else None
