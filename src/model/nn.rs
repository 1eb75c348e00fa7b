//! The layers every network here is built from, and the one place adapters
//! live.
//!
//! A [`Linear`] or [`Conv2d`] owns its frozen weight *and* the adapter
//! factors aimed at it, so no block ever asks "is there an adapter here?".
//! Adapters are applied functionally, `y = W·x + Σₖ cₖ(row)·Uₖ(Dₖ·x)`, never
//! merged: one batch can hold rows at different strengths (FT gives every
//! prompt its own), and the trainer (a later issue) gets gradients of the
//! factors through an untouched graph.
//!
//! Norms and softmax pick candle's fused kernels only when nothing in the
//! call records a graph: those kernels have no backward and cut autograd
//! *silently* (`shared/spec/candle.md` §1), so a tracked input takes the
//! composite form, which differentiates.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// How the factors of several adapters on one layer combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mix {
    /// SPM's reference (`infer_spm.py`): every factor is scaled by its
    /// multiplier m and the factors are summed before they multiply, so one
    /// membrane applies m² and two mix with cross terms
    /// (spm-reference.md §3.4). The layer scale is the first adapter's
    /// alpha/rank, as the reference fixes it from the first file.
    #[default]
    Reference,
    /// LoRA-style: `Σₖ sₖ·(αₖ/rₖ)·Uₖ·Dₖ`, what A1111 and diffusers do.
    Delta,
}

/// Per-batch-row strengths of each adapter slot for one network call.
///
/// Under [`Mix::Reference`] a value is the multiplier m; under [`Mix::Delta`]
/// the strength s of the delta. Rows of one sample (its cond and uncond
/// branches) carry the same value.
#[derive(Debug, Clone)]
pub struct Rows {
    pub mix: Mix,
    /// slot → `[B]` f32 tensor; `None` where the slot is 0 on every row
    /// (its adapters are skipped).
    slots: Vec<Option<Tensor>>,
}

impl Rows {
    /// No adapter active: the base network.
    pub fn none() -> Rows {
        Rows {
            mix: Mix::Reference,
            slots: Vec::new(),
        }
    }

    /// `values[slot][row]`.
    pub fn new(mix: Mix, values: &[Vec<f32>], dev: &candle_core::Device) -> Result<Rows> {
        let slots = values
            .iter()
            .map(|v| {
                if v.iter().all(|x| *x == 0.0) {
                    Ok(None)
                } else {
                    Tensor::from_slice(v, v.len(), dev).map(Some)
                }
            })
            .collect::<Result<_>>()?;
        Ok(Rows { mix, slots })
    }

    fn slot(&self, k: usize) -> Option<&Tensor> {
        self.slots.get(k).and_then(Option::as_ref)
    }
}

/// One adapter's factors on one layer: `down` `[r, in(, kh, kw)]`,
/// `up` `[out, r(, 1, 1)]`, scale α/r, and which strength slot drives it.
#[derive(Debug, Clone)]
pub struct Factor {
    pub down: Tensor,
    pub up: Tensor,
    pub scale: f64,
    pub slot: usize,
    /// The adapter file, for error messages.
    pub from: Arc<str>,
}

/// Adapter factors by the dotted diffusers path of the layer they adapt,
/// with a record of which were picked up (so none is silently ignored).
#[derive(Debug, Default)]
pub struct AdapterSet {
    by_path: HashMap<String, Vec<Factor>>,
    used: Mutex<Vec<String>>,
}

impl AdapterSet {
    pub fn new(by_path: HashMap<String, Vec<Factor>>) -> Self {
        AdapterSet {
            by_path,
            used: Mutex::new(Vec::new()),
        }
    }

    fn take(&self, path: &str) -> Vec<Factor> {
        match self.by_path.get(path) {
            Some(f) => {
                self.used.lock().expect("adapter lock").push(path.into());
                f.clone()
            }
            None => Vec::new(),
        }
    }

    /// Paths that no layer of the built network claimed.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().expect("adapter lock");
        let mut out: Vec<String> = self
            .by_path
            .keys()
            .filter(|k| !used.contains(k))
            .cloned()
            .collect();
        out.sort();
        out
    }
}

/// What network constructors take: the weights and the adapters, with one
/// shared prefix (diffusers' dotted path of the module being built).
#[derive(Clone)]
pub struct Builder<'a> {
    pub vb: VarBuilder<'a>,
    adapters: Arc<AdapterSet>,
}

impl<'a> Builder<'a> {
    pub fn new(vb: VarBuilder<'a>, adapters: Arc<AdapterSet>) -> Self {
        Builder { vb, adapters }
    }

