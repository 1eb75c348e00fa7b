//! Conversions, merges and bakes checked against files written by an
//! independent implementation (diffusers/peft/LyCORIS, `fixtures/make_fixtures.py`)
//! and against mathematics.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;

const ARCHES: [&str; 3] = ["sd1", "sd2", "sdxl"];

#[test]
fn inspect_reports_full_coverage_and_concepts() {
    for (arch, n, concepts) in [
        ("sd1", 192, vec!["pikachu"]),
        ("sd2", 192, vec!["van gogh"]),
        ("sdxl", 722, vec!["snoopy", "mickey mouse"]),
    ] {
        let out = run_ok(&[
            "inspect",
            "--json",
            p(&fixture(&format!("{arch}/spm.safetensors"))),
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["arch"], arch);
        assert_eq!(v["scheme"], "spm");
        let cov = &v["coverage"][0];
        assert_eq!(
            (
                cov["component"].as_str(),
                cov["found"].as_u64(),
                cov["expected"].as_u64()
            ),
            (Some("unet"), Some(n), Some(n))
        );
        assert_eq!(v["ranks"]["1"], n);
        assert_eq!(v["concepts"], serde_json::json!(concepts));
        assert_eq!(v["unknown_keys"].as_array().unwrap().len(), 0);
    }
    let out = run_ok(&["inspect", p(&fixture("sd1/spm.safetensors"))]);
    assert!(out.contains("unet transformer 192/192"), "{out}");
    let out = run_ok(&["inspect", "--json", p(&fixture("sd1/locon.safetensors"))]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["modules"], 278);
    assert_eq!(v["dtypes"]["I64"], 278);
}

#[test]
fn inspect_names_injected_bad_keys() {
    // Add keys for modules that do not exist in SD1 (lora-schemes/oracles
    // cross-check: `attn9`, and `up_blocks_0_attentions_0`, absent in SD1).
    let src = load(&fixture("sd1/spm.safetensors"));
    let mut tensors: Vec<(String, T)> = src.tensors.into_iter().collect();
    let extra = tensors[0].1.clone();
    for bad in [
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn9_to_q.lora_down.weight",
        "lora_unet_up_blocks_0_attentions_0_proj_in.lora_up.weight",
    ] {
        tensors.push((bad.to_string(), extra.clone()));
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.safetensors");
    save(&f, &tensors, &src.metadata);
    let out = run_ok(&["inspect", "--json", p(&f)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let unknown: BTreeSet<&str> = v["unknown_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert_eq!(
        unknown,
        BTreeSet::from([
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn9_to_q.lora_down.weight",
            "lora_unet_up_blocks_0_attentions_0_proj_in.lora_up.weight"
        ])
    );
    assert_eq!(v["coverage"][0]["found"], 192);
}

/// Every lossless scheme pair round-trips with identical tensor bytes.
#[test]
fn scheme_round_trips_are_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let schemes = ["spm", "kohya", "ldm", "peft"];
    let mut files = vec![("sd1", "locon")];
    for a in ARCHES {
        files.push((a, "spm"));
        files.push((a, "kohya_te"));
    }
    for (arch, name) in files {
        let orig_path = fixture(&format!("{arch}/{name}.safetensors"));
        let orig = load(&orig_path);
        let v: serde_json::Value =
            serde_json::from_str(&run_ok(&["inspect", "--json", p(&orig_path)])).unwrap();
        let home = v["scheme"].as_str().unwrap().to_string();
        for via in schemes {
            let mid = dir.path().join(format!("{arch}-{name}-{via}.safetensors"));
            let back = dir
                .path()
                .join(format!("{arch}-{name}-{via}-back.safetensors"));
            run_ok(&["convert", p(&orig_path), "--to", via, "-o", p(&mid)]);
            run_ok(&["convert", p(&mid), "--to", &home, "-o", p(&back)]);
            let b = load(&back);
            let ok: BTreeSet<_> = orig.tensors.keys().collect();
            let bk: BTreeSet<_> = b.tensors.keys().collect();
            assert_eq!(ok, bk, "{arch}/{name} via {via}: key sets differ");
            for (k, t) in &orig.tensors {
                assert_eq!(t, &b.tensors[k], "{arch}/{name} via {via}: `{k}` changed");
            }
        }
    }
}

/// A chain through every lossless scheme ends where it started.
#[test]
fn chain_through_all_schemes() {
    let dir = tempfile::tempdir().unwrap();
    let orig_path = fixture("sdxl/kohya_te.safetensors");
    let mut prev = orig_path.clone();
    for (i, s) in ["spm", "ldm", "peft", "spm", "peft", "kohya"]
        .iter()
        .enumerate()
    {
        let next = dir.path().join(format!("{i}-{s}.safetensors"));
        run_ok(&["convert", p(&prev), "--to", s, "-o", p(&next)]);
        prev = next;
    }
    assert_eq!(load(&orig_path).tensors, load(&prev).tensors);
}

/// peft output matches what diffusers itself writes for the same input.
#[test]
fn peft_output_matches_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ARCHES {
        for name in ["spm", "kohya_te"] {
            let ours_p = dir.path().join(format!("{arch}-{name}.safetensors"));
            run_ok(&[
                "convert",
                p(&fixture(&format!("{arch}/{name}.safetensors"))),
                "--to",
                "peft",
                "-o",
                p(&ours_p),
            ]);
            let ours = load(&ours_p);
            let refp = load(&fixture(&format!(
                "{arch}/ref_peft_from_{name}.safetensors"
            )));
            let ok: BTreeSet<_> = ours.tensors.keys().collect();
            let rk: BTreeSet<_> = refp.tensors.keys().collect();
            let only_ours: Vec<_> = ok.difference(&rk).take(5).collect();
            let only_ref: Vec<_> = rk.difference(&ok).take(5).collect();
            assert!(
                ok == rk,
                "{arch}/{name}: only ours {only_ours:?}, only diffusers {only_ref:?}"
            );
            for (k, t) in &refp.tensors {
                // diffusers stores F32 whatever the input; values are equal.
                assert_eq!(t.shape, ours.tensors[k].shape, "{arch}/{name} {k}");
                assert_eq!(t.values(), ours.tensors[k].values(), "{arch}/{name} {k}");
            }
            let om: serde_json::Value =
                serde_json::from_str(&ours.metadata["lora_adapter_metadata"]).unwrap();
            let rm: serde_json::Value =
                serde_json::from_str(&refp.metadata["lora_adapter_metadata"]).unwrap();
            assert_eq!(ours.metadata["format"], "pt");
            for comp in ["unet", "text_encoder", "text_encoder_2"] {
                let r = &rm[format!("{comp}.r")];
                if r.is_null() {
                    assert!(om[format!("{comp}.r")].is_null(), "{comp}");
                    continue;
                }
                assert_eq!(&om[format!("{comp}.r")], r, "{arch}/{name} {comp}.r");
                assert_eq!(
                    om[format!("{comp}.lora_alpha")].as_f64(),
                    rm[format!("{comp}.lora_alpha")].as_f64(),
                    "{arch}/{name} {comp}.lora_alpha"
                );
                // Targets may be spelled differently (diffusers writes short
                // suffixes); they must select the same modules of the file.
                let paths: BTreeSet<String> = refp
                    .tensors
                    .keys()
                    .filter_map(|k| k.strip_prefix(&format!("{comp}.")))
                    .filter_map(|k| k.strip_suffix(".lora_A.weight"))
                    .map(String::from)
                    .collect();
                let select = |targets: &serde_json::Value| -> BTreeSet<String> {
                    let t: Vec<&str> = targets
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_str().unwrap())
                        .collect();
                    paths
                        .iter()
                        .filter(|p| t.iter().any(|t| *p == t || p.ends_with(&format!(".{t}"))))
                        .cloned()
                        .collect()
                };
                assert_eq!(
                    select(&om[format!("{comp}.target_modules")]),
                    select(&rm[format!("{comp}.target_modules")]),
                    "{arch}/{name} {comp} targets"
                );
                assert_eq!(
                    select(&om[format!("{comp}.target_modules")]).len(),
                    paths.len()
                );
            }
        }
    }
}

/// Reading diffusers' peft file and writing kohya gives the SPM's own
/// tensors back, like diffusers' `convert_state_dict_to_kohya`.
#[test]
fn kohya_from_diffusers_peft_matches() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ARCHES {
        let out = dir.path().join(format!("{arch}.safetensors"));
        run_ok(&[
            "convert",
            p(&fixture(&format!("{arch}/ref_peft_from_spm.safetensors"))),
            "--to",
            "spm",
            "-o",
            p(&out),
        ]);
        let ours = modules(&load(&out));
        let refk = modules(&load(&fixture(&format!(
            "{arch}/ref_kohya_from_peft.safetensors"
        ))));
        let spm = modules(&load(&fixture(&format!("{arch}/spm.safetensors"))));
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            refk.keys().collect::<Vec<_>>(),
            "{arch}"
        );
        for (m, params) in &refk {
            for p in ["lora_down.weight", "lora_up.weight"] {
                assert_eq!(params[p].values(), ours[m][p].values(), "{arch} {m} {p}");
                assert_eq!(params[p].shape, ours[m][p].shape, "{arch} {m} {p}");
            }
            // diffusers writes alpha = r; ours carries alpha from metadata.
            assert_eq!(params["alpha"].values(), ours[m]["alpha"].values());
            assert_eq!(spm[m]["lora_down.weight"], ours[m]["lora_down.weight"]);
        }
    }
}

