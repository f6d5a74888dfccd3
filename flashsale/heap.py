"""The C heap of a process that makes and frees large buffers at every batch: a product actor
(its commands, replies and appends) and the WAL service (its records and COPY data)."""

import ctypes

# Buffers up to this size come from the heap (see `keep_batch_buffers`): above what a flush of
# 50,000 events makes (about 5 MB of WAL record, 10 MB of COPY data).
HEAP_BUFFERS_MAX = 16 * 2**20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_libc = ctypes.CDLL(None)


def keep_batch_buffers() -> None:
    """Each batch makes and frees buffers of 0.1-1 MB. Ray's processes start with glibc's mmap
    threshold fixed at 128 kB (`configure_ray`), so each got a mapping of its own, grown with
    mremap and unmapped when freed, and its pages faulted in again on every batch: per call of
    1,000 reservations, about 4 mmaps, 13 mremaps and 4 munmaps (strace, when the actor also
    wrote its log). Served from the heap, which keeps their pages, they cost less: the WAL
    service spent 1.06-1.16 µs per reservation against 1.22-1.35 (its start-up objects frozen
    out of the collector too); after `bench core`'s churned sale, its actor's USS was 0.4-2.2 MB
    larger. Other C libraries have no mallopt, and nothing changes there."""
    mallopt = getattr(_libc, "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, HEAP_BUFFERS_MAX)


def return_free_pages() -> None:
    """Hand the heap's free pages back to the system: the heap keeps what a burst of batches
    freed (after `bench core`'s churned sale, 4.7 MB of its actor's 59 MB). glibc only."""
    malloc_trim = getattr(_libc, "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)
