"""The process's memory allocator: run training under tcmalloc where it is installed, and keep
freed memory in the process, so training steps stop page-faulting their large tensors.

**tcmalloc.** A compressed CNN's training step is some 70 small operators, and glibc's malloc
is a sixth of a small convolution's time (its size classes, free-list consolidation and
aligned allocations, by ``perf``): the tensors, oneDNN's memory descriptors and scratchpads are
allocated and freed on every call. Google's tcmalloc serves such blocks from per-thread caches.
The 77 distinct architectures of two default searches, 3 epochs each on one thread (fastest of
three alternating runs, 2 AMD EPYC cores without AVX-512) trained in 48.0 s with glibc, 40.4 s
with tcmalloc (1.19x; 0.94-1.57x per architecture) and 42.1 s with jemalloc (1.14x). It has to
be loaded before the program starts (``LD_PRELOAD``), so the commands that train restart
themselves once under it (``restart_under_tcmalloc``); their worker processes inherit it.
Where it is missing they say so in a note and go on. ``AUTOSHRINK_MALLOC=system`` keeps the C
library's allocator.

**Freed memory.** glibc hands out every block above its mmap threshold (32 MiB at most) as
fresh pages from the kernel and returns them on free, and it trims freed memory off the heap's
top once more than twice that threshold is free. A training step allocates and frees the same
large tensors every time (gradients, autocast's bf16 copies of the weights), so each step
faulted them in page by page again: casting a 4096x4096 weight to bf16 took 15 ms instead of
5. Measured on two AMD EPYC cores, whole training epochs in separate processes with and
without the setting: VGG-11 at 32x32 (a 16.8M-weight linear layer) 1.18x faster in bf16;
ResNet-18 (no block over 32 MiB) and seed 000's CNN unchanged beyond the noise. The cost is
that a process keeps up to ``KEPT_FREE_BYTES`` of freed memory for reuse instead of returning
it. tcmalloc keeps freed large blocks by itself (the same cast: 7 ms under it, 8-9 ms with
this setting, 32-35 ms under glibc's defaults).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform
import sys
from collections.abc import Mapping

from autoshrink.errors import UsageError

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
KEPT_FREE_BYTES = 1 << 30  # free memory at the heap's top that is kept, not returned

ALLOCATOR_CHOICE = "AUTOSHRINK_MALLOC"  # "system": no restart under tcmalloc
RESTARTED = "AUTOSHRINK_MALLOC_RESTARTED"  # set once restarted: never a second time
TCMALLOC_NAMES = ("tcmalloc_minimal", "tcmalloc")  # the lighter build first (Debian's names)
# tcmalloc reports every allocation over 1 GiB on stderr by default; a large dataset is one
LARGE_ALLOC_REPORT = "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"


@functools.cache
def retain_freed_memory() -> bool:
    """Serve large blocks from the heap and keep freed ones for reuse (glibc's allocator only;
    once per process). True when the settings took effect."""
    if platform.libc_ver()[0] != "glibc" or allocator_in_use() == "tcmalloc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                   KEPT_FREE_BYTES))


@functools.cache
def allocator_in_use() -> str:
    """"tcmalloc" when this process runs under it, else "system" (the C library's)."""
    try:
        with open("/proc/self/maps") as maps:
            return "tcmalloc" if any("libtcmalloc" in line for line in maps) else "system"
    except OSError:  # not Linux
        return "system"


def tcmalloc_library() -> str | None:
    """The installed tcmalloc's file name, as the dynamic loader finds it, or None."""
    return next(filter(None, map(ctypes.util.find_library, TCMALLOC_NAMES)), None)


def preloads_an_allocator(environ: Mapping[str, str]) -> bool:
    """Whether the user preloads an allocator of their own (a library with malloc in its name),
    which a restart would displace."""
    return "malloc" in environ.get("LD_PRELOAD", "")


def environment_under_tcmalloc(environ: Mapping[str, str],
                               library: str | None) -> dict[str, str] | None:
    """The environment that restarts a command under ``library``, or None to go on as it is:
    without the library (unless the user asked for it by name), when the user chose the
    system's allocator or preloads one of their own, and after the one restart."""
    choice = environ.get(ALLOCATOR_CHOICE, "")
    wanted = choice.lower()
    if wanted not in ("", "tcmalloc", "system"):
        raise UsageError(f"{ALLOCATOR_CHOICE}={choice}: not an allocator autoshrink can use;"
                         " set it to tcmalloc (the default where installed) or system")
    if wanted == "tcmalloc" and library is None:
        raise UsageError(f"{ALLOCATOR_CHOICE}={choice}: tcmalloc is not installed; install it"
                         " (Debian and Ubuntu: apt-get install libtcmalloc-minimal4) or unset"
                         f" {ALLOCATOR_CHOICE}")
    if (library is None or wanted == "system" or RESTARTED in environ
            or preloads_an_allocator(environ)):
        return None
    preload = environ.get("LD_PRELOAD", "")
    return {**environ, "LD_PRELOAD": f"{library} {preload}".strip(), RESTARTED: "1",
            LARGE_ALLOC_REPORT: environ.get(LARGE_ALLOC_REPORT, str(1 << 40))}


def missing_tcmalloc_note(environ: Mapping[str, str], library: str | None) -> str | None:
    """What to tell a user whose training stays on the C library's allocator only because
    tcmalloc is not installed; None where it is, or where they chose an allocator themselves
    (``AUTOSHRINK_MALLOC``, or one they preload)."""
    if library is not None or environ.get(ALLOCATOR_CHOICE) or preloads_an_allocator(environ):
        return None
    return ("note: tcmalloc is not installed, so training runs on the C library's allocator,"
            " about 1.2x slower (Debian and Ubuntu: apt-get install libtcmalloc-minimal4;"
            f" {ALLOCATOR_CHOICE}=system keeps that allocator without this note)")


def restart_under_tcmalloc() -> None:
    """Re-execute this command (same process, arguments and descriptors) with tcmalloc
    preloaded, where it is installed and not in use yet (Linux); otherwise return, with a note
    where it is missing."""
    if not sys.platform.startswith("linux") or allocator_in_use() == "tcmalloc":
        return
    library = tcmalloc_library()
    environ = environment_under_tcmalloc(os.environ, library)
    if environ is None:
        if note := missing_tcmalloc_note(os.environ, library):
            log.info(note)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