/// ldm (and SDXL kohya) names equal the SAI names the fixture derived from
/// the spec tables and verified through diffusers.
#[test]
fn ldm_names_match_reference_table() {
    let dir = tempfile::tempdir().unwrap();
    for (arch, file, scheme) in [
        ("sd1", "locon", "ldm"),
        ("sd2", "spm", "ldm"),
        ("sdxl", "spm", "ldm"),
        ("sdxl", "spm", "kohya"),
    ] {
        let table: BTreeMap<String, String> = serde_json::from_str(
            &std::fs::read_to_string(fixture(&format!("{arch}/ldm_names.json"))).unwrap(),
        )
        .unwrap();
        let src = fixture(&format!("{arch}/{file}.safetensors"));
        let out = dir
            .path()
            .join(format!("{arch}-{file}-{scheme}.safetensors"));
        run_ok(&["convert", p(&src), "--to", scheme, "-o", p(&out)]);
        let orig = modules(&load(&src));
        let conv = modules(&load(&out));
        assert_eq!(orig.len(), conv.len());
        for (name, params) in &orig {
            let sai = &table[name];
            assert_eq!(&conv[sai], params, "{arch} {name} -> {sai}");
        }
    }
}

/// SPM → kohya keeps the concepts and adds the kohya metadata set.
#[test]
fn kohya_metadata_and_concepts() {
    let dir = tempfile::tempdir().unwrap();
    for (arch, base, arch_spec) in [
        ("sd1", "sd_v1", "stable-diffusion-v1/lora"),
        ("sd2", "sd_v2", "stable-diffusion-v2-512/lora"),
        ("sdxl", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
    ] {
        let out = dir.path().join(format!("{arch}_kohya.safetensors"));
        run_ok(&[
            "convert",
            p(&fixture(&format!("{arch}/spm.safetensors"))),
            "--to",
            "kohya",
            "-o",
            p(&out),
        ]);
        let md = load(&out).metadata;
        assert_eq!(md["ss_network_module"], "networks.lora");
        assert_eq!(md["ss_network_dim"], "1");
        assert_eq!(md["ss_network_alpha"], "1.0");
        assert_eq!(md["ss_base_model_version"], base);
        assert_eq!(md["modelspec.architecture"], arch_spec);
        assert_eq!(md["modelspec.title"], format!("{arch}_kohya"));
        let src = load(&fixture(&format!("{arch}/spm.safetensors"))).metadata;
        assert_eq!(md["prompts"], src["prompts"]);
    }
    // Stale hashes are dropped.
    let out = dir.path().join("k.safetensors");
    let src = fixture("sd1/kohya_te.safetensors");
    assert!(load(&src).metadata.contains_key("sshs_model_hash"));
    run_ok(&["convert", p(&src), "--to", "ldm", "-o", p(&out)]);
    let md = load(&out).metadata;
    assert!(!md.contains_key("sshs_model_hash") && !md.contains_key("sshs_legacy_hash"));
    assert_eq!(md["ss_network_dim"], "4");
}

/// Merge = exact sum of weighted deltas (reference computed by torch).
#[test]
fn merge_matches_reference_delta() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ARCHES {
        let out = dir.path().join(format!("{arch}.safetensors"));
        run_ok(&[
            "merge",
            p(&fixture(&format!("{arch}/spm.safetensors"))),
            p(&fixture(&format!("{arch}/spm2.safetensors"))),
            "--weights",
            "0.7,0.3",
            "--to",
            "spm",
            "-o",
            p(&out),
        ]);
        let l = load(&out);
        let merged = modules(&l);
        let refd = load(&fixture(&format!("{arch}/merge_ref.safetensors")));
        assert_eq!(merged.len(), refd.tensors.len());
        let mut worst = 0.0f64;
        for (path, t) in &refd.tensors {
            let name = format!("lora_unet_{}", path.replace('.', "_"));
            let m = &merged[&name];
            assert_eq!(m["lora_down.weight"].shape[0], 2, "rank concatenated");
            let ours = delta(&m["lora_down.weight"], &m["lora_up.weight"], m.get("alpha"));
            let want = t.values();
            assert_eq!(ours.len(), want.len());
            for (a, b) in ours.iter().zip(&want) {
                worst = worst.max((a - b).abs() / (1e-3 + b.abs()));
            }
        }
        assert!(worst < 1e-5, "{arch}: relative error {worst}");
        assert_eq!(
            l.metadata["prompts"].split(',').count(),
            if arch == "sdxl" { 3 } else { 2 }
        );
        assert!(l.metadata["spm.merged_from"].contains("spm2.safetensors"));
    }
}

