"""Execution ids: UUID-shaped, ordered by creation time, so newest-first is `ORDER BY id DESC`."""

from __future__ import annotations

import os
import threading
import time

_lock = threading.Lock()
_last_ms = 0
_sequence = 0


def new_execution_id() -> str:
    """A UUIDv7-style id: 48 bits of milliseconds, 12 bits of sequence, 62 random bits.

    Ids made by one process are strictly increasing; ids made by different processes within
    the same millisecond are ordered arbitrarily.
    """
    global _last_ms, _sequence
    ms = time.time_ns() // 1_000_000
    with _lock:
        if ms <= _last_ms:
            _sequence += 1
            if _sequence > 0xFFF:
                _last_ms += 1
                _sequence = 0
            ms = _last_ms
        else:
            _last_ms, _sequence = ms, 0
        sequence = _sequence
    rand = int.from_bytes(os.urandom(8), "big") & 0x3FFF_FFFF_FFFF_FFFF
    value = (ms << 80) | (0x7 << 76) | (sequence << 64) | (0b10 << 62) | rand
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
