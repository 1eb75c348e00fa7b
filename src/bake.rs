//! `spm bake`: merge adapters into a full checkpoint, streaming.
//!
//! The checkpoint is never loaded whole: its header is parsed, tensors that
//! no adapter touches are copied range by range with `std::io::copy` (which
//! Linux turns into `copy_file_range`, an in-kernel copy), and each touched
//! weight is read alone, updated in f32 as W + Σ w·(α/r)·U·D, and written back
//! in the checkpoint's own dtype. Peak memory is one weight tensor.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};

use crate::adapter::{Adapter, Module};
use crate::error::{Error, Result};
use crate::io::output::{check_folder_replace, AtomicDir, AtomicFile};
use crate::io::positioned::{read_at, write_at};
use crate::io::safetensors::{encode_header, read_header, Header, TensorInfo};

use crate::schemes::{Arch, Component, ModuleSpec};

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
    adapter: &'a Adapter,
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
/// With `strict`, an adapter module that finds no weight is an error and
/// nothing is written.
pub fn bake(
    base: &Path,
    inputs: &[Input],
    out: &Path,
    progress: bool,
    strict: bool,
) -> Result<BakeReport> {
    for i in inputs {
        i.adapter.ensure_plain("baked")?;
    }
    // Architectures first: SD1 and SD2 share every UNet name, and tiny or
    // pruned models can share shapes too, so a mismatch would otherwise
    // bake "successfully" into the wrong network.
    if let Some((arch, why)) = base_arch(base)? {
        for i in inputs {
            if i.adapter.arch != arch {
                return Err(Error::usage(format!(
                    "{} is an {} adapter ({}) but the base {} is an {} checkpoint ({}); bake needs both of one architecture (--arch overrides the adapter's detection)",
                    i.adapter.path.display(),
                    i.adapter.arch.name(),
                    i.adapter.arch_reason,
                    base.display(),
                    arch.name(),
                    why
                )));
            }
        }
    }
    // Per input, per module: whether it found its weight in some file.
    let mut hit: Vec<Vec<bool>> = inputs
        .iter()
        .map(|i| vec![false; i.adapter.modules.len()])
        .collect();
    if base.is_dir() {
        bake_diffusers(base, inputs, out, progress, strict, &mut hit)
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
        report.files = 1;
        finish(base, inputs, &hit, &mut report, strict)?;
        file.commit()?;
        Ok(report)
    }
}

fn finish(
    base: &Path,
    inputs: &[Input],
    hit: &[Vec<bool>],
    report: &mut BakeReport,
    strict: bool,
) -> Result<()> {
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
    if strict && !report.unmatched.is_empty() {
        let shown: Vec<&str> = report
            .unmatched
            .iter()
            .take(10)
            .map(String::as_str)
            .collect();
        return Err(Error::file(
            base,
            format!(
                "--strict: {} adapter module(s) found no weight here: {}{}",
                report.unmatched.len(),
                shown.join(", "),
                if report.unmatched.len() > 10 {
                    ", …"
                } else {
                    ""
                }
            ),
        ));
    }
    Ok(())
}

