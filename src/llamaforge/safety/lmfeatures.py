"""Prompt features for the default guard from the bundled chat model's hidden states.

The text is put in a ChatML user turn followed by the assistant header, as SmolLM2-135M-Instruct
sees a request, and run through the first ``layer`` transformer blocks of that model (float32
activations on the GGUF's own blocks through the native kernels; without them, weights dequantized
to float32). The feature vector is the residual stream after block
``layer``: its mean over the user turn's content (the text's tokens and the end-of-turn token),
then its value at the last token (the assistant header, where the model is about to answer) —
[N, 2 * dim].
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..formats import load_checkpoint
from ..model import Transformer
from ..quant import ggml
from ..quant.repack import load_packed
from ..paths import default_model_path
from .license import notice_once

PREFIX = "<|im_start|>user\n"
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
MAX_TOKENS = 256   # text tokens kept (longer texts are cut, as the sentence encoder's 256)


class LMFeatures:
    """The first ``layer`` blocks of a Llama-architecture chat model, read as a sentence encoder."""

    def __init__(self, model, tokenizer, layer: int):
        self.model = model
        self.tokenizer = tokenizer
        self.layer = layer
        self.prefix = tokenizer.encode(PREFIX, special=True)
        self.suffix = tokenizer.encode(SUFFIX, special=True)
        self.dim = 2 * model.args.dim

    @classmethod
    def load(cls, layer: int, path: str | Path | None = None) -> "LMFeatures":
        """Blocks 0..layer-1 of ``path`` (default: the bundled SmolLM2-135M-Instruct), float32.

        Only the tensors of those blocks (and the embeddings) are loaded: the blocks above are never
        run."""
        ckpt = load_checkpoint(path if path is not None else default_model_path(), dequantize=False)
        notice_once(ckpt)
        if ckpt.args is None or ckpt.tokenizer is None:
            raise ValueError(f"{ckpt.path}: the guard needs a model with weights and a tokenizer")
        if not 0 < layer <= ckpt.args.n_layers:
            raise ValueError(f"the guard reads block {layer}, but the model has {ckpt.args.n_layers}")

        def wanted(name: str) -> bool:
            # no vocabulary projection either: the features are read from the residual stream
            if name.startswith("layers."):
                return int(name.split(".")[1]) < layer
            return not name.startswith("output.")

        tensors = {k: t for k, t in ckpt.tensors.items() if wanted(k)}
        args = ckpt.args.replace(n_layers=layer)
        if all(ggml.supported(t) for t in tensors.values() if not isinstance(t, torch.Tensor)):
            # the file's own blocks (native kernels), float32 activations: the same weights as the
            # dequantized ones and features equal to theirs up to float32 rounding (2e-5 on values
            # of ~200), 3-5% faster at one thread, and no float32 copy (~210 MB less resident;
            # shared with a server's model of the same file)
            model = load_packed(args, tensors)
            for m in model.modules():
                if isinstance(m, ggml.GGMLLinear):
                    m.int8_auto = False
        else:
            tensors = {k: (t if isinstance(t, torch.Tensor) else t.dequantize()).float() for k, t in tensors.items()}
            model = Transformer.empty(args).load_tensors(tensors, strict=False)
        model.requires_grad_(False)
        return cls(model.eval(), ckpt.tokenizer, layer)

    def ids(self, text: str) -> list[int]:
        return self.prefix + self.tokenizer.encode(text.strip())[:MAX_TOKENS] + self.suffix

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """Features [N, 2 * dim]: mean over the user turn's content, then the last token's state."""
        ids = [self.ids(t) for t in texts]
        out = torch.empty(len(ids), self.dim)
        lo = len(self.prefix)
        # similar lengths share a batch; right padding is invisible to the causal attention of the
        # real tokens, so no mask is needed
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for s in range(0, len(order), batch_size):
            b = order[s:s + batch_size]
            T = max(len(ids[i]) for i in b)
            x = torch.zeros(len(b), T, dtype=torch.long)
            for r, i in enumerate(b):
                x[r, : len(ids[i])] = torch.tensor(ids[i])
            h = self.model.hidden(x, norm=False).float()      # the residual stream [B, T, D]
            for r, i in enumerate(b):
                n = len(ids[i])
                turn = h[r, lo: n - len(self.suffix) + 1]          # the text and <|im_end|>
                out[i, : self.dim // 2] = turn.mean(0)
                out[i, self.dim // 2:] = h[r, n - 1]
        return out
