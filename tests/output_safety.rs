//! Users' files are sacred: no output may be, contain or lie inside an
//! input — `--force` included — and outputs get ordinary permissions.
//!
//! Every case builds a scratch copy of the bundled fixtures, runs the real
//! binary, and compares the whole tree byte for byte with a snapshot taken
//! before the run, so any deletion or change anywhere is caught.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;

/// Every file under `root` (relative path → bytes).
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                walk(root, &p, out);
            } else if meta.is_file() {
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dst = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_tree(&p, &dst);
        } else {
            std::fs::copy(&p, &dst).unwrap();
        }
    }
}

/// A user's model folder: `models/sd1/` (a diffusers pipeline),
/// `models/sd1.safetensors` (a single file), `models/Lora/spm.safetensors`
/// and an unrelated `models/notes.txt`.
fn models() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("models");
    copy_tree(&fixture("sd1/base"), &m.join("sd1"));
    std::fs::copy(
        fixture("sd1/base_ldm.safetensors"),
        m.join("sd1.safetensors"),
    )
    .unwrap();
    std::fs::create_dir_all(m.join("Lora")).unwrap();
    std::fs::copy(
        fixture("sd1/spm.safetensors"),
        m.join("Lora/spm.safetensors"),
    )
    .unwrap();
    std::fs::write(m.join("notes.txt"), "my notes").unwrap();
    (d, m)
}

/// Run spm; it must fail with one clean error line containing `needle`,
/// and leave the whole tree under `root` exactly as it was.
fn refused(root: &Path, args: &[&str], needle: &str) {
    let before = snapshot(root);
    let out = spm().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(err.contains(needle), "{args:?}: want {needle:?} in {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(snapshot(root), before, "{args:?} changed files");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn bake_never_writes_over_around_or_into_its_base() {
    let (d, m) = models();
    let base = m.join("sd1");
    let lora = m.join("Lora/spm.safetensors");
    let root = d.path();
    // -o the parent folder of --base (the reported data loss).
    refused(
        root,
        &["bake", "--base", s(&base), s(&lora), "-o", s(&m), "--force"],
        "lies inside it",
    );
    // -o a folder inside the base pipeline.
    refused(
        root,
        &[
            "bake",
            "--base",
            s(&base),
            s(&lora),
            "-o",
            s(&base.join("unet")),
            "--force",
        ],
        "lies inside the input",
    );
    // -o a new folder inside the base pipeline.
    refused(
        root,
        &[
            "bake",
            "--base",
            s(&base),
            s(&lora),
            "-o",
            s(&base.join("new")),
            "--force",
        ],
        "lies inside the input",
    );
    // -o the base itself, spelt with `..`.
    let dotted = m.join("Lora/../sd1");
    refused(
        root,
        &[
            "bake",
            "--base",
            s(&base),
            s(&lora),
            "-o",
            s(&dotted),
            "--force",
        ],
        "is also an input",
    );
    // -o the folder holding the LoRA input (single-file base, file output).
    refused(
        root,
        &[
            "bake",
            "--base",
            s(&m.join("sd1.safetensors")),
            s(&lora),
            "-o",
            s(&m.join("Lora")),
            "--force",
        ],
        "lies inside it",
    );
    // -o the single-file base itself.
    let single = m.join("sd1.safetensors");
    refused(
        root,
        &[
            "bake",
            "--base",
            s(&single),
            s(&lora),
            "-o",
            s(&single),
            "--force",
        ],
        "is also an input",
    );
}

#[test]
fn links_to_inputs_are_inputs() {
    let (d, m) = models();
    let single = m.join("sd1.safetensors");
    let lora = m.join("Lora/spm.safetensors");
    // A hard link to the base is the base.
    let hard = d.path().join("hard.safetensors");
    std::fs::hard_link(&single, &hard).unwrap();
    refused(
        d.path(),
        &[
            "bake",
            "--base",
            s(&single),
            s(&lora),
            "-o",
            s(&hard),
            "--force",
        ],
        "is also an input",
    );
    // A hard link to a LoRA input, as convert's output.
    let hard_lora = d.path().join("hard_lora.safetensors");
    std::fs::hard_link(&lora, &hard_lora).unwrap();
    refused(
        d.path(),
        &[
            "convert",
            s(&lora),
            "--to",
            "peft",
            "-o",
            s(&hard_lora),
            "--force",
        ],
        "is also an input",
    );
    #[cfg(unix)]
    {
        // A symlink to the models folder as a folder output.
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&m, &link).unwrap();
        refused(
            d.path(),
            &[
                "bake",
                "--base",
                s(&m.join("sd1")),
                s(&lora),
                "-o",
                s(&link),
                "--force",
            ],
            "lies inside it",
        );
        // A file output under a symlink that points into the base pipeline.
        let into = d.path().join("into");
        std::os::unix::fs::symlink(m.join("sd1"), &into).unwrap();
        refused(
            d.path(),
            &[
                "bake",
                "--base",
                s(&m.join("sd1")),
                s(&lora),
                "-o",
                s(&into.join("x")),
                "--force",
            ],
            "lies inside the input",
        );
    }
}

