//! `spm generate`: Stable Diffusion with membranes, as SPM's `infer_spm.py`
//! runs it — the way a user *sees* what a membrane erases and what it
//! leaves alone.
//!
//! The loop is diffusers' `StableDiffusionPipeline` (classifier-free
//! guidance with the uncond rows first, `init_noise_sigma`,
//! `scale_model_input`, the scheduler's `step`, VAE decode at
//! `1/scaling_factor`, `(x/2+0.5).clamp(0,1)`, `round(255x)`), with
//! Facilitated Transport from the same engine as `spm gate`: each prompt's
//! gates are computed once, held constant over the steps and applied in
//! both CFG branches. Each prompt starts from `--seed`, as `infer_spm.py`
//! reseeds per prompt, with torch's CPU generator (so a diffusers run with
//! `torch.Generator().manual_seed(seed)` starts from the same latent).
//!
//! A prompt's variants (`--grid`: no membrane | FT | full strength) run in
//! one UNet batch whose rows carry different strengths; each variant keeps
//! its own scheduler and generator, so the FT column equals a plain FT run.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::adapter::Adapter;
use crate::error::{Error, Result};
use crate::io::output::{check_output, AtomicFile, OutputKind};
use crate::model::nn::{Mix, Rows};
use crate::model::noise::TorchRng;
use crate::model::scheduler::{self, Sampler, Scheduler, SchedulerConfig};
use crate::model::sd::{adapter_set, LoadSpec, StableDiffusion};
use crate::model::unet::Cond;
use crate::transport::gate::{Engine, Gate, GateOptions, Membrane, Second};

/// Everything `spm generate` is asked.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub load: LoadSpec,
    pub prompts: Vec<String>,
    pub negative: String,
    pub steps: usize,
    pub cfg: f64,
    pub width: usize,
    pub height: usize,
    pub seed: u64,
    /// None: the model's own scheduler (PNDM for SD1.4, as the reference).
    pub sampler: Option<Sampler>,
    /// Images per prompt.
    pub batch: usize,
    pub membranes: Vec<PathBuf>,
    /// A fixed multiplier for every membrane instead of FT.
    pub strength: Option<f64>,
    pub gate: GateOptions,
    pub mix: Mix,
    pub grid: bool,
    pub clip_skip: usize,
    pub out: PathBuf,
    pub force: bool,
}

/// How a column of the output sets its membranes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// Membranes off: the base model.
    None,
    /// Facilitated Transport: each membrane at its gate for the prompt.
    Ft,
    /// Every membrane at this multiplier.
    Fixed(f64),
}

impl Variant {
    fn label(self) -> String {
        match self {
            Variant::None => "none".into(),
            Variant::Ft => "ft".into(),
            Variant::Fixed(m) => format!("{m}"),
        }
    }
}

/// One written image, for `--json` and the log.
#[derive(Debug, Clone, Serialize)]
pub struct ImageRecord {
    pub file: PathBuf,
    pub prompt: String,
    pub seed: u64,
    /// Columns of the grid, left to right (one entry without `--grid`).
    pub variants: Vec<Variant>,
    /// Per membrane: its FT gate for this prompt (when FT was computed).
    pub gates: Vec<(String, Gate)>,
    /// Per membrane: the value its layers got, per column.
    pub applied: Vec<(String, Vec<f64>)>,
}

/// The `--json` summary.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub model: crate::model::sd::ModelInfo,
    pub sampler: String,
    pub steps: usize,
    pub cfg: f64,
    pub size: [usize; 2],
    pub mix: Mix,
    pub images: Vec<ImageRecord>,
    pub seconds: f64,
}

/// Progress of the denoising loop, for the CLI's bar.
pub trait Progress {
    fn start(&self, total_steps: u64);
    fn step(&self, prompt: &str);
    fn finish(&self);
}

