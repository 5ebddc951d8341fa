"""The Redis connection the benchmark counts completions with.

redis-py when it is installed, as the peers' job uses; otherwise a minimal client that
speaks just the commands the benchmark needs, so `make bench` runs in the project's venv.
RESULTS.md says which one a run used.
"""

from __future__ import annotations

import os
import socket
from typing import Any
from urllib.parse import urlparse

DEFAULT_URL = "redis://127.0.0.1:6379/15"


def redis_url() -> str:
    return os.environ.get("DEFERQ_BENCH_REDIS", DEFAULT_URL)


def connect(url: str | None = None) -> Any:
    """A client with `incr`, `get`, `delete`, `rpush`, `llen` and `lrange`."""
    url = url or redis_url()
    try:
        import redis
    except ImportError:
        return MiniRedis(url)
    return redis.Redis.from_url(url)


def client_name() -> str:
    try:
        import redis
    except ImportError:
        return "built-in minimal client (redis-py not installed)"
    return f"redis-py {redis.__version__}"


class MiniRedis:
    """One socket, opened on first use, speaking RESP; enough for counters and lists."""

    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        self.address = (parsed.hostname or "127.0.0.1", parsed.port or 6379)
        self.db = int(parsed.path.strip("/") or 0)
        self.sock: socket.socket | None = None
        self.reader: Any = None

    def _command(self, *parts: Any) -> Any:
        if self.sock is None:
            self.sock = socket.create_connection(self.address)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.reader = self.sock.makefile("rb")
            if self.db:
                self.sock.sendall(_encode(("SELECT", self.db)))
                self._reply()
        self.sock.sendall(_encode(parts))
        return self._reply()

    def _reply(self) -> Any:
        line = self.reader.readline()
        kind, rest = line[:1], line[1:-2]
        if kind in (b"+", b":"):
            return int(rest) if kind == b":" else rest
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self.reader.read(size + 2)[:-2]
        if kind == b"*":
            return [self._reply() for _ in range(int(rest))]
        raise RuntimeError(f"unexpected Redis reply {line!r}")

    def incr(self, key: str) -> int:
        return int(self._command("INCR", key))

    def get(self, key: str) -> bytes | None:
        value: bytes | None = self._command("GET", key)
        return value

    def delete(self, *keys: str) -> int:
        return int(self._command("DEL", *keys))

    def rpush(self, key: str, *values: Any) -> int:
        return int(self._command("RPUSH", key, *values))

    def llen(self, key: str) -> int:
        return int(self._command("LLEN", key))

    def lrange(self, key: str, start: int, end: int) -> list[bytes]:
        values: list[bytes] = self._command("LRANGE", key, start, end)
        return values


def _encode(parts: Any) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)
