//! Numbers, rough edges and evasions, through the real binary: non-finite
//! and meaningless numbers are refused with the flag's name, help text
//! teaches every flag, JSON shapes agree between commands, logs to a file
//! carry no colour codes, bake refuses a mismatched architecture and names
//! both files, a text encoder too small for the tokenizer is named at load,
//! and `--normalize strict` sees through adversarial spellings.

mod common;

use std::path::Path;

use common::*;

fn s(path: &Path) -> &str {
    p(path)
}

/// Run spm expecting failure; returns stderr.
fn fails(args: &[&str]) -> String {
    let out = spm().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    err
}

fn ok(args: &[&str]) -> String {
    run_ok(args)
}

#[test]
fn non_finite_and_meaningless_numbers_are_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    let a = fixture("sd1/spm.safetensors");
    let b = fixture("sd1/spm2.safetensors");
    let o = d.path().join("o.safetensors");
    for w in ["1,nan", "1,inf", "1,-inf", "NaN,1", "1,x"] {
        let err = fails(&["merge", s(&a), s(&b), "--weights", w, "-o", s(&o)]);
        assert!(err.contains("--weights"), "{w}: {err}");
        assert!(!o.exists(), "{w}: a file was written");
    }
    let base = fixture("sd1/base_ldm.safetensors");
    let err = fails(&[
        "bake",
        "--base",
        s(&base),
        s(&a),
        "--weights",
        "inf",
        "-o",
        s(&o),
    ]);
    assert!(err.contains("--weights"), "{err}");
    for m in ["nan", "inf", "-1"] {
        let err = fails(&[
            "convert",
            s(&a),
            "--to",
            "kohya",
            "--strength",
            m,
            "-o",
            s(&o),
        ]);
        assert!(err.contains("--strength"), "{m}: {err}");
    }
    for f in ["nan", "-inf", "-0.5"] {
        let err = fails(&["gate", "--membrane", s(&a), "--facilitate", f, "pikachu"]);
        assert!(err.contains("--facilitate"), "{f}: {err}");
    }
    // Spaces after commas are fine, and a negative LoRA weight means
    // "subtract": the merged delta is 1·A − 0.5·B, checked on one module.
    ok(&["merge", s(&a), s(&b), "--weights", "1, -0.5", "-o", s(&o)]);
    let merged = modules(&load(&o));
    let (la, lb) = (modules(&load(&a)), modules(&load(&b)));
    let key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let of = |m: &std::collections::BTreeMap<String, std::collections::BTreeMap<String, T>>| {
        let t = &m[key];
        delta(&t["lora_down.weight"], &t["lora_up.weight"], t.get("alpha"))
    };
    let want: Vec<f64> = of(&la)
        .iter()
        .zip(of(&lb))
        .map(|(x, y)| x - 0.5 * y)
        .collect();
    for (g, w) in of(&merged).iter().zip(&want) {
        assert!((g - w).abs() < 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
    }
}

#[test]
fn merge_needs_two_inputs() {
    let d = tempfile::tempdir().unwrap();
    let err = fails(&[
        "merge",
        s(&fixture("sd1/spm.safetensors")),
        "-o",
        s(&d.path().join("o.safetensors")),
    ]);
    assert!(err.contains("two or more inputs"), "{err}");
}

/// Every option and positional of every command has help text.
#[test]
fn help_describes_every_flag() {
    for cmd in ["inspect", "convert", "merge", "bake", "gate", "serve"] {
        let help = ok(&[cmd, "--help"]);
        let lines: Vec<&str> = help.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim_start();
            // Flags and positionals sit at indent 2–6; value lists deeper.
            let indent = line.len() - t.len();
            let is_item = (t.starts_with('-') || t.starts_with('<')) && (2..8).contains(&indent);
            if !is_item {
                continue;
            }
            // clap puts the text after the flag on the same line, or on the
            // next, more indented, line.
            let after = t.split_once("  ").map(|(_, r)| r.trim()).unwrap_or("");
            let next_indented = lines.get(i + 1).is_some_and(|n| {
                n.len() - n.trim_start().len() > line.len() - t.len() && !n.trim().is_empty()
            });
            assert!(
                !after.is_empty() || next_indented,
                "`spm {cmd} --help`: no text for `{}`",
                t
            );
        }
    }
}

