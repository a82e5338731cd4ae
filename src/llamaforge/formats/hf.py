"""Hugging Face folders: ``config.json`` + safetensors (single or sharded with an index) + tokenizer.

transformers' convert_llama_weights_to_hf permutes the rows of q_proj/k_proj so that its
rotate_half RoPE (first half / second half of each head) equals Meta's interleaved-pair RoPE.
The reader undoes that permutation, the writer applies it, so tensors in a Checkpoint are always in
Meta's row order.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ModelArgs, from_hf_config, to_hf_config
from .checkpoint import Checkpoint, CheckpointError
from ..fileio import atomic_write, atomic_write_json, load_torch_file
from ..safety.license import declared_license, license_from_files
from .common import (TensorNames, chat_template_or_none, check_state_dict, check_tensors, drop_tied_output,
                     load_tokenizer, progress_iter, read_folder_config, read_json, read_text_if, writer_inputs)

log = logging.getLogger(__name__)

_NAMES = TensorNames("Hugging Face", {"model.embed_tokens.weight": "tok_embeddings.weight",
                                      "model.norm.weight": "norm.weight", "lm_head.weight": "output.weight"}, {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}, prefix="model.layers.")
hf_to_meta_name = _NAMES.to_meta
meta_to_hf_name = _NAMES.from_meta
_IGNORED_RE = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # old exports carry it


def permute_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta row order -> HF row order (what convert_llama_weights_to_hf does)."""
    d1, d2 = w.shape
    return w.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


