"""`jax_googlenet.host_memory.configure`: unless told --system-malloc, glibc then serves a large block from its
heap rather than from fresh mmap pages and keeps it once freed; either way it returns the line the jobs print.
Each probe runs in its own process, since the setting is process-wide."""

import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import ctypes, sys
    from jax_googlenet import host_memory

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    libc.malloc.restype = ctypes.c_void_p
    print(host_memory.configure(system_malloc=sys.argv[1] == "system"))
    before = libc.mallinfo2()
    block = libc.malloc(64 << 20)
    during = libc.mallinfo2()
    libc.free(ctypes.c_void_p(block))
    after = libc.mallinfo2()
    print("mmapped", during.hblks - before.hblks, "heap kept MB", (after.arena - before.arena) >> 20)
""")


def probe(mode: str) -> str:
    return subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout


def test_a_large_block_comes_from_the_heap_and_stays_there_once_freed():
    assert probe("system").splitlines() == ["host memory: system allocator (--system-malloc)",
                                            "mmapped 1 heap kept MB 0"]
    lines = probe("keep").splitlines()
    assert lines[0].startswith("host memory: freed blocks kept for reuse (glibc mallopt M_MMAP_MAX=0")
    mmapped, kept = lines[-1].split(" heap kept MB ")
    assert mmapped == "mmapped 0" and int(kept) >= 60  # the 64 MB block, less what the heap had free before
