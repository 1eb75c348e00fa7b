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

use super::autograd::{skip_frozen_weight_grads, with_input_grad};

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
    /// Forget-Me-Not's hook on the cross-attention maps, when one is set.
    pub probe: Option<Arc<AttnProbe>>,
}

/// Collects, from every cross-attention (`attn2`) layer of one forward
/// pass, `Σ p²` over the probabilities `p` at the masked key columns:
/// Forget-Me-Not's loss is the square root of their sum. The maps it reads
/// are `N×77`, small enough to keep in the graph.
#[derive(Debug)]
pub struct AttnProbe {
    /// `[B, M]` 0/1 over the key (token) columns.
    pub mask: Tensor,
    sums: Mutex<Vec<Tensor>>,
}

impl AttnProbe {
    pub fn new(mask: Tensor) -> Self {
        AttnProbe {
            mask,
            sums: Mutex::new(Vec::new()),
        }
    }

    /// The per-layer sums recorded so far, in forward order.
    pub fn take(&self) -> Vec<Tensor> {
        std::mem::take(&mut *self.sums.lock().expect("probe lock"))
    }

    fn push(&self, t: Tensor) {
        self.sums.lock().expect("probe lock").push(t);
    }
}

impl Rows {
    /// No adapter active: the base network.
    pub fn none() -> Rows {
        Rows {
            mix: Mix::Reference,
            slots: Vec::new(),
            probe: None,
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
        Ok(Rows {
            mix,
            slots,
            probe: None,
        })
    }

    /// The same strengths with Forget-Me-Not's attention probe attached.
    pub fn with_probe(mut self, probe: Arc<AttnProbe>) -> Rows {
        self.probe = Some(probe);
        self
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
    train: Option<Arc<Trainables>>,
}

/// What a trainer asks the builder to make trainable: the selected layers'
/// own weight and bias (ESD, Forget-Me-Not `--full`), and/or fresh LoRA
/// factors on the selected layers (SPM's membranes, `--rank`). Selection
/// is by dotted diffusers module path (`…attn2.to_k`); everything made
/// trainable is recorded as a [`Var`](candle_core::Var) under a stable name
/// (`<path>.weight`/`.bias`, `<path>.down`/`.up`), in build order.
pub struct Trainables {
    full: Option<Selector>,
    lora: Option<(Selector, usize, f64)>,
    rng: Mutex<super::noise::TorchRng>,
    vars: Mutex<Vec<(String, candle_core::Var)>>,
    modules: Mutex<Vec<String>>,
}

type Selector = Box<dyn Fn(&str) -> bool + Send + Sync>;

impl std::fmt::Debug for Trainables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Trainables({} vars)", self.vars().len())
    }
}

impl Trainables {
    /// Nothing selected yet; `seed` drives the LoRA `down` initialisation.
    pub fn new(seed: u64) -> Self {
        Trainables {
            full: None,
            lora: None,
            rng: Mutex::new(super::noise::TorchRng::manual_seed(seed)),
            vars: Mutex::new(Vec::new()),
            modules: Mutex::new(Vec::new()),
        }
    }

    /// Train the weight and bias of the layers `select` picks.
    pub fn full(mut self, select: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        self.full = Some(Box::new(select));
        self
    }

    /// Put a rank-`rank` LoRA with scale `alpha/rank` on the layers
    /// `select` picks, initialised as kohya and SPM do: `down` from
    /// kaiming_uniform(a=√5) = U(±1/√fan_in), `up` = 0 (so the network
    /// starts as the base model).
    pub fn lora(
        mut self,
        select: impl Fn(&str) -> bool + Send + Sync + 'static,
        rank: usize,
        alpha: f64,
    ) -> Self {
        self.lora = Some((Box::new(select), rank, alpha));
        self
    }

    /// Whether some layers train their full weights.
    pub fn has_full(&self) -> bool {
        self.full.is_some()
    }

    /// `(name, variable)` in build order.
    pub fn vars(&self) -> Vec<(String, candle_core::Var)> {
        self.vars.lock().expect("vars lock").clone()
    }

    /// The module paths that got something trainable, in build order.
    pub fn modules(&self) -> Vec<String> {
        self.modules.lock().expect("modules lock").clone()
    }

    /// The LoRA's rank and alpha, when one was asked for.
    pub fn lora_rank_alpha(&self) -> Option<(usize, f64)> {
        self.lora.as_ref().map(|(_, r, a)| (*r, *a))
    }

    fn adopt(&self, name: String, t: &Tensor) -> Result<Tensor> {
        let v = candle_core::Var::from_tensor(t)?;
        let out = v.as_tensor().clone();
        self.vars.lock().expect("vars lock").push((name, v));
        Ok(out)
    }

