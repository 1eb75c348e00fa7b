//! DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095): a second-order
//! multistep solver in log-SNR time on the data prediction x₀, as diffusers'
//! `DPMSolverMultistepScheduler` runs it with `algorithm_type="dpmsolver++"`,
//! `solver_order=2`, `solver_type="midpoint"`. The first step is first order
//! (there is no earlier x₀ yet) and so is the last (its sigma is 0, which
//! `final_sigmas_type="zero"` makes first order whatever
//! `lower_order_final` says). Timesteps are integers; with Karras sigmas
//! they are the rounded training timesteps nearest each Karras sigma.

use super::{
    check_indices, check_steps, np_arange_down, np_interp, np_linspace, sigma_to_t, train_sigmas,
    Prediction, Scheduler, SchedulerConfig, Spacing,
};
use crate::model::noise::TorchRng;
use crate::Result;

/// diffusers `DPMSolverMultistepScheduler`, dpmsolver++ order 2 midpoint.
pub struct DpmPp2m {
    timesteps: Vec<i64>,
    timesteps_f64: Vec<f64>,
    sigmas: Vec<f32>,
    prediction: Prediction,
    /// The x₀ of the previous step.
    previous_x0: Option<Vec<f32>>,
    lower_order_nums: usize,
}

/// Errors unless a DPM-Solver config describes DPM-Solver++(2M), for
/// building the sampler a config names. (diffusers maps the `deis`
/// algorithm and the `logrho`/`bh1`/`bh2` solver types onto these.)
pub(super) fn check_is_2m(config: &SchedulerConfig) -> Result<()> {
    match config.algorithm_type.as_deref() {
        None | Some("dpmsolver++") | Some("deis") => {}
        Some(other) => {
            return Err(config.error(
                "algorithm_type",
                format!(
                    "is {other:?}; spm's DPM-Solver samplers are dpmsolver++ (--sampler dpmpp-2m)"
                ),
            ))
        }
    }
    match config.solver_order {
        None | Some(2) => {}
        Some(other) => {
            return Err(config.error(
                "solver_order",
                format!("is {other}; spm's DPM-Solver samplers are order 2 (--sampler dpmpp-2m)"),
            ))
        }
    }
    match config.solver_type.as_deref() {
        None | Some("midpoint") | Some("logrho") | Some("bh1") | Some("bh2") => Ok(()),
        Some(other) => Err(config.error(
            "solver_type",
            format!("is {other:?}; spm's DPM-Solver samplers use the midpoint solver"),
        )),
    }
}

/// float32 (alpha_t, sigma_t) of a sigma: 1/sqrt(sigma² + 1) and sigma·alpha.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// log-SNR: ln(alpha) - ln(sigma) (+inf at sigma 0), each log a float32
/// as `torch.log` returns it.
fn lambda(alpha: f32, sigma: f32) -> f32 {
    ln32(alpha) - ln32(sigma)
}

/// The float32 natural log, through float64 so that it is correctly rounded
/// on every platform (torch's own, MKL's, is within 0.56 ulp).
fn ln32(x: f32) -> f32 {
    (x as f64).ln() as f32
}

/// The float32 exponential, rounded from float64 likewise.
fn exp32(x: f32) -> f32 {
    (x as f64).exp() as f32
}