#[test]
fn concepts_are_a_list_in_every_json() {
    let d = tempfile::tempdir().unwrap();
    let a = fixture("sd1/spm.safetensors");
    let b = fixture("sd1/spm2.safetensors");
    let o = d.path().join("o.safetensors");
    let merged: serde_json::Value =
        serde_json::from_str(&ok(&["merge", s(&a), s(&b), "-o", s(&o), "--json"])).unwrap();
    assert_eq!(merged["concepts"], serde_json::json!(["pikachu", "cat"]));
    let inspected: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", s(&o), "--json"])).unwrap();
    assert_eq!(inspected["concepts"], merged["concepts"]);
    let conv: serde_json::Value = serde_json::from_str(&ok(&[
        "convert",
        s(&a),
        "--to",
        "peft",
        "-o",
        s(&d.path().join("p.safetensors")),
        "--json",
    ]))
    .unwrap();
    assert_eq!(conv["concepts"], serde_json::json!(["pikachu"]));
}

#[test]
fn logs_to_a_pipe_have_no_colour_codes() {
    let d = tempfile::tempdir().unwrap();
    let out = spm()
        .args([
            "-v",
            "convert",
            s(&fixture("sd1/spm.safetensors")),
            "--to",
            "kohya",
            "-o",
            s(&d.path().join("o.safetensors")),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success());
    assert!(err.contains("INFO"), "{err}");
    assert!(!err.contains('\u{1b}'), "escape codes in {err:?}");
}

/// A lossy conversion prints one summary line; the list is behind -v and
/// in --json.
#[test]
fn lossy_conversion_is_summarised() {
    let d = tempfile::tempdir().unwrap();
    let input = fixture("sd1/kohya_te.safetensors");
    let o = d.path().join("o.safetensors");
    let args = |extra: &[&str]| {
        let mut v = vec![
            "convert".to_string(),
            s(&input).to_string(),
            "--to".into(),
            "diffusers-old".into(),
            "--allow-lossy".into(),
            "--force".into(),
            "-o".into(),
            s(&o).to_string(),
        ];
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let out = spm().args(args(&[])).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().count() <= 2, "{text}");
    assert!(text.contains("lossy:"), "{text}");
    let js: serde_json::Value =
        serde_json::from_slice(&spm().args(args(&["--json"])).output().unwrap().stdout).unwrap();
    let n = js["lossy"].as_array().unwrap().len();
    assert!(n >= 1);
    let verbose = spm().args(args(&[])).arg("-v").output().unwrap();
    let logged = String::from_utf8_lossy(&verbose.stderr)
        .matches("lossy:")
        .count();
    assert_eq!(logged, n);
    // Refused without --allow-lossy: one line, the count, no list.
    let refused = fails(&[
        "convert",
        s(&input),
        "--to",
        "diffusers-old",
        "-o",
        s(&d.path().join("r.safetensors")),
    ]);
    assert_eq!(refused.trim().lines().count(), 1, "{refused}");
    assert!(refused.contains("--allow-lossy"), "{refused}");
}

#[test]
fn bake_checks_architectures_and_names_both_files() {
    let d = tempfile::tempdir().unwrap();
    let o = d.path().join("o.safetensors");
    let sd1 = fixture("sd1/spm.safetensors");
    for base in [fixture("sd2/base_ldm.safetensors"), fixture("sd2/base")] {
        let out = if base.is_dir() {
            d.path().join("o_dir")
        } else {
            o.clone()
        };
        let err = fails(&["bake", "--base", s(&base), s(&sd1), "-o", s(&out)]);
        assert!(err.contains(s(&sd1)) && err.contains(s(&base)), "{err}");
        assert!(err.contains("sd1") && err.contains("sd2"), "{err}");
        assert!(!out.exists());
    }
    let err = fails(&[
        "bake",
        "--base",
        s(&fixture("sdxl/base_ldm.safetensors")),
        s(&fixture("sd2/spm.safetensors")),
        "-o",
        s(&o),
    ]);
    assert!(err.contains("sdxl"), "{err}");
}

/// A factor that does not fit its weight names the adapter, the module,
/// the checkpoint, the tensor and both shapes.
#[test]
fn bake_shape_mismatch_names_everything() {
    let d = tempfile::tempdir().unwrap();
    let key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let bad = d.path().join("bad.safetensors");
    rewrite(&fixture("sd1/spm.safetensors"), &bad, |k, t| {
        if k == format!("{key}.lora_down.weight") {
            // One input column too many.
            t.shape[1] += 1;
            let n = t.dtype.bitsize() / 8 * t.shape[0];
            t.bytes.extend(std::iter::repeat_n(0u8, n));
        }
    });
    let base = fixture("sd1/base_ldm.safetensors");
    let o = d.path().join("o.safetensors");
    let err = fails(&["bake", "--base", s(&base), s(&bad), "-o", s(&o)]);
    for needle in [s(&bad), s(&base), key, "attn1.to_q.weight", "do not fit"] {
        assert!(err.contains(needle), "want {needle:?} in {err}");
    }
    assert!(!o.exists());
}

/// A text encoder whose embedding table is smaller than the tokenizer's
/// vocabulary is refused at load, naming the file.
#[test]
fn small_vocabulary_encoder_is_named_at_load() {
    let d = tempfile::tempdir().unwrap();
    let te = d.path().join("text_encoder");
    std::fs::create_dir_all(&te).unwrap();
    let src_dir = fixture("sd1/base/text_encoder");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src_dir.join("config.json")).unwrap())
            .unwrap();
    let rows = 1000usize;
    cfg["vocab_size"] = rows.into();
    std::fs::write(te.join("config.json"), cfg.to_string()).unwrap();
    rewrite(
        &src_dir.join("model.safetensors"),
        &te.join("model.safetensors"),
        |k, t| {
            if k.ends_with("token_embedding.weight") {
                let row = t.bytes.len() / t.shape[0];
                t.shape[0] = rows;
                t.bytes.truncate(row * rows);
            }
        },
    );
    let err = fails(&[
        "gate",
        "--membrane",
        s(&fixture("sd1/spm.safetensors")),
        "--text-encoder",
        s(&te),
        "a photo of pikachu",
    ]);
    assert!(err.contains("vocab_size") && err.contains("1000"), "{err}");
    assert!(err.contains("text_encoder"), "{err}");
}