fn assert_fp16_close(ours: &T, want: &T, what: &str) {
    assert_eq!(ours.dtype, want.dtype, "{what}");
    assert_eq!(ours.shape, want.shape, "{what}");
    for (a, b) in ours.values().iter().zip(want.values()) {
        // One fp16 ulp at |b| (2^-10 relative; 2^-24 below the normal range).
        let ulp = (b.abs() * 2f64.powi(-10)).max(2f64.powi(-24));
        assert!((a - b).abs() <= ulp * 1.01, "{what}: {a} vs {b}");
    }
}

fn compare_checkpoints(ours: &Loaded, want: &Loaded, base: &Loaded, ctx: &str) -> usize {
    assert_eq!(
        ours.tensors.keys().collect::<Vec<_>>(),
        want.tensors.keys().collect::<Vec<_>>(),
        "{ctx}"
    );
    let mut changed = 0;
    for (k, w) in &want.tensors {
        let o = &ours.tensors[k];
        if base.tensors[k] == *w {
            assert_eq!(o, w, "{ctx}: untouched tensor {k} must be copied verbatim");
        } else {
            assert_fp16_close(o, w, &format!("{ctx} {k}"));
            changed += 1;
        }
    }
    changed
}

/// Bake equals diffusers' fuse_lora (fp32 math, fp16 storage) within one
/// fp16 ulp, for diffusers folders and single-file LDM checkpoints.
#[test]
fn bake_matches_diffusers_fuse() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ARCHES {
        let spm_f = fixture(&format!("{arch}/spm.safetensors"));
        let te_f = fixture(&format!("{arch}/kohya_te.safetensors"));
        // Bake spm at 1.0 and kohya_te at 0.5, as the reference did; every
        // adapter module must find its weight.
        let bake = |base: &str, out: &std::path::Path| {
            let report = run_ok(&[
                "bake",
                "--json",
                "--base",
                p(&fixture(&format!("{arch}/{base}"))),
                p(&spm_f),
                p(&te_f),
                "--weights",
                "1,0.5",
                "-o",
                p(out),
            ]);
            let r: serde_json::Value = serde_json::from_str(&report).unwrap();
            assert_eq!(
                r["unmatched"].as_array().unwrap().len(),
                0,
                "{arch}: {report}"
            );
        };
        let te_modules = if arch == "sdxl" { 24 } else { 12 };
        let unet_modules = if arch == "sdxl" { 722 } else { 192 };
        // Diffusers folder.
        let out = dir.path().join(format!("{arch}-baked"));
        bake("base", &out);
        let mut comps = vec![
            "unet/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors",
        ];
        if arch == "sdxl" {
            comps.push("text_encoder_2/model.safetensors");
        }
        let mut changed = 0;
        for c in &comps {
            changed += compare_checkpoints(
                &load(&out.join(c)),
                &load(&fixture(&format!("{arch}/baked_ref/{c}"))),
                &load(&fixture(&format!("{arch}/base/{c}"))),
                &format!("{arch} {c}"),
            );
        }
        assert_eq!(
            changed,
            unet_modules + te_modules,
            "{arch}: every target changed"
        );
        assert!(out.join("unet/config.json").exists());
        // Single-file LDM checkpoint. OpenCLIP encoders (sd2, sdxl te2) fuse
        // q/k/v into one in_proj weight, so fewer tensors change there.
        let out = dir.path().join(format!("{arch}-baked.safetensors"));
        bake("base_ldm.safetensors", &out);
        let changed = compare_checkpoints(
            &load(&out),
            &load(&fixture(&format!("{arch}/baked_ref_ldm.safetensors"))),
            &load(&fixture(&format!("{arch}/base_ldm.safetensors"))),
            &format!("{arch} ldm"),
        );
        let fused = match arch {
            "sd1" => 0,
            _ => 2 * 2, // two layers: q, k, v → one in_proj, i.e. 2 fewer per layer
        };
        assert_eq!(
            changed,
            unet_modules + te_modules - fused,
            "{arch} ldm: every target changed"
        );
    }
}