    fn note(&self, path: &str) {
        let mut m = self.modules.lock().expect("modules lock");
        if m.last().map(String::as_str) != Some(path) {
            m.push(path.to_string());
        }
    }

    /// The layer's weight and bias, as variables when selected.
    fn weights(
        &self,
        path: &str,
        w: Tensor,
        b: Option<Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        match &self.full {
            Some(sel) if sel(path) => {
                self.note(path);
                let w = self.adopt(format!("{path}.weight"), &w)?;
                let b = b
                    .map(|b| self.adopt(format!("{path}.bias"), &b))
                    .transpose()?;
                Ok((w, b))
            }
            _ => Ok((w, b)),
        }
    }

    /// A fresh factor for a layer with weight shape `w` (`[out, in(, k, k)]`).
    fn factor(
        &self,
        path: &str,
        w: &[usize],
        dtype: DType,
        dev: &candle_core::Device,
    ) -> Result<Option<Factor>> {
        let Some((sel, rank, alpha)) = &self.lora else {
            return Ok(None);
        };
        if !sel(path) {
            return Ok(None);
        }
        self.note(path);
        let fan_in: usize = w[1..].iter().product();
        let bound = 1.0 / (fan_in as f64).sqrt();
        let mut d_shape = vec![*rank];
        d_shape.extend_from_slice(&w[1..]);
        let mut u_shape = vec![w[0], *rank];
        u_shape.resize(w.len(), 1);
        let n: usize = d_shape.iter().product();
        let u01 = self.rng.lock().expect("rng lock").rand(n);
        let vals: Vec<f32> = u01
            .iter()
            .map(|u| ((2.0 * *u as f64 - 1.0) * bound) as f32)
            .collect();
        let down = Tensor::from_vec(vals, d_shape, dev)?.to_dtype(dtype)?;
        let up = Tensor::zeros(u_shape, dtype, dev)?;
        Ok(Some(Factor {
            down: self.adopt(format!("{path}.down"), &down)?,
            up: self.adopt(format!("{path}.up"), &up)?,
            scale: alpha / *rank as f64,
            slot: 0,
            from: "trained".into(),
        }))
    }
}

impl<'a> Builder<'a> {
    pub fn new(vb: VarBuilder<'a>, adapters: Arc<AdapterSet>) -> Self {
        Builder {
            vb,
            adapters,
            train: None,
        }
    }

    /// Layers `train` selects get trainable weights or factors.
    pub fn with_trainables(mut self, train: Arc<Trainables>) -> Self {
        self.train = Some(train);
        self
    }

    pub fn pp(&self, s: impl ToString) -> Self {
        Builder {
            vb: self.vb.pp(s),
            adapters: self.adapters.clone(),
            train: self.train.clone(),
        }
    }

    /// The weight (and bias) of the module being built, as variables when
    /// it is selected for full training.
    fn trainable(&self, w: Tensor, b: Option<Tensor>) -> Result<(Tensor, Option<Tensor>)> {
        match &self.train {
            Some(t) => t.weights(&self.vb.prefix(), w, b),
            None => Ok((w, b)),
        }
    }

