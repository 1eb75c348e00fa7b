//! Bad input never panics: every case exits non-zero with one error line
//! that names the file (and the key or field where there is one).
//! Inputs are hand-built bytes, so the expectations come from the
//! safetensors format itself, not from spm's writer.

use std::path::{Path, PathBuf};

use assert_cmd::Command;

fn spm() -> Command {
    Command::cargo_bin("spm").unwrap()
}

/// A safetensors file from a raw JSON header and data bytes.
fn st_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(data);
    v
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

const DOWN: &str = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";

/// A valid one-module SD1 LoRA: down [1,4] up [4,1] alpha 0-d, all F32.
fn valid() -> Vec<u8> {
    let header = format!(
        r#"{{"{DOWN}.lora_down.weight":{{"dtype":"F32","shape":[1,4],"data_offsets":[0,16]}},"{DOWN}.lora_up.weight":{{"dtype":"F32","shape":[4,1],"data_offsets":[16,32]}},"{DOWN}.alpha":{{"dtype":"F32","shape":[],"data_offsets":[32,36]}}}}"#
    );
    st_bytes(&header, &[0u8; 36])
}

/// Run `inspect` and `convert` on `file`; both must fail cleanly with
/// every `needles` substring in stderr.
fn fails_cleanly(file: &Path, needles: &[&str]) {
    let out_dir = tempfile::tempdir().unwrap();
    let runs = [
        vec!["inspect".to_string(), file.display().to_string()],
        vec![
            "convert".to_string(),
            file.display().to_string(),
            "--to".into(),
            "peft".into(),
            "-o".into(),
            out_dir.path().join("o.safetensors").display().to_string(),
        ],
    ];
    for args in runs {
        let out = spm().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded on bad input");
        assert_ne!(out.status.code(), Some(101), "{args:?} panicked: {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        assert!(
            err.contains(&file.display().to_string()),
            "{args:?}: error does not name the file: {err}"
        );
        for n in needles {
            assert!(err.contains(n), "{args:?}: expected `{n}` in: {err}");
        }
        assert!(
            !out_dir.path().join("o.safetensors").exists(),
            "output written despite the error"
        );
    }
}

#[test]
fn valid_baseline_is_accepted() {
    let d = tempfile::tempdir().unwrap();
    let f = write(d.path(), "ok.safetensors", &valid());
    spm().arg("inspect").arg(&f).assert().success();
}

#[test]
fn truncated_file() {
    let d = tempfile::tempdir().unwrap();
    let mut b = valid();
    b.truncate(b.len() - 10);
    let f = write(d.path(), "trunc.safetensors", &b);
    fails_cleanly(&f, &["truncated"]);
}

#[test]
fn shorter_than_length_field() {
    let d = tempfile::tempdir().unwrap();
    let f = write(d.path(), "tiny.safetensors", &[1, 2, 3]);
    fails_cleanly(&f, &["shorter than the 8-byte"]);
}

#[test]
fn header_length_beyond_file() {
    let d = tempfile::tempdir().unwrap();
    let mut b = valid();
    b[..8].copy_from_slice(&(5_000u64).to_le_bytes());
    let f = write(d.path(), "long.safetensors", &b);
    fails_cleanly(&f, &["runs past the end"]);
}

#[test]
fn huge_header_length_does_not_allocate() {
    let d = tempfile::tempdir().unwrap();
    let mut b = valid();
    b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let f = write(d.path(), "huge.safetensors", &b);
    fails_cleanly(&f, &["exceeds"]);
}

#[test]
fn bad_json_header() {
    let d = tempfile::tempdir().unwrap();
    let f = write(d.path(), "json.safetensors", &st_bytes("{\"a\": [1,", &[]));
    fails_cleanly(&f, &["not valid JSON"]);
}

#[test]
fn unknown_dtype_names_the_key() {
    let d = tempfile::tempdir().unwrap();
    let h = format!(
        r#"{{"{DOWN}.lora_down.weight":{{"dtype":"F7","shape":[1,4],"data_offsets":[0,16]}}}}"#
    );
    let f = write(d.path(), "dtype.safetensors", &st_bytes(&h, &[0; 16]));
    fails_cleanly(&f, &["unknown dtype `F7`", DOWN]);
}

#[test]
fn overlapping_offsets_name_the_key() {
    let d = tempfile::tempdir().unwrap();
    let h = format!(
        r#"{{"{DOWN}.lora_down.weight":{{"dtype":"F32","shape":[1,4],"data_offsets":[0,16]}},"{DOWN}.lora_up.weight":{{"dtype":"F32","shape":[4,1],"data_offsets":[8,24]}}}}"#
    );
    let f = write(d.path(), "overlap.safetensors", &st_bytes(&h, &[0; 24]));
    fails_cleanly(&f, &["overlaps"]);
}

