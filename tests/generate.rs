//! The diffusion core and `spm generate` against diffusers/torch.
//!
//! Expected values: `fixtures/make_generate_fixtures.py` (diffusers 0.42.1,
//! transformers 5.24, torch 2.15, CPU, f32) on tiny random SD1/SD2
//! pipelines; see fixtures/README.md "Generation references". Nothing here
//! is computed by the code under test.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
mod common;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::gen::*;
use spm::adapter::Adapter;
use spm::generate::{self, GenerateOptions};
use spm::model::nn::{AdapterSet, Mix, Rows};
use spm::model::scheduler::Sampler;
use spm::model::sd::{adapter_set, StableDiffusion};
use spm::transport::gate::{Engine, GateOptions, Membrane};

/// The model with both membranes attached (slot 0 = spm_a, 1 = spm_b).
fn load(arch: &str, single_file: bool) -> StableDiffusion {
    let ads: Vec<Adapter> = membranes(arch)
        .iter()
        .map(|p| Adapter::load(p, None).unwrap())
        .collect();
    let (set, te) = adapter_set(&ads, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(te, 0);
    let s = if single_file {
        spec(
            gen_dir().join(format!("{arch}.safetensors")),
            Some(gen_dir().join(arch)),
        )
    } else {
        spec(gen_dir().join(arch), None)
    };
    StableDiffusion::load(&s, Arc::new(set)).unwrap()
}

fn unet_out(
    sd: &StableDiffusion,
    e: &HashMap<String, (Vec<usize>, Vec<f32>)>,
    t: &str,
    rows: &Rows,
) -> Vec<f32> {
    let x = tensor(e, "unet/sample");
    let ctx = tensor(e, "unet/encoder_hidden_states");
    let ts = tensor(e, t);
    values(&sd.unet.forward(&x, &ts, &ctx, rows).unwrap())
}

fn rows(mix: Mix, v: &[Vec<f32>]) -> Rows {
    Rows::new(mix, v, &Device::Cpu).unwrap()
}

// UNet: 1e-4 absolute (diffusers' own f64-vs-f32 gap is ≤ 1.4e-6; candle's
// gemm and torch's sum in different orders).
const UNET_TOL: f32 = 1e-4;

fn check_unet(arch: &str, single_file: bool) {
    let e = expected(arch);
    let sd = load(arch, single_file);
    let none = Rows::none();
    for (t, want) in [
        ("unet/timestep_int", "unet/out_int"),
        ("unet/timestep_float", "unet/out_float"),
    ] {
        let d = max_diff(&unet_out(&sd, &e, t, &none), &e[want].1);
        assert!(d < UNET_TOL, "{arch} {want}: max |diff| {d}");
    }
}

#[test]
fn unet_matches_diffusers_sd1() {
    check_unet("sd1", false);
}

#[test]
fn unet_matches_diffusers_sd2_vpred_linear_projections() {
    check_unet("sd2", false);
}

#[test]
fn single_file_unet_matches_its_diffusers_folder() {
    check_unet("sd1", true);
    check_unet("sd2", true);
}

/// A membrane applied functionally at strength 1 (either mixing rule: one
/// membrane at m = 1 is the same delta) equals diffusers' UNet with the
/// weights merged.
#[test]
fn membrane_equals_merged_lora_weights() {
    for arch in ["sd1", "sd2"] {
        let e = expected(arch);
        let sd = load(arch, false);
        for mix in [Mix::Delta, Mix::Reference] {
            let a = rows(mix, &[vec![1.0, 1.0], vec![0.0, 0.0]]);
            let b = rows(mix, &[vec![0.0, 0.0], vec![1.0, 1.0]]);
            for (r, t, want) in [
                (&a, "unet/timestep_int", "unet_lora/out_int_a"),
                (&b, "unet/timestep_int", "unet_lora/out_int_b"),
                (&a, "unet/timestep_float", "unet_lora/out_float_a"),
            ] {
                let d = max_diff(&unet_out(&sd, &e, t, r), &e[want].1);
                assert!(d < UNET_TOL, "{arch} {mix:?} {want}: {d}");
            }
        }
    }
}

/// Two rows of one batch at strengths 0.3 and 0.8 equal two diffusers runs
/// with the LoRA merged at those strengths.
#[test]
fn rows_at_different_strengths_equal_separate_merged_runs() {
    for arch in ["sd1", "sd2"] {
        let e = expected(arch);
        let sd = load(arch, false);
        let s = &e["unet_rows/strength_rows"].1;
        let r = rows(Mix::Delta, &[s.clone(), vec![0.0; 2]]);
        let d = max_diff(
            &unet_out(&sd, &e, "unet/timestep_int", &r),
            &e["unet_rows/strength"].1,
        );
        assert!(d < UNET_TOL, "{arch}: {d}");
    }
}

/// Two membranes per row: LoRA-style Σ s·ΔW (`--mix delta`) and SPM's
/// factor-wise (Σ m U)(Σ m D) with cross terms (the reference default).
#[test]
fn two_membranes_mix_per_row_as_delta_sum_and_as_the_reference() {
    for arch in ["sd1", "sd2"] {
        let e = expected(arch);
        let sd = load(arch, false);
        let m = &e["unet_rows/mix_rows"].1; // [[a0, b0], [a1, b1]]
        let slots = vec![vec![m[0], m[2]], vec![m[1], m[3]]];
        for (mix, want) in [
            (Mix::Delta, "unet_rows/delta_mix"),
            (Mix::Reference, "unet_rows/factor_mix"),
        ] {
            let d = max_diff(
                &unet_out(&sd, &e, "unet/timestep_int", &rows(mix, &slots)),
                &e[want].1,
            );
            assert!(d < UNET_TOL, "{arch} {want}: {d}");
        }
    }
}

#[test]
fn vae_decode_and_encode_match_diffusers() {
    for arch in ["sd1", "sd2"] {
        let e = expected(arch);
        let sd = load(arch, false);
        let dec = sd.vae.decode(&tensor(&e, "vae/decode_in")).unwrap();
        let d = max_diff(&values(&dec), &e["vae/decode_out"].1);
        assert!(d < 1e-4, "{arch} decode: {d}");
        let dist = sd.vae.encode(&tensor(&e, "vae/encode_in")).unwrap();
        let dm = max_diff(&values(&dist.mean), &e["vae/encode_mean"].1);
        let ds = max_diff(&values(&dist.std), &e["vae/encode_std"].1);
        assert!(dm < 1e-4 && ds < 1e-4, "{arch} encode: mean {dm}, std {ds}");
    }
}

/// Token ids as the folder's tokenizer gives them, last hidden state, and
/// A1111's clip skip 2 (final LN of the penultimate layer).
#[test]
fn text_encoder_and_clip_skip_match_transformers() {
    let prompts = ["a photo of a cat", "snoopy", "a painting by van gogh"];
    for arch in ["sd1", "sd2"] {
        let e = expected(arch);
        let sd = load(arch, false);
        let ids: Vec<f32> = prompts
            .iter()
            .flat_map(|p| sd.tokenize(p))
            .map(|i| i as f32)
            .collect();
        assert_eq!(ids, e["te/input_ids"].1, "{arch} ids");
        let h = sd.encode(&prompts, 1).unwrap();
        let d = max_diff(&values(&h), &e["te/last_hidden_state"].1);
        assert!(d < 1e-5, "{arch} last: {d}");
        let h2 = sd.encode(&prompts, 2).unwrap();
        let d2 = max_diff(&values(&h2), &e["te/clip_skip_2"].1);
        assert!(d2 < 1e-5, "{arch} clip skip 2: {d2}");
    }
}

fn options(
    arch: &str,
    prompt: &str,
    sampler: Option<Sampler>,
    membranes: Vec<PathBuf>,
) -> GenerateOptions {
    GenerateOptions {
        load: spec(gen_dir().join(arch), None),
        prompts: vec![prompt.into()],
        negative: String::new(),
        steps: 4,
        cfg: 7.5,
        width: 64,
        height: 64,
        seed: 0,
        sampler,
        batch: 1,
        membranes,
        strength: None,
        gate: GateOptions::default(),
        mix: Mix::Reference,
        grid: false,
        clip_skip: 1,
        out: std::env::temp_dir(),
        force: false,
    }
}

// Whole pipelines: 1e-3 on final latents and images (the bound;
// diffusers' own f64-vs-f32 gap on these latents is up to 5.6e-5).
fn check_pipeline(arch: &str, case: &str, sampler: Option<Sampler>, single_file: bool) {
    let e = expected(arch);
    let sd = load(arch, single_file);
    let opts = options(arch, "a photo of a cat", sampler, Vec::new());
    check_pipeline_case(&sd, &opts, &e, case, arch);
}

#[test]
fn pipeline_matches_diffusers_with_the_models_own_scheduler() {
    check_pipeline("sd1", "own", None, false); // PNDM (PLMS), SD1.4's
    check_pipeline("sd2", "own", None, false); // DDIM, v-prediction
}

#[test]
fn pipeline_matches_diffusers_euler_ancestral_noise_from_the_same_generator() {
    check_pipeline("sd1", "euler_a", Some(Sampler::EulerAncestral), false);
    check_pipeline("sd2", "euler_a", Some(Sampler::EulerAncestral), false);
}

#[test]
fn pipeline_matches_diffusers_dpmpp_2m_karras() {
    check_pipeline(
        "sd1",
        "dpmpp_2m_karras",
        Some(Sampler::DpmPp2mKarras),
        false,
    );
}

#[test]
fn single_file_pipeline_matches_its_diffusers_folder() {
    check_pipeline("sd1", "own", None, true);
    check_pipeline("sd2", "own", None, true);
}

/// FT generation equals a torch rendering of infer_spm.py's loop (gates
/// ≤ 1e-5, then membranes loaded factor-wise at the gates, PNDM, CFG 7.5,
/// a CPU generator reseeded per prompt).
#[test]
fn ft_generation_matches_a_torch_rendering_of_infer_spm() {
    let e = expected("sd1");
    let sd = load("sd1", false);
    let mut engine = Engine::shared(sd.tokenizer.clone(), Some(sd.text.clone()), sd.pad_id);
    engine
        .set_membranes(
            membranes("sd1")
                .iter()
                .map(|p| Membrane::from_file(p).unwrap())
                .collect(),
        )
        .unwrap();
    check_ft(&sd, &engine, &e, |p| {
        options("sd1", p, None, membranes("sd1"))
    });
}

/// --grid runs none | FT | full in one UNet batch with per-row strengths;
/// its FT column equals the plain FT run and its none column the base run.
#[test]
fn grid_columns_equal_separate_runs() {
    let e = expected("sd1");
    let sd = load("sd1", false);
    let mut engine = Engine::shared(sd.tokenizer.clone(), Some(sd.text.clone()), sd.pad_id);
    engine
        .set_membranes(
            membranes("sd1")
                .iter()
                .map(|p| Membrane::from_file(p).unwrap())
                .collect(),
        )
        .unwrap();
    let mut opts = options("sd1", "a photo of a cat", None, membranes("sd1"));
    opts.grid = true;
    let out = generate::sample_prompt(
        &sd,
        &sd.scheduler,
        &opts,
        Some(&engine),
        "a photo of a cat",
        &Quiet,
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(out.columns.len(), 3);
    let d0 = max_diff(&out.columns[0].latents, &e["pipe/own/latents"].1);
    let lat = &e["ft/latents"].1;
    let n = lat.len() / 3;
    let d1 = max_diff(&out.columns[1].latents, &lat[n..2 * n]);
    assert!(d0 < 1e-3 && d1 < 1e-3, "none {d0}, ft {d1}");
    assert_eq!(out.columns[2].strengths, vec![1.0, 1.0]);
}

/// An adapter set that names a layer the UNet lacks is refused, not ignored.
#[test]
fn adapter_for_another_architecture_is_refused() {
    let sdxl = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/data/sdxl/spm.safetensors");
    let ad = Adapter::load(&sdxl, None).unwrap();
    let (set, _) = adapter_set(&[ad], DType::F32, &Device::Cpu).unwrap();
    let err = StableDiffusion::load(&spec(gen_dir().join("sd1"), None), Arc::new(set))
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        err.contains("match no layer") || err.contains("do not fit"),
        "{err}"
    );
    let _ = AdapterSet::default();
}

/// Finite differences through the whole UNet: with the membrane factors as
/// trainable variables (the composite, differentiable path), autograd's
/// directional derivative of a scalar loss equals a central difference of
/// the same loss. Everything in f64 with a 1e-5 step: truncation and
/// rounding error of the quotient are both far below the 1e-5 bound (the
/// measured gap is ~2e-7), while a cut graph or a missing term is not.
#[test]
fn adapter_gradients_match_finite_differences_through_the_unet() {
    use candle_core::Var;
    use std::collections::HashMap as Map;
    let dev = Device::Cpu;
    let dt = DType::F64;
    // The membrane's factors as variables, under their layers' paths.
    let e = expected("sd1");
    let inv_ad = Adapter::load(&membranes("sd1")[0], None).unwrap();
    let inv = inv_ad.inventory();
    let mut vars = Vec::new();
    let mut by_path: Map<String, Vec<spm::model::nn::Factor>> = Map::new();
    for m in &inv_ad.modules {
        let t = |r: &spm::io::tensor::RawTensor| {
            Var::from_tensor(
                &Tensor::from_vec(r.to_f32().unwrap(), r.shape.clone(), &dev)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap(),
            )
            .unwrap()
        };
        let (d, u) = (t(m.down.as_ref().unwrap()), t(m.up.as_ref().unwrap()));
        by_path
            .entry(inv.modules[m.index].path.clone())
            .or_default()
            .push(spm::model::nn::Factor {
                down: d.as_tensor().clone(),
                up: u.as_tensor().clone(),
                scale: m.scale().unwrap(),
                slot: 0,
                from: "spm_a".into(),
            });
        vars.push(d);
        vars.push(u);
    }
    let mut s = spec(gen_dir().join("sd1"), None);
    s.dtype = dt;
    let sd = StableDiffusion::load(&s, Arc::new(AdapterSet::new(by_path))).unwrap();
    let x = tensor(&e, "unet/sample").to_dtype(dt).unwrap();
    let ctx = tensor(&e, "unet/encoder_hidden_states")
        .to_dtype(dt)
        .unwrap();
    let ts = tensor(&e, "unet/timestep_int");
    let rows = Rows::new(Mix::Reference, &[vec![0.7, 0.4]], &dev).unwrap();
    // Seeded draws (candle's CPU randn cannot be seeded).
    let mut rng = spm::model::noise::TorchRng::manual_seed(7);
    let mut draw = |shape: &[usize]| {
        let n = shape.iter().product();
        Tensor::from_vec(rng.randn(n), shape.to_vec(), &dev)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
    };
    let w = draw(&[2, 4, 8, 8]);
    let loss = |sd: &StableDiffusion| {
        (sd.unet.forward(&x, &ts, &ctx, &rows).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = loss(&sd).backward().unwrap();
    // A random direction over every factor.
    let dirs: Vec<Tensor> = vars.iter().map(|v| draw(v.dims())).collect();
    let mut analytic = 0f64;
    let mut missing = 0;
    for (v, d) in vars.iter().zip(&dirs) {
        match grads.get(v.as_tensor()) {
            Some(g) => {
                analytic += (g * d)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            }
            None => missing += 1,
        }
    }
    assert_eq!(missing, 0, "factors without a gradient: autograd was cut");
    let eps = 1e-5;
    let shift = |sign: f64| {
        for (v, d) in vars.iter().zip(&dirs) {
            v.set(&(v.as_tensor() + (d * (sign * eps)).unwrap()).unwrap())
                .unwrap();
        }
    };
    let base: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().copy().unwrap()).collect();
    shift(1.0);
    let lp = loss(&sd).to_scalar::<f64>().unwrap();
    for (v, b) in vars.iter().zip(&base) {
        v.set(b).unwrap();
    }
    shift(-1.0);
    let lm = loss(&sd).to_scalar::<f64>().unwrap();
    let numeric = (lp - lm) / (2.0 * eps);
    let rel = (analytic - numeric).abs() / numeric.abs().max(1e-12);
    eprintln!("autograd {analytic}, finite difference {numeric}, rel {rel:e}");
    assert!(
        rel < 1e-5,
        "autograd {analytic} vs finite difference {numeric} (rel {rel})"
    );
}
