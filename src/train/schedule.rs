//! Learning-rate schedules as diffusers' `get_scheduler` defines them
//! (`optimization.py`): a multiplier of the base rate as a function of the
//! number of optimizer steps already taken. The first step runs at
//! multiplier(0), so a warm-up makes SPM's step 1 a no-op on the weights
//! (trainer-methods.md §3.2.3), as in the reference.

use std::f64::consts::PI;

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// diffusers `constant` (no warm-up, whatever `--warmup` says).
    #[value(name = "constant")]
    Constant,
    /// `constant_with_warmup`.
    #[value(name = "constant_with_warmup")]
    ConstantWithWarmup,
    /// `cosine` (half a cosine after the warm-up).
    #[value(name = "cosine")]
    Cosine,
    /// `cosine_with_restarts`: hard restarts, `cycles` of them.
    #[value(name = "cosine_with_restarts")]
    CosineWithRestarts,
    /// `linear` decay to 0 after the warm-up.
    #[value(name = "linear")]
    Linear,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LrSchedule {
    pub kind: Kind,
    pub warmup: usize,
    pub cycles: usize,
    pub total: usize,
}

impl LrSchedule {
    pub fn constant(total: usize) -> Self {
        LrSchedule {
            kind: Kind::Constant,
            warmup: 0,
            cycles: 1,
            total,
        }
    }

    /// The multiplier for the optimizer step that follows `step` steps.
    pub fn factor(&self, step: usize) -> f64 {
        let s = step as f64;
        let w = self.warmup as f64;
        if self.kind == Kind::Constant {
            return 1.0;
        }
        if step < self.warmup {
            return s / w.max(1.0);
        }
        let progress = (s - w) / ((self.total as f64 - w).max(1.0));
        match self.kind {
            Kind::Constant | Kind::ConstantWithWarmup => 1.0,
            Kind::Cosine => (0.5 * (1.0 + (PI * progress).cos())).max(0.0),
            Kind::CosineWithRestarts => {
                if progress >= 1.0 {
                    return 0.0;
                }
                let c = self.cycles as f64;
                (0.5 * (1.0 + (PI * ((c * progress) % 1.0)).cos())).max(0.0)
            }
            Kind::Linear => ((self.total as f64 - s) / (self.total as f64 - w).max(1.0)).max(0.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SPM's default (warm-up 500, 3 restarts over 3000 steps): step 0 is
    /// at 0 (the reference's first step does not move the weights), the
    /// warm-up is linear, each cycle restarts at 1 and falls to 0.
    #[test]
    fn cosine_with_restarts_as_diffusers_defines_it() {
        let s = LrSchedule {
            kind: Kind::CosineWithRestarts,
            warmup: 500,
            cycles: 3,
            total: 3000,
        };
        assert_eq!(s.factor(0), 0.0);
        assert_eq!(s.factor(250), 0.5);
        assert_eq!(s.factor(500), 1.0);
        // progress 1/6 into a 1/3 cycle: cos(π/2) → 0.5.
        let mid = 500 + 2500 / 6;
        assert!((s.factor(mid) - 0.5).abs() < 2e-3);
        // A new cycle starts at 1/3 of the way.
        let restart = 500 + 2500 / 3 + 1;
        assert!(s.factor(restart) > 0.999);
        assert_eq!(s.factor(3000), 0.0);
        assert_eq!(LrSchedule::constant(10).factor(0), 1.0);
    }
}
