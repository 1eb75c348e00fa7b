//! Backward passes that candle does not give cheaply: gradients for the
//! *input* of a frozen layer only, and attention that recomputes its
//! probabilities in the backward pass instead of keeping them.
//!
//! candle's `Tensor::backward` computes both operand gradients of every
//! matmul and convolution, frozen weights included, and keeps them
//! (`shared/spec/candle.md` §2): on an SD1.5 UNet that is every weight's
//! gradient, ~3.4 GB, computed at the cost of a second forward pass. And an
//! attention built from candle ops keeps each `N×N` probability map in the
//! graph (512 MB per SD1.5 self-attention at 64×64 latents, several copies
//! for the composite softmax).
//!
//! Both are solved the same way without touching candle: the forward value
//! is computed on *detached* inputs (so the fast inference kernels run and
//! no graph is recorded), then a custom op is applied to the tracked inputs
//! whose forward hands that value over and whose `bwd` returns only the
//! gradients that are needed. The copy in the custom forward is one memcpy
//! of the output, small next to the matmul it replaces.

use std::sync::Mutex;

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
};

/// Whether frozen layers skip their weight gradients (the default). Off only
/// to measure what the skipping saves (`bench/train_bench.rs`).
static SKIP_FROZEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turn the frozen-weight shortcut off (`false`) to get candle's stock
/// backward, which also computes every frozen weight's gradient.
pub fn set_skip_frozen_weight_grads(on: bool) {
    SKIP_FROZEN.store(on, std::sync::atomic::Ordering::Relaxed);
}

pub fn skip_frozen_weight_grads() -> bool {
    SKIP_FROZEN.load(std::sync::atomic::Ordering::Relaxed)
}

/// A fresh contiguous copy of `src` viewed through `l`, on its own device.
fn copy_out<S>(src: &S, l: &Layout) -> Result<S>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    let dev = src.device();
    // SAFETY: every element of `dst` is written by `copy_strided_src`
    // before it is read.
    let mut dst = unsafe { dev.alloc_uninit(l.shape(), src.dtype())? };
    src.copy_strided_src(&mut dst, 0, l)?;
    Ok(dst)
}

// The CUDA forwards below are compiled in every build (candle supplies a
// stand-in `CudaStorage` without the `cuda` feature), so they type-check
// here even though no GPU ran them.

/// Takes the precomputed value out of its slot (the graph must not keep a
/// second copy of every activation alive).
fn take(slot: &Mutex<Option<Tensor>>, name: &str) -> Result<Tensor> {
    slot.lock()
        .map_err(|_| candle_core::Error::Msg(format!("{name}: poisoned")))?
        .take()
        .ok_or_else(|| candle_core::Error::Msg(format!("{name}: forward ran twice")))
}

macro_rules! hand_over {
    ($self:ident, $variant:ident) => {{
        let v = take(&$self.value, $self.name())?;
        let (st, l) = v.storage_and_layout();
        match &*st {
            Storage::$variant(s) => Ok((copy_out(s, l)?, l.shape().clone())),
            _ => candle_core::bail!("{}: value on another device", $self.name()),
        }
    }};
}

type InputBwd = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// `value` as a function of `x` whose gradient is `bwd(grad_out)`.
struct InputGrad {
    value: Mutex<Option<Tensor>>,
    bwd: InputBwd,
}

impl CustomOp1 for InputGrad {
    fn name(&self) -> &'static str {
        "frozen-layer"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        hand_over!(self, Cpu)
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        hand_over!(self, Cuda)
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        (self.bwd)(grad).map(Some)
    }
}

/// Attach `value` (computed from `x.detach()`) to `x`'s graph with the
/// input gradient `bwd(grad)`.
pub fn with_input_grad(
    x: &Tensor,
    value: Tensor,
    bwd: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let value = value.contiguous()?;
    x.apply_op1(InputGrad {
        value: Mutex::new(Some(value)),
        bwd: Box::new(bwd),
    })
}

/// Queries per chunk are chosen so a chunk's score matrix holds at most
/// this many values (64 MB in f32).
pub const CHUNK_ELEMS: usize = 1 << 24;

