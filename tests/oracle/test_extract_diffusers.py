"""`spm extract` checked with diffusers + peft (opt-in: needs torch, diffusers, peft).

The binary extracts a LoRA from fixtures/data/extract/tuned_full.pt (and the LDM / partial-bf16 variants) against
the tiny SD1 UNet; diffusers loads the result into a fresh base UNet, and the checks compare it with the
torch.linalg.svd reconstructions of fixtures/make_extract_fixtures.py (expected.safetensors / expected.json):

  (a) the LoRA UNet's output on a fixed input equals the output of a UNet whose extracted weights were replaced by
      base + the float64 rank-R reconstruction (rel. 1e-5), and each loaded module's ΔW (peft's
      get_delta_weight) equals that reconstruction (rel. 1e-4 of ||ΔW||);
  (b) every module's `residual` in the --json report equals the fixture's within 1e-4 (absolute), the counts,
      skipped and dropped lists match, and the residual of the factors actually written (recomputed here in
      float64) agrees with the report;
  (c) at R=3 the modules that got only an exact rank-3 delta have residual < 1e-5, as reported and as recomputed
      from the written factors (an f32 SVD must be accurate enough for that; LAPACK's sgesdd gives ~5e-7).
  Also: the kohya output through `StableDiffusionPipeline.load_lora_weights`; dynamic ranks (sv_fro through diffusers,
  whose per-module ranks must be the fixture's kohya-formula ranks; sv_ratio / sv_cumulative reports); `--modules all`
  (the 3×3 conv and time_emb_proj LoCon modules through peft); the LDM and partial-bf16 inputs (reports).

Loading PEFT files: `unet.load_lora_adapter(path, prefix="unet", use_safetensors=True)` is the call that reads
the file's `lora_adapter_metadata` (r, lora_alpha, rank_pattern, alpha_pattern). Without `use_safetensors=True`
(or a `weight_name` ending in .safetensors) diffusers 0.42 loads the tensors through its pickle/bin branch and
ignores the header: then lora_alpha = r for every module (scale 1). `spm extract` writes alpha = r, so both calls
must give the same UNet; the test checks that too.

  SPM_BIN=target/debug/spm HF_HUB_OFFLINE=1 /tmp/oracle/bin/python -m pytest -q -rs tests/oracle
"""
import json
import os
import subprocess
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor  # noqa: E402

diffusers.utils.logging.disable_progress_bar()
diffusers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

ROOT = Path(__file__).resolve().parents[2]
SPM_BIN = os.environ.get("SPM_BIN") or str(ROOT / "target" / "debug" / "spm")
FIX = ROOT / "fixtures" / "data" / "extract"
BASE = ROOT / "fixtures" / "data" / "generate" / "sd1" / "unet"
PIPE = ROOT / "fixtures" / "data" / "generate" / "sd1"

OUT_REL = 1e-5          # (a) UNet output, relative L2
DW_REL = 1e-4           # (a) per-module ΔW, relative to ||ΔW||_F
RESIDUAL_ABS = 1e-4     # (b)
EXACT_RANK3 = 1e-5      # (c)


def _binary_problem():
    if not os.path.isfile(SPM_BIN):
        return f"spm binary missing at {SPM_BIN} (set SPM_BIN)"
    r = subprocess.run([SPM_BIN, "extract", "--help"], capture_output=True, text=True)
    if r.returncode != 0:
        first = ((r.stderr or r.stdout).strip().splitlines() or [""])[0]
        return f"{SPM_BIN} has no `extract` subcommand ({first})"
    return None


_problem = _binary_problem()
if _problem is None and not (FIX / "expected.json").is_file():
    _problem = f"{FIX}/expected.json missing: run fixtures/make_extract_fixtures.py"
pytestmark = pytest.mark.skipif(_problem is not None, reason=_problem or "")

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def expected():
    with open(FIX / "expected.json", encoding="utf-8") as f:
        doc = json.load(f)
    return doc, load_file(str(FIX / "expected.safetensors"))


@pytest.fixture(scope="module")
def extract(tmp_path_factory):
    """extract(tuned, to, *flags) -> (report, output path); each distinct call runs the binary once."""
    cache = {}
    d = tmp_path_factory.mktemp("extract")

    def run(tuned, to, *flags):
        key = (tuned, to, flags)
        if key not in cache:
            out = d / f"out{len(cache)}.safetensors"
            cmd = [SPM_BIN, "extract", "--base", str(BASE), "--tuned", str(FIX / tuned), "--to", to, *flags,
                   "--json", "-o", str(out)]
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr}"
            cache[key] = (json.loads(r.stdout), out)
        return cache[key]

    return run


