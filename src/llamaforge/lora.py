"""LoRA: low-rank adapters wrapped around chosen projections of an unchanged Transformer.

``apply_lora`` replaces each target module (an ``nn.Linear`` or any packed quantized linear that
exposes ``in_features``/``out_features``) with a ``LoraLinear`` holding the frozen base module and two
trainable factors: y = base(x) + (alpha / r) * B(A(dropout(x))).

Adapters are saved in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors`` with
PEFT's key names for transformers' ``LlamaForCausalLM``), so ``peft.PeftModel.from_pretrained`` loads
them. HF stores q/k rows permuted for its rotate-half RoPE (see formats/hf.py); LoRA's B factor of
wq/wk produces rows of the q/k projection, so its rows are permuted on save and un-permuted on load.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .fileio import atomic_write, load_torch_file
from .formats.hf import permute_hf, unpermute_hf
from .native import kernels
from .quant.linear import dequantized_weight

log = logging.getLogger(__name__)

# short target name -> (Meta module path inside a block, HF module path inside a decoder layer)
TARGETS: dict[str, tuple[str, str]] = {
    "q": ("attention.wq", "self_attn.q_proj"), "k": ("attention.wk", "self_attn.k_proj"),
    "v": ("attention.wv", "self_attn.v_proj"), "o": ("attention.wo", "self_attn.o_proj"),
    "gate": ("feed_forward.w1", "mlp.gate_proj"), "up": ("feed_forward.w3", "mlp.up_proj"),
    "down": ("feed_forward.w2", "mlp.down_proj"),
}
_HF_TO_SHORT = {hf.rsplit(".", 1)[1]: short for short, (_, hf) in TARGETS.items()}
_META_TO_SHORT = {meta: short for short, (meta, _) in TARGETS.items()}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoraConfig:
    """Rank, scale, dropout and which projections get adapters (q, k, v, o, gate, up, down)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    extra: dict[str, Any] = field(default_factory=dict)  # kept from a loaded adapter_config.json

    def __post_init__(self) -> None:
        self.targets = tuple(normalize_targets(self.targets))
        if self.r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def normalize_targets(targets: Iterable[str] | str) -> list[str]:
    """Accept short names (q, gate), HF names (q_proj) or Meta names (wq); 'all' means every projection."""
    if isinstance(targets, str):
        targets = [t for t in re.split(r"[,\s]+", targets) if t]
    out: list[str] = []
    for t in targets:
        if t == "all":
            out.extend(TARGETS)
            continue
        short = t if t in TARGETS else _HF_TO_SHORT.get(t) or {"wq": "q", "wk": "k", "wv": "v", "wo": "o", "w1": "gate",
                                                             "w3": "up", "w2": "down"}.get(t)
        if short is None:
            raise ValueError(f"unknown LoRA target {t!r}; use q, k, v, o, gate, up, down (or all)")
        out.append(short)
    if not out:
        raise ValueError("no LoRA target modules given")
    return list(dict.fromkeys(out))


def rowwise_ok(x: torch.Tensor, training: bool) -> bool:
    """Whether an adapter update of x takes add_lora_rows' row-by-row form (inference on float32 CPU rows)."""
    return (not training and x.dtype == torch.float32 and x.device.type == "cpu"
            and (torch.is_inference_mode_enabled() or not torch.is_grad_enabled()))


