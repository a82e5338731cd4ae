"""Malformed and hostile checkpoint files (issue 14 item 8): every one gives a one-line CheckpointError
naming the file, quickly and without large allocations, never a raw ValueError, RecursionError,
MemoryError or ZeroDivisionError. The cases load in one child process whose address space is capped
at 1 GiB above what its imports took, so a loader that allocates before validating fails its case
instead of swapping the machine.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_sp_model, tiny_model
from llamaforge.formats import gguf, hf, meta
from llamaforge.tokenizer import Tokenizer

SRC = str(Path(__file__).resolve().parents[1] / "src")
CASE_SECONDS = 10.0   # a hang guard, far above what any of these takes

# ---------------------------------------------------------------- hand-made GGUF bytes

U32, F32, STR, ARR, U64 = 4, 6, 8, 9, 10


def _s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _u32(key: str, v: int) -> bytes:
    return _kv(key, U32, struct.pack("<I", v))


LLAMA_KV = {"general.architecture": _kv("general.architecture", STR, _s("llama")),
            "llama.embedding_length": _u32("llama.embedding_length", 64),
            "llama.block_count": _u32("llama.block_count", 2),
            "llama.attention.head_count": _u32("llama.attention.head_count", 4),
            "llama.feed_forward_length": _u32("llama.feed_forward_length", 192),
            "llama.vocab_size": _u32("llama.vocab_size", 256)}


def _tensor_info(name: str, dims: list[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    return _s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + \
        struct.pack("<IQ", ggml_type, offset)


def gguf_bytes(kvs: list[bytes], infos: list[bytes] | None = None, n_kv: int | None = None,
               n_tensors: int | None = None, data: bytes = b"\0" * 64) -> bytes:
    infos = [_tensor_info("token_embd.weight", [8])] if infos is None else infos
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    return body + b"\0" * (-len(body) % 32) + data


def llama_kvs(**override: bytes) -> list[bytes]:
    return list({**LLAMA_KV, **override}.values())


def nested_array(depth: int) -> bytes:
    out = struct.pack("<IQ", U32, 1) + struct.pack("<I", 7)
    for _ in range(depth):
        out = struct.pack("<IQ", ARR, 1) + out
    return out


GGUF_CASES = {
    "empty file": b"",
    "magic only": b"GGUF",
    "version 7": b"GGUF" + struct.pack("<IQQ", 7, 0, 0),
    "n_kv 2^63": gguf_bytes([], n_kv=2**63),
    "n_tensors 2^63": gguf_bytes(llama_kvs(), n_tensors=2**63),
    "key length 2^63": b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**63) + b"k" * 64,
    "string value 2^62 bytes": gguf_bytes([_kv("general.name", STR, struct.pack("<Q", 2**62) + b"x" * 16)]),
    "array of 2^60 u32": gguf_bytes([_kv("x.arr", ARR, struct.pack("<IQ", U32, 2**60))]),
    "array of 2^60 strings": gguf_bytes([_kv("x.arr", ARR, struct.pack("<IQ", STR, 2**60))]),
    "5000-deep nested arrays": gguf_bytes([_kv("x.nested", ARR, nested_array(5000))]),
    "unknown value type": gguf_bytes([_kv("x.k", 99, b"\0" * 8)]),
    "duplicate key": gguf_bytes([_u32("x.k", 1), _u32("x.k", 2)]),
    "invalid utf-8 key": gguf_bytes([_s(b"\xff\xfe") + struct.pack("<II", U32, 1)]),
    "alignment 3": gguf_bytes(llama_kvs() + [_u32("general.alignment", 3)]),
    "n_dims 1000": gguf_bytes(llama_kvs(), [_tensor_info("token_embd.weight", [1] * 1000)]),
    "n_dims 2^32-1": gguf_bytes(llama_kvs(), [_s("token_embd.weight") + struct.pack("<I", 2**32 - 1)]),
    "tensor of 2^60 elements": gguf_bytes(llama_kvs(), [_tensor_info("token_embd.weight", [2**30, 2**30])]),
    "tensor past the end": gguf_bytes(llama_kvs(), [_tensor_info("token_embd.weight", [8], offset=2**40)]),
    "unknown ggml type": gguf_bytes(llama_kvs(), [_tensor_info("token_embd.weight", [8], ggml_type=77)]),
    "duplicate tensor name": gguf_bytes(llama_kvs(), [_tensor_info("token_embd.weight", [8])] * 2),
    "block_count 1e9": gguf_bytes(llama_kvs(**{"llama.block_count": _u32("llama.block_count", 10**9)})),
    "head_count 0": gguf_bytes(llama_kvs(**{"llama.attention.head_count": _u32("llama.attention.head_count", 0)})),
    "head_count_kv 3": gguf_bytes(llama_kvs() + [_u32("llama.attention.head_count_kv", 3)]),
    "embedding_length a string": gguf_bytes(llama_kvs(**{"llama.embedding_length":
                                                         _kv("llama.embedding_length", STR, _s("64"))})),
    "rope theta nan": gguf_bytes(llama_kvs() + [_kv("llama.rope.freq_base", F32, struct.pack("<f", float("nan")))]),
    "context_length 2^40": gguf_bytes(llama_kvs() + [_kv("llama.context_length", U64, struct.pack("<Q", 2**40))]),
    "chat template a number": gguf_bytes(llama_kvs() + [_u32("tokenizer.chat_template", 5)]),
    "tokenizer tokens not strings": gguf_bytes(llama_kvs() + [
        _kv("tokenizer.ggml.model", STR, _s("llama")),
        _kv("tokenizer.ggml.tokens", ARR, struct.pack("<IQ", U32, 3) + struct.pack("<3I", 1, 2, 3)),
        _kv("tokenizer.ggml.scores", ARR, struct.pack("<IQ", F32, 1) + struct.pack("<f", 0))]),
    "tokenizer model unknown": gguf_bytes(llama_kvs() + [
        _kv("tokenizer.ggml.model", STR, _s("klingon")),
        _kv("tokenizer.ggml.tokens", ARR, struct.pack("<IQ", STR, 1) + _s("a"))]),
}

# a real tiny GGUF written by formats.gguf (with a tokenizer), cut at these fractions of its size:
# inside the header, the metadata, the tensor infos and the tensor data
CUTS = (0.001, 0.01, 0.05, 0.2, 0.5, 0.9, 0.999)

# ---------------------------------------------------------------- Meta and Hugging Face folders

GOOD_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256, "multiple_of": 32,
               "norm_eps": 1e-5, "rope_theta": 10000.0, "max_seq_len": 128}


def _json(p: Path, value) -> None:
    p.write_text(value if isinstance(value, str) else json.dumps(value), encoding="utf-8")


class Payload:
    """Unpickling this runs a shell command (what a hostile checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickle_payload(marker: Path) -> bytes:
    """A legacy (non-zip) pickle stream whose loading with weights_only=False would create ``marker``."""
    return pickle.dumps({"tok_embeddings.weight": Payload(marker)})


def _meta_cases(make, tmp: Path) -> dict[str, Path]:
    cases: dict[str, tuple] = {
        "params n_layers 1e9": ("params.json", {**GOOD_PARAMS, "n_layers": 1e9}),
        "params n_heads 0": ("params.json", {**GOOD_PARAMS, "n_heads": 0}),
        "params n_kv_heads 3": ("params.json", {**GOOD_PARAMS, "n_kv_heads": 3}),
        "params dim a string": ("params.json", {**GOOD_PARAMS, "dim": "sixty-four"}),
        "params dim 1.5": ("params.json", {**GOOD_PARAMS, "dim": 1.5}),
        "params dim true": ("params.json", {**GOOD_PARAMS, "dim": True}),
        "params dim -64": ("params.json", {**GOOD_PARAMS, "dim": -64}),
        "params dim 2^70": ("params.json", {**GOOD_PARAMS, "dim": 2**70}),
        "params rope_theta NaN": ("params.json", '{"dim": 64, "n_layers": 2, "n_heads": 4, "rope_theta": NaN}'),
        "params norm_eps inf": ("params.json", '{"dim": 64, "n_layers": 2, "n_heads": 4, "norm_eps": Infinity}'),
        "params max_seq_len 1e12": ("params.json", {**GOOD_PARAMS, "max_seq_len": 1e12}),
        "params head_dim odd": ("params.json", {**GOOD_PARAMS, "dim": 60, "n_heads": 4}),
        "params missing dim": ("params.json", {k: v for k, v in GOOD_PARAMS.items() if k != "dim"}),
        "params a list": ("params.json", [1, 2, 3]),
        "params not json": ("params.json", "{dim: 64"),
        "params 5000-deep": ("params.json", "[" * 5000 + "]" * 5000),
        "params not utf-8": ("params.json", None),
        "shard truncated": ("consolidated.00.pth", "truncate"),
        "shard garbage": ("consolidated.00.pth", b"PK\x03\x04 not really a zip"),
        "shard a list of tensors": ("consolidated.00.pth", [torch.zeros(2)]),
        "shard int tensors": ("consolidated.00.pth", "int"),
        "shard missing a tensor": ("consolidated.00.pth", "drop"),
        "shard pickle payload": ("consolidated.00.pth", "payload"),
        "tokenizer.model garbage": ("tokenizer.model", b"\x08\x96\x01 not a sentencepiece model"),
        "chat_template.jinja not utf-8": ("chat_template.jinja", b"\xff\xfe{{"),
    }
    out = {}
    for i, (name, (fname, content)) in enumerate(cases.items()):
        path, _ = make("meta", "tiny")
        folder = tmp / f"meta-{i}"
        shutil.move(path, folder)
        f = folder / fname
        if content is None:
            f.write_bytes(b'{"dim": \xff\xfe}')
        elif content == "truncate":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        elif content in ("int", "drop"):
            state = torch.load(f, weights_only=True)
            if content == "int":
                state["norm.weight"] = state["norm.weight"].to(torch.int32)
            else:
                del state["layers.1.feed_forward.w2.weight"]
            torch.save(state, f)
        elif content == "payload":  # torch.save's zip format, whose pickle names os.system
            torch.save({"tok_embeddings.weight": Payload(tmp / "PAYLOAD_RAN")}, f)
        elif isinstance(content, list) and content and isinstance(content[0], torch.Tensor):
            torch.save(content, f)
        elif isinstance(content, bytes):
            f.write_bytes(content)
        else:
            _json(f, content)
        out["meta: " + name] = folder
    return out


def _hf_cases(make, tmp: Path, sp_model: Path) -> dict[str, Path]:
    def cfg_with(**kw):
        return lambda folder: _json(folder / "config.json", {**json.loads((folder / "config.json").read_text()), **kw})

    def write(fname, content):
        def go(folder):
            (folder / fname).write_bytes(content) if isinstance(content, bytes) else _json(folder / fname, content)
        return go

    def safetensors_header(n: int):
        return write("model.safetensors", struct.pack("<Q", n) + b"{}")

    def index(weight_map):
        def go(folder):
            _json(folder / "model.safetensors.index.json", {"weight_map": weight_map})
        return go

    def truncate(folder):
        f = folder / "model.safetensors"
        f.write_bytes(f.read_bytes()[:1000])

    def int_safetensors(folder):
        from safetensors.torch import load_file, save_file
        state = load_file(folder / "model.safetensors")
        state["model.norm.weight"] = state["model.norm.weight"].to(torch.int64)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})

    def bin_payload(folder):
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(_pickle_payload(tmp / "PAYLOAD_RAN"))

    cases = {
        "config num_hidden_layers 1e9": cfg_with(num_hidden_layers=1e9),
        "config num_attention_heads 0": cfg_with(num_attention_heads=0),
        "config num_key_value_heads 3": cfg_with(num_key_value_heads=3),
        "config vocab_size 2^40": cfg_with(vocab_size=2**40),
        "config intermediate_size 0": cfg_with(intermediate_size=0),
        "config hidden_size a list": cfg_with(hidden_size=[64]),
        "config head_dim differs": cfg_with(head_dim=32),
        "config rope_scaling a string": cfg_with(rope_scaling="yarn"),
        "config rope_parameters a list": cfg_with(rope_theta=None, rope_parameters=[1]),
        "config an array": write("config.json", [1]),
        "config not json": write("config.json", b"{'hidden_size': 64"),
        "config 5000-deep": write("config.json", b"[" * 5000 + b"]" * 5000),
        "config not utf-8": write("config.json", b"\xff\xfe\x00{"),
        "safetensors truncated": truncate,
        "safetensors header 2^63": safetensors_header(2**63),
        "safetensors header not json": write("model.safetensors", struct.pack("<Q", 8) + b"not json"),
        "safetensors int tensor": int_safetensors,
        "index weight_map a list": index(["model.safetensors"]),
        "index shard outside the folder": index({"model.norm.weight": "../../etc/passwd"}),
        "index shard a number": index({"model.norm.weight": 7}),
        "index missing shard": index({"model.norm.weight": "model-00002-of-00002.safetensors"}),
        "pytorch_model.bin pickle payload": bin_payload,
        "tokenizer_config not json": write("tokenizer_config.json", b"{bos_token"),
        "tokenizer_config chat_template a number": write("tokenizer_config.json", {"chat_template": 5}),
        "tokenizer.json garbage": write("tokenizer.json", b"{\"model\": 5}"),
    }
    out = {}
    for i, (name, mutate) in enumerate(cases.items()):
        path, _ = make("hf", "tiny")
        folder = tmp / f"hf-{i}"
        shutil.move(path, folder)
        if "tokenizer" in name:
            shutil.copy(sp_model, folder / "tokenizer.model")
            if name.startswith("tokenizer.json"):
                (folder / "tokenizer.model").unlink()
        mutate(folder)
        out["hf: " + name] = folder
    return out


CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from llamaforge.formats import load_checkpoint
    from llamaforge.formats import CheckpointError
    vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
    out = {}
    for case, path in json.loads(sys.argv[1]).items():
        t = time.monotonic()
        try:
            load_checkpoint(path, dequantize=False)
            out[case] = ["loaded", "", 0.0]
        except BaseException as e:
            kind = "CheckpointError" if isinstance(e, CheckpointError) else type(e).__name__
            out[case] = [kind, str(e), time.monotonic() - t]
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """{case: (exception kind, message, seconds, path)} from loading every hostile file in a child."""
    tmp = tmp_path_factory.mktemp("hostile")
    made = tmp / "made"
    made.mkdir()
    counter = iter(range(10**6))

    def make(fmt, preset):
        model = tiny_model(preset, 0)
        out = made / f"{fmt}-{next(counter)}"
        writer = {"meta": meta.write, "hf": hf.write}[fmt]
        writer(out, model.args, model.state_dict(), tokenizer=None)
        return out, model

    sp_model = build_sp_model(tmp / "sp.model")
    cases: dict[str, Path] = {}
    for i, (name, data) in enumerate(GGUF_CASES.items()):
        p = tmp / f"case-{i}.gguf"
        p.write_bytes(data)
        cases["gguf: " + name] = p
    real = tmp / "real.gguf"
    model = tiny_model("tiny", 0)
    tok = Tokenizer.load(sp_model)
    gguf.write(real, model.args, model.state_dict(), tokenizer=tok, qtype="q8_0")
    data = real.read_bytes()
    for cut in CUTS:
        p = tmp / f"cut-{cut}.gguf"
        p.write_bytes(data[:max(4, int(len(data) * cut))])
        cases[f"gguf: real file cut at {cut:.1%}"] = p
    cases.update(_meta_cases(make, tmp))
    cases.update(_hf_cases(make, tmp, sp_model))
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps({k: str(v) for k, v in cases.items()})],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not (tmp / "PAYLOAD_RAN").exists(), "a pickle payload ran while loading"
    return {k: (*results[k], cases[k]) for k in cases}


