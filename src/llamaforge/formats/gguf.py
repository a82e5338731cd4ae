"""GGUF files (llama.cpp): memory-mapped reading, dequantization and writing.

Headers are parsed by ``llamaforge.gguf_file.parse`` (cross-checked against ``gguf.GGUFReader`` in
the tests, which is ~40x slower on a 50k-token vocabulary); blocks are decoded by the ``gguf`` package's numpy
dequantizers and files written with ``gguf.GGUFWriter``.

llama.cpp's converter stores attn_q/attn_k rows in Meta's interleaved RoPE order (it undoes HF's
permutation), so tensors map to Meta names with no permutation. GGUF lists dimensions fastest-first
(ne0 = columns); the reader returns torch order [out, in].
"""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType, quants

from ..config import ModelArgs, from_gguf_kv
from ..fileio import atomic_write
from ..gguf_file import GGUFTensorInfo, parse
from ..quant import kquants
from ..quant.gguf_blocks import FLOAT_TYPES, QUANT_TYPES, QTensor, block_sizes
from ..quant.mixes import FILE_TYPES, tensor_type
from ..tokenizer import Tokenizer
from .checkpoint import Checkpoint, CheckpointError
from .common import TensorNames, as_float, chat_template_or_none, check_tensors, progress_iter, writer_inputs
from .gguf_vocab import padded_vocab_kv

__all__ = ["read", "write", "parse", "GGUFTensorInfo", "gguf_to_meta_name", "meta_to_gguf_name"]

log = logging.getLogger(__name__)

_NAMES = TensorNames("GGUF", {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
                              "output.weight": "output.weight"}, {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}, prefix="blk.")
gguf_to_meta_name = _NAMES.to_meta
meta_to_gguf_name = _NAMES.from_meta

# token arrays are huge; the tokenizer gets them, Checkpoint.metadata does not
_BIG_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")


# ---------------------------------------------------------------- reading

def _tokenizer(kv: dict[str, Any], path: Path) -> Tokenizer | None:
    if "tokenizer.ggml.model" not in kv:
        return None
    try:
        return Tokenizer.from_gguf(kv)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot build the tokenizer from its GGUF metadata: {e}") from e


def _to_torch(t: GGUFTensorInfo, dequantize: bool) -> torch.Tensor | QTensor:
    if t.qtype in ("F32", "F16"):
        out = torch.from_numpy(t.data)
        return out.float() if dequantize else out
    if t.qtype == "BF16":  # stored as raw bytes
        out = torch.from_numpy(t.data).view(torch.bfloat16).reshape(t.shape)
        return out.float() if dequantize else out
    if len(t.shape) != 2:  # QTensor is for matrices; anything else is simply dequantized
        return torch.from_numpy(quants.dequantize(t.data, GGMLQuantizationType[t.qtype])).reshape(t.shape)
    q = QTensor(t.data, t.qtype, t.shape)  # type: ignore[arg-type]
    return q.dequantize() if dequantize else q


def read(path: str | Path, *, dequantize: bool = True, progress: bool = False) -> Checkpoint:
    """Read a GGUF model (architecture ``llama``) or a vocabulary-only GGUF.

    dequantize=True: every tensor float32. dequantize=False: F32/F16/BF16 tensors as stored
    (zero-copy views of the mapped file), block-quantized ones as packed QTensor.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    version, kv, infos = parse(path)
    tokenizer = _tokenizer(kv, path)
    metadata = {"gguf_kv": {k: v for k, v in kv.items() if k not in _BIG_KEYS},
                "tensor_types": dict(Counter(t.qtype for t in infos)), "file_type": kv.get("general.file_type"),
                "name": kv.get("general.name"), "gguf_version": version}
    lic = kv.get("general.license")
    common = dict(tokenizer=tokenizer, chat_template=chat_template_or_none(kv.get("tokenizer.chat_template"), path),
                  license=lic if isinstance(lic, str) else None, format="gguf", path=path, metadata=metadata)
    if not infos:
        return Checkpoint(args=None, tensors={}, **common)

    arch = kv.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    supported = FLOAT_TYPES + QUANT_TYPES
    names: dict[str, GGUFTensorInfo] = {}
    for t in infos:
        if t.qtype not in supported:
            raise CheckpointError(f"{path}: tensor {t.name} has unsupported type {t.qtype} "
                                  f"(supported: {', '.join(supported)})")
        meta = gguf_to_meta_name(t.name)
        if meta is None:
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r} for a Llama model")
        names[meta] = t
    tokens = kv.get("tokenizer.ggml.tokens")
    try:
        args = from_gguf_kv(kv, vocab_size=len(tokens) if isinstance(tokens, list) and tokens else None, has_output="output.weight" in names)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid llama metadata: {e}") from e
    check_tensors(args, names, path)
    tensors = {name: _to_torch(names[name], dequantize)
               for name in progress_iter(list(names), progress, f"reading {path.name}")}
    return Checkpoint(args=args, tensors=tensors, **common)


# ---------------------------------------------------------------- writing

def _nbytes(shape: tuple[int, ...], target: str) -> int:
    bs, ts = block_sizes(target)
    return int(np.prod(shape)) // bs * ts


def _encode(value: Any, target: str) -> np.ndarray:
    """The bytes of one tensor in GGML type ``target`` (a QTensor already of that type is copied as is)."""
    if isinstance(value, QTensor) and value.qtype == target:
        return np.asarray(value.data)
    t = as_float(value).detach().cpu()
    if target == "F32":
        return t.to(torch.float32).contiguous().numpy()
    if target == "F16":
        return t.to(torch.float16).contiguous().numpy()
    if target == "BF16":
        return t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
    return kquants.quantize(t.to(torch.float32).numpy(), target)


def _add_kv(w, key: str, value: Any) -> None:
    """Add one metadata value with the GGUF type llama.cpp expects for it."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if not value:
            return  # GGUF cannot store empty arrays
        if key == "tokenizer.ggml.scores" or any(isinstance(v, float) for v in value):
            w.add_array(key, [float(v) for v in value])
        elif key == "tokenizer.ggml.token_type":
            w.add_array(key, [int(v) for v in value])
        else:
            w.add_array(key, list(value))
    elif isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        if value < 0:
            w.add_int32(key, value)
        elif value >= 2**32:
            w.add_uint64(key, value)
        else:
            w.add_key_value(key, value, GGUFValueType.UINT32)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        raise ValueError(f"cannot store metadata {key!r} of type {type(value).__name__} in GGUF")


