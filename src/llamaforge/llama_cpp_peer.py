"""llama.cpp (llama-cpp-python) as the peer that tests and benchmarks compare against.

On CPUs that report AMX, llama.cpp builds compiled for that CPU (GGML_NATIVE) put quantized weights in
an AMX buffer ("extra buffer type"; ggml-cpu/amx/amx.cpp). VMs that report AMX without enabling it
raise a general protection fault there on any quantized batch > 1. llama.cpp has no environment
switch for it, but ``llama_model_params.use_extra_bufts = false`` keeps every weight in the plain
CPU buffer (no AMX, no runtime repacking); ``disable_extra_bufts()`` makes every ``llama_cpp.Llama``
load that way. ``LLAMAFORGE_PEER_AMX=1`` keeps llama.cpp's default, ``=0`` turns the path off anywhere.
"""
from __future__ import annotations

import os
from pathlib import Path

SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def amx_off() -> bool:
    """True when the peer should run without llama.cpp's AMX path: the CPU reports AMX (or
    LLAMAFORGE_PEER_AMX=0), unless LLAMAFORGE_PEER_AMX=1."""
    env = os.environ.get("LLAMAFORGE_PEER_AMX")
    if env in ("0", "1"):
        return env == "0"
    return bool(cpu_flags() & {"amx_tile", "amx_int8", "amx_bf16"})


def disable_extra_bufts() -> None:
    """Make every later ``llama_cpp.Llama(...)`` load with ``use_extra_bufts = false`` (AMX buffer off)."""
    import llama_cpp.llama_cpp as lib
    if getattr(lib.llama_model_default_params, "_no_extra_bufts", False):
        return
    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    params._no_extra_bufts = True
    lib.llama_model_default_params = params
