//! CPU kernels candle lacks, for inference (no backward: [`super::nn`] uses
//! them only when no graph is recorded, and candle's differentiable ops
//! otherwise — candle.md §1: a fused op must never silently cut autograd).
//!
//! [`FusedAttention`]: scaled dot-product attention, fused: per (batch·head, block of
//! queries) the scores `Q·Kᵀ` land in a cache-sized buffer, are turned into
//! softmax weights in place and multiplied into `V` at once, so the
//! `N × M` score matrix never exists in memory.
//!
//! Why: SD1.5 at 512² runs self-attention over 4096 tokens; as three candle
//! ops (matmul, softmax, matmul) that cost ~12× torch's fused SDPA on the
//! project's CPU (BENCHMARKS.md), most of it writing and re-reading 64 MiB
//! score blocks.
//!
//! [`Conv3x3`]: a stride-1, padding-1 3×3 convolution as nine GEMMs that
//! accumulate into one output, each reading the zero-padded input at a
//! shifted offset. Computing the output over the padded width (two
//! columns per row are discarded) makes every shifted input a plain
//! strided matrix, so no im2col copy (9× the activation) is ever built;
//! candle's im2col path spent more time copying than multiplying here.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;

/// Rows of queries per task: 256 × 4096 scores = 4 MiB per thread; fewer
/// rows re-pack K and V more often (measured slower at 64).
const BLOCK: usize = 256;

