//! `spm bake`: merge adapters into a full checkpoint, streaming.
//!
//! The checkpoint is never loaded whole: its header is parsed, tensors that
//! no adapter touches are copied range by range with `std::io::copy` (which
//! Linux turns into `copy_file_range`, an in-kernel copy), and each touched
//! weight is read alone, updated in f32 as W + Σ w·(α/r)·U·D, and written back
//! in the checkpoint's own dtype. Peak memory is one weight tensor.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};

use crate::adapter::{Adapter, Module};
use crate::error::{Error, Result};
use crate::io::output::{AtomicDir, AtomicFile};
use crate::io::safetensors::{encode_header, read_header, Header, TensorInfo};
use crate::io::tensor::{is_float, RawTensor};
use crate::schemes::{Component, ModuleSpec};

/// An adapter with its bake weight (ΔW multiplier, linear).
pub struct Input<'a> {
    pub adapter: &'a Adapter,
    pub weight: f32,
}

/// What a bake did, for the report.
#[derive(Debug, Default, serde::Serialize)]
pub struct BakeReport {
    pub output: PathBuf,
    pub layout: String,
    pub files: usize,
    pub tensors: usize,
    pub tensors_modified: usize,
    pub modules_applied: usize,
    pub bytes_written: u64,
    /// Adapter modules that found no weight in the checkpoint: `file: name`.
    pub unmatched: Vec<String>,
}

/// One contribution to a checkpoint tensor.
struct Delta<'a> {
    module: &'a Module,
    weight: f32,
    /// For OpenCLIP's fused `in_proj`: which block of rows (q, k or v).
    rows: Option<usize>,
}

/// Candidate checkpoint keys for a module, most likely first.
fn candidates(spec: &ModuleSpec, te_prefix: &str, ldm: bool) -> Vec<(String, Option<usize>)> {
    let short = spec.path.trim_start_matches("text_model.");
    match (spec.component, ldm) {
        (Component::Unet, true) => {
            vec![(
                format!(
                    "model.diffusion_model.{}.weight",
                    spec.sai.as_deref().unwrap_or(&spec.path)
                ),
                None,
            )]
        }
        (Component::Unet, false) => vec![(format!("{}.weight", spec.path), None)],
        (_, true) => {
            let mut v = vec![
                (format!("{te_prefix}{}.weight", spec.path), None),
                (format!("{te_prefix}{short}.weight",), None),
            ];
            if let Some((base, rows)) = &spec.openclip {
                let key = match rows {
                    Some(_) => format!("{te_prefix}{base}_weight"),
                    None => format!("{te_prefix}{base}.weight"),
                };
                v.insert(0, (key, *rows));
            }
            v
        }
        (_, false) => vec![
            (format!("{}.weight", spec.path), None),
            (format!("{short}.weight"), None),
        ],
    }
}

/// Bake into `out`; `base` is a single-file `.safetensors` checkpoint or a
/// diffusers folder (`unet/`, `text_encoder/`, `text_encoder_2/`).
pub fn bake(base: &Path, inputs: &[Input], out: &Path, progress: bool) -> Result<BakeReport> {
    if base.is_dir() {
        bake_diffusers(base, inputs, out, progress)
    } else {
        let ext = base.extension().and_then(|e| e.to_str()).unwrap_or("");
        if ext != "safetensors" {
            return Err(Error::file(
                base,
                "bake reads .safetensors checkpoints or diffusers folders only (pickled .ckpt is never unpickled into a bake)",
            ));
        }
        let mut report = BakeReport {
            output: out.to_path_buf(),
            layout: "ldm single file".into(),
            ..Default::default()
        };
        let mut hit = vec![Vec::new(); inputs.len()];
        let mut file = AtomicFile::create(out)?;
        bake_file(
            base,
            file.file(),
            inputs,
            None,
            &mut hit,
            &mut report,
            progress,
        )?;
        file.commit()?;
        report.files = 1;
        finish(inputs, &hit, &mut report);
        Ok(report)
    }
}

