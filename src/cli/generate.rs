//! `spm generate`'s flags and the glue from them to [`spm::generate`].

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device};
use clap::ValueEnum;

use spm::error::{Error, Result};
use spm::generate::{self, GenerateOptions, Progress};
use spm::model::nn::Mix;
use spm::model::scheduler::Sampler;
use spm::model::sd::LoadSpec;

#[derive(Clone, Copy, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PrecisionArg {
    Fp32,
    Fp16,
    Bf16,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PredictionArg {
    Epsilon,
    VPrediction,
}

/// Generate images with membranes, as SPM's infer_spm.py does.
///
/// With --membrane and no --strength, every prompt gets Facilitated
/// Transport: each membrane's gate for that prompt (the same numbers as
/// `spm gate`), constant over the steps, in both CFG branches, applied as
/// SPM's code applies it (factors × m, so the delta × m², membranes mixed
/// factor-wise; `--mix delta` for LoRA-style Σ s·ΔW with s from --curve).
/// --strength m applies every membrane at m instead. --grid writes one
/// picture per prompt: no membrane | FT (or --strength) | full strength.
///
/// PNGs carry the parameters in A1111's infotext format (PNG Info reads
/// them), gates included. Each prompt starts from --seed with torch's CPU
/// generator, so a diffusers run with torch.Generator().manual_seed(seed)
/// starts from the same noise.
///
/// Examples:
///   spm generate --model sd15/ "a photo of a cat" -o out/
///   spm generate --model v1-5.safetensors --membrane snoopy.safetensors --grid \
///       "snoopy on a skateboard" "a dog on a skateboard" -o out/
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct GenerateArgs {
    /// Prompts, one image (or --batch images) each.
    #[arg(required = true)]
    prompts: Vec<String>,
    /// A diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    /// scheduler/) or an SD1/SD2 single-file checkpoint (.safetensors, or .ckpt read as data).
    #[arg(long)]
    model: PathBuf,
    /// Single files: a diffusers folder whose configs describe the checkpoint (default: the
    /// built-in SD1.5 / SD2.1 configs).
    #[arg(long)]
    config: Option<PathBuf>,
    /// A membrane (SPM or any LoRA spm reads); repeat for several.
    #[arg(long = "membrane")]
    membranes: Vec<PathBuf>,
    /// Facilitated Transport (the default when membranes are given; spelt out for scripts).
    #[arg(long, conflicts_with = "strength")]
    ft: bool,
    /// Apply every membrane at multiplier m instead of FT (reference mixing: delta × m²).
    #[arg(long, allow_hyphen_values = true, value_parser = crate::finite_f64)]
    strength: Option<f64>,
    #[command(flatten)]
    gate: crate::GateArgs,
    /// How membranes combine: reference (SPM's factor-wise sum) or delta (Σ s·ΔW).
    #[arg(long, value_enum, default_value = "reference")]
    mix: Mix,
    /// Negative prompt (the unconditional branch).
    #[arg(long, default_value = "")]
    negative: String,
    /// Denoising steps.
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Classifier-free guidance scale (≤ 1 turns guidance off).
    #[arg(long, default_value_t = 7.5, value_parser = crate::finite_f64)]
    cfg: f64,
    /// Image size WxH in pixels, multiples of 8.
    #[arg(long, default_value = "512x512", value_parser = parse_size)]
    size: (usize, usize),
    /// Seed of torch's CPU generator, per prompt.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sampler (default: the model's own scheduler, PNDM/PLMS for SD1).
    #[arg(long, value_enum)]
    sampler: Option<Sampler>,
    /// Images per prompt (one UNet batch).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// One picture per prompt: no membrane | FT | full strength side by side.
    #[arg(long)]
    grid: bool,
    /// A1111's clip skip: 1 = last layer, 2 = the one before, …
    #[arg(long, default_value_t = 1)]
    clip_skip: usize,
    /// Override the model's prediction type (SD2-768 checkpoints are v-prediction).
    #[arg(long, value_enum)]
    prediction_type: Option<PredictionArg>,
    /// Where the computation runs (cuda needs a build with --features cuda).
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Weights and activations (fp16 is for GPUs: slower than fp32 on CPUs).
    #[arg(long, value_enum, default_value = "fp32")]
    precision: PrecisionArg,
    /// Output folder (created if missing; never inside an input).
    #[arg(short, long)]
    output: PathBuf,
    /// Replace existing PNGs of the same names (never an input).
    #[arg(long)]
    force: bool,
    /// Print a JSON summary (for scripts).
    #[arg(long)]
    json: bool,
}

