//! `spm generate` as a user runs it: PNGs with A1111 infotext, and one
//! clear error (nothing written) for each kind of bad input.
mod common;

use std::path::{Path, PathBuf};

use common::{p, rewrite, spm};

fn gen(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/data/generate")
        .join(rel)
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
}

/// Run generate on the tiny SD1 model with extra args; (success, stderr).
fn generate(model: &Path, out: &Path, extra: &[&str]) -> (bool, String) {
    let mut args = vec![
        "generate",
        "--model",
        p(model),
        "--steps",
        "2",
        "--size",
        "64x64",
        "-o",
        p(out),
    ];
    args.extend_from_slice(extra);
    let o = spm().args(&args).output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

fn png_text(path: &Path) -> String {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let r = dec.read_info().unwrap();
    let info = r.info();
    if let Some(t) = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
    {
        return t.text.clone();
    }
    let t = info
        .utf8_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .expect("parameters chunk");
    t.get_text().unwrap()
}

fn files(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(r) => r
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// A1111's infotext layout (modules/processing.py `create_infotext`):
/// prompt line, `Negative prompt:` line, then `Key: value` pairs joined by
/// ", " with values holding `,`/`:` JSON-quoted (infotext_utils.quote).
#[test]
fn png_carries_a1111_infotext_with_gates() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let (ok, err) = generate(
        &gen("sd1"),
        &out,
        &[
            "--membrane",
            p(&gen("sd1/spm_a.safetensors")),
            "--membrane",
            p(&gen("sd1/spm_b.safetensors")),
            "--negative",
            "blurry",
            "--seed",
            "7",
            "snoopy",
        ],
    );
    assert!(ok, "{err}");
    let text = png_text(&out.join("000-snoopy.png"));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "snoopy");
    assert_eq!(lines[1], "Negative prompt: blurry");
    assert!(
        lines[2].starts_with(
            "Steps: 2, Sampler: PLMS, CFG scale: 7.5, Seed: 7, Size: 64x64, Model: sd1,"
        ),
        "{text}"
    );
    assert!(
        lines[2].contains("SPM gates: \"spm_a=1.00, spm_b=0.91\""),
        "{text}"
    );
    assert!(lines[2].contains("SPM metric: clipcos_tokenuni"), "{text}");
}

#[test]
fn grid_writes_one_picture_per_prompt_three_columns_wide() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let (ok, err) = generate(
        &gen("sd1"),
        &out,
        &[
            "--membrane",
            p(&gen("sd1/spm_a.safetensors")),
            "--grid",
            "--json",
            "snoopy",
            "a cat",
        ],
    );
    assert!(ok, "{err}");
    let mut names = files(&out);
    names.sort();
    assert_eq!(names, ["000-snoopy-grid.png", "001-a-cat-grid.png"]);
    let dec = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(out.join("000-snoopy-grid.png")).unwrap(),
    ));
    let r = dec.read_info().unwrap();
    assert_eq!((r.info().width, r.info().height), (3 * 64 + 2 * 8, 64));
    assert!(png_text(&out.join("000-snoopy-grid.png")).contains("SPM grid: none | ft | 1"));
}

fn assert_refused(model: &Path, extra: &[&str], needle: &str) {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let mut args = extra.to_vec();
    args.push("a photo of a cat");
    let (ok, err) = generate(model, &out, &args);
    assert!(!ok, "should fail: {extra:?}");
    assert!(err.contains(needle), "stderr lacks `{needle}`: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("stack backtrace"),
        "{err}"
    );
    assert!(files(&out).is_empty(), "wrote {:?}", files(&out));
}

#[test]
fn size_not_divisible_by_8_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let o = spm()
        .args([
            "generate",
            "--model",
            p(&gen("sd1")),
            "--size",
            "60x64",
            "-o",
            p(&out),
            "x",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("multiples of 8"));
    assert!(!out.exists());
}

#[test]
fn missing_component_is_named() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("model");
    copy_dir(&gen("sd1"), &m);
    std::fs::remove_dir_all(m.join("vae")).unwrap();
    assert_refused(&m, &[], "vae");
}

#[test]
fn unknown_scheduler_class_is_named() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("model");
    copy_dir(&gen("sd1"), &m);
    let cfg = m.join("scheduler/scheduler_config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("PNDMScheduler", "FancyScheduler");
    std::fs::write(&cfg, text).unwrap();
    assert_refused(&m, &[], "FancyScheduler");
}