/// Check the request before anything is loaded (one clear error each).
pub fn check(opts: &GenerateOptions) -> Result<()> {
    if opts.prompts.is_empty() {
        return Err(Error::usage("give at least one prompt"));
    }
    if opts.width == 0
        || opts.height == 0
        || !opts.width.is_multiple_of(8)
        || !opts.height.is_multiple_of(8)
    {
        return Err(Error::usage(format!(
            "--size {}x{}: width and height must be positive multiples of 8 (the VAE works in 8×8 cells)",
            opts.width, opts.height
        )));
    }
    if opts.width * opts.height > 4096 * 4096 {
        return Err(Error::usage("--size: at most 4096×4096 pixels"));
    }
    if opts.steps == 0 || opts.steps > 1000 {
        return Err(Error::usage("--steps must be between 1 and 1000"));
    }
    if !opts.cfg.is_finite() || opts.cfg < 0.0 {
        return Err(Error::usage("--cfg must be a finite number ≥ 0"));
    }
    if opts.batch == 0 || opts.batch > 64 {
        return Err(Error::usage("--batch must be between 1 and 64"));
    }
    if let Some(m) = opts.strength {
        if !m.is_finite() {
            return Err(Error::usage("--strength must be a finite number"));
        }
    }
    if opts.grid && opts.membranes.is_empty() {
        return Err(Error::usage(
            "--grid compares no membrane | FT | full strength: give at least one --membrane",
        ));
    }
    if opts.clip_skip == 0 {
        return Err(Error::usage(
            "--clip-skip counts from 1 (1 = the last layer, as A1111)",
        ));
    }
    Ok(())
}

/// The columns the options ask for.
fn variants(opts: &GenerateOptions) -> Vec<Variant> {
    let main = match (opts.membranes.is_empty(), opts.strength) {
        (true, _) => Variant::None,
        (false, Some(m)) => Variant::Fixed(m),
        (false, None) => Variant::Ft,
    };
    if opts.grid {
        vec![Variant::None, main, Variant::Fixed(1.0)]
    } else {
        vec![main]
    }
}

/// A short, portable file-name part from a prompt.
fn slug(prompt: &str) -> String {
    let mut s: String = prompt
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    while s.contains("--") {
        s = s.replace("--", "-");
    }
    let s = s.trim_matches('-');
    let s: String = s.chars().take(48).collect();
    if s.is_empty() {
        "prompt".into()
    } else {
        s.trim_end_matches('-').to_string()
    }
}

/// The output file names, decided (and checked) before any work.
fn plan_files(opts: &GenerateOptions) -> Vec<Vec<PathBuf>> {
    opts.prompts
        .iter()
        .enumerate()
        .map(|(p, prompt)| {
            let base = format!("{p:03}-{}", slug(prompt));
            if opts.grid {
                vec![opts.out.join(format!("{base}-grid.png"))]
            } else if opts.batch == 1 {
                vec![opts.out.join(format!("{base}.png"))]
            } else {
                (0..opts.batch)
                    .map(|i| opts.out.join(format!("{base}-{i}.png")))
                    .collect()
            }
        })
        .collect()
}

fn candle(what: &str) -> impl Fn(candle_core::Error) -> Error + '_ {
    move |e| Error::usage(format!("{what}: {}", crate::model::nn::error_message(&e)))
}

/// A1111's `quote`: values with `,`, `:` or a newline become JSON strings.
fn quote(v: &str) -> String {
    if v.contains(',') || v.contains(':') || v.contains('\n') {
        serde_json::to_string(v).expect("string")
    } else {
        v.to_string()
    }
}

/// Generation parameters in A1111's infotext layout (what its PNG Info tab
/// reads): prompt line, `Negative prompt:` line, then `Key: value` pairs.
fn infotext(
    opts: &GenerateOptions,
    prompt: &str,
    sampler: &(String, Option<String>),
    model: &str,
    extra: &[(String, String)],
) -> String {
    let mut pairs: Vec<(String, String)> = vec![
        ("Steps".into(), opts.steps.to_string()),
        ("Sampler".into(), sampler.0.clone()),
    ];
    if let Some(s) = &sampler.1 {
        pairs.push(("Schedule type".into(), s.clone()));
    }
    pairs.extend([
        ("CFG scale".into(), format!("{}", opts.cfg)),
        ("Seed".into(), opts.seed.to_string()),
        ("Size".into(), format!("{}x{}", opts.width, opts.height)),
        ("Model".into(), model.to_string()),
        // torch's CPU generator draws the noise (A1111's "RNG: CPU" source).
        ("RNG".into(), "CPU".into()),
    ]);
    if opts.clip_skip != 1 {
        pairs.push(("Clip skip".into(), opts.clip_skip.to_string()));
    }
    pairs.extend(extra.iter().cloned());
    pairs.push((
        "Version".into(),
        format!("spm {}", env!("CARGO_PKG_VERSION")),
    ));
    let params = pairs
        .iter()
        .map(|(k, v)| format!("{k}: {}", quote(v)))
        .collect::<Vec<_>>()
        .join(", ");
    let mut text = prompt.to_string();
    if !opts.negative.is_empty() {
        text.push_str(&format!("\nNegative prompt: {}", opts.negative));
    }
    text.push('\n');
    text.push_str(&params);
    text
}

