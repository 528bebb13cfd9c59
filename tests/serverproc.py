"""Start ``guard serve`` as a real subprocess on a free loopback port, wait until ready, stop it afterwards."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(
        self, *args: str, env: dict[str, str] | None = None, log: Path, ready: bool = True, code: Path | None = None
    ) -> None:
        """``code``: run another checkout's ``guard`` (its root): the child starts there, so ``python -m`` finds
        that tree first (the current directory precedes both PYTHONPATH and this tree's editable install)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "guard.cli", "serve", "--port", str(self.port), *args]
        extra = {"PYTHONPATH": str(code)} if code else {}
        with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                command, env={**os.environ, **extra, **(env or {})}, stdout=out, stderr=subprocess.STDOUT, cwd=code
            )
        try:
            self.wait("/readyz" if ready else "/healthz")
        except BaseException:  # a server that never became ready does not outlive its test
            self.stop()
            raise

    def wait(self, path: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{path} not ready after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def wait_compiled(self, timeout: float = 600) -> None:
        """Until the decode step is compiled: the server decodes eagerly before (``/readyz``'s ``decode``).
        Returns at once for a server that does not compile, or whose ``/readyz`` does not say."""
        deadline = time.monotonic() + timeout
        while httpx.get(self.url + "/readyz", timeout=5).json().get("decode") == "compiling":
            if time.monotonic() > deadline:
                raise TimeoutError(f"the decode step did not compile in {timeout}s:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