fn bake_diffusers(
    base: &Path,
    inputs: &[Input],
    out: &Path,
    progress: bool,
    strict: bool,
    hit: &mut [Vec<bool>],
) -> Result<BakeReport> {
    let mut report = BakeReport {
        output: out.to_path_buf(),
        layout: "diffusers folder".into(),
        ..Default::default()
    };
    let mut files = Vec::new();
    walk(base, &mut files).map_err(|e| Error::io(base, e))?;
    let ours = files
        .iter()
        .map(|f| {
            f.strip_prefix(base)
                .expect("walked under base")
                .to_path_buf()
        })
        .collect();
    // Refuse before any work when --force would have to drop foreign files.
    check_folder_replace(out, &ours)?;
    let dir = AtomicDir::create(out)?;
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
                bake_file(&src, &mut f, inputs, Some(c), hit, &mut report, progress)?;
                report.files += 1;
            }
            _ => {
                // Not fs::copy: that would carry the source's permission bits
                // over; the output gets those of a fresh file (umask).
                let mut from = File::open(&src).map_err(|e| Error::io(&src, e))?;
                let mut to = File::create(&dst).map_err(|e| Error::io(&dst, e))?;
                std::io::copy(&mut from, &mut to).map_err(|e| Error::io(&dst, e))?;
            }
        }
    }
    finish(base, inputs, hit, &mut report, strict)?;
    dir.commit()?;
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
                    adapter: input.adapter,
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
    // The output layout is known up front (same tensors, same order), so
    // the two kinds of work run side by side on disjoint byte ranges: this
    // thread copies runs of untouched tensors in the kernel (seek + io::copy,
    // i.e. copy_file_range), a worker reads, updates and writes the touched
    // weights with positioned I/O (pread/pwrite never move the shared offset).
    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
    let mut jobs: Vec<(&TensorInfo, &Vec<Delta>, u64)> = Vec::new();
    let mut out_off = head.len() as u64;
    for t in &header.tensors {
        let len = t.end - t.start;
        match plan.get(&t.name) {
            None => match runs.last_mut() {
                Some((s, e, o)) if *e == t.start && *o + (*e - *s) == out_off => *e = t.end,
                _ => runs.push((t.start, t.end, out_off)),
            },
            Some(deltas) => jobs.push((t, deltas, out_off)),
        }
        out_off += len;
    }
    report.tensors += header.tensors.len();
    report.tensors_modified += jobs.len();
    preallocate(dst, out_off);
    let writer = dst.try_clone().map_err(|e| Error::io(src, e))?;
    std::thread::scope(|s| -> Result<()> {
        let worker = s.spawn(|| -> Result<()> {
            let mut scratch = Vec::new();
            for (t, deltas, off) in &jobs {
                apply(src, &input, t, deltas, &mut scratch)?;
                write_at(&writer, &scratch, *off).map_err(|e| Error::io(src, e))?;
                bar.inc(t.end - t.start);
            }
            Ok(())
        });
        let copied = (|| -> Result<()> {
            for (start, end, off) in &runs {
                copy_range(&input, dst, *start, *end - *start, *off)
                    .map_err(|e| Error::io(src, e))?;
                bar.inc(end - start);
            }
            Ok(())
        })();
        let worked = worker.join().expect("bake worker panicked");
        copied.and(worked)
    })?;
    report.bytes_written += head.len() as u64 + total;
    bar.finish_and_clear();
    Ok(())
}

/// A delta ready to apply: rows of the weight it touches, `down` as f32 and
/// `up` pre-multiplied by weight·α/r.
struct Prepared {
    row0: usize,
    rows: usize,
    rank: usize,
    down: Vec<f32>,
    up: Vec<f32>,
}

/// Rows per parallel work item: large enough to amortise scheduling, small
/// enough that the f32 scratch of both threads stays in cache-friendly sizes.
const ROW_BLOCK: usize = 32;

