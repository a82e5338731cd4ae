"""`llamaforge quantize`: any checkpoint (Meta, HF, GGUF) -> a block-quantized GGUF that llama.cpp runs."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from ..cards import write_model_card
from ..formats import load_checkpoint
from ..formats.gguf import write
from .mixes import QUANT_FILE_TYPES

log = logging.getLogger(__name__)

QuantType = Literal["q4_k_m", "q5_k_m", "q6_k", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]


def quantize(src: str, *, type: QuantType = "q4_k_m", output: str) -> int:
    """Write a checkpoint as a quantized GGUF file (plus a model card beside it).

    src: Meta folder, Hugging Face folder or GGUF file (a quantized GGUF is dequantized first)
    type: llama.cpp file type; each tensor gets llama.cpp's type for it (q4_k_m: Q4_K with Q6_K for the output and some attn_v/ffn_down; norms F32)
    output: the .gguf file to write
    """
    if type not in QUANT_FILE_TYPES:
        raise ValueError(f"--type must be one of {', '.join(QUANT_FILE_TYPES)} (got {type!r})")
    out = Path(output)
    if out.suffix != ".gguf":
        raise ValueError(f"{out}: the output must be a .gguf file")
    if out.exists() and out.is_dir():
        raise ValueError(f"{out}: is a directory")
    # GGUF tensors stay memory-mapped (F16 views, packed blocks); the writer converts one at a time
    ckpt = load_checkpoint(src, dequantize=False, progress=True)
    if ckpt.args is None:
        raise ValueError(f"{src}: holds a vocabulary only, no model weights")
    if ckpt.tokenizer is None:
        log.warning("%s: no tokenizer found; the GGUF will not run in llama.cpp without one", src)
    write(out, ckpt, qtype=type, progress=True)
    write_model_card(out.parent, produced_by="quantize", base_model=str(src), args=ckpt.args,
                     license=ckpt.license, method=f"GGUF {type.upper()} block quantization (llamaforge quantize, "
                                                  "llama.cpp's per-tensor type mix)",
                     extra={"gguf_file": out.name, "gguf_type": type.upper(), "source_format": ckpt.format})
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({type}, {size:.1f} MiB)")
    return 0