pub struct FusedAttention {
    pub scale: f32,
}

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("fused attention: {what} must be f32");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("fused attention: {what} must be contiguous"),
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "spm-fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (bh, n, d) = l1.shape().dims3()?;
        let (bh2, m, d2) = l2.shape().dims3()?;
        let (bh3, m3, dv) = l3.shape().dims3()?;
        if bh != bh2 || bh != bh3 || d != d2 || m != m3 {
            candle_core::bail!(
                "fused attention: shapes q {:?} k {:?} v {:?} do not fit",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let (q, k, v) = (
            contiguous(s1, l1, "q")?,
            contiguous(s2, l2, "k")?,
            contiguous(s3, l3, "v")?,
        );
        let mut out = vec![0f32; bh * n * dv];
        let scale = self.scale;
        // One task per (head, block of query rows); each writes its own rows.
        out.par_chunks_mut(n * dv)
            .enumerate()
            .flat_map(|(h, oh)| {
                oh.par_chunks_mut(BLOCK * dv)
                    .enumerate()
                    .map(move |(b, ob)| (h, b * BLOCK, ob))
            })
            .for_each_init(
                || vec![0f32; BLOCK * m],
                |scores, (h, b0, o)| {
                    let qh = &q[h * n * d..(h + 1) * n * d];
                    let kh = &k[h * m * d..(h + 1) * m * d];
                    let vh = &v[h * m * dv..(h + 1) * m * dv];
                    {
                        let rows = BLOCK.min(n - b0);
                        let s = &mut scores[..rows * m];
                        // S = Q_blk · Kᵀ  (rows × m), row-major.
                        unsafe {
                            gemm::gemm(
                                rows,
                                m,
                                d,
                                s.as_mut_ptr(),
                                1,
                                m as isize,
                                false,
                                qh[b0 * d..].as_ptr(),
                                1,
                                d as isize,
                                kh.as_ptr(),
                                d as isize,
                                1,
                                0.0,
                                scale,
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                        }
                        let mut sums = [0f32; BLOCK];
                        for (r, row) in s.chunks_mut(m).enumerate() {
                            let mx = lanes_max(row);
                            row.iter_mut().for_each(|x| *x = exp_neg(*x - mx));
                            sums[r] = lanes_sum(row);
                        }
                        // O_blk = P · V  (rows × dv).
                        unsafe {
                            gemm::gemm(
                                rows,
                                dv,
                                m,
                                o.as_mut_ptr(),
                                1,
                                dv as isize,
                                false,
                                s.as_ptr(),
                                1,
                                m as isize,
                                vh.as_ptr(),
                                1,
                                dv as isize,
                                0.0,
                                1.0,
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                        }
                        for (r, row) in o.chunks_mut(dv).enumerate() {
                            let inv = 1.0 / sums[r];
                            row.iter_mut().for_each(|x| *x *= inv);
                        }
                    }
                },
            );
        Ok((CpuStorage::F32(out), Shape::from((bh, n, dv))))
    }
}

pub struct Conv3x3;

impl CustomOp2 for Conv3x3 {
    fn name(&self) -> &'static str {
        "spm-conv3x3"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l1.shape().dims4()?;
        let (o, c2, kh, kw) = l2.shape().dims4()?;
        if c != c2 || kh != 3 || kw != 3 {
            candle_core::bail!(
                "conv3x3: input {:?} and weight {:?} do not fit",
                l1.dims(),
                l2.dims()
            );
        }
        let x = contiguous(s1, l1, "input")?;
        let wt = contiguous(s2, l2, "weight")?;
        let (hp, wp) = (h + 2, w + 2);
        // Two spare values: the last shifted view reads two past the end.
        let plane = hp * wp;
        let cols = h * wp;
        let threads = rayon::current_num_threads();
        let mut out = vec![0f32; b * o * h * w];
        let mut xp = vec![0f32; c * plane + 2];
        let mut acc = vec![0f32; o * cols];
        for img in 0..b {
            let xi = &x[img * c * h * w..(img + 1) * c * h * w];
            xp.par_chunks_mut(plane)
                .zip(xi.par_chunks(h * w))
                .for_each(|(dst, src)| {
                    for y in 0..h {
                        dst[(y + 1) * wp + 1..(y + 1) * wp + 1 + w]
                            .copy_from_slice(&src[y * w..(y + 1) * w]);
                    }
                });
            for tap in 0..9 {
                let (dy, dx) = (tap / 3, tap % 3);
                // SAFETY: every pointer stays inside its buffer: the lhs
                // walks o × c weights at strides (9c, 9); the rhs reads
                // c planes of `cols` values from offset dy·wp + dx, which
                // ends at most 2 values past the last plane (allocated).
                unsafe {
                    gemm::gemm(
                        o,
                        cols,
                        c,
                        acc.as_mut_ptr(),
                        1,
                        cols as isize,
                        tap > 0,
                        wt[tap..].as_ptr(),
                        9,
                        (9 * c) as isize,
                        xp[dy * wp + dx..].as_ptr(),
                        1,
                        plane as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::Rayon(threads),
                    );
                }
            }
            let oi = &mut out[img * o * h * w..(img + 1) * o * h * w];
            oi.par_chunks_mut(h * w)
                .zip(acc.par_chunks(cols))
                .for_each(|(dst, src)| {
                    for y in 0..h {
                        dst[y * w..(y + 1) * w].copy_from_slice(&src[y * wp..y * wp + w]);
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((b, o, h, w))))
    }
}

/// Max of a slice in 8 independent lanes (so the compiler vectorises it).
fn lanes_max(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut it = v.chunks_exact(8);
    for c in &mut it {
        for (a, x) in acc.iter_mut().zip(c) {
            *a = a.max(*x);
        }
    }
    let tail = it
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    acc.iter().copied().fold(tail, f32::max)
}

/// Sum of a slice in 8 independent lanes.
fn lanes_sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut it = v.chunks_exact(8);
    for c in &mut it {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += *x;
        }
    }
    let tail: f32 = it.remainder().iter().sum();
    acc.iter().sum::<f32>() + tail
}

/// e^x for x ≤ 0 (softmax arguments once the row max is subtracted),
/// written so that a loop over it vectorises (libm's `expf` call does
/// not): x = n·ln2 + r with |r| ≤ ln2/2, e^r by its degree-6 Taylor
/// polynomial, 2^n from the exponent bits. Relative error < 5e-7 (tested).
/// Arguments below −87 are clamped; their weight is < 2e-38 of the max's.
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.max(-87.0);
    // floor(y) without `f32::floor`, which is a libm call (no vector
    // form) on baseline x86-64: truncate, then step down where that rounded up.
    let y = x * LOG2E + 0.5;
    let t = y as i32;
    let ni = t - ((t as f32) > y) as i32;
    let n = ni as f32;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let bits = ((ni + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorisable exp against libm over the softmax range.
    #[test]
    fn exp_neg_is_within_a_few_ulp_of_expf() {
        let mut worst = 0f32;
        for i in 0..200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let (a, b) = (exp_neg(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 5e-7, "relative error {worst}");
    }
}
