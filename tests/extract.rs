//! `spm extract` as a user runs it: the CLI on tiny SD1 UNets.
//!
//! Expected numbers come from torch (`fixtures/make_extract_fixtures.py`:
//! `torch.linalg.svd` reconstructions and kohya's rank formulas written in
//! Python) or are exact by construction (a ΔW of rank 3 leaves no residual at
//! rank 3; a perturbed copy of the base shares no tensor with it). Inputs for
//! the bad-input cases are made here with the `safetensors` crate.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use common::{fixture, load, p, rewrite, save, spm, T};
use safetensors::Dtype;
use serde_json::Value;

fn base_dir() -> PathBuf {
    fixture("generate/sd1/unet")
}

fn base_file() -> PathBuf {
    base_dir().join("diffusion_pytorch_model.safetensors")
}

fn f32s(t: &T) -> Vec<f32> {
    t.values().into_iter().map(|v| v as f32).collect()
}

/// Store `v` as F32 (exact for the fp16 base's values).
fn set_f32s(t: &mut T, v: &[f32]) {
    t.dtype = Dtype::F32;
    t.bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
}

/// A tuned copy of the tiny (fp16) base, in f32 as a fine-tune writes it:
/// `edit` changes some tensors; the others keep the base's values, so they
/// equal it at the coarser dtype (the case of an fp16 base and an fp32
/// eraser).
fn tuned(dir: &Path, name: &str, mut edit: impl FnMut(&str, &mut Vec<f32>)) -> PathBuf {
    let out = dir.join(name);
    rewrite(&base_file(), &out, |k, t| {
        let mut v = f32s(t);
        edit(k, &mut v);
        set_f32s(t, &v);
    });
    out
}

/// A deterministic rank-1 update u·vᵀ·scale of an [out, in·k] weight.
fn add_rank1(v: &mut [f32], rows: usize, scale: f32, seed: u32) {
    let cols = v.len() / rows;
    for i in 0..rows {
        for j in 0..cols {
            let u = ((i as u64 * 2654435761 + seed as u64) % 97) as f32 / 97.0 - 0.5;
            let w = ((j as u64 * 40503 + seed as u64 * 7) % 89) as f32 / 89.0 - 0.5;
            v[i * cols + j] += scale * u * w;
        }
    }
}

fn rows_of(key: &str) -> usize {
    let l = load(&base_file());
    l.tensors[key].shape[0]
}

fn extract_json(args: &[&str]) -> Value {
    let out = spm()
        .arg("extract")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "spm extract {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn extract_err(args: &[&str]) -> String {
    let out = spm().arg("extract").args(args).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "{err}");
    err
}

const TO_K: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight";
const BIAS: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.bias";

#[test]
fn rank_one_delta_is_recovered_exactly_and_untouched_layers_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let rows = rows_of(TO_K);
    let t = tuned(dir.path(), "t.safetensors", |k, v| {
        if k == TO_K {
            add_rank1(v, rows, 0.05, 3);
        }
        if k == BIAS {
            v[0] += 0.25;
        }
    });
    let out = dir.path().join("lora.safetensors");
    let r = extract_json(&[
        "--base",
        p(&base_dir()),
        "--tuned",
        p(&t),
        "-o",
        p(&out),
        "--concept",
        "van gogh",
    ]);
    assert_eq!(r["selected"], 192);
    assert_eq!(r["extracted"], 1);
    assert_eq!(r["skipped_zero"], 191);
    assert_eq!(r["base_check"]["verdict"], "ok");
    let m = &r["modules"][0];
    // A rank-1 ΔW at rank min(4, …) keeps all of it; the rest is f32 noise.
    assert_eq!(m["rank"], 4);
    assert!(m["residual"].as_f64().unwrap() < 1e-5, "{m}");
    // The bias change is named and measured: 0.25 exactly.
    assert_eq!(r["dropped"][0]["key"], BIAS);
    assert!((r["dropped"][0]["delta_fro"].as_f64().unwrap() - 0.25).abs() < 1e-6);

    // The file is a kohya LoRA with the concept, and spm's own tools take it.
    let l = load(&out);
    assert_eq!(l.metadata["ss_network_module"], "networks.lora");
    assert_eq!(l.metadata["ss_network_dim"], "4");
    assert_eq!(l.metadata["ss_network_alpha"], "4.0");
    assert_eq!(l.metadata["prompts"], "van gogh");
    let key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k";
    assert_eq!(l.tensors[&format!("{key}.alpha")].dtype, Dtype::F32);
    // up·down reproduces ΔW (checked here with the test's own arithmetic).
    let d = common::delta(
        &l.tensors[&format!("{key}.lora_down.weight")],
        &l.tensors[&format!("{key}.lora_up.weight")],
        Some(&l.tensors[&format!("{key}.alpha")]),
    );
    let mut want = vec![0f32; d.len()];
    add_rank1(&mut want, rows, 0.05, 3);
    let err = d
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - *b as f64).abs())
        .fold(0.0, f64::max);
    assert!(err < 1e-6, "max error {err}");
    let out_json = common::run_ok(&["inspect", p(&out), "--json"]);
    let v: Value = serde_json::from_str(&out_json).unwrap();
    assert_eq!(v["concepts"][0], "van gogh");
    common::run_ok(&["gate", "a painting by van gogh", "--membrane", p(&out)]);
}

