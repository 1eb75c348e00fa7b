//! The diffusion samplers of `spm generate`, equal to diffusers 0.42.1's.
//!
//! Why "equal" and not "equivalent": a user compares spm's image with the
//! one a diffusers script gives for the same model, prompt, seed and sampler,
//! and any difference makes them distrust the membrane, not the sampler. So
//! each sampler repeats diffusers' arithmetic in diffusers' precision:
//!
//! * the noise schedule is torch `float32` (`linspace` as torch's AVX2 build
//!   computes it, with a fused multiply-add; `cumprod` accumulated in
//!   `double`, rounded to `float` per element);
//! * timestep lists and the Euler/DPM sigma tables are numpy `float64` (its
//!   `linspace`, `arange`, round-half-to-even, `interp`), rounded to `float`
//!   where diffusers rounds them;
//! * every step is `float32`, one rounding per torch operation, in diffusers'
//!   order of operations.
//!
//! What is left: torch's CPU `sqrt`, `log` and `exp` are MKL's, which are
//! within 0.56 ulp but not correctly rounded, while spm's are IEEE; so now
//! and then a step's coefficient is one ulp off. Against diffusers' own
//! runs (`tests/schedulers.rs`) 98.6 % of step outputs are bit-identical and
//! the rest within 3e-7 of the sample's scale; timesteps,
//! init_noise_sigma and the initial latent are bit-identical.
//!
//! [`SchedulerConfig`] reads a diffusers `scheduler_config.json`. Like
//! diffusers' `from_config`, any sampler can be built from any Stable
//! Diffusion config: each sampler reads only the fields its diffusers class
//! takes and uses that class's defaults for the rest, so `--sampler euler-a`
//! on a pipeline that ships PNDM behaves as
//! `EulerAncestralDiscreteScheduler.from_config(pndm.config)`.
//!
//! The [`Scheduler`] trait has diffusers' verbs; a pipeline is
//!
//! ```
//! use spm::model::noise::TorchRng;
//! use spm::model::scheduler::{build, Sampler, SchedulerConfig};
//!
//! let config = SchedulerConfig::from_json(r#"{"_class_name": "PNDMScheduler",
//!     "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
//!     "skip_prk_steps": true, "steps_offset": 1, "set_alpha_to_one": false}"#)?;
//! let mut scheduler = build(Some(Sampler::EulerAncestral), &config, 20)?;
//! let mut rng = TorchRng::manual_seed(42);
//! let n = 4 * 8 * 8;
//! let init_noise_sigma = scheduler.init_noise_sigma() as f32;
//! let mut latents: Vec<f32> = rng.randn(n).iter().map(|x| x * init_noise_sigma).collect();
//! for i in 0..scheduler.timesteps().len() {
//!     let input = scheduler.scale_model_input(&latents, i);
//!     let noise_pred = vec![0.0f32; input.len()]; // the UNet at timesteps()[i]
//!     latents = scheduler.step(&noise_pred, i, &latents, &mut rng);
//! }
//! # Ok::<(), spm::Error>(())
//! ```

mod ddim;
mod dpmpp_2m;
mod euler;
mod euler_ancestral;
mod pndm;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

use crate::model::noise::{fused_mul_add, TorchRng};
use crate::{Error, Result};

pub use ddim::Ddim;
pub use dpmpp_2m::DpmPp2m;
pub use euler::Euler;
pub use euler_ancestral::EulerAncestral;
pub use pndm::Pndm;

