"""Starting and stopping the real `spm serve` as the WebUI would."""

import os

import pytest

from conftest import FIXTURES, SPM_BIN, need_binary
from spm_ft.client import GateClient
from spm_ft.sidecar import Sidecar, serve_command


def test_command_line():
    assert serve_command("/x/spm", 0, "/m", "/te", "tok") == [
        "/x/spm", "serve", "--host", "127.0.0.1", "--port", "0", "--membranes", "/m",
        "--text-encoder", "/te", "--token", "tok"]
    assert serve_command("spm", 7862) == ["spm", "serve", "--host", "127.0.0.1", "--port", "7862"]


def test_start_and_stop(mem_dir):
    need_binary()
    s = Sidecar()
    url = s.start(serve_command(SPM_BIN, 0, str(mem_dir), os.path.join(FIXTURES, "base"), "t0k"))
    try:
        assert url.startswith("http://127.0.0.1:") and s.running()
        assert s.start([SPM_BIN, "nonsense"]) == url  # already running: no second process
        r = GateClient(url, token="t0k", timeout=5).gates(["a photo of pikachu"], ["spm"])
        assert not r.failed and r.gates[0]["spm"] == pytest.approx(1.0)
        proc = s.proc
    finally:
        s.stop()
    assert not s.running() and proc.returncode == 0  # SIGTERM: graceful exit
    assert GateClient(url, token="t0k", timeout=1).gates(["a cat"], ["spm"]).failed


def test_start_failure_is_reported(tmp_path):
    need_binary()
    s = Sidecar()
    with pytest.raises(RuntimeError, match="did not start"):
        s.start(serve_command(SPM_BIN, 0, str(tmp_path), str(tmp_path / "no-such-encoder")), wait_s=30)
    assert not s.running()


def test_sidecar_dies_with_the_webui(mem_dir, tmp_path):
    """The WebUI leaves with os._exit on Ctrl-C and restart (A1111 v1.10.1
    modules/initialize_util.py:163-169, modules/restart.py:25): no atexit handler
    runs. The sidecar must not outlive it (Linux: parent-death signal)."""
    import subprocess
    import sys
    import time

    need_binary()
    if not sys.platform.startswith("linux"):
        pytest.skip("the parent-death tie is Linux-only")
    ext = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import os, sys, threading, time; sys.path.insert(0, %r)\n"
        "from spm_ft.sidecar import Sidecar, serve_command\n"
        "s = Sidecar()\n"
        "def run():\n"
        "    s.start(serve_command(%r, 0, %r))\n"
        "    print(s.proc.pid, flush=True)\n"
        "    s.hold()\n"
        "threading.Thread(target=run, daemon=True).start()\n"
        "time.sleep(60)\n" % (ext, SPM_BIN, str(mem_dir)))
    webui = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pid = int(webui.stdout.readline())
    os.kill(pid, 0)  # the sidecar runs
    webui.kill()  # like os._exit: no cleanup in the parent
    webui.wait()
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        try:  # reap it if it became our zombie (it is not our child: ignore)
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        pytest.fail("the sidecar outlived the WebUI process")