ALL_CASES = (["gguf: " + n for n in GGUF_CASES] + [f"gguf: real file cut at {c:.1%}" for c in CUTS] +
             ["meta: " + n for n in ("params n_layers 1e9", "params n_heads 0", "params n_kv_heads 3",
                                     "params dim a string", "params dim 1.5", "params dim true", "params dim -64",
                                     "params dim 2^70", "params rope_theta NaN", "params norm_eps inf",
                                     "params max_seq_len 1e12", "params head_dim odd", "params missing dim",
                                     "params a list", "params not json", "params 5000-deep", "params not utf-8",
                                     "shard truncated", "shard garbage", "shard a list of tensors",
                                     "shard int tensors", "shard missing a tensor", "shard pickle payload",
                                     "tokenizer.model garbage", "chat_template.jinja not utf-8")] +
             ["hf: " + n for n in ("config num_hidden_layers 1e9", "config num_attention_heads 0",
                                   "config num_key_value_heads 3", "config vocab_size 2^40",
                                   "config intermediate_size 0", "config hidden_size a list", "config head_dim differs",
                                   "config rope_scaling a string", "config rope_parameters a list", "config an array",
                                   "config not json", "config 5000-deep", "config not utf-8", "safetensors truncated",
                                   "safetensors header 2^63", "safetensors header not json", "safetensors int tensor",
                                   "index weight_map a list", "index shard outside the folder", "index shard a number",
                                   "index missing shard", "pytorch_model.bin pickle payload", "tokenizer_config not json",
                                   "tokenizer_config chat_template a number", "tokenizer.json garbage")])


