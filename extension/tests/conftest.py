import os
import shutil
import subprocess
import sys
import threading

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
EXT = os.path.dirname(HERE)
REPO = os.path.dirname(EXT)
sys.path.insert(0, EXT)

FIXTURES = os.path.join(REPO, "fixtures", "data", "sd1")
SPM_BIN = os.environ.get("SPM_BIN") or os.path.join(REPO, "target", "release", "spm")


def need_binary():
    if not os.path.isfile(SPM_BIN):
        if os.environ.get("CI"):
            pytest.fail(f"spm binary missing at {SPM_BIN} (CI is set: this test must run)")
        pytest.skip(f"spm binary missing at {SPM_BIN}")


class Daemon:
    def __init__(self, proc, url):
        self.proc, self.url = proc, url

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_daemon(mem_dir, *extra, encoder=True):
    need_binary()
    cmd = [SPM_BIN, "serve", "--port", "0", "--membranes", str(mem_dir)]
    if encoder:
        cmd += ["--text-encoder", os.path.join(FIXTURES, "base")]
    cmd += list(extra)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    assert "http://" in line, f"no address in {line!r}"
    url = "http://" + line.split("http://", 1)[1].split()[0]
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return Daemon(proc, url)


@pytest.fixture
def mem_dir(tmp_path):
    d = tmp_path / "membranes"
    d.mkdir()
    for f in ("spm.safetensors", "spm2.safetensors"):
        shutil.copy(os.path.join(FIXTURES, f), d / f)
    return d


@pytest.fixture
def daemon(mem_dir):
    d = start_daemon(mem_dir)
    yield d
    d.kill()
