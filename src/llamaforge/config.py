"""Model hyperparameters: one frozen dataclass, exact-name presets, and readers of each format's config.

Hyperparameters always come from the checkpoint's own config (``params.json``, ``config.json`` or
GGUF keys). Presets exist for building new models and for tests; nothing is inferred from a path.
"""
from __future__ import annotations

import dataclasses
import json
import math
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


# Sane bounds checked before anything is allocated: a config beyond them is a corrupt or hostile file,
# not a model (the largest Llama-family models are far inside: 405B has 126 layers, dim 16384).
LIMITS: dict[str, tuple[int, int]] = {
    "dim": (1, 1 << 17), "n_layers": (1, 1024), "n_heads": (1, 1024), "n_kv_heads": (1, 1024),
    "vocab_size": (1, 1 << 22), "multiple_of": (1, 1 << 20), "hidden_dim": (1, 1 << 20),
    "max_seq_len": (1, 1 << 20), "head_dim": (2, 4096),
}
MAX_PARAMS = 10**13   # ten trillion: any config promising more is not a checkpoint this machine could hold


class HyperparameterError(ValueError):
    """A hyperparameter outside its type or bounds; ``field`` names the ModelArgs field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field} {reason}")
        self.field, self.reason = field, reason


def _check_int(name: str, value: Any, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise HyperparameterError(name, f"must be an integer, got {value!r}"[:200])
    lo, hi = LIMITS[name]
    if not lo <= value <= hi:
        raise HyperparameterError(name, f"= {value} is outside the sane range [{lo}, {hi}]")


def _check_float(name: str, value: Any, lo: float, hi: float, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HyperparameterError(name, f"must be a finite number, got {value!r}"[:200])
    if not lo < value <= hi:
        raise HyperparameterError(name, f"= {value} is outside the range ({lo}, {hi}]")


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
        # every reader (params.json, config.json, GGUF keys, presets, model cards) ends here, so the
        # bounds hold before expected_shapes or the model allocates per-layer anything
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            _check_int(name, getattr(self, name))
        _check_int("n_kv_heads", self.n_kv_heads, optional=True)
        _check_int("hidden_dim", self.hidden_dim, optional=True)
        _check_float("ffn_dim_multiplier", self.ffn_dim_multiplier, 0.0, 64.0, optional=True)
        _check_float("norm_eps", self.norm_eps, 0.0, 1.0)
        _check_float("rope_theta", self.rope_theta, 0.0, 1e12)
        if not isinstance(self.tie_embeddings, bool):
            raise HyperparameterError("tie_embeddings", f"must be true or false, got {self.tie_embeddings!r}"[:200])
        if self.dim % self.n_heads:
            raise HyperparameterError("dim", f"{self.dim} is not divisible by n_heads {self.n_heads}")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise HyperparameterError("n_kv_heads", f"{kv} does not divide n_heads {self.n_heads}")
        head_dim = self.dim // self.n_heads
        _check_int("head_dim", head_dim)
        if head_dim % 2:
            raise HyperparameterError("head_dim", f"{head_dim} (dim / n_heads) is odd; RoPE rotates pairs")
        ffn = self.hidden_dim or ffn_hidden_size(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        _check_int("hidden_dim", ffn)
        object.__setattr__(self, "head_dim", head_dim)
        object.__setattr__(self, "kv_heads", kv)
        object.__setattr__(self, "ffn_hidden", ffn)
        if self.n_params > MAX_PARAMS:
            raise HyperparameterError("n_layers", f"x dim x hidden_dim give {self.n_params:.3g} parameters, "
                                      f"beyond the sane limit {MAX_PARAMS:.0e}")

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


def _integral(value: Any) -> Any:
    """JSON writes 1e9 or 32.0 for integers at times: integral floats become ints, the rest is left for
    ModelArgs to refuse with its own message."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


def _build(source: str, keys: Mapping[str, str], values: Mapping[str, Any]) -> ModelArgs:
    """ModelArgs from reader values; a bad value is reported under the file's own key name."""
    try:
        return ModelArgs(**{k: _integral(v) for k, v in values.items()})
    except HyperparameterError as e:
        key = keys.get(e.field)
        raise ValueError(f"{source} {key or e.field} {e.reason}") from None


def _require(cfg: Mapping[str, Any], source: str, key: str) -> Any:
    if key not in cfg:
        raise ValueError(f"{source} has no {key!r}")
    return cfg[key]


def _mapping(cfg: Any, source: str) -> Mapping[str, Any]:
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{source} must be a JSON object, got {type(cfg).__name__}")
    return cfg


