"""Checkpoint formats: round trips through each writer/reader, agreement with transformers, bad input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import has_tokenizer_module, tiny_model, tiny_tokens
from llamaforge.config import PRESETS
from llamaforge.formats import CheckpointError, gguf, hf, load_checkpoint, meta
from llamaforge.model import Transformer
from llamaforge.quant.gguf_blocks import QTensor

PRESET_NAMES = ["tiny", "tiny-tied", "tiny-mha"]


def logits_of(ckpt_or_path, tokens):
    ck = load_checkpoint(ckpt_or_path) if not hasattr(ckpt_or_path, "tensors") else ckpt_or_path
    model = Transformer.empty(ck.args).load_tensors({k: v.float() for k, v in ck.tensors.items()})
    with torch.no_grad():
        return model(tokens)


def same_args(a, b):
    keys = ("dim", "n_layers", "n_heads", "kv_heads", "vocab_size", "ffn_hidden", "norm_eps", "rope_theta",
            "max_seq_len", "tie_embeddings")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def assert_error(exc_info, path):
    assert str(path) in str(exc_info.value), str(exc_info.value)


# ---------------------------------------------------------------- Hugging Face

@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_hf_write_loads_in_transformers(make_checkpoint, preset):
    from transformers import LlamaForCausalLM
    path, model = make_checkpoint("hf", preset)
    tokens = tiny_tokens()
    hf_model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf_model(tokens).logits
    ck = load_checkpoint(path)
    assert ck.format == "hf" and same_args(ck.args, model.args)
    assert ("output.weight" in ck.tensors) != model.args.tie_embeddings
    for name, t in ck.tensors.items():  # exact inverse of the writer
        assert torch.equal(t, model.state_dict()[name]), name
    ours = logits_of(ck, tokens)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_hf_reads_transformers_sharded_save(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    ref = LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ck = load_checkpoint(tmp_path)
    assert len(ck.metadata["files"]) > 1 and ck.args.ffn_hidden == 160 and ck.args.kv_heads == 2
    tokens = tiny_tokens()
    with torch.no_grad():
        theirs = ref(tokens).logits
    assert (logits_of(ck, tokens) - theirs).abs().max().item() <= 1e-4


def test_hf_writer_sharded_and_extras(make_checkpoint, tmp_path):
    path, model = make_checkpoint("hf", "tiny", max_shard_size="60KB", chat_template="{{ messages }}",
                                  metadata={"license": "llama2"})
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ck = hf.read(path)
    assert ck.chat_template == "{{ messages }}" and ck.license == "llama2"
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in ck.tensors.items())
    # writing a Checkpoint back (here as bf16) reads back as the same bf16 values
    out = hf.write(tmp_path / "again", ck, dtype=torch.bfloat16)
    ck2 = hf.read(out)
    assert ck2.tensors["layers.0.attention.wk.weight"].dtype == torch.bfloat16
    assert torch.equal(ck2.tensors["layers.1.attention.wq.weight"],
                       model.state_dict()["layers.1.attention.wq.weight"].bfloat16())
    assert ck2.chat_template == "{{ messages }}"


def test_hf_pytorch_bin_weights_only(make_checkpoint):
    from safetensors.torch import load_file
    path, model = make_checkpoint("hf", "tiny")
    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")
    ck = load_checkpoint(path)
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in ck.tensors.items())
    torch.save({**state, "evil": shutil.rmtree}, path / "pytorch_model.bin")  # arbitrary pickled code
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert_error(e, path / "pytorch_model.bin")


# ---------------------------------------------------------------- Meta

@pytest.mark.parametrize("preset", ["tiny", "tiny-tied"])
def test_meta_one_and_two_shards_same_logits(make_checkpoint, preset):
    tokens = tiny_tokens()
    p1, model = make_checkpoint("meta", preset, shards=1)
    p2, _ = make_checkpoint("meta", preset, shards=2)
    assert len(list(p2.glob("consolidated.*.pth"))) == 2
    shard = torch.load(p2 / "consolidated.01.pth", weights_only=True)
    assert shard["layers.0.attention.wo.weight"].shape == (64, 32)  # row-parallel: split on dim 1
    assert shard["layers.0.attention.wk.weight"].shape == (16, 64)  # column-parallel: split on dim 0
    a, b = meta.read(p1), meta.read(p2)
    assert a.metadata["shards"] == 1 and b.metadata["shards"] == 2
    for name, t in model.state_dict().items():
        if name == "output.weight" and model.args.tie_embeddings:
            continue
        assert torch.equal(a.tensors[name], t) and torch.equal(b.tensors[name], t), name
    with torch.no_grad():
        ref = model(tokens)
    assert torch.equal(logits_of(a, tokens), ref) and torch.equal(logits_of(b, tokens), ref)


def test_meta_vocab_from_embedding_and_license(make_checkpoint):
    path, model = make_checkpoint("meta", "tiny", shards=2)
    params = json.loads((path / "params.json").read_text())
    params["vocab_size"] = -1  # what Llama 2 downloads carry
    (path / "params.json").write_text(json.dumps(params))
    (path.parent / "LICENSE").write_text("LLAMA 2 COMMUNITY LICENSE AGREEMENT\nLlama 2 Version Release Date...")
    ck = load_checkpoint(path)
    assert ck.format == "meta" and ck.args.vocab_size == 256 and ck.license == "llama2"


# ---------------------------------------------------------------- GGUF

GGUF_TYPES = {"f32": ("F32", 0.0), "f16": ("F16", 2e-3), "bf16": ("BF16", 2e-2),
              "q8_0": ("Q8_0", 2e-2), "q4_0": ("Q4_0", 0.2), "q4_1": ("Q4_1", 0.2)}


@pytest.mark.parametrize("qtype", list(GGUF_TYPES))
def test_gguf_write_read(make_checkpoint, qtype):
    import gguf as gguf_pkg
    path, model = make_checkpoint("gguf", "tiny", qtype=qtype, chat_template="T", metadata={"license": "mit"})
    reader = gguf_pkg.GGUFReader(path)  # the reference reader accepts our file
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    want, rel_tol = GGUF_TYPES[qtype]
    assert types["blk.0.attn_q.weight"] == want and types["blk.0.attn_norm.weight"] == "F32"
    if qtype in ("q4_0", "q4_1"):  # llama.cpp keeps the output projection at higher precision
        assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == want
    assert not list(path.parent.glob(".*.tmp"))  # atomic write left no temporary file
    ck = gguf.read(path)
    assert same_args(ck.args, model.args) and ck.license == "mit" and ck.chat_template == "T"
    assert ck.metadata["tensor_types"][want] > 0 and "llama.block_count" in ck.metadata["gguf_kv"]
    for name, t in model.state_dict().items():
        got = ck.tensors[name]
        assert got.dtype == torch.float32 and got.shape == t.shape, name
        err = ((got - t).norm() / t.norm()).item()
        assert err <= rel_tol if rel_tol else torch.equal(got, t), (name, err)


def test_gguf_packed_qtensors_and_lossless_rewrite(make_checkpoint, tmp_path):
    path, model = make_checkpoint("gguf", "tiny-tied", qtype="q4_1")
    packed = gguf.read(path, dequantize=False)
    full = gguf.read(path)
    q = packed.tensors["layers.0.feed_forward.w2.weight"]
    assert isinstance(q, QTensor) and q.qtype == "Q4_1" and q.shape == (64, 192)
    assert isinstance(q.data, np.memmap) and q.data.dtype == np.uint8  # a view of the file, no copy
    assert torch.equal(q.dequantize(), full.tensors["layers.0.feed_forward.w2.weight"])
    assert packed.tensors["tok_embeddings.weight"].qtype == "Q8_0"  # tied: it is also the output
    assert packed.tensors["norm.weight"].dtype == torch.float32
    out = gguf.write(tmp_path / "copy.gguf", packed, qtype="q4_1")
    again = gguf.read(out, dequantize=False)
    assert np.array_equal(np.asarray(again.tensors["layers.1.attention.wq.weight"].data),
                          np.asarray(packed.tensors["layers.1.attention.wq.weight"].data))


def test_gguf_vocab_only(tmp_path, tiny_sp_model):
    import gguf as gguf_pkg
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tiny_sp_model))
    path = tmp_path / "vocab.gguf"
    w = gguf_pkg.GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(sp.vocab_size())])
    w.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())])
    w.add_token_types([2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 1 for i in range(sp.vocab_size())])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ck = load_checkpoint(path)
    assert ck.args is None and ck.tensors == {} and ck.format == "gguf"
    assert "tokenizer.ggml.tokens" not in ck.metadata["gguf_kv"]
    if has_tokenizer_module():
        assert ck.tokenizer is not None and ck.tokenizer.vocab_size == 256


# Scalar transcriptions of ggml's dequantize_row_* (ggml-quants.c), one block at a time, to check
# that gguf-py's vectorised numpy dequantizers (which the reader relies on) decode the same values.

def _f16(b, off):
    return float(np.frombuffer(bytes(b[off:off + 2]), dtype=np.float16)[0])


def _scale_min_k4(j, q):
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def _ref_block(qtype, b):
    b = [int(x) for x in b]
    y = [0.0] * (32 if qtype in ("Q8_0", "Q4_0", "Q4_1") else 256)
    if qtype == "Q8_0":
        d = _f16(b, 0)
        return [d * (v - 256 if v > 127 else v) for v in b[2:34]]
    if qtype in ("Q4_0", "Q4_1"):
        d = _f16(b, 0)
        m, qs = (_f16(b, 2), b[4:20]) if qtype == "Q4_1" else (None, b[2:18])
        for j in range(16):
            lo, hi = qs[j] & 0xF, qs[j] >> 4
            y[j], y[j + 16] = ((lo - 8) * d, (hi - 8) * d) if m is None else (lo * d + m, hi * d + m)
        return y
    if qtype in ("Q4_K", "Q5_K"):
        d, dmin, sc = _f16(b, 0), _f16(b, 2), b[4:16]
        qh, ql = (b[16:48], b[48:176]) if qtype == "Q5_K" else (None, b[16:144])
        i = 0
        for n, j in enumerate(range(0, 256, 64)):
            s1, m1 = _scale_min_k4(2 * n, sc)
            s2, m2 = _scale_min_k4(2 * n + 1, sc)
            q = ql[32 * n: 32 * n + 32]
            for half, (s, m) in enumerate(((s1, m1), (s2, m2))):
                for l in range(32):
                    v = (q[l] & 0xF) if half == 0 else (q[l] >> 4)
                    if qh is not None and qh[l] & (1 << (2 * n + half)):
                        v += 16
                    y[i] = d * s * v - dmin * m
                    i += 1
        return y
    if qtype == "Q6_K":
        ql, qh, sc, d = b[0:128], b[128:192], [v - 256 if v > 127 else v for v in b[192:208]], _f16(b, 208)
        for n in range(2):
            L, H, S = ql[64 * n:], qh[32 * n:], sc[8 * n:]
            for l in range(32):
                i = l // 16
                q1 = ((L[l] & 0xF) | (((H[l] >> 0) & 3) << 4)) - 32
                q2 = ((L[l + 32] & 0xF) | (((H[l] >> 2) & 3) << 4)) - 32
                q3 = ((L[l] >> 4) | (((H[l] >> 4) & 3) << 4)) - 32
                q4 = ((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)) - 32
                base = 128 * n + l
                y[base], y[base + 32] = d * S[i] * q1, d * S[i + 2] * q2
                y[base + 64], y[base + 96] = d * S[i + 4] * q3, d * S[i + 6] * q4
        return y
    raise AssertionError(qtype)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"])
def test_block_dequantization_matches_ggml(qtype):
    from llamaforge.quant.gguf_blocks import block_sizes
    bs, ts = block_sizes(qtype)
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(3, ts), dtype=np.uint8)
    halves = {"Q6_K": [208], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q4_1": [0, 2]}.get(qtype, [0])
    for off in halves:  # random bytes could be NaN/inf halves: put sane scales there
        blocks[:, off:off + 2] = np.frombuffer(np.array(rng.uniform(0.01, 0.1, 3), np.float16).tobytes(),
                                               np.uint8).reshape(3, 2)
    q = QTensor(blocks.reshape(1, -1), qtype, (1, 3 * bs))
    got = q.dequantize().numpy().reshape(3, bs)
    want = np.array([_ref_block(qtype, blk) for blk in blocks], dtype=np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_bundled_gguf_matches_transformers(bundled_gguf, monkeypatch):
    """Our GGUF reading (no q/k permutation) agrees with transformers' GGUF loader (which permutes for HF)."""
    import functools

    import gguf as gguf_pkg
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llamaforge.config import to_hf_config
    # transformers rebuilds the same tensor-name map once per module (~400 times, ~12 s): cache it
    monkeypatch.setattr(gguf_pkg, "get_tensor_name_map", functools.lru_cache(gguf_pkg.get_tensor_name_map))
    tokens = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 30]])
    ck = load_checkpoint(bundled_gguf)
    a = ck.args
    assert (a.dim, a.n_layers, a.n_heads, a.kv_heads, a.ffn_hidden, a.vocab_size) == (576, 30, 9, 3, 1536, 49152)
    assert a.tie_embeddings and a.rope_theta == 100000.0 and a.norm_eps == 1e-5 and ck.license == "apache-2.0"
    assert ck.metadata["tensor_types"] == {"Q8_0": 1, "Q4_1": 210, "F32": 61}
    assert ck.chat_template and "<|im_start|>" in ck.chat_template
    ours = logits_of(ck, tokens)
    del ck
    # passing the config skips a second full parse of the file; the weights still go through
    # transformers' own reader, dequantizer and q/k un-permutation
    ref = AutoModelForCausalLM.from_pretrained(bundled_gguf.parent, gguf_file=bundled_gguf.name,
                                               config=LlamaConfig(**to_hf_config(a)), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(tokens).logits
    assert (ours - theirs).abs().max().item() <= 1e-3


def test_parser_agrees_with_gguf_reader(make_checkpoint, tiny_sp_model):
    import gguf as gguf_pkg
    tok = None
    if has_tokenizer_module():  # brings string, float and int arrays, bools and ids into the header
        from llamaforge.tokenizer import Tokenizer
        tok = Tokenizer.load(tiny_sp_model)
    path, _ = make_checkpoint("gguf", "tiny", tokenizer=tok, qtype="q4_1", chat_template="{{ x }}")
    version, kv, infos = gguf.parse(path)
    ref = gguf_pkg.GGUFReader(path)
    ref_kv = {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert version == 3 and list(kv) == list(ref_kv)
    for k, v in ref_kv.items():
        assert kv[k] == (pytest.approx(v, rel=1e-6) if isinstance(v, float) else v), k
    assert len(infos) == len(ref.tensors)
    for a, b in zip(infos, ref.tensors):
        assert (a.name, a.qtype, a.offset, a.nbytes) == (b.name, b.tensor_type.name, b.data_offset, b.n_bytes)
        assert a.data.shape == b.data.shape and np.array_equal(a.data, b.data), a.name


def test_bundled_gguf_packed(bundled_gguf):
    ck = load_checkpoint(bundled_gguf, dequantize=False)
    q = ck.tensors["layers.3.attention.wk.weight"]
    assert isinstance(q, QTensor) and q.qtype == "Q4_1" and q.shape == (192, 576)
    assert ck.tensors["tok_embeddings.weight"].qtype == "Q8_0"
    w = q.dequantize()
    assert w.shape == (192, 576) and torch.isfinite(w).all() and w.abs().max() > 0


@pytest.mark.skipif(not has_tokenizer_module(), reason="llamaforge.tokenizer not there yet")
@pytest.mark.parametrize("fmt", ["meta", "hf", "gguf"])
def test_tokenizer_round_trip(make_checkpoint, tiny_tokenizer, fmt):
    path, _ = make_checkpoint(fmt, "tiny", tokenizer=tiny_tokenizer, chat_template="{{ x }}")
    ck = load_checkpoint(path)
    assert ck.tokenizer is not None and ck.tokenizer.vocab_size == tiny_tokenizer.vocab_size
    assert (ck.tokenizer.bos_id, ck.tokenizer.eos_id) == (tiny_tokenizer.bos_id, tiny_tokenizer.eos_id)
    assert ck.chat_template == "{{ x }}"


def test_progress_bars(make_checkpoint, capsys):
    for fmt, kw in (("meta", {"shards": 2}), ("hf", {"max_shard_size": "60KB"}), ("gguf", {"qtype": "q8_0"})):
        path, _ = make_checkpoint(fmt, "tiny", **kw)
        assert load_checkpoint(path, progress=True).args.dim == 64
    assert "tensor" in capsys.readouterr().err  # tqdm writes to stderr


# ---------------------------------------------------------------- bad input

def test_truncated_gguf(make_checkpoint):
    path, _ = make_checkpoint("gguf", "tiny", qtype="q8_0")
    data = path.read_bytes()
    for cut in (len(data) // 2, 100, 10):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        assert_error(e, path)


def test_meta_missing_params_and_shards(make_checkpoint):
    path, _ = make_checkpoint("meta", "tiny", shards=4)
    (path / "consolidated.01.pth").unlink()
    with pytest.raises(CheckpointError, match="missing shard.*consolidated.01.pth") as e:
        load_checkpoint(path)
    assert_error(e, path)
    shutil.copy(path / "consolidated.00.pth", path / "consolidated.01.pth")
    (path / "consolidated.03.pth").unlink()  # the last shard gone: only the shapes tell
    with pytest.raises(CheckpointError, match="shape mismatch") as e:
        load_checkpoint(path)
    assert_error(e, path)
    (path / "params.json").unlink()
    with pytest.raises(CheckpointError, match="params.json") as e:
        load_checkpoint(path)
    assert_error(e, path)


def test_hf_missing_config_and_shard(make_checkpoint):
    path, _ = make_checkpoint("hf", "tiny", max_shard_size="60KB")
    next(path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing shard") as e:
        load_checkpoint(path)
    assert_error(e, path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json") as e:
        hf.read(path)
    assert_error(e, path)


def test_corrupted_safetensors(make_checkpoint):
    path, _ = make_checkpoint("hf", "tiny")
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"#garbage!#{]"  # inside the JSON header
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted") as e:
        load_checkpoint(path)
    assert_error(e, f)


def test_unsupported_tensor_type(make_checkpoint, tmp_path):
    import gguf as gguf_pkg
    src, model = make_checkpoint("gguf", "tiny", qtype="f32")
    reader = gguf_pkg.GGUFReader(src)
    path = tmp_path / "bad-type.gguf"
    w = gguf_pkg.GGUFWriter(path, "llama")
    for k, field in reader.fields.items():
        if not k.startswith("GGUF.") and k != "general.architecture":
            sub = field.types[-1] if len(field.types) > 1 else None
            w.add_key_value(k, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        arr = np.asarray(t.data)
        if t.name == "blk.1.ffn_norm.weight":
            arr = np.zeros(arr.shape, dtype=np.int32)
        w.add_tensor(t.name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="blk.1.ffn_norm.weight.*I32") as e:
        load_checkpoint(path)
    assert_error(e, path)


def test_wrong_architecture(make_checkpoint, tmp_path):
    import gguf as gguf_pkg
    path = tmp_path / "gpt2.gguf"
    w = gguf_pkg.GGUFWriter(path, "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="architecture 'gpt2'") as e:
        load_checkpoint(path)
    assert_error(e, path)
    folder, _ = make_checkpoint("hf", "tiny")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="gpt2") as e:
        load_checkpoint(folder)
    assert_error(e, folder / "config.json")


def test_shape_mismatch_vs_config(make_checkpoint):
    folder, _ = make_checkpoint("hf", "tiny")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape mismatch.*feed_forward") as e:
        load_checkpoint(folder)
    assert_error(e, folder)
    mfolder, _ = make_checkpoint("meta", "tiny")
    params = json.loads((mfolder / "params.json").read_text())
    params["n_kv_heads"] = 4
    (mfolder / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match="shape mismatch.*attention.wk") as e:
        load_checkpoint(mfolder)
    assert_error(e, mfolder)


def test_writer_rejects_mismatched_tensors(tmp_path):
    model = tiny_model("tiny")
    tensors = model.state_dict()
    with pytest.raises(CheckpointError, match="shape mismatch"):
        gguf.write(tmp_path / "x.gguf", PRESETS["tiny-mha"], tensors, qtype="f32")
    assert not list(tmp_path.iterdir())