/// Read one weight, add every delta, re-encode in the weight's dtype. Works
/// in place on the weight's bytes, block of rows by block of rows (in
/// parallel threads), so memory is the tensor's own size plus small scratch.
fn apply(
    src: &Path,
    input: &File,
    t: &TensorInfo,
    deltas: &[Delta],
    buf: &mut Vec<u8>,
) -> Result<()> {
    let elem = match t.dtype {
        crate::io::tensor::Dtype::F16 | crate::io::tensor::Dtype::BF16 => 2,
        crate::io::tensor::Dtype::F32 => 4,
        _ => {
            return Err(Error::key(
                src,
                &t.name,
                "bake supports F16, BF16 and F32 weights",
            ))
        }
    };
    let numel: usize = t.shape.iter().product();
    let out_dim = t.shape.first().copied().unwrap_or(1).max(1);
    let per_row = numel / out_dim;
    let mut prepared = Vec::with_capacity(deltas.len());
    for d in deltas {
        let m = d.module;
        let (down, up) = (m.down.as_ref().expect("lora"), m.up.as_ref().expect("lora"));
        let r = down.shape[0].max(1);
        let d_in = down.numel() / r;
        let u_out = up.numel() / r;
        let (row0, rows) = match d.rows {
            Some(k) => (k * u_out, u_out),
            None => (0, out_dim),
        };
        if d_in != per_row || u_out != rows || row0 + rows > out_dim {
            return Err(Error::usage(format!(
                "{} module {}: factors down {:?} / up {:?} do not fit {} tensor {} of shape {:?}",
                d.adapter.path.display(),
                d.adapter.inventory().flat_name(m.index, false),
                down.shape,
                up.shape,
                src.display(),
                t.name,
                t.shape
            )));
        }
        let scale = (d.weight as f64 * m.scale().unwrap_or(1.0)) as f32;
        prepared.push(Prepared {
            row0,
            rows,
            rank: r,
            down: down.to_f32().expect("float factor"),
            up: up
                .to_f32()
                .expect("float factor")
                .into_iter()
                .map(|u| u * scale)
                .collect(),
        });
    }
    // One buffer reused across tensors: fresh allocations of tens of MB
    // each cost page faults that showed up as system time. (Reading through
    // a memory map instead was measured slower: 122k page faults.)
    buf.resize((t.end - t.start) as usize, 0);
    read_at(input, buf, t.start).map_err(|e| Error::io(src, e))?;
    if per_row == 0 {
        return Ok(());
    }
    let dtype = t.dtype;
    let row_bytes = per_row * elem;
    let f16_max = half::f16::MAX.to_f32();
    let bad: std::sync::Mutex<Option<(u64, f32)>> = std::sync::Mutex::new(None);
    let work = |first_row: usize, bytes: &mut [u8]| {
        for (b, block) in bytes.chunks_mut(row_bytes * ROW_BLOCK).enumerate() {
            let first = first_row + b * ROW_BLOCK;
            let mut vals = decode(dtype, block);
            let nrows = vals.len() / per_row;
            for p in &prepared {
                let lo = first.max(p.row0);
                let hi = (first + nrows).min(p.row0 + p.rows);
                for o in lo..hi {
                    let row = &mut vals[(o - first) * per_row..(o - first + 1) * per_row];
                    for k in 0..p.rank {
                        let c = p.up[(o - p.row0) * p.rank + k];
                        if c != 0.0 {
                            for (x, dk) in
                                row.iter_mut().zip(&p.down[k * per_row..(k + 1) * per_row])
                            {
                                *x += c * dk;
                            }
                        }
                    }
                }
            }
            // A delta that overflows the weight's dtype (or a base weight
            // that already is NaN/inf) would write a poisoned checkpoint.
            let limit = match dtype {
                crate::io::tensor::Dtype::F16 => f16_max,
                _ => f32::MAX,
            };
            if let Some(k) = vals.iter().position(|v| v.is_nan() || v.abs() > limit) {
                bad.lock()
                    .expect("bad lock")
                    .get_or_insert(((first + k / per_row) as u64, vals[k]));
            }
            encode(dtype, &vals, block);
        }
    };
    // Split the rows between scoped threads. (A rayon pool was tried: its
    // idle workers spin in sched_yield between tensors and steal the core
    // that the main thread needs for the kernel copies.)
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(out_dim.div_ceil(ROW_BLOCK));
    let rows_per = out_dim.div_ceil(threads.max(1));
    std::thread::scope(|s| {
        for (i, part) in buf.chunks_mut(rows_per * row_bytes).enumerate() {
            let work = &work;
            s.spawn(move || work(i * rows_per, part));
        }
    });
    if let Some((row, v)) = bad.into_inner().expect("bad lock") {
        let names: Vec<String> = deltas
            .iter()
            .map(|d| d.adapter.path.display().to_string())
            .collect();
        return Err(Error::key(
            src,
            &t.name,
            format!(
                "baking {} gives {v:e} in row {row}, which {:?} cannot hold (NaN/inf in the base, or a delta too large for its dtype); nothing was written",
                names.join(", "),
                t.dtype
            ),
        ));
    }
    Ok(())
}

/// Decode little-endian weights to f32. f16/bf16 go through `half`'s slice
/// conversions, which use the CPU's F16C/SIMD instructions where present
/// (per-element conversion was the bake's bottleneck).
fn decode(dtype: crate::io::tensor::Dtype, bytes: &[u8]) -> Vec<f32> {
    use crate::io::tensor::Dtype;
    let mut out = vec![0f32; bytes.len() / if dtype == Dtype::F32 { 4 } else { 2 }];
    match dtype {
        Dtype::F16 => decode_half(bytes, &mut out, half::f16::from_le_bytes),
        Dtype::BF16 => decode_half(bytes, &mut out, half::bf16::from_le_bytes),
        _ => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }
    out
}

