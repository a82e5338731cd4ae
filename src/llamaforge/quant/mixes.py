"""llama.cpp's per-tensor type mixes: which GGML type each tensor gets for a file type.

Follows ``llama_tensor_get_type`` in llama.cpp's llama-quant.cpp for the Llama architecture without an
importance matrix: the output projection (or the embedding it is tied to) goes to Q6_K, the
``*_K_M`` mixes give ``attn_v`` and ``ffn_down`` Q6_K in the layers ``use_more_bits`` picks, and a
tensor whose row length does not fit the type's block falls back (Q4_K -> Q5_0, Q5_K -> Q5_1,
Q6_K -> Q8_0, else F16). 1-D tensors (norms) stay F32.
"""
from __future__ import annotations

import logging
import re

from .gguf_blocks import block_sizes

# file type -> (gguf.LlamaFileType member, the type most matrices get)
FILE_TYPES = {
    "f32": ("ALL_F32", "F32"), "f16": ("MOSTLY_F16", "F16"), "bf16": ("MOSTLY_BF16", "BF16"),
    "q8_0": ("MOSTLY_Q8_0", "Q8_0"), "q4_0": ("MOSTLY_Q4_0", "Q4_0"), "q4_1": ("MOSTLY_Q4_1", "Q4_1"),
    "q5_0": ("MOSTLY_Q5_0", "Q5_0"), "q5_1": ("MOSTLY_Q5_1", "Q5_1"),
    "q4_k_m": ("MOSTLY_Q4_K_M", "Q4_K"), "q5_k_m": ("MOSTLY_Q5_K_M", "Q5_K"), "q6_k": ("MOSTLY_Q6_K", "Q6_K"),
}
QUANT_FILE_TYPES = ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
log = logging.getLogger(__name__)
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The first and last eighth of the layers, and every third one between (llama.cpp's rule)."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], ftype: str, n_layers: int, tied: bool) -> str:
    """GGML type of tensor ``name`` (GGUF name, e.g. ``blk.3.attn_v.weight``) in a ``ftype`` file."""
    if ftype not in FILE_TYPES:
        raise ValueError(f"unknown file type {ftype!r}; choose one of {', '.join(FILE_TYPES)}")
    default = FILE_TYPES[ftype][1]
    if len(shape) < 2 or default == "F32":
        return "F32"
    if default in ("F16", "BF16"):
        return default
    cols = shape[-1]
    new = default
    m = re.match(r"blk\.(\d+)\.", name)
    layer = int(m.group(1)) if m else -1
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if cols % block_sizes(default)[0]:
            new = "Q8_0"
        elif default != "Q8_0":
            new = "Q6_K"
    elif ftype in ("q4_k_m", "q5_k_m") and ("attn_v.weight" in name or "ffn_down" in name):
        # attn_v counts attn_v tensors and ffn_down counts layers; both are the layer index for Llama
        if use_more_bits(layer, n_layers):
            new = "Q6_K"
    if cols % block_sizes(new)[0]:
        want, new = new, _FALLBACK.get(new, new)
        if cols % block_sizes(new)[0]:
            new = "F16"
        (log.warning if new == "F16" else log.info)(
            "%s: %d columns are not a multiple of the %s block; using %s", name, cols, want, new)
    return new