/// A pickled `.pt` SPM reads as the same tensors as its safetensors twin.
#[test]
fn pickle_reads_like_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.safetensors");
    let b = dir.path().join("b.safetensors");
    run_ok(&[
        "convert",
        p(&fixture("sd1/spm.pt")),
        "--to",
        "kohya",
        "-o",
        p(&a),
    ]);
    run_ok(&[
        "convert",
        p(&fixture("sd1/spm.safetensors")),
        "--to",
        "kohya",
        "-o",
        p(&b),
    ]);
    assert_eq!(load(&a).tensors, load(&b).tensors);
}

/// Old diffusers holds attention layers only: refused without
/// --allow-lossy (naming what is dropped), then 8 modules per block.
#[test]
fn diffusers_old_is_lossy_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("old.safetensors");
    let src = fixture("sd1/spm.safetensors");
    let o = spm()
        .args(["convert", p(&src), "--to", "diffusers-old", "-o", p(&out)])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--allow-lossy") && err.contains("down_blocks.0.attentions.0.proj_in"),
        "{err}"
    );
    assert!(!out.exists());
    run_ok(&[
        "convert",
        p(&src),
        "--to",
        "diffusers-old",
        "--allow-lossy",
        "-o",
        p(&out),
    ]);
    let l = load(&out);
    assert_eq!(l.tensors.len(), 16 * 8 * 2);
    assert!(l.tensors.contains_key(
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight"
    ));
    // It reads back as 128 modules with the SPM's factors.
    let back = dir.path().join("back.safetensors");
    run_ok(&["convert", p(&out), "--to", "spm", "-o", p(&back)]);
    let (b, s) = (modules(&load(&back)), modules(&load(&src)));
    assert_eq!(b.len(), 128);
    for (m, params) in &b {
        assert_eq!(params["lora_down.weight"], s[m]["lora_down.weight"]);
        assert_eq!(params["lora_up.weight"], s[m]["lora_up.weight"]);
    }
}

