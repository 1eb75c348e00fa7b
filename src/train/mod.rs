//! `spm train`: erasers trained in process, three methods from the
//! literature on one loop.
//!
//! A method file ([`spm`], [`esd`], [`fmn`]) holds only what differs — its
//! trainable set, its random draws and its loss; the loop, the optimiser,
//! the LR schedule, checkpoints and the output files live here once
//! ([`optim`], [`schedule`], [`checkpoint`], [`output`]). Every method
//! splits a step into `draw` (all randomness, from one seeded generator
//! per step, so a resumed run repeats the draws it would have made) and
//! `loss` (deterministic given the draws), which is what lets the tests
//! inject the draws of a torch reference and compare every term.
//!
//! The networks are `model::`'s, the same code `spm generate` runs: the
//! trained factors or weights are [`Var`](candle_core::Var)s inside the
//! UNet ([`crate::model::nn::Trainables`]), frozen layers pass gradients to
//! their inputs only, attention recomputes its maps in the backward pass
//! ([`crate::model::autograd`]).

pub mod checkpoint;
pub mod config;
pub mod esd;
pub mod fmn;
pub mod optim;
pub mod output;
pub mod run;
pub mod schedule;
pub mod spm;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Result, Tensor};

use crate::model::nn::{AttnProbe, Mix, Rows};
use crate::model::noise::TorchRng;
use crate::model::scheduler::Scheduler;
use crate::model::unet::{Cond, UNet};

/// `spm train --method`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// SPM with Latent Anchoring (Con6924/SPM `train_spm.py`).
    #[value(name = "spm")]
    Spm,
    /// ESD-x: cross-attention (`attn2`) layers (`esd_sd.py`).
    #[value(name = "esd-x")]
    EsdX,
    /// ESD-u: every Linear/Conv2d outside cross-attention.
    #[value(name = "esd-u")]
    EsdU,
    /// ESD on every Linear/Conv2d of the UNet.
    #[value(name = "esd-all")]
    EsdAll,
    /// ESD on the cross-attention key and value projections only.
    #[value(name = "esd-x-strict")]
    EsdXStrict,
    /// Forget-Me-Not attention re-steering (SHI-Labs `train_attn.py`).
    #[value(name = "fmn")]
    Fmn,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Spm => "spm",
            Method::EsdX => "esd-x",
            Method::EsdU => "esd-u",
            Method::EsdAll => "esd-all",
            Method::EsdXStrict => "esd-x-strict",
            Method::Fmn => "fmn",
        }
    }

    /// The layers the method trains on an SD1/SD2 UNet, by dotted diffusers
    /// module path (trainer-methods.md §1.2 table C, §2.5, spm-reference
    /// §1.2).
    pub fn selects(self, path: &str) -> bool {
        self.selects_in(path, false)
    }

    /// The same for SDXL when `xl`: `esd_sdxl.py` narrows ESD-u and ESD-all
    /// to layers inside a block (`block` in the name) and outside every
    /// embedding (`emb`: the time and text-time embeddings and each
    /// resnet's `time_emb_proj`), trainer-methods.md §1.2.
    pub fn selects_in(self, path: &str, xl: bool) -> bool {
        if xl {
            match self {
                Method::EsdU => {
                    return !path.contains("attn2")
                        && !path.contains("emb")
                        && path.contains("block")
                }
                Method::EsdAll => return !path.contains("emb") && path.contains("block"),
                _ => {}
            }
        }
        match self {
            // Every Linear/Conv2d inside a Transformer2DModel.
            Method::Spm => path.contains(".attentions."),
            Method::EsdX | Method::Fmn => path.contains("attn2"),
            Method::EsdU => !path.contains("attn2"),
            Method::EsdAll => true,
            Method::EsdXStrict => path.contains("attn2.to_k") || path.contains("attn2.to_v"),
        }
    }
}

/// The UNets one step calls: the frozen base and the trained one (the same
/// network when the trained part is a LoRA, switched by [`Rows`]).
pub struct Net<'a> {
    pub base: &'a UNet,
    pub trained: &'a UNet,
    /// The trained part is a factor set (on/off by rows), not full weights.
    pub lora: bool,
    pub device: Device,
    pub dtype: DType,
}

impl<'a> Net<'a> {
    fn rows(&self, on: bool, b: usize) -> Result<Rows> {
        if on && self.lora {
            Rows::new(Mix::Delta, &[vec![1.0; b]], &self.device)
        } else {
            Ok(Rows::none())
        }
    }

    fn unet(&self, on: bool) -> &UNet {
        if on {
            self.trained
        } else {
            self.base
        }
    }

    fn timesteps(&self, t: f64, b: usize) -> Result<Tensor> {
        Tensor::from_vec(vec![t as f32; b], b, &self.device)
    }

    /// ε(x, t, c) with the trained part on or off; `c` rows pair with
    /// `x` rows. An "off" prediction is detached (no graph kept).
    pub fn eps(&self, on: bool, x: &Tensor, t: f64, c: &Cond) -> Result<Tensor> {
        let b = x.dim(0)?;
        let out = self
            .unet(on)
            .forward_cond(x, &self.timesteps(t, b)?, c, &self.rows(on, b)?)?;
        Ok(if on { out } else { out.detach() })
    }

    /// The trained network with Forget-Me-Not's probe on its `attn2` maps.
    pub fn eps_probed(
        &self,
        x: &Tensor,
        t: f64,
        c: &Cond,
        probe: std::sync::Arc<AttnProbe>,
    ) -> Result<Tensor> {
        let b = x.dim(0)?;
        let rows = self.rows(true, b)?.with_probe(probe);
        self.trained
            .forward_cond(x, &self.timesteps(t, b)?, c, &rows)
    }

