//! One training step per method, spm side (`bench/train_step.sh` runs it
//! beside `bench/train_torch.py`, which does the same step in torch).
//!
//! One step = the method's loss at a fixed latent x (no sampling
//! trajectory: that is inference, benchmarked elsewhere) + backward + one
//! optimizer step, f32, batch 1:
//!  * spm: rank-1 LoRA (α 1) on the 192 transformer modules; erase term
//!    (e_pos, e_neu frozen, e_tar with grad) + latent anchoring with 4
//!    anchors, `Anchors::Half` (an anchor batch of 4 rows, on and off); AdamW.
//!  * esd-x: full weights of the 64 attn2 modules (80 tensors) in a second
//!    UNet beside the frozen base; e_esd vs e_erase − 2(e_erase − e_null); Adam.
//!  * fmn: rank-4 LoRA (α 1) on the attn2 modules, attention-probe loss
//!    (5 masked token columns); AdamW.
//!
//! Usage: `train_bench MODEL METHOD LATENT SKIP_FROZEN RUNS`
//!   MODEL tiny (fixtures/data/generate/sd1) | sd15 (SD1.5 config, random weights)
//!   METHOD spm | esd-x | fmn; SKIP_FROZEN 1 (default backward) | 0 (candle's
//!   stock backward, which also computes every frozen weight's gradient).
//! One warm-up step, then RUNS timed steps; prints one JSON line.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use spm::model::nn::{AdapterSet, Builder, Trainables};
use spm::model::sd::{LoadSpec, StableDiffusion};
use spm::model::unet::{Cond, UNet, UNetConfig};
use spm::train::esd::{self, Esd, Variant};
use spm::train::fmn::Fmn;
use spm::train::optim::{Adam, AdamConfig, Rule};
use spm::train::spm::{reference_ddim, Anchors, Embeds, Setting, Spm};
use spm::train::{Method, Net, Terms};

fn status_mb(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with(key)).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .map(|v| v.parse::<f64>().unwrap_or(0.0) / 1024.0)
            })
        })
        .unwrap_or(0.0)
}

/// Random N(0, 0.02) weights as plain (frozen) tensors, as bench/unet_bench.rs.
struct Random;

impl SimpleBackend for Random {
    fn get(
        &self,
        s: candle_core::Shape,
        _name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, 0.02f32, s, dev)?.to_dtype(dtype)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("no shape for {name}")
    }
    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

fn random_unet(train: Option<Arc<Trainables>>) -> candle_core::Result<UNet> {
    let vb = VarBuilder::from_backend(Box::new(Random), DType::F32, Device::Cpu);
    let mut b = Builder::new(vb, Arc::new(AdapterSet::default()));
    if let Some(t) = train {
        b = b.with_trainables(t);
    }
    UNet::new(b, UNetConfig::v1_5())
}

