"""modnet.runner.cpu: the process settings every job applies before its data."""
import resource
import subprocess
import sys

import pytest

from modnet.runner.cpu import _glibc_mallopt

# 50 steps, each allocating a map of 8 MiB + i x 64 KiB (a step's conv output, one a little larger every step, so
# that glibc's mmap threshold, which adapts to the largest block freed, never covers the next one) and freeing it
_STEPS = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from modnet.runner.cpu import keep_freed_memory
    assert keep_freed_memory()
for i in range(50):
    if i == 25:  # the steady state: the last 25 steps
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = torch.empty(2 * 2**20 + i * 2**14).fill_(1.0)
    del y
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _minor_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _STEPS, mode], capture_output=True, text=True, timeout=120,
                         env={"OMP_NUM_THREADS": "1", "PATH": ""}, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_glibc_mallopt() is None, reason="glibc's mallopt only (Linux with glibc)")
def test_kept_memory_is_reused_without_page_faults():
    """The kernel's own count of minor page faults over the last 25 of 50 steps that each allocate, fill and
    free a map of 8 MiB or a little more: with glibc's defaults every map is a fresh mapping whose pages fault in
    (each of its ~2,400-2,800 pages); with the memory kept the steps reuse the heap and only its growth faults
    (measured: 16 faults a step, the 64 KiB each map adds)."""
    pages = sum((2 * 2**20 + i * 2**14) * 4 // resource.getpagesize() for i in range(25, 50))
    default = _minor_faults("default")
    kept = _minor_faults("keep")
    assert default > pages // 2, f"glibc's default faulted {default} times for {pages} pages"
    assert kept < pages // 20


def test_jobs_prepare_the_cpu_before_their_data(tmp_path, monkeypatch):
    """``modnet cl`` calls prepare_cpu (subnormals flushed, freed memory kept) before it builds its data."""
    import modnet.jobs.cl as cl
    import modnet.runner.cpu as cpu
    from modnet.cli import main

    calls = []
    monkeypatch.setattr(cpu, "prepare_cpu", lambda: calls.append("prepare_cpu"))
    build = cl.build_benchmark
    monkeypatch.setattr(cl, "build_benchmark", lambda *a, **k: (calls.append("data"), build(*a, **k))[1])
    assert main(["cl", "strategies=[naive]", "train.epochs=1", "progress=false",
                 f"output_dir={tmp_path / 'o'}"]) == 0
    assert calls and calls[0] == "prepare_cpu" and "data" in calls


_THREAD_ALLOCATES = """
import ctypes, sys, threading, torch
if sys.argv[1] == "one":
    from modnet.runner.cpu import one_malloc_arena
    assert one_malloc_arena()
kept = []
t = threading.Thread(target=lambda: kept.append(torch.ones(2**20)))
t.start()
t.join()
ctypes.CDLL(None).malloc_stats()  # glibc's own report, on stderr: one "Arena i:" block per arena
"""


@pytest.mark.skipif(_glibc_mallopt() is None, reason="glibc's mallopt only (Linux with glibc)")
def test_one_malloc_arena_keeps_a_threads_allocations_in_the_main_arena():
    """glibc's malloc_stats lists the arenas: a thread's tensor gets an arena of its own by default, and none
    with ``one_malloc_arena`` (what the bench's lockstep threads need to allocate as a job's main thread)."""
    def arenas(mode):
        err = subprocess.run([sys.executable, "-c", _THREAD_ALLOCATES, mode], capture_output=True, text=True,
                             timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": ""}, check=True).stderr
        return [line for line in err.splitlines() if line.startswith("Arena ")]
    assert len(arenas("default")) >= 2
    assert arenas("one") == ["Arena 0:"]