def from_params_json(params: Mapping[str, Any], vocab_size: int | None = None) -> ModelArgs:
    """Meta's params.json. Llama 2 files carry vocab_size -1: the tokenizer decides it."""
    src = "params.json"
    params = _mapping(params, src)
    vs = _integral(params.get("vocab_size", -1))
    if isinstance(vs, int) and not isinstance(vs, bool) and vs <= 0:
        if vocab_size is None:
            raise ValueError("params.json has no vocab_size and no tokenizer/embedding gave one")
        vs = vocab_size
    keys = {f: f for f in LIMITS}
    return _build(src, keys, dict(
        dim=_require(params, src, "dim"), n_layers=_require(params, src, "n_layers"),
        n_heads=_require(params, src, "n_heads"), n_kv_heads=params.get("n_kv_heads"), vocab_size=vs,
        multiple_of=params.get("multiple_of", 256), ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
        norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 10000.0),
        max_seq_len=params.get("max_seq_len", 4096), hidden_dim=params.get("hidden_dim"),
        tie_embeddings=params.get("tie_embeddings") or False))


def to_params_json(args: ModelArgs) -> dict[str, Any]:
    out = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.kv_heads,
           "vocab_size": args.vocab_size, "multiple_of": args.multiple_of, "ffn_dim_multiplier": args.ffn_dim_multiplier,
           "norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "max_seq_len": args.max_seq_len}
    if args.ffn_hidden != ffn_hidden_size(args.dim, args.multiple_of, args.ffn_dim_multiplier):
        out["hidden_dim"] = args.ffn_hidden
    if args.tie_embeddings:
        out["tie_embeddings"] = True
    return out


_HF_KEYS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
            "n_kv_heads": "num_key_value_heads", "vocab_size": "vocab_size", "hidden_dim": "intermediate_size",
            "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta", "max_seq_len": "max_position_embeddings",
            "tie_embeddings": "tie_word_embeddings", "head_dim": "head_dim"}


def from_hf_config(cfg: Mapping[str, Any]) -> ModelArgs:
    """transformers' LlamaConfig (config.json)."""
    src = "config.json"
    cfg = _mapping(cfg, src)
    if cfg.get("model_type", "llama") not in ("llama", "mistral"):
        raise ValueError(f"config.json model_type {cfg.get('model_type')!r} is not a Llama architecture")
    scaling = cfg.get("rope_scaling") or {}
    if not isinstance(scaling, Mapping):
        raise ValueError(f"config.json rope_scaling must be an object, got {type(scaling).__name__}")
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise ValueError(f"rope_scaling {scaling} is not supported"[:300])
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError("Llama checkpoints with attention/MLP biases are not supported")
    theta = cfg.get("rope_theta")
    if theta is None:  # newer transformers nest it under rope_parameters
        nested = cfg.get("rope_parameters") or {}
        theta = nested.get("rope_theta", 10000.0) if isinstance(nested, Mapping) else nested
    g = {k: _require(cfg, src, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                              "vocab_size", "intermediate_size")}
    args = _build(src, _HF_KEYS, dict(
        dim=g["hidden_size"], n_layers=g["num_hidden_layers"], n_heads=g["num_attention_heads"],
        n_kv_heads=cfg.get("num_key_value_heads"), vocab_size=g["vocab_size"], hidden_dim=g["intermediate_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=theta,
        max_seq_len=cfg.get("max_position_embeddings", 4096), tie_embeddings=cfg.get("tie_word_embeddings") or False))
    head_dim = cfg.get("head_dim")
    if head_dim is not None and _integral(head_dim) != args.head_dim:
        raise ValueError(f"config.json head_dim {head_dim!r} differs from hidden_size / num_attention_heads "
                         f"= {args.head_dim} (not supported)"[:300])
    return args


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
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')"[:300])
    src, p = "GGUF", "llama."
    keys = {"dim": p + "embedding_length", "n_layers": p + "block_count", "n_heads": p + "attention.head_count",
            "n_kv_heads": p + "attention.head_count_kv", "vocab_size": p + "vocab_size",
            "hidden_dim": p + "feed_forward_length", "norm_eps": p + "attention.layer_norm_rms_epsilon",
            "rope_theta": p + "rope.freq_base", "max_seq_len": p + "context_length"}
    vs = kv.get(p + "vocab_size") or vocab_size
    if vs is None:
        raise ValueError("GGUF has neither llama.vocab_size nor a token list")
    n_heads = _require(kv, src, keys["n_heads"])
    args = _build(src, keys, dict(
        dim=_require(kv, src, keys["dim"]), n_layers=_require(kv, src, keys["n_layers"]), n_heads=n_heads,
        n_kv_heads=kv.get(keys["n_kv_heads"], n_heads), vocab_size=vs,
        hidden_dim=_require(kv, src, keys["hidden_dim"]), norm_eps=kv.get(keys["norm_eps"], 1e-5),
        rope_theta=kv.get(keys["rope_theta"], 10000.0), max_seq_len=kv.get(keys["max_seq_len"], 4096),
        tie_embeddings=not has_output))
    rope_dim = kv.get(p + "rope.dimension_count")
    if rope_dim is not None and rope_dim != args.head_dim:
        raise ValueError(f"partial RoPE (rope.dimension_count={rope_dim!r}) is not supported"[:300])
    return args


def load_json(path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
