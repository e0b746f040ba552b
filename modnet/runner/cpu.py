"""Process-wide CPU settings every job applies before it loads data and before torch's first parallel op.

``prepare_cpu``: subnormal floats flushed to zero (``modnet.nets.hat.flush_subnormals``: HAT's masks make them)
and the C allocator told to keep the memory a step frees for the next step (``keep_freed_memory``). Both are
settings of the process (the allocator's) or of the threads started after them (the float mode), so the jobs
(``modnet cl``, ``gzsl``, ``bench``'s processes, a ddp rank) apply them first thing.
"""
from __future__ import annotations

import ctypes
import sys

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
# glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX = 4 MiB * sizeof(long)): blocks below it
# come from the heap, larger ones stay mmapped (a fresh mapping, and its page faults, every time)
MMAP_THRESHOLD_BYTES = 32 << 20


def _glibc_mallopt():
    """glibc's mallopt(param, value), or None off glibc (macOS; musl has a mallopt that does nothing)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def keep_freed_memory() -> bool:
    """glibc's malloc keeps freed memory in the process for reuse (M_TRIM_THRESHOLD -1: the heap is never
    trimmed) and serves blocks up to 32 MiB from its heap (M_MMAP_THRESHOLD), instead of handing them back to
    the kernel and faulting the pages in again at the next step. Returns whether it was set (False off glibc,
    e.g. macOS or musl: nothing changes there).

    torch's CPU tensors come from malloc with no cache of torch's own. With glibc's defaults (its mmap threshold
    adapts to the sizes freed, and the heap top is trimmed beyond twice that) a step's large maps may be handed
    back and faulted in again, page by page, every step, depending on the history of the process's allocations:
    the small CNN on CIFAR-shaped batches (64 x 32 x 32 x 32 float maps, 8 MiB), each loop in a process of its own
    (stop 34): the plain PyTorch loop took 175k-261k minor page faults and 0.6-0.95 s of system time per 32-step
    epoch of 3.9-4.4 s, modnet's none; with the loops in threads of one process it was modnet's epochs (89k-151k
    faults, 0.33-0.49 s). The CIFAR ResNet-18 at width 16 (batch 64, channels_last), 16 steps an epoch: plain 48k-67k
    faults and 0.15-0.24 s of system time, modnet 71k-112k and 0.23-0.46 s. With the memory kept none of them
    faults after its first epoch. The memory kept is at most the process's own peak heap, which it reached anyway.
    """
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))


def one_malloc_arena() -> bool:
    """Every thread allocates from glibc's main arena, as a job's main thread does (M_ARENA_MAX 1). For the
    bench's lockstep rounds, whose loops run in threads of their own one at a time (no contention for the
    arena's lock): a thread's own arena lives in 64 MiB heaps that glibc unmaps whenever they empty, which the
    trim setting does not hold back, and its pages fault in again (modnet's MLP loop: ~11k faults an epoch in its
    own arena, a few with one arena). Returns whether it was set."""
    mallopt = _glibc_mallopt()
    return mallopt is not None and bool(mallopt(_M_ARENA_MAX, 1))


def prepare_cpu() -> None:
    """Subnormals flushed (this thread and the threads torch starts after it) and freed memory kept for reuse:
    called by every job before its data and first parallel op."""
    from modnet.nets.hat import flush_subnormals

    flush_subnormals()
    keep_freed_memory()