#[test]
fn wrong_weight_shape_names_file_and_key() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("model");
    copy_dir(&gen("sd1"), &m);
    let w = m.join("unet/diffusion_pytorch_model.safetensors");
    let tmp = d.path().join("w.safetensors");
    rewrite(&w, &tmp, |k, t| {
        if k == "conv_in.weight" {
            t.shape = vec![t.shape[0], t.shape[1], 9, 1];
        }
    });
    std::fs::rename(&tmp, &w).unwrap();
    assert_refused(&m, &[], "conv_in.weight");
}

#[test]
fn nan_weight_is_refused_with_its_key() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("model");
    copy_dir(&gen("sd1"), &m);
    let w = m.join("vae/diffusion_pytorch_model.safetensors");
    let tmp = d.path().join("w.safetensors");
    rewrite(&w, &tmp, |k, t| {
        if k == "decoder.conv_out.bias" {
            // f16 NaN
            t.bytes[0] = 0x00;
            t.bytes[1] = 0x7e;
        }
    });
    std::fs::rename(&tmp, &w).unwrap();
    assert_refused(&m, &[], "decoder.conv_out.bias");
}

#[test]
fn membrane_for_another_architecture_is_refused() {
    let sdxl = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/data/sdxl/spm.safetensors");
    assert_refused(
        &gen("sd1"),
        &["--membrane", p(&sdxl)],
        "another architecture",
    );
}

#[test]
fn grid_without_membranes_is_refused() {
    assert_refused(&gen("sd1"), &["--grid"], "--membrane");
}

#[test]
fn output_inside_the_model_folder_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("model");
    copy_dir(&gen("sd1"), &m);
    let out = m.join("images");
    let (ok, err) = generate(&m, &out, &["a cat"]);
    assert!(!ok);
    assert!(err.contains("inside the input"), "{err}");
    assert!(
        !out.exists(),
        "the refused output folder was created inside the model"
    );
}

#[test]
fn existing_image_needs_force() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let (ok, err) = generate(&gen("sd1"), &out, &["a cat"]);
    assert!(ok, "{err}");
    let (ok, err) = generate(&gen("sd1"), &out, &["a cat"]);
    assert!(!ok && err.contains("--force"), "{err}");
    let (ok, err) = generate(&gen("sd1"), &out, &["--force", "a cat"]);
    assert!(ok, "{err}");
}

/// Ctrl-C (SIGINT) stops between steps: exit 130, no half-written PNG and
/// no temp file left in the output folder.
#[cfg(unix)]
#[test]
fn ctrl_c_stops_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let bin = assert_cmd::cargo::cargo_bin("spm");
    let child = std::process::Command::new(bin)
        .args([
            "generate",
            "--model",
            p(&gen("sd1")),
            "--steps",
            "500",
            "--size",
            "64x64",
            "-o",
            p(&out),
            "a cat",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Let it load and start denoising.
    std::thread::sleep(std::time::Duration::from_secs(4));
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("stopped by Ctrl-C"), "{err}");
    assert!(files(&out).is_empty(), "{:?}", files(&out));
}

/// SDXL, folder and SGM single file (with `--config`): a grid PNG whose
/// infotext carries the FT gate computed over both encoders.
#[test]
fn sdxl_generates_an_ft_grid_from_folder_and_single_file() {
    let d = tempfile::tempdir().unwrap();
    let membrane = gen("sdxl/spm_a.safetensors");
    for (i, extra) in [vec![], vec!["--config", p(&gen("sdxl"))]]
        .iter()
        .enumerate()
    {
        let model = if i == 0 {
            gen("sdxl")
        } else {
            gen("sdxl.safetensors")
        };
        let out = d.path().join(format!("xl{i}"));
        let mut args = vec!["--membrane", p(&membrane), "--grid", "snoopy"];
        args.extend(extra.iter().copied());
        let (ok, err) = generate(&model, &out, &args);
        assert!(ok, "{err}");
        let png = out.join("000-snoopy-grid.png");
        let text = png_text(&png);
        assert!(text.contains("SPM gates: spm_a=1.00"), "{text}");
        assert!(text.contains("Size: 64x64"), "{text}");
    }
}