def fresh_unet():
    u = UNet2DConditionModel.from_pretrained(str(BASE), torch_dtype=torch.float32, local_files_only=True).eval()
    u.set_attn_processor(AttnProcessor())
    return u


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([500, 37])
    return x, t, ctx


def forward(unet, inputs):
    x, t, ctx = inputs
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx).sample.double()


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def reference_unet(variant, rank_of, modules, tensors):
    """Base UNet with W ← W + (torch SVD rank-r reconstruction) for each module; rank_of(path) -> r."""
    u = fresh_unet()
    with torch.no_grad():
        for path in modules:
            w = u.get_submodule(path).weight
            w += tensors[f"{variant}/r{rank_of(path)}/{path}"].reshape(w.shape)
    return u


def lora_layers(unet):
    from peft.tuners.lora import LoraLayer
    return {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}


def check_report(report, doc, variant, rank_of, module_set="transformer", absent_ok=False):
    """(b): the report against the fixture."""
    exp = doc["variants"][variant]
    sets = exp["sets"][module_set]
    paths = [m["path"] for m in report["modules"]]
    assert sorted(paths) == sorted(sets["extracted_modules"])
    assert report["selected"] == sets["selected"]
    assert report["extracted"] == sets["extracted"]
    assert report["skipped_zero"] == sets["skipped_zero"]
    assert report["absent"] == sets["absent"]
    assert sorted(report["skipped"]) == sorted(sets["zero"])
    got_drop = {d["key"]: d["delta_fro"] for d in report["dropped"]}
    want_drop = {d["key"]: d["delta_fro"] for d in sets["dropped"]}
    assert sorted(got_drop) == sorted(want_drop)
    for k, v in want_drop.items():
        assert got_drop[k] == pytest.approx(v, rel=1e-6), k
    worst = (0.0, None)
    for m in report["modules"]:
        e = exp["modules"][m["path"]]
        r = rank_of(m["path"])
        assert m["rank"] == r, m["path"]
        assert m["max_rank"] == e["max_rank"], m["path"]
        assert m["kind"] == e["kind"], m["path"]
        assert m["delta_fro"] == pytest.approx(e["delta_fro"], rel=1e-6), m["path"]
        err = abs(m["residual"] - e["residual"][str(r)])
        worst = max(worst, (err, m["path"]))
        assert err <= RESIDUAL_ABS, (m["path"], m["residual"], e["residual"][str(r)])
        assert abs(m["kept"] - e["kept"][str(r)]) <= RESIDUAL_ABS, m["path"]
    return worst


def peft_factors(path_out):
    """{module path: (up [out, r], down [r, in·kh·kw])} from a PEFT output file."""
    out = {}
    with safe_open(str(path_out), "pt") as f:
        for k in f.keys():
            if k.endswith(".lora_A.weight"):
                p = k[len("unet."):-len(".lora_A.weight")]
                down = f.get_tensor(k)
                up = f.get_tensor(f"unet.{p}.lora_B.weight")
                out[p] = (up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1))
    return out


# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("R", [3, 1])
def test_peft_output_matches_torch_svd(R, extract, expected, inputs):
    doc, tensors = expected
    report, out = extract("tuned_full.pt", "peft", "--rank", str(R))
    assert report["rule"]["kind"] == "fixed" and report["rule"]["rank"] == R
    assert report["base_check"]["verdict"] == "ok"
    modules = doc["variants"]["full"]["sets"]["transformer"]["extracted_modules"]
    exp = doc["variants"]["full"]["modules"]

    # (b) the report, and the residual of the factors as written (float64 here)
    worst = check_report(report, doc, "full", lambda p: R)
    fac = peft_factors(out)
    assert sorted(fac) == sorted(modules)
    reported = {m["path"]: m for m in report["modules"]}
    for p, (up, down) in fac.items():
        assert up.dtype == torch.float32 and up.shape[1] == R and down.shape[0] == R, p
    base = fresh_unet()
    tuned = torch.load(str(FIX / "tuned_full.pt"), weights_only=True)
    for p, (up, down) in fac.items():
        w0 = base.get_submodule(p).weight.detach()
        dw = (tuned[p + ".weight"] - w0).reshape(w0.shape[0], -1).double()
        res = float((dw - up.double() @ down.double()).norm() / dw.norm())
        # the contract's residual is ||ΔW − up·down||/||ΔW|| of the factors written (f32 rounding: ~1e-7)
        assert abs(res - reported[p]["residual"]) <= 1e-6, \
            f"{p}: written factors leave {res:.3e}, the report says {reported[p]['residual']:.3e}"

    # (a) diffusers/peft load: the call that reads lora_alpha from the header ...
    lu = fresh_unet()
    lu.load_lora_adapter(str(out), prefix="unet", use_safetensors=True, adapter_name="extract")
    layers = lora_layers(lu)
    assert sorted(layers) == sorted(modules)
    for p, m in layers.items():
        assert m.r["extract"] == R and m.lora_alpha["extract"] == R and m.scaling["extract"] == 1.0, p
    # ... each module's ΔW is the torch reconstruction ...
    for p, m in layers.items():
        with torch.no_grad():
            got = m.get_delta_weight("extract").double()
        want = tensors[f"full/r{R}/{p}"].double().reshape(got.shape)
        assert float((got - want).norm()) <= DW_REL * exp[p]["delta_fro"], (p, float((got - want).norm()))
    # ... and the UNet output is the reference UNet's
    ref = reference_unet("full", lambda p: R, modules, tensors)
    y_lora, y_ref, y_base = forward(lu, inputs), forward(ref, inputs), forward(base, inputs)
    e = rel(y_lora, y_ref)
    assert e <= OUT_REL, f"LoRA UNet vs base + torch rank-{R} SVD: rel {e:.2e}"
    assert rel(y_base, y_ref) > 100 * OUT_REL, "the deltas must change the output (else the test proves nothing)"
    # the rank matters: the other rank's reconstruction is far off
    other = 1 if R == 3 else 3
    ref_other = reference_unet("full", lambda p: other, modules, tensors)
    assert rel(forward(ref_other, inputs), y_ref) > 10 * OUT_REL
    # alpha = r: the header-less load (lora_alpha defaults to r) gives the same UNet
    hu = fresh_unet()
    hu.load_lora_adapter(str(out), prefix="unet", adapter_name="noheader")
    assert rel(forward(hu, inputs), y_lora) <= 1e-7
    print(f"R={R}: out rel {e:.2e} (base→tuned effect {rel(y_base, y_ref):.2e}); worst residual diff "
          f"{worst[0]:.2e} at {worst[1]}")


def test_exact_rank3_deltas_are_recovered(extract, expected):
    """(c) modules that only got an exact rank-3 delta: residual at R=3 below 1e-5, both as reported and as
    recomputed here (float64) from the factors written to the file."""
    doc, _ = expected
    report, out = extract("tuned_full.pt", "peft", "--rank", "3")
    design = doc["design"]
    rank3 = {m["path"]: m["residual"] for m in report["modules"] if design[m["path"]]["kind"] == "rank3"}
    assert len(rank3) == 39
    bad = {p: r for p, r in rank3.items() if not r < EXACT_RANK3}
    assert not bad, f"reported residuals of rank-3 deltas at --rank 3 not below {EXACT_RANK3}: {bad}"
    base = load_file(str(BASE / "diffusion_pytorch_model.safetensors"))
    tuned = torch.load(str(FIX / "tuned_full.pt"), weights_only=True)
    fac = peft_factors(out)
    written = {}
    for p in rank3:
        up, down = fac[p]
        dw = (tuned[p + ".weight"] - base[p + ".weight"].float()).reshape(up.shape[0], -1).double()
        written[p] = float((dw - up.double() @ down.double()).norm() / dw.norm())
    bad = {p: r for p, r in written.items() if not r < EXACT_RANK3}
    assert not bad, f"written factors of rank-3 deltas at --rank 3 leave residual >= {EXACT_RANK3}: {bad}"
    # the fixture's own float64 SVD does it with room to spare
    assert max(doc["variants"]["full"]["modules"][p]["residual"]["3"] for p in rank3) < 1e-6


@pytest.mark.parametrize("tuned,variant,verdict", [("tuned_ldm.safetensors", "full", "ok"),
                                                   ("tuned_partial_bf16.safetensors", "partial_bf16",
                                                    "partial-file")])
def test_other_layouts_report(tuned, variant, verdict, extract, expected):
    """(b) for the LDM single file (same values as the .pt) and the partial bf16 file (absent targets)."""
    doc, _ = expected
    report, _ = extract(tuned, "peft", "--rank", "3")
    assert report["base_check"]["verdict"] == verdict
    check_report(report, doc, variant, lambda p: 3)


