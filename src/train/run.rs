//! One training run from options to output file: load the model with the
//! method's trainable set, build the method, loop with checkpoints, write.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::esd::{Esd, Variant};
use super::fmn::{Fmn, Kind, Mask};
use super::optim::{clip_grad_norm, Adam, AdamConfig, Rule};
use super::schedule::{Kind as LrKind, LrSchedule};
use super::spm::{Anchors, Embeds, Setting, Spm};
use super::{step_rng, Method, Net, Step, Terms};
use crate::error::{Error, Result};
use crate::io::output::{check_output, OutputKind};
use crate::model::nn::{error_message, Trainables};
use crate::model::scheduler;
use crate::model::sd::{LoadSpec, StableDiffusion};
use crate::model::unet::Cond;

/// Everything `spm train` was asked; `None` takes the method's reference
/// default ([`Resolved`]).
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub model: PathBuf,
    pub config_dir: Option<PathBuf>,
    /// `epsilon` / `v_prediction` over the model's own (config `v_pred`).
    pub prediction_type: Option<String>,
    pub device: Device,
    pub method: Method,
    /// SPM prompt settings (from `--concept` or `prompt.yaml`); the other
    /// methods use the first target (and its `neutral` as ESD's `from`).
    pub settings: Vec<Setting>,
    pub anchors: Anchors,
    pub iterations: Option<usize>,
    pub lr: Option<f64>,
    pub schedule: Option<LrKind>,
    pub warmup: Option<usize>,
    pub cycles: Option<usize>,
    pub rule: Option<Rule>,
    pub weight_decay: Option<f64>,
    pub max_grad_norm: Option<f64>,
    pub bf16_weights: bool,
    pub rank: Option<usize>,
    pub alpha: Option<f64>,
    pub full: bool,
    pub eta: Option<f64>,
    pub resolution: Option<usize>,
    pub esd_variant: Variant,
    pub esd_from: Option<String>,
    /// ESD's sampler steps (esd_sd.py: 50; k is drawn below it).
    pub esd_steps: usize,
    pub fmn_kind: Kind,
    pub fmn_mask: Mask,
    pub fmn_images: usize,
    /// FMN on real pictures (through the VAE encoder) instead of samples.
    pub fmn_image_dir: Option<PathBuf>,
    pub fmn_gen_steps: usize,
    pub max_denoising_steps: usize,
    pub seed: u64,
    pub out: PathBuf,
    pub save_every: usize,
    pub resume: Option<PathBuf>,
    pub force: bool,
    /// Render `sample_prompts` through `spm generate`'s code every this
    /// many steps (0 = never): a grid of base | FT | full strength.
    pub sample_every: usize,
    pub sample_prompts: Vec<String>,
    pub sample_steps: usize,
    /// Inputs to protect besides the model (config files).
    pub inputs: Vec<PathBuf>,
}

/// The numbers the run uses, after the method's defaults.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Resolved {
    pub method: Method,
    pub iterations: usize,
    pub lr: f64,
    pub schedule: LrSchedule,
    pub adam: AdamConfig,
    pub max_grad_norm: f64,
    pub rank: usize,
    pub alpha: f64,
    pub full: bool,
    pub eta: f64,
    pub resolution: usize,
    pub seed: u64,
}

impl TrainOptions {
    /// Each reference's own defaults (trainer-methods.md §6).
    pub fn resolve(&self) -> Result<Resolved> {
        self.resolve_for(false)
    }

