//! SDXL in the diffusion core, `spm generate` and FT, against diffusers.
//!
//! Expected values: `fixtures/make_generate_xl_fixtures.py` (diffusers
//! 0.42.1, transformers, torch 2.15, CPU, f32) on a tiny random
//! `StableDiffusionXLPipeline`; see fixtures/README.md "SDXL generation
//! references". Nothing here is computed by the code under test.
use std::path::PathBuf;
mod common;

use std::sync::Arc;

use candle_core::{DType, Device};
use common::gen::*;
use spm::adapter::Adapter;
use spm::generate::GenerateOptions;
use spm::model::nn::{Mix, Rows};
use spm::model::sd::{adapter_set, StableDiffusion};
use spm::model::unet::Added;
use spm::transport::gate::{Engine, GateOptions, Membrane, Second};

fn load(single_file: bool, with: &[PathBuf]) -> StableDiffusion {
    let ads: Vec<Adapter> = with
        .iter()
        .map(|p| Adapter::load(p, None).unwrap())
        .collect();
    let (set, _) = adapter_set(&ads, DType::F32, &Device::Cpu).unwrap();
    let s = if single_file {
        spec(
            gen_dir().join("sdxl.safetensors"),
            Some(gen_dir().join("sdxl")),
        )
    } else {
        spec(gen_dir().join("sdxl"), None)
    };
    StableDiffusion::load(&s, Arc::new(set)).unwrap()
}

const PROMPTS: [&str; 3] = ["a photo of a cat", "snoopy", "a painting by van gogh"];

/// Both tokenizers' ids, both encoders' penultimate hidden states, the
/// pooled projection, and the pipeline's concatenated `encode_prompt`
/// (with clip skip 2 = diffusers' `clip_skip=1`).
#[test]
fn both_text_encoders_match_transformers() {
    let e = expected("sdxl");
    for single in [false, true] {
        let sd = load(single, &[]);
        let xl = sd.xl.as_ref().expect("SDXL");
        let ids1: Vec<f32> = PROMPTS
            .iter()
            .flat_map(|p| sd.tokenize(p))
            .map(|i| i as f32)
            .collect();
        let ids2: Vec<f32> = PROMPTS
            .iter()
            .flat_map(|p| xl.tokenizer.encode_padded(p, 77, xl.pad_id))
            .map(|i| i as f32)
            .collect();
        assert_eq!(ids1, e["te/ids_1"].1, "ids 1");
        assert_eq!(ids2, e["te/ids_2"].1, "ids 2");
        let c = sd.encode(&PROMPTS, 1).unwrap();
        assert_eq!(c.dims(), e["te/prompt_embeds"].0.as_slice());
        let d = max_diff(&values(&c), &e["te/prompt_embeds"].1);
        assert!(d < 1e-4, "single {single}: prompt_embeds {d}");
        let c2 = sd.encode(&PROMPTS, 2).unwrap();
        let d = max_diff(&values(&c2), &e["te/prompt_embeds_skip2"].1);
        assert!(d < 1e-4, "single {single}: clip skip 2 {d}");
        let a = sd.conditions(&PROMPTS, 1, (64, 64)).unwrap().added.unwrap();
        let d = max_diff(&values(&a.text_embeds), &e["te/pooled_prompt_embeds"].1);
        assert!(d < 1e-4, "single {single}: pooled {d}");
        let d = max_diff(&values(&a.text_embeds), &e["te/pooled_2"].1);
        assert!(d < 1e-4, "single {single}: text_embeds {d}");
    }
}

/// The SDXL UNet (per-block depth, linear projections, `text_time`
/// conditioning) at integer and fractional timesteps, from the folder and
/// from the SGM single file.
#[test]
fn unet_matches_diffusers_with_added_conditioning() {
    let e = expected("sdxl");
    for single in [false, true] {
        let sd = load(single, &[]);
        assert!(sd.unet.needs_added());
        let added = Added {
            text_embeds: tensor(&e, "unet/text_embeds"),
            time_ids: tensor(&e, "unet/time_ids"),
        };
        for (t, want) in [
            ("unet/timestep_int", "unet/out_int"),
            ("unet/timestep_float", "unet/out_float"),
        ] {
            let out = sd
                .unet
                .forward_added(
                    &tensor(&e, "unet/sample"),
                    &tensor(&e, t),
                    &tensor(&e, "unet/encoder_hidden_states"),
                    Some(&added),
                    &Rows::none(),
                )
                .unwrap();
            let d = max_diff(&values(&out), &e[want].1);
            assert!(d < 1e-4, "single {single} {want}: {d}");
        }
        // Without the added conditioning an SDXL UNet refuses to run.
        let err = sd
            .unet
            .forward(
                &tensor(&e, "unet/sample"),
                &tensor(&e, "unet/timestep_float"),
                &tensor(&e, "unet/encoder_hidden_states"),
                &Rows::none(),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("SDXL"), "{err}");
    }
}

