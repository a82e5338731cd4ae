"""Linear and Embedding modules that compute straight from a GGUF file's blocks (Q4_0, Q4_1, Q8_0).

The blocks stay where the loader put them (a view of the memory-mapped file): nothing is repacked
or requantized, so the model computes with exactly the weights the file defines, in float32.
Few rows (decode, a batch of decoding sequences) go through the native block kernel, which reads
each weight once for all rows; many rows (a prompt) dequantize the matrix once and use the BLAS
matmul, which is then bit-identical to the float32 path.
"""
from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .gguf_blocks import QTensor
from ..memory import release_pages
from ..native import TYPE_IDS, kernels

# 4-bit types get float32 block scales at load (measured per decode-sized call on this machine:
# 26.4 vs 32.2 us for a 3072x576 Q4_1 matrix, 12.9 vs 16.2 us for 576x1536); Q8_0 (the
# vocabulary) gains 4% for 6% more memory, so it stays a view of the file
WIDENED = ("Q4_0", "Q4_1")
WIDE_OFFSET = 100

# Row counts up to this use the block kernel; above it, dequantize + BLAS. Measured on the bundled
# model's shapes (2 threads): the kernel costs ~16 us per row of a 3072x576 Q4_1 matrix up to 16
# rows (259 us at 16, against 1,049 us for dequantize + BLAS, whose weight packing dominates at
# few rows) and 639 us at 24 (x outgrows L1) against 1,265 us; BLAS wins for prompts.
DIRECT_MAX_ROWS = 32


def supported(qt: QTensor) -> bool:
    """Whether the native kernels can compute with this tensor (type known, kernels built)."""
    return qt.qtype in TYPE_IDS and kernels() is not None


def _block_tensor(qt: QTensor) -> torch.Tensor:
    """uint8 [rows, bytes per row] over the tensor's data, without a copy."""
    return torch.from_numpy(np.asarray(qt.data))


class GGMLLinear(nn.Module):
    """y = x W^T with W given as GGML blocks uint8 [out, in/32 * block bytes]."""

    def __init__(self, qt: QTensor):
        super().__init__()
        self._source = qt.data    # the mapped file's array, while the blocks are a view of it
        blocks = _block_tensor(qt)
        self.out_features, self.in_features = qt.shape
        self.qtype, self._type_id = qt.qtype, TYPE_IDS[qt.qtype]
        self._k = kernels()
        if self.qtype in WIDENED:
            # the same blocks with float32 scales: 20% more bytes for 4-bit blocks, ~20% faster
            # decode (no float16 conversions in the kernel's loop); results are bit-identical
            blocks = self._k.to_f32_scales(blocks, self._type_id, self.in_features)
            self._type_id += WIDE_OFFSET
            self._release_source()
        self.register_buffer("blocks", blocks, persistent=False)
        self._group: _Siblings | None = None

    def _release_source(self) -> None:
        """The file's pages were copied: let them go (keeps peak RSS to one copy of the weights)."""
        if self._source is not None:
            release_pages(self._source)
            self._source = None

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in], equal to gguf-py's dequantization bit for bit."""
        return self._k.dequantize(self.blocks, self._type_id, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._group is not None:
            return self._group.output(self, x)
        return _matmul(self._k, x, self.blocks, self._type_id, self.in_features)

    def extra_repr(self) -> str:
        fused = " (computed with its siblings)" if self._group is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.qtype} blocks{fused}"


def _matmul(k, x: torch.Tensor, blocks: torch.Tensor, type_id: int, in_features: int) -> torch.Tensor:
    xf = x if x.dtype == torch.float32 else x.float()
    if xf.numel() <= DIRECT_MAX_ROWS * in_features:
        y = k.matmul(xf, blocks, type_id, in_features)                 # [..., out]
    else:
        y = F.linear(xf, k.dequantize(blocks, type_id, in_features, _scratch(blocks.shape[0] * in_features)))
    return y if y.dtype == x.dtype else y.to(x.dtype)


_local = threading.local()


def _scratch(numel: int) -> torch.Tensor:
    """A per-thread float32 buffer for dequantized weights, reused across layers and calls.

    A fresh tensor per matrix would fault in new pages every time: measured 105 ms of a 0.93 s
    512-token prefill of the bundled model, against 20 ms with the buffer reused.
    """
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _local.buf = torch.empty(numel)
    return buf


class _Siblings:
    """Linears that always read the same input (wq/wk/wv; w1/w3), computed in one pass over their blocks.

    The first member called with an input computes every member's output at once (one kernel call
    over the rows of all members); the others then return their share for that same input object.
    A member called with any other input computes the whole group again, so results never depend
    on the call order. Inputs are never modified in place between sibling calls in the model.
    """

    def __init__(self, members: list[GGMLLinear]):
        self.blocks = torch.cat([m.blocks for m in members])     # one matrix: rows of every member
        self.sizes = [m.out_features for m in members]
        self.index = {id(m): i for i, m in enumerate(members)}
        self.k, self.type_id, self.in_features = members[0]._k, members[0]._type_id, members[0].in_features
        self._x: torch.Tensor | None = None
        self._pending: list[torch.Tensor | None] = []
        start = 0
        for m in members:   # each member keeps a view of its rows (for dequantize and repr)
            m.blocks = self.blocks[start:start + m.out_features]
            start += m.out_features
            m._group = self
            m._release_source()

    def output(self, member: GGMLLinear, x: torch.Tensor) -> torch.Tensor:
        i = self.index[id(member)]
        if x is self._x and self._pending[i] is not None:
            y, self._pending[i] = self._pending[i], None
            if all(p is None for p in self._pending):   # all handed out: hold no activations
                self._x, self._pending = None, []
            return y
        y = _matmul(self.k, x, self.blocks, self.type_id, self.in_features)
        parts = list(y.split(self.sizes, dim=-1))
        mine, parts[i] = parts[i], None
        self._x, self._pending = x, parts
        return mine


def fuse_siblings(model: nn.Module) -> int:
    """Group each block's q/k/v and gate/up projections (same input, same block type); returns the count."""
    groups = 0
    for layer in model.layers:
        for parent, names in ((layer.attention, ("wq", "wk", "wv")), (layer.feed_forward, ("w1", "w3"))):
            mods = [getattr(parent, n) for n in names]
            if all(type(m) is GGMLLinear and m._group is None for m in mods) \
                    and len({(m._type_id, m.in_features) for m in mods}) == 1:
                _Siblings(mods)
                groups += 1
    return groups


class GGMLEmbedding(nn.Module):
    """Embedding rows dequantized from GGML blocks on lookup (shared with a tied GGMLLinear)."""

    def __init__(self, linear: GGMLLinear, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = linear.out_features, linear.in_features
        self.qtype, self._type_id, self._k = linear.qtype, linear._type_id, linear._k
        self.register_buffer("blocks", linear.blocks, persistent=False)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self._k.dequantize(self.blocks.index_select(0, ids.reshape(-1)), self._type_id, self.embedding_dim)
        rows = rows.view(*ids.shape, self.embedding_dim)
        return rows if rows.dtype == self.dtype else rows.to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.qtype} blocks"
