"""GGUF block-quantized tensors -> packed Int4Linear / Int8Linear modules, without a float detour.

Q4_0 and Q4_1 map onto the int4 kernels exactly up to rounding the block scale (and Q4_1's offset)
to bfloat16, the kernels' scale type:
  Q4_0: w = d * (q - 8)      -> scale d, zero 0
  Q4_1: w = d * q + m        -> scale d, zero m + 8 d       (w = (q - 8) * scale + zero)
Q8_0 has one scale per 32 weights while the int8 kernel has one per row, so Q8_0 is requantized
per row. Other types (Q5_x, K-quants) are dequantized block by block and requantized: to int4
(group 32) when they have 4 bits or fewer, else to int8. `repack_error` measures what each of
these costs against the GGUF's own dequantization.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..config import ModelArgs
from ..memory import release_pages, scratch_to_mmap, trim_heap
from ..model import Transformer
from . import ggml
from .gguf_blocks import QTensor
from .linear import Int4Linear, Int8Embedding, Int8Linear, dequantized_weight, int4_supported, quantize_int8_rows

log = logging.getLogger(__name__)

# vocabulary projections recompute this many top logits per row in float32 (see Int8Linear)
EXACT_TOP = 32
_LOW_BIT = ("Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K")


def _blocks(qt: QTensor) -> torch.Tensor:
    """uint8 [rows, n_blocks, bytes_per_block] over the (memory-mapped) data, no copy."""
    rows, cols = qt.shape
    data = torch.from_numpy(np.asarray(qt.data))
    return data.view(rows, cols // qt.block_size, qt.type_size)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian float16 from a [..., 2] uint8 slice, as float32."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def q4_codes(qt: QTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int32 [N, K] 0..15, scale [N, K/32], zero [N, K/32]) of a Q4_0/Q4_1 tensor, w = (q-8)*scale+zero."""
    b = _blocks(qt)
    d = _f16(b[..., 0:2])
    if qt.qtype == "Q4_0":
        zero, qs = torch.zeros_like(d), b[..., 2:18]
    else:
        zero, qs = _f16(b[..., 2:4]) + 8 * d, b[..., 4:20]
    # ggml: the low nibbles hold weights 0..15 of the block, the high nibbles 16..31
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).to(torch.int32)
    return q.reshape(qt.shape), d, zero


def repack(qt: QTensor, *, group_size: int = 32) -> nn.Module:
    """A packed Linear module computing with the weights of one GGUF tensor."""
    N, K = qt.shape
    if qt.qtype in ("Q4_0", "Q4_1") and int4_supported(N, K, 32):
        q, s, z = q4_codes(qt)
        return Int4Linear(q, s, z, 32)
    if qt.qtype == "Q8_0":
        return Int8Linear(*q8_rows(qt))
    w = qt.dequantize()
    if qt.qtype in _LOW_BIT and int4_supported(N, K, group_size):
        return Int4Linear.from_float(w, group_size)
    return Int8Linear.from_float(w)


