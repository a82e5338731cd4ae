"""KV cache element types (Llama.load(kv_type=...), --kv-type): float16 keys and values are read by
the native decode attention as they are, and agree with a float32 cache up to float16 rounding;
q8_0 keys and values are GGML Q8_0 blocks, byte for byte what gguf-py (llama.cpp) writes."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llamaforge import cli, native, ops
from llamaforge.api import Llama
from llamaforge.cache import KVCache, kv_dtype
from llamaforge.config import PRESETS
from llamaforge.generate import Batch, generate_batch
from llamaforge.model import Transformer
from llamaforge.sampling import SamplingParams

gguf = pytest.importorskip("gguf")
Q8_0 = gguf.GGMLQuantizationType.Q8_0
needs_kernels = pytest.mark.skipif(native.kernels() is None, reason="native kernels could not be built here")
# the tiny preset's heads are 16 wide: these are 32, one Q8_0 block, with grouped KV heads
ARGS = PRESETS["tiny"].replace(dim=128, n_heads=4, n_kv_heads=2)


def q8_model(kv: torch.dtype = torch.uint8) -> Transformer:
    m = Transformer(ARGS).init_weights(seed=0).eval()
    m.kv_dtype = kv
    return m


@needs_kernels
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


# -- q8_0 ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["native", "torch"])
def test_q8_0_cache_round_trip_matches_gguf_py(mode):
    """Rows written through both write paths (one row's window, scattered slots) are gguf-py's blocks."""
    if mode == "native" and native.kernels() is None:
        pytest.skip("native kernels could not be built here")
    g = torch.Generator().manual_seed(1)
    cache = KVCache(2, 3, 2, 8, 64, dtype=torch.uint8)
    assert cache.k.shape == (2, 3, 2, 8, 68)
    one = torch.randn(1, 2, 5, 64, generator=g) * 4           # [B, K, T, Hd] at slot 1, positions 0..4
    one[0, 0, 0, :32] = 0                                      # an all-zero block: d = 0, codes 0
    one[0, 0, 1, :32] = torch.arange(32) / 2 - 8               # ties of x / d at .5
    two = torch.randn(2, 2, 1, 64, generator=g)                # slots 2 and 0, positions 6 and 3
    with torch.inference_mode() if mode == "native" else torch.no_grad():
        for layer, (x, pos, slots) in enumerate([(one, torch.arange(5)[None], torch.tensor([1])),
                                                 (two, torch.tensor([[6], [3]]), torch.tensor([2, 0]))]):
            cache.prepare(pos, slots)
            cache.update(layer, x, -x, pos, slots, cache.kv_len)
    stored = [cache.k[0, 1, :, :5], cache.k[1, 2, :, 6:7], cache.k[1, 0, :, 3:4], cache.v[1, 0, :, 3:4]]
    rows = [one[0], two[0], two[1], -two[1]]
    for blocks, x in zip(stored, rows):
        ref = gguf.quants.quantize(x.numpy().reshape(-1, 64), Q8_0)
        assert np.array_equal(blocks.reshape(-1, 68).numpy(), ref)
        back = ops.dequantize_q8_0(blocks).reshape(-1, 64).numpy()
        assert np.array_equal(back, gguf.quants.dequantize(ref, Q8_0))
        # half a step d = max|x| / 127, plus d's own float16 rounding (127 codes x 2^-11 relative)
        assert np.abs(back - x.numpy().reshape(-1, 64)).max() <= np.abs(x.numpy()).max() / 127 * 0.57


@needs_kernels
def test_decode_attention_reads_a_q8_0_cache():
    g = torch.Generator().manual_seed(0)
    cache = ops.quantize_q8_0(torch.randn(3, 2, 40, 64, generator=g))    # [S, K, L, 68]
    q = torch.randn(2, 8, 1, 64, generator=g)
    rows = torch.tensor([2, 0])
    mask = torch.arange(33).view(1, 1, 1, -1) <= torch.tensor([20, 32]).view(2, 1, 1, 1)
    k, v = cache[:, :, :33], cache[:, :, 7:40]
    deq = ops.dequantize_q8_0
    ref = F.scaled_dot_product_attention(q, deq(k)[rows], deq(v)[rows], attn_mask=mask, enable_gqa=True)
    assert (native.kernels().decode_attention(q, k, v, mask, rows) - ref).abs().max() < 1e-5


def decode_logits(model: Transformer, ids: list[int], prompt: int, native_ops: bool) -> torch.Tensor:
    """Logits of a prefill of ids[:prompt], then of each later token decoded one at a time."""
    cache = model.new_cache(1, len(ids))
    out = []
    with torch.inference_mode() if native_ops else torch.no_grad():
        out.append(model(torch.tensor([ids[:prompt]]), cache=cache)[0, -1])
        for p in range(prompt, len(ids)):
            out.append(model(torch.tensor([[ids[p]]]), torch.tensor([[p]]), cache)[0, -1])
    return torch.stack(out)


def test_q8_0_decode_logits_are_close_to_f32():
    ids = torch.randint(0, 256, (60,), generator=torch.Generator().manual_seed(2)).tolist()
    full = decode_logits(q8_model(torch.float32), ids, 20, native_ops=True)
    q8 = decode_logits(q8_model(), ids, 20, native_ops=True)
    assert F.cosine_similarity(full, q8, dim=-1).mean() >= 0.999
    # the native kernels (quantize, decode attention) and the torch expressions see the same blocks
    assert (decode_logits(q8_model(), ids, 20, native_ops=False) - q8).abs().max() < 1e-4


def test_q8_0_generation_through_batch_with_scattered_slots():
    """Sequences decoding together (rows in slots 1 and 2 while 0 is free, then a newcomer in 0)
    give the tokens of their single runs; greedy tokens match a float32 cache's."""
    model = q8_model()
    prompts = [[1, 2, 3, 4], [9, 8, 7, 6, 5], [42, 17], [5, 6, 7]]
    lengths = [3, 14, 14, 6]
    batch = Batch(model, max_batch=3, max_seq=32)
    seqs = [batch.add(p, SamplingParams(max_tokens=n)) for p, n in zip(prompts[:3], lengths)]
    while not seqs[0].finish_reason:
        batch.step()
    batch.release(seqs[0])
    for _ in range(3):
        batch.step()              # slots 1 and 2 decode together, read in place with rows
    seqs.append(batch.add(prompts[3], SamplingParams(max_tokens=lengths[3])))
    while not all(s.finish_reason for s in seqs):
        batch.step()
    full = q8_model(torch.float32)
    for p, n, s in zip(prompts, lengths, seqs):
        assert s.out == generate_batch(model, [p], SamplingParams(max_tokens=n))[0].out
        assert s.out == generate_batch(full, [p], SamplingParams(max_tokens=n))[0].out


def test_q8_0_served_generation_matches_single_runs():
    from llamaforge.server.scheduler import Scheduler
    model = q8_model()
    prompts = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 9], [7, 7], [1, 2, 3, 4, 5, 6, 8]]   # shared prefixes: reused
    lengths = [3, 12, 12, 6]   # the first finishes early: the next two decode from slots 1 and 2
    sched = Scheduler(model, None, max_batch=3, max_seq=32)

    async def serve():
        jobs = sched.submit_all([(p, SamplingParams(max_tokens=n), None) for p, n in zip(prompts, lengths)])

        async def tokens(job):
            return [ev.id async for ev in sched.stream(job)]
        return await asyncio.gather(*(tokens(j) for j in jobs))

    sched.start()
    try:
        served = asyncio.run(serve())
    finally:
        sched.close()
    assert sched.stats.prompt_tokens_reused_total > 0    # keys and values copied between slots as blocks
    for p, n, out in zip(prompts, lengths, served):
        assert out == generate_batch(model, [p], SamplingParams(max_tokens=n))[0].out