/// One sampler, with diffusers' verbs. `step` indexes are the loop index `i`
/// of `for i, t in enumerate(scheduler.timesteps)`; call `scale_model_input`
/// and `step` once each per index, in order.
pub trait Scheduler: Send {
    /// The timesteps to feed the UNet, in order. Fractional for the Euler
    /// samplers; PNDM's list repeats one timestep.
    fn timesteps(&self) -> &[f64];
    /// The factor the initial `randn` latent is multiplied by.
    fn init_noise_sigma(&self) -> f64;
    /// The UNet input for step `step` (a scaled copy for the Euler samplers).
    fn scale_model_input(&self, sample: &[f32], step: usize) -> Vec<f32>;
    /// The sample after step `step`, given the model output at that step.
    /// Ancestral samplers draw their noise from `rng` (as diffusers draws it
    /// from the pipeline's generator); the others leave it untouched.
    fn step(
        &mut self,
        model_output: &[f32],
        step: usize,
        sample: &[f32],
        rng: &mut TorchRng,
    ) -> Vec<f32>;
    /// `original` noised to `timestep` (img2img), as diffusers' `add_noise`:
    /// DDIM and PNDM take any training timestep; Euler looks `timestep` up
    /// in [`timesteps`](Self::timesteps) and panics if it is not there (where
    /// diffusers raises); DPM-Solver falls back to the last one, as diffusers
    /// does.
    fn add_noise(&self, original: &[f32], noise: &[f32], timestep: f64) -> Vec<f32>;
}

/// The samplers `spm generate` offers (`--sampler`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize)]
pub enum Sampler {
    /// diffusers `DDIMScheduler` (eta 0).
    #[value(name = "ddim")]
    #[serde(rename = "ddim")]
    Ddim,
    /// diffusers `PNDMScheduler` (PLMS when `skip_prk_steps`).
    #[value(name = "pndm")]
    #[serde(rename = "pndm")]
    Pndm,
    /// diffusers `EulerDiscreteScheduler`.
    #[value(name = "euler")]
    #[serde(rename = "euler")]
    Euler,
    /// diffusers `EulerAncestralDiscreteScheduler`.
    #[value(name = "euler-a")]
    #[serde(rename = "euler-a")]
    EulerAncestral,
    /// diffusers `DPMSolverMultistepScheduler`, dpmsolver++ order 2 midpoint.
    #[value(name = "dpmpp-2m")]
    #[serde(rename = "dpmpp-2m")]
    DpmPp2m,
    /// The same with `use_karras_sigmas`.
    #[value(name = "dpmpp-2m-karras")]
    #[serde(rename = "dpmpp-2m-karras")]
    DpmPp2mKarras,
}

impl Sampler {
    /// Every sampler, in `--help` order.
    pub const ALL: [Sampler; 6] = [
        Sampler::Ddim,
        Sampler::Pndm,
        Sampler::Euler,
        Sampler::EulerAncestral,
        Sampler::DpmPp2m,
        Sampler::DpmPp2mKarras,
    ];

    /// The `--sampler` name.
    pub fn name(self) -> &'static str {
        match self {
            Sampler::Ddim => "ddim",
            Sampler::Pndm => "pndm",
            Sampler::Euler => "euler",
            Sampler::EulerAncestral => "euler-a",
            Sampler::DpmPp2m => "dpmpp-2m",
            Sampler::DpmPp2mKarras => "dpmpp-2m-karras",
        }
    }

    /// The diffusers class this sampler reproduces.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            Sampler::Ddim => "DDIMScheduler",
            Sampler::Pndm => "PNDMScheduler",
            Sampler::Euler => "EulerDiscreteScheduler",
            Sampler::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Sampler::DpmPp2m | Sampler::DpmPp2mKarras => "DPMSolverMultistepScheduler",
        }
    }

    /// What A1111 writes in an image's infotext: `(Sampler, Schedule type)`.
    /// A1111 ≥ 1.9 writes the Karras variant as `Sampler: DPM++ 2M,
    /// Schedule type: Karras`; the others have no schedule type.
    pub fn a1111_name(self) -> (&'static str, Option<&'static str>) {
        match self {
            Sampler::Ddim => ("DDIM", None),
            Sampler::Pndm => ("PLMS", None),
            Sampler::Euler => ("Euler", None),
            Sampler::EulerAncestral => ("Euler a", None),
            Sampler::DpmPp2m => ("DPM++ 2M", None),
            Sampler::DpmPp2mKarras => ("DPM++ 2M", Some("Karras")),
        }
    }

    /// The sampler a config's own `_class_name` names, as a diffusers
    /// pipeline would run it. Errors for a class spm does not reproduce and
    /// for a DPM-Solver or Euler config whose options make it another sampler.
    pub fn from_config(config: &SchedulerConfig) -> Result<Sampler> {
        let config = config.effective();
        let Some(class) = config.class_name.as_deref() else {
            return Err(config.error(
                "_class_name",
                "is missing, so the config does not say which sampler it is; choose one with --sampler",
            ));
        };
        match class {
            "DDIMScheduler" => Ok(Sampler::Ddim),
            "PNDMScheduler" => Ok(Sampler::Pndm),
            "EulerDiscreteScheduler" => {
                for field in [
                    "use_karras_sigmas",
                    "use_exponential_sigmas",
                    "use_beta_sigmas",
                ] {
                    if config.flag(field).unwrap_or(false) {
                        return Err(config.error(
                            field,
                            "is true, which spm's Euler sampler does not offer; choose another with --sampler",
                        ));
                    }
                }
                Ok(Sampler::Euler)
            }
            "EulerAncestralDiscreteScheduler" => Ok(Sampler::EulerAncestral),
            "DPMSolverMultistepScheduler" => {
                dpmpp_2m::check_is_2m(&config)?;
                if config.use_karras_sigmas.unwrap_or(false) {
                    Ok(Sampler::DpmPp2mKarras)
                } else {
                    Ok(Sampler::DpmPp2m)
                }
            }
            other => Err(config.error(
                "_class_name",
                format!(
                    "is {other:?}, which spm does not reproduce; it has DDIMScheduler, \
                     PNDMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler and \
                     DPMSolverMultistepScheduler (choose one with --sampler)"
                ),
            )),
        }
    }
}

