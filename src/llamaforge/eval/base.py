"""What every evaluation task shares: the run settings, the `Task` interface and JSONL reading."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..paths import data_dir


@dataclass(frozen=True)
class RunConfig:
    limit: int | None = None
    shots: int = 0
    seed: int = 1234
    window: int = 1024
    stride: int = 512
    max_tokens: int | None = None
    guard_only: bool = False


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows


def require(row: dict, keys: Sequence[str], path: Path, n: int) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{path}: example {n} has no {', '.join(map(repr, missing))} field "
                         f"(expected fields: {', '.join(keys)})")


class Task:
    """Base: a name, a default file under the data folder, and run(lm, path, cfg) -> (metrics, records)."""
    name = ""
    default_file: str | None = None
    file_format = ""

    def needs_model(self, cfg: RunConfig) -> bool:
        """False when the task runs without the language model (the guard-only safety tasks)."""
        return True

    def resolve_data(self, path: str | None) -> Path:
        if path:
            p = Path(path)
            if not p.is_file():
                raise FileNotFoundError(f"{self.name}: data file {p} not found")
            return p
        if self.default_file is None:
            raise FileNotFoundError(f"{self.name}: no data file is shipped; pass --data FILE ({self.file_format})")
        p = data_dir() / self.default_file
        if not p.is_file():
            raise FileNotFoundError(f"{self.name}: default data {p} not found; pass --data FILE ({self.file_format})")
        return p

    def run(self, lm, path: Path, cfg: RunConfig) -> tuple[dict[str, Any], list[dict]]:
        raise NotImplementedError


# -- multiple choice ---------------------------------------------------------------------------
