"""The model's hot small operations, with a native CPU kernel for inference.

Each function is defined by its torch expression, which is also what runs for training (autograd),
outside torch.inference_mode(), on other devices, for other dtypes, and when the native kernels
are not built. For float32 inference on the CPU it calls llamaforge's own kernels (kernels.cpp), because at batch 1 a decode
step is dominated by these small calls: torch's fused attention spends most of its time setting up
for a single query, and RMSNorm is several dispatches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import native


_F32 = torch.float32


def _native(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None):
    """The kernels module inside torch.inference_mode() when every tensor is a float32 CPU tensor.

    Only inference mode (what generation and evaluation run under), so that a model outside it,
    training or not, computes exactly the torch expressions. (Written out without loops: this
    check runs a few hundred times per generated token.)
    """
    if not torch.is_inference_mode_enabled():
        return None
    if a.dtype != _F32 or b.dtype != _F32 or (c is not None and c.dtype != _F32) or a.device.type != "cpu":
        return None
    return _kernels[0] if _kernels else refresh()


_kernels: list = []   # [module or None], resolved once: reading the environment per call costs ~1 us


def refresh():
    """Re-read LLAMAFORGE_NATIVE and the kernels' availability (Llama.load calls this)."""
    _kernels[:] = [native.kernels()]
    return _kernels[0]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim, computed in float32."""
    k = _native(x, weight)
    if k is not None:
        return k.rms_norm(x, weight, eps)
    if x.dtype == torch.float32 == weight.dtype:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


QK8_0, Q8_0_BYTES = 32, 34   # values per GGML Q8_0 block; its bytes: a float16 scale and 32 int8 codes


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """GGML Q8_0 blocks, uint8 [..., n / 32 * 34], of x [..., n] (n a multiple of 32).

    Rounded as llama.cpp's quantize_row_q8_0_ref (and gguf-py): d = max|x| / 127 stored as float16,
    codes round-half-away-from-zero of x / d with the float32 d.
    """
    k = _native(x, x)
    if k is not None:
        return k.quantize_q8_0(x)
    xb = x.float().unflatten(-1, (-1, QK8_0))
    d = xb.abs().amax(-1, keepdim=True) / 127
    y = xb * torch.where(d == 0, 0.0, 1 / d)
    a = y.abs()
    # roundf without a float add (floor(a + 0.5) rounds 0.49999997 up): gguf-py's np_roundf
    q = y.sign() * (a.floor() + (2 * (a - a.floor())).floor())
    codes = q.to(torch.int8).view(torch.uint8)
    return torch.cat((d.half().view(torch.uint8), codes), -1).flatten(-2)


def dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """float32 [..., n] of Q8_0 blocks uint8 [..., n / 32 * 34] (any strides, rows contiguous), as gguf-py."""
    b = blocks.unflatten(-1, (-1, Q8_0_BYTES))
    d = b[..., :2].contiguous().view(torch.float16).float()
    return (b[..., 2:].view(torch.int8).float() * d).flatten(-2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              causal: bool = False, rows: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(Hd) [+ mask]) v with grouped KV heads.

    q [B, H, T, Hd]; k, v [B, K, L, Hd] with H a multiple of K, or uint8 Q8_0 blocks [B, K, L, Hd / 32 * 34];
    mask [B, 1, T, L] bool (True attends).
    rows [B]: k and v hold more rows (a whole KV cache) and batch row b attends to k[rows[b]].
    """
    gqa = k.shape[1] != q.shape[1]
    if q.shape[2] == 1 and not causal and k.stride(-1) == 1 and k.stride(-2) == k.shape[-1] \
            and v.stride(-1) == 1 and v.stride(-2) == v.shape[-1]:
        # a float16 or Q8_0 KV cache: the kernel converts each row in registers as it reads it
        packed = k.dtype in (torch.float16, torch.uint8) and v.dtype == k.dtype
        kern = _native(q, q) if packed else _native(q, k, v)
        if kern is not None:
            return kern.decode_attention(q, k, v, mask, rows)
    if rows is not None:
        k, v = k.index_select(0, rows), v.index_select(0, rows)
    if k.dtype == torch.uint8:   # a Q8_0 cache (the prompt path): the attended slices, dequantized
        k, v = dequantize_q8_0(k), dequantize_q8_0(v)
    if k.dtype != q.dtype:   # a float16 cache under a float32 model: attend in the model's type
        k, v = k.to(q.dtype), v.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[2i], x[2i+1]) of x [B, T, H, Hd] by cos, sin [B, T, Hd/2] (computed in float32)."""
    if x.stride(-1) == 1:
        k = _native(x, cos, sin)
        if k is not None:
            return k.rope(x, cos, sin)
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)            # [B, T, H, Hd/2] each
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)                       # broadcast over heads
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).type_as(x)