impl std::fmt::Display for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Builds `sampler` (or, for `None`, the sampler the config's `_class_name`
/// names) from a diffusers scheduler config, set to `steps` inference steps.
///
/// An explicit sampler fixes what its name says (the DPM++ samplers are
/// dpmsolver++, order 2, midpoint, with or without Karras sigmas; Euler has
/// no Karras sigmas) and takes everything else from the config, as
/// `Class.from_config(config)` does.
pub fn build(
    sampler: Option<Sampler>,
    config: &SchedulerConfig,
    steps: usize,
) -> Result<Box<dyn Scheduler>> {
    let sampler = match sampler {
        Some(s) => s,
        None => Sampler::from_config(config)?,
    };
    let config = config.effective();
    check_steps(&config, steps)?;
    Ok(match sampler {
        Sampler::Ddim => Box::new(Ddim::new(&config, steps)?),
        Sampler::Pndm => Box::new(Pndm::new(&config, steps)?),
        Sampler::Euler => Box::new(Euler::new(&config, steps)?),
        Sampler::EulerAncestral => Box::new(EulerAncestral::new(&config, steps)?),
        Sampler::DpmPp2m => Box::new(DpmPp2m::new(&config, steps, false)?),
        Sampler::DpmPp2mKarras => Box::new(DpmPp2m::new(&config, steps, true)?),
    })
}

/// A diffusers `scheduler_config.json`.
///
/// Every field is optional: a missing one takes the default of the diffusers
/// class being built (they differ: `set_alpha_to_one` is true for DDIM and
/// false for PNDM, `timestep_spacing` is `leading` for DDIM/PNDM and
/// `linspace` for Euler/DPM, DDIM clips samples unless `clip_sample` is
/// false). Unknown fields are ignored. As in diffusers, the fields named in
/// `_use_default_values` count as missing, a JSON `null` flag counts as
/// false, and `-Infinity`/`Infinity`/`NaN` (which Python's `json` writes) are
/// read. A `null` string or number counts as missing.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// The diffusers class the file was written for.
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    /// Fields diffusers saved but were defaults, not chosen values.
    #[serde(rename = "_use_default_values", deserialize_with = "de_names")]
    pub use_default_values: Vec<String>,
    pub num_train_timesteps: Option<usize>,
    #[serde(deserialize_with = "de_float")]
    pub beta_start: Option<f64>,
    #[serde(deserialize_with = "de_float")]
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<String>,
    pub timestep_spacing: Option<String>,
    pub steps_offset: Option<i64>,
    #[serde(deserialize_with = "de_flag")]
    pub set_alpha_to_one: Option<bool>,
    #[serde(deserialize_with = "de_flag")]
    pub skip_prk_steps: Option<bool>,
    #[serde(deserialize_with = "de_flag")]
    pub clip_sample: Option<bool>,
    #[serde(deserialize_with = "de_float")]
    pub clip_sample_range: Option<f64>,
    #[serde(deserialize_with = "de_flag")]
    pub thresholding: Option<bool>,
    #[serde(deserialize_with = "de_flag")]
    pub rescale_betas_zero_snr: Option<bool>,
    #[serde(deserialize_with = "de_flag")]
    pub use_karras_sigmas: Option<bool>,
    #[serde(deserialize_with = "de_flag")]
    pub use_exponential_sigmas: Option<bool>,
    #[serde(deserialize_with = "de_flag")]
    pub use_beta_sigmas: Option<bool>,
    #[serde(deserialize_with = "de_flag")]
    pub use_lu_lambdas: Option<bool>,
    #[serde(deserialize_with = "de_flag")]
    pub use_flow_sigmas: Option<bool>,
    #[serde(deserialize_with = "de_float")]
    pub sigma_min: Option<f64>,
    #[serde(deserialize_with = "de_float")]
    pub sigma_max: Option<f64>,
    pub interpolation_type: Option<String>,
    pub timestep_type: Option<String>,
    pub final_sigmas_type: Option<String>,
    pub algorithm_type: Option<String>,
    pub solver_order: Option<usize>,
    pub solver_type: Option<String>,
    #[serde(deserialize_with = "de_flag")]
    pub lower_order_final: Option<bool>,
    #[serde(deserialize_with = "de_flag")]
    pub euler_at_final: Option<bool>,
    #[serde(deserialize_with = "de_float")]
    pub lambda_min_clipped: Option<f64>,
    pub variance_type: Option<String>,
    /// The file this config was read from, for error messages.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

impl SchedulerConfig {
    /// Reads a `scheduler_config.json` file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut config: SchedulerConfig = serde_json::from_str(&quote_non_finite(&text))
            .map_err(|e| Error::file(path, format!("not a diffusers scheduler config: {e}")))?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses the text of a `scheduler_config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(&quote_non_finite(text))
            .map_err(|e| Error::usage(format!("not a diffusers scheduler config: {e}")))
    }

    /// An error about one field, naming the file when there is one.
    fn error(&self, field: &str, msg: impl Into<String>) -> Error {
        match &self.source {
            Some(path) => Error::key(path, field, msg),
            None => Error::usage(format!("scheduler config: `{field}` {}", msg.into())),
        }
    }

    /// The config with the fields listed in `_use_default_values` removed,
    /// as diffusers' `extract_init_dict` does before anything else.
    fn effective(&self) -> SchedulerConfig {
        let mut c = self.clone();
        for name in std::mem::take(&mut c.use_default_values) {
            match name.as_str() {
                "num_train_timesteps" => c.num_train_timesteps = None,
                "beta_start" => c.beta_start = None,
                "beta_end" => c.beta_end = None,
                "beta_schedule" => c.beta_schedule = None,
                "trained_betas" => c.trained_betas = None,
                "prediction_type" => c.prediction_type = None,
                "timestep_spacing" => c.timestep_spacing = None,
                "steps_offset" => c.steps_offset = None,
                "set_alpha_to_one" => c.set_alpha_to_one = None,
                "skip_prk_steps" => c.skip_prk_steps = None,
                "clip_sample" => c.clip_sample = None,
                "clip_sample_range" => c.clip_sample_range = None,
                "thresholding" => c.thresholding = None,
                "rescale_betas_zero_snr" => c.rescale_betas_zero_snr = None,
                "use_karras_sigmas" => c.use_karras_sigmas = None,
                "use_exponential_sigmas" => c.use_exponential_sigmas = None,
                "use_beta_sigmas" => c.use_beta_sigmas = None,
                "use_lu_lambdas" => c.use_lu_lambdas = None,
                "use_flow_sigmas" => c.use_flow_sigmas = None,
                "sigma_min" => c.sigma_min = None,
                "sigma_max" => c.sigma_max = None,
                "interpolation_type" => c.interpolation_type = None,
                "timestep_type" => c.timestep_type = None,
                "final_sigmas_type" => c.final_sigmas_type = None,
                "algorithm_type" => c.algorithm_type = None,
                "solver_order" => c.solver_order = None,
                "solver_type" => c.solver_type = None,
                "lower_order_final" => c.lower_order_final = None,
                "euler_at_final" => c.euler_at_final = None,
                "lambda_min_clipped" => c.lambda_min_clipped = None,
                "variance_type" => c.variance_type = None,
                _ => {}
            }
        }
        c
    }

    /// A boolean field by name (for the checks that loop over several).
    fn flag(&self, field: &str) -> Option<bool> {
        match field {
            "use_karras_sigmas" => self.use_karras_sigmas,
            "use_exponential_sigmas" => self.use_exponential_sigmas,
            "use_beta_sigmas" => self.use_beta_sigmas,
            "use_lu_lambdas" => self.use_lu_lambdas,
            "use_flow_sigmas" => self.use_flow_sigmas,
            "thresholding" => self.thresholding,
            "rescale_betas_zero_snr" => self.rescale_betas_zero_snr,
            _ => None,
        }
    }

    /// Errors when a flag this sampler's class takes is set to true, for
    /// options spm does not reproduce.
    fn reject_flags(&self, class: &str, fields: &[&str]) -> Result<()> {
        for &field in fields {
            if self.flag(field).unwrap_or(false) {
                return Err(self.error(
                    field,
                    format!("is true, which spm's {class} does not support"),
                ));
            }
        }
        Ok(())
    }

    /// Errors when a string option this class takes is set to anything but
    /// its default.
    fn reject_other(&self, field: &str, value: Option<&str>, default: &str) -> Result<()> {
        match value {
            Some(v) if v != default => Err(self.error(
                field,
                format!("is {v:?}; spm supports only {default:?} here"),
            )),
            _ => Ok(()),
        }
    }

    fn num_train_timesteps(&self) -> Result<usize> {
        match self.num_train_timesteps.unwrap_or(1000) {
            n if n < 2 => Err(self.error(
                "num_train_timesteps",
                format!("is {n}; it must be at least 2"),
            )),
            n => Ok(n),
        }
    }

    fn prediction(&self, supported: &[Prediction]) -> Result<Prediction> {
        let value = self.prediction_type.as_deref().unwrap_or("epsilon");
        let found = match value {
            "epsilon" => Some(Prediction::Epsilon),
            "v_prediction" => Some(Prediction::Velocity),
            "sample" => Some(Prediction::Sample),
            _ => None,
        };
        match found {
            Some(p) if supported.contains(&p) => Ok(p),
            _ => {
                let names: Vec<&str> = supported.iter().map(|p| p.name()).collect();
                Err(self.error(
                    "prediction_type",
                    format!("is {value:?}; this sampler supports {}", names.join(", ")),
                ))
            }
        }
    }

    fn spacing(&self, default: Spacing) -> Result<Spacing> {
        match self.timestep_spacing.as_deref() {
            None => Ok(default),
            Some("linspace") => Ok(Spacing::Linspace),
            Some("leading") => Ok(Spacing::Leading),
            Some("trailing") => Ok(Spacing::Trailing),
            Some(other) => Err(self.error(
                "timestep_spacing",
                format!("is {other:?}; supported: linspace, leading, trailing"),
            )),
        }
    }

    /// The training noise schedule as the diffusers constructors make it:
    /// betas, optionally rescaled to zero terminal SNR, and their cumulative
    /// alpha product, all `float32`.
    fn alphas_cumprod(&self, rescale_zero_snr: bool) -> Result<Vec<f32>> {
        let n = self.num_train_timesteps()?;
        let mut betas = match &self.trained_betas {
            Some(list) => {
                if list.len() != n {
                    return Err(self.error(
                        "trained_betas",
                        format!("has {} values but num_train_timesteps is {n}", list.len()),
                    ));
                }
                list.iter().map(|&b| b as f32).collect()
            }
            None => {
                let start = self.beta_start.unwrap_or(0.0001);
                let end = self.beta_end.unwrap_or(0.02);
                match self.beta_schedule.as_deref().unwrap_or("linear") {
                    "linear" => torch_linspace(start, end, n),
                    "scaled_linear" => torch_linspace(start.sqrt(), end.sqrt(), n)
                        .into_iter()
                        .map(|b| b * b)
                        .collect(),
                    "squaredcos_cap_v2" => cosine_betas(n),
                    other => {
                        return Err(self.error(
                            "beta_schedule",
                            format!(
                                "is {other:?}; supported: linear, scaled_linear, squaredcos_cap_v2"
                            ),
                        ))
                    }
                }
            }
        };
        if rescale_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        Ok(torch_cumprod(&alphas))
    }
}

/// What the UNet predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prediction {
    Epsilon,
    /// `v_prediction` (Salimans & Ho 2022).
    Velocity,
    Sample,
}

impl Prediction {
    fn name(self) -> &'static str {
        match self {
            Prediction::Epsilon => "epsilon",
            Prediction::Velocity => "v_prediction",
            Prediction::Sample => "sample",
        }
    }
}

/// diffusers' `timestep_spacing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Spacing {
    Linspace,
    Leading,
    Trailing,
}

// ---------------------------------------------------------------- serde ---

/// A flag: JSON `null` is false, as Python's truth test makes it.
fn de_flag<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<bool>, D::Error> {
    Ok(Some(Option::<bool>::deserialize(d)?.unwrap_or(false)))
}

/// A float: a number, `null` (missing), or one of the non-finite words
/// [`quote_non_finite`] turned into strings.
fn de_float<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Float {
        Number(f64),
        Word(String),
    }
    match Option::<Float>::deserialize(d)? {
        None => Ok(None),
        Some(Float::Number(x)) => Ok(Some(x)),
        Some(Float::Word(w)) => match w.as_str() {
            "Infinity" => Ok(Some(f64::INFINITY)),
            "-Infinity" => Ok(Some(f64::NEG_INFINITY)),
            "NaN" => Ok(Some(f64::NAN)),
            _ => Err(serde::de::Error::custom(format!(
                "expected a number, found {w:?}"
            ))),
        },
    }
}

fn de_names<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

/// Python's `json.dumps` writes `-Infinity`, `Infinity` and `NaN` as bare
/// words (diffusers saves `lambda_min_clipped: -Infinity`); JSON has no such
/// tokens, so they are quoted before parsing.
fn quote_non_finite(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains("Infinity") && !text.contains("NaN") {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        } else if let Some(word) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|w| rest.starts_with(w))
        {
            out.push('"');
            out.push_str(word);
            out.push('"');
            rest = &rest[word.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out.into()
}

// ------------------------------------------------- torch float32 schedule ---

/// `torch.linspace(start, end, n, dtype=float32)`: start and end rounded to
/// float, a float step, and each value `start + step*i` (first half) or
/// `end - step*(n-1-i)` (second half) with one rounding, as the multiply-add
/// GCC fuses in torch's AVX2 build.
fn torch_linspace(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                fused_mul_add(step, i as f32, start)
            } else {
                fused_mul_add(-step, (n - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// `torch.cumprod` of a float tensor on the CPU: the running product is a
/// double, rounded to float per element.
fn torch_cumprod(values: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` (cosine, Python doubles, capped at 0.999).
fn cosine_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        let c = ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos();
        c * c
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` (arXiv 2305.08891, Algorithm 1):
/// shifts and scales sqrt(alphas_cumprod) so the last one is exactly 0.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut bar_sqrt: Vec<f32> = torch_cumprod(&alphas).iter().map(|a| a.sqrt()).collect();
    let first = bar_sqrt[0];
    let last = *bar_sqrt.last().unwrap();
    let scale = first / (first - last);
    for v in &mut bar_sqrt {
        *v = (*v - last) * scale;
    }
    let bar: Vec<f32> = bar_sqrt.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

/// sqrt((1 - ᾱ) / ᾱ) per training timestep, in float32.
fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect()
}

// ------------------------------------------------------- numpy float64 ---

/// `np.linspace(start, stop, num)` in float64: `i*step + start`, the last
/// value exactly `stop`.
fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut out: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    out[num - 1] = stop;
    out
}

/// `np.arange(start, 0, -step)` for a float step: ceil(start/step) values,
/// `start + i*delta` with `delta = (start - step) - start`, as numpy fills.
fn np_arange_down(start: f64, step: f64) -> Vec<f64> {
    let len = ((0.0 - start) / -step).ceil().max(0.0) as usize;
    let delta = (start + -step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + -step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.interp(x, arange(len(fp)), fp)` for x in [0, len-1], in float64.
fn np_interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return x;
    }
    if x < 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j] as f64;
    }
    let slope = (fp[j + 1] as f64 - fp[j] as f64) / 1.0;
    slope * (x - j as f64) + fp[j] as f64
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose
/// log-sigma is `sigma`'s, interpolating the float32 `log_sigmas` in float64.
fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // numpy takes the argmax of the cumulative count of `log_sigma >=
    // log_sigmas[i]`: the last index where it holds, else 0.
    let low = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l as f64 >= 0.0)
        .unwrap_or(0)
        .min(log_sigmas.len() - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo as f64 - log_sigma) / (lo - hi) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// Errors unless 1 <= steps <= num_train_timesteps (diffusers' DDIM raises
/// above; the others fail later or sample nonsense); returns the latter.
fn check_steps(config: &SchedulerConfig, steps: usize) -> Result<usize> {
    let train = config.num_train_timesteps()?;
    if steps == 0 {
        return Err(Error::usage(
            "the number of steps must be at least 1 (got 0)",
        ));
    }
    if steps > train {
        return Err(Error::usage(format!(
            "{steps} steps is more than the scheduler's num_train_timesteps ({train}): a \
             model trained on {train} timesteps can be sampled in at most {train} steps"
        )));
    }
    Ok(train)
}

/// Errors when a schedule reaches a timestep outside the training table
/// (where diffusers fails with an IndexError): `steps_offset` with
/// `leading` spacing and as many steps as training timesteps, or PNDM's
/// Runge-Kutta midpoints past the last timestep.
fn check_indices(config: &SchedulerConfig, timesteps: &[i64], train: usize) -> Result<()> {
    if let Some(&bad) = timesteps.iter().find(|&&t| t < 0 || t as usize >= train) {
        let field = match config.steps_offset {
            Some(o) if o != 0 => "steps_offset",
            _ => "timestep_spacing",
        };
        return Err(config.error(
            field,
            format!(
                "gives timestep {bad} with this many steps, outside the {train} training \
                 timesteps"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_words_are_quoted_outside_strings_only() {
        let text = r#"{"a": -Infinity, "b": "NaN Infinity", "c": [NaN, Infinity]}"#;
        assert_eq!(
            quote_non_finite(text),
            r#"{"a": "-Infinity", "b": "NaN Infinity", "c": ["NaN", "Infinity"]}"#
        );
    }

    #[test]
    fn numpy_arange_down_has_numpys_length_and_values() {
        // np.arange(1000, 0, -1000/30) has 30 values, the second 966.666…
        let a = np_arange_down(1000.0, 1000.0 / 30.0);
        assert_eq!(a.len(), 30);
        assert_eq!(a[1], 1000.0 - 1000.0 / 30.0);
    }

    #[test]
    fn sigma_to_t_inverts_the_table_at_its_points() {
        let log_sigmas: Vec<f32> = (0..10).map(|i| i as f32 * 0.5 - 2.0).collect();
        assert_eq!(sigma_to_t((-2.0f64).exp(), &log_sigmas), 0.0);
        assert!((sigma_to_t((0.25f64).exp(), &log_sigmas) - 4.5).abs() < 1e-12);
        assert_eq!(sigma_to_t(1e9, &log_sigmas), 9.0);
    }
}
