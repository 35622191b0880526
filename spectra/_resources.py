"""What a run may use and what it used: free memory, memory budgets, peak memory, progress.

Shared by the matrix-free algorithms (:mod:`spectra.lanczos`, :mod:`spectra.density`,
:mod:`spectra.trace`) and the dense builders (:mod:`spectra.exact`); it knows devices,
not operators.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from typing import Any

import torch
from tqdm.auto import tqdm

from ._checks import check_int

__all__ = [
    "DEFAULT_BUDGET_SHARE",
    "available_memory_bytes",
    "check_budget",
    "default_memory_budget",
    "format_bytes",
    "peak_memory_bytes",
    "progress_bar",
    "release_freed_heap",
]

#: Share of the free memory an algorithm's own vectors may take by default; the rest
#: is left for the operator's products (a Hessian product's autograd temporaries).
DEFAULT_BUDGET_SHARE = 0.5


def available_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Memory that can still be allocated on ``device``, in bytes.

    CPU: the smaller of /proc/meminfo's MemAvailable and the cgroup limit minus
    usage (containers), after :func:`release_freed_heap` has handed back to the system
    what this process freed but glibc kept (without it, memory freed by an earlier
    block product reads as taken: at GPT-2-124M size 6 GiB of it made a Lanczos run
    refuse).  CUDA: ``torch.cuda.mem_get_info`` plus what PyTorch's caching allocator
    holds unused (reserved minus allocated), which the driver counts as taken.
    """
    device = torch.device(device)
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0] + cached)
    release_freed_heap()
    candidates = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as fh:
                candidates.append(int(limit) - int(fh.read().strip()))
    except (OSError, ValueError):
        pass
    if not candidates:
        pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
        candidates.append(int(pages) * os.sysconf("SC_PAGE_SIZE") if pages else 1 << 62)
    return max(0, min(candidates))


def release_freed_heap() -> bool:
    """Return the free pages of this process's malloc heap to the system (glibc's
    ``malloc_trim(0)``); True where it ran.

    Tensors under glibc's mmap threshold (up to 32 MiB once large blocks have been
    freed) come from the heap, and freeing them leaves the pages resident and counted
    as used, though the process could reuse them; a length-n vector is mmapped and
    cannot.  A no-op (False) off glibc.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)  # returns whether pages were released; either way it ran
    return True


@functools.cache
def _malloc_trim() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl, or no libc symbols in the process
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def peak_memory_bytes(device: torch.device | str = "cpu") -> int:
    """The process's memory high-water mark, in bytes.

    CPU: ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the peak resident set size of
    the whole process since it started (it cannot be reset, so it bounds the run's
    own peak from above and includes everything the process held before).  CUDA:
    ``torch.cuda.max_memory_allocated(device)``, the peak of tensor memory since the
    last ``torch.cuda.reset_peak_memory_stats``.  0 where neither is available.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource
    except ImportError:  # not on POSIX
        return 0
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def default_memory_budget(device: torch.device) -> tuple[int, int]:
    """``(budget, free)`` in bytes: :data:`DEFAULT_BUDGET_SHARE` of the free memory now."""
    free = available_memory_bytes(device)
    return int(free * DEFAULT_BUDGET_SHARE), int(free)


def check_budget(value: Any) -> int | None:
    """``memory_budget`` as bytes (an int >= 1, integral floats accepted) or None."""
    return None if value is None else check_int("memory_budget", value)


def format_bytes(x: float) -> str:
    """``x`` bytes for an error message: GiB with two decimals and the exact count."""
    return f"{x / 2**30:.2f} GiB ({int(x):,} bytes)"


def progress_bar(total: int, desc: str, progress: bool | None) -> tqdm:
    """A tqdm bar counting matvecs; ``progress=None`` shows it only when stderr is a terminal."""
    if progress is None:
        progress = bool(getattr(sys.stderr, "isatty", lambda: False)())
    return tqdm(total=total, desc=desc, disable=not progress, leave=False, unit="matvec")
