"""Which licence a checkpoint carries, and the Llama 2 Community License notice (once per machine)."""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Iterable

from ..fileio import atomic_write_text
from ..paths import state_dir
from .policy import AUP_URL

log = logging.getLogger(__name__)

LLAMA2 = "llama2"
LICENSE_URL = "https://ai.meta.com/llama/license/"
NOTICE = (
    "Llama 2 is licensed under the LLAMA 2 Community License, Copyright (c) Meta Platforms, Inc. "
    f"All Rights Reserved. Its terms: {LICENSE_URL}. Use of Llama 2 must follow the Acceptable Use "
    f"Policy: {AUP_URL} (`llamaforge guard` and `--guard` check prompts and answers against its categories). "
    "This notice is shown once per machine."
)

_LLAMA2_LICENSE = re.compile(r"^\s*(llama[\s_-]?2)([\s_-]community([\s_-]licen[cs]e)?)?\s*$", re.I)
_LLAMA2_NAME = re.compile(r"llama[\s_-]?2(?![\d.])", re.I)
_LLAMA_GUARD_V1 = re.compile(r"llama[\s_-]?guard(?![\s_-]?[23])", re.I)
_LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "USE_POLICY.md")


def normalise(license: str | None) -> str | None:
    """'llama2' for the spellings of the Llama 2 Community License; other licences unchanged."""
    if not license or not str(license).strip():
        return None
    text = str(license).strip()
    if _LLAMA2_LICENSE.match(text) or "LLAMA 2 COMMUNITY LICENSE" in text.upper():
        return LLAMA2
    return text


def license_from_files(*folders: Path) -> str | None:
    """'llama2' when a LICENSE / USE_POLICY.md in one of the folders is Meta's Llama 2 licence."""
    for folder in folders:
        for name in _LICENSE_FILES:
            f = Path(folder) / name
            if f.is_file():
                head = f.read_text(encoding="utf-8", errors="replace")[:20000].upper()
                if "LLAMA 2 COMMUNITY LICENSE" in head or ("LLAMA 2" in head and "ACCEPTABLE USE POLICY" in head):
                    return LLAMA2
    return None


def declared_license(folder: Path, config: dict | None = None) -> str | None:
    """The licence a Hugging Face-style folder states: config.json's "license", else README.md front matter."""
    folder = Path(folder)
    if config is None and (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (ValueError, OSError):
            config = None
    if isinstance((config or {}).get("license"), str):
        return config["license"]
    readme = folder / "README.md"
    if readme.is_file():
        m = re.match(r"---\s*\n(.*?)\n---", readme.read_text(encoding="utf-8", errors="replace"), re.S)
        lm = re.search(r"^license:\s*['\"]?([^'\"\n]+?)['\"]?\s*$", m.group(1), re.M) if m else None
        if lm:
            return lm.group(1)
    return None


def detect_license(declared: str | None = None, *, folders: Iterable[Path] = (),
                   names: Iterable[str | None] = ()) -> str | None:
    """A licence ('llama2' for Llama 2) from, in order: what a file declares, licence files in
    ``folders``, model names that name Llama 2 (or Llama Guard v1, a fine-tuned Llama 2)."""
    lic = normalise(declared)
    if lic:
        return lic
    found = license_from_files(*folders)
    if found:
        return found
    for name in names:
        if isinstance(name, str) and (_LLAMA2_NAME.search(name) or _LLAMA_GUARD_V1.search(name)):
            return LLAMA2
    return None


def identify(ckpt: Any) -> str | None:
    """The checkpoint's licence ('llama2' for Llama 2), from what the checkpoint says about itself.

    Looks at, in order: ``ckpt.license`` (GGUF general.license, HF config / README front matter,
    Meta folder licence file as the readers found them), LICENSE / USE_POLICY.md next to the
    weights, and the model name (GGUF general.name, HF _name_or_path) when it names Llama 2.
    """
    path = getattr(ckpt, "path", None)
    folders: list[Path] = []
    if path is not None:
        p = Path(path)
        folders = ([p] if p.is_dir() else []) + [p.parent]
    meta = getattr(ckpt, "metadata", None) or {}
    names = [meta.get(k) for k in ("name", "general.name", "_name_or_path", "basename", "general.basename")]
    return detect_license(getattr(ckpt, "license", None), folders=folders, names=names)


def notice_file() -> Path:
    return state_dir() / "notices" / "llama2-license-shown"


def notice_once(ckpt: Any) -> bool:
    """Show the Llama 2 licence notice if ``ckpt`` is Llama 2 and it was never shown on this machine.

    The notice goes to the ``llamaforge`` logger at WARNING level (stderr by default); a state file
    under ``llamaforge.paths.state_dir()`` remembers it. Returns True when the notice was shown.
    """
    if identify(ckpt) != LLAMA2:
        return False
    marker = notice_file()
    if marker.exists():
        return False
    log.warning("%s", NOTICE)
    try:
        atomic_write_text(marker, f"shown {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n{NOTICE}\n")
    except OSError as e:  # a read-only home must not stop a model from loading
        log.info("could not record the licence notice in %s: %s", marker, e)
    return True
