"""GGML block-quantized tensors kept packed, as a GGUF file stores them.

A QTensor is the raw uint8 blocks of one 2-D weight (usually a read-only-in-spirit view of the
memory-mapped file) plus its GGML type and its torch-order shape. Kernels that understand the block
layout consume ``data`` directly; everything else calls ``dequantize()``.

Block layouts (per 32 weights unless noted; see ggml-common.h):
  Q8_0: f16 d, int8 q[32]                -> w = d * q
  Q4_0: f16 d, uint8 qs[16]              -> w = d * (nibble - 8); low nibbles are weights 0..15
  Q4_1: f16 d, f16 m, uint8 qs[16]       -> w = d * nibble + m
  K-quants (Q4_K, Q5_K, Q6_K, ...) use 256-weight super-blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as _quants

# Types a GGUF reader accepts. F32/F16/BF16 are plain floats; the rest are dequantized by gguf-py's
# numpy code, which upstream tests against ggml's C implementation.
FLOAT_TYPES = ("F32", "F16", "BF16")
QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# Types we can also produce (gguf-py has numpy quantizers for these).
WRITABLE_QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1")


def block_sizes(qtype: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a GGML type name."""
    return GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]


@dataclass(frozen=True, eq=False)
class QTensor:
    """A packed GGML-quantized matrix: ``data`` uint8 [rows, bytes_per_row], ``shape`` (rows, cols)."""

    data: np.ndarray
    qtype: str
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        if self.qtype not in QUANT_TYPES:
            raise ValueError(f"unsupported GGML quant type {self.qtype!r}; known: {', '.join(QUANT_TYPES)}")
        bs, ts = block_sizes(self.qtype)
        rows, cols = self.shape
        if cols % bs or self.data.dtype != np.uint8 or self.data.shape != (rows, cols // bs * ts):
            raise ValueError(f"{self.qtype} blocks of shape {self.data.shape} ({self.data.dtype}) "
                             f"do not hold a {rows}x{cols} matrix")

    @property
    def block_size(self) -> int:
        return block_sizes(self.qtype)[0]

    @property
    def type_size(self) -> int:
        return block_sizes(self.qtype)[1]

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def ndim(self) -> int:
        return 2

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, cols] (a new tensor; the blocks are not modified)."""
        out = _quants.dequantize(np.asarray(self.data), GGMLQuantizationType[self.qtype])
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(self.shape)

    @classmethod
    def quantize(cls, t: torch.Tensor, qtype: str) -> "QTensor":
        """Pack a 2-D float tensor (cols must be a multiple of the block size)."""
        if qtype not in WRITABLE_QUANT_TYPES:
            raise ValueError(f"cannot quantize to {qtype}; writable types: {', '.join(WRITABLE_QUANT_TYPES)}")
        if t.ndim != 2:
            raise ValueError(f"only matrices are block-quantized, got shape {tuple(t.shape)}")
        arr = t.detach().to(torch.float32).cpu().contiguous().numpy()
        data = _quants.quantize(arr, GGMLQuantizationType[qtype])
        return cls(data, qtype, (int(t.shape[0]), int(t.shape[1])))

    def __repr__(self) -> str:
        return f"QTensor({self.qtype}, shape={self.shape}, nbytes={self.nbytes})"
