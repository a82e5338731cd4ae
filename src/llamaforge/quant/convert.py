"""`llamaforge quantize`: any checkpoint (Meta, HF, GGUF) -> a block-quantized GGUF that llama.cpp runs."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

GGUF_TYPES = ("q8_0", "q4_0", "q4_1")


def quantize(src: str, *, type: Literal["q8_0", "q4_0", "q4_1"] = "q8_0", output: str) -> int:
    """Write a checkpoint as a quantized GGUF file (plus a model card beside it).

    src: Meta folder, Hugging Face folder or GGUF file
    type: GGML block type of the matrices (1-D tensors stay F32; with q4_* the vocabulary projection is Q8_0)
    output: the .gguf file to write
    """
    from ..formats import load_checkpoint
    from ..formats.gguf import write

    if type not in GGUF_TYPES:
        raise ValueError(f"--type must be one of {', '.join(GGUF_TYPES)} (got {type!r})")
    out = Path(output)
    if out.suffix != ".gguf":
        raise ValueError(f"{out}: the output must be a .gguf file")
    if out.exists() and out.is_dir():
        raise ValueError(f"{out}: is a directory")
    ckpt = load_checkpoint(src, progress=True)
    if ckpt.args is None:
        raise ValueError(f"{src}: holds a vocabulary only, no model weights")
    if ckpt.tokenizer is None:
        log.warning("%s: no tokenizer found; the GGUF will not run in llama.cpp without one", src)
    write(out, ckpt, qtype=type, progress=True)
    _card(out, src, ckpt, type)
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({type}, {size:.1f} MiB)")
    return 0


def _card(out: Path, src: str, ckpt, qtype: str) -> None:
    try:
        from ..cards import write_model_card
    except ImportError:  # cards land separately; the GGUF itself is complete without one
        log.warning("llamaforge.cards is not available; no model card written for %s", out)
        return
    write_model_card(out.parent, produced_by="quantize", base_model=str(src), args=ckpt.args,
                     license=ckpt.license, method=f"GGUF {qtype.upper()} block quantization (llamaforge quantize)",
                     extra={"gguf_file": out.name, "gguf_type": qtype.upper(), "source_format": ckpt.format})
