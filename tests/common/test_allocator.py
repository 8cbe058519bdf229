"""glibc settings: a pinned mmap threshold keeps large blocks mmapped; an arena limit bounds the arenas."""
from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
from fedcmp.common.allocator import pin_mmap_threshold

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "pinned":
    assert pin_mmap_threshold()
libc.free(libc.malloc(16 << 20))  # a freed feature batch: raises glibc's dynamic threshold to 16 MiB
block = libc.malloc(4 << 20)  # the next batch
print(libc.mallinfo2().hblkhd >= 4 << 20)  # served by mmap (returned to the system on free)?
"""


def _next_large_block_is_mmapped(mode: str) -> bool:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip() == "True"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_large_blocks_stay_mmapped_once_the_threshold_is_pinned() -> None:
    assert not _next_large_block_is_mmapped("dynamic")  # glibc's default: the heap takes it, and fragments
    assert _next_large_block_is_mmapped("pinned")


ARENAS = """
import ctypes, os, sys, threading
from fedcmp.common.allocator import limit_arenas

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
if sys.argv[1] == "limited":
    assert limit_arenas(2)
ready, go = threading.Barrier(7), threading.Event()

def allocate():
    libc.malloc(1024)  # a thread's first allocation picks (or makes) its arena
    ready.wait()
    go.wait()

threads = [threading.Thread(target=allocate) for _ in range(6)]
for thread in threads:
    thread.start()
ready.wait()  # all six hold their arenas at once
os.dup2(1, 2)
libc.malloc_stats()  # one "Arena N:" block per arena, on stderr (now stdout)
go.set()
"""


def _arenas(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", ARENAS, mode], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.count("Arena ")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_arena_limit_holds_however_many_threads_allocate() -> None:
    assert _arenas("default") > 2  # glibc's default: a new arena for each new thread, up to 8 per core
    assert _arenas("limited") <= 2


TRIM = """
import ctypes
from fedcmp.common.allocator import release_free_memory

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def anonymous_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon"))

blocks = [libc.malloc(64 << 10) for _ in range(2000)]  # 125 MiB of heap blocks (below the mmap threshold)
for block in blocks:
    ctypes.memset(block, 1, 64 << 10)
for block in blocks[:-1]:
    libc.free(block)  # free, but below a live block: the heap's top cannot shrink by itself
before = anonymous_kib()
assert release_free_memory()
print(before - anonymous_kib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_free_heap_pages_go_back_to_the_system() -> None:
    out = subprocess.run([sys.executable, "-c", TRIM], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 100 * 1024  # KiB handed back, of the 125 MiB freed
