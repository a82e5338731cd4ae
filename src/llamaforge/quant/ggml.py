"""Linear and Embedding modules that compute straight from a GGUF file's blocks.

Every type llama.cpp's common presets write (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K) and float16 /
bfloat16 matrices. The blocks stay where the loader put them (a view of the memory-mapped file):
nothing is repacked or copied, so the model computes with exactly the weights the file defines.

Two activation paths (`set_activations`): "int8" quantizes each input row once per matmul to 8-bit
blocks and uses integer dot products, as llama.cpp does; "f32" multiplies float32 inputs with the
file's weights (exact up to float32 sums: what exactness tests compare). "auto" (the default) takes
int8 for models of SMALL_MODEL_BYTES of weights or more, f32 below. Few rows
(decode, a batch of decoding sequences) go through the block kernel, which reads each weight once
for all rows; many rows (a prompt) either stay on the int8 kernel or are multiplied with float32
tiles of the matrix, dequantized a few rows at a time for the BLAS matmul (see `DIRECT_MAX_ROWS`).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from .gguf_blocks import NATIVE_TYPES, QTensor
from ..native import TYPE_IDS, kernels

ACTIVATIONS = ("auto", "int8", "f32")
_mode = [os.environ.get("LLAMAFORGE_ACTIVATIONS", "auto")]
# "auto": models with fewer bytes of weights than this, all in types with a fast float32 kernel,
# keep float32 activations. Their decode is bound by per-step overhead, not bandwidth (the bundled
# 135M Q4_1 model: 14.7 vs 12.5 ms CPU per step, one thread), and float32 keeps the dequantized
# model's greedy answers, which 8-bit activations move at near-ties (as llama.cpp's do; e.g. the
# bundled model's answer to "What is the capital of France?"). Bigger models stream their weights
# (TinyLlama-1.1B Q4_0 is 0.6 GiB): 8-bit activations.
SMALL_MODEL_BYTES = 256 << 20
FAST_F32_TYPES = ("Q4_0", "Q4_1", "Q8_0", "F16", "BF16")

# float32 path: row counts up to this use the block kernel; above it, dequantized tiles + BLAS
# (dequant_matmul). Whole prompt forwards of the bundled model (2 threads, in-process A/B, medians
# of 7): 12 tokens 33 ms on the block kernel vs 44 on tiles, 20 tokens even, 32 tokens 84 vs 68.
# Decode steps never come here: their blocks run in one native call on the block kernel.
DIRECT_MAX_ROWS = 16
# int8 path: prompts stay on the integer kernel up to this many rows (see docs/inference.md)
INT8_MAX_ROWS = 1 << 30


def set_activations(kind: str) -> None:
    """"auto" (by model size, see SMALL_MODEL_BYTES), "int8" (8-bit activation blocks, integer dot
    products) or "f32" (float32 activations), for every GGMLLinear from now on."""
    if kind not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)} (got {kind!r})")
    _mode[0] = kind


def activations() -> str:
    return _mode[0]


@contextmanager
def using_activations(kind: str):
    """set_activations(kind) for a with-block, then the previous setting again."""
    before = activations()
    set_activations(kind)
    try:
        yield
    finally:
        set_activations(before)


def choose_activations(model: nn.Module) -> bool:
    """Mark the model's GGMLLinears for "auto": 8-bit activations (returns True) when its blocks
    hold at least SMALL_MODEL_BYTES or any is of a type without a fast float32 kernel, else float32."""
    mods = list({id(m): m for m in model.modules() if isinstance(m, GGMLLinear)}.values())
    big = sum(m.blocks.numel() for m in mods) >= SMALL_MODEL_BYTES \
        or any(m.qtype not in FAST_F32_TYPES for m in mods)
    for m in mods:
        m.int8_auto = big
    return big


def supported(qt: Any) -> bool:
    """Whether the native kernels can compute with this tensor (type known, kernels built)."""
    return isinstance(qt, QTensor) and qt.qtype in TYPE_IDS and kernels() is not None


def not_native(tensors: dict[str, Any], device: str | torch.device = "cpu") -> list[str]:
    """Names of the matrices that will not compute from their blocks ("name (TYPE: reason)").

    Float32 matrices and 1-D tensors are not listed: they run as they are, in float32.
    """
    out = []
    for name, t in tensors.items():
        qtype = getattr(t, "qtype", None) or {torch.float16: "F16", torch.bfloat16: "BF16"}.get(getattr(t, "dtype", None))
        if qtype is None or len(t.shape) != 2:
            continue
        if torch.device(device).type != "cpu":
            out.append(f"{name} ({qtype}: native kernels run on the CPU only)")
        elif qtype not in NATIVE_TYPES:
            out.append(f"{name} ({qtype}: no native kernel for this type)")
        elif kernels() is None:
            out.append(f"{name} ({qtype}: native kernels unavailable)")
    return out


def _block_tensor(qt: QTensor) -> torch.Tensor:
    """uint8 [rows, bytes per row] over the tensor's data, without a copy."""
    return torch.from_numpy(np.asarray(qt.data))


