"""Time-ordered ids (UUIDv7, RFC 9562): new orders land at the right end of the primary-key
index instead of on random pages, and sorting by id sorts by creation time."""

import os
import time
import uuid


def uuid7() -> str:
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms << 80) | (0x7 << 76) | ((rand >> 64) & 0xFFF) << 64 | (0b10 << 62) | (
        rand & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))
