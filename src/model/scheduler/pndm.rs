//! PNDM (Liu et al. 2022, arXiv 2202.09778) as diffusers' `PNDMScheduler`
//! runs it. With `skip_prk_steps` (every Stable Diffusion config) it is PLMS:
//! a linear multistep method of growing order over the stored noise
//! predictions, started by one Heun-like step, which is why its timestep
//! list repeats the second timestep (the model is evaluated twice there).
//! Without it the first three steps are Runge–Kutta (four model calls each,
//! at t, t - gap/2, t - gap/2 and t - gap).

use super::ddim::add_noise_alpha;
use super::{
    check_indices, check_steps, np_arange_down, np_linspace, Prediction, Scheduler,
    SchedulerConfig, Spacing,
};
use crate::model::noise::TorchRng;
use crate::Result;

/// What one index of the timestep list does.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// Runge–Kutta, the `counter % 4`-th evaluation of a four-call step.
    Prk(usize),
    /// Linear multistep.
    Plms,
}

/// diffusers `PNDMScheduler`.
pub struct Pndm {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps_f64: Vec<f64>,
    /// Per index: the kind, and the (timestep, previous timestep) pair the
    /// update uses, computed up front so every index can be checked.
    plan: Vec<(Kind, i64, i64)>,
    prediction: Prediction,
    /// Stored model outputs (the `ets` of the paper), newest last.
    ets: Vec<Vec<f32>>,
    /// The sum of weighted Runge–Kutta evaluations so far (`None` is 0).
    rk_sum: Option<Vec<f32>>,
    /// The sample the current multi-evaluation step started from.
    cur_sample: Option<Vec<f32>>,
    counter: usize,
}

impl Pndm {
    /// `PNDMScheduler.from_config(config)` then `set_timesteps(steps)`.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let config = &config.effective();
        let train = check_steps(config, steps)?;
        let prediction = config.prediction(&[Prediction::Epsilon, Prediction::Velocity])?;
        let spacing = config.spacing(Spacing::Leading)?;
        // PNDMScheduler takes no `rescale_betas_zero_snr`.
        let alphas_cumprod = config.alphas_cumprod(false)?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(false) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let offset = config.steps_offset.unwrap_or(0);
        // diffusers' `_timesteps`, ascending.
        let base: Vec<i64> = match spacing {
            Spacing::Linspace => np_linspace(0.0, (train - 1) as f64, steps)
                .iter()
                .map(|t| t.round_ties_even() as i64)
                .collect(),
            Spacing::Leading => {
                let ratio = train / steps;
                (0..steps).map(|i| (i * ratio) as i64 + offset).collect()
            }
            Spacing::Trailing => np_arange_down(train as f64, train as f64 / steps as f64)
                .iter()
                .rev()
                .map(|t| t.round_ties_even() as i64 - 1)
                .collect(),
        };
        let gap = (train / steps) as i64;
        let half = gap / 2;
        let len = base.len();
        let skip_prk = config.skip_prk_steps.unwrap_or(false);
        // The timestep list diffusers exposes, and how many of its entries
        // are Runge-Kutta evaluations.
        let (listed, prk_len) = if skip_prk {
            // base[..-1], base[-2], base[-1], reversed: the second-highest
            // timestep twice.
            let mut list: Vec<i64> = base[..len.saturating_sub(1)].to_vec();
            if len >= 2 {
                list.push(base[len - 2]);
            }
            list.extend(base.last());
            list.reverse();
            (list, 0)
        } else {
            if len < 4 {
                return Err(config.error(
                    "skip_prk_steps",
                    format!(
                        "is false, and the Runge-Kutta start needs at least 4 steps (got {steps})"
                    ),
                ));
            }
            // The last four timesteps, each followed by its midpoint; every
            // point but the first and last evaluated twice; descending.
            let mut points = Vec::new();
            for &t in &base[len - 4..] {
                points.push(t);
                points.push(t + half);
            }
            points.pop();
            let mut prk: Vec<i64> = points.iter().flat_map(|&t| [t, t]).collect();
            prk.remove(0);
            prk.pop();
            prk.reverse();
            let prk_len = prk.len();
            prk.extend(base[..len - 3].iter().rev());
            (prk, prk_len)
        };
        let plan: Vec<(Kind, i64, i64)> = listed
            .iter()
            .enumerate()
            .map(|(counter, &t)| {
                if counter < prk_len {
                    // Even evaluations look half a gap ahead, odd ones at
                    // their own timestep; all update from the step's start.
                    let diff = if counter % 2 == 1 { 0 } else { half };
                    (Kind::Prk(counter % 4), listed[counter / 4 * 4], t - diff)
                } else if counter == 1 {
                    // The second call re-does the first step with the average
                    // of both predictions, from t + gap to t.
                    (Kind::Plms, t + gap, t)
                } else {
                    (Kind::Plms, t, t - gap)
                }
            })
            .collect();
        let mut used: Vec<i64> = plan.iter().flat_map(|&(_, t, p)| [t, p.max(0)]).collect();
        used.extend(&listed);
        check_indices(config, &used, train)?;
        Ok(Pndm {
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps_f64: listed.iter().map(|&t| t as f64).collect(),
            plan,
            prediction,
            ets: Vec::new(),
            rk_sum: None,
            cur_sample: None,
            counter: 0,
        })
    }

    fn alpha_at(&self, t: i64) -> f32 {
        if t >= 0 {
            self.alphas_cumprod[t as usize]
        } else {
            self.final_alpha_cumprod
        }
    }

    /// diffusers' `_get_prev_sample`: formula (9) of the PNDM paper.
    fn prev_sample(&self, sample: &[f32], t: i64, prev: i64, model_output: &[f32]) -> Vec<f32> {
        let alpha_t = self.alpha_at(t);
        let alpha_prev = self.alpha_at(prev);
        let beta_t = 1.0 - alpha_t;
        let beta_prev = 1.0 - alpha_prev;
        let sample_coeff = (alpha_prev / alpha_t).sqrt();
        let denom = alpha_t * beta_prev.sqrt() + (alpha_t * beta_t * alpha_prev).sqrt();
        let gain = alpha_prev - alpha_t;
        let (sa, sb) = (alpha_t.sqrt(), beta_t.sqrt());
        sample
            .iter()
            .zip(model_output)
            .map(|(&x, &m)| {
                let eps = match self.prediction {
                    Prediction::Velocity => sa * m + sb * x,
                    _ => m,
                };
                sample_coeff * x - gain * eps / denom
            })
            .collect()
    }
}

