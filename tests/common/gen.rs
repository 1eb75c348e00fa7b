//! Helpers of the generation tests (`generate.rs`, `generate_xl.rs`):
//! the reference tensors `fixtures/make_generate*_fixtures.py` wrote, the
//! tiny models' load spec, diffusers' image postprocessing and the FT
//! generation check both architectures share.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor};
use spm::generate::{self, GenerateOptions, Progress};
use spm::io::safetensors::SafetensorsFile;
use spm::model::sd::{LoadSpec, StableDiffusion};
use spm::transport::gate::Engine;

/// Expected tensors by name, as (shape, f32 values).
pub type Expected = HashMap<String, (Vec<usize>, Vec<f32>)>;

pub fn gen_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/data/generate")
}

/// `expected_{arch}.safetensors`.
pub fn expected(arch: &str) -> Expected {
    let f = SafetensorsFile::open(&gen_dir().join(format!("expected_{arch}.safetensors"))).unwrap();
    f.tensors()
        .into_iter()
        .map(|(k, t)| (k, (t.shape.clone(), t.to_f32().unwrap())))
        .collect()
}

pub fn tensor(e: &Expected, k: &str) -> Tensor {
    let (s, v) = e.get(k).unwrap_or_else(|| panic!("no expected tensor {k}"));
    Tensor::from_vec(v.clone(), s.clone(), &Device::Cpu).unwrap()
}

pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// f32 on the CPU, VAE encoder included.
pub fn spec(model: PathBuf, config: Option<PathBuf>) -> LoadSpec {
    LoadSpec {
        model,
        config,
        device: Device::Cpu,
        dtype: DType::F32,
        vae_encoder: true,
        prediction_type: None,
        train: None,
    }
}

/// The two membranes of a tiny model (slot 0 = spm_a "snoopy", 1 = spm_b
/// "mickey mouse").
pub fn membranes(arch: &str) -> Vec<PathBuf> {
    ["spm_a", "spm_b"]
        .iter()
        .map(|m| gen_dir().join(format!("{arch}/{m}.safetensors")))
        .collect()
}

pub struct Quiet;
impl Progress for Quiet {
    fn start(&self, _: u64) {}
    fn step(&self, _: &str) {}
    fn finish(&self) {}
}

/// NCHW [-1,1] decode → NHWC [0,1], diffusers' postprocessing.
pub fn image01(t: &Tensor) -> Vec<f32> {
    let t = ((t / 2.0).unwrap() + 0.5)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap();
    values(&t.permute((0, 2, 3, 1)).unwrap())
}

/// FT generation against the fixture's `ft/*` case: for each of its three
/// prompts the gates (≤ 1e-5) and the final latents and image (≤ 1e-3).
pub fn check_ft(
    sd: &StableDiffusion,
    engine: &Engine,
    e: &Expected,
    options: impl Fn(&str) -> GenerateOptions,
) {
    let prompts = ["snoopy", "a photo of a cat", "mickey mouse and snoopy"];
    let (gates, lat, img) = (&e["ft/gates"].1, &e["ft/latents"].1, &e["ft/images"].1);
    let (nl, ni) = (lat.len() / 3, img.len() / 3);
    for (i, p) in prompts.iter().enumerate() {
        let opts = options(p);
        let out = generate::sample_prompt(
            sd,
            &sd.scheduler,
            &opts,
            Some(engine),
            p,
            &Quiet,
            &AtomicBool::new(false),
        )
        .unwrap();
        for k in 0..2 {
            let g = out.gates[k].1.rate as f32;
            assert!(
                (g - gates[i * 2 + k]).abs() < 1e-5,
                "{p} gate {k}: {g} vs {}",
                gates[i * 2 + k]
            );
        }
        let dl = max_diff(&out.columns[0].latents, &lat[i * nl..(i + 1) * nl]);
        let di = max_diff(&image01(&out.images[0]), &img[i * ni..(i + 1) * ni]);
        assert!(dl < 1e-3 && di < 1e-3, "{p}: latents {dl}, image {di}");
    }
}

/// A whole pipeline run of "a photo of a cat" without membranes against the
/// fixture's `pipe/{case}/latents` and `pipe/{case}/image` (≤ 1e-3);
/// `what` names the run in a failure.
pub fn check_pipeline_case(
    sd: &StableDiffusion,
    opts: &GenerateOptions,
    e: &Expected,
    case: &str,
    what: &str,
) {
    let out = generate::sample_prompt(
        sd,
        &sd.scheduler,
        opts,
        None,
        "a photo of a cat",
        &Quiet,
        &AtomicBool::new(false),
    )
    .unwrap();
    let dl = max_diff(
        &out.columns[0].latents,
        &e[&format!("pipe/{case}/latents")].1,
    );
    let di = max_diff(
        &image01(&out.images[0]),
        &e[&format!("pipe/{case}/image")].1,
    );
    assert!(
        dl < 1e-3 && di < 1e-3,
        "{what} {case}: latents {dl}, image {di}"
    );
}
