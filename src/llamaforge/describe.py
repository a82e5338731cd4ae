"""What a checkpoint is, without building the model: the data behind `llamaforge info`."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from .formats import load_checkpoint
from .quant.ggml import not_native
from .safety.license import identify


def _tensor_type(t: Any) -> str:
    qtype = getattr(t, "qtype", None)
    return str(qtype) if qtype is not None else str(t.dtype).replace("torch.", "")


def describe(path: Path) -> dict[str, Any]:
    """Format, architecture, sizes, tensor types, tokenizer, licence and chat template of a checkpoint."""
    ckpt = load_checkpoint(path, dequantize=False)
    a, tok = ckpt.args, ckpt.tokenizer
    types = ckpt.metadata.get("tensor_types") or dict(Counter(_tensor_type(t) for t in ckpt.tensors.values()))
    out: dict[str, Any] = {
        "path": str(path), "format": ckpt.format,
        "architecture": "llama" if a else "(vocabulary only)",
        "name": ckpt.metadata.get("name"),
    }
    if a:
        out.update({
            "parameters": f"{a.n_params:,} ({a.n_params / 1e9:.2f} B)" if a.n_params > 1e9 else f"{a.n_params:,} ({a.n_params / 1e6:.1f} M)",
            "layers": a.n_layers, "dim": a.dim, "heads": f"{a.n_heads} (kv {a.kv_heads})", "ffn_hidden": a.ffn_hidden,
            "context_length": a.max_seq_len, "rope_theta": a.rope_theta, "norm_eps": a.norm_eps,
            "tied_embeddings": a.tie_embeddings, "tensor_types": ", ".join(f"{k} x{v}" for k, v in sorted(types.items())),
        })
        slow = not_native(ckpt.tensors)
        out["native_kernels"] = "every matrix" if not slow else f"not for {len(slow)}: " + ", ".join(slow)
    if tok is not None:
        out["tokenizer"] = f"{tok.kind} (vocab {tok.vocab_size}, bos {tok.bos_id}, eos {tok.eos_id})"
    out["license"] = identify(ckpt) or "unknown"
    out["chat_template"] = ckpt.chat_template or "(none: Llama 2 [INST] format)" if tok is not None and tok.kind == "sentencepiece" and not ckpt.chat_template else (ckpt.chat_template or "(none)")
    return out