def add_lora_rows(y: torch.Tensor, x: torch.Tensor, a: list[torch.Tensor], bt: list[torch.Tensor], rows: torch.Tensor,
                  scaling: torch.Tensor) -> torch.Tensor:
    """y (base(x)) plus each row's adapter update, scaling[i] * (x A_i^T) B_i with i = rows[m] (< 0:
    none); bt[i] is B_i transposed [r, out]. Every row is computed alone in a fixed order (the native
    lora_add_, else one small matmul per row), so its result does not depend on the other rows of
    the batch. Updates y in place when it is contiguous float32 (inference only)."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    y2 = y.reshape(-1, y.shape[-1])
    if y2.dtype != torch.float32 or not y2.is_contiguous():
        y2 = y2.float().contiguous()
    k = kernels()
    if k is not None:
        k.lora_add_(y2, x2, [t.float() for t in a], [t.float() for t in bt], rows, scaling)
    else:
        for m, i in enumerate(rows.tolist()):
            if i >= 0 and a[i].shape[0]:
                y2[m] += scaling[i] * (x2[m:m + 1] @ a[i].float().t() @ bt[i].float())[0]
    return y2.view(*y.shape[:-1], -1)


class LoraLinear(nn.Module):
    """A frozen base projection plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not hasattr(base, "in_features") or not hasattr(base, "out_features"):
            raise TypeError(f"cannot wrap {type(base).__name__}: it has no in_features/out_features")
        self.base = base
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        self.r, self.scaling = r, alpha / r
        ref = next((p for p in base.parameters()), None)
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        device = ref.device if ref is not None else None
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        # PEFT's default init: A Kaiming-uniform, B zero, so training starts from the base model exactly
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True  # False: the base module alone (DPO's reference model; see adapters_disabled)
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        if rowwise_ok(x, self.training):
            # inference: the row-by-row form multi-adapter serving uses too, so a request gives the
            # same tokens whether its adapter is the model's only one or one of many in a batch
            rows = torch.zeros(x.numel() // self.in_features, dtype=torch.long)
            return add_lora_rows(self.base(x), x, [self.lora_A], [self.lora_B.t()], rows,
                                 torch.tensor([self.scaling], dtype=torch.float32))
        # x @ A^T first: the [.., r] intermediate keeps the update cheap
        update = self.dropout(x) @ self.lora_A.to(x.dtype).t() @ self.lora_B.to(x.dtype).t()
        return self.base(x) + update * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The dense update scaling * B @ A, shape [out, in]."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}"


class _DequantizedGrad(torch.autograd.Function):
    """y = module(x) with the packed kernel; dL/dx = dL/dy @ W with W dequantized on the fly.

    The packed int8/int4 kernels have no derivative; QLoRA needs gradients to flow through the frozen
    quantized weights to the adapters below them (never into the weights themselves).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        ctx.module = module
        return module(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ dequantized_weight(ctx.module).to(grad.dtype), None


class FrozenQuantized(nn.Module):
    """A packed quantized linear that passes gradients to its input (QLoRA's frozen base)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.in_features, self.out_features = int(inner.in_features), int(inner.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _DequantizedGrad.apply(x, self.inner)
        return self.inner(x)

    def dequantize(self) -> torch.Tensor:
        return dequantized_weight(self.inner)


def _is_packed_linear(m: nn.Module) -> bool:
    """Linear-like modules other than nn.Linear: the packed int8/int4 modules of llamaforge.quant."""
    return (not isinstance(m, (nn.Linear, LoraLinear, FrozenQuantized)) and hasattr(m, "in_features")
            and hasattr(m, "out_features") and any(True for _ in m.buffers()))


def _target_paths(model: nn.Module, targets: Iterable[str]) -> list[str]:
    wanted = {TARGETS[t][0] for t in targets}
    return [name for name, _ in model.named_modules()
            if re.fullmatch(r"layers\.\d+\.(.+)", name) and name.split(".", 2)[2] in wanted]


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Wrap the target projections of a Transformer in place and freeze every base parameter."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in list(model.named_modules()):
        if name and _is_packed_linear(m):  # QLoRA: every packed linear must pass gradients through
            parent_path, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, attr, FrozenQuantized(m))
    paths = _target_paths(model, config.targets)
    if not paths:
        raise ValueError("the model has no LoRA target modules (is it a llamaforge Transformer?)")
    for path in paths:
        parent_path, attr = path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        base = getattr(parent, attr)
        if isinstance(base, LoraLinear):
            raise ValueError(f"{path} already has a LoRA adapter")
        # in the mode of the module it wraps: a model in eval mode stays there (dropout off)
        setattr(parent, attr, LoraLinear(base, config.r, config.alpha, config.dropout).train(base.training))
    model.lora_config = config  # type: ignore[attr-defined]
    log.info("LoRA r=%d alpha=%g on %d modules: %d trainable parameters", config.r, config.alpha, len(paths),
             sum(p.numel() for p in model.parameters() if p.requires_grad))
    return model


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run ``model`` as its base (every LoRA update off) inside the block, e.g. as DPO's reference."""
    mods = list(lora_modules(model).values())
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter factors under llamaforge names: ``layers.0.attention.wq.lora_A`` ..."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"] = m.lora_A.detach()
        out[f"{name}.lora_B"] = m.lora_B.detach()
    return out


# ---------------------------------------------------------------- PEFT format

