"""The sidecar client against the real `spm serve` binary."""

import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from conftest import start_daemon
from spm_ft.client import GateClient
from spm_ft.job import compute_job


def test_health_and_gates(daemon):
    c = GateClient(daemon.url, timeout=5)
    assert c.health()["status"] == "ok"
    r = c.gates(["a photo of pikachu", "a cat", "a dog"], ["spm", "spm2"])
    assert not r.failed, r.reason
    assert r.metric == "clipcos_tokenuni" and r.curve == "reference"
    assert r.gates[0]["spm"] == pytest.approx(1.0)
    assert r.gates[1]["spm2"] == pytest.approx(1.0)
    # the reference curve: strength = rate² (m² applied linearly by the extension)
    d = r.details[2]["spm"]
    assert d["strength"] == pytest.approx(d["rate"] ** 2)
    assert 0 < r.gates[2]["spm"] < 1
    assert c.requests_made == 1


def test_one_call_and_cache(daemon):
    c = GateClient(daemon.url, timeout=5)
    a = c.gates(["a cat", "a dog", "a cat"], ["spm"])
    assert c.requests_made == 1 and a.cached == 0
    b = c.gates(["a dog", "a cat"], ["spm"])
    assert c.requests_made == 1 and b.cached == 2
    assert b.gates[0] == a.gates[1]
    c.gates(["a dog"], ["spm"], metric="tokenuni", curve="linear")
    assert c.requests_made == 2  # metric/curve are part of the key
    c.gates(["a dog"], ["spm", "spm2"])
    assert c.requests_made == 3  # so is the membrane set


def test_metric_and_curve(daemon):
    c = GateClient(daemon.url, timeout=5)
    r = c.gates(["a photo of pikachu", "a cat"], ["spm"], metric="tokenuni", curve="linear")
    assert not r.failed
    assert r.gates[0]["spm"] == 1.0 and r.gates[1]["spm"] == 0.0
    lin = c.gates(["a dog"], ["spm"], curve="linear").details[0]["spm"]
    assert lin["strength"] == pytest.approx(lin["rate"])


def test_token_auth(mem_dir):
    d = start_daemon(mem_dir, "--token", "s3cret")
    try:
        ok = GateClient(d.url, token="s3cret", timeout=5).gates(["a cat"], ["spm"])
        assert not ok.failed
        bad = GateClient(d.url, token="wrong", timeout=5).gates(["a cat"], ["spm"])
        assert bad.failed and "401" in bad.reason and bad.gates == [{"spm": 1.0}]
        none = GateClient(d.url, timeout=5).gates(["a cat"], ["spm"])
        assert none.failed and "401" in none.reason
    finally:
        d.kill()


def test_fail_closed_on_killed_sidecar(mem_dir):
    d = start_daemon(mem_dir)
    c = GateClient(d.url, timeout=2)
    assert not c.gates(["a dog"], ["spm", "spm2"]).failed
    d.kill()
    r = c.gates(["a horse", "a cow"], ["spm", "spm2"])
    assert r.failed and "unreachable" in r.reason
    assert r.gates == [{"spm": 1.0, "spm2": 1.0}] * 2
    # a cached prompt still answers from the cache; an uncached one in the same batch fails all
    r2 = c.gates(["a dog", "a horse"], ["spm"])
    assert r2.failed and r2.gates == [{"spm": 1.0}] * 2


def test_fail_closed_on_errors(daemon, mem_dir):
    c = GateClient(daemon.url, timeout=5)
    r = c.gates(["a cat"], ["nope"])
    assert r.failed and "404" in r.reason and r.gates == [{"nope": 1.0}]
    r = c.gates(["a cat"], ["spm"], metric="bogus")
    assert r.failed and "400" in r.reason
    r = c.gates([f"x{i}" for i in range(65)], ["spm"])  # over --max-prompts
    assert r.failed and "413" in r.reason
    # failures are not cached: the same request works once it is valid
    assert not c.gates(["a cat"], ["spm"]).failed


