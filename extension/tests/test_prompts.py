from spm_ft.prompts import and_count, parse_always_on, parse_lora_tags, strip_all_tags, strip_lora_tags


def one(s):
    (t,) = parse_lora_tags(s)
    return t


def test_positional_forms():
    t = one("a cat <lora:spm:0.8> x")
    assert (t.name, t.te, t.unet, t.dyn) == ("spm", 0.8, 0.8, None)
    t = one("<lora:spm:0.5:0.7>")
    assert (t.te, t.unet) == (0.5, 0.7)
    t = one("<lora:spm:0.5:0.7:16>")
    assert (t.te, t.unet, t.dyn) == (0.5, 0.7, 16)
    t = one("<lora:spm>")
    assert (t.te, t.unet) == (1.0, 1.0)


def test_named_forms_and_lyco():
    t = one("<lora:spm:unet=0.3>")
    assert (t.te, t.unet) == (1.0, 0.3)
    t = one("<lora:spm:te=0.2:unet=0.6:dyn=4>")
    assert (t.te, t.unet, t.dyn) == (0.2, 0.6, 4)
    t = one("<lora:spm:0.4:dyn=8>")
    assert (t.te, t.unet, t.dyn) == (0.4, 0.4, 8)
    t = one("<lyco:spm:0.9>")
    assert t.name == "spm" and t.unet == 0.9


def test_other_kinds_and_garbage_ignored():
    assert parse_lora_tags("<hypernet:x:1> <lora::1> plain") == []
    assert one("<lora:spm:abc>").unet == 1.0


def test_strip_only_named():
    s = "a <lora:spm:0.8> photo <lora:style:1> of <lora:spm:1>cat"
    assert strip_lora_tags(s, {"spm"}) == "a  photo <lora:style:1> of cat"
    assert strip_lora_tags(s, set()) == s
    assert strip_all_tags(s) == "a  photo  of cat"


def test_and_count():
    assert and_count("a cat") == 1
    assert and_count("a cat AND a dog :1.2 AND x") == 3
    assert and_count("ANDROID and ANDes") == 1


def test_always_on():
    assert parse_always_on("nsfw, violence:0.8\n gore") == {"nsfw": 1.0, "violence": 0.8, "gore": 1.0}
    assert parse_always_on("") == {}