/// --strength follows SPM's reference (both factors × m → ΔW × m²) by
/// default; --curve linear scales ΔW by m.
#[test]
fn strength_curves() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("sd1/spm.safetensors");
    let s = modules(&load(&src));
    for (curve, want_scale) in [("reference", 0.25), ("linear", 0.5)] {
        let out = dir.path().join(format!("{curve}.safetensors"));
        run_ok(&[
            "convert",
            p(&src),
            "--to",
            "kohya",
            "--strength",
            "0.5",
            "--curve",
            curve,
            "-o",
            p(&out),
        ]);
        let o = modules(&load(&out));
        for (m, params) in &s {
            let d0 = delta(
                &params["lora_down.weight"],
                &params["lora_up.weight"],
                params.get("alpha"),
            );
            let d1 = delta(
                &o[m]["lora_down.weight"],
                &o[m]["lora_up.weight"],
                o[m].get("alpha"),
            );
            for (a, b) in d0.iter().zip(&d1) {
                assert!(
                    (a * want_scale - b).abs() <= 1e-7 * (1.0 + a.abs()),
                    "{curve} {m}"
                );
            }
        }
    }
}

/// --dtype fp16 rounds every float to nearest fp16 (checked with `half`).
#[test]
fn dtype_cast() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("sd1/spm.safetensors");
    let out = dir.path().join("h.safetensors");
    run_ok(&[
        "convert",
        p(&src),
        "--to",
        "kohya",
        "--dtype",
        "fp16",
        "-o",
        p(&out),
    ]);
    let (a, b) = (load(&src), load(&out));
    for (k, t) in &a.tensors {
        let o = &b.tensors[k];
        assert_eq!(o.dtype, safetensors::Dtype::F16);
        let want: Vec<f64> = t
            .values()
            .iter()
            .map(|v| half::f16::from_f64(*v).to_f64())
            .collect();
        assert_eq!(o.values(), want, "{k}");
    }
}

