"""Checkpoint formats: Meta (``meta``), Hugging Face (``hf``), GGUF (``gguf``). Each reader returns the
same `Checkpoint` whatever the source; `load_checkpoint` picks the reader from what is on disk.
"""
from __future__ import annotations

from pathlib import Path

from . import gguf, hf, meta
from .checkpoint import Checkpoint, CheckpointError, detect

__all__ = ["Checkpoint", "CheckpointError", "detect", "load_checkpoint", "gguf", "hf", "meta"]


def load_checkpoint(path: str | Path, *, dequantize: bool = True, progress: bool = False) -> Checkpoint:
    """Read any supported checkpoint. With dequantize=False, GGUF quantized tensors stay packed (QTensor)."""
    kind = detect(path)
    if kind == "meta":
        return meta.read(path, progress=progress)
    if kind == "hf":
        return hf.read(path, progress=progress)
    p = Path(path)
    if p.is_dir():
        p = sorted(p.glob("*.gguf"))[0]
    return gguf.read(p, dequantize=dequantize, progress=progress)