fn finish(inputs: &[Input], hit: &[Vec<bool>], report: &mut BakeReport) {
    for (input, hits) in inputs.iter().zip(hit) {
        let inv = input.adapter.inventory();
        for (m, h) in input.adapter.modules.iter().zip(hits) {
            if *h {
                report.modules_applied += 1;
            } else {
                report.unmatched.push(format!(
                    "{}: {}",
                    input.adapter.path.display(),
                    inv.flat_name(m.index, false)
                ));
            }
        }
    }
}

fn bake_diffusers(base: &Path, inputs: &[Input], out: &Path, progress: bool) -> Result<BakeReport> {
    let mut report = BakeReport {
        output: out.to_path_buf(),
        layout: "diffusers folder".into(),
        ..Default::default()
    };
    let mut hit: Vec<Vec<bool>> = inputs
        .iter()
        .map(|i| vec![false; i.adapter.modules.len()])
        .collect();
    let dir = AtomicDir::create(out)?;
    let mut files = Vec::new();
    walk(base, &mut files).map_err(|e| Error::io(base, e))?;
    for src in files {
        let rel = src.strip_prefix(base).expect("walked under base");
        let dst = dir.path().join(rel);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let top = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .unwrap_or("");
        let component = match top {
            "unet" => Some(Component::Unet),
            "text_encoder" => Some(Component::TextEncoder),
            "text_encoder_2" => Some(Component::TextEncoder2),
            _ => None,
        };
        let is_weights = src.extension().and_then(|e| e.to_str()) == Some("safetensors");
        match component {
            Some(c) if is_weights => {
                let mut f = File::create(&dst).map_err(|e| Error::io(&dst, e))?;
                bake_file(
                    &src,
                    &mut f,
                    inputs,
                    Some(c),
                    &mut hit,
                    &mut report,
                    progress,
                )?;
                report.files += 1;
            }
            _ => {
                std::fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
            }
        }
    }
    dir.commit()?;
    finish(inputs, &hit, &mut report);
    Ok(report)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

/// Bake one safetensors file. `component` is `None` for a single-file LDM
/// checkpoint (all components, LDM names) or the diffusers sub-model.
fn bake_file(
    src: &Path,
    dst: &mut File,
    inputs: &[Input],
    component: Option<Component>,
    hit: &mut [Vec<bool>],
    report: &mut BakeReport,
    progress: bool,
) -> Result<()> {
    let header = read_header(src)?;
    if hit.iter().all(|h| h.is_empty()) {
        for (h, i) in hit.iter_mut().zip(inputs) {
            *h = vec![false; i.adapter.modules.len()];
        }
    }
    let names: HashMap<&str, &TensorInfo> = header
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let mut plan: HashMap<String, Vec<Delta>> = HashMap::new();
    for (n, input) in inputs.iter().enumerate() {
        let inv = input.adapter.inventory();
        for (k, m) in input.adapter.modules.iter().enumerate() {
            let spec = &inv.modules[m.index];
            if component.is_some_and(|c| c != spec.component) {
                continue;
            }
            let te_prefix = match spec.component {
                Component::Unet => "",
                c => &inv.te_spec(c).ldm_prefix,
            };
            let found = candidates(spec, te_prefix, component.is_none())
                .into_iter()
                .find(|(key, _)| names.contains_key(key.as_str()));
            if let Some((key, rows)) = found {
                plan.entry(key).or_default().push(Delta {
                    module: m,
                    weight: input.weight,
                    rows,
                });
                hit[n][k] = true;
            }
        }
    }

    let mut metadata = header.metadata.clone();
    let baked: Vec<String> = inputs
        .iter()
        .map(|i| {
            format!(
                "{}:{}",
                i.adapter
                    .path
                    .file_name()
                    .map(|s| s.to_string_lossy().to_string())
                    .unwrap_or_default(),
                i.weight
            )
        })
        .collect();
    metadata.insert("spm.baked".into(), baked.join(","));
    write_streamed(src, dst, &header, &metadata, &plan, report, progress)
}

fn write_streamed(
    src: &Path,
    dst: &mut File,
    header: &Header,
    metadata: &BTreeMap<String, String>,
    plan: &HashMap<String, Vec<Delta>>,
    report: &mut BakeReport,
    progress: bool,
) -> Result<()> {
    let table: Vec<_> = header
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.dtype, t.shape.clone(), t.end - t.start))
        .collect();
    let head = encode_header(metadata, &table);
    dst.write_all(&head).map_err(|e| Error::io(src, e))?;
    let input = File::open(src).map_err(|e| Error::io(src, e))?;
    let total: u64 = table.iter().map(|t| t.3).sum();
    let bar = if progress {
        let b = ProgressBar::new(total);
        b.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
                .expect("template")
                .progress_chars("=> "),
        );
        b.set_message(
            src.file_name()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default(),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    // Copy runs of untouched tensors in one kernel call each.
    let mut run: Option<(u64, u64)> = None;
    let flush = |run: &mut Option<(u64, u64)>, dst: &mut File| -> Result<()> {
        if let Some((s, e)) = run.take() {
            let mut from = &input;
            from.seek(SeekFrom::Start(s))
                .map_err(|e| Error::io(src, e))?;
            let n = std::io::copy(&mut std::io::Read::take(from, e - s), dst)
                .map_err(|e| Error::io(src, e))?;
            if n != e - s {
                return Err(Error::file(src, "file shrank while being read"));
            }
        }
        Ok(())
    };
    for t in &header.tensors {
        match plan.get(&t.name) {
            None => {
                run = match run {
                    Some((s, e)) if e == t.start => Some((s, t.end)),
                    other => {
                        let mut r = other;
                        flush(&mut r, dst)?;
                        Some((t.start, t.end))
                    }
                };
            }
            Some(deltas) => {
                flush(&mut run, dst)?;
                let bytes = apply(src, &input, t, deltas)?;
                dst.write_all(&bytes).map_err(|e| Error::io(src, e))?;
                report.tensors_modified += 1;
            }
        }
        report.tensors += 1;
        bar.inc(t.end - t.start);
    }
    flush(&mut run, dst)?;
    dst.flush().map_err(|e| Error::io(src, e))?;
    report.bytes_written += head.len() as u64 + total;
    bar.finish_and_clear();
    Ok(())
}