/// Zero-width characters, combining marks, full-width and Cyrillic
/// look-alikes bring tokenuni to 0 under the reference normalisation (kept
/// for fidelity) and to 1 under `--normalize strict`.
#[test]
fn strict_normalisation_sees_through_adversarial_spellings() {
    let membrane = fixture("sd1/spm.safetensors");
    let strike: String = "pikachu".chars().flat_map(|c| [c, '\u{336}']).collect();
    let prompts = [
        "a photo of pi\u{200b}ka\u{200b}chu".to_string(),
        format!("a photo of {strike}"),
        "a photo of \u{ff50}\u{ff49}\u{ff4b}\u{ff41}\u{ff43}\u{ff48}\u{ff55}".to_string(),
        "a photo of \u{440}\u{456}k\u{430}\u{441}hu".to_string(),
        "a photo of pika\u{ad}chu".to_string(),
    ];
    let tokenuni = |mode: &str| -> Vec<f64> {
        let mut args = vec![
            "gate".to_string(),
            "--membrane".into(),
            s(&membrane).to_string(),
            "--normalize".into(),
            mode.into(),
            "--json".into(),
        ];
        args.extend(prompts.iter().cloned());
        let out = spm().args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["gates"]["spm"]["tokenuni"].as_f64().unwrap())
            .collect()
    };
    let reference = tokenuni("reference");
    // Full-width letters are already folded by the tokenizer's ftfy step
    // (fix_character_width), as in the reference; the others evade it.
    assert_eq!(reference[2], 1.0);
    for (i, t) in reference.iter().enumerate() {
        assert!(i == 2 || *t < 1.0, "{}: {t}", prompts[i]);
    }
    assert_eq!(tokenuni("strict"), vec![1.0; prompts.len()]);
    // Plain prompts gate the same under both.
    let plain = ok(&[
        "gate",
        "--membrane",
        s(&membrane),
        "--normalize",
        "strict",
        "--json",
        "a cat",
        "pikachu",
    ]);
    let plain_ref = ok(&[
        "gate",
        "--membrane",
        s(&membrane),
        "--json",
        "a cat",
        "pikachu",
    ]);
    let strip = |t: &str| {
        let mut v: serde_json::Value = serde_json::from_str(t).unwrap();
        v["results"].take()
    };
    assert_eq!(strip(&plain), strip(&plain_ref));
}