def test_dynamic_rank_sv_fro(extract, expected, inputs):
    """--sv-fro 0.9 --rank 8: kohya's formula ranks per module; diffusers loads the mixed ranks (rank_pattern)."""
    doc, tensors = expected
    exp = doc["variants"]["full"]["modules"]
    report, out = extract("tuned_full.pt", "peft", "--sv-fro", "0.9", "--rank", "8")
    assert report["rule"]["kind"] == "sv_fro" and report["rule"]["rank"] == 8
    rank_of = lambda p: exp[p]["dynamic"]["sv_fro"]  # noqa: E731
    check_report(report, doc, "full", rank_of)
    assert len({rank_of(m["path"]) for m in report["modules"]}) > 1
    modules = doc["variants"]["full"]["sets"]["transformer"]["extracted_modules"]
    lu = fresh_unet()
    lu.load_lora_adapter(str(out), prefix="unet", use_safetensors=True, adapter_name="dyn")
    for p, m in lora_layers(lu).items():
        assert m.r["dyn"] == rank_of(p) and m.scaling["dyn"] == 1.0, (p, m.r["dyn"], m.scaling["dyn"])
    ref = reference_unet("full", rank_of, modules, tensors)
    y = forward(lu, inputs)
    assert rel(y, forward(ref, inputs)) <= OUT_REL
    # header-less load: diffusers infers the ranks from the shapes and mirrors them into the alphas (scale 1)
    hu = fresh_unet()
    hu.load_lora_adapter(str(out), prefix="unet", adapter_name="dyn_noheader")
    assert rel(forward(hu, inputs), y) <= 1e-7


@pytest.mark.parametrize("rule,flag", [("sv_ratio", "--sv-ratio"), ("sv_cumulative", "--sv-cumulative")])
def test_dynamic_rank_other_rules(rule, flag, extract, expected):
    doc, _ = expected
    exp = doc["variants"]["full"]["modules"]
    param = doc["rules"][rule]
    report, _ = extract("tuned_full.pt", "peft", flag, str(param), "--rank", "8")
    check_report(report, doc, "full", lambda p: exp[p]["dynamic"][rule])


def test_kohya_output_through_load_lora_weights(extract, expected, inputs):
    """--to kohya, loaded by diffusers' kohya path (pipeline.load_lora_weights: lora_state_dict converts the
    kohya names and passes the `.alpha` tensors as network_alphas)."""
    doc, tensors = expected
    report, out = extract("tuned_full.pt", "kohya", "--rank", "3")
    check_report(report, doc, "full", lambda p: 3)
    pipe = StableDiffusionPipeline.from_pretrained(str(PIPE), dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.unet.eval()
    pipe.unet.set_attn_processor(AttnProcessor())
    y_base = forward(pipe.unet, inputs)
    pipe.load_lora_weights(str(out), adapter_name="kohya")
    modules = doc["variants"]["full"]["sets"]["transformer"]["extracted_modules"]
    layers = lora_layers(pipe.unet)
    assert sorted(layers) == sorted(modules)
    for p, m in layers.items():
        assert m.scaling["kohya"] == 1.0, (p, m.scaling["kohya"])
    ref = reference_unet("full", lambda p: 3, modules, tensors)
    y_ref = forward(ref, inputs)
    assert rel(y_base, y_ref) > 100 * OUT_REL
    assert rel(forward(pipe.unet, inputs), y_ref) <= OUT_REL


def test_modules_all_with_resnet_convs(extract, expected, inputs):
    """--modules all (278): the rank-2 deltas on a 3×3 conv1 and a time_emb_proj come out too (LoCon), and
    diffusers/peft loads the conv factors ([r, in, 3, 3] / [out, r, 1, 1])."""
    doc, tensors = expected
    report, out = extract("tuned_full.pt", "peft", "--rank", "3", "--modules", "all")
    check_report(report, doc, "full", lambda p: 3, module_set="all")
    kinds = {m["path"]: m["kind"] for m in report["modules"]}
    assert kinds["down_blocks.1.resnets.0.conv1"] == "conv3x3"
    assert kinds["up_blocks.2.resnets.1.time_emb_proj"] == "linear"
    modules = doc["variants"]["full"]["sets"]["all"]["extracted_modules"]
    lu = fresh_unet()
    lu.load_lora_adapter(str(out), prefix="unet", use_safetensors=True, adapter_name="all")
    assert sorted(lora_layers(lu)) == sorted(modules)
    ref = reference_unet("full", lambda p: 3, modules, tensors)
    assert rel(forward(lu, inputs), forward(ref, inputs)) <= OUT_REL
    # rank 2 deltas, rank 3 extraction: nothing left
    for p in ("down_blocks.1.resnets.0.conv1", "up_blocks.2.resnets.1.time_emb_proj"):
        assert next(m for m in report["modules"] if m["path"] == p)["residual"] < EXACT_RANK3, p
