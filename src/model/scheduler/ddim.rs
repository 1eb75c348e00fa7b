//! DDIM (Song et al. 2020, arXiv 2010.02502) with eta 0, as diffusers'
//! `DDIMScheduler` runs it: deterministic, the predicted x₀ optionally
//! clipped, the previous timestep always `t - N // steps` (even where
//! `trailing` spacing makes the real gap another).

use super::{
    check_indices, check_steps, np_arange_down, np_linspace, Prediction, Scheduler,
    SchedulerConfig, Spacing,
};
use crate::model::noise::TorchRng;
use crate::Result;

/// diffusers `DDIMScheduler`, eta 0.
pub struct Ddim {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<i64>,
    timesteps_f64: Vec<f64>,
    step_gap: i64,
    prediction: Prediction,
    clip: Option<f32>,
}

impl Ddim {
    /// `DDIMScheduler.from_config(config)` then `set_timesteps(steps)`.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let config = &config.effective();
        config.reject_flags("DDIM", &["thresholding"])?;
        let train = check_steps(config, steps)?;
        let prediction = config.prediction(&[
            Prediction::Epsilon,
            Prediction::Velocity,
            Prediction::Sample,
        ])?;
        let spacing = config.spacing(Spacing::Leading)?;
        let alphas_cumprod =
            config.alphas_cumprod(config.rescale_betas_zero_snr.unwrap_or(false))?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let offset = config.steps_offset.unwrap_or(0);
        let timesteps: Vec<i64> = match spacing {
            Spacing::Linspace => np_linspace(0.0, (train - 1) as f64, steps)
                .iter()
                .rev()
                .map(|t| t.round_ties_even() as i64)
                .collect(),
            Spacing::Leading => {
                let ratio = train / steps;
                (0..steps)
                    .rev()
                    .map(|i| (i * ratio) as i64 + offset)
                    .collect()
            }
            Spacing::Trailing => np_arange_down(train as f64, train as f64 / steps as f64)
                .iter()
                .map(|t| t.round_ties_even() as i64 - 1)
                .collect(),
        };
        check_indices(config, &timesteps, train)?;
        let clip = if config.clip_sample.unwrap_or(true) {
            let range = config.clip_sample_range.unwrap_or(1.0);
            if range.is_nan() || range < 0.0 {
                return Err(config.error(
                    "clip_sample_range",
                    format!("is {range}; it must be a number of at least 0"),
                ));
            }
            Some(range as f32)
        } else {
            None
        };
        Ok(Ddim {
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps_f64: timesteps.iter().map(|&t| t as f64).collect(),
            timesteps,
            step_gap: (train / steps) as i64,
            prediction,
            clip,
        })
    }

    fn alpha_at(&self, t: i64) -> f32 {
        if t >= 0 {
            self.alphas_cumprod[t as usize]
        } else {
            self.final_alpha_cumprod
        }
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps_f64
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &[f32], _step: usize) -> Vec<f32> {
        sample.to_vec()
    }

    fn step(
        &mut self,
        model_output: &[f32],
        step: usize,
        sample: &[f32],
        _rng: &mut TorchRng,
    ) -> Vec<f32> {
        let t = self.timesteps[step];
        let alpha_t = self.alpha_at(t);
        let alpha_prev = self.alpha_at(t - self.step_gap);
        let beta_t = 1.0 - alpha_t;
        let (sqrt_alpha, sqrt_beta) = (alpha_t.sqrt(), beta_t.sqrt());
        // With eta 0 the noise term vanishes and the direction to x_t is
        // sqrt(1 - alpha_prev) times the predicted noise.
        let sqrt_alpha_prev = alpha_prev.sqrt();
        let direction = (1.0 - alpha_prev - 0.0).sqrt();
        let clip = self.clip;
        sample
            .iter()
            .zip(model_output)
            .map(|(&x, &m)| {
                let (x0, eps) = match self.prediction {
                    Prediction::Epsilon => ((x - sqrt_beta * m) / sqrt_alpha, m),
                    Prediction::Sample => (m, (x - sqrt_alpha * m) / sqrt_beta),
                    Prediction::Velocity => (
                        sqrt_alpha * x - sqrt_beta * m,
                        sqrt_alpha * m + sqrt_beta * x,
                    ),
                };
                let x0 = match clip {
                    Some(r) => x0.clamp(-r, r),
                    None => x0,
                };
                sqrt_alpha_prev * x0 + direction * eps
            })
            .collect()
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], timestep: f64) -> Vec<f32> {
        let alpha = self.alphas_cumprod[timestep as usize];
        add_noise_alpha(alpha, original, noise)
    }
}

/// `sqrt(ᾱ)·x + sqrt(1-ᾱ)·noise` in float32 (DDIM, PNDM).
pub(super) fn add_noise_alpha(alpha: f32, original: &[f32], noise: &[f32]) -> Vec<f32> {
    let (a, b) = (alpha.sqrt(), (1.0 - alpha).sqrt());
    original
        .iter()
        .zip(noise)
        .map(|(&x, &n)| a * x + b * n)
        .collect()
}
