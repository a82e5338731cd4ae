"""The native CPU kernels (kernels/*.cpp): built once per machine, loaded on first use.

torch's extension builder compiles the C++ sources with the machine's own instruction set
(``-march=native``) into ``~/.cache/llamaforge/kernels/<hash>`` (see `build_dir`); later loads
take milliseconds. The hash covers the sources, the flags and the CPU's own flags, so a cache
shared between machines never hands one CPU another's binary. Building needs a C++ compiler and
ninja (a dependency). When no compiler is available the build fails once, the reason is logged,
and callers fall back to float32 / repacked modules. ``LLAMAFORGE_NATIVE=0`` turns the kernels off;
``LLAMAFORGE_KERNEL_ISA=avx2`` builds them without AVX-512 and VNNI (what an AVX2-only CPU runs,
testable on a bigger one).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).with_name("kernels")
SOURCES = sorted(SOURCE_DIR.glob("*.cpp"))
# GGML's own type numbers
TYPE_IDS = {"F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10, "Q3_K": 11,
            "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "BF16": 30}
# -ffp-contract=off: dequantization rounds d*q and +m separately, as gguf-py does, so the float32
# reference and the kernels see bit-identical weights; products use explicit FMAs where wanted
# -fopenmp: at::parallel_for is inline OpenMP code; the process's libgomp (torch's) serves it
_FLAGS = ["-O3", "-ffp-contract=off", "-march=native", "-fopenmp"]
ISA_FLAGS = {"native": [], "avx2": ["-mno-avx512f", "-mno-avxvnni"]}


def enabled() -> bool:
    return os.environ.get("LLAMAFORGE_NATIVE", "1") != "0"


def kernels() -> Any | None:
    """The compiled module (matmul, dequantize, decode_attention, rope, rms_norm, isa), or None
    when it is turned off or cannot be built here."""
    return _build(os.environ.get("LLAMAFORGE_KERNEL_ISA", "native")) if enabled() else None


def build_dir() -> Path:
    """Where compiled kernels live: LLAMAFORGE_KERNEL_CACHE, else ~/.cache/llamaforge/kernels.

    Independent of LLAMAFORGE_HOME (a per-run state folder must not mean a fresh compile).
    """
    if os.environ.get("LLAMAFORGE_KERNEL_CACHE"):
        return Path(os.environ["LLAMAFORGE_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llamaforge" / "kernels"


def cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for), or the platform name elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    import platform
    return f"{platform.machine()} {platform.processor()}"


@functools.cache
def _build(isa: str) -> Any | None:
    if isa not in ISA_FLAGS:
        log.warning("LLAMAFORGE_KERNEL_ISA=%s is not one of %s; building for this CPU", isa, ", ".join(ISA_FLAGS))
        isa = "native"
    flags = _FLAGS + ISA_FLAGS[isa]
    try:
        blob = b"".join(p.read_bytes() for p in sorted(SOURCE_DIR.glob("*.[ch]*")))
        tag = hashlib.sha256(blob + " ".join(flags).encode() + cpu_flags().encode() + torch.__version__.encode()
                             + sys.version.encode()).hexdigest()[:12]
        build = build_dir() / tag
        built = build / f"llamaforge_kernels_{tag}.so"
        if built.is_file():   # built before (the tag covers sources, flags, CPU): skip the builder's imports (~0.4 s)
            spec = importlib.util.spec_from_file_location(f"llamaforge_kernels_{tag}", built)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        build.mkdir(parents=True, exist_ok=True)
        from torch.utils.cpp_extension import load
        if not any(build.glob("*.so")):
            log.warning("compiling llamaforge's native CPU kernels (once per machine, a minute or two)")
        return load(name=f"llamaforge_kernels_{tag}", sources=[str(s) for s in SOURCES], extra_cflags=flags,
                    extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)
    except Exception as e:  # no compiler, no ninja, unsupported platform: the float32 path still works
        log.warning("native kernels unavailable (%s); using the float32 / repacked modules",
                    str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__)
        return None