def test_q8_0_loads_generates_and_refuses_heads_of_odd_sizes(make_checkpoint, tiny_tokenizer, tmp_path):
    from llamaforge.formats import gguf as gguf_format
    model = q8_model(torch.float32)
    path = tmp_path / "head32.gguf"
    gguf_format.write(path, model.args, model.state_dict(), tokenizer=tiny_tokenizer)
    llm = Llama.load(path, kv_type="q8_0")
    cache = llm.model.new_cache(1, 16)
    assert cache.k.dtype == torch.uint8 and cache.k.shape[-1] == 34      # one block per 32-wide head row
    kw = dict(max_tokens=10, temperature=0.0, ignore_eos=True)
    assert llm.complete([1, 5, 9, 30], **kw).tokens == Llama.load(path).complete([1, 5, 9, 30], **kw).tokens
    odd, _ = make_checkpoint("gguf", tokenizer=tiny_tokenizer)          # 16-wide heads
    with pytest.raises(ValueError, match="q8_0 quantizes blocks of 32 values .* head size is 16"):
        Llama.load(odd, kv_type="q8_0")


def test_unknown_kv_type_is_a_clear_error():
    with pytest.raises(ValueError, match="kv_type must be one of f32, f16, q8_0"):
        kv_dtype("q4")
    with pytest.raises(ValueError, match="kv_type must be one of"):
        Llama.load("/nonexistent.gguf", kv_type="int3")


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat", "hi"], ["bench", "--threads", "1"], ["serve"]])
def test_every_model_command_takes_kv_type(command, monkeypatch, capsys):
    seen = []

    def load(path=None, **kw):
        seen.append(kw.get("kv_type"))
        raise ValueError("stopped before loading")
    monkeypatch.setattr(Llama, "load", load)
    threads = torch.get_num_threads()
    try:
        assert cli.main([*command, "--kv-type", "q8_0"]) == 2
    finally:
        torch.set_num_threads(threads)
    assert seen == ["q8_0"]
    assert "stopped before loading" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*command, "--kv-type", "q4"])
    assert "invalid choice: 'q4'" in capsys.readouterr().err