/// Write an RGB8 PNG with a `parameters` text chunk, atomically.
fn write_png(path: &Path, w: usize, h: usize, rgb: &[u8], parameters: &str) -> Result<()> {
    let mut out = AtomicFile::create(path)?;
    {
        let mut buf = out.buffered();
        let mut enc = png::Encoder::new(&mut buf, w as u32, h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        // A1111 writes `parameters` as a tEXt chunk when it is Latin-1
        // and as iTXt otherwise; PNG Info reads both.
        let latin1 = parameters.chars().all(|c| (c as u32) < 256);
        let r = if latin1 {
            enc.add_text_chunk("parameters".into(), parameters.into())
        } else {
            enc.add_itxt_chunk("parameters".into(), parameters.into())
        };
        r.map_err(|e| Error::file(path, format!("PNG text chunk: {e}")))?;
        let mut wr = enc
            .write_header()
            .map_err(|e| Error::file(path, format!("PNG header: {e}")))?;
        wr.write_image_data(rgb)
            .map_err(|e| Error::file(path, format!("PNG data: {e}")))?;
        wr.finish()
            .map_err(|e| Error::file(path, format!("PNG: {e}")))?;
        use std::io::Write;
        buf.flush().map_err(|e| Error::io(path, e))?;
    }
    out.commit()
}

/// Images `[N,3,H,W]` in [-1,1] → RGB8 rows, diffusers' postprocessing.
fn to_rgb8(img: &Tensor) -> Result<Vec<Vec<u8>>> {
    let img = ((img.to_dtype(DType::F32).map_err(candle("image"))? / 2.0)
        .and_then(|x| x + 0.5)
        .and_then(|x| x.clamp(0f32, 1f32))
        .and_then(|x| x.permute((0, 2, 3, 1)))
        .and_then(|x| x.to_device(&Device::Cpu)))
    .map_err(candle("image"))?;
    let n = img.dim(0).map_err(candle("image"))?;
    (0..n)
        .map(|i| {
            let v: Vec<f32> = img
                .get(i)
                .and_then(|x| x.flatten_all())
                .and_then(|x| x.to_vec1())
                .map_err(candle("image"))?;
            Ok(v.iter().map(|x| (x * 255.0).round() as u8).collect())
        })
        .collect()
}

/// One prompt's result: its gates, and per column the strengths applied,
/// the final latents and the decoded images `[N,3,H,W]` in [-1, 1].
pub struct Sampled {
    pub gates: Vec<(String, Gate)>,
    pub columns: Vec<Column>,
    pub images: Vec<Tensor>,
}

/// One column of a prompt's output.
pub struct Column {
    pub variant: Variant,
    /// Per membrane slot: the value its layers got (m under reference
    /// mixing, s under delta mixing).
    pub strengths: Vec<f32>,
    /// Final latents, `[N, C, H/8, W/8]` flattened (before 1/scaling_factor).
    pub latents: Vec<f32>,
}

/// One column while it is denoised: latents, scheduler, generator.
struct Job {
    strengths: Vec<f32>,
    latents: Vec<f32>,
    scheduler: Box<dyn Scheduler>,
    rng: TorchRng,
}

/// Denoise one prompt in every column the options ask for (one UNet batch
/// per step holds all columns, each row with its own strengths) and decode.
/// `engine` computes the FT gates (None without membranes).
pub fn sample_prompt(
    sd: &StableDiffusion,
    sched_cfg: &SchedulerConfig,
    opts: &GenerateOptions,
    engine: Option<&Engine>,
    prompt: &str,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<Sampled> {
    let columns = variants(opts);
    let needs_ft = columns.contains(&Variant::Ft);
    let slots = opts.membranes.len();
    let (lh, lw) = (opts.height / 8, opts.width / 8);
    let latent_c = sd.unet.config.in_channels;
    let per_image = latent_c * lh * lw;
    let n = opts.batch;
    let guided = opts.cfg > 1.0;
    let gates: Vec<(String, Gate)> = match (engine, needs_ft) {
        (Some(e), true) => e.gate(prompt, None, &opts.gate)?,
        _ => Vec::new(),
    };
    let value = |v: Variant, k: usize| -> f64 {
        match v {
            Variant::None => 0.0,
            Variant::Fixed(m) => m,
            Variant::Ft => {
                let g = &gates[k].1;
                match opts.mix {
                    Mix::Reference => g.rate,
                    Mix::Delta => g.strength,
                }
            }
        }
    };
    let size = (opts.height, opts.width);
    let cond = sd.conditions(&[prompt], opts.clip_skip, size)?;
    // SDXL zeroes an empty negative prompt (text and pooled), as diffusers'
    // `force_zeros_for_empty_prompt` and A1111 do.
    let neg = if !guided {
        None
    } else if sd.zeroes_negative(&opts.negative) {
        Some(cond.zeroed().map_err(candle("negative"))?)
    } else {
        Some(sd.conditions(&[opts.negative.as_str()], opts.clip_skip, size)?)
    };
    let mut jobs: Vec<Job> = Vec::new();
    for &v in &columns {
        let sch = scheduler::build(opts.sampler, sched_cfg, opts.steps)?;
        // Every column (and every prompt) starts from --seed, as
        // infer_spm.py reseeds per prompt.
        let mut rng = TorchRng::manual_seed(opts.seed);
        let sigma = sch.init_noise_sigma() as f32;
        let latents = rng
            .randn(n * per_image)
            .into_iter()
            .map(|x| x * sigma)
            .collect();
        jobs.push(Job {
            strengths: (0..slots).map(|k| value(v, k) as f32).collect(),
            latents,
            scheduler: sch,
            rng,
        });
    }
    // Rows: per column, [uncond × n, cond × n] (diffusers' order).
    let branches = if guided { 2 } else { 1 };
    let mut cond_rows: Vec<&Cond> = Vec::new();
    for _ in &jobs {
        if let Some(neg) = &neg {
            cond_rows.extend(std::iter::repeat_n(neg, n));
        }
        cond_rows.extend(std::iter::repeat_n(&cond, n));
    }
    let cond_all = Cond::cat(&cond_rows).map_err(candle("conditioning"))?;
    let slot_rows: Vec<Vec<f32>> = (0..slots)
        .map(|k| {
            jobs.iter()
                .flat_map(|j| std::iter::repeat_n(j.strengths[k], branches * n))
                .collect()
        })
        .collect();
    let rows = Rows::new(opts.mix, &slot_rows, &sd.device).map_err(candle("strengths"))?;
    let timesteps: Vec<f64> = jobs[0].scheduler.timesteps().to_vec();
    let total_rows = jobs.len() * branches * n;
    let block = n * per_image;
    for (i, &t) in timesteps.iter().enumerate() {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let mut input = Vec::with_capacity(total_rows * per_image);
        for j in &jobs {
            let x = j.scheduler.scale_model_input(&j.latents, i);
            for _ in 0..branches {
                input.extend_from_slice(&x);
            }
        }
        let x = Tensor::from_vec(input, (total_rows, latent_c, lh, lw), &Device::Cpu)
            .and_then(|x| x.to_dtype(sd.dtype))
            .and_then(|x| x.to_device(&sd.device))
            .map_err(candle("latents"))?;
        let tt = Tensor::from_vec(vec![t as f32; total_rows], total_rows, &sd.device)
            .map_err(candle("timestep"))?;
        let out = sd
            .unet
            .forward_cond(&x, &tt, &cond_all, &rows)
            .and_then(|o| o.to_dtype(DType::F32))
            .and_then(|o| o.flatten_all())
            .and_then(|o| o.to_vec1::<f32>())
            .map_err(candle("UNet"))?;
        for (ji, j) in jobs.iter_mut().enumerate() {
            let base = ji * branches * block;
            let pred: Vec<f32> = if guided {
                let (u, c) = (
                    &out[base..base + block],
                    &out[base + block..base + 2 * block],
                );
                let g = opts.cfg as f32;
                u.iter().zip(c).map(|(u, c)| u + g * (c - u)).collect()
            } else {
                out[base..base + block].to_vec()
            };
            j.latents = j.scheduler.step(&pred, i, &j.latents, &mut j.rng);
        }
        progress.step(prompt);
    }
    if cancel.load(Ordering::Relaxed) {
        return Err(Error::Cancelled);
    }
    let sf = sd.vae.config.scaling_factor as f32;
    let mut images = Vec::new();
    for j in &jobs {
        let z: Vec<f32> = j.latents.iter().map(|x| x / sf).collect();
        let z = Tensor::from_vec(z, (n, latent_c, lh, lw), &Device::Cpu)
            .and_then(|x| x.to_dtype(sd.dtype))
            .and_then(|x| x.to_device(&sd.device))
            .map_err(candle("latents"))?;
        images.push(sd.vae.decode(&z).map_err(candle("VAE"))?);
    }
    Ok(Sampled {
        gates,
        columns: jobs
            .into_iter()
            .zip(columns)
            .map(|(j, variant)| Column {
                variant,
                strengths: j.strengths,
                latents: j.latents,
            })
            .collect(),
        images,
    })
}

/// Load, generate every prompt, write the PNGs; stops between steps when
/// `cancel` is set (nothing half-written stays behind).
pub fn run(
    opts: &GenerateOptions,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<Summary> {
    check(opts)?;
    let started = std::time::Instant::now();
    let files = plan_files(opts);
    let mut inputs: Vec<&Path> = vec![opts.load.model.as_path()];
    inputs.extend(opts.membranes.iter().map(PathBuf::as_path));
    if let Some(c) = &opts.load.config {
        inputs.push(c);
    }
    for f in files.iter().flatten() {
        check_output(f, &inputs, OutputKind::File, opts.force)?;
    }
    // Only now, when no output can land in an input, may the folder appear.
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;

    let adapters: Vec<Adapter> = opts
        .membranes
        .iter()
        .map(|p| Adapter::load(p, None))
        .collect::<Result<_>>()?;
    let (set, te_modules) = adapter_set(&adapters, opts.load.dtype, &opts.load.device)?;
    if te_modules > 0 {
        tracing::warn!(
            "{te_modules} text-encoder module(s) in the membranes are not applied: spm generate adapts the UNet only (as SPM's membranes do)"
        );
    }
    let sd = StableDiffusion::load(&opts.load, Arc::new(set))?;
    tracing::info!(
        "loaded {} ({}, {}, prediction {} from {})",
        sd.info.path.display(),
        sd.info.layout,
        sd.info.arch.unwrap_or("custom size"),
        sd.info.prediction_type,
        sd.info.prediction_source
    );
    let sched_cfg: SchedulerConfig = sd.scheduler.clone();
    let sampler = match opts.sampler {
        Some(s) => s,
        None => Sampler::from_config(&sched_cfg)?,
    };
    let (a1111, schedule) = sampler.a1111_name();
    let sampler_name = (a1111.to_string(), schedule.map(String::from));

    // FT: the same engine as `spm gate`, over the model's own encoder.
    let needs_ft = variants(opts).contains(&Variant::Ft);
    let engine = if opts.membranes.is_empty() {
        None
    } else {
        let mut e = Engine::shared(sd.tokenizer.clone(), Some(sd.text.clone()), sd.pad_id);
        if let Some(xl) = &sd.xl {
            e = e.with_second(Second {
                encoder: xl.text.clone(),
                tokenizer: xl.tokenizer.clone(),
                pad_id: xl.pad_id,
            });
        }
        let ms: Vec<Membrane> = if needs_ft {
            adapters
                .iter()
                .map(Membrane::from_adapter)
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        e.set_membranes(ms)?;
        Some(e)
    };
    let names: Vec<String> = opts
        .membranes
        .iter()
        .map(|p| {
            p.file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default()
        })
        .collect();

    let columns = variants(opts);
    progress.start((opts.prompts.len() * opts.steps) as u64);
    let mut records = Vec::new();
    let n = opts.batch;
    for (pi, prompt) in opts.prompts.iter().enumerate() {
        let sampled = sample_prompt(
            &sd,
            &sched_cfg,
            opts,
            engine.as_ref(),
            prompt,
            progress,
            cancel,
        )?;
        let gates = sampled.gates.clone();
        let decoded: Vec<Vec<Vec<u8>>> =
            sampled.images.iter().map(to_rgb8).collect::<Result<_>>()?;
        let jobs = &sampled.columns;
        let mut extra: Vec<(String, String)> = Vec::new();
        if !names.is_empty() {
            if needs_ft {
                let g: Vec<String> = gates
                    .iter()
                    .map(|(nm, g)| format!("{nm}={:.2}", g.rate))
                    .collect();
                extra.push(("SPM gates".into(), g.join(", ")));
                extra.push(("SPM metric".into(), opts.gate.metric.name()));
            }
            if let Some(m) = opts.strength {
                extra.push(("SPM strength".into(), format!("{m}")));
            }
            extra.push(("SPM membranes".into(), names.join(", ")));
            extra.push((
                "SPM mix".into(),
                match opts.mix {
                    Mix::Reference => "reference".into(),
                    Mix::Delta => "delta".into(),
                },
            ));
            if opts.grid {
                extra.push((
                    "SPM grid".into(),
                    columns
                        .iter()
                        .map(|c| c.label())
                        .collect::<Vec<_>>()
                        .join(" | "),
                ));
            }
        }
        let applied: Vec<(String, Vec<f64>)> = names
            .iter()
            .enumerate()
            .map(|(k, nm)| {
                (
                    nm.clone(),
                    jobs.iter().map(|j| j.strengths[k] as f64).collect(),
                )
            })
            .collect();
        let model_name = sd.info.name.clone();
        if opts.grid {
            let gap = 8;
            let (w, h) = (opts.width, opts.height);
            let cols = jobs.len();
            let gw = cols * w + (cols - 1) * gap;
            let gh = n * h + (n - 1) * gap;
            let mut canvas = vec![255u8; gw * gh * 3];
            for (c, col) in decoded.iter().enumerate() {
                for (r, img) in col.iter().enumerate() {
                    for y in 0..h {
                        let dst = ((r * (h + gap) + y) * gw + c * (w + gap)) * 3;
                        canvas[dst..dst + w * 3].copy_from_slice(&img[y * w * 3..(y + 1) * w * 3]);
                    }
                }
            }
            let text = infotext(opts, prompt, &sampler_name, &model_name, &extra);
            let file = files[pi][0].clone();
            write_png(&file, gw, gh, &canvas, &text)?;
            records.push(ImageRecord {
                file,
                prompt: prompt.clone(),
                seed: opts.seed,
                variants: columns.clone(),
                gates: gates.clone(),
                applied: applied.clone(),
            });
        } else {
            for (i, img) in decoded[0].iter().enumerate() {
                let mut ex = extra.clone();
                if n > 1 {
                    ex.push(("Batch size".into(), n.to_string()));
                    ex.push(("Batch pos".into(), i.to_string()));
                }
                let text = infotext(opts, prompt, &sampler_name, &model_name, &ex);
                let file = files[pi][i].clone();
                write_png(&file, opts.width, opts.height, img, &text)?;
                records.push(ImageRecord {
                    file,
                    prompt: prompt.clone(),
                    seed: opts.seed,
                    variants: columns.clone(),
                    gates: gates.clone(),
                    applied: applied.clone(),
                });
            }
        }
    }
    progress.finish();
    Ok(Summary {
        model: sd.info.clone(),
        sampler: match &sampler_name.1 {
            Some(s) => format!("{} ({s})", sampler_name.0),
            None => sampler_name.0.clone(),
        },
        steps: opts.steps,
        cfg: opts.cfg,
        size: [opts.width, opts.height],
        mix: opts.mix,
        images: records,
        seconds: started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_short_portable_names() {
        assert_eq!(slug("A photo of a cat!"), "a-photo-of-a-cat");
        assert_eq!(slug("   "), "prompt");
        assert_eq!(slug("日本"), "prompt");
        assert!(slug(&"x".repeat(200)).len() <= 48);
    }

    /// A1111's `quote` (modules/infotext_utils.py): JSON-quote values that
    /// hold a comma, colon or newline, leave the rest bare.
    #[test]
    fn infotext_values_are_quoted_as_a1111_does() {
        assert_eq!(quote("0.53"), "0.53");
        assert_eq!(quote("a=0.53, b=0.10"), "\"a=0.53, b=0.10\"");
        assert_eq!(quote("x: y"), "\"x: y\"");
    }
}
