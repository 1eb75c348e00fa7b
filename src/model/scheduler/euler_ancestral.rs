//! Ancestral Euler (k-diffusion's `sample_euler_ancestral`, eta 1), as
//! diffusers' `EulerAncestralDiscreteScheduler` runs it: an Euler step down
//! to sigma_down, then fresh noise of size sigma_up, with
//! sigma_down² + sigma_up² = sigma_next². The noise is drawn from the
//! pipeline's generator at every step, the last one included (where
//! sigma_up is 0), so the generator's stream stays aligned with diffusers'.

use super::euler::{predict_x0, SigmaSchedule};
use super::{Prediction, Scheduler, SchedulerConfig};
use crate::model::noise::TorchRng;
use crate::Result;

/// diffusers `EulerAncestralDiscreteScheduler`.
pub struct EulerAncestral {
    schedule: SigmaSchedule,
    timesteps_f64: Vec<f64>,
    prediction: Prediction,
}

impl EulerAncestral {
    /// `EulerAncestralDiscreteScheduler.from_config(config)` then
    /// `set_timesteps(steps)`. diffusers does not implement `sample`
    /// prediction for it, so neither does spm.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let config = &config.effective();
        let prediction = config.prediction(&[Prediction::Epsilon, Prediction::Velocity])?;
        let schedule = SigmaSchedule::new(
            config,
            steps,
            config.rescale_betas_zero_snr.unwrap_or(false),
        )?;
        Ok(EulerAncestral {
            timesteps_f64: schedule.timesteps.iter().map(|&t| t as f64).collect(),
            schedule,
            prediction,
        })
    }
}

impl Scheduler for EulerAncestral {
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
        rng: &mut TorchRng,
    ) -> Vec<f32> {
        let sigma = self.schedule.sigmas[step];
        let sigma_to = self.schedule.sigmas[step + 1];
        let (from2, to2) = (sigma * sigma, sigma_to * sigma_to);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let dt = sigma_down - sigma;
        let noise = rng.randn(model_output.len());
        sample
            .iter()
            .zip(model_output)
            .zip(&noise)
            .map(|((&x, &m), &n)| {
                let x0 = predict_x0(self.prediction, sigma, x, m);
                let derivative = (x - x0) / sigma;
                (x + derivative * dt) + n * sigma_up
            })
            .collect()
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], timestep: f64) -> Vec<f32> {
        self.schedule.add_noise(original, noise, timestep)
    }
}