    /// The adapters aimed at this layer, plus a trainable factor when the
    /// trainer selected it.
    fn layer_factors(&self, w: &[usize], weight: &Tensor) -> Result<Vec<Factor>> {
        let path = self.vb.prefix();
        let mut f = check_factors(self.factors(), &path, w)?;
        if let Some(t) = &self.train {
            if let Some(new) = t.factor(&path, w, weight.dtype(), weight.device())? {
                f.extend(check_factors(vec![new], &path, w)?);
            }
        }
        Ok(f)
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
        let (weight, bias) = self.trainable(weight, bias)?;
        let factors = self.layer_factors(&[d_out, d_in], &weight)?;
        Ok(Linear {
            weight,
            bias,
            factors,
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
        let (weight, bias) = self.trainable(weight, Some(bias))?;
        let bias = bias.expect("conv bias");
        let factors = self.layer_factors(&[c_out, c_in, kernel, kernel], &weight)?;
        Ok(Conv2d {
            weight,
            bias,
            stride,
            pad,
            factors,
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

/// `x·Wᵀ`; when only `x` is tracked, the weight's gradient is skipped.
fn linear_core(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if x.track_op() && !w.track_op() && skip_frozen_weight_grads() {
        let y = matmul_t(&x.detach(), w)?;
        let (w, dims) = (w.clone(), x.dims().to_vec());
        return with_input_grad(x, y, move |g| {
            let o = w.dim(0)?;
            g.reshape(((), o))?.matmul(&w)?.reshape(dims.clone())
        });
    }
    matmul_t(x, w)
}

impl Linear {
    pub fn forward(&self, x: &Tensor, rows: &Rows) -> Result<Tensor> {
        let mut y = linear_core(x, &self.weight)?;
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

/// The convolution itself, fastest form first: 1×1 as a channel matmul,
/// 3×3 stride-1 as the fused CPU kernel when nothing is tracked, else
/// candle's conv2d.
fn conv_core(x: &Tensor, w: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    let (kh, kw) = (w.dim(2)?, w.dim(3)?);
    if x.track_op() && !w.track_op() && skip_frozen_weight_grads() {
        let y = conv_core(&x.detach(), w, stride, pad)?;
        let (w, xd) = (w.clone(), x.dims().to_vec());
        return with_input_grad(x, y, move |g| conv_input_grad(g, &w, &xd, stride, pad));
    }
    if kh == 1 && kw == 1 && stride == 1 && pad == 0 {
        // A 1×1 convolution is a matmul over channels; candle's im2col
        // path costs a copy for nothing here.
        let (b, c, h, wd) = x.dims4()?;
        let o = w.dim(0)?;
        let w2 = w.reshape((o, c))?;
        let y = w2.broadcast_matmul(&x.reshape((b, c, h * wd))?)?;
        y.reshape((b, o, h, wd))
    } else if kh == 3
        && kw == 3
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
}

/// ∂L/∂x of a convolution with a frozen kernel. Stride 1 with "same"
/// padding is itself a convolution with the kernel transposed and flipped
/// (so the fast kernels run); strided ones use candle's transposed conv.
fn conv_input_grad(
    g: &Tensor,
    w: &Tensor,
    x_dims: &[usize],
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    let (kh, kw) = (w.dim(2)?, w.dim(3)?);
    if stride == 1 && kh == kw && 2 * pad + 1 == kh {
        // Flipping both spatial axes reverses the flattened kh·kw taps.
        let (o, c) = (w.dim(0)?, w.dim(1)?);
        let taps = kh * kw;
        let rev: Vec<u32> = (0..taps as u32).rev().collect();
        let rev = Tensor::new(rev.as_slice(), w.device())?;
        let wt = w
            .reshape((o, c, taps))?
            .contiguous()?
            .index_select(&rev, 2)?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((c, o, kh, kw))?;
        return conv_core(g, &wt, 1, pad);
    }
    let (gh, gw) = (g.dim(2)?, g.dim(3)?);
    let full = |gd: usize, k: usize| (gd - 1) * stride + k - 2 * pad;
    let (oh, ow) = (x_dims[2] - full(gh, kh), x_dims[3] - full(gw, kw));
    if oh != ow {
        candle_core::bail!(
            "the backward of a strided convolution needs equal output paddings, got {oh} and {ow} (input {x_dims:?})"
        );
    }
    g.conv_transpose2d(w, pad, oh, stride, 1)
}

impl Conv2d {
    pub fn forward(&self, x: &Tensor, rows: &Rows) -> Result<Tensor> {
        let y = conv_core(x, &self.weight, self.stride, self.pad)?;
        let y = y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)?;
        let extra = adapter_sum(
            x,
            &self.factors,
            rows,
            |f, x| conv_core(x, &f.down, self.stride, self.pad),
            |f, h| conv_core(h, &f.up, 1, 0),
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
        if x.track_op() && !self.weight.track_op() && !self.bias.track_op() {
            // The same value with an input-only backward that recomputes
            // the statistics: the composite form would keep five
            // activation-sized intermediates per norm in the graph.
            let y = self.composite(&x.detach())?;
            let (xd, w, groups, eps) = (x.detach(), self.weight.clone(), self.groups, self.eps);
            return with_input_grad(x, y, move |g| {
                group_norm_input_grad(&xd, g, &w, groups, eps)
            });
        }
        self.composite(x)
    }

    fn composite(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let dtype = x.dtype();
        // Statistics in f32 for f16/bf16 activations, never below the
        // input's own precision (f64 stays f64).
        let stats = super::autograd::compute_dtype(dtype);
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

/// ∂L/∂x of GroupNorm with a frozen affine: per group,
/// `(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))/σ` with `ĝ = g·w`.
fn group_norm_input_grad(
    x: &Tensor,
    g: &Tensor,
    w: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (b, c) = (dims[0], dims[1]);
    let dtype = x.dtype();
    let cdt = super::autograd::compute_dtype(dtype);
    let mut shape = vec![1, c];
    shape.resize(dims.len(), 1);
    let gh = g
        .broadcast_mul(&w.reshape(shape)?)?
        .reshape((b, groups, ()))?
        .to_dtype(cdt)?;
    let x = x.reshape((b, groups, ()))?.to_dtype(cdt)?;
    let mean = x.mean_keepdim(2)?;
    let xc = x.broadcast_sub(&mean)?;
    let sigma = (xc.sqr()?.mean_keepdim(2)? + eps)?.sqrt()?;
    let xh = xc.broadcast_div(&sigma)?;
    let a = gh.mean_keepdim(2)?;
    let m = (&gh * &xh)?.mean_keepdim(2)?;
    gh.broadcast_sub(&a)?
        .sub(&xh.broadcast_mul(&m)?)?
        .broadcast_div(&sigma)?
        .to_dtype(dtype)?
        .reshape(dims)
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
        let w = self.inner.weight();
        let b = self.inner.bias();
        let composite = |x: &Tensor| -> Result<Tensor> {
            let mean = x.mean_keepdim(D::Minus1)?;
            let xc = x.broadcast_sub(&mean)?;
            let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
            let y = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
            let y = y.broadcast_mul(w)?;
            match b {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            }
        };
        // candle's fused kernel has no f64 form.
        let fused = |x: &Tensor| {
            if x.dtype() == DType::F64 {
                composite(x)
            } else {
                self.inner.forward(x)
            }
        };
        if !x.track_op() && !w.track_op() {
            return fused(x);
        }
        if !w.track_op() && !b.is_some_and(|b| b.track_op()) {
            // The fused forward (so a tracked call computes exactly what an
            // untracked one does: SPM's "membrane on at init" equals "off"
            // bitwise) with the input gradient only:
            // dx = (ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))/σ, ĝ = g·w.
            let y = fused(&x.detach())?;
            let (xd, w, eps) = (x.detach(), w.clone(), self.eps);
            return with_input_grad(x, y, move |g| {
                let mean = xd.mean_keepdim(D::Minus1)?;
                let xc = xd.broadcast_sub(&mean)?;
                let sigma = (xc.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?;
                let xh = xc.broadcast_div(&sigma)?;
                let gh = g.broadcast_mul(&w)?;
                let a = gh.mean_keepdim(D::Minus1)?;
                let c = (&gh * &xh)?.mean_keepdim(D::Minus1)?;
                gh.broadcast_sub(&a)?
                    .sub(&xh.broadcast_mul(&c)?)?
                    .broadcast_div(&sigma)
            });
        }
        composite(x)
    }
}

/// Scaled dot-product attention of `[B·H, N, d]` queries against `[B·H, M, d]`
/// keys/values. Scores are computed in f32 (what `upcast_attention` asks
/// for), f64 kept as f64. On the CPU in f32 the fused kernel of
/// [`super::kernels`] never holds the scores; elsewhere they are formed in
/// query chunks of at most [`super::autograd::CHUNK_ELEMS`] values (a 64×64
/// latent's self-attention would otherwise hold B·H·4096² floats at once).
/// When a graph is recorded, the value is attached with a backward that
/// recomputes the probabilities chunk by chunk, so training never keeps an
/// `N×N` map either.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let recording = q.track_op() || k.track_op() || v.track_op();
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let value = if q.device().is_cpu() && q.dtype() != DType::F64 {
        let op = super::kernels::FusedAttention {
            scale: scale as f32,
        };
        let f = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
        f(&qd)?
            .apply_op3_no_bwd(&f(&kd)?, &f(&vd)?, &op)?
            .to_dtype(q.dtype())?
    } else {
        super::autograd::attention_chunked(&qd, &kd, &vd, scale)?
    };
    if !recording {
        return Ok(value);
    }
    super::autograd::attention_tracked(q, k, v, value, scale)
}

/// Attention that also hands Forget-Me-Not's probe `Σ p²` over the masked
/// key columns. The probabilities stay in the graph (cross-attention maps
/// are `N×77`), through the differentiable composite softmax.
pub fn attention_probed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    probe: &AttnProbe,
) -> Result<Tensor> {
    let (bh, n, _) = q.dims3()?;
    let m = k.dim(1)?;
    let b = probe.mask.dim(0)?;
    let dtype = q.dtype();
    let cdt = super::autograd::compute_dtype(dtype);
    let s = (q.to_dtype(cdt)?.matmul(&k.to_dtype(cdt)?.t()?)? * scale)?;
    let p = candle_nn::ops::softmax(&s, D::Minus1)?;
    let mask = probe.mask.to_dtype(cdt)?.reshape((b, 1, 1, m))?;
    let sel = p.reshape((b, bh / b, n, m))?.broadcast_mul(&mask)?;
    probe.push(sel.sqr()?.sum_all()?);
    p.matmul(&v.to_dtype(cdt)?)?.to_dtype(dtype)
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
