"""What every checkpoint format shares: the expected tensors of a config and the checks against them,
tokenizer lookup, writer arguments, and small conversions. Meta's names and shapes are the canonical ones.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

import torch
from tqdm import tqdm

from ..config import ModelArgs
from ..tokenizer import Tokenizer
from .checkpoint import Checkpoint, CheckpointError


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Meta name -> torch shape for a config (output.weight omitted when tied)."""
    d, h, q, kv = args.dim, args.ffn_hidden, args.n_heads * args.head_dim, args.kv_heads * args.head_dim
    out: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (args.vocab_size, d)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        out.update({
            p + "attention.wq.weight": (q, d), p + "attention.wk.weight": (kv, d),
            p + "attention.wv.weight": (kv, d), p + "attention.wo.weight": (d, q),
            p + "feed_forward.w1.weight": (h, d), p + "feed_forward.w2.weight": (d, h),
            p + "feed_forward.w3.weight": (h, d),
            p + "attention_norm.weight": (d,), p + "ffn_norm.weight": (d,),
        })
    out["norm.weight"] = (d,)
    if not args.tie_embeddings:
        out["output.weight"] = (args.vocab_size, d)
    return out


def check_tensors(args: ModelArgs, tensors: dict[str, Any], where: Path | str) -> None:
    """CheckpointError unless ``tensors`` are exactly the config's tensors with the config's shapes."""
    want = expected_shapes(args)
    missing = [n for n in want if n not in tensors]
    unexpected = [n for n in tensors if n not in want]
    if missing or unexpected:
        raise CheckpointError(f"{where}: tensors do not match the config: missing {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    for name, shape in want.items():
        got = tuple(tensors[name].shape)
        if got != shape:
            raise CheckpointError(f"{where}: shape mismatch vs config: {name} is {got}, config expects {shape}")
        dtype = getattr(tensors[name], "dtype", None)
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise CheckpointError(f"{where}: {name} holds {dtype} values, not floating-point weights")


def check_state_dict(state: Any, where: Path | str) -> dict[str, torch.Tensor]:
    """``state`` when it is a dict of name -> tensor (what a weights file must hold); CheckpointError otherwise."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: holds a {type(state).__name__}, not a dict of tensors")
    for name, t in state.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{where}: entry {name!r} is a {type(t).__name__}, not a named tensor")
    return state


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; CheckpointError naming the file when it is unreadable or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{path}: unreadable {what}: {e}") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object, got {type(value).__name__}")
    return value


def read_folder_config(path: str | Path, name: str, kind: str) -> tuple[Path, Path, dict[str, Any]]:
    """(folder, config file, its JSON object) of a checkpoint folder (or a file inside it).

    kind names the folder in the error when ``name`` is missing ("Hugging Face model", ...).
    """
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    file = folder / name
    if not file.is_file():
        raise CheckpointError(f"{file}: missing {name} (a {kind} folder needs it)")
    return folder, file, read_json(file, name)


def drop_tied_output(args: ModelArgs, tensors: dict[str, Any]) -> None:
    """Remove output.weight when the config ties it to the embedding (it is the same matrix)."""
    if args.tie_embeddings:
        tensors.pop("output.weight", None)


def load_tokenizer(path: Path) -> Any:
    """llamaforge Tokenizer from a file; CheckpointError naming the file when it cannot be read."""
    try:
        return Tokenizer.load(path)
    except Exception as e:  # noqa: BLE001 - any tokenizer failure is a bad checkpoint
        raise CheckpointError(f"{path}: cannot load the tokenizer: {e}") from e


def read_text_if(path: Path) -> str | None:
    """The file's text, None when it does not exist; CheckpointError when it is not UTF-8 text."""
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable text file: {e}") from e


def chat_template_or_none(value: Any, where: Path | str) -> str | None:
    """A chat template as a checkpoint carries it: a string or nothing (CheckpointError for other types)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise CheckpointError(f"{where}: the chat template is a {type(value).__name__}, not a string")
    return value


_META_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)\.weight")


class TensorNames:
    """A format's tensor names <-> Meta names: whole-model tensors by table, per-layer ones as
    ``{prefix}{i}.{part}.weight`` with ``part`` looked up in ``layer``."""

    def __init__(self, fmt: str, top: dict[str, str], layer: dict[str, str], prefix: str):
        self.fmt, self.prefix = fmt, prefix
        self.top, self.top_inv = top, {v: k for k, v in top.items()}
        self.layer, self.layer_inv = layer, {v: k for k, v in layer.items()}
        self._re = re.compile(re.escape(prefix) + r"(\d+)\.(.+)\.weight")

    def to_meta(self, name: str) -> str | None:
        """The Meta name of a tensor of this format; None for a name it does not know."""
        if name in self.top:
            return self.top[name]
        m = self._re.fullmatch(name)
        if m and m.group(2) in self.layer:
            return f"layers.{m.group(1)}.{self.layer[m.group(2)]}.weight"
        return None

    def from_meta(self, name: str) -> str:
        """This format's name of a Meta tensor name (ValueError when it has none)."""
        if name in self.top_inv:
            return self.top_inv[name]
        m = _META_LAYER_RE.fullmatch(name)
        if m and m.group(2) in self.layer_inv:
            return f"{self.prefix}{m.group(1)}.{self.layer_inv[m.group(2)]}.weight"
        raise ValueError(f"no {self.fmt} name for tensor {name!r}")


def writer_inputs(args: Any, tensors: dict | None, tokenizer: Any, chat_template: str | None,
                  metadata: dict | None, *, floats: bool = False) -> tuple[ModelArgs, dict[str, Any], Any, str | None, dict]:
    """What every writer starts from: (args, tensors, tokenizer, chat_template, metadata).

    Writers take either (args, tensors, ...) or a whole Checkpoint as ``args``. The tensors come back
    checked against the config, without the output projection of a tied model, and as torch
    tensors when ``floats`` (packed GGUF tensors dequantized).
    """
    if isinstance(args, Checkpoint):
        ck = args
        meta = dict(ck.metadata)
        if ck.license and "license" not in meta:
            meta["license"] = ck.license
        meta.update(metadata or {})
        args, tensors = ck.args, ck.tensors if tensors is None else tensors
        tokenizer, chat_template, metadata = tokenizer or ck.tokenizer, chat_template or ck.chat_template, meta
    if args is None or tensors is None:
        raise ValueError("write() needs args and tensors (or a Checkpoint with a model)")
    chat_template = chat_template or getattr(tokenizer, "chat_template", None)
    tensors = dict(tensors)
    drop_tied_output(args, tensors)
    if floats:
        tensors = {n: as_float(t) for n, t in tensors.items()}
    check_tensors(args, tensors, "tensors to write")
    return args, tensors, tokenizer, chat_template, dict(metadata or {})


def as_float(t: Any) -> torch.Tensor:
    """A torch tensor whatever it is (packed GGUF tensors are dequantized)."""
    return t if isinstance(t, torch.Tensor) else t.dequantize()


def progress_iter(items: Iterable, enabled: bool, desc: str, total: int | None = None) -> Iterable:
    """``items`` with a tqdm bar when enabled."""
    if not enabled:
        return items
    return tqdm(items, desc=desc, total=total, unit="tensor")