#[test]
fn wrong_base_is_refused_with_the_first_differing_key() {
    let dir = tempfile::tempdir().unwrap();
    let rows = rows_of(TO_K);
    let t = tuned(dir.path(), "t.safetensors", |k, v| {
        if k == TO_K {
            add_rank1(v, rows, 0.05, 3);
        }
    });
    // An EMA-like base: every tensor nudged by a relative 1e-4.
    let ema = tuned(dir.path(), "ema.safetensors", |_, v| {
        for x in v.iter_mut() {
            *x *= 1.0 + 1e-4;
            *x += 1e-6;
        }
    });
    let out = dir.path().join("lora.safetensors");
    let err = extract_err(&["--base", p(&ema), "--tuned", p(&t), "-o", p(&out)]);
    assert!(err.contains("base mismatch"), "{err}");
    assert!(
        err.contains("conv_in"),
        "names the first differing key: {err}"
    );
    assert!(!out.exists());
    let r = extract_json(&[
        "--base",
        p(&ema),
        "--tuned",
        p(&t),
        "-o",
        p(&out),
        "--force-base",
    ]);
    assert_eq!(r["base_check"]["verdict"], "forced");
    assert_eq!(r["extracted"], 192, "the drift is in every layer");
}

#[test]
fn partial_files_say_the_check_was_not_possible() {
    let dir = tempfile::tempdir().unwrap();
    let l = load(&base_file());
    let rows = l.tensors[TO_K].shape[0];
    let mut t = l.tensors[TO_K].clone();
    let mut v = f32s(&t);
    add_rank1(&mut v, rows, 0.05, 9);
    set_f32s(&mut t, &v);
    let part = dir.path().join("partial.safetensors");
    save(&part, &[(format!("unet.{TO_K}"), t)], &HashMap::new());
    let out = dir.path().join("lora.safetensors");
    let r = extract_json(&["--base", p(&base_dir()), "--tuned", p(&part), "-o", p(&out)]);
    assert_eq!(r["base_check"]["verdict"], "partial-file");
    assert_eq!(r["extracted"], 1);
    assert_eq!(r["absent"], 191);
}

