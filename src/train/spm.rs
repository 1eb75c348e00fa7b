//! SPM with Latent Anchoring, as Con6924/SPM's `train_spm.py` trains it
//! (spm-reference.md §4, trainer-methods.md §3).
//!
//! One step: a DDIM(30) trajectory with the membrane **on** and CFG 3 to a
//! random k; the query timestep `999 − ⌊1000k/30⌋` (≈40 steps off the
//! latent's level, inherited from LECO, kept); frozen positive and
//! neutral predictions; the ESD-style target `e_neu − η(e_pos − e_neu)`;
//! and Latent Anchoring: random text-space anchors whose predictions must
//! not move. The reference batches the anchors interleaved with the empty
//! prompt and then keeps only the second half of that batch (its CFG
//! helper splits it in two), so only half the anchors and as many empty
//! prompts are anchored: that is [`Anchors::Half`], the default;
//! [`Anchors::All`] anchors every one.

use candle_core::{DType, Device, Result, Tensor};

use super::{mse, randint, randn, Net, Step, Terms};
use crate::model::noise::TorchRng;
use crate::model::scheduler::{self, Sampler, SchedulerConfig};
use crate::model::unet::{Added, Cond};

/// One entry of the reference's `prompt.yaml`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Setting {
    pub target: String,
    #[serde(default)]
    pub positive: Option<String>,
    #[serde(default)]
    pub unconditional: Option<String>,
    #[serde(default)]
    pub neutral: Option<String>,
    #[serde(default = "erase_with_la")]
    pub action: Action,
    #[serde(default = "one", deserialize_with = "super::config::de_num")]
    pub guidance_scale: f64,
    #[serde(default = "res512")]
    pub resolution: usize,
    #[serde(default)]
    pub dynamic_resolution: bool,
    #[serde(default = "one_usize")]
    pub batch_size: usize,
    #[serde(default)]
    pub dynamic_crops: bool,
    #[serde(default)]
    pub use_template: bool,
    #[serde(default = "thousand", deserialize_with = "super::config::de_num")]
    pub la_strength: f64,
    #[serde(default = "four")]
    pub sampling_batch_size: usize,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub case_number: usize,
}

fn erase_with_la() -> Action {
    // The reference's own default is `erase`; every shipped config and the
    // demo notebook use `erase_with_la`, which is what `--concept` means.
    Action::EraseWithLa
}
fn one() -> f64 {
    1.0
}
fn one_usize() -> usize {
    1
}
fn res512() -> usize {
    512
}
fn thousand() -> f64 {
    1000.0
}
fn four() -> usize {
    4
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Erase,
    EraseWithLa,
}

impl Setting {
    /// The common case: erase `concept`, map it to `surrogate`.
    pub fn new(concept: &str, surrogate: &str) -> Setting {
        Setting {
            target: concept.into(),
            positive: None,
            unconditional: None,
            neutral: Some(surrogate.into()),
            action: Action::EraseWithLa,
            guidance_scale: 1.0,
            resolution: 512,
            dynamic_resolution: true,
            batch_size: 1,
            dynamic_crops: false,
            use_template: false,
            la_strength: 1000.0,
            sampling_batch_size: 4,
            seed: None,
            case_number: 0,
        }
    }

    pub fn positive(&self) -> &str {
        self.positive.as_deref().unwrap_or(&self.target)
    }

    pub fn unconditional(&self) -> &str {
        self.unconditional.as_deref().unwrap_or("")
    }

    /// The reference: `neutral` defaults to `unconditional`.
    pub fn neutral(&self) -> &str {
        self.neutral.as_deref().unwrap_or(self.unconditional())
    }

    pub fn check(&self) -> std::result::Result<(), String> {
        if self.target.trim().is_empty() {
            return Err("target: the concept to erase is empty".into());
        }
        if self.batch_size == 0 || self.sampling_batch_size == 0 {
            return Err("batch_size and sampling_batch_size must be at least 1".into());
        }
        if !self.sampling_batch_size.is_multiple_of(self.batch_size) {
            return Err(format!(
                "sampling_batch_size {} must be a multiple of batch_size {} (as the reference asks)",
                self.sampling_batch_size, self.batch_size
            ));
        }
        if !self.resolution.is_multiple_of(8) || self.resolution == 0 {
            return Err(format!(
                "resolution {} is not a positive multiple of 8",
                self.resolution
            ));
        }
        if !self.guidance_scale.is_finite() || !self.la_strength.is_finite() {
            return Err("guidance_scale and la_strength must be finite numbers".into());
        }
        Ok(())
    }
}