/// Encode f32 back into the weight's dtype, in place (round to nearest even).
fn encode(dtype: crate::io::tensor::Dtype, vals: &[f32], bytes: &mut [u8]) {
    use crate::io::tensor::Dtype;
    match dtype {
        Dtype::F16 => {
            encode_half::<half::f16>(vals, bytes, |v| half::f16::from_f32(v).to_le_bytes())
        }
        Dtype::BF16 => {
            encode_half::<half::bf16>(vals, bytes, |v| half::bf16::from_f32(v).to_le_bytes())
        }
        _ => {
            for (c, v) in bytes.chunks_exact_mut(4).zip(vals) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

// The bytes are reinterpreted in place where alignment allows; safetensors
// is little-endian, as is every platform spm builds for.
#[cfg(not(target_endian = "little"))]
compile_error!("bake reinterprets little-endian weight bytes in place");

fn decode_half<T>(bytes: &[u8], out: &mut [f32], from_le: fn([u8; 2]) -> T)
where
    T: bytemuck::Pod,
    [T]: half::slice::HalfFloatSliceExt,
{
    use half::slice::HalfFloatSliceExt;
    match bytemuck::try_cast_slice::<u8, T>(bytes) {
        Ok(h) => h.convert_to_f32_slice(out),
        Err(_) => {
            let h: Vec<T> = bytes
                .chunks_exact(2)
                .map(|c| from_le([c[0], c[1]]))
                .collect();
            h.convert_to_f32_slice(out)
        }
    }
}

fn encode_half<T>(vals: &[f32], bytes: &mut [u8], to_le: fn(f32) -> [u8; 2])
where
    T: bytemuck::Pod,
    [T]: half::slice::HalfFloatSliceExt,
{
    use half::slice::HalfFloatSliceExt;
    match bytemuck::try_cast_slice_mut::<u8, T>(bytes) {
        Ok(h) => h.convert_from_f32_slice(vals),
        Err(_) => {
            for (c, v) in bytes.chunks_exact_mut(2).zip(vals) {
                c.copy_from_slice(&to_le(*v));
            }
        }
    }
}

/// Reserve the output's full size up front so that the two writers fill
/// allocated extents instead of growing a sparse file from both ends.
/// Best effort: filesystems without fallocate just skip it.
#[cfg(target_os = "linux")]
fn preallocate(file: &File, len: u64) {
    use std::os::unix::io::AsRawFd;
    // SAFETY: plain syscall on a valid, open file descriptor.
    let _ = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
}

/// Elsewhere the length is set (Windows allocates the clusters of a file
/// extended this way; macOS and the BSDs keep it sparse, which is correct).
#[cfg(not(target_os = "linux"))]
fn preallocate(file: &File, len: u64) {
    let _ = file.set_len(len);
}

/// Copy `len` bytes at `from_off` of `from` to `to_off` of `to`. On Linux
/// through the kernel (seek, then `io::copy`, which becomes
/// `copy_file_range`); elsewhere in 4 MiB positioned chunks, which is what
/// `io::copy` would do there anyway, without touching a shared cursor.
#[cfg(target_os = "linux")]
fn copy_range(
    from: &File,
    to: &mut File,
    from_off: u64,
    len: u64,
    to_off: u64,
) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut src = from;
    src.seek(SeekFrom::Start(from_off))?;
    to.seek(SeekFrom::Start(to_off))?;
    let n = std::io::copy(&mut src.take(len), to)?;
    if n != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "file shrank while being read",
        ));
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn copy_range(
    from: &File,
    to: &mut File,
    from_off: u64,
    len: u64,
    to_off: u64,
) -> std::io::Result<()> {
    copy_range_positioned(from, to, from_off, len, to_off)
}

#[cfg_attr(target_os = "linux", allow(dead_code))]
fn copy_range_positioned(
    from: &File,
    to: &File,
    from_off: u64,
    len: u64,
    to_off: u64,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; (4 << 20).min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = buf.len().min((len - done) as usize);
        read_at(from, &mut buf[..n], from_off + done)?;
        write_at(to, &buf[..n], to_off + done)?;
        done += n as u64;
    }
    Ok(())
}

