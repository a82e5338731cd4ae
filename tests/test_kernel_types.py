"""Every GGML type's native kernels against gguf-py: dequantization bit for bit, and both matmul
paths (float32 activations; 8-bit activations) against float64 products of gguf-py's weights.

Blocks are random but valid: random code bytes with sane float16 scales at their offsets (gguf-py
has no quantizer for the K-quants), so every bit of every code field is exercised.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from llamaforge import native
from llamaforge.quant.gguf_blocks import NATIVE_TYPES, QTensor, block_sizes, random_blocks

pytestmark = pytest.mark.skipif(native.kernels() is None, reason="native kernels could not be built here")

K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def _qt(qtype: str, rows: int, cols: int, seed: int = 0) -> QTensor:
    return QTensor(random_blocks(qtype, rows, cols, seed), qtype, (rows, cols))


def _q8_reference(x: torch.Tensor, block: int) -> torch.Tensor:
    """x as the kernels quantize it (per block: d = amax / 127, q = round(x * 127 / amax)), float64."""
    xb = x.reshape(x.shape[0], -1, block)
    amax = xb.abs().amax(-1, keepdim=True)
    q = torch.round(xb * torch.where(amax > 0, 127 / amax, torch.zeros_like(amax)))
    return (q.double() * (amax / 127).double()).reshape(x.shape)


@pytest.mark.parametrize("qtype", NATIVE_TYPES)
def test_dequantize_is_bit_identical_to_gguf_py(qtype):
    qt = _qt(qtype, 24, 512)
    got = native.kernels().dequantize(torch.from_numpy(qt.data), native.TYPE_IDS[qtype], 512)
    ref = qt.dequantize()
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))   # bits, so NaN/-0 count too


@pytest.mark.parametrize("qtype", NATIVE_TYPES)
@pytest.mark.parametrize("rows", [1, 3, 6, 9, 40])   # 40: prompt rows, on 16-row tiles where the build has them
def test_matmul_paths_match_float64_products(qtype, rows):
    qt = _qt(qtype, 300, 512, seed=rows)      # 300 output rows: split across threads
    w = qt.dequantize().double()
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows))
    k, blocks = native.kernels(), torch.from_numpy(qt.data)
    (y,) = k.matmul(x, [blocks], native.TYPE_IDS[qtype], 512, False)
    ref = x.double() @ w.t()
    assert (y.double() - ref).abs().max() < 2e-5 * ref.abs().max()
    if rows <= 16:   # decode: a row's float32 result does not depend on the other rows either
        (solo,) = k.matmul(x[-1:], [blocks], native.TYPE_IDS[qtype], 512, False)
        assert torch.equal(solo[0], y[-1])
    (yq,) = k.matmul(x, [blocks], native.TYPE_IDS[qtype], 512, True)
    if qtype in ("F16", "BF16") or not k.int8_path():          # no integer path: the float32 one
        assert torch.equal(yq, y)
        return
    # the integer path computes exactly with x rounded to its q8 blocks (float32 sums aside)
    refq = _q8_reference(x, 256 if qtype in K_QUANTS else 32) @ w.t()
    assert (yq.double() - refq).abs().max() < 2e-5 * refq.abs().max()
    # and that rounding costs little: cosine to the float32 product
    assert torch.nn.functional.cosine_similarity(yq.double(), ref, dim=-1).min() > 0.999
    if rows <= 16:   # decode: a row's result does not depend on the other rows of the batch
        (solo,) = k.matmul(x[-1:], [blocks], native.TYPE_IDS[qtype], 512, True)
        assert torch.equal(solo[0], yq[-1])
    else:            # prompts: nor on how the rows of W are split between threads
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            (one,) = k.matmul(x, [blocks], native.TYPE_IDS[qtype], 512, True)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one, yq)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K", "Q8_0"])
def test_large_calls_do_not_depend_on_the_thread_schedule(qtype):
    """Calls over 8 MB of weights x rows hand rows to the threads in chunks from a shared counter (a
    schedule that differs from run to run): two threads give one thread's results bit for bit, for a
    decoded row and for a prompt (tiles), on both activation paths."""
    k, K = native.kernels(), 1024
    qt = _qt(qtype, 16384, K, seed=5)
    blocks = torch.from_numpy(qt.data)
    assert blocks.numel() >= 8 << 20   # one row of x already takes the chunked schedule
    x = torch.randn(24, K, generator=torch.Generator().manual_seed(5))
    threads, out = torch.get_num_threads(), {}
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            out[nt] = [k.matmul(x[:m], [blocks], native.TYPE_IDS[qtype], K, int8)[0]
                       for m in (1, 24) for int8 in (False, True)]
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(out[1], out[2]):
        assert torch.equal(one, two)
    ref = x[:1].double() @ qt.dequantize()[:4096].double().t()   # and they are the product
    assert (out[2][0][:, :4096].double() - ref).abs().max() < 2e-5 * ref.abs().max()


def test_one_call_over_several_matrices_equals_separate_calls():
    k, K = native.kernels(), 512
    parts = [torch.from_numpy(_qt("Q4_K", n, K, seed=n).data) for n in (256, 64, 64)]
    x = torch.randn(2, K)
    for int8 in (False, True):
        together = k.matmul(x, parts, native.TYPE_IDS["Q4_K"], K, int8)
        for p, y in zip(parts, together):
            assert torch.equal(y, k.matmul(x, [p], native.TYPE_IDS["Q4_K"], K, int8)[0])


def test_bad_blocks_are_rejected():
    k, blocks = native.kernels(), torch.from_numpy(_qt("Q6_K", 4, 256).data)
    with pytest.raises(RuntimeError, match="do not hold"):
        k.matmul(torch.randn(1, 512), [blocks], native.TYPE_IDS["Q6_K"], 512)
    with pytest.raises(RuntimeError, match="unsupported GGML type"):
        k.dequantize(blocks, 99, 256)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="builds a second kernel variant with gcc flags")
def test_avx2_build_agrees_with_the_reference():
    """The variant an AVX2-only CPU runs (built here without AVX-512 and VNNI) passes the same tests."""
    if native.kernels().isa() in ("avx2", "portable"):
        pytest.skip("this machine already runs the AVX2 build")
    env = dict(os.environ, LLAMAFORGE_KERNEL_ISA="avx2")
    code = ("from llamaforge import native; import sys; k = native.kernels(); "
            "sys.exit(0 if k is not None and k.isa() == 'avx2' else 1)")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=1200)
    here = os.path.dirname(__file__)
    attention = [os.path.join(here, f) for f in (   # the per-token kernels have AVX2 forms of their own
        "test_native.py::test_decode_attention_matches_sdpa", "test_native.py::test_rms_norm_and_rope_match_torch",
        "test_native.py::test_decode_attention_reads_scattered_cache_rows_in_place",
        "test_kv_types.py::test_decode_attention_reads_a_float16_cache",
        "test_kv_types.py::test_decode_attention_reads_a_q8_0_cache")]
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, *attention,
                    "-k", "not avx2_build"], env=env, check=True, timeout=1200)