class GGMLLinear(nn.Module):
    """y = x W^T with W given as GGML blocks uint8 [out, in / block * block bytes]."""

    def __init__(self, qt: QTensor):
        super().__init__()
        self.out_features, self.in_features = qt.shape
        self.qtype, self._type_id = qt.qtype, TYPE_IDS[qt.qtype]
        self._k = kernels()
        self.register_buffer("blocks", _block_tensor(qt), persistent=False)
        self.int8_auto = True        # what "auto" activations mean here (choose_activations sets it)
        self._group: _Siblings | None = None

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in], equal to gguf-py's dequantization bit for bit."""
        return self._k.dequantize(self.blocks, self._type_id, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._group is not None:
            return self._group.output(self, x)
        return _matmul(self._k, x, [self.blocks], self._type_id, self.in_features, self.int8_auto)[0]

    def extra_repr(self) -> str:
        fused = " (computed with its siblings)" if self._group is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.qtype} blocks{fused}"


def _int8(int8_auto: bool) -> bool:
    """Whether matmuls take 8-bit activations now: the set_activations mode, "auto" per model."""
    mode = _mode[0]
    return mode == "int8" or (mode == "auto" and int8_auto)


def _matmul(k, x: torch.Tensor, blocks: list[torch.Tensor], type_id: int, in_features: int,
            int8_auto: bool) -> list[torch.Tensor]:
    """x @ W_i^T for each matrix's blocks."""
    xf = x if x.dtype == torch.float32 else x.float()
    rows = xf.numel() // in_features
    int8 = _int8(int8_auto)
    if rows <= (INT8_MAX_ROWS if int8 else DIRECT_MAX_ROWS):
        ys = k.matmul(xf, blocks, type_id, in_features, int8)
    else:   # dequantized a tile of weight rows at a time, one BLAS call per tile
        ys = k.dequant_matmul(xf, blocks, type_id, in_features)
    return [y if y.dtype == x.dtype else y.to(x.dtype) for y in ys]


class _Siblings:
    """Linears that always read the same input (wq/wk/wv; w1/w3), computed in one kernel call.

    The first member called with an input computes every member's output at once (the input is
    quantized once and one thread pool covers the rows of all members; their blocks stay where they
    are); the others then return their share for that same input object. A member called with any
    other input computes the whole group again, so results never depend on the call order. Inputs
    are never modified in place between sibling calls in the model.
    """

    def __init__(self, members: list[GGMLLinear]):
        self.members = members
        self.index = {id(m): i for i, m in enumerate(members)}
        self.k, self.type_id, self.in_features = members[0]._k, members[0]._type_id, members[0].in_features
        self._x: torch.Tensor | None = None
        self._pending: list[torch.Tensor | None] = []
        for m in members:
            m._group = self

    def output(self, member: GGMLLinear, x: torch.Tensor) -> torch.Tensor:
        i = self.index[id(member)]
        if x is self._x and self._pending[i] is not None:
            y, self._pending[i] = self._pending[i], None
            if all(p is None for p in self._pending):   # all handed out: hold no activations
                self._x, self._pending = None, []
            return y
        parts: list[torch.Tensor | None] = list(_matmul(self.k, x, [m.blocks for m in self.members], self.type_id,
                                                        self.in_features, self.members[0].int8_auto))
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


def fuse_blocks(model: nn.Module) -> int:
    """Give each block whose seven projections are GGMLLinears a one-call decode path (the native
    `block_decode`: the block's own kernels and torch operations in C++, bit-identical to its
    module path) for one token of one sequence; everything else (prompts, batches, training, LoRA
    or other modules swapped in later) takes the block's own forward. Returns the count."""
    n = 0
    for layer in model.layers:
        if all(type(m) is GGMLLinear for m in _projections(layer)) and "forward" not in vars(layer):
            layer.forward = _FusedDecode(layer, layer.forward)
            n += 1
    return n


