"""glibc malloc settings that keep a long-running process's memory flat: a fixed mmap threshold
(the client, while it makes features) and a bounded number of arenas (the coordinator).

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

log = logging.getLogger("fedcmp")

M_MMAP_THRESHOLD = -3  # mallopt parameter numbers in glibc's malloc.h
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 1 << 20  # blocks of 1 MiB and more: mmapped, returned on free


def pin_mmap_threshold(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold (which also stops its dynamic growth); False where there is no glibc."""
    return _mallopt(M_MMAP_THRESHOLD, threshold_bytes, "memory may grow with the data")


def limit_arenas(count: int) -> bool:
    """At most `count` malloc arenas for the process's threads; False where there is no glibc.

    glibc gives each new thread an arena of its own (up to 8 per core), and memory freed in an
    arena mostly stays with it. The coordinator's gRPC, I/O and aggregation threads each take
    transfer buffers in turn, so every arena grows to its own peak; call this before threads start.
    """
    return _mallopt(M_ARENA_MAX, count, "each thread may keep an arena of its own")


def release_free_memory() -> bool:
    """Hand the pages malloc holds free, in every arena, back to the system (glibc's malloc_trim);
    False where there is no glibc or nothing was released."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        return False
    return bool(trim(0))


def _mallopt(parameter: int, value: int, otherwise: str) -> bool:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # musl, macOS, Windows: another allocator
        return False
    done = bool(mallopt(parameter, value))
    if not done:
        log.debug("mallopt(%d, %d) refused; %s on this system", parameter, value, otherwise)
    return done