/// Which anchors the anchoring loss sees (see the module doc).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Anchors {
    /// The reference's quirk: the second half of `[u, a1, u, a2, …]`.
    Half,
    /// Every anchor, no empty prompts.
    All,
}

/// A setting's conditionings `[1, …]` (SDXL: with pooled embeddings).
pub struct Embeds {
    pub target: Cond,
    pub positive: Cond,
    pub neutral: Cond,
    pub uncond: Cond,
}

/// Every random choice of one SPM step.
pub struct Draws {
    pub pair: usize,
    pub k: usize,
    /// `[B, 4, h, w]`.
    pub z: Tensor,
    /// `[S, 1, 77, D]` raw normal draws and their scales in `[0.8, 1.2)`.
    pub anchor_noise: Tensor,
    pub anchor_scale: Vec<f64>,
    /// SDXL (`sample_xl`): the pooled anchors' draws `[S, P]` and scales,
    /// drawn after the text anchors, and the step's six size ids.
    pub pooled_noise: Option<Tensor>,
    pub pooled_scale: Vec<f64>,
    pub time_ids: Option<Vec<f32>>,
}

pub struct Spm {
    pub settings: Vec<Setting>,
    pub embeds: Vec<Embeds>,
    pub anchors: Anchors,
    /// `max_denoising_steps` (30).
    pub steps: usize,
    /// The fresh DDIM the reference builds (`create_noise_scheduler`).
    pub sched: SchedulerConfig,
    /// `guidance_rescale` of the trajectory: 0.7 in `train_spm_xl.py`'s
    /// `diffusion_xl`, none in `train_spm.py`.
    pub rescale: f64,
    pub device: Device,
    pub dtype: DType,
}

/// The reference's training scheduler: diffusers `DDIMScheduler` with SD's
/// betas, `clip_sample=False` and the class defaults otherwise
/// (`steps_offset` 0, `set_alpha_to_one` true, leading spacing).
pub fn reference_ddim(prediction_type: &str) -> crate::error::Result<SchedulerConfig> {
    SchedulerConfig::from_json(&format!(
        r#"{{"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "clip_sample": false,
            "prediction_type": "{prediction_type}"}}"#
    ))
}

impl Spm {
    /// `t = timesteps_1000[⌊k·1000/N⌋] = 999 − ⌊1000k/N⌋`.
    pub fn query_timestep(&self, k: usize) -> f64 {
        (999 - (k * 1000) / self.steps) as f64
    }

    /// The latent after `k` DDIM steps with the membrane on, CFG 3
    /// (`each` sees every intermediate latent).
    pub fn trajectory(
        &self,
        net: &Net,
        d: &Draws,
        each: impl FnMut(usize, &Tensor),
    ) -> Result<Tensor> {
        let e = &self.embeds[d.pair];
        let b = d.z.dim(0)?;
        let mut sched = scheduler::build(Some(Sampler::Ddim), &self.sched, self.steps)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let x = (&d.z * sched.init_noise_sigma())?;
        let ids = d.time_ids.as_deref();
        let (u, c) = (
            e.uncond.with_time_ids(ids)?.repeat(b)?,
            e.target.with_time_ids(ids)?.repeat(b)?,
        );
        let guide = super::Guide {
            uncond: &u,
            cond: &c,
            scale: 3.0,
            rescale: self.rescale,
        };
        net.denoise(true, sched.as_mut(), x, guide, d.k, each)
    }

