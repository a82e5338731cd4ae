"""Every native type computes what its float32 dequantization computes, through the whole model.

A tiny random-weight Llama (dim 256 so the K-quants' 256-weight blocks fit) whose every matrix is
stored in one GGML type is loaded twice: the default load (load_packed: the native kernels over the
blocks) and the float32 dequantized load (gguf-py's dequantization, what ``weights="float"`` runs).
Both paths of the default load are compared: the batched prompt path (many rows per matmul) and the
token-by-token decode path (single-row kernels, KV cache). With float32 activations the logits agree
to 2e-2; with 8-bit activations their mean cosine is at least 0.9995 (issue 13's bounds).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamaforge import native
from llamaforge.config import ModelArgs
from llamaforge.model import Transformer
from llamaforge.quant import ggml
from llamaforge.quant.gguf_blocks import NATIVE_TYPES, QTensor, random_blocks
from llamaforge.quant.repack import load_packed

pytestmark = pytest.mark.skipif(native.kernels() is None, reason="native kernels could not be built here")

ARGS = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, hidden_dim=512, max_seq_len=64)
PROMPT = 40          # rows per matmul above ggml.DIRECT_MAX_ROWS: the prompt path
DECODED = 6


def _tensors(qtype: str) -> dict:
    names = Transformer(ARGS).state_dict()
    out = {}
    for i, (name, t) in enumerate(names.items()):
        if t.ndim == 2:
            std = 0.02 / 2 if name.endswith(("wo.weight", "w2.weight")) else 0.02
            rows, cols = t.shape
            out[name] = QTensor(random_blocks(qtype, rows, cols, seed=i, std=std), qtype, (rows, cols))
        else:
            out[name] = torch.ones_like(t)
    return out


def _reference(tensors: dict) -> Transformer:
    deq = {n: t.dequantize() if isinstance(t, QTensor) else t for n, t in tensors.items()}
    return Transformer.empty(ARGS).load_tensors(deq).eval()


def _decode_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """Prompt of PROMPT - DECODED tokens, then one token per step through the KV cache."""
    cache = model.new_cache(1, ARGS.max_seq_len)
    n0 = ids.shape[1] - DECODED
    rows = [model(ids[:, :n0], cache=cache)[0]]
    for t in range(n0, ids.shape[1]):
        rows.append(model(ids[:, t:t + 1], pos=torch.tensor([[t]]), cache=cache)[0])
    return torch.cat(rows)


@pytest.fixture(params=["f32", "int8"])
def activations(request):
    with ggml.using_activations(request.param):
        yield request.param


@pytest.mark.parametrize("qtype", NATIVE_TYPES)
def test_default_load_agrees_with_float32_dequantized_load(qtype, activations):
    tensors = _tensors(qtype)
    ref = _reference(tensors)
    fast = load_packed(ARGS, tensors)
    assert isinstance(fast.layers[0].feed_forward.w2, ggml.GGMLLinear)
    assert isinstance(fast.output, ggml.GGMLLinear)
    ids = torch.randint(0, ARGS.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = ref(ids)[0]
        assert want.std() > 0.1        # a model whose logits say something
        got = {"prompt": fast(ids)[0], "decode": _decode_logits(fast, ids)}
    for path, logits in got.items():
        if activations == "f32":
            err = (logits - want).abs().max().item()
            assert err <= 2e-2, f"{qtype} {path}: max |dlogit| {err:.3g}"
        else:
            cos = F.cosine_similarity(logits.double(), want.double(), dim=-1).mean().item()
            assert cos >= 0.9995, f"{qtype} {path}: mean cosine {cos:.6f}"


def test_f16_gguf_stays_mapped_and_runs_natively(tmp_path, tiny_tokenizer):
    """An F16 file: matrices stay 2-byte blocks over the mapped file (no float32 copy)."""
    from llamaforge.api import Llama
    from llamaforge.formats import gguf
    model = Transformer(ARGS.replace(vocab_size=256)).init_weights(0).eval()
    path = gguf.write(tmp_path / "m.gguf", model.args, model.state_dict(), tokenizer=tiny_tokenizer, qtype="f16")
    fast, flt = Llama.load(path), Llama.load(path, weights="float")
    wq = fast.model.layers[0].attention.wq
    assert isinstance(wq, ggml.GGMLLinear) and wq.qtype == "F16" and wq.blocks.dtype == torch.uint8
    ids = list(range(1, 30))
    with ggml.using_activations("f32"):
        assert (fast.logits(ids) - flt.logits(ids)).abs().max() <= 2e-2