#[test]
fn offsets_out_of_range() {
    let d = tempfile::tempdir().unwrap();
    let h = format!(
        r#"{{"{DOWN}.lora_down.weight":{{"dtype":"F32","shape":[1,4],"data_offsets":[1000,1016]}}}}"#
    );
    let f = write(d.path(), "range.safetensors", &st_bytes(&h, &[0; 16]));
    fails_cleanly(&f, &["run past the end", DOWN]);
}

#[test]
fn offsets_disagree_with_shape() {
    let d = tempfile::tempdir().unwrap();
    let h = format!(
        r#"{{"{DOWN}.lora_down.weight":{{"dtype":"F32","shape":[1,4],"data_offsets":[0,12]}}}}"#
    );
    let f = write(d.path(), "size.safetensors", &st_bytes(&h, &[0; 12]));
    fails_cleanly(&f, &["needs 16", DOWN]);
}

#[test]
fn non_string_metadata_names_the_field() {
    let d = tempfile::tempdir().unwrap();
    let h = r#"{"__metadata__":{"prompts":7}}"#;
    let f = write(d.path(), "meta.safetensors", &st_bytes(h, &[]));
    fails_cleanly(&f, &["__metadata__.prompts"]);
}

#[test]
fn missing_file() {
    let d = tempfile::tempdir().unwrap();
    fails_cleanly(&d.path().join("nope.safetensors"), &["No such file"]);
}

#[test]
fn garbage_pickle() {
    let d = tempfile::tempdir().unwrap();
    let f = write(
        d.path(),
        "evil.pt",
        b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.",
    );
    fails_cleanly(&f, &["cannot read as a PyTorch state dict"]);
}

#[test]
fn no_lora_keys() {
    let d = tempfile::tempdir().unwrap();
    let h =
        r#"{"model.diffusion_model.x.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let f = write(d.path(), "ckpt.safetensors", &st_bytes(h, &[0; 4]));
    fails_cleanly(&f, &["no LoRA keys"]);
}

#[test]
fn rank_mismatch_names_the_module() {
    let d = tempfile::tempdir().unwrap();
    let h = format!(
        r#"{{"{DOWN}.lora_down.weight":{{"dtype":"F32","shape":[1,4],"data_offsets":[0,16]}},"{DOWN}.lora_up.weight":{{"dtype":"F32","shape":[2,2],"data_offsets":[16,32]}}}}"#
    );
    let f = write(d.path(), "rank.safetensors", &st_bytes(&h, &[0; 32]));
    // inspect reports the problem; convert refuses.
    let out = spm().arg("inspect").arg(&f).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("rank mismatch"));
    let o = d.path().join("o.safetensors");
    let out = spm()
        .args(["convert", "--to", "kohya", "-o"])
        .arg(&o)
        .arg(&f)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("rank mismatch") && err.contains(DOWN), "{err}");
    assert!(!o.exists());
}

#[test]
fn unknown_keys_are_named_and_refused() {
    let d = tempfile::tempdir().unwrap();
    let bad = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn9_to_q";
    let mut h = String::from_utf8(
        valid()[8..8 + u64::from_le_bytes(valid()[..8].try_into().unwrap()) as usize].to_vec(),
    )
    .unwrap();
    h.pop();
    h.push_str(&format!(
        r#","{bad}.lora_down.weight":{{"dtype":"F32","shape":[1,4],"data_offsets":[36,52]}}}}"#
    ));
    let f = write(d.path(), "unk.safetensors", &st_bytes(&h, &[0; 52]));
    let out = spm().arg("inspect").arg(&f).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("{bad}.lora_down.weight")), "{text}");
    let o = d.path().join("o.safetensors");
    let out = spm()
        .args(["convert", "--to", "kohya", "-o"])
        .arg(&o)
        .arg(&f)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(bad));
    // With --allow-unknown the key is dropped and the rest converts.
    spm()
        .args(["convert", "--to", "kohya", "--allow-unknown", "-o"])
        .arg(&o)
        .arg(&f)
        .assert()
        .success();
    assert!(o.exists());
}

#[test]
fn refuses_to_overwrite_without_force_and_never_writes_inputs() {
    let d = tempfile::tempdir().unwrap();
    let f = write(d.path(), "in.safetensors", &valid());
    let before = std::fs::read(&f).unwrap();
    let o = write(d.path(), "exists.safetensors", b"keep me");
    let out = spm()
        .args(["convert", "--to", "kohya", "-o"])
        .arg(&o)
        .arg(&f)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(std::fs::read(&o).unwrap(), b"keep me");
    // Output == input is refused even with --force.
    let out = spm()
        .args(["convert", "--to", "kohya", "--force", "-o"])
        .arg(&f)
        .arg(&f)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("also an input"));
    assert_eq!(std::fs::read(&f).unwrap(), before);
    spm()
        .args(["convert", "--to", "kohya", "--force", "-o"])
        .arg(&o)
        .arg(&f)
        .assert()
        .success();
    assert_ne!(std::fs::read(&o).unwrap(), b"keep me");
    // No temp files are left behind.
    let leftovers: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".spm-tmp"))
        .collect();
    assert!(leftovers.is_empty());
}