/// LyCORIS files made by lycoris-lora itself are detected and reported;
/// they convert between the kohya-family schemes (renames only) and are
/// refused, with a reason, where the target format cannot hold them.
#[test]
fn lycoris_and_dora_are_detected_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    for (name, algo, peft_refused) in [
        ("loha", "loha", true),
        ("lokr", "lokr", true),
        ("dora", "dora+lora", true),
    ] {
        let src = fixture(&format!("sd1/{name}.safetensors"));
        let v: serde_json::Value =
            serde_json::from_str(&run_ok(&["inspect", "--json", "--arch", "sd1", p(&src)]))
                .unwrap();
        assert_eq!(v["algorithm"], algo, "{name}");
        assert_eq!(v["coverage"][0]["found"], 192, "{name}");
        assert_eq!(v["unknown_keys"].as_array().unwrap().len(), 0, "{name}");
        // kohya → ldm → kohya keeps every tensor bit-exactly.
        let ldm = dir.path().join(format!("{name}-ldm.safetensors"));
        let back = dir.path().join(format!("{name}-back.safetensors"));
        run_ok(&[
            "convert",
            "--arch",
            "sd1",
            p(&src),
            "--to",
            "ldm",
            "-o",
            p(&ldm),
        ]);
        run_ok(&[
            "convert",
            "--arch",
            "sd1",
            p(&ldm),
            "--to",
            "kohya",
            "-o",
            p(&back),
        ]);
        assert_eq!(load(&src).tensors, load(&back).tensors, "{name}");
        let out = dir.path().join(format!("{name}-peft.safetensors"));
        let o = spm()
            .args([
                "convert",
                "--arch",
                "sd1",
                p(&src),
                "--to",
                "peft",
                "-o",
                p(&out),
            ])
            .output()
            .unwrap();
        assert_eq!(!o.status.success(), peft_refused, "{name}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("module(s) carry") && err.contains("cannot hold"),
            "{name}: {err}"
        );
        assert!(!out.exists());
        // Merging and baking need plain LoRA factors.
        let o = spm()
            .args([
                "merge",
                "--arch",
                "sd1",
                p(&src),
                p(&fixture("sd1/spm.safetensors")),
                "-o",
                p(&dir.path().join("m.safetensors")),
            ])
            .output()
            .unwrap();
        assert!(
            !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("plain LoRA"),
            "{name}"
        );
    }
}

