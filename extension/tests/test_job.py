"""Job-level gate composition with a stub client (no sidecar needed)."""

from spm_ft.client import GateResult
from spm_ft.job import compute_job


class Stub:
    def __init__(self, strength=0.5, failed=False):
        self.calls = []
        self.strength, self.failed = strength, failed

    def gates(self, prompts, membranes, metric, curve, normalize="reference"):
        self.calls.append((list(prompts), list(membranes)))
        s = 1.0 if self.failed else self.strength
        return GateResult([{n: s for n in membranes} for _ in prompts], failed=self.failed,
                          reason="down" if self.failed else "", metric=metric, curve=curve)


FILES = {"spm": "/m/spm.safetensors", "mod": "/m/mod.safetensors", "style": "/l/style.safetensors",
         "alias": "/m/spm.safetensors"}


def job(prompts, always=None, client=None, hr=None, enabled=True):
    return compute_job(prompts, hr, always or {}, FILES.get, lambda p: p.startswith("/m/"),
                       client or Stub(), "clipcos_tokenuni", "reference", take_over_prompt_spms=enabled)


def test_prompt_cannot_switch_off_always_on():
    j = job(["a <lora:mod:0> b", "c"], {"mod": 1.0})
    assert [r["mod"] for r in j.base] == [0.5, 0.5]
    assert j.base_prompts[0] == "a  b"


def test_always_on_weight_and_prompt_raise():
    j = job(["a <lora:mod:1>", "c"], {"mod": 0.6})
    assert [r["mod"] for r in j.base] == [0.5, 0.3]


def test_alias_and_lyco_map_to_file_stem():
    c = Stub()
    j = job(["x <lyco:alias:0.4>", "y <lora:spm:unet=0.8:te=0.1>"], client=c)
    assert list(j.membranes) == ["spm"]
    assert [r["spm"] for r in j.base] == [0.2, 0.4]
    assert j.taken_over == {"alias", "spm"}
    assert c.calls == [(["x ", "y "], ["spm"])]


def test_non_spm_lora_untouched_and_no_call_without_membranes():
    c = Stub()
    j = job(["a <lora:style:1>"], client=c)
    assert c.calls == [] and j.membranes == {} and j.infotext_params() == {}
    assert j.base_prompts == ["a <lora:style:1>"]


def test_single_call_with_hires_prompts():
    c = Stub()
    j = job(["a <lora:spm:1>", "b"], hr=["A <lora:spm:1>", "b"], client=c)
    assert len(c.calls) == 1 and c.calls[0][0] == ["a ", "b", "A ", "b"]
    assert j.batch(0, 2, hires=True) == {"spm": [0.5, 0.0]}


def test_disabled_keeps_prompt_spms_out():
    c = Stub()
    j = job(["a <lora:spm:1>"], {"mod": 1.0}, client=c, enabled=False)
    assert list(j.membranes) == ["mod"] and j.base_prompts == ["a <lora:spm:1>"]


def test_failed_means_full_ceiling_and_note():
    j = job(["a <lora:spm:0.7>", "b"], {"mod": 1.0}, client=Stub(failed=True))
    assert j.failed and j.base == [{"spm": 0.7, "mod": 1.0}, {"spm": 0.0, "mod": 1.0}]
    info = j.infotext_params()
    assert info["SPM gates"](index=0) == "mod=1.00, spm=0.70"
    assert "gates forced to 1.0" in info["SPM note"] and "down" in info["SPM note"]
    assert str(info["SPM gates"]) == "mod=1.00, spm=0.70"