def _projections(layer: nn.Module) -> list:
    a, f = layer.attention, layer.feed_forward
    return [a.wq, a.wk, a.wv, a.wo, f.w1, f.w3, f.w2]


class _FusedDecode:
    """A block's forward: one native call for a single-token, single-sequence step, else `module_forward`."""

    def __init__(self, layer: nn.Module, module_forward):
        self.layer, self.module_forward = layer, module_forward
        self.mods = _projections(layer)
        self.blocks, self.types = [m.blocks for m in self.mods], [m._type_id for m in self.mods]
        self.layer_id, self.eps = layer.attention.layer_id, layer.attention_norm.eps
        # the dicts the submodules live in, read directly: nn.Module attribute lookups cost ~1 us each,
        # and this runs once per block per generated token
        self.parts = (layer._modules, layer.attention, layer.feed_forward)
        self.params = (layer.attention_norm._parameters, layer.ffn_norm._parameters)

    def _unchanged(self) -> bool:
        """Whether the block still holds the projections it was fused with (LoRA swaps modules in)."""
        top, a, f = self.parts
        am, fm = a._modules, f._modules
        q, k, v, o, w1, w3, w2 = self.mods
        return (top["attention"] is a and top["feed_forward"] is f and am["wq"] is q and am["wk"] is k
                and am["wv"] is v and am["wo"] is o and fm["w1"] is w1 and fm["w3"] is w3 and fm["w2"] is w2)

    def __call__(self, x, rot, mask, cache, pos, slots):
        if x.shape[1] != 1 or cache is None or x.dtype != torch.float32 or not torch.is_inference_mode_enabled():
            return self.module_forward(x, rot, mask, cache, pos, slots)
        if not self._unchanged():
            lora = self._adapters(x.shape[0])
            if lora is None:
                return self.module_forward(x, rot, mask, cache, pos, slots)
            return self._rows(x, rot, mask, cache, pos, slots, lora)
        m0, i = self.mods[0], self.layer_id
        if cache._row is not None and mask is None and x.shape[0] == 1:   # one sequence's next token
            new_k, new_v, seen_k, seen_v = cache._views
            return m0._k.block_decode(x, self.blocks, self.types, _int8(m0.int8_auto), self.params[0]["weight"],
                                      self.params[1]["weight"],
                                      self.eps, rot[0], rot[1], [new_k[i], new_v[i], seen_k[i], seen_v[i]])
        return self._rows(x, rot, mask, cache, pos, slots)

    def _rows(self, x, rot, mask, cache, pos, slots, lora: tuple = ()):
        """One-token rows in their own slots (batched decode; a speculative verify's rows share one);
        lora: block_rows' multi-LoRA arguments (`_adapters`), () for none."""
        m0, i = self.mods[0], self.layer_id
        if mask is None or cache._row is not None:
            return self.module_forward(x, rot, mask, cache, pos, slots)
        rows = slots if slots is not None else torch.arange(x.shape[0])
        return m0._k.block_rows(x, self.blocks, self.types, _int8(m0.int8_auto), self.params[0]["weight"],
                                self.params[1]["weight"], self.eps, rot[0], rot[1], cache.k[i], cache.v[i],
                                rows, pos, mask, *lora)

    def _adapters(self, batch: int) -> tuple | None:
        """None unless the block holds its fused projections, each as it is or inside a multi-LoRA
        module (multilora.py); else block_rows' adapter arguments for a forward of `batch` rows (the
        factors per projection and each row's adapter), () when no row uses an adapter."""
        from ..multilora import MultiLoraLinear
        top, a, f = self.parts
        if top["attention"] is not a or top["feed_forward"] is not f:
            return None
        am, fm = a._modules, f._modules
        now = [am["wq"], am["wk"], am["wv"], am["wo"], fm["w1"], fm["w3"], fm["w2"]]
        wrapped = [isinstance(m, MultiLoraLinear) and m.base is orig for m, orig in zip(now, self.mods)]
        if not all(m is orig or w for m, orig, w in zip(now, self.mods, wrapped)):
            return None
        bank = next((m._bank[0] for m, w in zip(now, wrapped) if w), None)
        idx = bank.rows_for(torch.empty(batch, 1, 1)) if bank is not None else None
        if idx is None or not any(w and m.factors for m, w in zip(now, wrapped)):
            return ()
        plans = [m._plan if w and m.factors else ([], [], torch.empty(0)) for m, w in zip(now, wrapped)]
        return ([p[0] for p in plans], [p[1] for p in plans], [p[2] for p in plans], idx)


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
