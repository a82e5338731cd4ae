"""Meta's original layout: ``params.json`` + ``consolidated.NN.pth`` shards + ``tokenizer.model``.

Model-parallel shards split each matrix the way the reference's fairscale layers do:
ColumnParallelLinear (wq, wk, wv, w1, w3, output) on dim 0, RowParallelLinear (wo, w2) on dim 1,
ParallelEmbedding (tok_embeddings) on dim 1; norms are replicated.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..config import ModelArgs, from_params_json, to_params_json
from ..fileio import atomic_write, atomic_write_json, load_torch_file
from ..safety.license import license_from_files
from .checkpoint import Checkpoint, CheckpointError
from .common import (check_state_dict, check_tensors, drop_tied_output, load_tokenizer, progress_iter,
                     read_folder_config, read_text_if, writer_inputs)

_DIM0 = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3", "output")
_DIM1 = ("attention.wo", "feed_forward.w2", "tok_embeddings")
_IGNORED = ("rope.freqs",)  # LLaMA-1 checkpoints carry the RoPE table; it is recomputed


# ---------------------------------------------------------------- Meta reader / writer

def _split_dim(name: str) -> int | None:
    """Shard dimension of a Meta tensor, None for replicated (1-D) ones."""
    base = name.rsplit(".weight", 1)[0]
    base = re.sub(r"^layers\.\d+\.", "", base)
    if base in _DIM0:
        return 0
    if base in _DIM1:
        return 1
    return None


def _shards(folder: Path) -> list[Path]:
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{folder}: no consolidated.NN.pth weight files")
    nums = []
    for f in files:
        m = re.fullmatch(r"consolidated\.(\d+)\.pth", f.name)
        if not m:
            raise CheckpointError(f"{f}: unexpected shard file name")
        nums.append(int(m.group(1)))
    nums, files = zip(*sorted(zip(nums, files)))
    missing = sorted(set(range(max(nums) + 1)) - set(nums))
    if missing:
        raise CheckpointError(f"{folder}: missing shard(s) " +
                              ", ".join(f"consolidated.{i:02d}.pth" for i in missing))
    return list(files)


def _params_args(pj: Path, params: Any, vocab_size: int | None) -> ModelArgs:
    try:
        return from_params_json(params, vocab_size=vocab_size)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{pj}: invalid params.json: {e}") from e


def read(path: str | Path, *, progress: bool = False, dtype: torch.dtype | None = None) -> Checkpoint:
    """Read a Meta folder; tensors keep their stored dtype unless ``dtype`` is given."""
    folder, pj, params = read_folder_config(path, "params.json", "Meta checkpoint")
    # the hyperparameters are checked before any shard is opened (the vocabulary size may still
    # have to come from the embedding: -1 in Llama 2 files)
    _params_args(pj, params, vocab_size=1)
    files = _shards(folder)

    states = []
    for f in progress_iter(files, progress and len(files) > 1, "shards"):
        states.append(check_state_dict(load_torch_file(f, "shard", mmap=True), f))
    names = [n for n in states[0] if n not in _IGNORED]
    for f, s in zip(files[1:], states[1:]):
        if set(n for n in s if n not in _IGNORED) != set(names):
            raise CheckpointError(f"{f}: holds different tensor names than {files[0].name}")

    tensors: dict[str, torch.Tensor] = {}
    for name in progress_iter(names, progress, "tensors"):
        parts = [s[name] for s in states]
        dim = _split_dim(name)
        try:
            t = parts[0] if len(parts) == 1 or dim is None or parts[0].ndim < 2 else torch.cat(parts, dim=dim)
        except RuntimeError as e:  # shards whose pieces do not line up
            raise CheckpointError(f"{folder}: cannot join the shards of {name}: {e}") from e
        tensors[name] = t.to(dtype) if dtype is not None else t

    emb = tensors.get("tok_embeddings.weight")
    args = _params_args(pj, params, vocab_size=None if emb is None or emb.ndim != 2 else int(emb.shape[0]))
    drop_tied_output(args, tensors)
    check_tensors(args, tensors, folder)

    tok_file = next((f for f in (folder / "tokenizer.model", folder.parent / "tokenizer.model",
                                 folder / "tokenizer.json") if f.is_file()), None)
    return Checkpoint(
        args=args, tensors=tensors, tokenizer=load_tokenizer(tok_file) if tok_file else None,
        chat_template=read_text_if(folder / "chat_template.jinja"),
        license=license_from_files(folder, folder.parent), format="meta", path=folder,
        metadata={"shards": len(files), "params": params},
    )


def write(path: str | Path, args: ModelArgs | Checkpoint, tensors: dict[str, Any] | None = None,
          tokenizer: Any = None, chat_template: str | None = None, metadata: dict | None = None, *,
          shards: int = 1, dtype: torch.dtype | None = None, progress: bool = False) -> Path:
    """Write a Meta folder with ``shards`` model-parallel shards (split as the reference does).

    Tied embeddings are recorded as ``"tie_embeddings": true`` in params.json with no output.weight;
    a chat template goes to ``chat_template.jinja``.
    """
    args, tensors, tokenizer, chat_template, metadata = writer_inputs(args, tensors, tokenizer, chat_template, metadata, floats=True)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    for name, t in tensors.items():
        dim = _split_dim(name)
        if dim is not None and t.shape[dim] % shards:
            raise ValueError(f"{name} {tuple(t.shape)} cannot be split into {shards} shards on dim {dim}")
    for old in folder.glob("consolidated.*.pth"):  # stale shards would be merged into the new ones
        old.unlink()

    for i in progress_iter(range(shards), progress, "shards"):
        state = {}
        for name, t in tensors.items():
            dim = _split_dim(name)
            part = t if dim is None else t.chunk(shards, dim=dim)[i]
            # clone: torch.save of a view would serialise the whole underlying storage
            state[name] = part.to(dtype if dtype is not None else part.dtype).contiguous().clone()
        atomic_write(folder / f"consolidated.{i:02d}.pth", lambda p, s=state: torch.save(s, p))
    atomic_write_json(folder / "params.json", to_params_json(args))
    if tokenizer is not None:
        tokenizer.save(folder)
    if chat_template:
        atomic_write(folder / "chat_template.jinja", lambda p: p.write_text(chat_template, encoding="utf-8"))
    return folder
