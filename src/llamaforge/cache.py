"""The KV cache: preallocated [layers, slots, kv_heads, max_seq, head_dim] keys and values.

A slot is one sequence. Rows of a batch map to slots; positions are per row, so sequences of
different lengths (continuous batching) share one cache.
"""
from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(self, n_layers: int, slots: int, kv_heads: int, max_seq: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        shape = (n_layers, slots, kv_heads, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.max_seq = max_seq
        self.slots = slots

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
               slots: torch.Tensor | None, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, K, T, Hd] at positions pos [B, T]; return keys/values [B, K, kv_len, Hd] to attend."""
        B, T = pos.shape
        kc, vc = self.k[layer], self.v[layer]          # [S, K, max_seq, Hd]
        rows = torch.arange(B, device=pos.device) if slots is None else slots
        if T == 1 or B == 1:
            # one index_put per tensor; advanced indices (rows, pos) come first in the value's shape
            kc[rows.view(B, 1), :, pos] = k.transpose(1, 2).to(kc.dtype)   # value [B, T, K, Hd]
            vc[rows.view(B, 1), :, pos] = v.transpose(1, 2).to(vc.dtype)
        else:
            for b in range(B):
                kc[rows[b], :, pos[b]] = k[b].transpose(0, 1).to(kc.dtype)
                vc[rows[b], :, pos[b]] = v[b].transpose(0, 1).to(vc.dtype)
        if slots is None:
            return kc[:B, :, :kv_len], vc[:B, :, :kv_len]
        return kc[slots, :, :kv_len], vc[slots, :, :kv_len]

    def reset(self, slot: int | None = None) -> None:
        """Zero one slot or all; not needed for correctness (masks hide stale keys), only hygiene."""
        if slot is None:
            self.k.zero_(); self.v.zero_()
        else:
            self.k[:, slot].zero_(); self.v[:, slot].zero_()
