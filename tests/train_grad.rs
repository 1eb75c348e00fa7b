//! Finite differences through every trainable path of `spm train`, in
//! f64 on the tiny SD1 pipeline: for each method's loss (at a fixed latent:
//! the trajectory is sampled without gradients in every reference), the
//! directional derivative autograd gives along a random direction over
//! *all* trained tensors equals a central difference of the loss. A cut
//! graph (candle's fused softmax/LayerNorm), a dropped term or a wrong
//! custom backward (frozen layers, recomputed attention) shows up as an
//! O(1) relative gap; the measured ones are ~1e-7.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use spm::model::nn::{AdapterSet, Trainables};
use spm::model::noise::TorchRng;
use spm::model::sd::{LoadSpec, StableDiffusion};
use spm::model::unet::Cond;
use spm::train::esd::{Esd, Variant};
use spm::train::fmn::{self, Fmn, Mask};
use spm::train::spm::{reference_ddim, Anchors, Draws, Embeds, Setting, Spm};
use spm::train::{Method, Net, Terms};

const DT: DType = DType::F64;

fn load(arch: &str, train: Trainables) -> (StableDiffusion, Arc<Trainables>) {
    spm::pin_thread_count();
    let train = Arc::new(train);
    let spec = LoadSpec {
        model: PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/data/generate")
            .join(arch),
        config: None,
        device: Device::Cpu,
        dtype: DT,
        vae_encoder: false,
        prediction_type: None,
        train: Some(train.clone()),
    };
    (
        StableDiffusion::load(&spec, Arc::new(AdapterSet::default())).unwrap(),
        train,
    )
}

fn net(sd: &StableDiffusion, lora: bool) -> Net<'_> {
    Net {
        base: &sd.unet,
        trained: sd.trained.as_ref().unwrap_or(&sd.unet),
        lora,
        device: Device::Cpu,
        dtype: DT,
    }
}

fn randn(rng: &mut TorchRng, shape: &[usize], scale: f64) -> Tensor {
    let n = shape.iter().product();
    (Tensor::from_vec(rng.randn(n), shape.to_vec(), &Device::Cpu)
        .unwrap()
        .to_dtype(DT)
        .unwrap()
        * scale)
        .unwrap()
}

/// Autograd's directional derivative vs a central difference with step
/// 1e-4 along a unit direction (truncation ~1e-8·f''', rounding
/// ~1e-16·|L|/1e-4: both far below the 1e-5 bound).
fn check(what: &str, train: &Trainables, loss: impl Fn() -> Terms) {
    let vars = train.vars();
    let mut rng = TorchRng::manual_seed(11);
    let dirs: Vec<Tensor> = vars
        .iter()
        .map(|(_, v)| randn(&mut rng, v.dims(), 1.0))
        .collect();
    // A unit direction over all trained tensors, so the step below is the
    // step in parameter space whatever the number of tensors.
    let norm: f64 = dirs
        .iter()
        .map(|d| {
            d.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        })
        .sum::<f64>()
        .sqrt();
    let dirs: Vec<Tensor> = dirs.iter().map(|d| (d / norm).unwrap()).collect();
    let grads = loss().total.backward().unwrap();
    let mut analytic = 0f64;
    let mut reached = 0;
    for ((_, v), d) in vars.iter().zip(&dirs) {
        if let Some(g) = grads.get(v.as_tensor()) {
            reached += 1;
            analytic += (g * d)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
        }
    }
    let base: Vec<Tensor> = vars
        .iter()
        .map(|(_, v)| v.as_tensor().copy().unwrap())
        .collect();
    let eps = 1e-4;
    let at = |sign: f64| {
        for (((_, v), d), b) in vars.iter().zip(&dirs).zip(&base) {
            v.set(&(b + (d * (sign * eps)).unwrap()).unwrap()).unwrap();
        }
        loss().value().unwrap()
    };
    let numeric = (at(1.0) - at(-1.0)) / (2.0 * eps);
    for ((_, v), b) in vars.iter().zip(&base) {
        v.set(b).unwrap();
    }
    let rel = (analytic - numeric).abs() / numeric.abs().max(1e-300);
    eprintln!("{what}: {reached}/{} tensors reached, autograd {analytic:e}, finite difference {numeric:e}, rel {rel:e}", vars.len());
    assert!(
        rel < 1e-5,
        "{what}: autograd {analytic} vs finite difference {numeric} (rel {rel})"
    );
}

/// SPM: membranes on all 192 transformer modules (up ≠ 0, so both factors
/// matter), the erase term and the anchoring term together.
#[test]
fn spm_loss_gradient_matches_finite_differences() {
    spm_fd("sd1");
}

/// SDXL: the same through the text-time conditioning, with pooled anchors
/// beside the text anchors and non-trivial size ids.
#[test]
fn sdxl_spm_loss_gradient_matches_finite_differences() {
    spm_fd("sdxl");
}