fn trainables(method: &str) -> Trainables {
    match method {
        "spm" => Trainables::new(0).lora(|p| Method::Spm.selects(p), 1, 1.0),
        "esd-x" => Trainables::new(0).full(|p| Method::EsdX.selects(p)),
        "fmn" => Trainables::new(0).lora(|p| Method::Fmn.selects(p), 4, 1.0),
        m => panic!("unknown method {m} (spm | esd-x | fmn)"),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    spm::pin_thread_count();
    let args: Vec<String> = std::env::args().collect();
    let model = args.get(1).cloned().unwrap_or_else(|| "tiny".into());
    let method = args.get(2).cloned().unwrap_or_else(|| "spm".into());
    let latent: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(32);
    let skip: bool = args.get(4).map(|s| s != "0").unwrap_or(true);
    let runs: usize = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(3);
    spm::model::autograd::set_skip_frozen_weight_grads(skip);
    let dev = Device::Cpu;
    let dt = DType::F32;

    let t0 = Instant::now();
    let train = Arc::new(trainables(&method));
    // The tiny model comes with its text encoder; SD1.5 is random weights.
    let mut sd: Option<StableDiffusion> = None;
    let mut own: Option<(UNet, Option<UNet>)> = None;
    match model.as_str() {
        "tiny" => {
            let spec = LoadSpec {
                model: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/data/generate/sd1"),
                config: None,
                device: dev.clone(),
                dtype: dt,
                vae_encoder: false,
                prediction_type: None,
                train: Some(train.clone()),
            };
            sd = Some(StableDiffusion::load(
                &spec,
                Arc::new(AdapterSet::default()),
            )?);
        }
        "sd15" => {
            // esd-x: a frozen base and a trained copy (full attn2 weights);
            // LoRA methods: one UNet, the factors switched off by rows.
            own = Some(if method == "esd-x" {
                (random_unet(None)?, Some(random_unet(Some(train.clone()))?))
            } else {
                (random_unet(Some(train.clone()))?, None)
            });
        }
        m => panic!("unknown model {m} (tiny | sd15)"),
    }
    let (base, trained) = match (&sd, &own) {
        (Some(sd), _) => (&sd.unet, sd.trained.as_ref()),
        (None, Some((b, t))) => (b, t.as_ref()),
        _ => unreachable!(),
    };
    let lora = method != "esd-x";
    let net = Net {
        base,
        trained: trained.unwrap_or(base),
        lora,
        device: dev.clone(),
        dtype: dt,
    };
    let ctx_dim = base.config.context_dim();
    // Prompts: the tiny model's own text encoder, random N(0,1) rows for SD1.5.
    let emb = |s: &str| -> candle_core::Result<Cond> {
        match &sd {
            Some(sd) => sd
                .encode(&[s], 1)
                .map(Cond::text)
                .map_err(|e| candle_core::Error::Msg(e.to_string())),
            None => Tensor::randn(0f32, 1f32, (1, 77, ctx_dim), &dev).map(Cond::text),
        }
    };
    let build = t0.elapsed().as_secs_f64();
    let rss_build = status_mb("VmRSS:");

    let x = Tensor::randn(0f32, 1f32, (1, 4, latent, latent), &dev)?;
    let vars = train.vars();
    let n_params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let (rule, wd, lr) = match method.as_str() {
        "spm" => (Rule::AdamW, 0.01, 1e-4),
        "esd-x" => (Rule::Adam, 0.0, 5e-5),
        _ => (Rule::AdamW, 0.01, 1e-4),
    };
    let mut opt = Adam::new(AdamConfig::new(rule, wd), vars.clone())?;

    // The method and its fixed inputs.
    enum M {
        Spm(Spm, spm::train::spm::Draws),
        Esd(Esd),
        Fmn(Fmn),
    }
    let m = match method.as_str() {
        "spm" => {
            let target = emb("snoopy")?;
            let uncond = emb("")?;
            let mut s = Setting::new("snoopy", "");
            s.dynamic_resolution = false;
            let spm = Spm {
                settings: vec![s],
                embeds: vec![Embeds {
                    positive: target.clone(),
                    target,
                    neutral: uncond.clone(),
                    uncond,
                }],
                anchors: Anchors::Half,
                steps: 30,
                sched: reference_ddim("epsilon")?,
                rescale: 0.0,
                device: dev.clone(),
                dtype: dt,
            };
            let d = spm::train::spm::Draws {
                pair: 0,
                k: 10,
                z: x.clone(),
                anchor_noise: Tensor::randn(0f32, 1f32, (4, 1, 77, ctx_dim), &dev)?,
                anchor_scale: vec![0.9, 1.0, 1.1, 1.0],
                pooled_noise: None,
                pooled_scale: Vec::new(),
                time_ids: None,
            };
            M::Spm(spm, d)
        }
        "esd-x" => M::Esd(Esd {
            variant: Variant::Diffusers,
            eta: 2.0,
            guidance: 3.0,
            steps: 50,
            latent: (latent, latent),
            sched: reference_ddim("epsilon")?,
            concept: emb("snoopy")?,
            from: None,
            null: emb("")?,
            sample_null: None,
            device: dev.clone(),
            dtype: dt,
        }),
        _ => {
            let mut mv = vec![0f32; 77];
            for c in mv.iter_mut().skip(1).take(5) {
                *c = 1.0;
            }
            M::Fmn(Fmn {
                prompt: emb("a photo of snoopy")?,
                mask: Tensor::from_vec(mv, (1, 77), &dev)?,
                latents: vec![x.clone()],
                encoded: vec![],
                alphas_cumprod: esd::ldm_alphas_cumprod(),
                device: dev.clone(),
                dtype: dt,
            })
        }
    };
    let loss = |net: &Net| -> candle_core::Result<Terms> {
        match &m {
            M::Spm(s, d) => s.loss_at(net, d, &x),
            M::Esd(e) => e.loss_at(net, &x, 500.0),
            M::Fmn(f) => f.loss_at(net, &x, 500),
        }
    };

    let (mut fw, mut bw, mut op, mut st) = (vec![], vec![], vec![], vec![]);
    let mut losses = vec![];
    let mut warm = 0f64;
    for i in 0..=runs {
        let a = Instant::now();
        let terms = loss(&net)?;
        let l = terms.value()?;
        let b = Instant::now();
        let grads = terms.total.backward()?;
        let c = Instant::now();
        opt.step(&grads, lr)?;
        drop(grads);
        drop(terms);
        let d = Instant::now();
        if i == 0 {
            warm = (d - a).as_secs_f64();
            continue; // warm-up
        }
        losses.push(l);
        fw.push((b - a).as_secs_f64());
        bw.push((c - b).as_secs_f64());
        op.push((d - c).as_secs_f64());
        st.push((d - a).as_secs_f64());
    }
    let r = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "{{\"impl\": \"spm\", \"model\": \"{model}\", \"method\": \"{method}\", \"latent\": {latent}, \"skip_frozen\": {}, \"threads\": \"{}\", \"trainable_tensors\": {}, \"trainable_params\": {n_params}, \"build_s\": {build:.2}, \"warmup_s\": {warm:.3}, \"step_s\": [{}], \"forward_s\": [{}], \"backward_s\": [{}], \"optim_s\": [{}], \"loss\": [{}], \"rss_after_build_mb\": {rss_build:.0}, \"peak_rss_mb\": {:.0}}}",
        skip as u8,
        std::env::var("RAYON_NUM_THREADS").unwrap_or_default(),
        vars.len(),
        r(&st),
        r(&fw),
        r(&bw),
        r(&op),
        losses
            .iter()
            .map(|l| format!("{l:e}"))
            .collect::<Vec<_>>()
            .join(", "),
        status_mb("VmHWM:")
    );
    Ok(())
}