def _heads_for(meta_module: str, args) -> int | None:
    if meta_module == "attention.wq":
        return args.n_heads
    if meta_module == "attention.wk":
        return args.kv_heads
    return None


def _peft_key(layer: int, meta_module: str, factor: str) -> str:
    hf = TARGETS[_META_TO_SHORT[meta_module]][1]
    return f"base_model.model.model.layers.{layer}.{hf}.{factor}.weight"


def to_peft_tensors(state: dict[str, torch.Tensor], args) -> dict[str, torch.Tensor]:
    """PEFT-named adapter tensors from llamaforge LoRA tensors (``layers.N.<module>.lora_A/B``).

    B rows of q/k are permuted into HF's RoPE row order; other keys of ``state`` are ignored.
    """
    out = {}
    for key, t in state.items():
        m = re.fullmatch(r"layers\.(\d+)\.(\w+\.\w+)\.(lora_[AB])", key)
        if m is None:
            continue
        layer, module, factor = int(m.group(1)), m.group(2), m.group(3)
        t = t.detach().float().cpu()
        heads = _heads_for(module, args)
        if factor == "lora_B" and heads is not None:
            t = permute_hf(t, heads)
        out[_peft_key(layer, module, factor)] = t.contiguous()
    return out


def peft_config(config: LoraConfig, base_model: str | None = None) -> dict[str, Any]:
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.r, "lora_alpha": config.alpha,
        "lora_dropout": config.dropout, "target_modules": [TARGETS[t][1].rsplit(".", 1)[1] for t in config.targets],
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "use_rslora": False, "use_dora": False, "base_model_name_or_path": base_model,
        "revision": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    return {**config.extra, **cfg}


def save_adapter(model: nn.Module, directory: str | Path, *, base_model: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT format) into ``directory``.

    Both files are written to temporary names first and moved into place, so a crash never leaves a
    half-written adapter.
    """
    config = getattr(model, "lora_config", None)
    if config is None or not lora_modules(model):
        raise ValueError("the model has no LoRA adapters to save")
    return save_adapter_tensors(lora_state_dict(model), model.args, config, directory, base_model=base_model)


def save_adapter_tensors(state: dict[str, torch.Tensor], args, config: LoraConfig, directory: str | Path, *,
                         base_model: str | None = None) -> Path:
    """save_adapter from a state dict (what a distributed trainer gathers) rather than a live model."""
    tensors = to_peft_tensors(state, args)
    if not tensors:
        raise ValueError("no LoRA tensors to save")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write(d / ADAPTER_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    text = json.dumps(peft_config(config, base_model), indent=2)
    atomic_write(d / ADAPTER_CONFIG, lambda p: p.write_text(text, encoding="utf-8"))
    return d


def read_adapter(directory: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Config and PEFT-named tensors of an adapter folder, with clear errors for anything else."""
    d = Path(directory)
    cfg_file, w_file = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{d}: no {ADAPTER_CONFIG} (not a PEFT LoRA adapter folder)")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{cfg_file}: invalid JSON: {e}") from e
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    for flag in ("use_dora", "use_rslora"):
        if cfg.get(flag):
            raise ValueError(f"{cfg_file}: {flag} adapters are not supported")
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        raise ValueError(f"{cfg_file}: adapters with trained biases or modules_to_save are not supported")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ValueError(f"{cfg_file}: per-module rank_pattern/alpha_pattern is not supported")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        raise ValueError(f"{cfg_file}: regex target_modules {targets!r} is not supported; list module names")
    config = LoraConfig(r=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", cfg["r"])),
                        dropout=float(cfg.get("lora_dropout", 0.0)), targets=tuple(targets),
                        extra={k: v for k, v in cfg.items() if k in ("base_model_name_or_path",)})
    if w_file.is_file():
        tensors = load_file(str(w_file))
    elif (d / "adapter_model.bin").is_file():
        tensors = load_torch_file(d / "adapter_model.bin", "adapter weights")
    else:
        raise FileNotFoundError(f"{d}: no {ADAPTER_WEIGHTS} (or adapter_model.bin)")
    return config, tensors


_PEFT_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(\w+)\.(\w+)\.(lora_[AB])(?:\.default)?\.weight")


