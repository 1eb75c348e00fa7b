//! Adam and AdamW over candle variables, written out because the update
//! order is part of each reference: torch's AdamW decays the weight
//! *before* the Adam step (Forget-Me-Not), bitsandbytes' AdamW8bit (SPM)
//! decays *after* it, ESD uses plain Adam. Tensors whose gradient is absent
//! (unreachable from the loss) are skipped entirely, decay included, as
//! torch skips a `grad is None` parameter.

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};

/// Which update rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    /// `torch.optim.Adam` (no decay).
    Adam,
    /// `torch.optim.AdamW`: p ← p·(1 − lr·wd), then the Adam step.
    AdamW,
    /// bitsandbytes' 32-bit AdamW kernel: the Adam step, then
    /// p ← p·(1 − lr·wd) (trainer-methods.md §3.2.6). Its 8-bit block
    /// quantisation of 17 of SPM's 384 state tensors is not replicated.
    AdamWAfter,
}

/// The hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamConfig {
    pub rule: Rule,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Round every parameter to bf16 after each step (ESD's `esd_sd.py`
    /// trains bf16 weights, so updates below half an ulp are lost).
    pub bf16_weights: bool,
}

impl AdamConfig {
    pub fn new(rule: Rule, weight_decay: f64) -> Self {
        AdamConfig {
            rule,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            bf16_weights: false,
        }
    }
}

/// One parameter and its moment estimates.
pub struct Slot {
    pub name: String,
    pub var: Var,
    pub m: Tensor,
    pub v: Tensor,
    /// Steps this tensor has been updated (torch keeps a per-parameter
    /// step, which differs from the global one for skipped tensors).
    pub t: u64,
}

/// Adam(W) over named variables.
pub struct Adam {
    pub config: AdamConfig,
    pub slots: Vec<Slot>,
}

impl Adam {
    pub fn new(config: AdamConfig, params: Vec<(String, Var)>) -> Result<Self> {
        let slots = params
            .into_iter()
            .map(|(name, var)| {
                let m = var.as_tensor().zeros_like()?;
                let v = var.as_tensor().zeros_like()?;
                Ok(Slot {
                    name,
                    var,
                    m,
                    v,
                    t: 0,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Adam { config, slots })
    }

    /// One update at learning rate `lr` with the gradients in `grads`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let c = self.config;
        for s in &mut self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            let g = g.detach();
            s.t += 1;
            let t = s.t as i32;
            let mut p = s.var.as_tensor().detach();
            let wd = match c.rule {
                Rule::Adam => 0.0,
                _ => c.weight_decay,
            };
            if c.rule == Rule::AdamW && wd != 0.0 {
                p = (p * (1.0 - lr * wd))?;
            }
            s.m = ((&s.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            s.v = ((&s.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let bc1 = 1.0 - c.beta1.powi(t);
            let bc2 = 1.0 - c.beta2.powi(t);
            // torch: p −= (lr/bc1)·m / (√v/√bc2 + eps).
            let denom = ((s.v.sqrt()? / bc2.sqrt())? + c.eps)?;
            p = (p - ((&s.m / denom)? * (lr / bc1))?)?;
            if c.rule == Rule::AdamWAfter && wd != 0.0 {
                p = (p * (1.0 - lr * wd))?;
            }
            if c.bf16_weights {
                p = p.to_dtype(DType::BF16)?.to_dtype(s.var.dtype())?;
            }
            s.var.set(&p)?;
        }
        Ok(())
    }
}

/// Scale the gradients so their global L2 norm is at most `max` (torch's
/// `clip_grad_norm_`: coefficient max/(norm + 1e-6), applied only when it
/// is below 1). Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max: f64) -> Result<f64> {
    let mut sq = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
    }
    let norm = sq.sqrt();
    if max > 0.0 {
        let coef = max / (norm + 1e-6);
        if coef < 1.0 {
            for v in vars {
                if let Some(g) = grads.remove(v.as_tensor()) {
                    grads.insert(v.as_tensor(), (g * coef)?);
                }
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// One torch AdamW step, by hand (torch/optim/adamw.py's formula): with
    /// g = 0.5, lr 0.1, wd 0.01 from p = 1: p = 0.999 − 0.1·1 = 0.899
    /// (m̂/√v̂ = 1 at t = 1 up to eps).
    #[test]
    fn adamw_first_step_is_decay_then_sign_step() {
        let dev = Device::Cpu;
        let var = Var::new(&[1f64], &dev).unwrap();
        let loss = (var.as_tensor() * 0.5).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let mut opt = Adam::new(
            AdamConfig::new(Rule::AdamW, 0.01),
            vec![("p".into(), var.clone())],
        )
        .unwrap();
        opt.step(&grads, 0.1).unwrap();
        let p = var.as_tensor().to_vec1::<f64>().unwrap()[0];
        let want = 0.999 - 0.1 * 0.5 / (0.5 + 1e-8);
        assert!((p - want).abs() < 1e-12, "{p} vs {want}");
    }

    /// bitsandbytes' order: step first, then decay: (1 − 0.1·1)·(1 − 0.001).
    #[test]
    fn bnb_order_decays_after_the_step() {
        let dev = Device::Cpu;
        let var = Var::new(&[1f64], &dev).unwrap();
        let loss = (var.as_tensor() * 0.5).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let mut opt = Adam::new(
            AdamConfig::new(Rule::AdamWAfter, 0.01),
            vec![("p".into(), var.clone())],
        )
        .unwrap();
        opt.step(&grads, 0.1).unwrap();
        let p = var.as_tensor().to_vec1::<f64>().unwrap()[0];
        let want = (1.0 - 0.1 * 0.5 / (0.5 + 1e-8)) * (1.0 - 0.1 * 0.01);
        assert!((p - want).abs() < 1e-12, "{p} vs {want}");
    }

    /// trainer-methods.md §6.2: w = 0.02 and one Adam step at lr 5e-5 leaves
    /// a bf16 weight unchanged (half an ulp at 0.02 is 6.1e-5) and moves an
    /// f32 one by ≈ −5e-5·sign(g).
    #[test]
    fn bf16_weights_lose_updates_below_half_an_ulp() {
        let dev = Device::Cpu;
        for bf16 in [true, false] {
            let w0 = half::bf16::from_f32(0.02).to_f32();
            let var = Var::new(&[w0], &dev).unwrap();
            let loss = (var.as_tensor() * 3.0).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let mut cfg = AdamConfig::new(Rule::Adam, 0.0);
            cfg.bf16_weights = bf16;
            let mut opt = Adam::new(cfg, vec![("w".into(), var.clone())]).unwrap();
            opt.step(&grads, 5e-5).unwrap();
            let w = var.as_tensor().to_vec1::<f32>().unwrap()[0];
            if bf16 {
                assert_eq!(w, w0);
            } else {
                assert!(((w - w0) + 5e-5).abs() < 1e-9, "{}", w - w0);
            }
        }
    }

    #[test]
    fn absent_gradients_are_skipped_decay_included() {
        let dev = Device::Cpu;
        let a = Var::new(&[1f32], &dev).unwrap();
        let b = Var::new(&[1f32], &dev).unwrap();
        let grads = (a.as_tensor() * 2.0)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut opt = Adam::new(
            AdamConfig::new(Rule::AdamW, 0.5),
            vec![("a".into(), a), ("b".into(), b.clone())],
        )
        .unwrap();
        opt.step(&grads, 0.1).unwrap();
        assert_eq!(b.as_tensor().to_vec1::<f32>().unwrap(), [1.0]);
        assert_eq!(opt.slots[1].t, 0);
    }
}
