"""Format conversion: any readable checkpoint to Meta, HF (safetensors) or GGUF (float)."""
from __future__ import annotations

from pathlib import Path

from .cards import write_model_card
from .config import torch_dtype
from .formats import Checkpoint, gguf, hf, load_checkpoint, meta


def convert_checkpoint(src: str | Path, output: str | Path, to: str = "hf", dtype: str = "float32") -> Path:
    """Read src (any format) and write it as `to` ("hf", "meta" or "gguf"); returns the output path."""
    if to not in ("hf", "meta", "gguf"):
        raise ValueError(f"unknown target format {to!r}: use hf, meta or gguf")
    target = torch_dtype(dtype)
    ckpt = load_checkpoint(src, progress=True)
    if ckpt.args is None:
        raise ValueError(f"{src}: holds a vocabulary only, nothing to convert")
    tensors = {k: v.to(target) if v.ndim > 1 else v.float() for k, v in ckpt.tensors.items()}
    out = Path(output)
    if to == "gguf":
        gguf.write(out, ckpt.args, tensors, ckpt.tokenizer, chat_template=ckpt.chat_template,
                   qtype="f16" if dtype != "float32" else "f32", metadata=ckpt.metadata)
    elif to == "hf":
        hf.write(out, ckpt.args, tensors, ckpt.tokenizer, chat_template=ckpt.chat_template)
    else:
        meta.write(out, ckpt.args, tensors, ckpt.tokenizer, chat_template=ckpt.chat_template)
    _card(out, ckpt, to)
    return out


def _card(out: Path, ckpt: Checkpoint, to: str) -> None:
    write_model_card(out if out.is_dir() else out.parent, produced_by=f"llamaforge convert --to {to}",
                     base_model=str(ckpt.path), args=ckpt.args, license=ckpt.license, method="convert")
