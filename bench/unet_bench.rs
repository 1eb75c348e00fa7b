//! UNet forward benchmark: an SD1.5- or SDXL-size UNet (random weights,
//! diffusers' SD1.5 / SDXL 1.0 base config) at latent 64×64, batch 2 (one
//! CFG step), f32. Run with `bench/unet_forward.sh`, which times
//! diffusers/torch beside it.
//!
//! Prints one JSON line: build seconds, each forward's seconds, peak RSS.
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use spm::model::nn::{AdapterSet, Builder, Rows};
use spm::model::unet::{Added, UNet, UNetConfig};

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .map(|v| v.parse::<f64>().unwrap_or(0.0) / 1024.0)
            })
        })
        .unwrap_or(0.0)
}

/// Random N(0, 0.02) weights as plain tensors (not `Var`s, so no graph is
/// recorded: this is inference, as in the torch script under `no_grad`).
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

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let latent: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(64);
    let runs: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3);
    let xl = args.get(3).map(String::as_str) == Some("sdxl");
    let dev = Device::Cpu;
    let t0 = Instant::now();
    let vb = VarBuilder::from_backend(Box::new(Random), DType::F32, dev.clone());
    let unet = UNet::new(
        Builder::new(vb, Arc::new(AdapterSet::default())),
        if xl {
            UNetConfig::xl_base()
        } else {
            UNetConfig::v1_5()
        },
    )?;
    // Random weights are plain tensors, not trainable variables: inference.
    let build = t0.elapsed().as_secs_f64();
    let x = Tensor::randn(0f32, 1f32, (2, 4, latent, latent), &dev)?;
    let ctx = Tensor::randn(0f32, 1f32, (2, 77, unet.config.context_dim()), &dev)?;
    let t = Tensor::new(&[500f32, 500f32], &dev)?;
    // SDXL: pooled embeddings and the size ids of a 1024² image.
    let added = xl
        .then(|| -> candle_core::Result<Added> {
            Ok(Added {
                text_embeds: Tensor::randn(0f32, 1f32, (2, 1280), &dev)?,
                time_ids: Tensor::new(&[[1024f32, 1024., 0., 0., 1024., 1024.]; 2], &dev)?,
            })
        })
        .transpose()?;
    let mut times = Vec::new();
    for _ in 0..runs {
        let s = Instant::now();
        let y = unet.forward_added(
            &x.detach(),
            &t,
            &ctx.detach(),
            added.as_ref(),
            &Rows::none(),
        )?;
        let _ = y.sum_all()?.to_scalar::<f32>()?;
        times.push(s.elapsed().as_secs_f64());
    }
    println!(
        "{{\"impl\": \"spm\", \"arch\": \"{}\", \"latent\": {latent}, \"build_s\": {build:.2}, \"forward_s\": {times:?}, \"peak_rss_mb\": {:.0}}}",
        if xl { "sdxl" } else { "sd15" },
        peak_rss_mb()
    );
    Ok(())
}
