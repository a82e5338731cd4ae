"""Llama 2, top-down as in Meta's reference llama/model.py.

RMSNorm -> RoPE -> Attention (grouped-query) -> FeedForward (SwiGLU) -> Block -> Transformer.
Parameter names are Meta's, so a consolidated.*.pth state dict loads as is.
Shapes: B batch, T new tokens, L attended keys, D model dim, H heads, K kv heads, Hd head dim, V vocab.
Quantization, LoRA and tensor parallelism replace modules from outside; nothing here knows of them.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .cache import KVCache
from .config import ModelArgs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)   # x * rsqrt(mean(x^2) + eps) * weight, in float32


def rope_table(head_dim: int, max_seq: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [max_seq, Hd/2] for the reference's interleaved-pair rotation."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64)[: head_dim // 2] / head_dim))
    angles = torch.outer(torch.arange(max_seq, dtype=torch.float64), freqs)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, Hd] with pairs (x[2i], x[2i+1]) rotated by angle pos*freq_i; cos, sin [B, T, Hd/2].

    The pair is the complex number x[2i] + i x[2i+1]; the rotation multiplies it by cos + i sin.
    """
    return ops.rope(x, cos, sin)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, rot, mask, cache: KVCache | None, pos, slots):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)   # [B, T, H, Hd]
        k = self.wk(x).view(B, T, self.n_kv, self.head_dim)      # [B, T, K, Hd]
        v = self.wv(x).view(B, T, self.n_kv, self.head_dim)
        q, k = apply_rope(q, *rot), apply_rope(k, *rot)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H|K, T, Hd]
        if cache is not None:
            k, v, rows = cache.update(self.layer_id, k, v, pos, slots, cache.kv_len)  # [B|S, K, L, Hd]
            # mask None: every cached key of the row is visible (one row decoding, or a prefill from 0)
            out = ops.attention(q, k, v, mask, causal=mask is None and T > 1, rows=rows)
        else:  # training / full-sequence scoring: plain causal attention
            out = ops.attention(q, k, v, causal=T > 1)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))   # [B, T, D]


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, rot, mask, cache, pos, slots):
        h = x + self.attention(self.attention_norm(x), rot, mask, cache, pos, slots)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_table(args.head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.gradient_checkpointing = False

    def hidden(self, tokens: torch.Tensor, pos: torch.Tensor | None = None, cache: KVCache | None = None,
               slots: torch.Tensor | None = None, norm: bool = True) -> torch.Tensor:
        """Final normed hidden states [B, T, D] (the residual stream before the final norm: norm=False).

        tokens [B, T]; pos [B, T] absolute positions (default 0..T-1); with a cache, the new keys are
        written at (slot, pos) and each query attends to the keys of its row at positions <= its own.
        """
        B, T = tokens.shape
        if pos is None:
            pos = torch.arange(T, device=tokens.device).expand(B, T)
        if pos.shape != tokens.shape:
            pos = pos.expand(B, T)
        rot = (self.rope_cos[pos], self.rope_sin[pos])     # cos, sin [B, T, Hd/2]
        mask = None
        if cache is not None:
            # one host sync per forward: the cache plans its writes and says whether rows need a mask
            if cache.prepare(pos, slots):
                keys = torch.arange(cache.kv_len, device=tokens.device)
                mask = (keys.view(1, 1, 1, -1) <= pos.view(B, 1, T, 1))  # [B, 1, T, L]
        h = self.tok_embeddings(tokens)                     # [B, T, D]
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, rot, mask, cache, pos, slots, use_reentrant=False)
            else:
                h = layer(h, rot, mask, cache, pos, slots)
        return self.norm(h) if norm else h

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor | None = None, cache: KVCache | None = None,
                slots: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V] (or [B, 1, V] with last_only, which skips the vocab projection elsewhere)."""
        h = self.hidden(tokens, pos, cache, slots)
        if last_only:
            h = h[:, -1:]
        return self.output(h).float()

    @property
    def cache_dtype(self) -> torch.dtype:
        """The generation caches' type: the chosen one (kv_dtype: Llama.load's kv_type), else the
        loader's default (kv_default: float16 for GGUF blocks), else the weights' dtype."""
        return getattr(self, "kv_dtype", None) or getattr(self, "kv_default", None) or self.norm.weight.dtype

    def new_cache(self, batch: int = 1, max_seq: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """A KV cache of `dtype`, else of `cache_dtype`."""
        a = self.args
        return KVCache(a.n_layers, batch, a.kv_heads, max_seq or a.max_seq_len, a.head_dim,
                       dtype=dtype or self.cache_dtype, device=self.rope_cos.device)

    def exact_cache(self, batch: int = 1, max_seq: int | None = None) -> KVCache:
        """A cache for scoring (evaluation): the weights' dtype unless a kv_type was chosen, so that
        benchmark scores are those of the model, not of a rounded cache."""
        return self.new_cache(batch, max_seq, getattr(self, "kv_dtype", None) or self.norm.weight.dtype)

    def init_weights(self, seed: int | None = None) -> "Transformer":
        """Fresh weights for pretraining: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layers)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                std = 0.02 / math.sqrt(2 * self.args.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

    def load_tensors(self, tensors: dict[str, torch.Tensor], strict: bool = True) -> "Transformer":
        """Load Meta-named tensors; with tied embeddings output.weight may be absent."""
        tensors = dict(tensors)
        if self.args.tie_embeddings:
            tensors.pop("output.weight", None)
        expected = set(self.state_dict())
        if self.args.tie_embeddings:
            expected.discard("output.weight")
        missing, unexpected = expected - set(tensors), set(tensors) - expected
        if strict and (missing or unexpected):
            raise ValueError(f"checkpoint does not match the model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        for name, t in tensors.items():
            if name not in expected:
                continue
            p = self.get_parameter(name)
            if tuple(p.shape) != tuple(t.shape):
                raise ValueError(f"tensor {name}: shape {tuple(t.shape)} does not match the config's {tuple(p.shape)}")
        self.load_state_dict(tensors, strict=False, assign=True)
        if self.args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        return self

    @classmethod
    def empty(cls, args: ModelArgs, device: str | torch.device = "cpu") -> "Transformer":
        """A model with uninitialised parameters, to be filled by load_tensors (no wasted random init)."""
        with _skip_init():
            m = cls(args)
        return m.to(device)


@contextlib.contextmanager
def _skip_init():
    """Make nn.init a no-op while modules are built: torch.empty pages are not touched until loaded over."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "trunc_normal_", "xavier_uniform_",
             "xavier_normal_", "zeros_", "ones_", "constant_")
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda t, *a, **k: t)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)