@pytest.mark.parametrize("case", ALL_CASES)
def test_hostile_file_gives_one_line_checkpoint_error(hostile, case):
    kind, message, seconds, path = hostile[case]
    assert kind == "CheckpointError", f"{case}: {kind}: {message[:500]}"
    assert "\n" not in message and len(message) <= 600, message
    # the message starts with the file at fault: the GGUF itself, or the checkpoint folder or a file in it
    named = message.split(": ")[0]
    assert named == str(path) or named.startswith(str(path) + os.sep), (named, path)
    assert seconds < CASE_SECONDS, f"{case} took {seconds:.1f} s"


def test_every_case_is_listed():
    assert len(ALL_CASES) == len(set(ALL_CASES)) == len(GGUF_CASES) + len(CUTS) + 50


@pytest.mark.parametrize("key, value, fragment", [
    ("num_hidden_layers", 1e9, "num_hidden_layers"), ("num_attention_heads", 0, "num_attention_heads"),
])
def test_info_refuses_absurd_config_at_once(make_checkpoint, key, value, fragment):
    """`llamaforge info` on an absurd config.json: exit 2, one line naming the file and the key."""
    path, _ = make_checkpoint("hf", "tiny")
    cfg = json.loads((path / "config.json").read_text())
    cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "llamaforge", "info", str(path)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path / "config.json") in lines[0] and fragment in lines[0], proc.stderr