def write(path: str | Path, args: ModelArgs | Checkpoint, tensors: dict[str, Any] | None = None,
          tokenizer: Any = None, chat_template: str | None = None, qtype: str = "f16",
          metadata: dict | None = None, *, progress: bool = False) -> Path:
    """Write a llama-architecture GGUF file atomically (temporary file, then rename).

    qtype: a file type of ``quant.mixes.FILE_TYPES`` (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1,
    q4_k_m, q5_k_m, q6_k); each tensor gets llama.cpp's type for it (``mixes.tensor_type``), quantized
    by ``quant.kquants``; a QTensor already of its target type is copied as is. Tensors are encoded
    and written one at a time.
    metadata: "name", "license", and any extra GGUF keys ("general.author": ...).
    """
    qtype = qtype.lower()
    if qtype not in FILE_TYPES:
        raise ValueError(f"qtype {qtype!r} not writable; choose one of {', '.join(FILE_TYPES)}")
    args, tensors, tokenizer, chat_template, metadata = writer_inputs(args, tensors, tokenizer, chat_template, metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok_kv = padded_vocab_kv(tokenizer, args.vocab_size) if tokenizer is not None else {}
    if tokenizer is None:
        log.warning("%s: written without a tokenizer; llama.cpp cannot load it", path)

    def _write(tmp: Path) -> None:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(str(metadata.get("name") or "llamaforge"))
        w.add_context_length(args.max_seq_len)
        w.add_embedding_length(args.dim)
        w.add_block_count(args.n_layers)
        w.add_feed_forward_length(args.ffn_hidden)
        w.add_rope_dimension_count(args.head_dim)
        w.add_head_count(args.n_heads)
        w.add_head_count_kv(args.kv_heads)
        w.add_layer_norm_rms_eps(args.norm_eps)
        w.add_rope_freq_base(args.rope_theta)
        w.add_vocab_size(args.vocab_size)
        w.add_file_type(int(gguf.LlamaFileType[FILE_TYPES[qtype][0]]))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if metadata.get("license"):
            w.add_license(str(metadata["license"]))
        written = {"general.architecture", "general.name", "general.file_type", "general.quantization_version",
                   "general.license", "general.alignment"}
        extra = {k: v for k, v in (metadata.get("gguf_kv") or {}).items() if k.startswith("general.")}
        extra.update({k: v for k, v in metadata.items() if "." in k})
        for key, value in {**extra, **tok_kv}.items():
            if key not in written and not key.startswith("GGUF."):
                _add_kv(w, key, value)
                written.add(key)
        if chat_template:
            w.add_chat_template(chat_template)
        # llama.cpp's tensor order: embeddings, blocks, final norm, output
        order = sorted(tensors, key=lambda n: (0, 0, n) if n == "tok_embeddings.weight" else
                       (1, int(n.split(".")[1]), n) if n.startswith("layers.") else (2, 0, n))
        # Stream: declare every tensor first, then encode and write one at a time, so a 7B model is
        # never in memory at once (values may be lazy: anything with .shape and .dequantize()).
        targets = {}
        for name in order:
            shape = tuple(int(d) for d in tensors[name].shape)
            targets[name] = tensor_type(meta_to_gguf_name(name), shape, qtype, args.n_layers, args.tie_embeddings)
            w.add_tensor_info(meta_to_gguf_name(name), shape, np.dtype(np.float32), _nbytes(shape, targets[name]),
                              raw_dtype=gguf.GGMLQuantizationType[targets[name]])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name in progress_iter(order, progress, f"writing {path.name}"):
            # pop: the writer's own dict, so each float copy can be freed once written
            w.write_tensor_data(_encode(tensors.pop(name), targets[name]))
        w.close()

    atomic_write(path, _write)
    return path