#[test]
fn force_replaces_only_what_spm_writes() {
    let (d, m) = models();
    let base = m.join("sd1");
    let lora = m.join("Lora/spm.safetensors");
    let out = d.path().join("baked");
    let bake = |extra: &[&str]| {
        let mut args = vec!["bake", "--base", s(&base), s(&lora), "-o", s(&out)];
        args.extend_from_slice(extra);
        spm().args(&args).output().unwrap()
    };
    assert!(bake(&[]).status.success());
    let first = snapshot(&out);
    // Without --force an existing output is refused.
    refused(
        d.path(),
        &["bake", "--base", s(&base), s(&lora), "-o", s(&out)],
        "--force",
    );
    // With --force a previous bake is swapped for a new one.
    let r = bake(&["--force"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(snapshot(&out), first);
    // A folder holding anything spm would not write is never replaced.
    std::fs::write(out.join("my_render.png"), "precious").unwrap();
    refused(
        d.path(),
        &[
            "bake",
            "--base",
            s(&base),
            s(&lora),
            "-o",
            s(&out),
            "--force",
        ],
        "my_render.png",
    );
    // No temp folders are left behind, and nothing else beside the output.
    let names: Vec<String> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with(".spm-")), "{names:?}");
    // A single-file output never replaces a folder, nor a folder a file.
    let folder = d.path().join("a_folder");
    std::fs::create_dir(&folder).unwrap();
    refused(
        d.path(),
        &[
            "convert",
            s(&lora),
            "--to",
            "peft",
            "-o",
            s(&folder),
            "--force",
        ],
        "is a folder",
    );
    let file = d.path().join("a_file");
    std::fs::write(&file, "x").unwrap();
    refused(
        d.path(),
        &[
            "bake",
            "--base",
            s(&base),
            s(&lora),
            "-o",
            s(&file),
            "--force",
        ],
        "is a file",
    );
}

/// Outputs get `0666`/`0777` less the umask, like any file a program
/// creates: a WebUI running as another user can read them.
#[cfg(unix)]
#[test]
fn outputs_have_ordinary_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let (d, m) = models();
    let lora = m.join("Lora/spm.safetensors");
    let bin = env!("CARGO_BIN_EXE_spm");
    for (umask, file_mode, dir_mode) in [("022", 0o644, 0o755), ("002", 0o664, 0o775)] {
        let out = d.path().join(format!("u{umask}"));
        let cmd = format!(
            "umask {umask} && '{bin}' convert '{}' --to kohya -o '{}/x.safetensors' && '{bin}' bake --base '{}' '{}' -o '{}/baked' && '{bin}' bake --base '{}' '{}' -o '{}/baked.safetensors'",
            s(&lora),
            s(&out),
            s(&m.join("sd1")),
            s(&lora),
            s(&out),
            s(&m.join("sd1.safetensors")),
            s(&lora),
            s(&out)
        );
        let r = std::process::Command::new("sh")
            .args(["-c", &cmd])
            .output()
            .unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode(&out.join("x.safetensors")),
            file_mode,
            "convert, umask {umask}"
        );
        assert_eq!(
            mode(&out.join("baked.safetensors")),
            file_mode,
            "bake file, umask {umask}"
        );
        assert_eq!(
            mode(&out.join("baked")),
            dir_mode,
            "bake folder, umask {umask}"
        );
        for f in snapshot(&out.join("baked")).keys() {
            assert_eq!(
                mode(&out.join("baked").join(f)),
                file_mode,
                "{}",
                f.display()
            );
        }
    }
}
