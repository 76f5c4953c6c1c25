"""A `hetserve serve` child process on a free loopback port, for code that measures or tests a real
server over HTTP (the profiler's serving calibration, benchmarks, tests)."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time

import httpx

from hetserve.worker.distributed import free_port


class ServerProcess:
    def __init__(self, *flags: str, startup_timeout: float = 600):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hetserve.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--disable-log-requests", *flags],
            # A log file, not a pipe: a pipe nobody reads would block the server once full.
            stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited: {self.log.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become healthy in {startup_timeout:.0f} s")

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after 15 s; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
