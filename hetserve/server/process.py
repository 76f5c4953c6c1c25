"""An HTTP server child process on a free loopback port, for code that measures or tests a real server
(the profiler's serving calibration, benchmarks, tests): `ServerProcess` runs `hetserve serve`,
`ChildServer` any server with a `/health` endpoint (e.g. llama.cpp's `llama-server`)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

from hetserve.worker.distributed import free_port


class ChildServer:
    def __init__(self, command: Callable[[int], Sequence[str]], startup_timeout: float = 600,
                 log_path: Path | None = None):
        """Starts `command(port)` and waits until GET /health answers 200 (a server may answer 503
        while it loads its model). Its output goes to `log_path`, or to a temporary file."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = list(command(self.port))
        self.log = open(log_path, "w+") if log_path else tempfile.TemporaryFile(mode="w+")
        # A log file, not a pipe: a pipe nobody reads would block the server once full.
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=self.log, text=True)
        try:
            self._wait_healthy(startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited ({self.process.returncode}): {self.log_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1, trust_env=False).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server did not become healthy in {timeout:.0f} s: {self.log_text()[-2000:]}")

    def log_text(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after 15 s; the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.flush()
        return self.process.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerProcess(ChildServer):
    """`hetserve serve` with extra `flags`."""

    def __init__(self, *flags: str, startup_timeout: float = 600):
        super().__init__(lambda port: [sys.executable, "-m", "hetserve.cli", "serve", "--host", "127.0.0.1",
                                       "--port", str(port), "--disable-log-requests", *flags], startup_timeout)
