"""Give freed tensor memory back to the system, for runs that read and free large tensors one after another."""

from __future__ import annotations

import ctypes
import logging
import os
import sys

import numpy as np
import torch

log = logging.getLogger(__name__)
MADV_DONTNEED = 4  # Linux


def trim() -> None:
    """Return the heap's free pages to the system (glibc ``malloc_trim``); nothing elsewhere.

    glibc raises its mmap threshold as large blocks are freed (up to 32 MiB), and tensors below it then
    come from a heap that keeps its freed pages: reading a model block by block grew the resident memory
    with depth (RTN of a 20-block Llama shape: 1.83 GiB peak without trimming after each block).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        log.debug("no malloc_trim here: freed tensors may stay in the heap")


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD = 4 << 20  # tensors of 4 MiB and more get pages of their own, returned when freed
_pinned: list[bool] = []


def pin_mmap_threshold() -> None:
    """Serve every allocation of MMAP_THRESHOLD or more from its own mapping, for the rest of the process.

    glibc's dynamic threshold climbs to 32 MiB once large blocks are freed; the tensors of a block's
    forward (tens of MB each) then come from the heap and leave it fragmented: with the threshold pinned,
    opt-RTN on the Llama-3.2-3B shape peaked 0.3 GiB lower at the same speed (scripts/bench_scale.py).
    Pin it before the model loads: loading with the dynamic threshold left a 1.1 GiB heap of which 1 GiB
    was free, and every later block's small tensors spread over it, each touching pages of its own until
    the block's trim (opt-RTN on that shape: 1.71 GiB above baseline in the first block, 1.35 GiB with the
    threshold pinned from the start). Setting it is process-wide and irreversible; done once, on Linux with
    glibc only.
    """
    if _pinned or not sys.platform.startswith("linux") or os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return
    _pinned.append(True)
    try:
        if not ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
            log.debug("mallopt refused the mmap threshold")
    except (OSError, AttributeError):
        log.debug("no mallopt here: large tensors may come from a fragmented heap")


def _file_mapping(start: int, end: int) -> bool:
    """Whether [start, end) lies inside one mapping of a file."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(a, 16) for a in parts[0].split("-"))
            if lo <= start and end <= hi:
                return parts[4] != "0"
    return False


def _only_file_pages(lo: int, hi: int, page: int) -> bool:
    """Whether no page of [lo, hi) holds data of its own (written, hence copied, or swapped): the kernel's
    page map flags each present page as file-backed or not (bit 61), a swapped one with bit 62."""
    count = (hi - lo) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(lo // page * 8)
        entries = np.frombuffer(f.read(count * 8), dtype=np.uint64)
    present, swapped, file = (entries >> np.uint64(b) & np.uint64(1) for b in (63, 62, 61))
    return len(entries) == count and not bool((swapped | (present & (file ^ np.uint64(1)))).any())


def release_file_pages(t: torch.Tensor) -> int:
    """Unmap from this process the whole pages under ``t`` where ``t`` lies in a file mapping whose pages
    under it were never written (safetensors as transformers loads them); returns the bytes released.

    The data stays readable (a later read faults it back in from the page cache), so this is for a tensor
    whose file stays mapped for the other tensors of the same shard: the pages it touched then stop
    counting in the process's resident memory. Any other tensor is left alone (0).
    """
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or not t.numel():
        return 0
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    page = os.sysconf("SC_PAGE_SIZE")
    lo, hi = -(-start // page) * page, end // page * page
    try:
        if hi <= lo or not _file_mapping(start, end) or not _only_file_pages(lo, hi, page):
            return 0
    except OSError:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED) != 0:
        log.debug("madvise failed: errno %d", ctypes.get_errno())
        return 0
    return hi - lo
