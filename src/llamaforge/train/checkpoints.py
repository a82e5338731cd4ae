"""The trainer's checkpoint folders on disk: how a save becomes visible, how a killed save is
finished, and how trainer state is read back without running code.

A save writes ``.tmp-step-N-<pid>`` in full, ``trainer_state/state.json`` last (a folder with one is
complete), then `publish` swaps it in: an existing ``step-N`` (a re-save of the same step) is renamed
to ``.old-step-N-<pid>``, the new copy renamed to ``step-N``, and only then the old one deleted.
`prune` renames old steps to ``.del-...`` before deleting them. Renames are atomic, so a kill at any
moment leaves ``step-N`` complete or a complete ``.tmp``/``.old`` copy of it, which `recover` puts in
place before a run resumes.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..fileio import load_torch_file
from ..formats.common import check_state_dict, read_json

log = logging.getLogger(__name__)

STATE_DIR = "trainer_state"
_LEFTOVER = re.compile(r"\.(tmp|old|del)-(step-\d+)-\d+")


def complete_checkpoints(root: Path) -> list[Path]:
    """The step-N folders under ``root`` that hold a complete trainer state, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE_DIR / "state.json").is_file())


def temp_folder(final: Path) -> Path:
    """Where the save of ``final`` is written before `publish` swaps it in."""
    return final.with_name(f".tmp-{final.name}-{os.getpid()}")


def publish(tmp: Path, final: Path) -> None:
    """Make the complete copy ``tmp`` the checkpoint ``final``; the old ``final`` goes only after."""
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    if final.exists():  # re-saving the same step (e.g. a resumed run that had nothing left to do)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` (at least one) complete checkpoints."""
    for old in complete_checkpoints(root)[:-max(1, keep)]:
        gone = old.with_name(f".del-{old.name}-{os.getpid()}")
        os.replace(old, gone)  # out of resume's sight at once; deleting a folder is not atomic
        shutil.rmtree(gone, ignore_errors=True)


def recover(root: Path) -> None:
    """Finish what killed saves left: a complete copy whose step-N is missing takes its place; every
    other leftover (incomplete copies, superseded ones, half-pruned steps) is deleted."""
    if not root.is_dir():
        return
    newest_first = {"tmp": 0, "old": 1, "del": 2}  # a re-save's .tmp is newer than the .old it replaces
    leftovers = [(m, d) for d in root.glob(".*-step-*") if (m := _LEFTOVER.fullmatch(d.name))]
    for m, d in sorted(leftovers, key=lambda md: newest_first[md[0].group(1)]):
        final = root / m.group(2)
        if m.group(1) != "del" and (d / STATE_DIR / "state.json").is_file() and not final.exists():
            os.replace(d, final)
            log.warning("%s: recovered from %s, which a killed save left complete", final, d.name)
        else:
            shutil.rmtree(d, ignore_errors=True)


def read_progress(state_dir: Path) -> tuple[int, int, Any]:
    """(step, tokens_seen, global_batch) from a checkpoint's state.json."""
    path = state_dir / "state.json"
    state = read_json(path, "trainer state")
    try:
        return int(state["step"]), int(state.get("tokens_seen", 0)), state["global_batch"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid trainer state: {e!r}") from e


def load_model_state(state_dir: Path) -> dict[str, torch.Tensor]:
    """The trained tensors of a checkpoint (model.pt)."""
    return check_state_dict(load_torch_file(state_dir / "model.pt", "trained weights"), state_dir / "model.pt")


def load_optimizer_state(state_dir: Path) -> Any:
    """The optimizer's state_dict of a checkpoint (optimizer.pt: tensors, numbers, lists, dicts)."""
    state = load_torch_file(state_dir / "optimizer.pt", "optimizer state")
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_dir / 'optimizer.pt'}: holds a {type(state).__name__}, not an optimizer state")
    return state


def load_rng_states(state_dir: Path) -> list[dict[str, Any]]:
    """The per-process RNG states of a checkpoint (rng.pt): [{"torch": ByteTensor, "cuda": [...]}, ...]."""
    path = state_dir / "rng.pt"
    rngs = load_torch_file(path, "RNG states")
    if not (isinstance(rngs, list) and rngs and all(
            isinstance(r, dict) and isinstance(r.get("torch"), torch.Tensor) and r["torch"].dtype == torch.uint8
            and all(isinstance(c, torch.Tensor) for c in r.get("cuda") or []) for r in rngs)):
        raise CheckpointError(f"{path}: not a list of per-process RNG states (uint8 tensors)")
    return rngs
