"""Weight-only quantization: packed kernels against float math, GGUF repacking against gguf-py's own
dequantization, the bundled model's packed path against its float path, and `llamaforge quantize`
files run by llama.cpp (llama-cpp-python) with the same greedy tokens as llamaforge.
"""
from __future__ import annotations

import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import peers
from conftest import tiny_model, tiny_tokens
from llamaforge.api import Llama
from llamaforge.formats import load_checkpoint
from llamaforge.quant import Int4Linear, Int8Embedding, Int8Linear, quantize_model
from llamaforge.quant import kquants
from llamaforge.quant.command import quantize
from llamaforge.quant.gguf_blocks import QTensor
from llamaforge.quant.mixes import tensor_type, use_more_bits
from llamaforge.quant.repack import load_packed, repack, repack_error
from peers import needs_llama_cpp


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_packed_linear_matches_float(kind):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(96, 128, generator=g), torch.randn(5, 128, generator=g)
    mod = Int8Linear.from_float(w) if kind == "int8" else Int4Linear.from_float(w, group_size=32)
    y = mod(x)
    assert y.dtype == torch.float32 and y.shape == (5, 96)
    # against the float weight: the quantization error of 8 or 4 bits
    assert rel_err(y, x @ w.t()) < (0.01 if kind == "int8" else 0.12)
    # against the module's own dequantized weight: only bfloat16 rounding of activations and outputs
    if kind == "int8":
        wq = mod.dequantize()
    else:
        from llamaforge.quant.linear import quantize_int4_groups
        q, s, z = quantize_int4_groups(w, 32)
        wq = (q.float() - 8) * s.repeat_interleave(32, 1) + z.repeat_interleave(32, 1)
    assert rel_err(y, x @ wq.t()) < 0.01