    pub fn pp(&self, s: impl ToString) -> Self {
        Builder {
            vb: self.vb.pp(s),
            adapters: self.adapters.clone(),
        }
    }

    pub fn dtype(&self) -> DType {
        self.vb.dtype()
    }

    fn factors(&self) -> Vec<Factor> {
        self.adapters.take(&self.vb.prefix())
    }

    pub fn linear(&self, d_in: usize, d_out: usize, bias: bool) -> Result<Linear> {
        let weight = self.vb.get((d_out, d_in), "weight")?;
        let bias = if bias {
            Some(self.vb.get(d_out, "bias")?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            factors: check_factors(self.factors(), &self.vb.prefix(), &[d_out, d_in])?,
        })
    }

    /// A 2-D convolution with bias; `kernel` square, padding `pad`.
    pub fn conv2d(
        &self,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        pad: usize,
    ) -> Result<Conv2d> {
        let weight = self.vb.get((c_out, c_in, kernel, kernel), "weight")?;
        let bias = self.vb.get(c_out, "bias")?;
        Ok(Conv2d {
            weight,
            bias,
            stride,
            pad,
            factors: check_factors(
                self.factors(),
                &self.vb.prefix(),
                &[c_out, c_in, kernel, kernel],
            )?,
        })
    }

    pub fn group_norm(&self, groups: usize, channels: usize, eps: f64) -> Result<GroupNorm> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!(
                "{}: {channels} channels cannot be split into {groups} groups",
                self.vb.prefix()
            );
        }
        Ok(GroupNorm {
            weight: self.vb.get(channels, "weight")?,
            bias: self.vb.get(channels, "bias")?,
            groups,
            eps,
        })
    }

    pub fn layer_norm(&self, dim: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            inner: candle_nn::LayerNorm::new(
                self.vb.get(dim, "weight")?,
                self.vb.get(dim, "bias")?,
                eps,
            ),
            eps,
        })
    }
}

/// Factor shapes must fit the layer: down `[r, in, kh, kw]` (or `[r, in]`
/// for a Linear; a 1×1 conv also takes 2-D factors), up `[out, r(, 1, 1)]`.
/// Factors are reshaped here to the layout the forward pass wants.
fn check_factors(factors: Vec<Factor>, path: &str, w: &[usize]) -> Result<Vec<Factor>> {
    let out_dim = w[0];
    let per_row: usize = w[1..].iter().product();
    factors
        .into_iter()
        .map(|f| {
            let r = f.down.dim(0)?;
            let d_n = f.down.elem_count();
            let u_n = f.up.elem_count();
            if r == 0 || d_n != r * per_row || u_n != out_dim * r {
                candle_core::bail!(
                    "{}: module {path}: factors down {:?} / up {:?} do not fit the layer's weight {:?} (is the adapter for another architecture?)",
                    f.from,
                    f.down.dims(),
                    f.up.dims(),
                    w
                );
            }
            let (down, up) = if w.len() == 4 {
                (
                    f.down.reshape((r, w[1], w[2], w[3]))?,
                    f.up.reshape((out_dim, r, 1, 1))?,
                )
            } else {
                (f.down.reshape((r, w[1]))?, f.up.reshape((out_dim, r))?)
            };
            Ok(Factor { down, up, ..f })
        })
        .collect()
}

/// Broadcast a `[B]` strength over a `[B, …]` activation of rank `rank`.
fn row_coef(s: &Tensor, rank: usize, dtype: DType) -> Result<Tensor> {
    let b = s.dim(0)?;
    let mut shape = vec![b];
    shape.resize(rank, 1);
    s.to_dtype(dtype)?.reshape(shape)
}

