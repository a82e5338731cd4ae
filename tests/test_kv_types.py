"""KV cache element types (Llama.load(kv_type=...), --kv-type): float16 keys and values are read by
the native decode attention as they are, and agree with a float32 cache up to float16 rounding."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamaforge import native
from llamaforge.api import Llama
from llamaforge.cache import kv_dtype


@pytest.mark.skipif(native.kernels() is None, reason="native kernels could not be built here")
def test_decode_attention_reads_a_float16_cache():
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(3, 2, 40, 64, generator=g).half()
    q = torch.randn(2, 8, 1, 64, generator=g)
    k, v = cache[1:3, :, :33], cache[0:2, :, :33]
    mask = torch.arange(33).view(1, 1, 1, -1) <= torch.tensor([20, 32]).view(2, 1, 1, 1)
    ref = F.scaled_dot_product_attention(q, k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    assert (native.kernels().decode_attention(q, k, v, mask) - ref).abs().max() < 1e-5


def test_float16_cache_generates_what_a_float32_cache_does(make_checkpoint, tiny_tokenizer):
    path, _ = make_checkpoint("gguf", tokenizer=tiny_tokenizer, qtype="q8_0")
    full, half = Llama.load(path, kv_type="f32"), Llama.load(path, kv_type="f16")
    assert half.model.new_cache(1, 16).k.dtype == torch.float16
    assert full.model.new_cache(1, 16).k.dtype == torch.float32
    kw = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
    a, b = full.complete([1, 5, 9, 30, 41], **kw), half.complete([1, 5, 9, 30, 41], **kw)
    assert a.tokens == b.tokens


def test_unknown_kv_type_is_a_clear_error():
    with pytest.raises(ValueError, match="kv_type must be one of f32, f16"):
        kv_dtype("q4")
    with pytest.raises(ValueError, match="kv_type must be one of"):
        Llama.load("/nonexistent.gguf", kv_type="int3")
