"""`llmforge serve` as a child process: started, waited for until healthy, stopped with SIGTERM.

For programs that talk to a server they own (tests, benchmarks, evaluation against an endpoint).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass
class ServerProcess:
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launch_server(model: str | Path, *args: str, threads: int | None = None,
                  log: Path | None = None, startup_timeout: float = 120.0,
                  stop_timeout: float = 30.0) -> Iterator[ServerProcess]:
    """Run `llmforge serve MODEL ARGS` on a free local port until the block ends.

    `threads` caps the server's OpenMP threads; output goes to `log` (else nowhere).
    """
    port = free_port()
    cmd = [sys.executable, "-m", "llmforge.cli", "serve", str(model), "--host", "127.0.0.1",
           "--port", str(port), *args]
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(log, "w")) if log else subprocess.DEVNULL
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env=_environment(threads))
        stack.callback(_stop, proc, stop_timeout)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                tail = log.read_text()[-2000:] if log else ""
                raise RuntimeError(f"llmforge serve exited with {proc.returncode}: "
                                   f"{' '.join(cmd)}\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"llmforge serve was not healthy after {startup_timeout:.0f}s")
            time.sleep(0.2)
        yield ServerProcess(url, proc)


def _environment(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM (requests in flight finish), then SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
