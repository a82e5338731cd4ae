"""GGUF container parsing: header, metadata and tensor views of one copy-on-write memory map.

Lives outside ``formats`` because the tokenizer reads GGUF vocabularies too; the model reader
(``formats.gguf``) builds on it. Cross-checked against ``gguf.GGUFReader`` in the tests.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import CheckpointError


@dataclass
class GGUFTensorInfo:
    name: str
    qtype: str                   # GGML type name: "F32", "Q4_1", ...
    shape: tuple[int, ...]       # torch order (GGUF's ne reversed)
    offset: int                  # absolute byte offset in the file
    nbytes: int
    data: np.ndarray             # F32/F16: typed view; others: uint8 [rows, bytes_per_row]


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6
_MAX_DIMS = 4  # GGML_MAX_DIMS


def parse(path: str | Path) -> tuple[int, dict[str, Any], list[GGUFTensorInfo]]:
    """(version, metadata, tensors) of a GGUF file, tensors as views of one copy-on-write mapping.

    gguf.GGUFReader builds a numpy view per string of the token arrays, which takes seconds for a
    50k-token vocabulary; this does the same job in milliseconds. Tests check both agree.
    """
    path = Path(path)
    try:
        # copy-on-write: tensors are writable views (torch wants that) and the file is never modified
        mm = np.memmap(path, dtype=np.uint8, mode="c")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot map GGUF file: {e}") from e
    buf, size = memoryview(mm), len(mm)
    pos = 0

    def take(fmt: str):
        nonlocal pos
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        if n > size - pos:
            raise EOFError(f"a string of {n} bytes runs past the end of the file")
        s = str(buf[pos:pos + n], "utf-8")
        pos += n
        return s

    def count(n: int, item_bytes: int, what: str) -> int:
        # every item needs item_bytes at least, so a count the file cannot hold fails before any loop
        if n * item_bytes > size - pos:
            raise EOFError(f"{n} {what} cannot fit in the {size - pos} bytes left in the file")
        return n

    def value(vtype: int):
        nonlocal pos
        if vtype in _SCALARS:
            v = take(_SCALARS[vtype])
            return float(str(np.float32(v))) if vtype == _FLOAT32 else v  # 1e-05, not 9.99999747e-06
        if vtype == _STRING:
            return string()
        if vtype != _ARRAY:
            raise ValueError(f"unknown metadata value type {vtype}")
        etype = take("<I")
        if etype in _SCALARS:  # numeric arrays in one go
            dt = np.dtype(_SCALARS[etype])
            n = count(take("<Q"), dt.itemsize, "array items")
            out = np.frombuffer(mm, dtype=dt, count=n, offset=pos).tolist()
            pos += n * dt.itemsize
            return out
        if etype == _STRING:
            return [string() for _ in range(count(take("<Q"), 8, "strings"))]
        # llama.cpp's reader refuses arrays of arrays too; refusing them also bounds the recursion
        raise ValueError("arrays of arrays are not supported" if etype == _ARRAY else f"unknown array item type {etype}")

    try:
        if size < 24 or bytes(buf[:4]) != b"GGUF":
            raise ValueError(f"bad magic {bytes(buf[:4])!r}" if size >= 4 else f"only {size} bytes")
        pos = 4
        version = take("<I")
        if version & 0xFFFF == 0:
            raise ValueError("big-endian GGUF files are not supported")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = take("<Q"), take("<Q")
        count(n_kv, 12, "metadata keys")         # key length + type at the least
        count(n_tensors, 24, "tensor infos")     # name length + n_dims + type + offset
        kv: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            if key in kv:
                raise ValueError(f"duplicate metadata key {key!r}")
            kv[key] = value(take("<I"))
        infos = []
        seen: set[str] = set()
        for _ in range(n_tensors):
            name = string()
            if name in seen:
                raise ValueError(f"duplicate tensor name {name!r}")
            seen.add(name)
            n_dims = take("<I")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions (GGML allows 1 to {_MAX_DIMS})")
            dims = [take("<Q") for _ in range(n_dims)]
            infos.append((name, dims, take("<I"), take("<Q")))
        align = kv.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise ValueError(f"invalid general.alignment {align!r}")
        data_start = -(-pos // align) * align
    except (struct.error, EOFError, ValueError, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file (truncated or corrupt?): {e}") from e

    tensors = []
    for name, dims, raw_type, off in infos:
        try:
            qtype = GGMLQuantizationType(raw_type).name
            bs, ts = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
        except (ValueError, KeyError):
            raise CheckpointError(f"{path}: tensor {name} has unknown GGML type id {raw_type}") from None
        shape = tuple(int(d) for d in reversed(dims))
        if dims[0] % bs:
            raise CheckpointError(f"{path}: tensor {name} ({qtype}) has a bad shape {shape}")
        nbytes = math.prod(dims) // bs * ts  # Python ints: a hostile shape cannot overflow
        start = data_start + off
        if start + nbytes > size:
            raise CheckpointError(f"{path}: truncated GGUF: tensor {name} ends at byte {start + nbytes} "
                                  f"but the file has {size}")
        raw = mm[start:start + nbytes]
        if qtype == "F32":
            data = raw.view(np.float32).reshape(shape)
        elif qtype == "F16":
            data = raw.view(np.float16).reshape(shape)
        else:
            data = raw.reshape(*shape[:-1], shape[-1] // bs * ts)
        tensors.append(GGUFTensorInfo(name, qtype, shape, start, nbytes, data))
    return version, kv, tensors
