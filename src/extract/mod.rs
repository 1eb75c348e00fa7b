//! `spm extract`: a LoRA from the difference of two checkpoints, by SVD.
//!
//! ESD and Forget-Me-Not save whole (or partial) UNets; a WebUI cannot
//! stack or gate those. The difference ΔW = W_tuned − W_base of each target
//! layer is factored by a truncated SVD into `up = U_r·S_r`, `down = V_rᵀ`,
//! alpha = r (kohya's `extract_lora_from_models.py`, trainer-methods.md
//! §4), with kohya's dynamic-rank rules as options ([`rank`]). With the
//! concept in `prompts`, the result is gateable by Facilitated Transport.
//!
//! Two passes, one tensor pair in memory at a time (see [`crate::io::lazy`]):
//! 1. every tensor *outside* the targets is compared with the base. Methods
//!    leave some of those untouched, so a full tuned file none of whose
//!    tensors equals the base's was not trained from that base (the classic
//!    case: SD1.4's EMA vs non-EMA weights, §1.7) and extraction stops
//!    before spending its rank on that drift. Differing non-target tensors
//!    (biases, norms, `conv_in`) are what a LoRA cannot carry: reported.
//! 2. each target's ΔW is decomposed (faer's thin SVD) and reported: rank
//!    kept, and the fractions of ‖ΔW‖_F kept and left over, computed from
//!    the factors actually written.

pub mod rank;
pub mod source;

use std::collections::BTreeMap;

use faer::Mat;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::Serialize;

use crate::adapter::Module;
use crate::convert::{py_float, render, ConvertOptions, Curve, Rendered};
use crate::error::{Error, Result};
use crate::io::lazy::LazyTensor;
use crate::io::tensor::{Dtype, RawTensor};
use crate::schemes::{inventory, Arch, Class, Component, Kind, Scheme};
pub use rank::Rule;
use source::{Checkpoint, Layout};

/// Which layers get a LoRA module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Modules {
    /// The Linear/Conv layers inside transformer blocks: kohya's LoRA set and
    /// SPM's (192 on SD1/SD2).
    Transformer,
    /// Cross-attention q/k/v/out only (64): all ESD-x trains.
    Attn2,
    /// Transformer layers plus ResNet convs, time projections and samplers:
    /// kohya LoCon (278).
    All,
}

