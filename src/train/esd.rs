//! ESD — Erasing Concepts from Diffusion Models (rohitgandikota/erasing),
//! as its current script `esd_sd.py` trains it (trainer-methods.md §1.6),
//! with the original CompVis script (§1.3) as [`Variant::CompVis`].
//!
//! The current script: the latent comes from the **frozen** base after k
//! of 50 steps of the model's own sampler with CFG 3, the query timestep
//! is the sampler's k-th (so latent and timestep agree), and the trained
//! prediction for the concept is pulled to `e_from − η(e_erase − e_null)`
//! with η = 2. The CompVis script samples with the *trained* model over a
//! DDIM list whose first timestep is dropped, and queries at a random
//! `t ∈ [20k, 20k+19]` — 39 to 58 steps noisier than the latent — with η = 1.

use candle_core::{DType, Device, Result, Tensor};

use super::{mse, randint, randn, Net, Step, Terms};
use crate::model::noise::TorchRng;
use crate::model::scheduler::{self, SchedulerConfig};
use crate::model::unet::Cond;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// `esd_sd.py` (the authors' current code).
    Diffusers,
    /// `train-scripts/train-esd.py` at the older CompVis commit.
    #[value(name = "compvis")]
    CompVis,
}

pub struct Esd {
    pub variant: Variant,
    pub eta: f64,
    /// The sampling guidance for the trajectory (3).
    pub guidance: f64,
    /// Sampler steps (50).
    pub steps: usize,
    pub latent: (usize, usize),
    /// The model's own scheduler config (the diffusers variant samples
    /// with it, as the pipeline does).
    pub sched: SchedulerConfig,
    /// `[1, …]`: the concept, the concept to erase it from (`None` =
    /// the concept itself), the empty prompt.
    pub concept: Cond,
    pub from: Option<Cond>,
    pub null: Cond,
    /// The unconditional branch of the sampling trajectory when it differs
    /// from `null` (SDXL: zeros, as the pipeline's empty negative prompt).
    pub sample_null: Option<Cond>,
    pub device: Device,
    pub dtype: DType,
}

pub struct Draws {
    pub k: usize,
    /// `[1, 4, h, w]`.
    pub z: Tensor,
    /// The CompVis variant's query timestep.
    pub t_ddpm: usize,
}

/// ᾱ as the LDM code builds it: β in f64, cumulative product in f64, then
/// rounded to f32 (trainer-methods.md §1.3).
pub fn ldm_alphas_cumprod() -> Vec<f32> {
    let (a, b) = (0.00085f64.sqrt(), 0.012f64.sqrt());
    let mut acc = 1.0f64;
    (0..1000)
        .map(|i| {
            let beta = (a + (b - a) * i as f64 / 999.0).powi(2);
            acc *= 1.0 - beta;
            acc as f32
        })
        .collect()
}

impl Esd {
    /// The latent the loss is taken at, and its query timestep.
    pub fn trajectory(
        &self,
        net: &Net,
        d: &Draws,
        each: impl FnMut(usize, &Tensor),
    ) -> Result<(Tensor, f64)> {
        let from = self.from.as_ref().unwrap_or(&self.concept);
        match self.variant {
            Variant::Diffusers => {
                let mut sched = scheduler::build(None, &self.sched, self.steps)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                let t = sched.timesteps()[d.k];
                let x = (&d.z * sched.init_noise_sigma())?;
                let x = net.denoise(
                    false,
                    sched.as_mut(),
                    x,
                    super::Guide {
                        uncond: self.sample_null.as_ref().unwrap_or(&self.null),
                        cond: from,
                        scale: self.guidance,
                        rescale: 0.0,
                    },
                    d.k,
                    each,
                )?;
                Ok((x, t))
            }
            Variant::CompVis => {
                let ac = ldm_alphas_cumprod();
                let tau: Vec<usize> = (0..50).map(|i| 20 * i + 1).collect();
                let mut x = d.z.clone();
                let mut each = each;
                // `timesteps[:-1]`: 981 is dropped; index 48 … 0.
                for index in (0..49).rev() {
                    let ts = tau[index];
                    let a_t = ac[ts] as f64;
                    let a_prev = if index == 0 {
                        ac[0]
                    } else {
                        ac[tau[index - 1]]
                    } as f64;
                    let guide = super::Guide {
                        uncond: &self.null,
                        cond: &self.concept,
                        scale: self.guidance,
                        rescale: 0.0,
                    };
                    let e = net.guided(true, &x, ts as f64, &guide)?;
                    let x0 = ((&x - (&e * (1.0 - a_t).sqrt())?)? / a_t.sqrt())?;
                    x = ((x0 * a_prev.sqrt())? + (e * (1.0 - a_prev).sqrt())?)?;
                    each(48 - index, &x);
                    if d.k > 0 && index + 1 == d.k {
                        break;
                    }
                }
                Ok((x, d.t_ddpm as f64))
            }
        }
    }

    pub fn loss_at(&self, net: &Net, x: &Tensor, t: f64) -> Result<Terms> {
        let from = self.from.as_ref().unwrap_or(&self.concept);
        let mut trace = std::collections::BTreeMap::new();
        let (pred, goal) = match self.variant {
            Variant::Diffusers => {
                let e_erase = net.eps(false, x, t, &self.concept)?;
                let e_null = net.eps(false, x, t, &self.null)?;
                let e_from = match &self.from {
                    Some(f) => net.eps(false, x, t, f)?,
                    None => e_erase.clone(),
                };
                let e_esd = net.eps(true, x, t, from)?;
                let goal = (&e_from - ((&e_erase - &e_null)? * self.eta)?)?;
                trace.insert("e_erase".into(), e_erase);
                trace.insert("e_null".into(), e_null);
                (e_esd, goal)
            }
            Variant::CompVis => {
                let e_0 = net.eps(false, x, t, &self.null)?;
                let e_p = net.eps(false, x, t, &self.concept)?;
                let e_n = net.eps(true, x, t, &self.concept)?;
                let goal = (&e_0 - ((&e_p - &e_0)? * self.eta)?)?;
                trace.insert("e_0".into(), e_0);
                trace.insert("e_p".into(), e_p);
                (e_n, goal)
            }
        };
        let loss = mse(&pred, &goal)?;
        trace.insert("e_esd".into(), pred.detach());
        Ok(Terms {
            parts: vec![("esd", loss.to_dtype(DType::F64)?.to_scalar::<f64>()?)],
            total: loss,
            trace,
        })
    }
}

impl Step for Esd {
    type Draws = Draws;

    fn draw(&self, rng: &mut TorchRng) -> crate::error::Result<Draws> {
        // Both scripts draw k ∈ [0, 49].
        let k = randint(rng, 0, self.steps);
        let t_ddpm = randint(rng, 20 * k, 20 * (k + 1));
        let (h, w) = self.latent;
        let z = randn(rng, &[1, 4, h, w], &self.device, self.dtype)
            .map_err(|e| crate::error::Error::usage(e.to_string()))?;
        Ok(Draws { k, z, t_ddpm })
    }

    fn loss(&self, net: &Net, d: &Draws) -> Result<Terms> {
        let (x, t) = self.trajectory(net, d, |_, _| {})?;
        self.loss_at(net, &x, t)
    }
}
