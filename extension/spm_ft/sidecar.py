"""Start/stop the ``spm serve`` sidecar from the WebUI settings."""

from __future__ import annotations

import re
import subprocess
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


class Sidecar:
    """A child ``spm serve`` process. ``start`` returns its URL once it listens."""

    def __init__(self):
        self.proc: Optional[subprocess.Popen] = None
        self.url: Optional[str] = None

    def start(self, cmd: List[str], wait_s: float = 120.0) -> str:
        if self.running():
            return self.url
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, text=True)
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

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 5.0):
        p, self.proc, self.url = self.proc, None, None
        if p is None:
            return
        if p.poll() is None:
            p.terminate()  # SIGTERM: spm serve shuts down gracefully
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