    /// Classifier-free guidance as the references batch it: `[x, x]` with
    /// `[uncond, cond]`, then `u + g·(c − u)`, and — where `rescale` > 0,
    /// as `train_spm_xl.py`'s `predict_noise_xl` (0.7) — diffusers'
    /// `rescale_noise_cfg`. Detached: trajectories are sampled without
    /// gradients in every reference.
    pub fn guided(&self, on: bool, x: &Tensor, t: f64, guide: &Guide) -> Result<Tensor> {
        let b = x.dim(0)?;
        let xx = Tensor::cat(&[x, x], 0)?;
        let c = Cond::cat(&[guide.uncond, guide.cond])?;
        let out = self
            .unet(on)
            .forward_cond(&xx, &self.timesteps(t, 2 * b)?, &c, &self.rows(on, 2 * b)?)?
            .detach();
        let u = out.narrow(0, 0, b)?;
        let c = out.narrow(0, b, b)?;
        let cfg = (&u + ((&c - &u)? * guide.scale)?)?;
        if guide.rescale == 0.0 {
            return Ok(cfg);
        }
        rescale_noise_cfg(&cfg, &c, guide.rescale)
    }

    /// Run `sched` over its first `steps` timesteps from `x` with CFG
    /// `guide` (the trajectories of SPM, ESD and the data-free FMN images).
    pub fn denoise(
        &self,
        on: bool,
        sched: &mut dyn Scheduler,
        x: Tensor,
        guide: Guide,
        steps: usize,
        mut each: impl FnMut(usize, &Tensor),
    ) -> Result<Tensor> {
        let shape = x.dims().to_vec();
        let mut x = x;
        let mut rng = TorchRng::manual_seed(0);
        let ts: Vec<f64> = sched.timesteps().to_vec();
        for (i, &t) in ts.iter().enumerate().take(steps) {
            let cur = flat(&x)?;
            let xin = Tensor::from_vec(
                sched.scale_model_input(&cur, i),
                shape.clone(),
                &self.device,
            )?
            .to_dtype(self.dtype)?;
            let e = self.guided(on, &xin, t, &guide)?;
            let next = sched.step(&flat(&e)?, i, &cur, &mut rng);
            x = Tensor::from_vec(next, shape.clone(), &self.device)?.to_dtype(self.dtype)?;
            each(i, &x);
        }
        Ok(x)
    }
}

/// Classifier-free guidance: `u + scale·(c − u)`, optionally rescaled.
pub struct Guide<'a> {
    pub uncond: &'a Cond,
    pub cond: &'a Cond,
    pub scale: f64,
    /// diffusers' `guidance_rescale` (0 = off).
    pub rescale: f64,
}

/// diffusers' `rescale_noise_cfg`: the guided prediction scaled per sample
/// to the text prediction's standard deviation (torch's unbiased `std`
/// over every dimension but the batch), mixed `φ·rescaled + (1 − φ)·cfg`.
pub fn rescale_noise_cfg(cfg: &Tensor, text: &Tensor, phi: f64) -> Result<Tensor> {
    let std = |t: &Tensor| -> Result<Tensor> {
        let b = t.dim(0)?;
        let f = t.flatten_from(1)?;
        let n = f.dim(1)?;
        let mean = f.mean_keepdim(1)?;
        let var = (f.broadcast_sub(&mean)?.sqr()?.sum_keepdim(1)? / (n as f64 - 1.0))?;
        var.sqrt()?.reshape((b, 1, 1, 1))
    };
    let ratio = (std(text)? / std(cfg)?)?;
    let rescaled = cfg.broadcast_mul(&ratio)?;
    (rescaled * phi)? + (cfg * (1.0 - phi))?
}

/// A tensor's values as f32 (schedulers work on flat f32 latents).
pub fn flat(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// `torch.nn.MSELoss()`: the mean over every element.
pub fn mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    (a - b)?.sqr()?.mean_all()
}

/// One step's loss, its named terms, and (for tests) the intermediates.
pub struct Terms {
    pub total: Tensor,
    pub parts: Vec<(&'static str, f64)>,
    pub trace: BTreeMap<String, Tensor>,
}

impl Terms {
    pub fn value(&self) -> Result<f64> {
        self.total.to_dtype(DType::F64)?.to_scalar::<f64>()
    }
}

/// What the loop needs from a method.
pub trait Step {
    type Draws;
    /// Every random choice of one step.
    fn draw(&self, rng: &mut TorchRng) -> crate::error::Result<Self::Draws>;
    /// The loss for those draws.
    fn loss(&self, net: &Net, d: &Self::Draws) -> Result<Terms>;
}

/// `lo + ⌊u·(hi − lo)⌋`: an integer in `[lo, hi)`.
pub fn randint(rng: &mut TorchRng, lo: usize, hi: usize) -> usize {
    let u = rng.rand(1)[0] as f64;
    (lo + (u * (hi - lo) as f64) as usize).min(hi - 1)
}

/// A `[n…]` tensor of standard normal draws on `dev` in `dtype`.
pub fn randn(rng: &mut TorchRng, shape: &[usize], dev: &Device, dtype: DType) -> Result<Tensor> {
    let n = shape.iter().product();
    Tensor::from_vec(rng.randn(n), shape.to_vec(), dev)?.to_dtype(dtype)
}

/// The generator for step `step` of a run seeded `seed` (torch seeds from
/// the low 32 bits, so the two are mixed there).
pub fn step_rng(seed: u64, step: usize) -> TorchRng {
    let mut z = seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    TorchRng::manual_seed((z ^ (z >> 31)) & 0xFFFF_FFFF)
}
