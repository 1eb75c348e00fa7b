//! PEFT files whose scale is not 1: `lora_alpha ≠ r` (with an alpha
//! pattern) and rsLoRA (α/√r, with a rank pattern). Expected ΔW per module
//! is peft's own `get_delta_weight` after diffusers reloaded the written
//! file (`fixtures/make_peft_fixtures.py`).

mod common;

use common::{fixture, load, modules, p, run_ok};
use serde_json::Value;

fn expected() -> (common::Loaded, Value) {
    let t = load(&fixture("peft/expected.safetensors"));
    let j: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("peft/expected.json")).unwrap())
            .unwrap();
    (t, j)
}

/// Max |a − b| / max |b| over one module.
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
        / scale
}

/// Convert `case` to kohya (optionally via a folded PEFT file) and compare
/// every module's (α/r)·up·down with peft's ΔW.
fn check(case: &str, fold: bool) {
    let (exp, j) = expected();
    let dir = tempfile::tempdir().unwrap();
    let mut src = fixture(&format!("peft/{case}.safetensors"));
    if fold {
        let folded = dir.path().join("folded.safetensors");
        run_ok(&[
            "convert",
            p(&src),
            "--to",
            "peft",
            "--peft-fold-alpha",
            "-o",
            p(&folded),
        ]);
        // The header now says scale 1 everywhere: alpha = r, no patterns.
        let l = load(&folded);
        let md: Value = serde_json::from_str(&l.metadata["lora_adapter_metadata"]).unwrap();
        assert_eq!(
            md["unet.lora_alpha"].as_f64(),
            md["unet.r"].as_f64(),
            "{md}"
        );
        for (k, a) in md["unet.alpha_pattern"].as_object().unwrap() {
            assert_eq!(a.as_f64(), md["unet.rank_pattern"][k].as_f64(), "{md}");
        }
        src = folded;
    }
    let kohya = dir.path().join("k.safetensors");
    run_ok(&["convert", p(&src), "--to", "kohya", "-o", p(&kohya)]);
    let l = load(&kohya);
    let ms = modules(&l);
    let keys = j["cases"][case]["delta_keys"].as_object().unwrap();
    assert!(!keys.is_empty());
    for (path, key) in keys {
        let name = format!("lora_unet_{}", path.replace('.', "_"));
        let m = ms.get(&name).unwrap_or_else(|| panic!("{name} missing"));
        let got = common::delta(&m["lora_down.weight"], &m["lora_up.weight"], m.get("alpha"));
        let want = exp.tensors[key.as_str().unwrap()].values();
        assert_eq!(got.len(), want.len(), "{path}");
        let e = rel_err(&got, &want);
        assert!(e < 1e-5, "{case} {path}: relative error {e}");
    }
}

#[test]
fn alpha_other_than_rank_keeps_its_scale() {
    check("alpha_ne_r", false);
}

#[test]
fn rslora_scales_by_alpha_over_sqrt_rank() {
    check("rslora_diffusers", false);
}

#[test]
fn folding_alpha_into_lora_b_keeps_every_delta() {
    check("alpha_ne_r", true);
    check("rslora_diffusers", true);
}

#[test]
fn fold_is_for_peft_output_only() {
    let dir = tempfile::tempdir().unwrap();
    let out = common::spm()
        .args([
            "convert",
            p(&fixture("peft/alpha_ne_r.safetensors")),
            "--to",
            "kohya",
            "--peft-fold-alpha",
            "-o",
            p(&dir.path().join("x.safetensors")),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--to peft"));
}
