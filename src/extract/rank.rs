//! How many singular values a module keeps, and kohya's optional clamp.
//!
//! The dynamic rules are kohya sd-scripts' `networks/resize_lora.py` ones
//! (trainer-methods.md §4.2), applied to the spectrum of ΔW itself, with
//! their off-by-one kept: each rule's index already counts the values that
//! pass, and the rank is that index + 1, so a rule keeps one singular value
//! more than its threshold asks for. Users compare ranks with kohya's tools;
//! a cleaner count would make the same flag mean two things.

/// The rank rule of one extraction.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(tag = "kind", content = "param", rename_all = "snake_case")]
pub enum Rule {
    /// rank = min(R, rows, cols), kohya `extract_lora_from_models.py`.
    Fixed,
    /// Keep values above S₀/p (`--sv-ratio`).
    SvRatio(f64),
    /// Keep the values holding fraction p of ΣS (`--sv-cumulative`).
    SvCumulative(f64),
    /// Keep the values holding fraction p of ‖ΔW‖_F (`--sv-fro`).
    SvFro(f64),
}

impl Rule {
    pub fn name(self) -> &'static str {
        match self {
            Rule::Fixed => "fixed",
            Rule::SvRatio(_) => "sv_ratio",
            Rule::SvCumulative(_) => "sv_cumulative",
            Rule::SvFro(_) => "sv_fro",
        }
    }

    pub fn param(self) -> Option<f64> {
        match self {
            Rule::Fixed => None,
            Rule::SvRatio(p) | Rule::SvCumulative(p) | Rule::SvFro(p) => Some(p),
        }
    }

    pub fn is_dynamic(self) -> bool {
        self != Rule::Fixed
    }

    /// The rank for singular values `s` (descending) with cap `cap` (the
    /// fixed rank, or resize_lora's `--new_rank` for a dynamic rule).
    pub fn rank(self, s: &[f64], cap: usize) -> usize {
        let n = s.len();
        if n == 0 {
            return 0;
        }
        let cap = cap.min(n).max(1);
        let index = match self {
            Rule::Fixed => return cap,
            Rule::SvRatio(p) => {
                let min = s[0] / p;
                s.iter().filter(|&&v| v > min).count()
            }
            Rule::SvCumulative(p) => searchsorted_fraction(s.iter().copied(), p) + 1,
            Rule::SvFro(p) => searchsorted_fraction(s.iter().map(|&v| v * v), p * p) + 1,
        };
        // resize_lora: index = max(1, min(index, len(S) - 1)); rank = index + 1.
        let index = index.min(n.saturating_sub(1)).max(1);
        let mut rank = index + 1;
        // resize_lora's MIN_SV: a (numerically) zero matrix keeps one value.
        if s[0] <= 1e-6 {
            rank = 1;
        } else if rank > cap {
            rank = cap;
        }
        rank.min(n)
    }
}

/// `searchsorted(cumsum(x) / sum(x), target)` with numpy/torch's default
/// `side='left'`: how many cumulative fractions are below `target`.
fn searchsorted_fraction(x: impl Iterator<Item = f64>, target: f64) -> usize {
    let x: Vec<f64> = x.collect();
    let total: f64 = x.iter().sum();
    let mut acc = 0.0;
    let mut below = 0;
    for v in x {
        acc += v;
        if acc / total < target {
            below += 1;
        } else {
            break;
        }
    }
    below
}

/// `torch.quantile(values, q)` with its default linear interpolation:
/// position q·(n−1) in the sorted values.
pub fn quantile(values: &[f32], q: f64) -> f32 {
    let mut v: Vec<f32> = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return 0.0;
    }
    let pos = q * (n - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(n - 1);
    let frac = pos - lo as f64;
    (v[lo] as f64 + frac * (v[hi] as f64 - v[lo] as f64)) as f32
}

/// kohya's clamp: hi = the q-quantile of the *signed* values of both
/// factors together, then both are clamped to [−hi, hi]. Not invariant
/// to the SVD's sign choices (which differ between LAPACK and faer), so
/// it is off by default. Returns hi.
pub fn clamp(up: &mut [f32], down: &mut [f32], q: f64) -> f32 {
    let mut all = Vec::with_capacity(up.len() + down.len());
    all.extend_from_slice(up);
    all.extend_from_slice(down);
    let hi = quantile(&all, q);
    let lim = hi.abs();
    for v in up.iter_mut().chain(down.iter_mut()) {
        *v = v.clamp(-lim, lim);
    }
    hi
}

#[cfg(test)]
mod tests {
    use super::*;

    /// trainer-methods.md §6.5: sv_ratio(p = 10) on S = [10, 5, 0.5, …]
    /// counts #{S > 1} = 2, so rank 3.
    #[test]
    fn sv_ratio_keeps_one_more_than_its_threshold() {
        let s = [10.0, 5.0, 0.5, 0.25, 0.1];
        assert_eq!(Rule::SvRatio(10.0).rank(&s, 8), 3);
        // Only S₀ above the threshold still gives rank 2 (§4.2).
        assert_eq!(Rule::SvRatio(1.5).rank(&s, 8), 2);
        // The cap wins.
        assert_eq!(Rule::SvRatio(1000.0).rank(&s, 2), 2);
    }

    #[test]
    fn cumulative_and_fro_by_hand() {
        // cumsum/sum = [0.5, 0.75, 0.875, 1.0]; searchsorted(0.8) = 2 → idx 3,
        // clamped to len−1 = 3 → rank 4.
        let s = [4.0, 2.0, 1.0, 1.0];
        assert_eq!(Rule::SvCumulative(0.8).rank(&s, 8), 4);
        // searchsorted(0.5) = 0 (side left, 0.5 is not below 0.5) → idx 1 → rank 2.
        assert_eq!(Rule::SvCumulative(0.5).rank(&s, 8), 2);
        // S² = [16, 4, 1, 1] / 22: [0.727, 0.909, 0.955, 1]; p² = 0.81 →
        // searchsorted = 1 → idx 2 → rank 3.
        assert_eq!(Rule::SvFro(0.9).rank(&s, 8), 3);
    }

    #[test]
    fn zero_matrix_and_small_spectra() {
        assert_eq!(Rule::SvRatio(10.0).rank(&[0.0, 0.0, 0.0], 8), 1);
        assert_eq!(Rule::SvFro(0.9).rank(&[3.0], 8), 1);
        assert_eq!(Rule::Fixed.rank(&[3.0, 2.0], 8), 2);
        assert_eq!(Rule::Fixed.rank(&[3.0, 2.0, 1.0], 2), 2);
    }

    #[test]
    fn quantile_interpolates_like_torch() {
        // torch.quantile(tensor([1., 2., 3., 4.]), 0.5) = 2.5; q = 0.99 → 3.97.
        assert_eq!(quantile(&[4.0, 1.0, 3.0, 2.0], 0.5), 2.5);
        assert!((quantile(&[4.0, 1.0, 3.0, 2.0], 0.99) - 3.97).abs() < 1e-6);
        let mut up = vec![-5.0, 1.0];
        let mut down = vec![0.5, 2.0];
        // sorted [-5, 0.5, 1, 2], q = 0.5 → 0.75
        let hi = clamp(&mut up, &mut down, 0.5);
        assert_eq!(hi, 0.75);
        assert_eq!(up, [-0.75, 0.75]);
        assert_eq!(down, [0.5, 0.75]);
    }
}