def test_int4_rejects_bad_shapes():
    with pytest.raises(ValueError, match="int4"):
        Int4Linear.from_float(torch.randn(20, 64), group_size=32)   # rows not a multiple of 16
    with pytest.raises(ValueError, match="quantize must be"):
        quantize_model(tiny_model(), "int3")


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_repack_gguf_blocks(qtype):
    """Repacked modules compute with what gguf-py dequantizes the blocks to, up to bf16 scales."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g) * 0.05
    qt = QTensor.quantize(w, qtype)
    mod = repack(qt)
    assert isinstance(mod, Int8Linear if qtype == "Q8_0" else Int4Linear)
    err = repack_error(qt, mod)
    assert err < (0.01 if qtype == "Q8_0" else 0.005), err
    x = torch.randn(3, 256, generator=g)
    assert rel_err(mod(x), x @ qt.dequantize().t()) < 0.015


def test_quantize_model_tiny_logits_and_generation():
    from llamaforge.generate import generate
    from llamaforge.sampling import SamplingParams
    toks = tiny_tokens(length=20)
    for preset in ("tiny", "tiny-tied"):
        ref = tiny_model(preset)
        with torch.no_grad():
            want = ref(toks)
        for kind, tol in (("int8", 0.02), ("int4", 0.15)):
            q = quantize_model(tiny_model(preset), kind)
            assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
            assert isinstance(q.tok_embeddings, Int8Embedding)
            if preset == "tiny-tied":
                assert q.tok_embeddings.qweight is q.output.qweight   # tied rows stored once
            with torch.no_grad():
                got = q(toks)
            assert rel_err(got, want) < tol, (preset, kind)
            # the cached decode path gives the logits of the full pass
            cache = q.new_cache(1, 32)
            with torch.no_grad():
                pre = q(toks[:, :12], None, cache, None)
                step = q(toks[:, 12:13], torch.tensor([[12]]), cache, None)
            assert torch.allclose(pre[0], got[0, :12], atol=1e-4)
            assert torch.allclose(step[0, 0], got[0, 12], atol=1e-4)
            out = list(generate(q, toks[0, :5].tolist(), SamplingParams(max_tokens=6, ignore_eos=True)))
            assert len(out) == 6


def test_load_packed_tiny_gguf_matches_dequantized(make_checkpoint, tmp_path):
    """A Q4_1 GGUF loaded packed gives the logits of the same file loaded as float32."""
    from llamaforge.formats import load_checkpoint
    path, _ = make_checkpoint("gguf", preset="tiny-tied", qtype="q4_1")
    flat = load_checkpoint(path)
    from llamaforge.model import Transformer
    ref = Transformer.empty(flat.args).load_tensors(flat.tensors).eval()
    packed = load_checkpoint(path, dequantize=False)
    assert any(isinstance(t, QTensor) for t in packed.tensors.values())
    model = load_packed(packed.args, packed.tensors)
    toks = tiny_tokens(length=16)
    with torch.no_grad():
        assert rel_err(model(toks), ref(toks)) < 0.02


def _bundled_pair(bundled_gguf):
    from llamaforge.api import Llama
    fast = Llama.load(bundled_gguf, weights="blocks", max_seq_len=1024)
    flt = Llama.load(bundled_gguf, max_seq_len=1024)
    return fast, flt


@pytest.mark.slow
def test_bundled_packed_path_matches_float_path(bundled_gguf, monkeypatch):
    """The bundled SmolLM2 Q4_1 without the native kernels: repacked int4 logits ~ float32
    dequantized logits, same greedy tokens (the native path is tested in test_native.py)."""
    monkeypatch.setenv("LLAMAFORGE_NATIVE", "0")
    fast, flt = _bundled_pair(bundled_gguf)
    assert isinstance(fast.model.layers[0].attention.wq, Int4Linear)
    assert fast.model.layers[0].attention.wq.packed.dtype == torch.uint8
    ids = fast.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    a, b = fast.logits(ids), flt.logits(ids)
    assert rel_err(a, b) < 0.05
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    ga = fast.complete(ids, max_tokens=16).tokens
    gb = flt.complete(ids, max_tokens=16).tokens
    assert ga == gb


# ------------------------------------------------------------------ llamaforge quantize + llama.cpp

@pytest.fixture(scope="module")
def trained_tiny_hf(tmp_path_factory, tiny_tokenizer):
    """The tiny model trained for a few seconds on repetitive text, written as an HF folder.

    Random weights give near-uniform logits (top-2 gaps of a few hundredths) where any rounding flips
    the argmax; after a little training the next token is clear, so greedy decoding is a meaningful
    comparison between implementations.
    """
    from conftest import TINY_TEXT
    from llamaforge.formats import hf
    torch.manual_seed(0)
    model = tiny_model("tiny", seed=3).train()
    data = torch.tensor(tiny_tokenizer.encode(" ".join(TINY_TEXT[::3]), bos=False))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        starts = torch.randint(0, len(data) - 65, (8,))
        batch = torch.stack([data[i:i + 65] for i in starts])
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 2.0
    out = tmp_path_factory.mktemp("trained") / "tiny-hf"
    hf.write(out, model.args, model.eval().state_dict(), tokenizer=tiny_tokenizer)
    return out


@needs_llama_cpp
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1"])
def test_quantize_command_runs_in_llama_cpp(qtype, tmp_path, tiny_tokenizer, trained_tiny_hf):
    src = trained_tiny_hf
    out = tmp_path / f"tiny-{qtype}.gguf"
    assert quantize(str(src), type=qtype, output=str(out)) == 0
    ck = load_checkpoint(out, dequantize=False)
    assert {t.qtype for t in ck.tensors.values() if isinstance(t, QTensor)} == (
        {"Q8_0"} if qtype == "q8_0" else {qtype.upper(), "Q8_0"})   # q4_*: the output projection stays Q8_0
    prompt = tiny_tokenizer.encode("the quick brown fox jumps over", bos=True)
    want = peers.run(peers.llama_cpp_greedy, str(out), prompt, 16)
    assert len(set(want)) > 3, want   # a real continuation, not one repeated token
    for mode in (None, "auto"):   # float32 dequantized, and computed from the blocks
        llm = Llama.load(out, quantize=mode)
        got = llm.complete(prompt, max_tokens=16, ignore_eos=True).tokens
        assert got == want, (mode, got, want)
    assert (tmp_path / "model_card.json").exists()


def test_quantize_command_bad_input(tmp_path):
    with pytest.raises(ValueError, match="type"):
        quantize(str(tmp_path), type="q3_x", output=str(tmp_path / "a.gguf"))
    with pytest.raises(ValueError, match=".gguf"):
        quantize(str(tmp_path), type="q8_0", output=str(tmp_path / "a.bin"))
    with pytest.raises(ValueError, match="no such file"):   # CheckpointError, printed as one line by the CLI
        quantize(str(tmp_path / "missing"), type="q8_0", output=str(tmp_path / "a.gguf"))


def test_bench_prints_json(make_checkpoint, tiny_tokenizer, capsys):
    import json
    from llamaforge.benchmark import bench
    path, _ = make_checkpoint("gguf", preset="tiny", tokenizer=tiny_tokenizer, qtype="q4_1")
    assert bench(model=str(path), prompt_tokens=24, gen_tokens=6, threads=1, json=True) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_mb"):
        assert out[key] > 0, key
    # the default that was spelled quantize="auto" is weights="blocks" (issue 15: one meaning per name)
    assert out["weights"] == "blocks" and out["quantize"] == "none"
    with pytest.raises(ValueError, match="exceed the context window"):
        bench(model=str(path), prompt_tokens=120, gen_tokens=20, threads=1)


# ------------------------------------------------------------------ our quantizers vs gguf-py and llama.cpp

def _awkward_matrix(rows: int, cols: int, seed: int) -> np.ndarray:
    """Gaussian rows at mixed scales plus the blocks that trip quantizers: zeros, constants, one spike."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32) * rng.uniform(1e-3, 2, (rows, 1)).astype(np.float32)
    x[0, :64] = 0
    x[1, :256] = 0.5
    x[2, 5] = 40
    x[3] = np.abs(x[3])            # all positive: the min of K-quants clamps at 0
    x[4, :32] = -1e-20             # below GROUP_MAX_EPS
    return x


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_32_block_quantizers_match_gguf_py(qtype):
    """gguf-py's numpy quantizers are bit-exact ports of llama.cpp's for these types."""
    from gguf import GGMLQuantizationType, quants
    x = _awkward_matrix(16, 512, 0)
    assert np.array_equal(kquants.quantize(x, qtype), quants.quantize(x, GGMLQuantizationType[qtype]))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quantizers_roundtrip(qtype):
    """gguf-py dequantizes our K-quant blocks back to the input within the type's error."""
    from gguf import GGMLQuantizationType, quants
    x = _awkward_matrix(32, 512, 1)[5:]
    back = quants.dequantize(kquants.quantize(x, qtype), GGMLQuantizationType[qtype])
    rel = np.sqrt(((back - x) ** 2).mean(1) / (x ** 2).mean(1))
    assert rel.max() < {"Q4_K": 0.12, "Q5_K": 0.06, "Q6_K": 0.03}[qtype], rel.max()


