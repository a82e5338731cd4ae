"""Weight-only quantization: swap a model's Linears for packed int8 / int4 modules.

`quantize_model(model, "int4")` quantizes float weights; GGUF files whose tensors are already
block-quantized are loaded without a float detour by `repack.load_packed` (``Llama.load(...,
weights="blocks")``, the default).
"""
from __future__ import annotations

import torch
from torch import nn

from .linear import Int4Linear, Int8Embedding, Int8Linear, int4_supported
from .repack import EXACT_TOP

KINDS = ("int8", "int4")


def quantize_model(model: nn.Module, kind: str, group_size: int = 32) -> nn.Module:
    """Replace every nn.Linear inside the transformer blocks by a packed `kind` module; in place, returns model.

    The output projection (and the embedding, which a tied model shares with it) become int8 with a
    scale per row whatever `kind` is: the vocabulary projection is where 4 bits cost the most quality.
    int4 layers whose shape the kernels cannot take fall back to int8.
    """
    if kind not in KINDS:
        raise ValueError(f"quantize must be one of {', '.join(KINDS)} (got {kind!r})")
    if kind == "int4" and group_size not in (32, 64, 128, 256):
        raise ValueError(f"int4 group_size must be 32, 64, 128 or 256 (got {group_size})")
    with torch.no_grad():
        for name, mod in list(model.layers.named_modules()):
            if isinstance(mod, nn.Linear):
                _set(model.layers, name, _quantize_linear(mod, kind, group_size))
        tied = isinstance(model.output, nn.Linear) and model.output.weight is getattr(model.tok_embeddings, "weight", None)
        if isinstance(model.output, nn.Linear):
            model.output = Int8Linear.from_float(model.output.weight, model.output.bias)
            model.output.exact_top = EXACT_TOP
        if isinstance(model.tok_embeddings, nn.Embedding):
            w = model.tok_embeddings.weight
            src = model.output if tied else Int8Linear.from_float(w)
            model.tok_embeddings = Int8Embedding(src.qweight, src.scales, w.dtype)
    return model


def _quantize_linear(mod: nn.Linear, kind: str, group_size: int) -> nn.Module:
    if kind == "int4" and int4_supported(mod.out_features, mod.in_features, group_size):
        return Int4Linear.from_float(mod.weight, group_size, mod.bias)
    return Int8Linear.from_float(mod.weight, mod.bias)


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


__all__ = ["quantize_model", "Int4Linear", "Int8Linear", "Int8Embedding", "KINDS"]
