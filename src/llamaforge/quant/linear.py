"""Weight-only quantized Linear and Embedding modules that keep their weights packed.

Int8Linear: int8 weights with one scale per output row, ``w = q * s``.
Int4Linear: 4-bit weights in groups along the input dimension, ``w = (q - 8) * s + z`` per group,
stored in the layout of PyTorch's int4 kernels (``_weight_int4pack_mm_for_cpu`` on the CPU,
``_weight_int4pack_mm`` on CUDA). The packed layout depends on the device, so quantize a model
after moving it to its device.

Activations enter the kernels as bfloat16 (the kernels' fast path; float32 inputs take a slow
generic loop, measured at 20-40x slower here) and the result is cast back to the input's dtype, so
the residual stream, norms and attention keep their own precision.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

COMPUTE_DTYPE = torch.bfloat16
INT4_GROUP_SIZES = (32, 64, 128, 256)


def int4_supported(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether the int4 kernels take this shape (rows in multiples of 16, whole groups)."""
    return group_size in INT4_GROUP_SIZES and out_features % 16 == 0 and in_features % group_size == 0


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q int8 [N, K], scale float32 [N]) with w ~ q * scale."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise 4-bit: (q int32 [N, K] in 0..15, scale [N, K/g], zero [N, K/g]).

    The zero is stored as the value of code 8, which is what the int4 kernels expect:
    w ~ (q - 8) * scale + zero.
    """
    w = w.detach().float()
    N, K = w.shape
    g = w.reshape(N, K // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15)
    zero = lo + 8 * scale
    return q.reshape(N, K).to(torch.int32), scale, zero


class Int8Linear(nn.Module):
    """y = x @ (q * s)^T with q int8 [out, in] and s [out].

    exact_top: recompute the `exact_top` largest outputs of each row in float32 from the int8 rows.
    The kernel's outputs are bfloat16, whose spacing at a logit of 25 is 0.125, so for a vocabulary
    projection near-ties would otherwise be decided by rounding; greedy decoding needs the top exact.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 exact_top: int = 0):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.exact_top = exact_top
        self.register_buffer("qweight", qweight.to(torch.int8).contiguous())
        self.register_buffer("scales", scales.to(COMPUTE_DTYPE).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        q, s = quantize_int8_rows(weight)
        return cls(q.to(weight.device), s.to(weight.device), bias)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(COMPUTE_DTYPE)
        if x2.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
        else:  # GPUs: let the matmul read int8 converted on the fly; still half the memory of bf16
            y = F.linear(x2, self.qweight.to(COMPUTE_DTYPE)) * self.scales
        if self.exact_top and self.out_features > self.exact_top:
            y = self._refine(x.reshape(-1, shape[-1]).float(), y)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def _refine(self, xf: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        idx = y.topk(self.exact_top, dim=-1).indices                                  # [M, k]
        rows = self.qweight[idx].float() * self.scales[idx].float().unsqueeze(-1)     # [M, k, in]
        exact = (rows @ xf.unsqueeze(-1)).squeeze(-1)                                 # [M, k]
        return y.float().scatter(-1, idx, exact)

    def extra_repr(self) -> str:
        top = f", exact_top={self.exact_top}" if self.exact_top else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row{top}"


class Int4Linear(nn.Module):
    """y = x @ W^T with W in 4-bit groups of `group_size` input columns, packed for the device's kernel."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None):
        """q int [N, K] codes 0..15; scale, zero [N, K/group_size] with w = (q - 8) * scale + zero."""
        super().__init__()
        N, K = q.shape
        if not int4_supported(N, K, group_size):
            raise ValueError(f"int4 kernels need out_features % 16 == 0 and in_features % group_size == 0, "
                             f"group_size in {INT4_GROUP_SIZES}; got {N}x{K}, group {group_size}")
        self.out_features, self.in_features, self.group_size = N, K, group_size
        self.register_buffer("packed", _pack_int4(q.to(torch.int32), q.device))
        # [K/g, N, 2] (scale, zero): the kernels' layout
        sz = torch.stack([scale.t(), zero.t()], dim=-1).to(COMPUTE_DTYPE).contiguous()
        self.register_buffer("scales_and_zeros", sz)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int = 32, bias: torch.Tensor | None = None) -> "Int4Linear":
        q, s, z = quantize_int4_groups(weight, group_size)
        return cls(q, s, z, group_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(COMPUTE_DTYPE)
        if x2.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group_size={self.group_size}"


def _pack_int4(q: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    # CUDA kernel: two codes per byte (even column in the high nibble), tiled by inner_k_tiles
    u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack(u8.contiguous(), 8)


class Int8Embedding(nn.Module):
    """Embedding rows from an int8 matrix with per-row scales (shared with a tied Int8Linear)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.dtype = dtype

    @classmethod
    def tied_to(cls, linear: Int8Linear, dtype: torch.dtype = torch.float32) -> "Int8Embedding":
        return cls(linear.qweight, linear.scales, dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].to(self.dtype) * self.scales[ids].to(self.dtype).unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row"


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """float32 W [out, in] a packed linear computes with: its own dequantize(), else read off its kernel.

    Probing with an identity input is exact only up to the kernel's bfloat16 output rounding.
    """
    if callable(getattr(module, "dequantize", None)):
        return module.dequantize().float()
    eye = torch.eye(module.in_features, device=next(iter(module.buffers())).device)
    return module(eye).float().t().contiguous()