/// `Σ cₖ(row)·Uₖ(Dₖ·x)` under either mixing rule; `down`/`up` apply one
/// factor to an activation.
fn adapter_sum(
    x: &Tensor,
    factors: &[Factor],
    rows: &Rows,
    down: impl Fn(&Factor, &Tensor) -> Result<Tensor>,
    up: impl Fn(&Factor, &Tensor) -> Result<Tensor>,
) -> Result<Option<Tensor>> {
    let active: Vec<(&Factor, &Tensor)> = factors
        .iter()
        .filter_map(|f| rows.slot(f.slot).map(|s| (f, s)))
        .collect();
    if active.is_empty() {
        return Ok(None);
    }
    let rank = x.rank();
    match rows.mix {
        Mix::Delta => {
            let mut acc: Option<Tensor> = None;
            for (f, s) in active {
                let c = (row_coef(s, rank, x.dtype())? * f.scale)?;
                let y = up(f, &down(f, x)?)?.broadcast_mul(&c)?;
                acc = Some(match acc {
                    None => y,
                    Some(a) => (a + y)?,
                });
            }
            Ok(acc)
        }
        Mix::Reference => {
            // h = Σⱼ mⱼ·Dⱼx, then Σₖ mₖ·Uₖh: the factor-wise sum of the
            // reference, cross terms included.
            let r0 = active[0].0.down.dim(0)?;
            if let Some((f, _)) = active.iter().find(|(f, _)| f.down.dim(0).ok() != Some(r0)) {
                candle_core::bail!(
                    "the reference mixing sums factors, so every membrane on a layer needs the same rank (got {r0} and {}); use --mix delta",
                    f.down.dim(0)?
                );
            }
            let coefs: Vec<Tensor> = active
                .iter()
                .map(|(_, s)| row_coef(s, rank, x.dtype()))
                .collect::<Result<_>>()?;
            let mut h: Option<Tensor> = None;
            for ((f, _), c) in active.iter().zip(&coefs) {
                let y = down(f, x)?.broadcast_mul(c)?;
                h = Some(match h {
                    None => y,
                    Some(a) => (a + y)?,
                });
            }
            let h = h.expect("at least one active factor");
            let mut acc: Option<Tensor> = None;
            for ((f, _), c) in active.iter().zip(&coefs) {
                let y = up(f, &h)?.broadcast_mul(c)?;
                acc = Some(match acc {
                    None => y,
                    Some(a) => (a + y)?,
                });
            }
            let scale = active[0].0.scale;
            Ok(Some((acc.expect("at least one active factor") * scale)?))
        }
    }
}

/// `x·Wᵀ` for `[…, in]` activations, flattened to one 2-D matmul (faster
/// than a broadcast batched matmul in candle's CPU backend).
fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let d_in = *dims.last().expect("rank ≥ 1");
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, d_in))?.matmul(&w.t()?)?;
    let mut out = dims;
    *out.last_mut().expect("rank ≥ 1") = w.dim(0)?;
    y.reshape(out)
}

/// A linear layer with optional adapters.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub factors: Vec<Factor>,
}

impl Linear {
    pub fn forward(&self, x: &Tensor, rows: &Rows) -> Result<Tensor> {
        let mut y = matmul_t(x, &self.weight)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let extra = adapter_sum(
            x,
            &self.factors,
            rows,
            |f, x| matmul_t(x, &f.down),
            |f, h| matmul_t(h, &f.up),
        )?;
        match extra {
            Some(e) => y + e,
            None => Ok(y),
        }
    }
}

/// A 2-D convolution (NCHW) with bias and optional adapters: the down
/// factor is a convolution like the weight (same kernel, stride, padding),
/// the up factor a 1×1 convolution, as kohya's LoCon defines them.
#[derive(Debug, Clone)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub stride: usize,
    pub pad: usize,
    pub factors: Vec<Factor>,
}

impl Conv2d {
    pub fn forward(&self, x: &Tensor, rows: &Rows) -> Result<Tensor> {
        let conv = |x: &Tensor, w: &Tensor, stride, pad| {
            if w.dim(2)? == 1 && w.dim(3)? == 1 && stride == 1 && pad == 0 {
                // A 1×1 convolution is a matmul over channels; candle's
                // im2col path costs a copy for nothing here.
                let (b, c, h, wd) = x.dims4()?;
                let o = w.dim(0)?;
                let w2 = w.reshape((o, c))?;
                let y = w2.broadcast_matmul(&x.reshape((b, c, h * wd))?)?;
                y.reshape((b, o, h, wd))
            } else if w.dim(2)? == 3
                && w.dim(3)? == 3
                && stride == 1
                && pad == 1
                && x.device().is_cpu()
                && x.dtype() == DType::F32
                && !x.track_op()
                && !w.track_op()
            {
                x.contiguous()?
                    .apply_op2_no_bwd(&w.contiguous()?, &super::kernels::Conv3x3)
            } else {
                x.conv2d(w, pad, stride, 1, 1)
            }
        };
        let y = conv(x, &self.weight, self.stride, self.pad)?;
        let y = y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)?;
        let extra = adapter_sum(
            x,
            &self.factors,
            rows,
            |f, x| conv(x, &f.down, self.stride, self.pad),
            |f, h| conv(h, &f.up, 1, 0),
        )?;
        match extra {
            Some(e) => y + e,
            None => Ok(y),
        }
    }
}

/// GroupNorm over NCHW (or N, C, L) activations. candle-nn's is composite
/// (differentiable) already; it is wrapped so the builder names it.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let dtype = x.dtype();
        // Statistics in f32 for f16/bf16 activations, never below the
        // input's own precision (f64 stays f64).
        let stats = if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let x = x.reshape((b, self.groups, ()))?.to_dtype(stats)?;
        let mean = x.mean_keepdim(2)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(2)?;
        let x = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let mut shape = vec![1, c];
        shape.resize(dims.len(), 1);
        x.to_dtype(dtype)?
            .reshape(dims)?
            .broadcast_mul(&self.weight.reshape(shape.clone())?)?
            .broadcast_add(&self.bias.reshape(shape)?)
    }
}