    /// The loss at latent `x` (the trajectory's end) for the draws `d`.
    pub fn loss_at(&self, net: &Net, d: &Draws, x: &Tensor) -> Result<Terms> {
        let s = &self.settings[d.pair];
        let e = &self.embeds[d.pair];
        let b = x.dim(0)?;
        let t = self.query_timestep(d.k);
        let ids = d.time_ids.as_deref();
        let rep = |c: &Cond, n: usize| c.with_time_ids(ids)?.repeat(n);
        let e_pos = net.eps(false, x, t, &rep(&e.positive, b)?)?;
        let e_neu = net.eps(false, x, t, &rep(&e.neutral, b)?)?;
        let e_tar = net.eps(true, x, t, &rep(&e.target, b)?)?;
        let goal = (&e_neu - ((&e_pos - &e_neu)? * s.guidance_scale)?)?;
        let l_erase = mse(&e_tar, &goal)?;
        let mut trace = std::collections::BTreeMap::new();
        let mut parts = vec![("erase", l_erase.to_dtype(DType::F64)?.to_scalar::<f64>()?)];
        let mut total = l_erase;
        if s.action == Action::EraseWithLa {
            let anchors = self.anchors(d, &e.target.ctx)?;
            let sn = anchors.dim(0)?;
            // The anchor batch, `[u, a1, u, a2, …]` halved, or the anchors.
            let assemble = |u: &Tensor, a: &Tensor| -> Result<Tensor> {
                match self.anchors {
                    Anchors::Half => {
                        let mut list = Vec::with_capacity(2 * sn);
                        for i in 0..sn {
                            list.push(u.clone());
                            list.push(a.get(i)?);
                        }
                        Tensor::cat(&list[sn..], 0)
                    }
                    Anchors::All => a.squeeze(1),
                }
            };
            let ctx = assemble(&e.uncond.ctx, &anchors)?;
            let n = ctx.dim(0)?;
            // SDXL: pooled anchors drawn on their own and batched the same
            // way beside the text anchors (`sample_xl`).
            let added = match (&e.uncond.added, &e.target.added) {
                (Some(ua), Some(ta)) => {
                    let pooled = self.pooled_anchors(d, &ta.text_embeds)?;
                    let text_embeds = assemble(&ua.text_embeds, &pooled)?;
                    trace.insert("pooled_anchors".into(), pooled);
                    Some(Added {
                        text_embeds,
                        time_ids: ua.time_ids.repeat((n, 1))?,
                    })
                }
                _ => None,
            };
            // The step's size ids on every row, as the other predictions.
            let batch = Cond { ctx, added }.with_time_ids(ids)?;
            let xs = x.repeat((n / b, 1, 1, 1))?;
            let a_on = net.eps(true, &xs, t, &batch)?;
            let a_off = net.eps(false, &xs, t, &batch)?;
            let l_anchor = mse(&a_on, &a_off)?;
            parts.push(("anchor", l_anchor.to_dtype(DType::F64)?.to_scalar::<f64>()?));
            total = (total + (l_anchor * s.la_strength)?)?;
            trace.insert("anchors".into(), anchors);
            trace.insert("a_on".into(), a_on.detach());
            trace.insert("a_off".into(), a_off);
        }
        trace.insert("e_pos".into(), e_pos);
        trace.insert("e_neu".into(), e_neu);
        trace.insert("e_tar".into(), e_tar.detach());
        Ok(Terms {
            total,
            parts,
            trace,
        })
    }

    /// `aᵢ = sᵢ·nᵢ/‖nᵢ‖·‖target‖` (`sampling.py`).
    pub fn anchors(&self, d: &Draws, target: &Tensor) -> Result<Tensor> {
        scaled_anchors(&d.anchor_noise, &d.anchor_scale, target)
    }

    /// SDXL's pooled anchors `[S, 1, P]`, the same rule on the pooled
    /// target.
    pub fn pooled_anchors(&self, d: &Draws, target: &Tensor) -> Result<Tensor> {
        let noise = d
            .pooled_noise
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("SDXL draws without pooled anchors".into()))?;
        scaled_anchors(&noise.unsqueeze(1)?, &d.pooled_scale, target)
    }
}

fn scaled_anchors(noise: &Tensor, scale: &[f64], target: &Tensor) -> Result<Tensor> {
    let norm = |t: &Tensor| -> Result<f64> {
        t.to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .sqrt()?
            .to_scalar::<f64>()
    };
    let tn = norm(target)?;
    let mut out = Vec::new();
    for (i, s) in scale.iter().enumerate() {
        let n = noise.get(i)?;
        let nn = norm(&n)?;
        out.push(((n / nn)? * (tn * s))?);
    }
    Tensor::stack(&out, 0)
}