impl Modules {
    fn selects(self, class: Class, path: &str) -> bool {
        match self {
            Modules::Transformer => class == Class::Transformer,
            Modules::Attn2 => class == Class::Transformer && path.contains(".attn2."),
            Modules::All => matches!(class, Class::Transformer | Class::Conv),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ExtractOptions {
    pub rank: usize,
    pub rule: Rule,
    pub modules: Modules,
    /// kohya's signed-quantile clamp (its default is 0.99; off here).
    pub clamp_quantile: Option<f64>,
    /// Written to `prompts`, so the sidecar can gate the result.
    pub concept: Option<String>,
    pub to: Scheme,
    /// Skip modules whose max |ΔW| is at most this (0: exact zeros only).
    pub min_diff: f32,
    pub force_base: bool,
    pub dtype: Dtype,
    pub arch: Option<Arch>,
    /// Output file stem (metadata titles).
    pub title: String,
    pub progress: bool,
}

/// One extracted module, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct ModuleReport {
    pub path: String,
    pub kind: &'static str,
    pub rank: usize,
    pub max_rank: usize,
    /// ‖ΔW‖_F.
    pub delta_fro: f64,
    /// ‖up·down‖_F / ‖ΔW‖_F.
    pub kept: f64,
    /// ‖ΔW − up·down‖_F / ‖ΔW‖_F.
    pub residual: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Dropped {
    pub key: String,
    pub delta_fro: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BaseCheck {
    /// Non-target tensors present in both.
    pub compared: usize,
    pub equal: usize,
    /// `ok`, `partial-file` (the tuned file holds only trained tensors:
    /// nothing to compare), or `forced` (a mismatch overridden).
    pub verdict: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct RuleReport {
    pub kind: &'static str,
    pub param: Option<f64>,
    pub rank: usize,
    pub clamp_quantile: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub base: String,
    pub base_layout: Layout,
    pub tuned: String,
    pub tuned_layout: Layout,
    pub arch: &'static str,
    pub arch_reason: String,
    pub scheme: &'static str,
    pub rule: RuleReport,
    pub selected: usize,
    pub extracted: usize,
    pub skipped_zero: usize,
    /// Targets the tuned file does not hold (a partial state dict).
    pub absent: usize,
    pub modules: Vec<ModuleReport>,
    pub skipped: Vec<String>,
    pub dropped: Vec<Dropped>,
    /// ‖·‖_F of everything dropped together.
    pub dropped_fro: f64,
    /// Tuned tensors the base does not have (other model, or extra keys).
    pub unmatched: Vec<String>,
    pub base_check: BaseCheck,
    /// The worst module's residual (0 when nothing was extracted).
    pub max_residual: f64,
}

/// Extract `tuned − base` as a LoRA: the rendered file and the report.
pub fn extract(
    base_path: &std::path::Path,
    tuned_path: &std::path::Path,
    opts: &ExtractOptions,
) -> Result<(Rendered, Report)> {
    let base = Checkpoint::open(base_path)?;
    let tuned = Checkpoint::open(tuned_path)?;
    let (arch, arch_reason) = match opts.arch {
        Some(a) => (a, "--arch".to_string()),
        None => base.arch()?,
    };
    let inv = inventory(arch);
    let targets: Vec<usize> = inv
        .modules
        .iter()
        .enumerate()
        .filter(|(_, m)| m.component == Component::Unet && opts.modules.selects(m.class, &m.path))
        .map(|(i, _)| i)
        .collect();
    let target_weights: std::collections::HashSet<String> = targets
        .iter()
        .map(|&i| format!("{}.weight", inv.modules[i].path))
        .collect();

    // Pass 1: the base check over everything that is not a target weight.
    let mut unmatched = Vec::new();
    let mut dropped = Vec::new();
    let (mut compared, mut equal) = (0usize, 0usize);
    let mut first_diff: Option<(String, f32)> = None;
    let others: Vec<&(String, LazyTensor)> = tuned
        .tensors
        .iter()
        .filter(|(n, _)| !target_weights.contains(n))
        .collect();
    let bar = bar(opts.progress, (others.len() + targets.len()) as u64);
    bar.set_message("comparing with the base");
    for (name, t) in &others {
        bar.inc(1);
        let Some(b) = base.get(name) else {
            unmatched.push(name.clone());
            continue;
        };
        check_shapes(name, t, b)?;
        let (tv, bv) = (t.read()?, b.read()?);
        compared += 1;
        if same_at_coarser(&tv, &bv) {
            equal += 1;
            continue;
        }
        let (tf, bf) = (finite(t, &tv)?, finite(b, &bv)?);
        let (fro, max) = diff_norms(&tf, &bf);
        if first_diff.is_none() {
            first_diff = Some((name.clone(), max));
        }
        dropped.push(Dropped {
            key: name.clone(),
            delta_fro: fro,
        });
    }
    // "Full" = the tuned file holds every tensor of the base, so it also
    // holds what its method left alone.
    let full = base.tensors.iter().all(|(n, _)| tuned.get(n).is_some());
    let verdict = if !full {
        "partial-file"
    } else if compared > 0 && equal == 0 {
        let (key, max) = first_diff.clone().unwrap_or_default();
        if !opts.force_base {
            bar.finish_and_clear();
            return Err(Error::file(
                base_path,
                format!(
                    "base mismatch: none of the {compared} tensors of {} outside the extracted layers equals this base's (first differing: `{key}`, max |Δ| = {max:.3e}). \
                     Erasing methods leave such tensors untouched, so {} was trained from another model — e.g. SD1.4's EMA instead of its non-EMA weights — \
                     and every layer's ΔW would be that drift. Pass the model it was trained from, or --force-base if it is a full fine-tune of this one.",
                    tuned_path.display(),
                    tuned_path.display()
                ),
            ));
        }
        "forced"
    } else {
        "ok"
    };
    if !unmatched.is_empty() && unmatched.len() * 2 > tuned.len() {
        bar.finish_and_clear();
        return Err(Error::file(
            tuned_path,
            format!(
                "{} of its {} UNet tensors are not in the base {} (first: `{}`): not the same architecture",
                unmatched.len(),
                tuned.len(),
                base_path.display(),
                unmatched[0]
            ),
        ));
    }

    // Pass 2: decompose each target. faer's SVD gains little from a second
    // thread (its bidiagonalisation is mostly sequential: 10240×1280 takes
    // 1.55 s on one core, 1.73 s on two, measured), so the layers are
    // spread over the cores instead, one sequential SVD each; memory is
    // then one tensor pair per core.
    bar.set_message("decomposing");
    release_freed_memory();
    let previous = faer::get_global_parallelism();
    faer::set_global_parallelism(faer::Par::Seq);
    let outcomes: Result<Vec<Outcome>> = targets
        .par_iter()
        .with_max_len(1)
        .map(|&i| {
            let o = decompose(&base, &tuned, inv, i, opts);
            bar.inc(1);
            o
        })
        .collect();
    faer::set_global_parallelism(previous);
    let mut modules = Vec::new();
    let mut reports = Vec::new();
    let mut skipped = Vec::new();
    let mut absent = 0usize;
    for o in outcomes? {
        match o {
            Outcome::Absent => absent += 1,
            Outcome::Skipped(p) => skipped.push(p),
            Outcome::Done(r, m) => {
                reports.push(*r);
                modules.push(*m);
            }
        }
    }
    bar.finish_and_clear();
    if modules.is_empty() {
        return Err(Error::file(
            tuned_path,
            format!(
                "nothing to extract: of the {} target layers (--modules {}), {} are identical to the base and {} are not in this file",
                targets.len(),
                clap::ValueEnum::to_possible_value(&opts.modules)
                    .map(|v| v.get_name().to_string())
                    .unwrap_or_default(),
                skipped.len(),
                absent
            ),
        ));
    }

    let metadata = metadata(opts, &modules, base_path, tuned_path, inv, arch);
    let rendered = render(
        arch,
        &modules,
        &metadata,
        &[],
        &ConvertOptions {
            to: opts.to,
            dtype: None,
            strength: None,
            curve: Curve::Linear,
            allow_lossy: false,
            allow_unknown: false,
            title: opts.title.clone(),
            peft_fold_alpha: false,
        },
    )?;
    // A fold from +0.0: an empty f64 `sum()` is −0.0.
    let dropped_fro = dropped
        .iter()
        .fold(0.0, |acc, d| acc + d.delta_fro * d.delta_fro)
        .sqrt();
    let max_residual = reports.iter().map(|r| r.residual).fold(0.0, f64::max);
    let report = Report {
        base: base_path.display().to_string(),
        base_layout: base.layout,
        tuned: tuned_path.display().to_string(),
        tuned_layout: tuned.layout,
        arch: arch.name(),
        arch_reason,
        scheme: opts.to.name(),
        rule: RuleReport {
            kind: opts.rule.name(),
            param: opts.rule.param(),
            rank: opts.rank,
            clamp_quantile: opts.clamp_quantile,
        },
        selected: targets.len(),
        extracted: reports.len(),
        skipped_zero: skipped.len(),
        absent,
        modules: reports,
        skipped,
        dropped,
        dropped_fro,
        unmatched,
        base_check: BaseCheck {
            compared,
            equal,
            verdict,
        },
        max_residual,
    };
    Ok((rendered, report))
}

/// glibc keeps freed blocks under its (self-raising, up to 32 MiB) mmap
/// threshold in per-thread arenas, so the layer-sized buffers of two
/// workers pile up as resident memory that is never reused in full. A fixed
/// 1 MiB threshold maps every tensor-sized buffer on its own and returns it
/// to the system when freed. Other allocators return large blocks already.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; M_MMAP_THRESHOLD
    // takes a byte count.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// What became of one target layer.
enum Outcome {
    Absent,
    Skipped(String),
    Done(Box<ModuleReport>, Box<Module>),
}

/// ΔW of inventory module `i`, decomposed.
fn decompose(
    base: &Checkpoint,
    tuned: &Checkpoint,
    inv: &crate::schemes::Inventory,
    i: usize,
    opts: &ExtractOptions,
) -> Result<Outcome> {
    let spec = &inv.modules[i];
    let key = format!("{}.weight", spec.path);
    let Some(t) = tuned.get(&key) else {
        return Ok(Outcome::Absent);
    };
    let b = base.get(&key).ok_or_else(|| {
        Error::key(
            &base.path,
            &key,
            "missing here but present in the tuned file: not the same architecture",
        )
    })?;
    check_shapes(&key, t, b)?;
    if !(2..=4).contains(&t.shape.len()) || t.shape.len() == 3 {
        return Err(Error::key(
            &tuned.path,
            &key,
            format!("shape {:?} is not a Linear or Conv2d weight", t.shape),
        ));
    }
    let (tv, bv) = (t.read()?, b.read()?);
    if same_at_coarser(&tv, &bv) {
        return Ok(Outcome::Skipped(spec.path.clone()));
    }
    let (tf, bf) = (finite(t, &tv)?, finite(b, &bv)?);
    drop((tv, bv));
    let mut delta = tf;
    for (d, b) in delta.iter_mut().zip(&bf) {
        *d -= b;
    }
    drop(bf);
    let max = delta.iter().fold(0f32, |m, v| m.max(v.abs()));
    if max <= opts.min_diff {
        return Ok(Outcome::Skipped(spec.path.clone()));
    }
    let out = t.shape[0];
    let cols = delta.len() / out;
    let f = factor(&delta, out, cols, opts).map_err(|m| Error::key(&tuned.path, &key, m))?;
    let kind = match (t.shape.len(), t.shape.get(2).copied()) {
        (4, Some(k)) if k > 1 => "conv3x3",
        (4, _) => "conv1x1",
        _ => "linear",
    };
    let (down_shape, up_shape) = if t.shape.len() == 4 {
        (
            vec![f.rank, t.shape[1], t.shape[2], t.shape[3]],
            vec![out, f.rank, 1, 1],
        )
    } else {
        (vec![f.rank, cols], vec![out, f.rank])
    };
    let report = ModuleReport {
        path: spec.path.clone(),
        kind,
        rank: f.rank,
        max_rank: out.min(cols),
        delta_fro: f.delta_fro,
        kept: f.kept,
        residual: f.residual,
    };
    let module = Module {
        index: i,
        down: Some(RawTensor::from_f32(opts.dtype, down_shape, &f.down)),
        up: Some(RawTensor::from_f32(opts.dtype, up_shape, &f.up)),
        alpha: Some(RawTensor::scalar(opts.dtype, f.rank as f64)),
        other: BTreeMap::new(),
    };
    Ok(Outcome::Done(Box::new(report), Box::new(module)))
}

fn bar(show: bool, len: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} tensors {elapsed}/{eta}")
            .expect("template")
            .progress_chars("=> "),
    );
    b
}

fn check_shapes(name: &str, t: &LazyTensor, b: &LazyTensor) -> Result<()> {
    if t.shape != b.shape {
        return Err(Error::key(
            &t.path,
            name,
            format!(
                "shape {:?}, but the base {} has {:?}",
                t.shape,
                b.path.display(),
                b.shape
            ),
        ));
    }
    Ok(())
}

fn finite(t: &LazyTensor, raw: &RawTensor) -> Result<Vec<f32>> {
    let vals = raw.to_f32().ok_or_else(|| {
        Error::key(
            &t.path,
            &t.key,
            format!("{:?} is not a floating-point tensor", t.dtype),
        )
    })?;
    if let Some(i) = vals.iter().position(|v| !v.is_finite()) {
        return Err(Error::key(
            &t.path,
            &t.key,
            format!("value {} at index {i} is not finite", vals[i]),
        ));
    }
    Ok(vals)
}

/// ‖a − b‖_F and max |a − b|.
fn diff_norms(a: &[f32], b: &[f32]) -> (f64, f32) {
    let mut sq = 0f64;
    let mut max = 0f32;
    for (x, y) in a.iter().zip(b) {
        let d = x - y;
        sq += (d as f64) * (d as f64);
        max = max.max(d.abs());
    }
    (sq.sqrt(), max)
}

/// Equal after rounding both to the coarser dtype: an fp16 base and the
/// fp32 layers a method did not touch are the same weights.
fn same_at_coarser(a: &RawTensor, b: &RawTensor) -> bool {
    if a.dtype == b.dtype {
        return a.bytes() == b.bytes();
    }
    let (Some(x), Some(y)) = (a.to_f32(), b.to_f32()) else {
        return false;
    };
    let half = |d: Dtype| matches!(d, Dtype::F16 | Dtype::BF16);
    let round = |v: f32| -> f32 {
        let mut v = v;
        if a.dtype == Dtype::F16 || b.dtype == Dtype::F16 {
            v = half::f16::from_f32(v).to_f32();
        }
        if a.dtype == Dtype::BF16 || b.dtype == Dtype::BF16 {
            v = half::bf16::from_f32(v).to_f32();
        }
        v
    };
    if !half(a.dtype) && !half(b.dtype) {
        // f32 vs f64: compare at f32.
        return x == y;
    }
    x.iter().zip(&y).all(|(p, q)| round(*p) == round(*q))
}

struct Factors {
    rank: usize,
    /// [rows, rank] row-major.
    up: Vec<f32>,
    /// [rank, cols] row-major.
    down: Vec<f32>,
    delta_fro: f64,
    kept: f64,
    residual: f64,
}

/// Truncated SVD of the row-major `rows × cols` matrix `delta`.
fn factor(
    delta: &[f32],
    rows: usize,
    cols: usize,
    opts: &ExtractOptions,
) -> std::result::Result<Factors, String> {
    // In f64: faer's f32 SVD reconstructs a rank-3 ΔW only to ~2e-5
    // (relative), f64 to torch's float64 result within f32 rounding.
    let a = Mat::<f64>::from_fn(rows, cols, |i, j| delta[i * cols + j] as f64);
    let svd = a
        .thin_svd()
        .map_err(|e| format!("the SVD did not converge ({e:?})"))?;
    let s: Vec<f64> = svd.S().column_vector().iter().copied().collect();
    let r = opts.rule.rank(&s, opts.rank);
    let (u, v) = (svd.U(), svd.V());
    let mut up = vec![0f32; rows * r];
    for i in 0..rows {
        for k in 0..r {
            up[i * r + k] = (u[(i, k)] * s[k]) as f32;
        }
    }
    let mut down = vec![0f32; r * cols];
    for k in 0..r {
        for j in 0..cols {
            down[k * cols + j] = v[(j, k)] as f32;
        }
    }
    drop(svd);
    drop(a);
    let total: f64 = delta.iter().map(|&d| (d as f64) * (d as f64)).sum();
    let fro = total.sqrt();
    let (kept, resid) = match opts.clamp_quantile {
        // Unclamped, up·down is the rank-r truncation, whose error is the
        // spectrum's tail exactly (Eckart–Young); summing the tail (not
        // subtracting the head from the total) keeps a tiny residual accurate.
        None => {
            let sq = |v: &[f64]| v.iter().map(|&x| x * x).sum::<f64>();
            (sq(&s[..r]).sqrt(), sq(&s[r..]).sqrt())
        }
        // Clamped factors are no longer a truncation: measure them, a block
        // of rows at a time so the rebuilt matrix never exists whole.
        Some(q) => {
            rank::clamp(&mut up, &mut down, q);
            let downm = Mat::<f32>::from_fn(r, cols, |k, j| down[k * cols + j]);
            let (mut kept, mut resid) = (0f64, 0f64);
            for start in (0..rows).step_by(256) {
                let n = 256.min(rows - start);
                let upm = Mat::<f32>::from_fn(n, r, |i, k| up[(start + i) * r + k]);
                let recon = &upm * &downm;
                for i in 0..n {
                    for j in 0..cols {
                        let d = delta[(start + i) * cols + j] as f64;
                        let p = recon[(i, j)] as f64;
                        kept += p * p;
                        resid += (d - p) * (d - p);
                    }
                }
            }
            (kept.sqrt(), resid.sqrt())
        }
    };
    Ok(Factors {
        rank: r,
        up,
        down,
        delta_fro: fro,
        kept: if fro > 0.0 { kept / fro } else { 0.0 },
        residual: if fro > 0.0 { resid / fro } else { 0.0 },
    })
}

/// kohya's extractor metadata (trainer-methods.md §4.1 step 6, §6.5), the
/// concept for Facilitated Transport, and where the file came from.
fn metadata(
    opts: &ExtractOptions,
    modules: &[Module],
    base: &std::path::Path,
    tuned: &std::path::Path,
    inv: &crate::schemes::Inventory,
    arch: Arch,
) -> BTreeMap<String, String> {
    let mut md: BTreeMap<String, String> = BTreeMap::new();
    let conv3 = modules
        .iter()
        .find(|m| inv.modules[m.index].kind == Kind::Conv3x3)
        .and_then(Module::rank);
    let dynamic = opts.rule.is_dynamic();
    let (dim, alpha) = if dynamic {
        ("Dynamic".to_string(), "Dynamic".to_string())
    } else {
        (opts.rank.to_string(), py_float(opts.rank as f64))
    };
    md.insert("ss_network_module".into(), "networks.lora".into());
    md.insert("ss_network_dim".into(), dim.clone());
    md.insert("ss_network_alpha".into(), alpha.clone());
    md.insert(
        "ss_network_args".into(),
        if conv3.is_some() {
            serde_json::json!({"conv_dim": dim, "conv_alpha": alpha}).to_string()
        } else {
            "{}".into()
        },
    );
    md.insert(
        "ss_training_comment".into(),
        format!(
            "spm extract: {} minus {} ({}, {} rule{})",
            file_name(tuned),
            file_name(base),
            arch.name(),
            opts.rule.name(),
            opts.rule
                .param()
                .map(|p| format!(" {p}"))
                .unwrap_or_default()
        ),
    );
    md.insert("prompts".into(), opts.concept.clone().unwrap_or_default());
    if opts.to == Scheme::Spm {
        if !dynamic {
            md.insert("rank".into(), opts.rank.to_string());
            md.insert("alpha".into(), py_float(opts.rank as f64));
        }
        md.retain(|k, _| !k.starts_with("ss_"));
    }
    md
}

fn file_name(p: &std::path::Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| p.display().to_string())
}
