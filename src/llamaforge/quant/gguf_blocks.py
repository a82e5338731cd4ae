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
# Matrices the native kernels compute with as stored: every quantized type, and float16 / bfloat16
# matrices (kept as 2-byte "blocks" of one weight instead of expanding to float32)
NATIVE_TYPES = QUANT_TYPES + ("F16", "BF16")
# offsets of the float16 scales in each type's block (the rest are code bits)
_SCALE_OFFSETS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
                  "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


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
        if self.qtype not in NATIVE_TYPES:
            raise ValueError(f"unsupported GGML quant type {self.qtype!r}; known: {', '.join(NATIVE_TYPES)}")
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

    @classmethod
    def from_float16(cls, t: torch.Tensor) -> "QTensor":
        """A float16 / bfloat16 matrix as 2-byte blocks over the same memory (no copy)."""
        if t.ndim != 2 or t.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"expected a float16 or bfloat16 matrix, got {t.dtype} {tuple(t.shape)}")
        rows, cols = (int(n) for n in t.shape)
        data = t.contiguous().view(torch.uint8).numpy().reshape(rows, cols * 2)
        return cls(data, "F16" if t.dtype == torch.float16 else "BF16", (rows, cols))

    def __repr__(self) -> str:
        return f"QTensor({self.qtype}, shape={self.shape}, nbytes={self.nbytes})"


def random_blocks(qtype: str, rows: int, cols: int, seed: int = 0, std: float | None = None) -> np.ndarray:
    """uint8 [rows, bytes per row] of valid random blocks: random code bits, float16 scales of
    magnitude 1e-3..1e-1 (either sign), finite float16 / bfloat16 values for the float types.

    std: rescale the float16 scales (or values) so that the dequantized matrix has about this
    standard deviation (weights of a usable random model rather than of an arbitrary size).
    """
    rng = np.random.default_rng(seed)
    if qtype in ("F16", "BF16"):
        vals = rng.standard_normal((rows, cols)).astype(np.float32) * np.float32(std or 1.0)
        if qtype == "F16":
            return vals.astype(np.float16).view(np.uint8)
        return (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    bs, ts = block_sizes(qtype)
    blocks = rng.integers(0, 256, size=(rows * (cols // bs), ts), dtype=np.uint8)
    scales = [rng.uniform(1e-3, 1e-1, blocks.shape[0]) * rng.choice([-1.0, 1.0], blocks.shape[0])
              for _ in _SCALE_OFFSETS[qtype]]
    if std is not None:
        def put(factor: float) -> np.ndarray:
            for off, sc in zip(_SCALE_OFFSETS[qtype], scales):
                blocks[:, off:off + 2] = (sc * factor).astype(np.float16).view(np.uint8).reshape(-1, 2)
            return blocks.reshape(rows, cols // bs * ts)
        now = _quants.dequantize(put(1.0), GGMLQuantizationType[qtype]).std()
        return put(std / now if now > 0 else 1.0)
    for off, sc in zip(_SCALE_OFFSETS[qtype], scales):
        blocks[:, off:off + 2] = sc.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, cols // bs * ts)
