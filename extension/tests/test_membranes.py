import json
import os
import struct

import pytest
import torch

from conftest import FIXTURES
from spm_ft.membranes import (HeaderError, build_plan, find_membrane_file, is_spm_file, is_spm_metadata,
                              load_factors, read_header, read_metadata)


def write_st(path, meta, tensors=None):
    from safetensors.torch import save_file
    save_file(tensors or {"lora_unet_x.lora_down.weight": torch.zeros(1, 4)}, str(path), metadata=meta)


def test_fixture_spms_detected():
    assert is_spm_file(os.path.join(FIXTURES, "spm.safetensors"))
    assert read_metadata(os.path.join(FIXTURES, "spm2.safetensors"))["prompts"] == "cat"


@pytest.mark.parametrize("f", ["kohya_te.safetensors", "locon.safetensors", "dora.safetensors",
                               "base_ldm.safetensors"])
def test_non_spm_fixtures(f):
    assert not is_spm_file(os.path.join(FIXTURES, f))


def test_kohya_converted_keeps_prompts(tmp_path):
    write_st(tmp_path / "k.safetensors", {"ss_network_module": "networks.lora", "prompts": "pikachu, cat"})
    assert is_spm_file(str(tmp_path / "k.safetensors"))
    write_st(tmp_path / "e.safetensors", {"prompts": "  "})
    assert not is_spm_file(str(tmp_path / "e.safetensors"))
    write_st(tmp_path / "n.safetensors", None)
    assert not is_spm_file(str(tmp_path / "n.safetensors"))
    assert not is_spm_metadata({"prompt": "x"})


def test_bad_headers(tmp_path):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(b"\x01\x02")
    with pytest.raises(HeaderError):
        read_header(str(p))
    p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(HeaderError):
        read_header(str(p))
    p.write_bytes(struct.pack("<Q", 10) + b"{")
    with pytest.raises(HeaderError):
        read_header(str(p))
    body = b"[1,2]"
    p.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(HeaderError):
        read_header(str(p))
    assert not is_spm_file(str(p))
    assert not is_spm_file(str(tmp_path / "missing.safetensors"))
    assert not is_spm_file(os.path.join(FIXTURES, "spm.pt"))


def test_header_cap(tmp_path):
    body = json.dumps({"__metadata__": {"prompts": "x" * 5000}}).encode()
    p = tmp_path / "big.safetensors"
    p.write_bytes(struct.pack("<Q", len(body)) + body)
    assert read_metadata(str(p))["prompts"].startswith("x")
    with pytest.raises(HeaderError):
        read_header(str(p), cap=1000)


def test_load_factors_and_plan():
    f = load_factors(os.path.join(FIXTURES, "spm.safetensors"))
    assert len(f) == 192 and all(k.startswith("lora_unet_") for k in f)
    d, u, a = f["lora_unet_down_blocks_0_attentions_0_proj_in"]
    assert d.shape == (1, 8, 1, 1) and u.shape == (8, 1, 1, 1) and a == 1.0
    mods = {"lora_unet_down_blocks_0_attentions_0_proj_in": torch.nn.Conv2d(8, 8, 1)}
    plan, missing = build_plan(f, mods.get)
    assert len(plan) == 1 and plan[0].scale == 1.0 and len(missing) == 191


def test_load_factors_skips_te(tmp_path):
    t = {"lora_te_text_model_x.lora_down.weight": torch.zeros(2, 4),
         "lora_te_text_model_x.lora_up.weight": torch.zeros(4, 2),
         "lora_unet_y.lora_down.weight": torch.zeros(2, 4),
         "lora_unet_y.lora_up.weight": torch.zeros(4, 2),
         "lora_unet_y.alpha": torch.tensor(1.0),
         "lora_unet_z.lora_down.weight": torch.zeros(2, 4)}
    write_st(tmp_path / "m.safetensors", {"prompts": "x"}, t)
    f = load_factors(str(tmp_path / "m.safetensors"))
    assert list(f) == ["lora_unet_y"] and f["lora_unet_y"][2] == 1.0


def test_find_membrane_file(tmp_path):
    (tmp_path / "sub").mkdir()
    write_st(tmp_path / "sub" / "Nudity.safetensors", {"prompts": "x"})
    assert find_membrane_file("nudity", [str(tmp_path / "none"), str(tmp_path)]).endswith("Nudity.safetensors")
    assert find_membrane_file("other", [str(tmp_path)]) is None