/// LayerNorm over the last dimension: the fused kernel for inference, the
/// composite form when a graph is recorded (the fused one has no backward).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    inner: candle_nn::LayerNorm,
    eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !x.track_op() && !self.inner.weight().track_op() {
            return self.inner.forward(x);
        }
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let y = y.broadcast_mul(self.inner.weight())?;
        match self.inner.bias() {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Softmax over the last dimension, differentiable when a graph is recorded.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// Scaled dot-product attention of `[B·H, N, d]` queries against `[B·H, M, d]`
/// keys/values, in query chunks so the score matrix never exceeds
/// `CHUNK_ELEMS` values (a 64×64 latent's self-attention would otherwise
/// hold B·H·4096² floats at once: 1 GiB at batch 2 in SD1.5). Scores are
/// computed in f32 (what `upcast_attention` asks for, and harmless in f32).
/// On the CPU, when no graph is recorded, the fused kernel of
/// [`super::kernels`] does the same without ever holding the scores.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    const CHUNK_ELEMS: usize = 1 << 24;
    let (bh, n, _) = q.dims3()?;
    let m = k.dim(1)?;
    let dtype = q.dtype();
    let recording = q.track_op() || k.track_op() || v.track_op();
    if !recording && q.device().is_cpu() {
        let op = super::kernels::FusedAttention {
            scale: scale as f32,
        };
        let f = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
        return f(q)?.apply_op3_no_bwd(&f(k)?, &f(v)?, &op)?.to_dtype(dtype);
    }
    // Scores in f32 for f16/bf16 (upcast_attention), f64 kept as f64.
    let cdt = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let kt = k.to_dtype(cdt)?.t()?.contiguous()?;
    let v32 = v.to_dtype(cdt)?;
    let step = (CHUNK_ELEMS / (bh * m).max(1)).clamp(1, n);
    let mut parts = Vec::with_capacity(n.div_ceil(step));
    let mut start = 0;
    while start < n {
        let len = step.min(n - start);
        let qc = q.narrow(1, start, len)?.to_dtype(cdt)?;
        let s = (qc.matmul(&kt)? * scale)?;
        let p = softmax_last(&s)?;
        parts.push(p.matmul(&v32)?);
        start += len;
    }
    let out = if parts.len() == 1 {
        parts.pop().expect("one part")
    } else {
        Tensor::cat(&parts, 1)?
    };
    out.to_dtype(dtype)
}

/// A candle error as one line for users: the message without the
/// backtrace candle attaches when `RUST_BACKTRACE` is set.
pub fn error_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => error_message(inner),
        candle_core::Error::Context { inner, context } => {
            format!("{context}: {}", error_message(inner))
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// The fused CPU kernels (taken when nothing records a graph) and the
    /// differentiable candle ops (taken when something does) agree, so the
    /// trainer sees the network `generate` runs. Attention is checked
    /// against the textbook softmax(QKᵀ·s)V, the convolution against
    /// candle's conv2d.
    #[test]
    fn fused_kernels_equal_the_differentiable_path() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (3, 300, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (3, 77, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (3, 77, 5), &dev).unwrap();
        let fused = attention(&q, &k, &v, 0.35).unwrap();
        let tracked = Var::from_tensor(&q).unwrap();
        let composite = attention(tracked.as_tensor(), &k, &v, 0.35).unwrap();
        let textbook = candle_nn::ops::softmax(
            &(q.matmul(&k.t().unwrap()).unwrap() * 0.35).unwrap(),
            D::Minus1,
        )
        .unwrap()
        .matmul(&v)
        .unwrap();
        assert!(max_diff(&fused, &textbook) < 1e-5);
        assert!(max_diff(&composite, &textbook) < 1e-5);

        let x = Tensor::randn(0f32, 1., (2, 5, 7, 9), &dev).unwrap();
        let w = Tensor::randn(0f32, 1., (4, 5, 3, 3), &dev).unwrap();
        let b = Tensor::zeros(4, DType::F32, &dev).unwrap();
        let conv = Conv2d {
            weight: w.clone(),
            bias: b,
            stride: 1,
            pad: 1,
            factors: Vec::new(),
        };
        let fused = conv.forward(&x, &Rows::none()).unwrap();
        let reference = x.conv2d(&w, 1, 1, 1, 1).unwrap();
        assert!(max_diff(&fused, &reference) < 1e-4);
    }
}