    /// The defaults for the model at hand: on SDXL (`xl`), ESD's are
    /// `esd_sdxl.py`'s (lr 2e-4 for esd-x/esd-x-strict, else 1e-5; η 1).
    pub fn resolve_for(&self, xl: bool) -> Result<Resolved> {
        let m = self.method;
        let esd = !matches!(m, Method::Spm | Method::Fmn);
        let compvis = esd && self.esd_variant == Variant::CompVis;
        let iterations = self.iterations.unwrap_or(match m {
            Method::Spm => 3000,
            Method::Fmn => 35,
            _ if compvis => 1000,
            _ => 200,
        });
        let lr = self.lr.unwrap_or(match m {
            Method::Spm => 1e-4,
            // A LoRA starting at up = 0 does not move at the reference's
            // full-weight 2e-6 in 35 steps: 1e-4 as SPM/LECO use.
            Method::Fmn if self.full => 2e-6,
            Method::Fmn => 1e-4,
            _ if compvis => 1e-5,
            Method::EsdX | Method::EsdXStrict if xl => 2e-4,
            _ if xl => 1e-5,
            _ => 5e-5,
        });
        let (rule, wd) = match m {
            Method::Spm => (Rule::AdamWAfter, 0.01),
            Method::Fmn => (Rule::AdamW, 0.01),
            _ => (Rule::Adam, 0.0),
        };
        let kind = self.schedule.unwrap_or(match m {
            Method::Spm => LrKind::CosineWithRestarts,
            _ => LrKind::Constant,
        });
        let schedule = LrSchedule {
            kind,
            warmup: self
                .warmup
                .unwrap_or(if m == Method::Spm { 500 } else { 0 }),
            cycles: self.cycles.unwrap_or(3),
            total: iterations,
        };
        let mut adam = AdamConfig::new(self.rule.unwrap_or(rule), self.weight_decay.unwrap_or(wd));
        adam.bf16_weights = self.bf16_weights;
        let rank = self.rank.unwrap_or(if m == Method::Spm { 1 } else { 4 });
        if rank == 0 {
            return Err(Error::usage("--rank must be at least 1"));
        }
        if self.full && m == Method::Spm {
            return Err(Error::usage(
                "--full trains whole weights; SPM is a membrane (a rank-r adapter) by definition",
            ));
        }
        let eta = self.eta.unwrap_or(match m {
            Method::Spm => self
                .settings
                .first()
                .map(|s| s.guidance_scale)
                .unwrap_or(1.0),
            _ if compvis || xl => 1.0,
            _ => 2.0,
        });
        let resolution = self.resolution.unwrap_or(match m {
            // esd_sd.py hard-codes 1024 (on SD1.4); the CompVis script 512.
            _ if esd && !compvis => 1024,
            _ => 512,
        });
        if resolution == 0 || !resolution.is_multiple_of(64) {
            return Err(Error::usage(format!(
                "--resolution {resolution} is not a positive multiple of 64"
            )));
        }
        if iterations == 0 {
            return Err(Error::usage("--iterations must be at least 1"));
        }
        for (name, v) in [
            ("lr", lr),
            ("eta", eta),
            ("alpha", self.alpha.unwrap_or(1.0)),
        ] {
            if !v.is_finite() {
                return Err(Error::usage(format!("--{name} must be a finite number")));
            }
        }
        Ok(Resolved {
            method: m,
            iterations,
            lr,
            schedule,
            adam,
            max_grad_norm: self
                .max_grad_norm
                .unwrap_or(if m == Method::Fmn { 1.0 } else { 0.0 }),
            rank,
            alpha: self.alpha.unwrap_or(1.0),
            full: self.full,
            eta,
            resolution,
            seed: self.seed,
        })
    }

    /// Where the resumable state goes: next to the output.
    pub fn state_path(&self) -> PathBuf {
        sibling(&self.out, "state")
    }
}

/// `<dir>/<stem>_<tag>.safetensors`.
pub fn sibling(out: &Path, tag: &str) -> PathBuf {
    let stem = out.file_stem().and_then(|s| s.to_str()).unwrap_or("spm");
    out.with_file_name(format!("{stem}_{tag}.safetensors"))
}

