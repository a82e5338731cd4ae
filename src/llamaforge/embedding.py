"""Sentence embeddings: the mean over an input's tokens of the final normed hidden states, L2-normalised.

Inputs of a batch go through the model together as rows of one forward, without a KV cache.
Shorter rows are padded on the right: attention is causal, so a token never sees the padding
after it, and the padding's own states are left out of the mean. Rows are grouped by length
(longest first) so little is padded, and a forward holds at most `budget` row x length tokens
(a single input longer than that still runs whole: an input is never split).

`activations="int8"` computes a GGUF model's block matmuls with 8-bit activation blocks, as
llama.cpp does, instead of the model's own choice (float32 for small models such as the bundled
one, whose prompts then go through dequantize + BLAS): about 2x the inputs/s on the bundled model
with AVX-512 VNNI, at a cosine of 0.999-0.9999 to the float32 vectors (short inputs move most).
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from .generate import ContextOverflow

PAD_ID = 0     # any valid id: padded positions come after every real token of their row


def check_inputs(seqs: Sequence[Sequence[int]], max_len: int, vocab: int) -> None:
    """Raise ValueError for an empty input or an id outside the vocabulary, ContextOverflow for one too long."""
    if not seqs:
        raise ValueError("nothing to embed: the input list is empty")
    for i, s in enumerate(seqs):
        if not s:
            raise ValueError(f"input {i} is empty (no tokens)")
        if len(s) > max_len:
            raise ContextOverflow(f"input {i} has {len(s)} tokens but the context window is {max_len}")
        if any(not 0 <= t < vocab for t in s):
            raise ValueError(f"input {i}: token ids must be in [0, {vocab})")


def plan(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of the inputs for each forward: longest first, rows x longest row <= budget tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    chunks: list[list[int]] = []
    for i in order:
        # the chunk's first row is its longest, so adding a row costs that length
        if chunks and (len(chunks[-1]) + 1) * lengths[chunks[-1][0]] <= budget:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def _activations(kind: str | None):
    """A with-block computing GGUF block matmuls with `kind` activations (None: as the model does)."""
    if kind is None:
        return contextlib.nullcontext()
    from .quant.ggml import using_activations
    return using_activations(kind)


@torch.inference_mode()
def pool(model, seqs: Sequence[Sequence[int]], activations: str | None = None) -> torch.Tensor:
    """Float32 [len(seqs), D]: one forward over the right-padded rows, mean over each row's tokens, L2-normalised."""
    device = model.rope_cos.device
    lengths = torch.tensor([len(s) for s in seqs], device=device)
    width = int(lengths.max())
    rows = torch.full((len(seqs), width), PAD_ID, dtype=torch.long, device=device)
    for r, s in enumerate(seqs):
        rows[r, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    with _activations(activations):
        h = model.hidden(rows).float()                                  # [B, T, D]
    if width > int(lengths.min()):
        keep = torch.arange(width, device=device)[None, :] < lengths[:, None]
        h = h * keep[..., None]
    mean = h.sum(1) / lengths[:, None]
    return torch.nn.functional.normalize(mean, dim=-1)


def embed_ids(model, seqs: Sequence[Sequence[int]], budget: int = 2048, activations: str | None = None) -> torch.Tensor:
    """Float32 [len(seqs), D] embeddings of token-id inputs, in the inputs' order."""
    out = torch.empty(len(seqs), model.args.dim)
    for chunk in plan([len(s) for s in seqs], budget):
        out[chunk] = pool(model, [seqs[i] for i in chunk], activations).cpu()
    return out