def adapter_factors(model: nn.Module, directory: str | Path
                    ) -> tuple[LoraConfig, dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]]:
    """An adapter folder's config and its factors per (layer, module path): float32 A [r, in] and B
    [out, r] in llamaforge's row order, each checked against the model's shapes."""
    config, tensors = read_adapter(directory)
    args = model.args
    factors: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _PEFT_KEY.fullmatch(key)
        if m is None:
            raise ValueError(f"{directory}: unexpected adapter tensor {key!r} (not a LoRA adapter of a Llama model)")
        layer, short = int(m.group(1)), _HF_TO_SHORT.get(m.group(3))
        if short is None or f"{m.group(2)}.{m.group(3)}" != TARGETS[short][1]:
            raise ValueError(f"{directory}: adapter tensor {key!r} targets an unknown module")
        if layer >= args.n_layers:
            raise ValueError(f"{directory}: adapter has layer {layer} but the model has {args.n_layers} layers")
        factors.setdefault((layer, TARGETS[short][0]), {})[m.group(4)] = t
    present = sorted({_META_TO_SHORT[mod] for _, mod in factors}, key=list(TARGETS).index)
    config.targets = tuple(present or config.targets)
    out = {}
    for (layer, mod), pair in factors.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{directory}: layer {layer} {mod}: needs both lora_A and lora_B")
        base = model.get_submodule(f"layers.{layer}.{mod}")
        base = getattr(base, "base", base)
        a, b = pair["lora_A"].float(), pair["lora_B"].float()
        if tuple(a.shape) != (config.r, base.in_features) or tuple(b.shape) != (base.out_features, config.r):
            raise ValueError(f"{directory}: layer {layer} {mod}: adapter shapes {tuple(a.shape)}, {tuple(b.shape)} do "
                             f"not fit the model ({base.out_features}x{base.in_features}, r={config.r})")
        heads = _heads_for(mod, args)
        out[(layer, mod)] = (a, unpermute_hf(b, heads) if heads is not None else b)
    return config, out


def load_adapter(model: nn.Module, directory: str | Path, *, merge: bool = True) -> nn.Module:
    """Apply a PEFT-format LoRA adapter to a llamaforge Transformer.

    merge=True folds the update into float base weights (no extra cost at inference); over a packed
    quantized base, or with merge=False, the LoraLinear modules stay (merge=False: to continue training).
    """
    config, factors = adapter_factors(model, directory)
    apply_lora(model, config)
    mods = lora_modules(model)
    for (layer, mod), (a, b) in factors.items():
        lm = mods[f"layers.{layer}.{mod}"]
        with torch.no_grad():
            lm.lora_A.copy_(a)
            lm.lora_B.copy_(b)
    missing = set(mods) - {f"layers.{layer}.{mod}" for layer, mod in factors}
    if missing:
        log.warning("%s: no adapter weights for %d wrapped modules (left at zero update)", directory, len(missing))
    log.info("loaded LoRA adapter %s (r=%d, targets %s)", directory, config.r, ",".join(config.targets))
    if merge and all(isinstance(m.base, nn.Linear) for m in mods.values()):
        return merge_lora(model)
    if merge:  # packed quantized bases cannot absorb the update: keep it as a side branch
        log.info("%s: base weights are quantized; the adapter stays unmerged", directory)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoraLinear into its base nn.Linear weight and put the plain module back."""
    for name, m in lora_modules(model).items():
        if not isinstance(m.base, nn.Linear):
            raise ValueError(f"{name}: cannot merge LoRA into a quantized {type(m.base).__name__}; "
                             "load the base model in float to merge")
        with torch.no_grad():
            w = m.base.weight
            w.copy_((w.float() + m.delta_weight().to(w.device)).to(w.dtype))
        parent_path, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_path), attr, m.base)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def copy_adapter(src: str | Path, dst: str | Path) -> None:
    """Copy an adapter folder's two files (used when exporting a checkpoint's adapter)."""
    d = Path(dst)
    d.mkdir(parents=True, exist_ok=True)
    for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        atomic_write(d / f, lambda p, f=f: shutil.copyfile(Path(src) / f, p))


__all__ = ["LoraConfig", "LoraLinear", "FrozenQuantized", "apply_lora", "lora_modules", "lora_state_dict", "save_adapter",
           "adapters_disabled",
           "save_adapter_tensors",
           "read_adapter", "adapter_factors", "load_adapter", "add_lora_rows", "merge_lora", "to_peft_tensors", "peft_config"]
