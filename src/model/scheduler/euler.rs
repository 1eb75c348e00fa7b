//! Euler's method on the probability-flow ODE in Karras et al.'s sigma
//! parametrisation (arXiv 2206.00364, Algorithm 2 without churn), as
//! diffusers' `EulerDiscreteScheduler` runs it: timesteps are fractional
//! (float32), sigmas are linearly interpolated from the training table in
//! float64 and then rounded to float32, and the UNet input is divided by
//! sqrt(sigma² + 1).

use super::{
    check_steps, np_arange_down, np_interp, np_linspace, train_sigmas, Prediction, Scheduler,
    SchedulerConfig, Spacing,
};
use crate::model::noise::TorchRng;
use crate::Result;

/// The timesteps and sigmas (one more, a final 0) both Euler samplers use.
pub(super) struct SigmaSchedule {
    pub timesteps: Vec<f32>,
    pub sigmas: Vec<f32>,
    pub init_noise_sigma: f32,
}

impl SigmaSchedule {
    /// diffusers' Euler `set_timesteps` with linear interpolation and
    /// neither Karras, exponential nor beta sigmas.
    pub(super) fn new(
        config: &SchedulerConfig,
        steps: usize,
        rescale_zero_snr: bool,
    ) -> Result<Self> {
        let train = check_steps(config, steps)?;
        let spacing = config.spacing(Spacing::Linspace)?;
        let mut alphas_cumprod = config.alphas_cumprod(rescale_zero_snr)?;
        if rescale_zero_snr {
            // diffusers keeps the last sigma finite.
            *alphas_cumprod.last_mut().unwrap() = 2f32.powi(-24);
        }
        let offset = config.steps_offset.unwrap_or(0) as f32;
        let timesteps: Vec<f32> = match spacing {
            Spacing::Linspace => np_linspace(0.0, (train - 1) as f64, steps)
                .iter()
                .rev()
                .map(|&t| t as f32)
                .collect(),
            Spacing::Leading => {
                let ratio = train / steps;
                (0..steps)
                    .rev()
                    .map(|i| (i * ratio) as f32 + offset)
                    .collect()
            }
            Spacing::Trailing => np_arange_down(train as f64, train as f64 / steps as f64)
                .iter()
                .map(|t| t.round_ties_even() as f32 - 1.0)
                .collect(),
        };
        let table = train_sigmas(&alphas_cumprod);
        let mut sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| np_interp(t as f64, &table) as f32)
            .collect();
        sigmas.push(0.0);
        let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match spacing {
            Spacing::Linspace | Spacing::Trailing => max,
            Spacing::Leading => (max * max + 1.0).sqrt(),
        };
        Ok(SigmaSchedule {
            timesteps,
            sigmas,
            init_noise_sigma,
        })
    }

    /// diffusers' `index_for_timestep`: the position of `timestep` (compared
    /// as a float32, like the timestep tensor), the second if it repeats.
    pub(super) fn index_of(&self, timestep: f64) -> usize {
        let hits: Vec<usize> = (0..self.timesteps.len())
            .filter(|&i| self.timesteps[i] == timestep as f32)
            .collect();
        match hits.len() {
            0 => panic!("timestep {timestep} is not one of this scheduler's timesteps"),
            1 => hits[0],
            _ => hits[1],
        }
    }

    /// sample / sqrt(sigma² + 1).
    pub(super) fn scale(&self, sample: &[f32], step: usize) -> Vec<f32> {
        let sigma = self.sigmas[step];
        let d = (sigma * sigma + 1.0).sqrt();
        sample.iter().map(|&x| x / d).collect()
    }

    /// original + noise · sigma(timestep).
    pub(super) fn add_noise(&self, original: &[f32], noise: &[f32], timestep: f64) -> Vec<f32> {
        let sigma = self.sigmas[self.index_of(timestep)];
        original
            .iter()
            .zip(noise)
            .map(|(&x, &n)| x + n * sigma)
            .collect()
    }
}

/// The denoised estimate x₀ from the model output at sigma (epsilon,
/// v-prediction or sample), in diffusers' float32 order of operations.
pub(super) fn predict_x0(prediction: Prediction, sigma: f32, sample: f32, output: f32) -> f32 {
    match prediction {
        Prediction::Epsilon => sample - sigma * output,
        Prediction::Velocity => {
            let s2 = sigma * sigma + 1.0;
            output * (-sigma / s2.sqrt()) + sample / s2
        }
        Prediction::Sample => output,
    }
}

/// diffusers `EulerDiscreteScheduler` (no churn, linear interpolation).
pub struct Euler {
    schedule: SigmaSchedule,
    timesteps_f64: Vec<f64>,
    prediction: Prediction,
}

impl Euler {
    /// `EulerDiscreteScheduler.from_config(config)` then
    /// `set_timesteps(steps)`. Karras, exponential and beta sigmas are
    /// rejected (the `euler` sampler is the plain schedule).
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let config = &config.effective();
        config.reject_flags("Euler", &["use_exponential_sigmas", "use_beta_sigmas"])?;
        config.reject_other(
            "interpolation_type",
            config.interpolation_type.as_deref(),
            "linear",
        )?;
        config.reject_other("timestep_type", config.timestep_type.as_deref(), "discrete")?;
        config.reject_other(
            "final_sigmas_type",
            config.final_sigmas_type.as_deref(),
            "zero",
        )?;
        let prediction = config.prediction(&[
            Prediction::Epsilon,
            Prediction::Velocity,
            Prediction::Sample,
        ])?;
        let schedule = SigmaSchedule::new(
            config,
            steps,
            config.rescale_betas_zero_snr.unwrap_or(false),
        )?;
        Ok(Euler {
            timesteps_f64: schedule.timesteps.iter().map(|&t| t as f64).collect(),
            schedule,
            prediction,
        })
    }
}

impl Scheduler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps_f64
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma as f64
    }

    fn scale_model_input(&self, sample: &[f32], step: usize) -> Vec<f32> {
        self.schedule.scale(sample, step)
    }

    fn step(
        &mut self,
        model_output: &[f32],
        step: usize,
        sample: &[f32],
        _rng: &mut TorchRng,
    ) -> Vec<f32> {
        // No churn (s_churn 0): sigma_hat = sigma, no noise drawn.
        let sigma = self.schedule.sigmas[step];
        let dt = self.schedule.sigmas[step + 1] - sigma;
        sample
            .iter()
            .zip(model_output)
            .map(|(&x, &m)| {
                let x0 = predict_x0(self.prediction, sigma, x, m);
                let derivative = (x - x0) / sigma;
                x + derivative * dt
            })
            .collect()
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], timestep: f64) -> Vec<f32> {
        self.schedule.add_noise(original, noise, timestep)
    }
}