def test_quantizer_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of 256"):
        kquants.quantize(np.zeros((2, 96), np.float32), "Q4_K")
    with pytest.raises(ValueError, match="supported"):
        kquants.quantize(np.zeros((2, 96), np.float32), "Q3_K")


def test_type_mix_follows_llama_cpp_rules():
    # 32 layers: use_more_bits picks 0-3, 28-31 and every third layer from 6
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    t = lambda name, cols, ft, tied=False: tensor_type(name, (64, cols), ft, 32, tied)  # noqa: E731
    assert t("output.weight", 4096, "q4_0") == "Q6_K"
    assert t("output.weight", 4096, "q8_0") == "Q8_0"
    assert t("token_embd.weight", 4096, "q4_k_m") == "Q4_K"
    assert t("token_embd.weight", 576, "q4_k_m", tied=True) == "Q8_0"   # tied: the output's rule
    assert t("blk.6.attn_v.weight", 4096, "q5_k_m") == "Q6_K"
    assert t("blk.7.attn_v.weight", 4096, "q5_k_m") == "Q5_K"
    assert t("blk.7.ffn_down.weight", 8640, "q4_k_m") == "Q5_0"        # 8640 % 256: falls back
    assert t("blk.6.ffn_down.weight", 8640, "q4_k_m") == "Q8_0"        # Q6_K falls back to Q8_0
    assert t("blk.6.ffn_down.weight", 11008, "q4_k_m") == "Q6_K"
    assert t("blk.0.attn_q.weight", 48, "q4_0") == "F16"
    assert tensor_type("blk.0.attn_norm.weight", (4096,), "q4_k_m", 32, False) == "F32"


