"""Atomic file writes (a crash leaves the old file or the new one, never half of either), and the one
way torch files are read (weights only: a pickle can name no code)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import CheckpointError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def load_torch_file(path: str | Path, what: str, *, mmap: bool = False) -> Any:
    """``torch.load`` with weights_only=True: tensors and plain containers, never code from the file.

    Anything unreadable (a pickle naming a function, a truncated zip) is a CheckpointError naming the
    file. mmap=True maps the tensors (the legacy non-zip format cannot be mapped and is read instead).
    """
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling, zip and file errors alike
        raise CheckpointError(f"{path}: cannot load {what} (only tensors and plain containers are read): {e}") from e
