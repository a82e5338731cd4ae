"""The KV cache: preallocated [layers, slots, kv_heads, max_seq, head_dim] keys and values.

A slot is one sequence. Rows of a batch map to slots; positions are per row, so sequences of
different lengths (continuous batching) share one cache. A q8_0 cache (dtype uint8) holds each
row as GGML Q8_0 blocks, head_dim / 32 * 34 bytes, quantized as it is written.
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops

# KV cache element types (Llama.load(kv_type=...), --kv-type); None: the model's own dtype.
# uint8 stands for Q8_0 blocks (34 bytes per 32 values), the storage type of such a cache.
KV_TYPES = {"f32": torch.float32, "f16": torch.float16, "q8_0": torch.uint8}


def kv_dtype(kv_type: str | None) -> torch.dtype | None:
    """The torch dtype of a KV cache type name ("f32", "f16", "q8_0"), None for None."""
    if kv_type is None:
        return None
    if kv_type not in KV_TYPES:
        raise ValueError(f"kv_type must be one of {', '.join(KV_TYPES)} (got {kv_type!r})")
    return KV_TYPES[kv_type]


def kv_name(model) -> str:
    """The KV cache type name of the caches `model.new_cache()` makes."""
    dtype = model.cache_dtype
    return next((name for name, d in KV_TYPES.items() if d == dtype), str(dtype))


def row_width(dtype: torch.dtype, head_dim: int) -> int:
    """Elements of one cached key or value row: head_dim, or for q8_0 (uint8) the bytes of its blocks."""
    if dtype != torch.uint8:
        return head_dim
    if head_dim % ops.QK8_0:
        raise ValueError(f"kv_type q8_0 quantizes blocks of {ops.QK8_0} values along the head, "
                         f"but this model's head size is {head_dim}")
    return head_dim // ops.QK8_0 * ops.Q8_0_BYTES


class KVCache(nn.Module):
    def __init__(self, n_layers: int, slots: int, kv_heads: int, max_seq: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        shape = (n_layers, slots, kv_heads, max_seq, row_width(dtype, head_dim))
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.max_seq = max_seq
        self.slots = slots
        self.kv_len = 0                           # keys to attend in the current forward (set by prepare)
        self._row: tuple[int, int] | None = None  # (slot, first position) when one row writes a contiguous run
        self._views: tuple = ()                   # that row's per-layer write and read windows

    def prepare(self, pos: torch.Tensor, slots: torch.Tensor | None) -> bool:
        """Plan one forward pass's writes (one host sync per forward, not per layer).

        Sets kv_len; returns whether an attention mask is needed. One row whose new positions run
        on from its cached ones sees exactly keys [0, kv_len): no mask for a decode step, a causal
        mask for a prefill that starts at 0.
        """
        B, T = pos.shape
        ends = [pos[:, 0], pos[:, -1]] + ([slots.view(-1)] if slots is not None else [])
        vals = torch.cat(ends).tolist()
        first, last = vals[:B], vals[B:2 * B]
        self.kv_len = max(last) + 1
        self._row = None
        if B == 1 and last[0] - first[0] == T - 1 and (T <= 2 or bool((pos.diff(dim=1) == 1).all())):
            slot, start = (int(vals[2]) if slots is not None else 0), first[0]
            self._row = (slot, start)
            # every layer's write window and attended window as views, made in four calls rather
            # than a dozen indexing ops per layer (a decode step is short enough for that to matter)
            rows = slice(slot, slot + 1)
            self._views = (self.k[:, rows, :, start:start + T].unbind(0), self.v[:, rows, :, start:start + T].unbind(0),
                           self.k[:, rows, :, :self.kv_len].unbind(0), self.v[:, rows, :, :self.kv_len].unbind(0))
            return not (T == 1 or first[0] == 0)
        return True

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
               slots: torch.Tensor | None, kv_len: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Write k, v [B, K, T, Hd] at positions pos [B, T]; return (keys, values, rows) to attend.

        keys/values are [B, K, kv_len, Hd] with rows None, or, for rows scattered over the slots,
        views of the whole cache [S, K, kv_len, Hd] with rows [B] naming each batch row's slot (no
        gathered copy: ops.attention reads the slots in place). A q8_0 cache returns its blocks.
        """
        if self._row is not None and k.shape[0] == 1:
            # one row, contiguous positions: copies into the slot's window, views (not gathers) out
            new_k, new_v, seen_k, seen_v = self._views
            new_k[layer].copy_(self._encode(k))
            new_v[layer].copy_(self._encode(v))
            return seen_k[layer], seen_v[layer], None
        kc, vc = self.k[layer], self.v[layer]          # [S, K, max_seq, Hd]
        B = pos.shape[0]
        rows = torch.arange(B, device=pos.device) if slots is None else slots
        # one index_put per tensor for every B and T; advanced indices (rows, pos) lead the value's shape
        kc[rows.view(B, 1), :, pos] = self._encode(k.transpose(1, 2))   # value [B, T, K, Hd]
        vc[rows.view(B, 1), :, pos] = self._encode(v.transpose(1, 2))
        if slots is None:
            return kc[:B, :, :kv_len], vc[:B, :, :kv_len], None
        return kc[:, :, :kv_len], vc[:, :, :kv_len], slots

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., Hd] in the cache's storage type (Q8_0 blocks for a uint8 cache)."""
        return ops.quantize_q8_0(x) if self.k.dtype == torch.uint8 else x.to(self.k.dtype)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Copy the keys/values of positions [0, n) of slot src into slot dst (prompt-prefix reuse)."""
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]

    def reset(self, slot: int | None = None) -> None:
        """Zero one slot or all; not needed for correctness (masks hide stale keys), only hygiene."""
        if slot is None:
            self.k.zero_(); self.v.zero_()
        else:
            self.k[:, slot].zero_(); self.v[:, slot].zero_()