fn parse_size(s: &str) -> std::result::Result<(usize, usize), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("`{s}`: expected WxH, e.g. 512x512"))?;
    let p = |v: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|_| format!("`{s}`: expected WxH, e.g. 512x512"))
    };
    Ok((p(w)?, p(h)?))
}

/// indicatif's bar on a terminal, silence otherwise.
struct Bar(indicatif::ProgressBar);

impl Progress for Bar {
    fn start(&self, total: u64) {
        self.0.set_length(total);
    }
    fn step(&self, prompt: &str) {
        self.0
            .set_message(prompt.chars().take(40).collect::<String>());
        self.0.inc(1);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

pub(crate) fn device(d: DeviceArg) -> Result<Device> {
    match d {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda => Device::new_cuda(0).map_err(|e| {
            Error::usage(format!(
                "--device cuda: {e} (a CUDA build needs `cargo build --release --features cuda`)"
            ))
        }),
    }
}

/// Ctrl-C sets the flag; the loop stops at the next step.
pub(crate) fn cancel_on_ctrl_c() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        if let Ok(rt) = rt {
            rt.block_on(async {
                if tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!("\nstopping after this step (Ctrl-C)…");
                    f.store(true, Ordering::Relaxed);
                }
            });
        }
    });
    flag
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let dtype = match a.precision {
        PrecisionArg::Fp32 => DType::F32,
        PrecisionArg::Fp16 => DType::F16,
        PrecisionArg::Bf16 => DType::BF16,
    };
    let _ = a.ft;
    let opts = GenerateOptions {
        load: LoadSpec {
            model: a.model,
            config: a.config,
            device: device(a.device)?,
            dtype,
            vae_encoder: false,
            prediction_type: a.prediction_type.map(|p| {
                match p {
                    PredictionArg::Epsilon => "epsilon",
                    PredictionArg::VPrediction => "v_prediction",
                }
                .to_string()
            }),
            train: None,
        },
        prompts: a.prompts,
        negative: a.negative,
        steps: a.steps,
        cfg: a.cfg,
        width: a.size.0,
        height: a.size.1,
        seed: a.seed,
        sampler: a.sampler,
        batch: a.batch,
        membranes: a.membranes,
        strength: a.strength,
        gate: a.gate.options(true),
        mix: a.mix,
        grid: a.grid,
        clip_skip: a.clip_skip,
        out: a.output.clone(),
        force: a.force,
    };
    generate::check(&opts)?;
    let bar = if std::io::stderr().is_terminal() && !a.json {
        indicatif::ProgressBar::new(0).with_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps {per_sec} {elapsed_precise} {msg}",
            )
            .expect("template"),
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    let cancel = cancel_on_ctrl_c();
    let summary = match generate::run(&opts, &Bar(bar), &cancel) {
        Err(Error::Cancelled) => {
            // Finished images were written atomically and stay; the one in
            // progress never reached the disk. 130 = killed by SIGINT.
            eprintln!(
                "stopped by Ctrl-C; images finished before it are in {}",
                a.output.display()
            );
            std::process::exit(130);
        }
        r => r?,
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&summary).expect("summary serialises")
        );
    } else {
        for img in &summary.images {
            let gates: Vec<String> = img
                .gates
                .iter()
                .map(|(n, g)| format!("{n}={:.2}", g.rate))
                .collect();
            println!(
                "wrote {}{}",
                img.file.display(),
                if gates.is_empty() {
                    String::new()
                } else {
                    format!("  (gates: {})", gates.join(", "))
                }
            );
        }
        println!(
            "{} image(s), {} steps of {}, {:.1} s",
            summary.images.len(),
            summary.steps,
            summary.sampler,
            summary.seconds
        );
    }
    Ok(())
}