def test_writer_streams_lazy_tensors(tmp_path, tiny_tokenizer):
    """The writer asks for one tensor at a time (bench/make_llama_shaped.py writes a 13.5 GB F16 so)."""
    import weakref

    from llamaforge.config import PRESETS
    from llamaforge.formats.gguf import write
    from llamaforge.formats.common import expected_shapes
    args = PRESETS["tiny"]
    alive = []

    class Lazy:
        def __init__(self, shape, seed):
            self.shape, self.seed = shape, seed

        def dequantize(self):
            assert sum(r() is not None for r in alive) <= 1, "more than one float tensor alive"
            t = torch.randn(self.shape, generator=torch.Generator().manual_seed(self.seed))
            alive.append(weakref.ref(t))
            return t

    shapes = expected_shapes(args)
    out = write(tmp_path / "lazy.gguf", args, {n: Lazy(s, i) for i, (n, s) in enumerate(shapes.items())},
                tokenizer=tiny_tokenizer, qtype="q8_0")
    ck = load_checkpoint(out)
    assert len(alive) == len(shapes)
    want = torch.randn(shapes["layers.1.attention.wv.weight"], generator=torch.Generator().manual_seed(
        list(shapes).index("layers.1.attention.wv.weight")))
    assert rel_err(ck.tensors["layers.1.attention.wv.weight"], want) < 0.01


@pytest.fixture(scope="module")
def f32_source(tmp_path_factory, tiny_tokenizer):
    """An F32 GGUF of random weights whose shapes exercise every rule: 8 layers (use_more_bits),
    256-wide rows (K-quants) and 384-wide ffn_down rows (K-quant fallbacks)."""
    from llamaforge.config import ModelArgs
    from llamaforge.formats.gguf import write
    from llamaforge.formats.common import expected_shapes
    args = ModelArgs(dim=256, n_layers=8, n_heads=4, n_kv_heads=2, hidden_dim=384,
                     vocab_size=tiny_tokenizer.vocab_size, max_seq_len=128)
    tensors = {}
    for i, (name, shape) in enumerate(expected_shapes(args).items()):
        tensors[name] = (torch.from_numpy(_awkward_matrix(*shape, seed=i) * 0.02) if len(shape) == 2
                         else torch.ones(shape))
    path = tmp_path_factory.mktemp("f32") / "random-f32.gguf"
    write(path, args, tensors, tokenizer=tiny_tokenizer, qtype="f32")
    return path


def _tensors(path) -> dict:
    from llamaforge.formats.gguf import parse
    return {t.name: t for t in parse(path)[2]}


