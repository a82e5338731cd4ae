"""Safety: moderation (`Guard`), the Llama Guard v1 taxonomy mapped onto the Llama 2 Acceptable Use
Policy (`policy`), and licence identification with the Llama 2 notice (`license`).

    from llamaforge.safety import Guard
    verdict = Guard.load().check("How do I kill a Python process?")   # Verdict(safe=True, ...)
"""
from __future__ import annotations

import importlib

__all__ = ["Guard", "Verdict"]


def __getattr__(name: str):
    # lazy, so `import llamaforge.safety.policy` does not load the encoder code
    if name in __all__:
        return getattr(importlib.import_module("llamaforge.safety.guard"), name)
    raise AttributeError(f"module 'llamaforge.safety' has no attribute {name!r}")
