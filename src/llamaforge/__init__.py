"""llamaforge: a complete, fully open Llama 2 stack.

    from llamaforge import Llama
    llm = Llama.load()                       # the bundled SmolLM2, or a Meta/HF/GGUF path
    print(llm.chat([{"role": "user", "content": "Hi!"}]).text)
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Llama", "Tokenizer", "Guard", "ModelArgs", "Transformer", "SamplingParams", "load_checkpoint"]

_LAZY = {
    "Llama": "llamaforge.api",
    "Tokenizer": "llamaforge.tokenizer",
    "Guard": "llamaforge.safety.guard",
    "ModelArgs": "llamaforge.config",
    "Transformer": "llamaforge.model",
    "SamplingParams": "llamaforge.sampling",
    "load_checkpoint": "llamaforge.formats",
}

if TYPE_CHECKING:  # pragma: no cover
    from .api import Llama
    from .config import ModelArgs
    from .formats import load_checkpoint
    from .model import Transformer
    from .safety.guard import Guard
    from .sampling import SamplingParams
    from .tokenizer import Tokenizer


def __getattr__(name: str):
    # import on first use so `import llamaforge` stays cheap (the CLI loads only what a command needs)
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llamaforge' has no attribute {name!r}")