def test_no_encoder_metric_fails_closed(mem_dir):
    d = start_daemon(mem_dir, encoder=False)
    try:
        c = GateClient(d.url, timeout=5)
        r = c.gates(["a cat"], ["spm"])  # clipcos needs an encoder: 422
        assert r.failed and "422" in r.reason
        assert not c.gates(["a cat"], ["spm"], metric="tokenuni").failed
    finally:
        d.kill()


def test_fail_closed_on_slow_sidecar():
    class Slow(BaseHTTPRequestHandler):
        def do_POST(self):
            time.sleep(1.5)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"results":[]}')

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        c = GateClient(f"http://127.0.0.1:{srv.server_port}", timeout=0.3)
        t = time.monotonic()
        r = c.gates(["a cat"], ["spm"])
        assert time.monotonic() - t < 1.2
        assert r.failed and r.gates == [{"spm": 1.0}]
    finally:
        srv.shutdown()


def test_fail_closed_on_malformed_answer():
    class Bad(BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"results":[{"prompt":"a","gates":{"spm":{"strength":"nan"}}}]}')

        def log_message(self, *a):
            pass

    srv = HTTPServer(("127.0.0.1", 0), Bad)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        r = GateClient(f"http://127.0.0.1:{srv.server_port}", timeout=2).gates(["a"], ["spm"])
        assert r.failed and "malformed" in r.reason and r.gates == [{"spm": 1.0}]
    finally:
        srv.shutdown()


def test_no_url_and_no_membranes():
    assert GateClient("").gates(["a"], ["spm"]).failed
    r = GateClient("").gates(["a"], [])
    assert not r.failed and r.gates == [{}]


def test_job_against_real_sidecar(daemon, mem_dir):
    files = {"spm": str(mem_dir / "spm.safetensors"), "spm2": str(mem_dir / "spm2.safetensors"),
             "alias": str(mem_dir / "spm.safetensors")}
    c = GateClient(daemon.url, timeout=5)
    job = compute_job(
        ["a photo of pikachu <lora:spm:0.5>", "a cat <lora:style:1>", "a dog AND a cat"],
        ["hires pikachu <lora:spm:0.5>", "a cat <lora:style:1>", "a dog AND a cat"],
        {"spm2": 1.0}, files.get, lambda p: p.endswith("spm.safetensors") or p.endswith("spm2.safetensors"),
        c, "clipcos_tokenuni", "reference")
    # one request per normalisation: the always-on spm2 strictly, the prompt's spm as the reference
    assert not job.failed and c.requests_made == 2
    assert job.base_prompts[0] == "a photo of pikachu "
    assert job.base_prompts[1] == "a cat <lora:style:1>"  # non-SPM tags stay for the built-in loader
    assert job.taken_over == {"spm"}
    assert job.base[0]["spm"] == pytest.approx(0.5)  # ceiling × strength 1.0
    assert job.base[1]["spm"] == 0.0 and job.base[1]["spm2"] == pytest.approx(1.0)
    assert job.repeats == [1, 1, 2]
    assert job.batch(0, 2) == {"spm": [pytest.approx(0.5), 0.0], "spm2": [job.base[0]["spm2"], pytest.approx(1.0)]}
    assert job.batch(1, 2)["spm"] == [0.0]
    info = job.infotext_params()
    assert info["SPM gates"](index=0).startswith("spm=0.50, spm2=0.")
    assert info["SPM gates"](index=1) == "spm=0.00, spm2=1.00"
    assert info["SPM metric"] == "clipcos_tokenuni, curve reference"
    assert "SPM note" not in info
    daemon.kill()
    job2 = compute_job(["a horse <lora:spm:0.7>", "a cow"], None, {"spm2": 1.0}, files.get,
                       lambda p: True, GateClient(daemon.url, timeout=1), "clipcos_tokenuni", "reference")
    assert job2.failed
    assert job2.base == [{"spm": pytest.approx(0.7), "spm2": 1.0}, {"spm": 0.0, "spm2": 1.0}]
    assert "full erasure" in job2.infotext_params()["SPM note"]


