"""glibc malloc settings for training on CPU (no torch import: finetune.py calls this before anything loads).

Freed tensors return to glibc, which keeps small freed blocks in per-thread caches (tcache)
and fast bins that never merge with their neighbours; small long-lived objects then pin holes between large
blocks, and the heap grows past what is in use. `tune_malloc()` turns the fast bins off (`mallopt(M_MXFAST, 0)`)
and then takes one of two settings (docs/BENCHMARKS.md, "Freed memory kept for reuse" and "Where the memory
goes"):

- `memory_first` (gradient checkpointing, where the user asked for memory over speed): tensors of 4 MiB and
  more are their own mappings, given back to the system when freed (a fixed `M_MMAP_THRESHOLD`), and the heap
  is trimmed after each optimizer step (`malloc_trim`; memory.py also trims between decoder layers).
- otherwise, reuse: freed memory stays with the process (mappings only from 32 MiB, glibc's largest threshold,
  and no automatic trimming), so every step reuses the pages of the step before. Giving them back costs a page
  fault and the kernel zeroing the page at every reuse: on SmolLM2-135M without checkpointing, 420-710 thousand
  faults and 3-5 s of system time per step against 12-18 thousand and 0.5 s, for the same peak.

The tcache can only be turned off when a process starts (`GLIBC_TUNABLES`): `restart_with_lean_malloc()`,
the first thing `python finetune.py` does, re-executes the same command once with
`glibc.malloc.tcache_count=0` added (same process id; `MEDLORA_DEFAULT_MALLOC=1` keeps glibc's defaults).
"""

import ctypes
import ctypes.util
import functools
import os
import sys

M_MXFAST, M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = 1, -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 4 << 20  # memory first
REUSE_MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit (HEAP_MAX_SIZE / 2)
NO_TRIM = 2**31 - 1
TUNABLE = "glibc.malloc.tcache_count"


@functools.cache  # looked up once: trim_malloc runs after every optimizer step
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def tune_malloc(memory_first: bool) -> bool:
    """glibc settings for training on CPU (see the module docstring); False where the C library is not glibc."""
    libc = _libc()
    if libc is None:
        return False
    mmap_threshold, trim_threshold = (MMAP_THRESHOLD, 2 * MMAP_THRESHOLD) if memory_first else (
        REUSE_MMAP_THRESHOLD, NO_TRIM)
    return all(libc.mallopt(param, value) == 1 for param, value in (
        (M_MXFAST, 0), (M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold)))


def trim_malloc() -> None:
    """Give the free memory glibc holds back to the system (between optimizer steps, after training)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def restart_with_lean_malloc() -> None:
    """Re-execute this process's own command once with the glibc tcache off (a no-op when it is already set,
    opted out with MEDLORA_DEFAULT_MALLOC=1, or the C library is not glibc)."""
    current = os.environ.get("GLIBC_TUNABLES", "")
    if os.environ.get("MEDLORA_DEFAULT_MALLOC") or TUNABLE in current or _libc() is None:
        return
    if not (hasattr(os, "confstr") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")):
        return
    environ = {**os.environ, "GLIBC_TUNABLES": ":".join(filter(None, [current, f"{TUNABLE}=0"]))}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(getattr(sys, "orig_argv", [sys.executable, *sys.argv])), environ)