#[test]
fn bad_inputs_name_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lora.safetensors");
    let b = base_dir();
    // NaN in a target layer.
    let nan = tuned(dir.path(), "nan.safetensors", |k, v| {
        if k == TO_K {
            v[5] = f32::NAN;
        }
    });
    let err = extract_err(&["--base", p(&b), "--tuned", p(&nan), "-o", p(&out)]);
    assert!(
        err.contains("nan.safetensors") && err.contains("attn2.to_k"),
        "{err}"
    );
    assert!(err.contains("not finite"), "{err}");
    // A shape that differs from the base's.
    let l = load(&base_file());
    let mut tensors: Vec<(String, T)> = l.tensors.clone().into_iter().collect();
    for (k, t) in tensors.iter_mut() {
        if k == TO_K {
            let n = t.shape[0];
            t.shape = vec![n / 2, t.values().len() / (n / 2)];
        }
    }
    let shaped = dir.path().join("shape.safetensors");
    save(&shaped, &tensors, &HashMap::new());
    let err = extract_err(&["--base", p(&b), "--tuned", p(&shaped), "-o", p(&out)]);
    assert!(err.contains("attn2.to_k") && err.contains("shape"), "{err}");
    // A truncated file.
    let bytes = std::fs::read(base_file()).unwrap();
    let trunc = dir.path().join("trunc.safetensors");
    std::fs::write(&trunc, &bytes[..bytes.len() / 2]).unwrap();
    let err = extract_err(&["--base", p(&b), "--tuned", p(&trunc), "-o", p(&out)]);
    assert!(err.contains("trunc.safetensors"), "{err}");
    // Not a UNet at all.
    let lora = fixture("sd1/spm.safetensors");
    let err = extract_err(&["--base", p(&b), "--tuned", p(&lora), "-o", p(&out)]);
    assert!(err.contains("spm.safetensors"), "{err}");
    // A pickle that is not a state dict.
    let junk = dir.path().join("junk.pt");
    std::fs::write(&junk, b"not a zip").unwrap();
    let err = extract_err(&["--base", p(&b), "--tuned", p(&junk), "-o", p(&out)]);
    assert!(err.contains("junk.pt"), "{err}");
    // Flags.
    for bad in [["--sv-fro", "1.5"], ["--sv-ratio", "0.5"], ["--rank", "0"]] {
        let o = spm()
            .args([
                "extract",
                "--base",
                p(&b),
                "--tuned",
                p(&nan),
                "-o",
                p(&out),
            ])
            .args(bad)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{bad:?}");
    }
    let o = spm()
        .args([
            "extract",
            "--base",
            p(&b),
            "--tuned",
            p(&nan),
            "-o",
            p(&out),
        ])
        .args(["--sv-fro", "0.9", "--sv-ratio", "4"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "two dynamic rules at once");
    assert!(!out.exists());
}

#[test]
fn outputs_never_touch_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let rows = rows_of(TO_K);
    let t = tuned(dir.path(), "t.safetensors", |k, v| {
        if k == TO_K {
            add_rank1(v, rows, 0.05, 3);
        }
    });
    let before = std::fs::read(&t).unwrap();
    for o in [t.clone(), base_file()] {
        let err = extract_err(&[
            "--base",
            p(&base_dir()),
            "--tuned",
            p(&t),
            "-o",
            p(&o),
            "--force",
        ]);
        assert!(err.contains("refusing"), "{err}");
    }
    assert_eq!(std::fs::read(&t).unwrap(), before);
    let existing = dir.path().join("x.safetensors");
    std::fs::write(&existing, b"mine").unwrap();
    let err = extract_err(&[
        "--base",
        p(&base_dir()),
        "--tuned",
        p(&t),
        "-o",
        p(&existing),
    ]);
    assert!(err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(&existing).unwrap(), b"mine");
}

#[test]
fn module_sets_and_schemes() {
    let dir = tempfile::tempdir().unwrap();
    // Change every weight a LoCon could carry, a little.
    let t = tuned(dir.path(), "t.safetensors", |k, v| {
        if k.ends_with(".weight") && !k.contains("norm") && v.len() > 1 {
            v[1] += 0.01;
        }
    });
    let mut counts = BTreeMap::new();
    for (m, want) in [("attn2", 64), ("transformer", 192), ("all", 278)] {
        let out = dir.path().join(format!("{m}.safetensors"));
        let r = extract_json(&[
            "--base",
            p(&base_dir()),
            "--tuned",
            p(&t),
            "-o",
            p(&out),
            "--modules",
            m,
            "--rank",
            "1",
        ]);
        assert_eq!(r["selected"], want, "{m}");
        counts.insert(m, r["extracted"].as_u64().unwrap());
        let v: Value =
            serde_json::from_str(&common::run_ok(&["inspect", p(&out), "--json"])).unwrap();
        assert_eq!(
            v["modules"].as_u64().unwrap(),
            r["extracted"].as_u64().unwrap()
        );
    }
    assert_eq!(counts["attn2"], 64);
    assert_eq!(counts["transformer"], 192);
    assert!(counts["all"] > 192);
    for scheme in ["spm", "ldm", "peft"] {
        let out = dir.path().join(format!("{scheme}.safetensors"));
        extract_json(&[
            "--base",
            p(&base_dir()),
            "--tuned",
            p(&t),
            "-o",
            p(&out),
            "--to",
            scheme,
            "--modules",
            "attn2",
            "--rank",
            "2",
            "--dtype",
            "fp16",
        ]);
        let v: Value =
            serde_json::from_str(&common::run_ok(&["inspect", p(&out), "--json"])).unwrap();
        assert_eq!(v["scheme"], scheme, "{v}");
        assert_eq!(v["modules"], 64);
    }
}