/// The architecture of a base checkpoint, with the reason, from what every
/// checkpoint of that family carries: text-encoder key prefixes or SDXL's
/// `label_emb` (single files), the UNet config (diffusers folders), and the
/// projection layout (1×1 conv in SD1, linear in SD2/SDXL) as a last resort.
/// `None` when nothing tells.
pub fn base_arch(base: &Path) -> Result<Option<(Arch, String)>> {
    if base.is_dir() {
        let cfg_path = base.join("unet").join("config.json");
        let Ok(text) = std::fs::read_to_string(&cfg_path) else {
            return Ok(None);
        };
        let cfg: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(&cfg_path, format!("bad JSON: {e}")))?;
        if cfg.get("addition_embed_type").and_then(|v| v.as_str()) == Some("text_time") {
            return Ok(Some((
                Arch::Sdxl,
                "unet/config.json addition_embed_type text_time".into(),
            )));
        }
        return Ok(
            match cfg.get("cross_attention_dim").and_then(|v| v.as_u64()) {
                Some(768) => Some((Arch::Sd1, "unet/config.json cross_attention_dim 768".into())),
                Some(1024) => Some((
                    Arch::Sd2,
                    "unet/config.json cross_attention_dim 1024".into(),
                )),
                _ => match cfg.get("use_linear_projection").and_then(|v| v.as_bool()) {
                    Some(true) => Some((
                        Arch::Sd2,
                        "unet/config.json use_linear_projection true".into(),
                    )),
                    Some(false) => Some((
                        Arch::Sd1,
                        "unet/config.json use_linear_projection false".into(),
                    )),
                    None => None,
                },
            },
        );
    }
    if base.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        return Ok(None);
    }
    let header = read_header(base)?;
    let has = |prefix: &str| header.tensors.iter().any(|t| t.name.starts_with(prefix));
    if has("conditioner.embedders.") || has("model.diffusion_model.label_emb.") {
        return Ok(Some((
            Arch::Sdxl,
            "SDXL conditioner / label_emb keys".into(),
        )));
    }
    if has("cond_stage_model.model.") {
        return Ok(Some((Arch::Sd2, "OpenCLIP text-encoder keys".into())));
    }
    if has("cond_stage_model.transformer.") {
        return Ok(Some((Arch::Sd1, "CLIP ViT-L text-encoder keys".into())));
    }
    let proj = header
        .tensors
        .iter()
        .find(|t| t.name == "model.diffusion_model.input_blocks.1.1.proj_in.weight");
    Ok(proj.map(|t| match t.shape.len() {
        4 => (Arch::Sd1, "proj_in is a 1×1 conv".to_string()),
        _ => (Arch::Sd2, "proj_in is linear".to_string()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::tensor::Dtype;

    /// f16/bf16 → f32 → f16/bf16 is exact for every finite value, through
    /// both the in-place (aligned) and the copying (unaligned) paths, and
    /// agrees with `half`'s scalar conversion.
    #[test]
    fn half_codecs_round_trip_aligned_and_unaligned() {
        for dtype in [Dtype::F16, Dtype::BF16] {
            let mut raw: Vec<u8> = Vec::new();
            for bits in (0u16..=u16::MAX).step_by(7) {
                let finite = match dtype {
                    Dtype::F16 => half::f16::from_bits(bits).is_finite(),
                    _ => half::bf16::from_bits(bits).is_finite(),
                };
                if finite {
                    raw.extend_from_slice(&bits.to_le_bytes());
                }
            }
            let mut shifted = vec![0u8; raw.len() + 1];
            shifted[1..].copy_from_slice(&raw);
            for bytes in [&raw[..], &shifted[1..]] {
                let vals = decode(dtype, bytes);
                for (v, c) in vals.iter().zip(bytes.chunks_exact(2)) {
                    let want = match dtype {
                        Dtype::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
                        _ => half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
                    };
                    assert_eq!(v.to_bits(), want.to_bits());
                }
                let mut back = vec![0u8; bytes.len() + 1];
                encode(dtype, &vals, &mut back[1..]);
                assert_eq!(&back[1..], bytes, "{dtype:?} unaligned");
                let mut aligned = vec![0u8; bytes.len()];
                encode(dtype, &vals, &mut aligned);
                assert_eq!(aligned, bytes, "{dtype:?} aligned");
            }
        }
    }
}