def repack_error(qt: QTensor, module: nn.Module | None = None) -> float:
    """Relative RMS error ||W_packed - W_gguf|| / ||W_gguf|| of repacking one tensor."""
    ref = qt.dequantize()
    module = module or repack(qt)
    if isinstance(module, Int4Linear) and qt.qtype in ("Q4_0", "Q4_1"):
        # exact reconstruction from the GGUF codes and the module's bf16 scales and zeros
        q, _, _ = q4_codes(qt)
        sz, g = module.scales_and_zeros.float(), module.group_size          # [K/g, N, 2]
        w = (q.float() - 8) * sz[..., 0].t().repeat_interleave(g, 1) + sz[..., 1].t().repeat_interleave(g, 1)
    else:
        w = dequantized_weight(module)
    return float((w - ref).norm() / ref.norm().clamp(min=1e-12))


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def load_packed(args: ModelArgs, tensors: dict[str, Any], device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, progress: bool = False) -> nn.Module:
    """A Transformer whose Linears compute straight from the checkpoint's blocks.

    On the CPU with the native kernels built, every quantized matrix (QTensor) and every float16 /
    bfloat16 matrix becomes a GGMLLinear over the file's own memory-mapped blocks: no pass over the
    weights, no copy. Otherwise (another device, no compiler) quantized tensors are repacked into
    Int4Linear/Int8Linear, and a warning names each one. Other float tensors (norms, float32
    matrices) are loaded as `dtype`. A quantized embedding becomes a GGMLEmbedding or an
    Int8Embedding sharing the rows of a tied output projection.
    """
    native = torch.device(device).type == "cpu" and ggml.kernels() is not None   # the block kernels are CPU code
    slow = ggml.not_native(tensors, device)
    if slow:
        log.warning("%d matrices do not run on the native kernels (repacked or dequantized instead): %s",
                    len(slow), ", ".join(slow[:12]) + (f" and {len(slow) - 12} more" if len(slow) > 12 else ""))
    tensors = {n: QTensor.from_float16(t) if native and _half_matrix(t) else t for n, t in tensors.items()}
    if any(isinstance(t, QTensor) and not (native and ggml.supported(t)) for t in tensors.values()):
        scratch_to_mmap()    # repacking ahead; the native path leaves malloc's defaults (prompt speed)
    model = Transformer.empty(args, device=device)
    emb = tensors.pop("tok_embeddings.weight")
    out = tensors.pop("output.weight", None)
    names = tqdm(list(tensors), desc="loading", unit="tensor", disable=not progress)
    for name in names:
        t = tensors.pop(name)
        path = name.removesuffix(".weight")
        if isinstance(t, QTensor) and native and ggml.supported(t):
            _set(model, path, ggml.GGMLLinear(t))     # computes from the mapped file's blocks
        elif isinstance(t, QTensor):
            _set(model, path, repack(t).to(device))
            release_pages(t.data)
        else:  # a copy: a view would keep the whole file mapped
            p = nn.Parameter(torch.as_tensor(t).to(device=device, dtype=dtype, copy=True), requires_grad=False)
            _set(model, name, p)
    # embedding rows and the output projection
    if isinstance(emb, QTensor) and native and ggml.supported(emb):
        emb_lin = ggml.GGMLLinear(emb)
        model.tok_embeddings = ggml.GGMLEmbedding(emb_lin, dtype)
        if args.tie_embeddings or out is None:
            model.output = emb_lin
        elif isinstance(out, QTensor):
            model.output = ggml.GGMLLinear(out) if ggml.supported(out) else repack(out)
        else:
            model.output = _float_linear(out, device, dtype)
    elif isinstance(emb, QTensor) or isinstance(out, QTensor):
        emb_mod = _int8_rows(emb, device)
        if isinstance(emb, QTensor):
            release_pages(emb.data)
        model.tok_embeddings = Int8Embedding(emb_mod.qweight, emb_mod.scales, dtype)
        if args.tie_embeddings or out is None:
            model.output = emb_mod
        else:
            model.output = repack(out).to(device) if isinstance(out, QTensor) else _float_linear(out, device, dtype)
            if isinstance(out, QTensor):
                release_pages(out.data)
        if isinstance(model.output, Int8Linear):
            model.output.exact_top = EXACT_TOP
    else:
        model.tok_embeddings.weight = nn.Parameter(torch.as_tensor(emb).to(device=device, dtype=dtype), requires_grad=False)
        if args.tie_embeddings or out is None:
            model.output.weight = model.tok_embeddings.weight
        else:
            model.output.weight = nn.Parameter(torch.as_tensor(out).to(device=device, dtype=dtype), requires_grad=False)
    if native:
        ggml.fuse_siblings(model)   # q/k/v and gate/up: one kernel call each
        ggml.fuse_blocks(model)     # a decode step of one sequence: one native call per block
        ggml.choose_activations(model)
        # generation caches in float16, llama.cpp's default: the same WikiText-2 perplexity as
        # float32, half the memory, and half the bytes a decode step reads (the bundled 135M
        # decodes ~9% faster at 512 cached tokens); scoring keeps exact caches (model.exact_cache)
        model.kv_default = torch.float16
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise ValueError(f"checkpoint does not match the model: missing {left[:5]}")
    trim_heap()
    return model.eval()


def _half_matrix(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.ndim == 2 and t.dtype in (torch.float16, torch.bfloat16)


def q8_rows(qt: QTensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 (q, scale) from Q8_0 blocks (w = d * q per 32 weights), a few thousand rows at a time."""
    b = _blocks(qt)
    q = torch.empty(qt.shape, dtype=torch.int8)
    s = torch.empty(qt.shape[0], dtype=torch.float32)
    for i in range(0, b.shape[0], chunk):
        blk = b[i:i + chunk]
        w = (blk[..., 2:].contiguous().view(torch.int8).float() * _f16(blk[..., 0:2])[..., None])
        q[i:i + chunk], s[i:i + chunk] = quantize_int8_rows(w.reshape(blk.shape[0], -1))
        release_pages(qt.data[i:i + chunk])
    return q, s


def _int8_rows(t: Any, device) -> Int8Linear:
    if isinstance(t, QTensor) and t.qtype == "Q8_0":
        q, s = q8_rows(t)
    else:
        q, s = quantize_int8_rows(t.dequantize() if isinstance(t, QTensor) else torch.as_tensor(t).float())
    return Int8Linear(q, s).to(device)


def _float_linear(t: Any, device, dtype) -> nn.Linear:
    w = torch.as_tensor(t).to(device=device, dtype=dtype)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(w, requires_grad=False)
    return lin
