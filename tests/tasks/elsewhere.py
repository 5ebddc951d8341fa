"""A background function that some test workers do not import, so they must not run it."""

from __future__ import annotations

import os

from deferq import defer


@defer
def mark_elsewhere(path: str) -> int:
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{os.getpid()}\n")
    return os.getpid()