/// Read one weight, add every delta, re-encode in the weight's dtype.
fn apply(src: &Path, input: &File, t: &TensorInfo, deltas: &[Delta]) -> Result<Vec<u8>> {
    if !is_float(t.dtype) {
        return Err(Error::key(
            src,
            &t.name,
            "target weight is not a float tensor",
        ));
    }
    let mut buf = vec![0u8; (t.end - t.start) as usize];
    input
        .read_exact_at(&mut buf, t.start)
        .map_err(|e| Error::io(src, e))?;
    let w = RawTensor::from_bytes(t.dtype, t.shape.clone(), buf);
    let mut values = w.to_f32().expect("float");
    let out_dim = t.shape.first().copied().unwrap_or(1);
    let per_row = values.len().checked_div(out_dim).unwrap_or(0);
    for d in deltas {
        let m = d.module;
        let (down, up) = (m.down.as_ref().expect("lora"), m.up.as_ref().expect("lora"));
        let r = down.shape[0];
        let d_in: usize = down.numel() / r.max(1);
        let u_out = up.numel() / r.max(1);
        let (row0, rows) = match d.rows {
            Some(k) => (k * u_out, u_out),
            None => (0, out_dim),
        };
        if d_in != per_row || u_out != rows || row0 + rows > out_dim {
            return Err(Error::key(
                src,
                &t.name,
                format!(
                    "adapter factors down {:?} / up {:?} do not fit weight {:?}",
                    down.shape, up.shape, t.shape
                ),
            ));
        }
        let scale = (d.weight as f64 * m.scale().unwrap_or(1.0)) as f32;
        let dv = down.to_f32().expect("float factor");
        let uv = up.to_f32().expect("float factor");
        for o in 0..rows {
            let row = &mut values[(row0 + o) * per_row..(row0 + o + 1) * per_row];
            for k in 0..r {
                let c = uv[o * r + k] * scale;
                if c == 0.0 {
                    continue;
                }
                for (x, dk) in row.iter_mut().zip(&dv[k * d_in..(k + 1) * d_in]) {
                    *x += c * dk;
                }
            }
        }
    }
    Ok(RawTensor::from_f32(t.dtype, t.shape.clone(), &values)
        .bytes()
        .to_vec())
}