/// A membrane on every SDXL transformer Linear at strength 1 equals the
/// merged weights diffusers + peft load.
#[test]
fn sdxl_membrane_equals_merged_lora_weights() {
    let e = expected("sdxl");
    let sd = load(false, &membranes("sdxl")[..1]);
    let added = Added {
        text_embeds: tensor(&e, "unet/text_embeds"),
        time_ids: tensor(&e, "unet/time_ids"),
    };
    let rows = Rows::new(Mix::Reference, &[vec![1.0, 1.0]], &Device::Cpu).unwrap();
    let out = sd
        .unet
        .forward_added(
            &tensor(&e, "unet/sample"),
            &tensor(&e, "unet/timestep_int"),
            &tensor(&e, "unet/encoder_hidden_states"),
            Some(&added),
            &rows,
        )
        .unwrap();
    let d = max_diff(&values(&out), &e["unet_lora/out_int_a"].1);
    assert!(d < 1e-4, "membrane: {d}");
}

/// SDXL's VAE: scaling factor 0.13025 from its config, decoded as diffusers.
#[test]
fn sdxl_vae_decode_matches_diffusers() {
    let e = expected("sdxl");
    let sd = load(false, &[]);
    assert!((sd.vae.config.scaling_factor - 0.13025).abs() < 1e-12);
    assert!(sd.vae.config.force_upcast);
    let z = (tensor(&e, "vae/latents") / sd.vae.config.scaling_factor).unwrap();
    let d = max_diff(&values(&sd.vae.decode(&z).unwrap()), &e["vae/decoded"].1);
    assert!(d < 1e-4, "decode: {d}");
}

fn options(prompt: &str, negative: &str, cfg: f64, membranes: Vec<PathBuf>) -> GenerateOptions {
    GenerateOptions {
        load: spec(gen_dir().join("sdxl"), None),
        prompts: vec![prompt.into()],
        negative: negative.into(),
        steps: 4,
        cfg,
        width: 64,
        height: 64,
        seed: 0,
        sampler: None,
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

/// Whole `StableDiffusionXLPipeline` runs, same seed, the folder's Euler
/// scheduler: guided with an empty negative (zeroed, as
/// `force_zeros_for_empty_prompt`), guided with a negative prompt, and
/// unguided. 1e-3 on latents and images.
#[test]
fn sdxl_pipeline_matches_diffusers() {
    let e = expected("sdxl");
    for single in [false, true] {
        let sd = load(single, &[]);
        for (case, neg, cfg) in [
            ("guided", "", 5.0),
            ("negative", "a painting by van gogh", 5.0),
            ("plain", "", 1.0),
        ] {
            let opts = options("a photo of a cat", neg, cfg, Vec::new());
            check_pipeline_case(&sd, &opts, &e, case, &format!("single file {single}"));
        }
    }
}

/// SDXL FT (this project's definition, written out in torch in the
/// fixture script): gates from the cosine over both encoders' conditioning
/// and token recall ≤ 1e-5, then the membranes loaded factor-wise at the
/// gates and the SDXL pipeline run ≤ 1e-3.
#[test]
fn sdxl_ft_generation_matches_a_torch_rendering() {
    let e = expected("sdxl");
    let sd = load(false, &membranes("sdxl"));
    let xl = sd.xl.as_ref().unwrap();
    let mut engine = Engine::shared(sd.tokenizer.clone(), Some(sd.text.clone()), sd.pad_id)
        .with_second(Second {
            encoder: xl.text.clone(),
            tokenizer: xl.tokenizer.clone(),
            pad_id: xl.pad_id,
        });
    engine
        .set_membranes(
            membranes("sdxl")
                .iter()
                .map(|p| Membrane::from_file(p).unwrap())
                .collect(),
        )
        .unwrap();
    check_ft(&sd, &engine, &e, |p| options(p, "", 5.0, membranes("sdxl")));
}

/// `spm gate`'s engine builder reads both SDXL encoders from the pipeline
/// root and gives the torch rendering's gates. The single file has no
/// tokenizer folder: its encoders (tiny vocabulary) are refused against the
/// embedded CLIP BPE with a message naming the mismatch, not a panic.
#[test]
fn gate_engine_loads_sdxl_encoders() {
    use spm::model::clip::LoadOptions;
    use spm::transport::{build_engine, EngineSpec};
    let e = expected("sdxl");
    let gates = &e["ft/gates"].1;
    let (mut engine, info) = build_engine(&EngineSpec {
        text_encoder: Some(gen_dir().join("sdxl")),
        pad_id: None,
        load: LoadOptions::default(),
    })
    .unwrap();
    assert!(engine.is_xl());
    assert_eq!(info.unwrap().hidden_size, 64);
    engine
        .set_membranes(
            membranes("sdxl")
                .iter()
                .map(|p| Membrane::from_file(p).unwrap())
                .collect(),
        )
        .unwrap();
    for (i, p) in ["snoopy", "a photo of a cat", "mickey mouse and snoopy"]
        .iter()
        .enumerate()
    {
        let g = engine.gate(p, None, &GateOptions::default()).unwrap();
        for k in 0..2 {
            let d = (g[k].1.rate as f32 - gates[i * 2 + k]).abs();
            assert!(d < 1e-5, "{p} gate {k}: {d}");
        }
    }
    let err = build_engine(&EngineSpec {
        text_encoder: Some(gen_dir().join("sdxl.safetensors")),
        pad_id: None,
        load: LoadOptions {
            heads: Some(4),
            ..LoadOptions::default()
        },
    })
    .err()
    .expect("tiny vocabulary vs the embedded tokenizer")
    .to_string();
    assert!(err.contains("vocab_size"), "{err}");
}
