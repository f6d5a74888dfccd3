"""Framing of WAL records and snapshots: a length and a CRC-32 ahead of the payload."""

import struct
import zlib

_HEADER = struct.Struct(">II")


class CorruptRecord(Exception):
    """A record whose length or checksum does not match its payload."""


def frame(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def unframe(record: bytes) -> bytes:
    if len(record) < _HEADER.size:
        raise CorruptRecord(f"record of {len(record)} bytes is shorter than its header")
    length, checksum = _HEADER.unpack_from(record)
    payload = record[_HEADER.size:]
    if len(payload) != length:
        raise CorruptRecord(f"record is cut short: {len(payload)} of {length} bytes")
    if zlib.crc32(payload) != checksum:
        raise CorruptRecord("record checksum does not match")
    return payload