// ------------------------------------------------------------------------
// Against torch (fixtures/data/extract, make_extract_fixtures.py)
// ------------------------------------------------------------------------

fn oracle() -> (common::Loaded, Value) {
    let t = load(&fixture("extract/expected.safetensors"));
    let j: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("extract/expected.json")).unwrap())
            .unwrap();
    (t, j)
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// Run extract on a fixture tuned file and check every module's
/// reconstruction against torch.linalg.svd's at the rank it kept, the
/// report's numbers against torch's, and the set counts.
fn against_torch(tuned: &str, variant: &str, set: &str, rule: &[&str], rule_name: Option<&str>) {
    let (exp, j) = oracle();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lora.safetensors");
    let mut args = vec![
        "--base".to_string(),
        p(&base_dir()).to_string(),
        "--tuned".into(),
        p(&fixture(&format!("extract/{tuned}"))).into(),
        "-o".into(),
        p(&out).into(),
        "--modules".into(),
        set.into(),
    ];
    args.extend(rule.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = extract_json(&args);
    let v = &j["variants"][variant];
    let want = &v["sets"][set];
    for k in ["selected", "extracted", "skipped_zero", "absent"] {
        assert_eq!(r[k], want[k], "{tuned} {set} {rule:?}: {k}");
    }
    let dropped: Vec<&Value> = r["dropped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| &d["key"])
        .collect();
    let want_dropped: Vec<&Value> = want["dropped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| &d["key"])
        .collect();
    let mut a = dropped.clone();
    let mut b = want_dropped.clone();
    a.sort_by_key(|v| v.to_string());
    b.sort_by_key(|v| v.to_string());
    assert_eq!(a, b, "dropped tensors");
    assert!(
        (r["dropped_fro"].as_f64().unwrap() - want["dropped_fro"].as_f64().unwrap()).abs() < 1e-6
    );

    let l = load(&out);
    let ms = common::modules(&l);
    for m in r["modules"].as_array().unwrap() {
        let path = m["path"].as_str().unwrap();
        let e = &v["modules"][path];
        let rank = m["rank"].as_u64().unwrap();
        if let Some(rn) = rule_name {
            assert_eq!(m["rank"], e["dynamic"][rn], "{path}: {rn} rank");
        }
        let rk = rank.to_string();
        // The report's fractions are torch's (f32 arithmetic vs float64).
        let res = e["residual"][&rk].as_f64().unwrap();
        let kept = e["kept"][&rk].as_f64().unwrap();
        assert!(
            (m["residual"].as_f64().unwrap() - res).abs() < 1e-4,
            "{path} r{rk}: residual {} vs {res}",
            m["residual"]
        );
        assert!(
            (m["kept"].as_f64().unwrap() - kept).abs() < 1e-4,
            "{path} r{rk}: kept"
        );
        let name = format!("lora_unet_{}", path.replace('.', "_"));
        let f = &ms[&name];
        let got = common::delta(&f["lora_down.weight"], &f["lora_up.weight"], f.get("alpha"));
        let key = format!("{variant}/r{rk}/{path}");
        let Some(t) = exp.tensors.get(&key) else {
            // Full rank: torch's reconstruction is ΔW itself (not stored).
            assert_eq!(rank, e["max_rank"].as_u64().unwrap(), "{key} missing");
            continue;
        };
        let want = t.values();
        let diff: Vec<f64> = got.iter().zip(&want).map(|(a, b)| a - b).collect();
        let s0 = e["singular_values"][0].as_f64().unwrap();
        let amb = e["truncation_gap"][&rk]["f32_ambiguity"]
            .as_f64()
            .unwrap_or(0.0);
        let tol = 1e-5 * norm(&want) + 4.0 * amb * s0;
        assert!(
            norm(&diff) <= tol,
            "{key}: ‖ours − torch‖ = {:.3e} > {tol:.3e} (‖torch‖ = {:.3e})",
            norm(&diff),
            norm(&want)
        );
    }
}

#[test]
fn fixed_ranks_match_torch_svd_in_every_layout() {
    for (file, variant) in [
        ("tuned_full.pt", "full"),
        ("tuned_ldm.safetensors", "full"),
        ("tuned_partial_bf16.safetensors", "partial_bf16"),
    ] {
        for rank in ["1", "3"] {
            against_torch(file, variant, "all", &["--rank", rank], None);
        }
    }
    against_torch("tuned_full.pt", "full", "attn2", &["--rank", "3"], None);
    against_torch(
        "tuned_full.pt",
        "full",
        "transformer",
        &["--rank", "3"],
        None,
    );
}

#[test]
fn dynamic_ranks_follow_kohyas_formulas() {
    for (flag, value, name) in [
        ("--sv-ratio", "10", "sv_ratio"),
        ("--sv-fro", "0.9", "sv_fro"),
        ("--sv-cumulative", "0.9", "sv_cumulative"),
    ] {
        against_torch(
            "tuned_full.pt",
            "full",
            "all",
            &[flag, value, "--rank", "8"],
            Some(name),
        );
    }
}

#[test]
fn ema_like_base_fires_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lora.safetensors");
    let err = extract_err(&[
        "--base",
        p(&fixture("extract/base_ema.safetensors")),
        "--tuned",
        p(&fixture("extract/tuned_full.pt")),
        "-o",
        p(&out),
    ]);
    assert!(
        err.contains("base mismatch") && err.contains("base_ema.safetensors"),
        "{err}"
    );
}

/// SDXL: a rank-1 ΔW on one attention layer of the tiny SDXL UNet (a
/// deep, second transformer block of the last level) comes back exactly,
/// from the diffusers folder and from the SGM single file as the base, and
/// the output is an SDXL LoRA `spm inspect` reads. Exact by construction.
#[test]
fn sdxl_delta_is_recovered_from_folder_and_sgm_file() {
    const XL_TO_K: &str = "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k.weight";
    let dir = tempfile::tempdir().unwrap();
    let xl_unet = fixture("generate/sdxl/unet");
    let src = xl_unet.join("diffusion_pytorch_model.safetensors");
    let rows = load(&src).tensors[XL_TO_K].shape[0];
    let t = dir.path().join("xl_tuned.safetensors");
    rewrite(&src, &t, |k, tt| {
        let mut v = f32s(tt);
        if k == XL_TO_K {
            add_rank1(&mut v, rows, 0.05, 5);
        }
        set_f32s(tt, &v);
    });
    let mut want = vec![0f32; load(&src).tensors[XL_TO_K].bytes.len() / 2];
    add_rank1(&mut want, rows, 0.05, 5);
    for (i, base) in [xl_unet, fixture("generate/sdxl.safetensors")]
        .iter()
        .enumerate()
    {
        let out = dir.path().join(format!("xl_lora_{i}.safetensors"));
        let r = extract_json(&[
            "--base",
            p(base),
            "--tuned",
            p(&t),
            "-o",
            p(&out),
            "--rank",
            "2",
            "--concept",
            "snoopy",
        ]);
        assert_eq!(r["arch"], "sdxl", "{r}");
        assert_eq!(r["extracted"], 1, "{r}");
        // The tiny model has 192 of real SDXL's 722 transformer layers.
        assert_eq!(r["skipped_zero"], 191, "{r}");
        assert_eq!(r["absent"], 722 - 192, "{r}");
        assert_eq!(r["base_check"]["verdict"], "ok", "{r}");
        let l = load(&out);
        let down: Vec<&String> = l
            .tensors
            .keys()
            .filter(|k| k.ends_with(".lora_down.weight"))
            .collect();
        assert_eq!(down.len(), 1, "{down:?}");
        let key = down[0].trim_end_matches(".lora_down.weight").to_string();
        let d = common::delta(
            &l.tensors[&format!("{key}.lora_down.weight")],
            &l.tensors[&format!("{key}.lora_up.weight")],
            Some(&l.tensors[&format!("{key}.alpha")]),
        );
        let err = d
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - *b as f64).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-6, "{key}: max error {err}");
        let v: Value =
            serde_json::from_str(&common::run_ok(&["inspect", p(&out), "--json"])).unwrap();
        assert_eq!(v["arch"], "sdxl", "{v}");
        assert_eq!(v["concepts"][0], "snoopy");
    }
}
