//! `spm train` end to end on the tiny SD1 pipeline: 30 steps per method
//! lower the loss at a fixed held-out draw, keep SPM's anchor term small,
//! and write a file that `spm inspect` reads and `spm gate` gates; a run
//! interrupted by Ctrl-C and resumed writes the same bytes as an
//! uninterrupted one; bad requests fail before any work.

use std::path::{Path, PathBuf};
use std::process::Command;

fn gen(arch: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/data/generate")
        .join(arch)
}

fn p(x: &Path) -> &str {
    x.to_str().unwrap()
}

fn spm() -> Command {
    Command::new(assert_cmd::cargo::cargo_bin("spm"))
}

/// 30 steps in release builds; 10 in unoptimised debug builds (CI's
/// suite, also under wine), where candle runs ~10× slower.
fn steps() -> &'static str {
    if cfg!(debug_assertions) {
        "10"
    } else {
        "30"
    }
}

fn train(method: &str, lr: &str, out: &Path, extra: &[&str]) -> serde_json::Value {
    train_on(&gen("sd1"), method, lr, out, extra)
}

fn train_on(model: &Path, method: &str, lr: &str, out: &Path, extra: &[&str]) -> serde_json::Value {
    let o = spm()
        .args([
            "train",
            "--model",
            p(model),
            "--concept",
            "snoopy",
            "--method",
            method,
            "--iterations",
            steps(),
            "--resolution",
            "64",
            "--fixed-resolution",
            "--lr",
            lr,
            "--lr-scheduler",
            "constant",
            "--fmn-images",
            "2",
            "--fmn-gen-steps",
            "5",
            "--max-denoising-steps",
            "3",
            "--esd-steps",
            "4",
            "--json",
            "-o",
            p(out),
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn term(v: &serde_json::Value, which: &str, name: &str) -> f64 {
    v[which]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p[0] == name)
        .unwrap()[1]
        .as_f64()
        .unwrap()
}

fn inspect_and_gate(out: &Path, modules: u64) {
    let o = spm().args(["inspect", "--json", p(out)]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(text.contains("snoopy"), "{text}");
    assert_eq!(v["modules"], modules, "{text}");
    let o = spm()
        .args([
            "gate",
            "--json",
            "--membrane",
            p(out),
            "a photo of snoopy",
            "a photo of a cat",
        ])
        .output()
        .unwrap();
    let g = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_str(&g).unwrap();
    let rate = |i: usize| {
        let g = &v["results"][i]["gates"];
        let (_, one) = g.as_object().unwrap().iter().next().unwrap();
        one["rate"].as_f64().unwrap()
    };
    assert_eq!(rate(0), 1.0, "the concept prompt opens the gate: {g}");
    assert_eq!(rate(1), 0.0, "an unrelated prompt does not: {g}");
}

#[test]
fn spm_thirty_steps_erase_and_anchor() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("snoopy.safetensors");
    let v = train("spm", "1e-3", &out, &[]);
    let (e0, e1) = (
        term(&v, "eval_before", "erase"),
        term(&v, "eval_after", "erase"),
    );
    let a1 = term(&v, "eval_after", "anchor");
    assert_eq!(
        term(&v, "eval_before", "anchor"),
        0.0,
        "membranes start at up = 0"
    );
    assert!(e1 < e0, "erase loss {e0} → {e1}");
    assert!(
        a1 < 0.1 * e0,
        "anchor loss {a1} stays small next to erase {e0}"
    );
    assert_eq!(v["modules"], 192);
    inspect_and_gate(&out, 192);
}

/// SDXL: SPM (train_spm_xl.py's loop) and ESD-x train on the tiny SDXL
/// pipeline and write files `spm inspect` calls SDXL and `spm gate` gates
/// with both SDXL encoders; ESD-x lowers its loss. (SPM's erase term on
/// this tiny random model is ~4e-5 against λ = 1000 anchoring, so ten
/// steps move it within noise; its step is held to torch in tests/train.rs.)
#[test]
fn sdxl_spm_and_esd_train_inspect_and_gate() {
    let d = tempfile::tempdir().unwrap();
    for (method, lr, name, modules) in [("spm", "1e-3", "erase", 192), ("esd-x", "1e-2", "esd", 68)]
    {
        let out = d.path().join(format!("xl-{method}.safetensors"));
        let v = train_on(&gen("sdxl"), method, lr, &out, &[]);
        let (l0, l1) = (term(&v, "eval_before", name), term(&v, "eval_after", name));
        assert!(l0.is_finite() && l1.is_finite(), "{method}: {l0} → {l1}");
        if method != "spm" {
            assert!(l1 < l0, "{method}: {l0} → {l1}");
        }
        assert_eq!(v["modules"], modules);
        let o = spm().args(["inspect", "--json", p(&out)]).output().unwrap();
        let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(info["arch"], "sdxl", "{info}");
        let o = spm()
            .args(["gate", "--json", "--membrane", p(&out), "--text-encoder"])
            .arg(gen("sdxl"))
            .args(["snoopy", "a photo of a cat"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let g: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let rate = |i: usize| {
            let (_, one) = g["results"][i]["gates"]
                .as_object()
                .unwrap()
                .iter()
                .next()
                .unwrap();
            (one["rate"].as_f64().unwrap(), one["clipcos"].as_f64())
        };
        // The concept itself: cosine 1 over the SDXL conditioning.
        assert!((rate(0).0 - 1.0).abs() < 1e-6, "{g}");
        assert!(rate(1).1.is_some() && rate(1).0 < 1.0, "{g}");
        if method == "esd-x" {
            // esd_sdxl.py's own default η.
            assert_eq!(v["settings"]["eta"], 1.0, "{v}");
        }
    }
    // esd_sdxl.py's default lr for esd-x, and the CompVis script refused.
    let base = |extra: &[&str]| {
        let out = d
            .path()
            .join(format!("xl-defaults-{}.safetensors", extra.len()));
        spm()
            .args(["train", "--model"])
            .arg(gen("sdxl"))
            .args([
                "--concept",
                "snoopy",
                "--method",
                "esd-x",
                "--iterations",
                "1",
                "--resolution",
                "64",
                "--esd-steps",
                "2",
                "--json",
                "-o",
            ])
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let o = base(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["settings"]["lr"], 2e-4, "{v}");
    let o = base(&["--esd-variant", "compvis"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("esd_sdxl.py"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn esd_and_fmn_thirty_steps_lower_their_loss() {
    let d = tempfile::tempdir().unwrap();
    for (method, name, modules) in [("esd-x", "esd", 64), ("fmn", "attn", 64)] {
        let out = d.path().join(format!("{method}.safetensors"));
        let v = train(method, "1e-2", &out, &[]);
        let (l0, l1) = (term(&v, "eval_before", name), term(&v, "eval_after", name));
        assert!(l1 < l0, "{method}: {l0} → {l1}");
        inspect_and_gate(&out, modules);
    }
}

/// Ctrl-C saves the state; --resume finishes the run bit for bit as if it
/// had never stopped (each step draws from its own seeded generator).
#[cfg(unix)]
#[test]
fn ctrl_c_then_resume_equals_an_uninterrupted_run() {
    let d = tempfile::tempdir().unwrap();
    let args = |out: &Path| -> Vec<String> {
        [
            "train",
            "--model",
            p(&gen("sd1")),
            "--concept",
            "snoopy",
            "--method",
            "fmn",
            "--iterations",
            "60",
            "--resolution",
            "64",
            "--lr",
            "1e-2",
            "--fmn-images",
            "1",
            "--fmn-gen-steps",
            "3",
            "-o",
            p(out),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let whole = d.path().join("whole.safetensors");
    assert!(spm().args(args(&whole)).output().unwrap().status.success());
    let cut = d.path().join("cut.safetensors");
    let child = spm()
        .args(args(&cut))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    if o.status.code() == Some(0) {
        eprintln!("the run finished before the signal; nothing to resume");
        return;
    }
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(!cut.exists(), "no output before the run finished");
    let state = d.path().join("cut_state.safetensors");
    assert!(state.is_file(), "{err}");
    let mut a = args(&cut);
    a.extend(["--resume".to_string(), p(&state).to_string()]);
    let o = spm().args(&a).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&whole).unwrap(), std::fs::read(&cut).unwrap());
    // Other options: refused, naming the checkpoint.
    let mut b = args(&d.path().join("other.safetensors"));
    b.extend([
        "--resume".into(),
        p(&state).into(),
        "--rank".into(),
        "2".into(),
    ]);
    let o = spm().args(&b).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("other options"));
}

#[test]
fn bad_requests_fail_before_any_work() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("x.safetensors");
    let run = |extra: &[&str]| {
        let o = spm()
            .args(["train", "-o", p(&out)])
            .args(extra)
            .output()
            .unwrap();
        assert!(!o.status.success());
        assert!(!out.exists());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let m = gen("sd1");
    assert!(run(&["--model", p(&m)]).contains("--concept"));
    assert!(run(&[
        "--model",
        p(&m),
        "--concept",
        "x",
        "--method",
        "spm",
        "--full"
    ])
    .contains("--full"));
    assert!(run(&["--model", p(&m), "--concept", "x", "--rank", "0"]).contains("--rank"));
    assert!(run(&["--model", p(&d.path().join("nope")), "--concept", "x"]).contains("nope"));
    // An output inside the model folder is refused.
    let inside = m.join("x.safetensors");
    let o = spm()
        .args([
            "train",
            "--model",
            p(&m),
            "--concept",
            "x",
            "-o",
            p(&inside),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success() && !inside.exists());
    // The reference's config with a misspelt field: named.
    let cfg = d.path().join("config.yaml");
    std::fs::write(
        &cfg,
        "prompts_file: prompt.yaml\npretrained_model:\n  name_or_path: x\nnetwork:\n  rank: 1\n  alpah: 1.0\n",
    )
    .unwrap();
    std::fs::write(d.path().join("prompt.yaml"), "- target: pikachu\n").unwrap();
    let e = run(&["--config", p(&cfg)]);
    assert!(e.contains("alpah") && e.contains("config.yaml"), "{e}");
    // A prompt.yaml field the reference does not have.
    std::fs::write(
        &cfg,
        "prompts_file: prompt.yaml\npretrained_model:\n  name_or_path: x\n",
    )
    .unwrap();
    std::fs::write(
        d.path().join("prompt.yaml"),
        "- target: pikachu\n  la_strenght: 10\n",
    )
    .unwrap();
    let e = run(&["--config", p(&cfg), "--model", p(&m)]);
    assert!(
        e.contains("la_strenght") && e.contains("prompt.yaml"),
        "{e}"
    );
    // A Windows path in double quotes: YAML escapes; the error says what to do.
    std::fs::write(
        &cfg,
        "prompts_file: \"C:\\Users\\me\\prompt.yaml\"\npretrained_model:\n  name_or_path: x\n",
    )
    .unwrap();
    let e = run(&["--config", p(&cfg)]);
    assert!(
        e.contains("single quotes") && e.contains("config.yaml"),
        "{e}"
    );
}

/// The reference's own pikachu config.yaml + prompt.yaml (Con6924/SPM
/// configs/pikachu, field for field) is read and trains. Paths go in single
/// quotes: in double quotes YAML reads a Windows path's backslashes as
/// escapes (the wine run).
#[test]
fn reference_config_files_train() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("config.yaml");
    let prompts = d.path().join("prompt.yaml");
    std::fs::write(&cfg, format!(
        "prompts_file: '{}'\n\npretrained_model:\n  name_or_path: '{}'\n  v2: false\n  v_pred: false\n  clip_skip: 1\n\nnetwork:\n  rank: 1\n  alpha: 1.0\n\ntrain:\n  precision: float32\n  noise_scheduler: \"ddim\"\n  iterations: 3000\n  batch_size: 1\n  lr: 0.0001\n  unet_lr: 0.0001\n  text_encoder_lr: 5e-05\n  optimizer_type: \"AdamW8bit\"\n  lr_scheduler: \"cosine_with_restarts\"\n  lr_warmup_steps: 7\n  lr_scheduler_num_cycles: 3\n  max_denoising_steps: 30\n\nsave:\n  name: \"pikachu\"\n  path: \"output/pikachu\"\n  per_steps: 500\n  precision: float32\n\nlogging:\n  use_wandb: true\n  interval: 500\n  seed: 0\n  generate_num: 2\n  run_name: \"pikachu\"\n  verbose: false\n  prompts: ['pikachu', '', 'dog', 'mickey', 'woman']\n\nother:\n  use_xformers: true\n",
        p(&prompts), p(&gen("sd1"))
    )).unwrap();
    std::fs::write(&prompts, "\n- target: \"pikachu\"\n  positive: \"pikachu\"\n  unconditional: \"\"\n  neutral: \"\"\n  action: \"erase_with_la\"\n  guidance_scale: \"1.0\"\n  resolution: 512\n  batch_size: 1\n  dynamic_resolution: false\n  la_strength: 1000\n  sampling_batch_size: 4\n").unwrap();
    let out = d.path().join("pikachu.safetensors");
    let o = spm()
        .args([
            "train",
            "--config",
            p(&cfg),
            "--iterations",
            "2",
            "--resolution",
            "64",
            "--json",
            "-o",
            p(&out),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["settings"]["schedule"]["kind"], "cosine_with_restarts");
    // The config's own values, not the defaults (warm-up 7 here).
    assert_eq!(v["settings"]["schedule"]["warmup"], 7);
    assert_eq!(v["settings"]["adam"]["rule"], "adam-w-after");
    // Step 1 of the reference schedule runs at lr 0: the weights do not move
    // (up stays exactly 0 after the first of the two steps … and the file
    // holds the reference's metadata).
    let bytes = std::fs::read(&out).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let m = meta.metadata().as_ref().unwrap();
    assert_eq!(m["prompts"], "pikachu");
    assert_eq!(m["rank"], "1");
    assert_eq!(m["alpha"], "1.0");
}

/// `--full` writes the trained layers' weights as a partial diffusers state
/// dict (ESD's own format) under their parameter names; inspect names it.
#[test]
fn full_weight_output_is_a_partial_state_dict_inspect_reads() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("esd_full.safetensors");
    let v = train("esd-x", "1e-3", &out, &["--full"]);
    assert_eq!(v["tensors"], 80);
    let o = spm().args(["inspect", "--json", p(&out)]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["modules"], 64);
    assert_eq!(r["tensors"], 80);
    assert_eq!(r["method"], "esd-x");
    assert_eq!(r["concepts"][0], "snoopy");
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st
        .names()
        .contains(&"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"));
}

/// FMN on photos (`--images`): PNGs (here two written by `spm generate`,
/// one not square) go through the VAE encoder and train; a file that is
/// not an image is named before any work.
#[test]
fn fmn_trains_on_an_image_folder_and_names_a_bad_image() {
    let d = tempfile::tempdir().unwrap();
    let imgs = d.path().join("imgs");
    for (i, size) in ["64x64", "64x96"].iter().enumerate() {
        let out = d.path().join(format!("g{i}"));
        let o = spm()
            .args([
                "generate",
                "--model",
                p(&gen("sd1")),
                "--steps",
                "2",
                "--size",
                size,
                "snoopy",
                "-o",
                p(&out),
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::create_dir_all(&imgs).unwrap();
        let png = std::fs::read_dir(&out)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        std::fs::copy(png, imgs.join(format!("{i}.png"))).unwrap();
    }
    let out = d.path().join("fmn.safetensors");
    let v = train("fmn", "1e-2", &out, &["--images", p(&imgs)]);
    assert!(term(&v, "eval_after", "attn") < term(&v, "eval_before", "attn"));
    std::fs::write(imgs.join("bad.jpg"), b"not a jpeg").unwrap();
    let out2 = d.path().join("fmn2.safetensors");
    let o = spm()
        .args([
            "train",
            "--model",
            p(&gen("sd1")),
            "--concept",
            "snoopy",
            "--method",
            "fmn",
            "--resolution",
            "64",
            "--images",
            p(&imgs),
            "-o",
            p(&out2),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success() && !out2.exists());
    assert!(String::from_utf8_lossy(&o.stderr).contains("bad.jpg"));
}