@needs_llama_cpp
@pytest.mark.parametrize("ftype", ["q4_k_m", "q5_k_m", "q6_k", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_quantize_matches_llama_cpp_quantizer(ftype, f32_source, tmp_path):
    """Every tensor of `llamaforge quantize` output has llama.cpp's type and llama.cpp's bytes."""
    ours = tmp_path / f"ours-{ftype}.gguf"
    assert quantize(str(f32_source), type=ftype, output=str(ours)) == 0
    ref = tmp_path / f"ref-{ftype}.gguf"
    peers.run(peers.llama_cpp_quantize, str(f32_source), str(ref), ftype)
    a, b = _tensors(ours), _tensors(ref)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].qtype == b[name].qtype, name
        assert np.array_equal(np.asarray(a[name].data).view(np.uint8), np.asarray(b[name].data).view(np.uint8)), name
    if ftype == "q4_k_m":   # the mix is really mixed here
        assert {t.qtype for t in a.values()} == {"F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"}
    # and llama.cpp runs our file (metadata and all) exactly as its own
    ids = list(range(1, 40, 3))
    want = peers.run(peers.llama_cpp_logits, str(ref), ids)
    assert np.array_equal(peers.run(peers.llama_cpp_logits, str(ours), ids), want)


@needs_llama_cpp
@pytest.mark.parametrize("qtype", ["q4_k_m", "q5_k_m", "q6_k", "q5_0", "q5_1"])
def test_quantize_k_mixes_run_in_llama_cpp(qtype, tmp_path, tiny_tokenizer, trained_tiny_hf):
    """llama.cpp loads the other file types and computes the logits llamaforge's float32 path does
    (up to llama.cpp's 8-bit activations: cosine, and the same top token almost everywhere)."""
    out = tmp_path / f"tiny-{qtype}.gguf"
    assert quantize(str(trained_tiny_hf), type=qtype, output=str(out)) == 0
    ids = tiny_tokenizer.encode("the quick brown fox jumps over the lazy dog and the cat sat on the mat", bos=True)
    want = torch.from_numpy(peers.llama_cpp_logits(str(out), ids))
    got = Llama.load(out, weights="float").logits(ids)
    cos = F.cosine_similarity(got, want, dim=-1)
    assert cos.min() > 0.999, cos
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_peer_crash_fails_only_the_test():
    """A peer killed by a signal becomes a test failure naming the signal; this process goes on."""
    with pytest.raises(pytest.fail.Exception, match=r"killed by SIGSEGV \(Segmentation fault\)"):
        peers.run(peers.crash, signal.SIGSEGV)
    with pytest.raises(pytest.fail.Exception, match=r"raised FileNotFoundError"):
        peers.run(open, "/nonexistent.gguf")


@needs_llama_cpp
def test_peer_amx_switch(monkeypatch, tmp_path, tiny_tokenizer, trained_tiny_hf):
    """Where llama.cpp's AMX path would run, the peer loads without it, says so, and still computes."""
    monkeypatch.setenv("LLAMAFORGE_PEER_AMX", "1")
    assert peers.run(peers.llama_cpp_extra_bufts) is True
    out = tmp_path / "tiny-q4_0.gguf"
    quantize(str(trained_tiny_hf), type="q4_0", output=str(out))
    ids = tiny_tokenizer.encode("the quick brown fox", bos=True)
    default = peers.run(peers.llama_cpp_logits, str(out), ids)
    monkeypatch.setenv("LLAMAFORGE_PEER_AMX", "0")
    with pytest.warns(UserWarning, match="AMX path off"):
        assert peers.run(peers.llama_cpp_extra_bufts) is False
    with pytest.warns(UserWarning, match="AMX path off"):
        plain = peers.run(peers.llama_cpp_logits, str(out), ids)
    assert np.allclose(plain, default, atol=1e-2)


@pytest.fixture(scope="module")
def bundled_f32(bundled_gguf, tmp_path_factory):
    """The bundled SmolLM2 Q4_1 dequantized to an F32 GGUF: the common source of both quantizers."""
    from llamaforge.formats.gguf import write
    path = tmp_path_factory.mktemp("smollm-f32") / "smollm2-f32.gguf"
    write(path, load_checkpoint(bundled_gguf), qtype="f32")
    return path


def _wikitext_ids(tokenizer, n: int) -> list[int]:
    from llamaforge.paths import data_dir
    try:
        raw = data_dir() / "eval" / "wikitext2_test.raw"
    except FileNotFoundError as e:
        pytest.skip(str(e))
    if not raw.is_file():
        pytest.skip(f"{raw} not found (shared data)")
    return tokenizer.encode(raw.read_text(encoding="utf-8")[:20000], bos=True)[:n]


def _perplexity(path, ids: list[int]) -> float:
    llm = Llama.load(path, weights="float", max_seq_len=len(ids))   # the file's weights, float32 arithmetic
    logits = llm.logits(ids)
    return float(torch.exp(F.cross_entropy(logits[:-1], torch.tensor(ids[1:]))))


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize("ftype", ["q4_k_m", "q5_k_m", "q6_k", "q8_0", "q4_0", "q4_1"])
def test_bundled_quantized_perplexity_matches_llama_cpp(ftype, bundled_f32, tmp_path):
    """Issue 13 item 5: wikitext-2 perplexity of our file within 1% of llama.cpp's quantizer output
    for the same F32 source (the full-file figures are in docs/benchmarks.md)."""
    ours, ref = tmp_path / f"ours-{ftype}.gguf", tmp_path / f"ref-{ftype}.gguf"
    assert quantize(str(bundled_f32), type=ftype, output=str(ours)) == 0
    peers.run(peers.llama_cpp_quantize, str(bundled_f32), str(ref), ftype)
    ids = _wikitext_ids(Llama.load(bundled_f32, weights="float").tokenizer, 512)
    p_ours, p_ref = _perplexity(ours, ids), _perplexity(ref, ids)
    print(f"{ftype}: wikitext-2 slice ({len(ids)} tokens) perplexity ours {p_ours:.4f}, llama.cpp {p_ref:.4f}")
    assert abs(p_ours / p_ref - 1) < 0.01, (p_ours, p_ref)
    # in fact the tensors are llama.cpp's, byte for byte
    a, b = _tensors(ours), _tensors(ref)
    assert all(np.array_equal(np.asarray(a[n].data).view(np.uint8), np.asarray(b[n].data).view(np.uint8)) for n in a)
