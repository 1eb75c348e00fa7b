"""Start/stop the ``spm serve`` sidecar from the WebUI settings."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from typing import List, Optional

_ADDR = re.compile(r"listening on (http://\S+)")


def serve_command(binary: str, port: int = 0, membranes: str = "", text_encoder: str = "",
                  token: str = "", host: str = "127.0.0.1") -> List[str]:
    cmd = [binary, "serve", "--host", host, "--port", str(int(port))]
    if membranes:
        cmd += ["--membranes", membranes]
    if text_encoder:
        cmd += ["--text-encoder", text_encoder]
    if token:
        cmd += ["--token", token]
    return cmd


def _die_with_parent():  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM the sidecar when the thread that started it ends. The WebUI
    leaves through ``os._exit`` on Ctrl-C and on restart (no atexit handler runs),
    and a plain SIGTERM skips atexit too; without this the sidecar outlives it."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Sidecar:
    """A child ``spm serve`` process. ``start`` returns its URL once it listens.

    On Linux the child is tied to the starting thread's life (``PR_SET_PDEATHSIG``):
    start it from a thread that lives as long as the WebUI and call :meth:`hold`
    there (or from the main thread)."""

    def __init__(self):
        self.proc: Optional[subprocess.Popen] = None
        self.url: Optional[str] = None
        self._released = threading.Event()

    def start(self, cmd: List[str], wait_s: float = 120.0) -> str:
        if self.running():
            return self.url
        self._released.clear()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, text=True,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        found = {}

        def read():
            for line in self.proc.stdout:
                m = _ADDR.search(line)
                if m:
                    found["url"] = m.group(1)
                    break
            # keep draining so the child never blocks on a full pipe
            for _ in self.proc.stdout:
                pass

        t = threading.Thread(target=read, daemon=True, name="spm-sidecar-stdout")
        t.start()
        import time

        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and "url" not in found:
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        if "url" not in found:
            rc = self.proc.poll()
            self.stop()
            raise RuntimeError(f"spm serve did not start (exit code {rc}): {' '.join(cmd)}")
        self.url = found["url"]
        return self.url

    def hold(self):
        """Block until :meth:`stop` (keeps a starting thread, and so the Linux
        parent-death tie, alive)."""
        self._released.wait()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 5.0):
        p, self.proc, self.url = self.proc, None, None
        self._released.set()
        if p is None:
            return
        if p.poll() is None:
            p.terminate()  # SIGTERM: spm serve shuts down gracefully
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