/// Modules with no weight in the checkpoint are listed; --strict refuses
/// and writes nothing.
#[test]
fn bake_reports_unmatched_modules() {
    let dir = tempfile::tempdir().unwrap();
    // A base with a UNet but no text encoder.
    let base = dir.path().join("unet-only");
    std::fs::create_dir_all(base.join("unet")).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(
            fixture(&format!("sd1/base/unet/{f}")),
            base.join("unet").join(f),
        )
        .unwrap();
    }
    let lora = fixture("sd1/kohya_te.safetensors");
    let out = dir.path().join("baked");
    let r: serde_json::Value = serde_json::from_str(&run_ok(&[
        "bake",
        "--json",
        "--base",
        p(&base),
        p(&lora),
        "-o",
        p(&out),
    ]))
    .unwrap();
    let unmatched: Vec<&str> = r["unmatched"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(unmatched.len(), 12);
    assert!(
        unmatched
            .iter()
            .all(|u| u.contains("lora_te_text_model_encoder_layers_")),
        "{unmatched:?}"
    );
    assert_eq!(r["modules_applied"], 192);
    let strict_out = dir.path().join("strict");
    let o = spm()
        .args([
            "bake",
            "--strict",
            "--base",
            p(&base),
            p(&lora),
            "-o",
            p(&strict_out),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("12 adapter module(s) found no weight"));
    assert!(!strict_out.exists());
}

/// SD1 projections stored as 2-D factors (some converters do this) are
/// reshaped to the 1×1-conv layout PEFT needs; the bytes do not change.
#[test]
fn two_d_projections_become_conv_factors() {
    let src = load(&fixture("sd1/spm.safetensors"));
    let mut flat: Vec<(String, T)> = Vec::new();
    for (k, t) in &src.tensors {
        let mut t = t.clone();
        if (k.contains("proj_in") || k.contains("proj_out")) && t.shape.len() == 4 {
            t.shape.truncate(2);
        }
        flat.push((k.clone(), t));
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("flat.safetensors");
    save(&f, &flat, &src.metadata);
    let out = dir.path().join("peft.safetensors");
    run_ok(&[
        "convert",
        "--arch",
        "sd1",
        p(&f),
        "--to",
        "peft",
        "-o",
        p(&out),
    ]);
    let o = load(&out);
    let a = &o.tensors["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"];
    let b = &o.tensors["unet.down_blocks.0.attentions.0.proj_in.lora_B.weight"];
    let orig_down = &src.tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"];
    assert_eq!(a.shape, orig_down.shape);
    assert_eq!(a.shape.len(), 4);
    assert_eq!(b.shape[2..], [1, 1]);
    assert_eq!(a.bytes, orig_down.bytes);
}