fn spm_fd(arch: &str) {
    let xl = arch == "sdxl";
    let (sd, train) = load(
        arch,
        Trainables::new(3).lora(|p| Method::Spm.selects(p), 1, 1.0),
    );
    assert_eq!(train.modules().len(), 192);
    let mut rng = TorchRng::manual_seed(5);
    for (name, v) in train.vars() {
        if name.ends_with(".up") {
            v.set(&randn(&mut rng, v.dims(), 0.1)).unwrap();
        }
    }
    let emb = |s: &str| sd.condition(s, (64, 64)).unwrap();
    let width = sd.unet.config.context_dim();
    let mut s = Setting::new("snoopy", "");
    s.dynamic_resolution = false;
    let spm = Spm {
        settings: vec![s],
        embeds: vec![Embeds {
            target: emb("snoopy"),
            positive: emb("snoopy"),
            neutral: emb(""),
            uncond: emb(""),
        }],
        anchors: Anchors::Half,
        steps: 30,
        sched: reference_ddim("epsilon").unwrap(),
        rescale: if xl { 0.7 } else { 0.0 },
        device: Device::Cpu,
        dtype: DT,
    };
    let d = Draws {
        pair: 0,
        k: 3,
        z: randn(&mut rng, &[1, 4, 8, 8], 1.0),
        anchor_noise: randn(&mut rng, &[4, 1, 77, width], 1.0),
        anchor_scale: vec![0.9, 1.1, 1.0, 0.85],
        pooled_noise: xl.then(|| randn(&mut rng, &[4, 32], 1.0)),
        pooled_scale: if xl {
            vec![1.05, 0.95, 1.15, 0.8]
        } else {
            Vec::new()
        },
        time_ids: xl.then(|| vec![96.0, 80.0, 16.0, 8.0, 64.0, 64.0]),
    };
    let n = net(&sd, true);
    let x = randn(&mut rng, &[1, 4, 8, 8], 1.0);
    check(&format!("spm {arch}"), &train, || {
        spm.loss_at(&n, &d, &x).unwrap()
    });
}

fn esd_for(sd: &StableDiffusion) -> Esd {
    Esd {
        variant: Variant::Diffusers,
        eta: 2.0,
        guidance: 3.0,
        steps: 50,
        latent: (8, 8),
        sched: sd.scheduler.clone(),
        concept: Cond::text(sd.encode(&["snoopy"], 1).unwrap()),
        from: None,
        null: Cond::text(sd.encode(&[""], 1).unwrap()),
        sample_null: None,
        device: Device::Cpu,
        dtype: DT,
    }
}

/// ESD-x: full-weight training of every attn2 projection.
#[test]
fn esd_x_full_weight_gradient_matches_finite_differences() {
    let (sd, train) = load("sd1", Trainables::new(0).full(|p| Method::EsdX.selects(p)));
    let e = esd_for(&sd);
    let n = net(&sd, false);
    // Move the trained copy off the base so the loss is not at its minimum.
    let mut rng = TorchRng::manual_seed(9);
    for (_, v) in train.vars() {
        let p = (v.as_tensor() + randn(&mut rng, v.dims(), 0.02)).unwrap();
        v.set(&p).unwrap();
    }
    let x = randn(&mut rng, &[1, 4, 8, 8], 1.0);
    check("esd-x full", &train, || e.loss_at(&n, &x, 500.0).unwrap());
}

/// ESD-u: full weights of every Linear/Conv2d outside attn2 (convolutions,
/// time embedding, resnets, samplers: the frozen-conv and strided paths).
#[test]
fn esd_u_full_weight_gradient_matches_finite_differences() {
    let (sd, train) = load("sd1", Trainables::new(0).full(|p| Method::EsdU.selects(p)));
    let e = esd_for(&sd);
    let n = net(&sd, false);
    let mut rng = TorchRng::manual_seed(9);
    for (_, v) in train.vars() {
        let p = (v.as_tensor() + randn(&mut rng, v.dims(), 0.02)).unwrap();
        v.set(&p).unwrap();
    }
    let x = randn(&mut rng, &[1, 4, 8, 8], 1.0);
    check("esd-u full", &train, || e.loss_at(&n, &x, 500.0).unwrap());
}

/// Forget-Me-Not: LoRA and full attn2 weights through the attention probe.
#[test]
fn fmn_gradients_match_finite_differences() {
    for full in [false, true] {
        let t = if full {
            Trainables::new(0).full(|p| Method::Fmn.selects(p))
        } else {
            Trainables::new(0).lora(|p| Method::Fmn.selects(p), 4, 1.0)
        };
        let (sd, train) = load("sd1", t);
        let mut rng = TorchRng::manual_seed(4);
        for (name, v) in train.vars() {
            if name.ends_with(".up") {
                v.set(&randn(&mut rng, v.dims(), 0.05)).unwrap();
            }
        }
        let prompt = "a photo of elon musk";
        let ids = sd.tokenize(prompt);
        let cols = fmn::token_mask(
            &ids,
            &sd.tokenizer.encode("elon musk"),
            sd.tokenizer.eos(),
            Mask::Pooler,
        );
        let mut m = vec![0f64; 77];
        for c in cols {
            m[c] = 1.0;
        }
        let f = Fmn {
            prompt: Cond::text(sd.encode(&[prompt], 1).unwrap()),
            mask: Tensor::from_vec(m, (1, 77), &Device::Cpu).unwrap(),
            encoded: Vec::new(),
            latents: vec![randn(&mut rng, &[1, 4, 8, 8], 0.5)],
            alphas_cumprod: spm::train::esd::ldm_alphas_cumprod(),
            device: Device::Cpu,
            dtype: DT,
        };
        let n = net(&sd, !full);
        let x = randn(&mut rng, &[1, 4, 8, 8], 1.0);
        check(if full { "fmn full" } else { "fmn lora" }, &train, || {
            f.loss_at(&n, &x, 500).unwrap()
        });
    }
}
