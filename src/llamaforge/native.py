"""The native CPU kernels (kernels.cpp): built once per machine, loaded on first use.

torch's extension builder compiles the C++ file with the machine's own instruction set
(``-march=native``) into ``~/.cache/llamaforge/kernels/<hash>`` (see `build_dir`); later loads
take milliseconds. Building needs a C++ compiler and ninja (a dependency). When no
compiler is available the build fails once, the reason is logged, and callers fall back to the
repacked int4/int8 modules. ``LLAMAFORGE_NATIVE=0`` turns the kernels off.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.cpp")
TYPE_IDS = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8}      # GGML's own type numbers
# -ffp-contract=off: dequantization rounds d*q and +m separately, as gguf-py does, so the float32
# reference and the kernels see bit-identical weights; products use explicit FMAs where wanted
# -fopenmp: at::parallel_for is inline OpenMP code; the process's libgomp (torch's) serves it
_FLAGS = ["-O3", "-ffp-contract=off", "-march=native", "-fopenmp"]


def enabled() -> bool:
    return os.environ.get("LLAMAFORGE_NATIVE", "1") != "0"


def kernels() -> Any | None:
    """The compiled module (matmul, dequantize, decode_attention, rope, rms_norm, isa), or None
    when it is turned off or cannot be built here."""
    return _build() if enabled() else None


def build_dir() -> Path:
    """Where compiled kernels live: LLAMAFORGE_KERNEL_CACHE, else ~/.cache/llamaforge/kernels.

    Independent of LLAMAFORGE_HOME (a per-run state folder must not mean a fresh compile).
    """
    if os.environ.get("LLAMAFORGE_KERNEL_CACHE"):
        return Path(os.environ["LLAMAFORGE_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llamaforge" / "kernels"


@functools.cache
def _build() -> Any | None:
    try:
        from torch.utils.cpp_extension import load
        tag = hashlib.sha256(SOURCE.read_bytes() + " ".join(_FLAGS).encode() + torch.__version__.encode()
                             + sys.version.encode()).hexdigest()[:12]
        build = build_dir() / tag
        build.mkdir(parents=True, exist_ok=True)
        if not any(build.glob("*.so")):
            log.warning("compiling llamaforge's native CPU kernels (once per machine, about a minute)")
        return load(name=f"llamaforge_kernels_{tag}", sources=[str(SOURCE)], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
                    build_directory=str(build), verbose=False)
    except Exception as e:  # no compiler, no ninja, unsupported platform: the repacked path still works
        log.warning("native kernels unavailable (%s); using the repacked int4/int8 kernels",
                    str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__)
        return None