impl DpmPp2m {
    /// `DPMSolverMultistepScheduler.from_config(config,
    /// algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
    /// use_karras_sigmas=karras)` then `set_timesteps(steps)`.
    pub fn new(config: &SchedulerConfig, steps: usize, karras: bool) -> Result<Self> {
        let config = &config.effective();
        config.reject_flags(
            "DPM++ 2M",
            &[
                "thresholding",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "use_lu_lambdas",
                "use_flow_sigmas",
            ],
        )?;
        config.reject_other(
            "final_sigmas_type",
            config.final_sigmas_type.as_deref(),
            "zero",
        )?;
        if let Some(v) = &config.variance_type {
            return Err(config.error(
                "variance_type",
                format!("is {v:?}; spm supports only models without a learned variance"),
            ));
        }
        if let Some(l) = config.lambda_min_clipped {
            if l != f64::NEG_INFINITY {
                return Err(config.error(
                    "lambda_min_clipped",
                    format!("is {l}; spm supports only -Infinity (no clipping)"),
                ));
            }
        }
        let train = check_steps(config, steps)?;
        let prediction = config.prediction(&[
            Prediction::Epsilon,
            Prediction::Velocity,
            Prediction::Sample,
        ])?;
        let spacing = config.spacing(Spacing::Linspace)?;
        let rescale = config.rescale_betas_zero_snr.unwrap_or(false);
        let mut alphas_cumprod = config.alphas_cumprod(rescale)?;
        if rescale {
            *alphas_cumprod.last_mut().unwrap() = 2f32.powi(-24);
        }
        let table = train_sigmas(&alphas_cumprod);
        let offset = config.steps_offset.unwrap_or(0);
        let (timesteps, mut sigmas): (Vec<i64>, Vec<f32>) = if karras {
            // Karras et al. (2022) eq. (5), rho 7, between the smallest and
            // largest training sigma (or the config's sigma_min/sigma_max,
            // which diffusers also reads from a foreign config).
            let sigma_min = config.sigma_min.unwrap_or(table[0] as f64);
            let sigma_max = config.sigma_max.unwrap_or(table[train - 1] as f64);
            let rho = 7.0;
            let min_inv = sigma_min.powf(1.0 / rho);
            let max_inv = sigma_max.powf(1.0 / rho);
            let ks: Vec<f64> = np_linspace(0.0, 1.0, steps)
                .iter()
                .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
                .collect();
            let log_sigmas: Vec<f32> = table.iter().map(|&s| (s as f64).ln() as f32).collect();
            let round = config.beta_schedule.as_deref() != Some("squaredcos_cap_v2");
            let ts = ks
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &log_sigmas);
                    (if round { t.round_ties_even() } else { t }) as i64
                })
                .collect();
            (ts, ks.iter().map(|&s| s as f32).collect())
        } else {
            let ts: Vec<i64> = match spacing {
                Spacing::Linspace => {
                    let mut v: Vec<i64> = np_linspace(0.0, (train - 1) as f64, steps + 1)
                        .iter()
                        .rev()
                        .map(|t| t.round_ties_even() as i64)
                        .collect();
                    v.pop();
                    v
                }
                Spacing::Leading => {
                    let ratio = train / (steps + 1);
                    (1..=steps)
                        .rev()
                        .map(|i| (i * ratio) as i64 + offset)
                        .collect()
                }
                Spacing::Trailing => np_arange_down(train as f64, train as f64 / steps as f64)
                    .iter()
                    .map(|t| t.round_ties_even() as i64 - 1)
                    .collect(),
            };
            check_indices(config, &ts, train)?;
            let s = ts
                .iter()
                .map(|&t| np_interp(t as f64, &table) as f32)
                .collect();
            (ts, s)
        };
        if timesteps[1..].contains(&timesteps[0]) {
            // diffusers finds its step index by looking the first timestep
            // up, takes the second match, and runs off the end of its sigmas.
            return Err(config.error(
                if karras {
                    "beta_schedule"
                } else {
                    "timestep_spacing"
                },
                format!(
                    "gives a schedule whose first timestep ({}) repeats, which diffusers' \
                     DPMSolverMultistepScheduler cannot run (it fails with an IndexError)",
                    timesteps[0]
                ),
            ));
        }
        sigmas.push(0.0);
        Ok(DpmPp2m {
            timesteps_f64: timesteps.iter().map(|&t| t as f64).collect(),
            timesteps,
            sigmas,
            prediction,
            previous_x0: None,
            lower_order_nums: 0,
        })
    }

    /// diffusers' `index_for_timestep`: the second match if there are
    /// several, the last index if none.
    fn index_of(&self, timestep: f64) -> usize {
        let hits: Vec<usize> = (0..self.timesteps.len())
            .filter(|&i| self.timesteps[i] as f64 == timestep)
            .collect();
        match hits.len() {
            0 => self.timesteps.len() - 1,
            1 => hits[0],
            _ => hits[1],
        }
    }
}

impl Scheduler for DpmPp2m {
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
        let last = step == self.timesteps.len() - 1;
        // convert_model_output: the data prediction x0.
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[step]);
        let x0: Vec<f32> = sample
            .iter()
            .zip(model_output)
            .map(|(&x, &m)| match self.prediction {
                Prediction::Epsilon => (x - sigma_s0 * m) / alpha_s0,
                Prediction::Velocity => alpha_s0 * x - sigma_s0 * m,
                Prediction::Sample => m,
            })
            .collect();
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step + 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;
        let c_sample = sigma_t / sigma_s0;
        let c_x0 = alpha_t * (exp32(-h) - 1.0);
        let out = match (&self.previous_x0, self.lower_order_nums < 1 || last) {
            (Some(prev), false) => {
                // Second order: D1 = (m0 - m1) / r0 with r0 = h_0 / h.
                let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[step - 1]);
                let h_0 = lambda_s0 - lambda(alpha_s1, sigma_s1);
                let r0 = h_0 / h;
                let inv_r0 = 1.0 / r0;
                let c_d1 = 0.5 * c_x0;
                sample
                    .iter()
                    .zip(&x0)
                    .zip(prev)
                    .map(|((&x, &m0), &m1)| {
                        let d1 = inv_r0 * (m0 - m1);
                        c_sample * x - c_x0 * m0 - c_d1 * d1
                    })
                    .collect()
            }
            _ => sample
                .iter()
                .zip(&x0)
                .map(|(&x, &m0)| c_sample * x - c_x0 * m0)
                .collect(),
        };
        self.previous_x0 = Some(x0);
        self.lower_order_nums = (self.lower_order_nums + 1).min(2);
        out
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], timestep: f64) -> Vec<f32> {
        let (alpha, sigma) = alpha_sigma(self.sigmas[self.index_of(timestep)]);
        original
            .iter()
            .zip(noise)
            .map(|(&x, &n)| alpha * x + sigma * n)
            .collect()
    }
}