/// `sample`'s rejection draw: a normal vector accepted with probability
/// `1 − cos(target, n)`, and its scale in `[0.8, 1.2)`.
fn draw_anchor(rng: &mut TorchRng, target: &[f32]) -> (Vec<f32>, f64) {
    let tn = target
        .iter()
        .map(|v| (*v as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let n = loop {
        let n = rng.randn(target.len());
        let dot: f64 = n
            .iter()
            .zip(target)
            .map(|(a, b)| *a as f64 * *b as f64)
            .sum();
        let nn = n.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
        let cos = dot / (nn * tn).max(1e-30);
        if (rng.rand(1)[0] as f64) < 1.0 - cos {
            break n;
        }
    };
    (n, 0.8 + 0.4 * rng.rand(1)[0] as f64)
}

impl Spm {
    /// The six size ids of `get_add_time_ids` at `(h, w)`: with
    /// `dynamic_crops`, an original size 1–3× larger and a random crop.
    fn time_ids(rng: &mut TorchRng, (h, w): (usize, usize), dynamic_crops: bool) -> Vec<f32> {
        if !dynamic_crops {
            return vec![h as f32, w as f32, 0.0, 0.0, h as f32, w as f32];
        }
        let scale = rng.rand(1)[0] as f64 * 2.0 + 1.0;
        let (oh, ow) = ((h as f64 * scale) as usize, (w as f64 * scale) as usize);
        let top = randint(rng, 0, oh - h + 1);
        let left = randint(rng, 0, ow - w + 1);
        vec![
            oh as f32,
            ow as f32,
            top as f32,
            left as f32,
            h as f32,
            w as f32,
        ]
    }
}

impl Step for Spm {
    type Draws = Draws;

    fn draw(&self, rng: &mut TorchRng) -> crate::error::Result<Draws> {
        let map = |e: candle_core::Error| crate::error::Error::usage(e.to_string());
        let pair = randint(rng, 0, self.settings.len());
        let s = &self.settings[pair];
        let k = randint(rng, 1, self.steps);
        // `get_random_resolution_in_bucket`: multiples of 64 from half the
        // resolution up to (not including) the resolution.
        let (h, w) = if s.dynamic_resolution {
            // (At least one step of 64, so a tiny test resolution stays valid.)
            let lo = (s.resolution / 128).max(1);
            let hi = (s.resolution / 64).max(lo + 1);
            (64 * randint(rng, lo, hi), 64 * randint(rng, lo, hi))
        } else {
            (s.resolution, s.resolution)
        };
        let z = randn(
            rng,
            &[s.batch_size, 4, h / 8, w / 8],
            &self.device,
            self.dtype,
        )
        .map_err(map)?;
        let e = &self.embeds[pair];
        let time_ids = e
            .target
            .added
            .as_ref()
            .map(|_| Self::time_ids(rng, (h, w), s.dynamic_crops));
        let sn = s.sampling_batch_size;
        // Accept with probability 1 − cos(target, n) (always, in effect).
        let mut draw_all = |target: &Tensor| -> crate::error::Result<(Vec<f32>, Vec<f64>)> {
            let target = super::flat(target).map_err(map)?;
            let mut noise = Vec::with_capacity(sn * target.len());
            let mut scale = Vec::with_capacity(sn);
            for _ in 0..sn {
                let (n, sc) = draw_anchor(rng, &target);
                noise.extend_from_slice(&n);
                scale.push(sc);
            }
            Ok((noise, scale))
        };
        let (noise, scale) = draw_all(&e.target.ctx)?;
        let dims = e.target.ctx.dims().to_vec();
        let anchor_noise = Tensor::from_vec(noise, (sn, 1, dims[1], dims[2]), &self.device)
            .and_then(|t| t.to_dtype(self.dtype))
            .map_err(map)?;
        let (pooled_noise, pooled_scale) = match &e.target.added {
            Some(a) => {
                let (noise, scale) = draw_all(&a.text_embeds)?;
                let p = a.text_embeds.dim(1).map_err(map)?;
                let t = Tensor::from_vec(noise, (sn, p), &self.device)
                    .and_then(|t| t.to_dtype(self.dtype))
                    .map_err(map)?;
                (Some(t), scale)
            }
            None => (None, Vec::new()),
        };
        Ok(Draws {
            pair,
            k,
            z,
            anchor_noise,
            anchor_scale: scale,
            pooled_noise,
            pooled_scale,
            time_ids,
        })
    }

    fn loss(&self, net: &Net, d: &Draws) -> Result<Terms> {
        let x = self.trajectory(net, d, |_, _| {})?;
        self.loss_at(net, d, &x)
    }
}
