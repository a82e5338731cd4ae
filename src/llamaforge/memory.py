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
