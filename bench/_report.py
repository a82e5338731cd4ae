"""Shared by the benchmark scripts: the machine line and in-place update of one section of docs/benchmarks.md."""
from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
HEADER = ("# Benchmarks\n\nEvery table here is written by a script in `bench/` that runs llamaforge and its peer "
          "in the same run, on the same machine, alternating repetitions; figures are medians.\n")


def machine_line() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    from llamaforge.llama_cpp_peer import SIMD_FLAGS, amx_off, cpu_flags
    flags = cpu_flags()
    simd = " ".join(f for f in SIMD_FLAGS if f in flags) or "none reported"
    amx = "; llama.cpp's AMX path off (use_extra_bufts=false)" if amx_off() else ""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return (f"Machine: {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.system()} {platform.machine()}, "
            f"CPU flags: {simd}{amx}, Python {platform.python_version()}, torch {torch.__version__}; llamaforge {rev or '?'}; "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def update_section(name: str, body: str) -> Path:
    """Replace (or append) the section between BEGIN/END markers for `name`, leaving the others."""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text() if DOC.exists() else HEADER
    block = f"<!-- BEGIN {name} -->\n{body.strip()}\n<!-- END {name} -->"
    pat = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S)
    text = pat.sub(lambda _: block, text) if pat.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = DOC.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, DOC)
    return DOC