def test_model_args_bounds_are_checked_in_one_place():
    """Presets pass; each bound fails with a HyperparameterError naming the field (no ZeroDivisionError)."""
    from llamaforge.config import PRESETS, HyperparameterError, ModelArgs
    for args in PRESETS.values():
        assert ModelArgs(**args.to_dict()) == args
    base = PRESETS["tiny"].to_dict()
    for field, bad in [("n_heads", 0), ("n_layers", 10**9), ("dim", 0), ("n_kv_heads", 3), ("vocab_size", 0),
                       ("max_seq_len", 2**40), ("rope_theta", float("inf")), ("norm_eps", 0.0),
                       ("hidden_dim", 2**30), ("dim", True), ("multiple_of", 0), ("ffn_dim_multiplier", float("nan"))]:
        with pytest.raises(HyperparameterError) as e:
            ModelArgs(**{**base, field: bad})
        assert e.value.field in (field, "head_dim", "hidden_dim"), (field, e.value)
    big = {**base, "dim": 65536, "n_heads": 512, "n_layers": 1024, "hidden_dim": 1 << 20, "vocab_size": 1 << 22}
    with pytest.raises(HyperparameterError, match="parameters"):
        ModelArgs(**big)


def test_valid_gguf_bytes_builder_reads_back(tmp_path):
    """The hand-made GGUF bytes the cases mutate are a valid file to gguf-py (so each case breaks one thing)."""
    from gguf import GGUFReader
    p = tmp_path / "ok.gguf"
    p.write_bytes(gguf_bytes(llama_kvs(), data=np.arange(8, dtype=np.float32).tobytes()))
    reader = GGUFReader(p)
    assert int(reader.fields["llama.block_count"].parts[-1][0]) == 2
    assert reader.tensors[0].name == "token_embd.weight"
    assert np.array_equal(reader.tensors[0].data, np.arange(8, dtype=np.float32))
