"""Model hyperparameters: one frozen dataclass, exact-name presets, and readers of each format's config.

Hyperparameters always come from the checkpoint's own config (``params.json``, ``config.json`` or
GGUF keys). Presets exist for building new models and for tests; nothing is inferred from a path.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

# the float types weights can be loaded or written in, by the names the CLI and configs use
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a DTYPES name; ValueError naming the choices otherwise."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = None  # explicit FFN width (HF/GGUF give it); else the reference rule
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    # derived, computed once in __post_init__
    head_dim: int = field(init=False)
    kv_heads: int = field(init=False)
    ffn_hidden: int = field(init=False)

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {kv}")
        object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        object.__setattr__(self, "kv_heads", kv)
        object.__setattr__(self, "ffn_hidden", self.hidden_dim or ffn_hidden_size(self.dim, self.multiple_of, self.ffn_dim_multiplier))

    def replace(self, **changes: Any) -> "ModelArgs":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The init fields (what a params.json-like file needs), not the derived ones."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @property
    def n_params(self) -> int:
        d, h, kv = self.dim, self.ffn_hidden, self.kv_heads * self.head_dim
        per_layer = d * d * 2 + d * kv * 2 + 3 * d * h + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + emb + d


def ffn_hidden_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The reference rule of Meta's llama/model.py FeedForward."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


PRESETS: dict[str, ModelArgs] = {
    "llama2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256),
    "llama2-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, multiple_of=256),
    "llama2-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000,
                            multiple_of=4096, ffn_dim_multiplier=1.3),
    # tiny presets for tests and from-scratch experiments
    "tiny": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=128),
    "tiny-mha": ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=256, multiple_of=32, max_seq_len=128),
    "tiny-tied": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                           max_seq_len=128, tie_embeddings=True),
    "shakespeare-15m": ModelArgs(dim=288, n_layers=6, n_heads=6, vocab_size=4096, multiple_of=32, max_seq_len=256),
}


def preset(name: str) -> ModelArgs:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def from_params_json(params: Mapping[str, Any], vocab_size: int | None = None) -> ModelArgs:
    """Meta's params.json. Llama 2 files carry vocab_size -1: the tokenizer decides it."""
    vs = int(params.get("vocab_size", -1))
    if vs <= 0:
        if vocab_size is None:
            raise ValueError("params.json has no vocab_size and no tokenizer/embedding gave one")
        vs = vocab_size
    return ModelArgs(
        dim=int(params["dim"]), n_layers=int(params["n_layers"]), n_heads=int(params["n_heads"]),
        n_kv_heads=params.get("n_kv_heads"), vocab_size=vs, multiple_of=int(params.get("multiple_of", 256)),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier"), norm_eps=float(params.get("norm_eps", 1e-5)),
        rope_theta=float(params.get("rope_theta", 10000.0)), max_seq_len=int(params.get("max_seq_len", 4096)),
        hidden_dim=params.get("hidden_dim"), tie_embeddings=bool(params.get("tie_embeddings", False)),
    )


def to_params_json(args: ModelArgs) -> dict[str, Any]:
    out = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.kv_heads,
           "vocab_size": args.vocab_size, "multiple_of": args.multiple_of, "ffn_dim_multiplier": args.ffn_dim_multiplier,
           "norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "max_seq_len": args.max_seq_len}
    if args.ffn_hidden != ffn_hidden_size(args.dim, args.multiple_of, args.ffn_dim_multiplier):
        out["hidden_dim"] = args.ffn_hidden
    if args.tie_embeddings:
        out["tie_embeddings"] = True
    return out


def from_hf_config(cfg: Mapping[str, Any]) -> ModelArgs:
    """transformers' LlamaConfig (config.json)."""
    if cfg.get("model_type", "llama") not in ("llama", "mistral"):
        raise ValueError(f"config.json model_type {cfg.get('model_type')!r} is not a Llama architecture")
    scaling = cfg.get("rope_scaling") or {}
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise ValueError(f"rope_scaling {scaling} is not supported")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError("Llama checkpoints with attention/MLP biases are not supported")
    theta = cfg.get("rope_theta")
    if theta is None:  # newer transformers nest it under rope_parameters
        theta = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return ModelArgs(
        dim=int(cfg["hidden_size"]), n_layers=int(cfg["num_hidden_layers"]), n_heads=int(cfg["num_attention_heads"]),
        n_kv_heads=cfg.get("num_key_value_heads"), vocab_size=int(cfg["vocab_size"]),
        hidden_dim=int(cfg["intermediate_size"]), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta), max_seq_len=int(cfg.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def to_hf_config(args: ModelArgs, bos_id: int | None = None, eos_id: int | None = None) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "torch_dtype": "float32", "bos_token_id": bos_id, "eos_token_id": eos_id,
        "head_dim": args.head_dim,
    }


def from_gguf_kv(kv: Mapping[str, Any], vocab_size: int | None = None, has_output: bool = True) -> ModelArgs:
    """GGUF metadata keys of architecture ``llama``."""
    arch = kv.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    p = "llama."
    n_heads = int(kv[p + "attention.head_count"])
    dim = int(kv[p + "embedding_length"])
    rope_dim = kv.get(p + "rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != dim // n_heads:
        raise ValueError(f"partial RoPE (rope.dimension_count={rope_dim}) is not supported")
    vs = kv.get(p + "vocab_size") or vocab_size
    if vs is None:
        raise ValueError("GGUF has neither llama.vocab_size nor a token list")
    return ModelArgs(
        dim=dim, n_layers=int(kv[p + "block_count"]), n_heads=n_heads,
        n_kv_heads=int(kv.get(p + "attention.head_count_kv", n_heads)), vocab_size=int(vs),
        hidden_dim=int(kv[p + "feed_forward_length"]),
        norm_eps=float(kv.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(kv.get(p + "rope.freq_base", 10000.0)),
        max_seq_len=int(kv.get(p + "context_length", 4096)), tie_embeddings=not has_output,
    )


def load_json(path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
