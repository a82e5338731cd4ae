"""Process-memory helpers for loading big weights: drop mapped pages once copied, tune glibc's malloc.

All best effort: on systems without madvise/mallopt/malloc_trim they do nothing.
"""
from __future__ import annotations

import ctypes
import mmap

import numpy as np


def release_pages(arr: np.ndarray) -> None:
    """Drop the resident pages of a memory-mapped array once it has been repacked (Linux; best effort).

    Each tensor is read once, so without this the whole file stays resident next to its repacked
    copy: a 7B model would need twice its size in RAM. The mapping is private and never written,
    so a later read simply faults the pages in again from the file.
    """
    if not isinstance(arr, np.ndarray) or not hasattr(mmap, "MADV_DONTNEED"):
        return
    base = arr
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    if not isinstance(base, mmap.mmap) and not isinstance(base, np.memmap):
        return
    page = mmap.PAGESIZE
    start = -(-arr.ctypes.data // page) * page
    end = (arr.ctypes.data + arr.nbytes) // page * page
    if end > start:
        try:
            ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start),
                                                     mmap.MADV_DONTNEED)
        except (OSError, AttributeError):
            pass


def scratch_to_mmap() -> None:
    """glibc: serve allocations over 256 KiB with mmap (returned to the OS on free).

    Repacking interleaves short-lived scratch tensors with the long-lived packed ones; with glibc's
    default (a threshold that rises after the first large free) the scratch ends up in the heap,
    which fragments and grows by about 1 MiB per tensor: measured 609 MiB peak RSS for the bundled
    model, 503 MiB with this. Process-wide, like MALLOC_MMAP_THRESHOLD_=262144.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 256 * 1024)   # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def trim_heap() -> None:
    """Give freed scratch buffers back to the OS (glibc keeps freed heap memory otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def release_code_pages() -> int:
    """Unmap the resident pages of shared libraries' code that nothing modified (Linux; best effort).

    Importing torch runs the static initialisers spread over its 400 MB libtorch_cpu.so, which
    leaves ~90 MiB of its code resident that a forward pass never executes again: 1/3 of the
    process's memory beside a 1B model's weights. Code mappings (r-xp) are clean copies of their
    file, so dropping them loses nothing: the page cache keeps the data and a later call faults its
    page back in (a minor fault). A mapping with any anonymous (copied-on-write) page is left alone.
    Returns the KiB released.
    """
    if not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    try:
        smaps = open("/proc/self/smaps").read().splitlines()
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    released, span, path, rss = 0, None, "", 0
    for line in smaps + ["0-0 ---p"]:   # a sentinel header flushes the last mapping
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):   # a mapping's header
            span, path = (fields[0], fields[1]), fields[5] if len(fields) > 5 else ""
        elif fields[:1] == ["Rss:"]:
            rss = int(fields[1])
        elif fields[:1] == ["Anonymous:"] and span is not None:
            (bounds, perms), anonymous = span, int(fields[1])
            if perms == "r-xp" and ".so" in path and anonymous == 0 and rss > 0:
                start, end = (int(a, 16) for a in bounds.split("-"))
                if madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED) == 0:
                    released += rss
            span = None
    return released
