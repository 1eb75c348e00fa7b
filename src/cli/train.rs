//! `spm train`'s flags and the glue from them to [`spm::train::run`].

use std::io::IsTerminal;
use std::path::PathBuf;

use spm::error::{Error, Result};
use spm::train::esd::Variant;
use spm::train::fmn::{Kind, Mask};
use spm::train::optim::Rule;
use spm::train::run::{Observer, TrainOptions};
use spm::train::schedule::Kind as LrKind;
use spm::train::spm::{Anchors, Setting};
use spm::train::Method;

use super::generate::DeviceArg;

/// Train a concept eraser: SPM (default), ESD or Forget-Me-Not.
///
/// Every method follows its reference step for step (the defaults are each
/// reference's own; quirks included unless a flag says otherwise) and
/// writes a LoRA file whose `prompts` metadata names the concept, so
/// `spm inspect`, `spm convert`, the WebUIs and Facilitated Transport
/// (`spm gate`, `spm serve`, `spm generate`) all take it.
///
///   spm      SPM with Latent Anchoring (Con6924/SPM train_spm.py): rank-1
///            membranes on the 192 transformer layers, DDIM(30) trajectory
///            with the membrane on, λ = 1000, AdamW, cosine restarts with
///            500 warm-up steps, 3000 iterations.
///   esd-*    ESD (rohitgandikota/erasing esd_sd.py): x = cross-attention,
///            u = everything else, all, x-strict = attn2 to_k/to_v;
///            η = 2, Adam 5e-5, 200 iterations, 1024² (as esd_sd.py);
///            a rank-4 LoRA, or --full weights. --esd-variant compvis for
///            the original script.
///   fmn      Forget-Me-Not attention re-steering, data-free: the concept
///            images are the base model's own samples; 35 steps.
///
/// Training needs a GPU for real models (`--device cuda`, built with
/// `--features cuda`): one SPM iteration of SD1.5 on a CPU takes minutes.
/// Ctrl-C saves a checkpoint; --resume goes on from it.
///
/// Examples:
///   spm train --model sd15/ --concept pikachu -o pikachu.safetensors
///   spm train --model sd15/ --concept "van gogh" --method esd-x -o vg.safetensors
///   spm train --config configs/pikachu/config.yaml --model sd15/ -o out.safetensors
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct TrainArgs {
    /// A diffusers pipeline folder or an LDM .safetensors/.ckpt (SD1/SD2).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The concept to erase (SPM: `target`; repeatable for several).
    #[arg(long)]
    concept: Vec<String>,
    /// What the concept should become (SPM `neutral`, ESD `--erase_from`
    /// is --from). Empty by default.
    #[arg(long, default_value = "")]
    surrogate: String,
    /// The reference's config.yaml (its prompts_file is read too).
    #[arg(long)]
    config: Option<PathBuf>,
    /// A prompt.yaml, instead of config.yaml's prompts_file.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// A diffusers folder with the configs of a single-file --model.
    #[arg(long)]
    model_config: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "spm")]
    method: Method,
    /// The output file (.safetensors).
    #[arg(short, long)]
    output: PathBuf,
    #[arg(long)]
    iterations: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long, value_enum)]
    lr_scheduler: Option<LrKind>,
    #[arg(long)]
    warmup: Option<usize>,
    #[arg(long)]
    cycles: Option<usize>,
    /// adam, adam-w (torch order) or adam-w-after (bitsandbytes' order,
    /// SPM's default).
    #[arg(long, value_enum)]
    optimizer: Option<OptArg>,
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Clip the gradient norm (0 = off; FMN's attention-only default is 1).
    #[arg(long)]
    max_grad_norm: Option<f64>,
    /// Round weights to bf16 after each step, as esd_sd.py's bf16 training.
    #[arg(long)]
    bf16_weights: bool,
    /// LoRA rank (SPM 1, others 4).
    #[arg(long)]
    rank: Option<usize>,
    #[arg(long)]
    alpha: Option<f64>,
    /// Train the selected layers' full weights (ESD, FMN) and save them as
    /// a partial diffusers state dict.
    #[arg(long)]
    full: bool,
    /// Erasing guidance η (SPM: the setting's guidance_scale, 1; ESD 2).
    #[arg(long)]
    eta: Option<f64>,
    /// Training resolution (SPM: the setting's, with dynamic resolution).
    #[arg(long)]
    resolution: Option<usize>,
    /// SPM anchoring: half (the reference's quirk) or all.
    #[arg(long, value_enum, default_value = "half")]
    anchors: Anchors,
    /// SPM: no dynamic resolution (the --concept default is dynamic, as
    /// the shipped configs).
    #[arg(long)]
    fixed_resolution: bool,
    /// SPM trajectory steps N (the config's max_denoising_steps; 30).
    #[arg(long)]
    max_denoising_steps: Option<usize>,
    #[arg(long, value_enum, default_value = "diffusers")]
    esd_variant: Variant,
    /// ESD: the sampler's steps for the trajectory (esd_sd.py: 50).
    #[arg(long, default_value_t = 50)]
    esd_steps: usize,
    /// ESD: erase the concept from this one (`--erase_from`).
    #[arg(long)]
    from: Option<String>,
    /// FMN prompt template.
    #[arg(long, value_enum, default_value = "object")]
    fmn_kind: Kind,
    /// FMN columns: pooler (the reference, all EOS ids), eos-only, concept.
    #[arg(long, value_enum, default_value = "pooler")]
    fmn_mask: Mask,
    /// FMN: how many concept images the base model samples.
    #[arg(long, default_value_t = 10)]
    fmn_images: usize,
    #[arg(long, default_value_t = 30)]
    fmn_gen_steps: usize,
    /// FMN: train on the photos (PNG/JPEG) in this folder, through the VAE
    /// encoder, as the reference does, instead of generated samples.
    #[arg(long)]
    images: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Save the file and a checkpoint every N steps (0 = only at the end;
    /// the config's save.per_steps; 500).
    #[arg(long)]
    save_every: Option<usize>,
    /// Render --sample-prompt grids every N steps (through spm generate).
    #[arg(long, default_value_t = 0)]
    sample_every: usize,
    #[arg(long)]
    sample_prompt: Vec<String>,
    #[arg(long, default_value_t = 20)]
    sample_steps: usize,
    /// Go on from a checkpoint (`<output>_state.safetensors`).
    #[arg(long)]
    resume: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Replace an existing output.
    #[arg(long)]
    force: bool,
    /// Print a JSON summary (losses included) instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OptArg {
    Adam,
    AdamW,
    AdamWAfter,
}

struct Bar(indicatif::ProgressBar);

impl Observer for Bar {
    fn start(&self, total: usize, from: usize) {
        self.0.set_length(total as u64);
        self.0.set_position(from as u64);
        self.0.reset_eta();
    }
    fn note(&self, msg: &str) {
        tracing::info!("{msg}");
        self.0.set_message(msg.to_string());
    }
    fn step(&self, step: usize, parts: &[(&'static str, f64)], lr: f64) {
        let p: Vec<String> = parts.iter().map(|(n, v)| format!("{n} {v:.3e}")).collect();
        self.0.set_position(step as u64);
        self.0.set_message(format!("{} lr {lr:.2e}", p.join(" ")));
        tracing::debug!(step, lr, ?parts, "step");
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

pub fn run(a: TrainArgs) -> Result<()> {
    let mut inputs = Vec::new();
    let mut root = None;
    let (settings, model) = match &a.config {
        Some(c) => {
            let loaded = spm::train::config::load(c, a.prompts.as_deref())?;
            root = Some((loaded.root.clone(), c.clone()));
            inputs.extend(loaded.files.iter().cloned());
            let model = a
                .model
                .clone()
                .unwrap_or_else(|| PathBuf::from(&loaded.root.pretrained_model.name_or_path));
            (loaded.settings, model)
        }
        None => {
            let settings = match &a.prompts {
                Some(p) => {
                    let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
                    inputs.push(p.clone());
                    serde_norway::from_str(&text)
                        .map_err(|e| Error::file(p, format!("bad prompt settings: {e}")))?
                }
                None => a
                    .concept
                    .iter()
                    .map(|c| {
                        let mut s = Setting::new(c, &a.surrogate);
                        s.dynamic_resolution = !a.fixed_resolution;
                        s
                    })
                    .collect::<Vec<_>>(),
            };
            let model = a
                .model
                .clone()
                .ok_or_else(|| Error::usage("--model is required (or --config naming one)"))?;
            (settings, model)
        }
    };
    if settings.is_empty() {
        return Err(Error::usage(
            "nothing to erase: pass --concept NAME (or --config/--prompts)",
        ));
    }
    for s in &settings {
        s.check().map_err(Error::usage)?;
    }
    let opts = TrainOptions {
        model,
        config_dir: a.model_config,
        device: super::generate::device(a.device)?,
        method: a.method,
        settings,
        anchors: a.anchors,
        iterations: a.iterations,
        lr: a.lr,
        schedule: a.lr_scheduler,
        warmup: a.warmup,
        cycles: a.cycles,
        rule: a.optimizer.map(|o| match o {
            OptArg::Adam => Rule::Adam,
            OptArg::AdamW => Rule::AdamW,
            OptArg::AdamWAfter => Rule::AdamWAfter,
        }),
        weight_decay: a.weight_decay,
        max_grad_norm: a.max_grad_norm,
        bf16_weights: a.bf16_weights,
        rank: a.rank,
        alpha: a.alpha,
        full: a.full,
        eta: a.eta,
        resolution: a.resolution,
        esd_variant: a.esd_variant,
        esd_from: a.from,
        esd_steps: a.esd_steps.max(2),
        fmn_kind: a.fmn_kind,
        fmn_mask: a.fmn_mask,
        fmn_images: a.fmn_images.max(1),
        fmn_image_dir: a.images,
        fmn_gen_steps: a.fmn_gen_steps.max(1),
        max_denoising_steps: a
            .max_denoising_steps
            .or(root.as_ref().map(|(r, _)| r.train.max_denoising_steps))
            .unwrap_or(30)
            .max(2),
        seed: a.seed,
        out: a.output.clone(),
        save_every: a
            .save_every
            .or(root.as_ref().map(|(r, _)| r.save.per_steps))
            .unwrap_or(500),
        resume: a.resume,
        force: a.force,
        sample_every: a.sample_every,
        sample_prompts: a.sample_prompt,
        sample_steps: a.sample_steps,
        inputs,
        prediction_type: None,
    };
    let mut opts = opts;
    if let Some((r, path)) = &root {
        r.apply(&mut opts, path)?;
    }
    opts.resolve()?;
    let bar = if std::io::stderr().is_terminal() && !a.json {
        indicatif::ProgressBar::new(0).with_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} it {per_sec} eta {eta} {msg}",
            )
            .expect("template"),
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    let cancel = super::generate::cancel_on_ctrl_c();
    let summary = match spm::train::run::run(&opts, &Bar(bar), &cancel) {
        Err(Error::Cancelled) => {
            eprintln!(
                "stopped by Ctrl-C; resume with --resume {}",
                opts.state_path().display()
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
        println!(
            "wrote {} ({} {} on {} modules, {} tensors, {} parameters): {} steps, loss {:.4e} → {:.4e}, {:.1} s",
            summary.out.display(),
            summary.method.name(),
            if summary.settings.full { "full weights" } else { "LoRA" },
            summary.modules,
            summary.tensors,
            summary.parameters,
            summary.steps_run,
            summary.first_loss.unwrap_or(f64::NAN),
            summary.last_loss.unwrap_or(f64::NAN),
            summary.seconds
        );
        let fmt = |p: &[(&str, f64)]| {
            p.iter()
                .map(|(n, v)| format!("{n} {v:.4e}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "held-out draw: {} → {}",
            fmt(&summary.eval_before),
            fmt(&summary.eval_after)
        );
        println!("checkpoint: {}", summary.state.display());
    }
    Ok(())
}