def unpermute_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF row order -> Meta row order (inverse of permute_hf)."""
    d1, d2 = w.shape
    return w.view(n_heads, 2, d1 // n_heads // 2, d2).transpose(1, 2).reshape(d1, d2)


def _heads_of(name: str, args: ModelArgs) -> int | None:
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.kv_heads
    return None


# ---------------------------------------------------------------- reading

def _weight_files(folder: Path) -> tuple[list[Path], str]:
    """Weight files to read and their kind ('safetensors' or 'bin'); CheckpointError when missing."""
    for index_name, kind in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        index = folder / index_name
        if index.is_file():
            weight_map = read_json(index, "weight index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no weight_map object naming the shard files")
            names = list(dict.fromkeys(weight_map.values()))
            # shard names are plain file names in this folder, never a path that leaves it
            bad = [n for n in names if not isinstance(n, str) or Path(n).name != n or n in (".", "..")]
            if bad:
                raise CheckpointError(f"{index}: weight_map names {bad[0]!r}, not a file name in the folder")
            files = [folder / n for n in names]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index}: missing shard file(s) {', '.join(missing)}")
            return files, kind
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"], "safetensors"
    if (folder / "pytorch_model.bin").is_file():
        return [folder / "pytorch_model.bin"], "bin"
    raise CheckpointError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _read_file(f: Path, kind: str) -> dict[str, torch.Tensor]:
    if kind == "bin":
        return check_state_dict(load_torch_file(f, "bin weights", mmap=True), f)
    try:
        with safe_open(str(f), framework="pt") as sf:
            return {k: sf.get_tensor(k) for k in sf.keys()}
    except Exception as e:  # noqa: BLE001 - corrupted headers raise several exception types
        raise CheckpointError(f"{f}: cannot read safetensors weights (corrupted or truncated?): {e}") from e


def _chat_template(folder: Path) -> str | None:
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        tmpl = read_json(tc, "tokenizer_config.json").get("chat_template")
        if isinstance(tmpl, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
            tmpl = named.get("default") or next(iter(named.values()), None)
        if tmpl:
            return chat_template_or_none(tmpl, tc)
    return read_text_if(folder / "chat_template.jinja")


def _license(folder: Path, cfg: dict) -> str | None:
    return declared_license(folder, cfg) or license_from_files(folder)


def read(path: str | Path, *, progress: bool = False, dtype: torch.dtype | None = None) -> Checkpoint:
    """Read an HF Llama folder; tensors keep their stored dtype unless ``dtype`` is given."""
    folder, cfg_file, cfg = read_folder_config(path, "config.json", "Hugging Face model")
    try:
        args = from_hf_config(cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_file}: unsupported or invalid config: {e}") from e

    files, kind = _weight_files(folder)
    tensors: dict[str, torch.Tensor] = {}
    for f in progress_iter(files, progress and len(files) > 1, "files"):
        for name, t in _read_file(f, kind).items():
            if _IGNORED_RE.fullmatch(name):
                continue
            meta = hf_to_meta_name(name)
            if meta is None:
                raise CheckpointError(f"{f}: unexpected tensor {name!r} (not a plain Llama checkpoint?)")
            tensors[meta] = t
    drop_tied_output(args, tensors)
    check_tensors(args, tensors, folder)
    for name in progress_iter(list(tensors), progress, "tensors"):
        t, heads = tensors[name], _heads_of(name, args)
        if heads is not None:
            t = unpermute_hf(t, heads)
        tensors[name] = t.to(dtype) if dtype is not None else t

    tok_file = next((folder / f for f in ("tokenizer.model", "tokenizer.json") if (folder / f).is_file()), None)
    return Checkpoint(
        args=args, tensors=tensors, tokenizer=load_tokenizer(tok_file) if tok_file else None,
        chat_template=_chat_template(folder), license=_license(folder, cfg), format="hf", path=folder,
        metadata={"files": [f.name for f in files], "config": cfg,
                  "name": cfg.get("_name_or_path") or folder.name},
    )


# ---------------------------------------------------------------- writing

def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, re.I)
    if not m:
        raise ValueError(f"cannot parse size {size!r}")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * mult)


def write(path: str | Path, args: ModelArgs | Checkpoint, tensors: dict[str, Any] | None = None,
          tokenizer: Any = None, chat_template: str | None = None, metadata: dict | None = None, *,
          max_shard_size: int | str | None = None, dtype: torch.dtype | None = None,
          progress: bool = False) -> Path:
    """Write an HF folder that ``LlamaForCausalLM.from_pretrained`` loads.

    One ``model.safetensors``, or with ``max_shard_size`` (bytes or "5GB") numbered shards plus
    ``model.safetensors.index.json``. The chat template goes into tokenizer_config.json; a licence
    (``metadata["license"]``) into README.md front matter when there is no README yet.
    """

    args, tensors, tokenizer, chat_template, metadata = writer_inputs(args, tensors, tokenizer, chat_template, metadata, floats=True)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)

    out: dict[str, torch.Tensor] = {}
    for name in progress_iter(list(tensors), progress, "tensors"):
        t, heads = tensors[name], _heads_of(name, args)
        if dtype is not None:
            t = t.to(dtype)
        if heads is not None:
            t = permute_hf(t, heads)
        out[meta_to_hf_name(name)] = t.contiguous()
    dtypes = {t.dtype for t in out.values()}

    # group into shards (insertion order keeps a layer's tensors together)
    limit = _parse_size(max_shard_size) if max_shard_size is not None else None
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in out.items():
        nb = t.numel() * t.element_size()
        if limit is not None and groups[-1] and size + nb > limit:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += nb
    for old in list(folder.glob("model*.safetensors")) + list(folder.glob("model.safetensors.index.json")):
        old.unlink()
    st_meta = {"format": "pt"}  # transformers refuses safetensors without a known format
    if len(groups) == 1:
        atomic_write(folder / "model.safetensors", lambda p: save_file(groups[0], str(p), metadata=st_meta))
    else:
        n = len(groups)
        weight_map = {}
        for i, g in enumerate(groups):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            atomic_write(folder / fname, lambda p, g=g: save_file(g, str(p), metadata=st_meta))
            weight_map.update(dict.fromkeys(g, fname))
        total = sum(t.numel() * t.element_size() for t in out.values())
        atomic_write_json(folder / "model.safetensors.index.json",
                   {"metadata": {"total_size": total}, "weight_map": weight_map})

    bos = getattr(tokenizer, "bos_id", None)
    eos = getattr(tokenizer, "eos_id", None)
    cfg = to_hf_config(args, bos_id=bos if bos is not None and bos >= 0 else None,
                       eos_id=eos if eos is not None and eos >= 0 else None)
    if len(dtypes) == 1:
        cfg["torch_dtype"] = str(dtypes.pop()).removeprefix("torch.")
    atomic_write_json(folder / "config.json", cfg)

    if tokenizer is not None:
        tokenizer.save(folder)
    if chat_template:
        tc = folder / "tokenizer_config.json"
        tcfg = json.loads(tc.read_text(encoding="utf-8")) if tc.is_file() else {}
        tcfg["chat_template"] = chat_template
        atomic_write_json(tc, tcfg)
    lic = metadata.get("license")
    if lic and not (folder / "README.md").exists():
        atomic_write(folder / "README.md", lambda p: p.write_text(f"---\nlicense: {lic}\n---\n", encoding="utf-8"))
    return folder
