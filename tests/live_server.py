"""A `hetserve serve` process on a free loopback port with the tests' small settings."""

from __future__ import annotations

from hetserve.server.process import ServerProcess


class Server(ServerProcess):
    def __init__(self, *flags: str):
        super().__init__("--dtype", "float32", "--kv-cache-memory", "256MiB", "--max-model-len", "2048", *flags,
                         startup_timeout=120)
