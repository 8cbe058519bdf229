"""The pinned mmap threshold: after a large block is freed, the next large block is still mmapped."""
from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
from fedcmp.client.allocator import pin_mmap_threshold

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