/// Attention whose backward recomputes softmax(q·kᵀ·s) chunk by chunk from
/// q, k, v and the output, as FlashAttention does: the graph keeps
/// q, k, v and the output, never a probability map.
struct Attention {
    value: Mutex<Option<Tensor>>,
    scale: f64,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        hand_over!(self, Cpu)
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        hand_over!(self, Cuda)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (bh, n, _) = q.dims3()?;
        let m = k.dim(1)?;
        let dtype = q.dtype();
        let cdt = compute_dtype(dtype);
        let (need_q, need_k, need_v) = (q.track_op(), k.track_op(), v.track_op());
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let kc = k.to_dtype(cdt)?.contiguous()?;
        let kt = kc.t()?.contiguous()?;
        let vt = v.to_dtype(cdt)?.t()?.contiguous()?;
        let g = grad.to_dtype(cdt)?;
        let _ = out;
        let step = (CHUNK_ELEMS / (bh * m).max(1)).clamp(1, n);
        let (mut dq, mut dk, mut dv) = (Vec::new(), None::<Tensor>, None::<Tensor>);
        let mut start = 0;
        while start < n {
            let len = step.min(n - start);
            let qc = q.narrow(1, start, len)?.to_dtype(cdt)?;
            let gc = g.narrow(1, start, len)?;
            let p = softmax_rows(&(qc.matmul(&kt)? * self.scale)?)?;
            let dp = gc.matmul(&vt)?;
            // Dᵢ = Σⱼ Pᵢⱼ·dPᵢⱼ from P itself (not gᵢ·oᵢ, which is equal in
            // exact arithmetic): with one key, P = 1 and ds is exactly 0,
            // as torch's is.
            let d_row = (&p * &dp)?.sum_keepdim(2)?;
            let ds = (p.clone() * dp.broadcast_sub(&d_row)?)?;
            if need_q {
                dq.push((ds.matmul(&kc)? * self.scale)?);
            }
            let add = |acc: Option<Tensor>, t: Tensor| -> Result<Option<Tensor>> {
                Ok(Some(match acc {
                    None => t,
                    Some(a) => (a + t)?,
                }))
            };
            if need_k {
                dk = add(dk, (ds.t()?.matmul(&qc)? * self.scale)?)?;
            }
            if need_v {
                dv = add(dv, p.t()?.matmul(&gc)?)?;
            }
            start += len;
        }
        let dq = if need_q {
            Some(Tensor::cat(&dq, 1)?.to_dtype(dtype)?)
        } else {
            None
        };
        let dk = dk.map(|t| t.to_dtype(dtype)).transpose()?;
        let dv = dv.map(|t| t.to_dtype(dtype)).transpose()?;
        Ok((dq, dk, dv))
    }
}

/// Scores in f32 for f16/bf16 (diffusers' `upcast_attention`), f64 kept.
pub fn compute_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Numerically stable softmax over the last dim, for tensors no graph
/// tracks (the backward above and the untracked forward).
fn softmax_rows(s: &Tensor) -> Result<Tensor> {
    if s.device().is_cpu() && s.dtype() == DType::F32 {
        return candle_nn::ops::softmax_last_dim(s);
    }
    let max = s.max_keepdim(candle_core::D::Minus1)?;
    let e = s.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(candle_core::D::Minus1)?)
}

/// softmax(q·kᵀ·scale)·v for detached `[B·H, N, d]` inputs, chunked over
/// queries so no more than [`CHUNK_ELEMS`] scores exist at once.
pub fn attention_chunked(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (bh, n, _) = q.dims3()?;
    let m = k.dim(1)?;
    let dtype = q.dtype();
    let cdt = compute_dtype(dtype);
    let kt = k.to_dtype(cdt)?.t()?.contiguous()?;
    let vc = v.to_dtype(cdt)?;
    let step = (CHUNK_ELEMS / (bh * m).max(1)).clamp(1, n);
    let mut parts = Vec::with_capacity(n.div_ceil(step));
    let mut start = 0;
    while start < n {
        let len = step.min(n - start);
        let qc = q.narrow(1, start, len)?.to_dtype(cdt)?;
        let p = softmax_rows(&(qc.matmul(&kt)? * scale)?)?;
        parts.push(p.matmul(&vc)?);
        start += len;
    }
    let out = if parts.len() == 1 {
        parts.pop().expect("one part")
    } else {
        Tensor::cat(&parts, 1)?
    };
    out.to_dtype(dtype)
}

/// Attach an attention output computed from detached q, k, v to their
/// graphs with the recomputing backward.
pub fn attention_tracked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    value: Tensor,
    scale: f64,
) -> Result<Tensor> {
    let value = value.contiguous()?;
    q.apply_op3(
        k,
        v,
        Attention {
            value: Mutex::new(Some(value)),
            scale,
        },
    )
}
