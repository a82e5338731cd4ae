"""The Checkpoint every format reader returns, and which format a path holds.

Tensor names in a Checkpoint are Meta's (``layers.0.attention.wq.weight``) and q/k rows are in Meta's
interleaved RoPE order, so nothing downstream knows which format a model came from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ModelArgs
from ..errors import CheckpointError

__all__ = ["Checkpoint", "CheckpointError", "detect"]


@dataclass
class Checkpoint:
    args: ModelArgs | None                  # None for a vocabulary-only file
    tensors: dict[str, Any]                 # Meta names -> torch.Tensor (float) or quant.QTensor (packed)
    tokenizer: Any = None                   # llamaforge.tokenizer.Tokenizer
    chat_template: str | None = None
    license: str | None = None
    format: str = ""                        # "meta" | "hf" | "gguf"
    path: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # name, tensor types, file type, ...


def detect(path: str | Path) -> str:
    """'meta', 'hf' or 'gguf' from what is on disk (never from the name of the folder)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return "gguf"
        raise CheckpointError(f"{p}: not a GGUF file (magic {magic!r}); pass a checkpoint folder or a .gguf file")
    if (p / "params.json").exists() or list(p.glob("consolidated.*.pth")):
        return "meta"
    if (p / "config.json").exists():
        return "hf"
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    raise CheckpointError(f"{p}: no params.json (Meta), config.json (Hugging Face) or single .gguf file found")