def test_cached_gates_marked_when_sidecar_dies(mem_dir):
    d = start_daemon(mem_dir)
    c = GateClient(d.url, timeout=2)
    live = c.gates(["a dog", "a photo of pikachu"], ["spm"])
    assert live.sources == ["sidecar", "sidecar"] and not live.degraded
    again = c.gates(["a dog"], ["spm"])  # cached, sidecar up: a health check, no /v1/gate
    assert again.sources == ["sidecar"] and c.requests_made == 1 and not again.reason
    d.kill()
    r = c.gates(["a dog"], ["spm"])
    assert r.sources == ["cache"] and not r.failed and "unreachable" in r.reason
    assert r.gates == [live.gates[0]]
    r = c.gates(["a photo of pikachu", "a horse"], ["spm"])
    assert r.sources == ["cache", "forced"] and r.failed
    assert r.gates == [live.gates[1], {"spm": 1.0}]


class Recorder(BaseHTTPRequestHandler):
    bodies = []

    def do_POST(self):
        import json
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Recorder.bodies.append(body)
        res = [{"prompt": p, "gates": {n: {"strength": 0.25, "rate": 0.5} for n in body["membranes"]}}
               for p in body["prompts"]]
        out = json.dumps({"results": res}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


def test_always_on_membranes_use_strict_normalisation():
    """Always-on (moderation) membranes are asked with "normalize": "strict", SPMs
    named in the prompt with the sidecar's default (the field left out)."""
    Recorder.bodies = []
    srv = HTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        c = GateClient(f"http://127.0.0.1:{srv.server_port}", timeout=2)
        files = {"spm": "/m/spm.safetensors", "mod": "/m/mod.safetensors"}
        job = compute_job(["pi\u200bka\u200bchu <lora:spm:1>", "a cat"], None, {"mod": 1.0}, files.get,
                          lambda p: True, c, "clipcos_tokenuni", "reference")
        strict, plain = Recorder.bodies
        assert strict["membranes"] == ["mod"] and strict["normalize"] == "strict"
        assert plain["membranes"] == ["spm"] and "normalize" not in plain
        assert strict["prompts"] == plain["prompts"] == ["pi\u200bka\u200bchu ", "a cat"]
        assert job.base == [{"mod": 0.25, "spm": 0.25}, {"mod": 0.25, "spm": 0.0}]
        # only always-on membranes: one strict request; the cache key includes the normalisation
        compute_job(["a cat"], None, {"mod": 1.0}, files.get, lambda p: True, c, "clipcos_tokenuni", "reference")
        assert len(Recorder.bodies) == 2  # cached
        c.gates(["a cat"], ["mod"])  # same prompt, reference normalisation: not the cached strict answer
        assert len(Recorder.bodies) == 3 and "normalize" not in Recorder.bodies[-1]
        # a membrane both always-on and named in the prompt is gated strictly
        compute_job(["a dog <lora:mod:1>"], None, {"mod": 0.5}, files.get, lambda p: True, c,
                    "clipcos_tokenuni", "reference")
        assert Recorder.bodies[-1]["normalize"] == "strict" and Recorder.bodies[-1]["membranes"] == ["mod"]
    finally:
        srv.shutdown()


def test_strict_normalisation_against_real_sidecar(daemon):
    """With the real sidecar: a zero-width-split spelling gets the strict gate of the
    plain spelling (skipped while the sidecar predates the "normalize" field)."""
    c = GateClient(daemon.url, timeout=5)
    r = c.gates(["a photo of pi\u200bka\u200bchu", "a photo of pikachu"], ["spm"], normalize="strict")
    if r.failed and "400" in r.reason and "normalize" in r.reason:
        pytest.skip(f"this spm binary does not accept \"normalize\" yet: {r.reason}")
    assert not r.failed, r.reason
    assert r.gates[0]["spm"] == pytest.approx(r.gates[1]["spm"])