/// An adapter with NaN/inf factors is refused by every command that would
/// carry them into a file, naming the tensor; a bake whose result does not
/// fit the checkpoint's dtype (f16 overflow) writes nothing.
#[test]
fn poisoned_numbers_never_reach_a_file() {
    let d = tempfile::tempdir().unwrap();
    let key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let nan = d.path().join("nan.safetensors");
    rewrite(&fixture("sd1/spm.safetensors"), &nan, |k, t| {
        if k == format!("{key}.lora_up.weight") {
            assert_eq!(t.dtype, safetensors::Dtype::F32);
            t.bytes[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        }
    });
    let o = d.path().join("o.safetensors");
    let good = fixture("sd1/spm2.safetensors");
    let base = fixture("sd1/base_ldm.safetensors");
    for args in [
        vec!["convert", s(&nan), "--to", "peft", "-o", s(&o)],
        vec!["merge", s(&good), s(&nan), "-o", s(&o)],
        vec!["bake", "--base", s(&base), s(&nan), "-o", s(&o)],
    ] {
        let err = fails(&args);
        assert!(
            err.contains(&format!("{key}.lora_up.weight")) && err.contains("NaN"),
            "{args:?}: {err}"
        );
        assert!(!o.exists());
    }
    let inspected = ok(&["inspect", s(&nan)]);
    assert!(inspected.contains("NaN"), "{inspected}");
    // f16 overflow: the fixture base is f16; a huge (finite) weight.
    let err = fails(&[
        "bake",
        "--base",
        s(&base),
        s(&good),
        "--weights",
        "1e30",
        "-o",
        s(&o),
    ]);
    assert!(
        err.contains("cannot hold") && err.contains(s(&base)),
        "{err}"
    );
    assert!(!o.exists());
    let dir_out = d.path().join("dir");
    let err = fails(&[
        "bake",
        "--base",
        s(&fixture("sd1/base")),
        s(&good),
        "--weights",
        "1e30",
        "-o",
        s(&dir_out),
    ]);
    assert!(err.contains("cannot hold"), "{err}");
    assert!(!dir_out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(".spm-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A text encoder with NaN weights is refused at load, naming the file,
/// instead of answering `clipcos: null`.
#[test]
fn nan_text_encoder_is_refused_at_load() {
    let d = tempfile::tempdir().unwrap();
    let te = d.path().join("text_encoder");
    std::fs::create_dir_all(&te).unwrap();
    let src_dir = fixture("sd1/base/text_encoder");
    std::fs::copy(src_dir.join("config.json"), te.join("config.json")).unwrap();
    rewrite(
        &src_dir.join("model.safetensors"),
        &te.join("model.safetensors"),
        |k, t| {
            if k.ends_with("final_layer_norm.weight") {
                let nan = match t.dtype {
                    safetensors::Dtype::F16 => half::f16::NAN.to_le_bytes().to_vec(),
                    _ => f32::NAN.to_le_bytes().to_vec(),
                };
                t.bytes[..nan.len()].copy_from_slice(&nan);
            }
        },
    );
    let err = fails(&[
        "gate",
        "--membrane",
        s(&fixture("sd1/spm.safetensors")),
        "--text-encoder",
        s(&te),
        "pikachu",
    ]);
    assert!(err.contains("NaN") && err.contains("text_encoder"), "{err}");
}