/// Progress reporting (the CLI draws a bar; tests ignore it).
pub trait Observer {
    fn start(&self, _total: usize, _from: usize) {}
    fn note(&self, _msg: &str) {}
    fn step(&self, _step: usize, _parts: &[(&'static str, f64)], _lr: f64) {}
    fn finish(&self) {}
}

pub struct Quiet;
impl Observer for Quiet {}

/// What a finished run reports (`--json`).
#[derive(Debug, serde::Serialize)]
pub struct Summary {
    pub out: PathBuf,
    pub state: PathBuf,
    pub method: Method,
    pub settings: Resolved,
    pub modules: usize,
    pub tensors: usize,
    pub parameters: usize,
    pub steps_run: usize,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub losses: Vec<f64>,
    /// The loss terms at one fixed held-out draw, before the first and
    /// after the last step of this run: unlike the per-step losses (each at
    /// its own random k, t, latent), these two are comparable.
    pub eval_before: Vec<(&'static str, f64)>,
    pub eval_after: Vec<(&'static str, f64)>,
    pub seconds: f64,
}

fn ce(e: candle_core::Error) -> Error {
    Error::usage(error_message(&e))
}

/// The trainable set a method asks for (`xl`: SDXL's module rules).
pub fn trainables(method: Method, r: &Resolved, xl: bool) -> Trainables {
    let t = Trainables::new(r.seed ^ 0x5eed);
    if r.full {
        t.full(move |p| method.selects_in(p, xl))
    } else {
        t.lora(move |p| method.selects_in(p, xl), r.rank, r.alpha)
    }
}

/// A method, built against a loaded model.
pub enum Built {
    Spm(Spm),
    Esd(Esd),
    Fmn(Fmn),
}

/// The conditioning of `text` at a square image of `res` pixels (clip
/// skip 1: the references ignore it when training; SDXL's size ids at the
/// training resolution).
fn embed(sd: &StableDiffusion, text: &str, res: usize) -> Result<Cond> {
    sd.condition(text, (res, res))
}

pub fn build_method(
    opts: &TrainOptions,
    r: &Resolved,
    sd: &StableDiffusion,
    net: &Net,
    obs: &dyn Observer,
) -> Result<Built> {
    let first = opts
        .settings
        .first()
        .ok_or_else(|| Error::usage("no concept to erase (--concept or a prompt.yaml)"))?;
    let concept = first.target.clone();
    let pred = sd.info.prediction_type.clone();
    Ok(match opts.method {
        Method::Spm => {
            let mut embeds = Vec::new();
            let mut settings = opts.settings.clone();
            for s in &mut settings {
                if opts.resolution.is_some() {
                    s.resolution = r.resolution;
                }
                if opts.eta.is_some() {
                    s.guidance_scale = r.eta;
                }
                let res = s.resolution;
                embeds.push(Embeds {
                    target: embed(sd, &s.target, res)?,
                    positive: embed(sd, s.positive(), res)?,
                    neutral: embed(sd, s.neutral(), res)?,
                    uncond: embed(sd, s.unconditional(), res)?,
                });
            }
            Built::Spm(Spm {
                settings,
                embeds,
                anchors: opts.anchors,
                steps: opts.max_denoising_steps,
                sched: super::spm::reference_ddim(&pred)?,
                rescale: if sd.xl.is_some() { 0.7 } else { 0.0 },
                device: sd.device.clone(),
                dtype: sd.dtype,
            })
        }
        Method::Fmn => {
            let prompt_text = opts.fmn_kind.prompt(&concept);
            let ids = sd.tokenize(&prompt_text);
            let cids = sd.tokenizer.encode(&concept);
            if cids.is_empty() {
                return Err(Error::usage(format!(
                    "the concept `{concept}` has no tokens"
                )));
            }
            let eos = sd.tokenizer.eos();
            let cols = super::fmn::token_mask(&ids, &cids, eos, opts.fmn_mask);
            if !ids.windows(cids.len()).any(|w| w == cids.as_slice()) {
                return Err(Error::usage(format!(
                    "the concept `{concept}` does not survive tokenization of `{prompt_text}` (truncated?)"
                )));
            }
            let mut m = vec![0f32; 77];
            for c in &cols {
                m[*c] = 1.0;
            }
            let mask = Tensor::from_vec(m, (1, 77), &sd.device).map_err(ce)?;
            let prompt = embed(sd, &prompt_text, r.resolution)?;
            let uncond = embed(sd, "", r.resolution)?;
            let cfg = sd.scheduler.clone();
            let alphas = scheduler_alphas(&cfg)?;
            let lat = r.resolution / 8;
            let mut latents = Vec::new();
            let mut encoded = Vec::new();
            if let Some(dir) = &opts.fmn_image_dir {
                let scale = sd.vae.config.scaling_factor;
                for (f, img) in super::fmn::read_images(dir, r.resolution, &sd.device, sd.dtype)? {
                    obs.note(&format!("encoding {}", f.display()));
                    let d = sd.vae.encode(&img).map_err(|e| {
                        Error::file(&f, format!("VAE encoder: {}", error_message(&e)))
                    })?;
                    encoded.push(((d.mean * scale).map_err(ce)?, (d.std * scale).map_err(ce)?));
                }
            }
            // Data-free: the base model's own samples for the prompt.
            let generated = if opts.fmn_image_dir.is_some() {
                0
            } else {
                opts.fmn_images
            };
            for i in 0..generated {
                obs.note(&format!(
                    "sampling concept image {}/{} ({} steps)",
                    i + 1,
                    opts.fmn_images,
                    opts.fmn_gen_steps
                ));
                let mut rng =
                    crate::model::noise::TorchRng::manual_seed(opts.seed.wrapping_add(i as u64));
                let z =
                    super::randn(&mut rng, &[1, 4, lat, lat], &sd.device, sd.dtype).map_err(ce)?;
                let mut sched = scheduler::build(None, &cfg, opts.fmn_gen_steps)?;
                let z = (z * sched.init_noise_sigma()).map_err(ce)?;
                let x = net
                    .denoise(
                        false,
                        sched.as_mut(),
                        z,
                        super::Guide {
                            uncond: &uncond,
                            cond: &prompt,
                            scale: 7.5,
                            rescale: 0.0,
                        },
                        opts.fmn_gen_steps,
                        |_, _| {},
                    )
                    .map_err(ce)?;
                latents.push(x);
            }
            Built::Fmn(Fmn {
                prompt,
                mask,
                latents,
                encoded,
                alphas_cumprod: alphas,
                device: sd.device.clone(),
                dtype: sd.dtype,
            })
        }
        _ => {
            if opts.esd_variant == Variant::CompVis && pred != "epsilon" {
                return Err(Error::usage(
                    "the CompVis ESD variant's DDIM loop is written for ε-prediction models; this one predicts v (use --esd-variant diffusers)",
                ));
            }
            let xl = sd.xl.is_some();
            if xl && opts.esd_variant == Variant::CompVis {
                return Err(Error::usage(
                    "the CompVis ESD script is for SD1/SD2 (LDM); SDXL trains as esd_sdxl.py does (the default --esd-variant diffusers)",
                ));
            }
            let from = opts.esd_from.as_deref().filter(|f| *f != concept);
            let null = embed(sd, "", r.resolution)?;
            // esd_sdxl.py samples through StableDiffusionXLPipeline without a
            // negative prompt: its unconditional branch is all zeros
            // (`force_zeros_for_empty_prompt`), while the loss's null
            // prediction uses the encoding of "" (`negative_prompt=""`).
            let sample_null = if sd.zeroes_negative("") {
                Some(null.zeroed().map_err(ce)?)
            } else {
                None
            };
            Built::Esd(Esd {
                variant: opts.esd_variant,
                eta: r.eta,
                // esd_sd.py samples at CFG 3, esd_sdxl.py at 2.
                guidance: if xl { 2.0 } else { 3.0 },
                sample_null,
                steps: opts.esd_steps,
                latent: (r.resolution / 8, r.resolution / 8),
                sched: sd.scheduler.clone(),
                concept: embed(sd, &concept, r.resolution)?,
                from: from.map(|f| embed(sd, f, r.resolution)).transpose()?,
                null,
                device: sd.device.clone(),
                dtype: sd.dtype,
            })
        }
    })
}

/// ᾱ of a scheduler config (DDPM's add_noise uses the training schedule).
fn scheduler_alphas(cfg: &scheduler::SchedulerConfig) -> Result<Vec<f32>> {
    let s = scheduler::build(Some(scheduler::Sampler::Ddim), cfg, 1)?;
    // add_noise of a unit x0 with zero noise at each t gives √ᾱ_t.
    Ok((0..1000)
        .map(|t| {
            let v = s.add_noise(&[1.0], &[0.0], t as f64)[0] as f64;
            (v * v) as f32
        })
        .collect())
}

impl Built {
    pub fn draw_and_loss(
        &self,
        net: &Net,
        rng: &mut crate::model::noise::TorchRng,
    ) -> Result<Terms> {
        match self {
            Built::Spm(m) => {
                let d = m.draw(rng)?;
                m.loss(net, &d).map_err(ce)
            }
            Built::Esd(m) => {
                let d = m.draw(rng)?;
                m.loss(net, &d).map_err(ce)
            }
            Built::Fmn(m) => {
                let d = m.draw(rng)?;
                m.loss(net, &d).map_err(ce)
            }
        }
    }
}

/// The file's metadata: the reference's three fields, plus what spm knows.
fn metadata(opts: &TrainOptions, r: &Resolved) -> std::collections::BTreeMap<String, String> {
    let mut m = std::collections::BTreeMap::new();
    let prompts: Vec<&str> = opts.settings.iter().map(|s| s.target.as_str()).collect();
    m.insert("prompts".into(), prompts.join(","));
    if !r.full {
        m.insert("rank".into(), r.rank.to_string());
        m.insert("alpha".into(), super::output::py_float(r.alpha));
    }
    m.insert("spm_train_method".into(), opts.method.name().into());
    m
}

/// A sample grid of `file` at `step`: `spm generate --membrane file --grid`
/// into `<out stem>_samples/step_<step>/`.
fn render_samples(opts: &TrainOptions, file: &Path, step: usize, obs: &dyn Observer) -> Result<()> {
    let stem = opts
        .out
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("spm");
    let dir = opts
        .out
        .with_file_name(format!("{stem}_samples"))
        .join(format!("step_{step:06}"));
    obs.note(&format!("rendering samples into {}", dir.display()));
    let g = crate::generate::GenerateOptions {
        load: LoadSpec {
            model: opts.model.clone(),
            config: opts.config_dir.clone(),
            device: opts.device.clone(),
            dtype: DType::F32,
            vae_encoder: false,
            prediction_type: None,
            train: None,
        },
        prompts: opts.sample_prompts.clone(),
        negative: String::new(),
        steps: opts.sample_steps,
        cfg: 7.5,
        width: 512.min(opts.resolution.unwrap_or(512)),
        height: 512.min(opts.resolution.unwrap_or(512)),
        seed: opts.seed,
        sampler: None,
        batch: 1,
        membranes: vec![file.to_path_buf()],
        strength: None,
        gate: Default::default(),
        mix: Default::default(),
        grid: true,
        clip_skip: 1,
        out: dir,
        force: true,
    };
    crate::generate::check(&g)?;
    let never = AtomicBool::new(false);
    crate::generate::run(&g, &NoProgress, &never)?;
    Ok(())
}

struct NoProgress;
impl crate::generate::Progress for NoProgress {
    fn start(&self, _: u64) {}
    fn step(&self, _: &str) {}
    fn finish(&self) {}
}

/// Run the whole job.
pub fn run(opts: &TrainOptions, obs: &dyn Observer, cancel: &AtomicBool) -> Result<Summary> {
    let started = std::time::Instant::now();
    let xl = crate::model::sd::is_xl_model(&opts.model);
    let r = opts.resolve_for(xl)?;
    if opts.sample_every > 0 && (r.full || opts.sample_prompts.is_empty()) {
        return Err(Error::usage(if r.full {
            "--sample-every renders the trained file as a membrane; a --full output is not one"
        } else {
            "--sample-every needs at least one --sample-prompt"
        }));
    }
    let state = opts.state_path();
    let mut inputs: Vec<&Path> = vec![&opts.model];
    inputs.extend(opts.inputs.iter().map(PathBuf::as_path));
    if let Some(c) = &opts.config_dir {
        inputs.push(c);
    }
    if let Some(d) = &opts.fmn_image_dir {
        if opts.method != Method::Fmn {
            return Err(Error::usage("--images is for --method fmn"));
        }
        inputs.push(d);
    }
    check_output(&opts.out, &inputs, OutputKind::File, opts.force)?;
    if let Some(res) = &opts.resume {
        if res != &state {
            inputs.push(res);
        }
    }
    check_output(&state, &inputs, OutputKind::File, true)?;
    let train = Arc::new(trainables(opts.method, &r, xl));
    let spec = LoadSpec {
        model: opts.model.clone(),
        config: opts.config_dir.clone(),
        device: opts.device.clone(),
        dtype: DType::F32,
        vae_encoder: opts.method == Method::Fmn && opts.fmn_image_dir.is_some(),
        prediction_type: opts.prediction_type.clone(),
        train: Some(train.clone()),
    };
    obs.note("loading the model");
    let sd = StableDiffusion::load(&spec, Arc::new(Default::default()))?;
    let net = Net {
        base: &sd.unet,
        trained: sd.trained.as_ref().unwrap_or(&sd.unet),
        lora: !r.full,
        device: sd.device.clone(),
        dtype: sd.dtype,
    };
    let vars = train.vars();
    if vars.is_empty() {
        return Err(Error::usage(format!(
            "method {} selects no layer of this UNet",
            opts.method.name()
        )));
    }
    let modules = train.modules().len();
    let parameters = vars.iter().map(|(_, v)| v.elem_count()).sum();
    tracing::info!(modules, tensors = vars.len(), parameters, "trainable set");
    let method = build_method(opts, &r, &sd, &net, obs)?;
    let var_list: Vec<candle_core::Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = Adam::new(r.adam, vars.clone()).map_err(ce)?;
    let fingerprint = serde_json::to_string(&(
        &r,
        opts.settings.iter().map(|s| &s.target).collect::<Vec<_>>(),
        sd.info.name.clone(),
    ))
    .expect("json");
    // As the reference's `_mem_reduce`: every prompt is encoded now, and
    // nothing below needs the text encoders or the VAE again (sample grids
    // load the model anew), so they are freed — ~3 GB in f32 on SDXL.
    let (device, dtype) = (sd.device.clone(), sd.dtype);
    let StableDiffusion {
        unet,
        trained,
        text,
        xl,
        vae,
        ..
    } = sd;
    drop((text, xl, vae));
    let net = Net {
        base: &unet,
        trained: trained.as_ref().unwrap_or(&unet),
        lora: !r.full,
        device: device.clone(),
        dtype,
    };
    let mut start = 0;
    if let Some(p) = &opts.resume {
        start = super::checkpoint::load(p, &mut opt, &fingerprint, &device)?;
        obs.note(&format!("resumed at step {start} from {}", p.display()));
    }
    let meta = metadata(opts, &r);
    let write_out = |dest: &Path| -> Result<()> {
        let tensors = if r.full {
            super::output::full_tensors(&vars)?
        } else {
            super::output::lora_tensors(&vars, r.alpha)?
        };
        super::output::write(dest, &meta, &tensors)
    };
    // A fixed draw no training step uses.
    let eval = |net: &Net| -> Result<Vec<(&'static str, f64)>> {
        let mut rng = step_rng(r.seed ^ 0xe7a1, usize::MAX);
        Ok(method.draw_and_loss(net, &mut rng)?.parts)
    };
    let eval_before = eval(&net)?;
    obs.start(r.iterations, start);
    let mut losses = Vec::new();
    let mut first: Option<f64> = None;
    let mut step = start;
    while step < r.iterations {
        if cancel.load(Ordering::Relaxed) {
            super::checkpoint::save(&state, &opt, step, &fingerprint)?;
            obs.finish();
            return Err(Error::Cancelled);
        }
        let mut rng = step_rng(r.seed, step);
        let terms = method.draw_and_loss(&net, &mut rng)?;
        let loss = terms.value().map_err(ce)?;
        let reference = *first.get_or_insert(loss);
        let last_good = || {
            if state.is_file() {
                format!(
                    "the last good state is {} (resume with --resume, e.g. at a lower --lr)",
                    state.display()
                )
            } else {
                "no checkpoint was written yet (--save-every)".to_string()
            }
        };
        if !loss.is_finite() || (loss > 1e4 * reference.abs().max(1e-8) && step > start) {
            return Err(Error::usage(format!(
                "step {}: the loss is {loss:e} (first step {reference:e}); stopping: {}",
                step + 1,
                last_good()
            )));
        }
        let mut grads = terms.total.backward().map_err(ce)?;
        let norm = clip_grad_norm(&mut grads, &var_list, r.max_grad_norm).map_err(ce)?;
        if !norm.is_finite() {
            return Err(Error::usage(format!(
                "step {}: a gradient is NaN or infinite; stopping: {}",
                step + 1,
                last_good()
            )));
        }
        let lr = r.lr * r.schedule.factor(step);
        opt.step(&grads, lr).map_err(ce)?;
        drop(grads);
        losses.push(loss);
        step += 1;
        obs.step(step, &terms.parts, lr);
        let save = opts.save_every > 0 && step % opts.save_every == 0 && step < r.iterations;
        let sample = opts.sample_every > 0 && step % opts.sample_every == 0 && step < r.iterations;
        if save || sample {
            let file = sibling(&opts.out, &format!("{step}steps"));
            write_out(&file)?;
            super::checkpoint::save(&state, &opt, step, &fingerprint)?;
            if sample {
                render_samples(opts, &file, step, obs)?;
            }
        }
    }
    write_out(&opts.out)?;
    super::checkpoint::save(&state, &opt, step, &fingerprint)?;
    let eval_after = eval(&net)?;
    if opts.sample_every > 0 {
        render_samples(opts, &opts.out, step, obs)?;
    }
    obs.finish();
    Ok(Summary {
        out: opts.out.clone(),
        state,
        method: opts.method,
        settings: r,
        modules,
        tensors: vars.len(),
        parameters,
        steps_run: losses.len(),
        first_loss: losses.first().copied(),
        last_loss: losses.last().copied(),
        losses,
        eval_before,
        eval_after,
        seconds: started.elapsed().as_secs_f64(),
    })
}