fn scaled(c: f32, v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| c * x).collect()
}

impl Scheduler for Pndm {
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
        debug_assert_eq!(step, self.counter, "PNDM steps must be taken in order");
        let (kind, t, prev) = self.plan[step];
        let counter = self.counter;
        self.counter += 1;
        match kind {
            Kind::Prk(phase) => {
                // Weights 1/6, 1/3, 1/3, 1/6 of the classical RK4.
                let (sixth, third) = ((1.0f64 / 6.0) as f32, (1.0f64 / 3.0) as f32);
                let eps = match phase {
                    0 => {
                        self.rk_sum = Some(scaled(sixth, model_output));
                        self.ets.push(model_output.to_vec());
                        self.cur_sample = Some(sample.to_vec());
                        model_output.to_vec()
                    }
                    1 | 2 => {
                        let sum = self
                            .rk_sum
                            .get_or_insert_with(|| vec![0.0; model_output.len()]);
                        for (s, &m) in sum.iter_mut().zip(model_output) {
                            *s += third * m;
                        }
                        model_output.to_vec()
                    }
                    _ => {
                        let sum = self
                            .rk_sum
                            .take()
                            .unwrap_or_else(|| vec![0.0; model_output.len()]);
                        sum.iter()
                            .zip(model_output)
                            .map(|(&s, &m)| s + sixth * m)
                            .collect()
                    }
                };
                let start = self.cur_sample.clone().unwrap_or_else(|| sample.to_vec());
                self.prev_sample(&start, t, prev, &eps)
            }
            Kind::Plms => {
                if counter != 1 {
                    if self.ets.len() > 3 {
                        self.ets.drain(..self.ets.len() - 3);
                    }
                    self.ets.push(model_output.to_vec());
                }
                let e = &self.ets;
                let n = e.len();
                let mut from = sample.to_vec();
                let eps: Vec<f32> = if n == 1 && counter == 0 {
                    self.cur_sample = Some(sample.to_vec());
                    model_output.to_vec()
                } else if n == 1 && counter == 1 {
                    from = self.cur_sample.take().unwrap_or_else(|| sample.to_vec());
                    model_output
                        .iter()
                        .zip(&e[0])
                        .map(|(&m, &p)| (m + p) / 2.0)
                        .collect()
                } else if n == 2 {
                    (0..model_output.len())
                        .map(|i| (3.0 * e[1][i] - e[0][i]) / 2.0)
                        .collect()
                } else if n == 3 {
                    (0..model_output.len())
                        .map(|i| (23.0 * e[2][i] - 16.0 * e[1][i] + 5.0 * e[0][i]) / 12.0)
                        .collect()
                } else {
                    let c = (1.0f64 / 24.0) as f32;
                    (0..model_output.len())
                        .map(|i| {
                            c * (55.0 * e[3][i] - 59.0 * e[2][i] + 37.0 * e[1][i] - 9.0 * e[0][i])
                        })
                        .collect()
                };
                self.prev_sample(&from, t, prev, &eps)
            }
        }
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], timestep: f64) -> Vec<f32> {
        add_noise_alpha(self.alphas_cumprod[timestep as usize], original, noise)
    }
}
