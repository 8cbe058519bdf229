"""A fixed malloc mmap threshold for the client process, so memory stays flat in the data size.

glibc's malloc serves blocks above its mmap threshold with mmap and returns them to the system
on free, but it raises that threshold to the size of each mmapped block freed (up to 32 MiB).
After the first freed feature batch (tens of MB) every later batch comes from the heap, which
fragments and keeps growing: `make bench-client`'s cold encode grew the client's anonymous memory
by 0.54 MB per image this way (before this module; now docs/CLIENT.md shows the growth pinned).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("fedcmp.client")

M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20  # blocks of 1 MiB and more: mmapped, returned on free


def pin_mmap_threshold(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold (which also stops its dynamic growth); False where there is no glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # musl, macOS, Windows: another allocator
        return False
    pinned = bool(mallopt(M_MMAP_THRESHOLD, threshold_bytes))
    if not pinned:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; memory may grow with the data on this system")
    return pinned