/// Mutation fuzz of the container parser: thousands of corrupted variants
/// of a valid file (random bytes overwritten in the length field, the
/// header and the data, truncations) must each load or fail with an error,
/// never panic. A fixed-seed generator keeps the run reproducible.
#[test]
fn mutated_files_never_panic() {
    let d = tempfile::tempdir().unwrap();
    let base = valid();
    let mut seed: u64 = 0x5eed_1234_abcd_0001;
    let mut next = move || {
        // xorshift64*
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let path = d.path().join("m.safetensors");
    let mut outcomes = [0usize; 2];
    for _ in 0..3000 {
        let mut b = base.clone();
        match next() % 4 {
            0 => {
                let i = (next() % 8) as usize;
                b[i] = next() as u8;
            }
            1 | 2 => {
                for _ in 0..=(next() % 4) {
                    let i = (next() as usize) % b.len();
                    b[i] = next() as u8;
                }
            }
            _ => b.truncate((next() as usize) % b.len()),
        }
        std::fs::write(&path, &b).unwrap();
        let out = d.path().join("o.safetensors");
        let r = std::panic::catch_unwind(|| {
            let a = spm::adapter::Adapter::load(&path, None)?;
            // Everything downstream of a successful load must cope too.
            let _ = spm::inspect::render_text(&spm::inspect::inspect(&a));
            let opts = spm::convert::ConvertOptions {
                to: spm::schemes::Scheme::Peft,
                dtype: None,
                strength: Some(0.5),
                curve: spm::convert::Curve::Reference,
                allow_lossy: true,
                allow_unknown: true,
                title: "t".into(),
                peft_fold_alpha: true,
            };
            let _ = spm::convert::convert(&a, &opts);
            let _ = spm::merge::merge(
                &[spm::merge::Part {
                    adapter: &a,
                    weight: 0.5,
                }],
                None,
            );
            let _ = &out;
            Ok::<usize, spm::Error>(a.modules.len())
        });
        let r = r.unwrap_or_else(|_| panic!("panicked on mutated input {b:?}"));
        outcomes[r.is_ok() as usize] += 1;
        if let Err(e) = r {
            assert!(
                e.to_string().contains("m.safetensors"),
                "error does not name the file: {e}"
            );
        }
    }
    // Both outcomes occur: the mutations are neither all harmless nor all fatal.
    assert!(outcomes[0] > 100 && outcomes[1] > 100, "{outcomes:?}");
}

/// Zero-rank factors (shape [0, n]) are well-formed safetensors; every
/// command must report them, not divide by zero.
#[test]
fn zero_rank_factors_do_not_panic() {
    let d = tempfile::tempdir().unwrap();
    let h = format!(
        r#"{{"{DOWN}.lora_down.weight":{{"dtype":"F32","shape":[0,4],"data_offsets":[0,0]}},"{DOWN}.lora_up.weight":{{"dtype":"F32","shape":[4,0],"data_offsets":[0,0]}}}}"#
    );
    let f = write(d.path(), "zero.safetensors", &st_bytes(&h, &[]));
    let out = spm().arg("inspect").arg(&f).output().unwrap();
    assert_ne!(
        out.status.code(),
        Some(101),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let o = d.path().join("o.safetensors");
    for args in [
        vec!["convert", "--to", "peft", "--strength", "0.5", "-o"],
        vec!["merge", "--weights", "2", "-o"],
    ] {
        let out = spm().args(&args).arg(&o).arg(&f).output().unwrap();
        assert_ne!(
            out.status.code(),
            Some(101),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::remove_file(&o);
    }
}

/// Scalar (0-d) factors where matrices belong are reported, not indexed.
#[test]
fn scalar_factors_are_problems_not_panics() {
    let d = tempfile::tempdir().unwrap();
    let h = format!(
        r#"{{"{DOWN}.lora_down.weight":{{"dtype":"F32","shape":[],"data_offsets":[0,4]}},"{DOWN}.lora_up.weight":{{"dtype":"F32","shape":[],"data_offsets":[4,8]}}}}"#
    );
    let f = write(d.path(), "scalar.safetensors", &st_bytes(&h, &[0; 8]));
    let out = spm().arg("inspect").arg(&f).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("do not fit"));
    let o = d.path().join("o.safetensors");
    let out = spm()
        .args(["convert", "--to", "kohya", "-o"])
        .arg(&o)
        .arg(&f)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(DOWN));
}
