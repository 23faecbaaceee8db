"""Process-wide memory policy for runs that read and free large tensors one after another."""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 1 << 20


def mmap_large_allocations() -> None:
    """Make glibc serve every allocation of 1 MiB or more with its own mapping, returned when freed.

    By default glibc raises that threshold as large blocks are freed (up to 32 MiB), and tensors below it
    then come from a heap that is not given back: reading a model block by block grew the resident memory
    with depth (RTN of a 20-block model: 1.83 GiB peak, 0.78 GiB with this; tests/test_memory_limit.py).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (fixes it: no dynamic rise)
    except (OSError, AttributeError):
        log.debug("no mallopt here: freed tensors may stay in the heap")
