//! The CLIP text encoder and FT gates against references computed by
//! transformers' CLIPTextModel and a torch rendering of SPM's FT formula
//! (`fixtures/make_transport_fixtures.py`).

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use spm::convert::Curve;
use spm::model::clip::{self, Activation, LoadOptions};
use spm::transport::gate::{Engine, GateOptions, Membrane, Metric, EOS};
use spm::transport::tokenizer::ClipTokenizer;

fn ids_and_hidden(name: &str) -> (Vec<Vec<u32>>, Vec<Vec<f32>>) {
    let l = load(&fixture(&format!("transport/{name}.safetensors")));
    let ids = &l.tensors["input_ids"];
    let hs = &l.tensors["last_hidden_state"];
    let (n, t) = (ids.shape[0], ids.shape[1]);
    let idv = ids.values();
    let hv = hs.values();
    let per = hv.len() / n;
    let rows = (0..n)
        .map(|i| idv[i * t..(i + 1) * t].iter().map(|x| *x as u32).collect())
        .collect();
    let hidden = (0..n)
        .map(|i| {
            hv[i * per..(i + 1) * per]
                .iter()
                .map(|x| *x as f32)
                .collect()
        })
        .collect();
    (rows, hidden)
}

fn max_diff(model: &clip::ClipTextModel, ids: &[Vec<u32>], want: &[Vec<f32>]) -> f32 {
    let got = model.embed(ids).unwrap();
    got.iter()
        .zip(want)
        .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
        .fold(0.0, f32::max)
}

/// Hidden states equal transformers' within 1e-4, from the diffusers folder
/// and from the A1111 single file.
#[test]
fn sd1_hidden_states_match_transformers() {
    let (ids, want) = ids_and_hidden("hidden_sd1");
    let (model, info) = clip::load(&fixture("sd1/base"), &LoadOptions::default()).unwrap();
    assert_eq!(info.layout, "diffusers text_encoder");
    let d = max_diff(&model, &ids, &want);
    assert!(d <= 1e-4, "diffusers folder: max |Δ| = {d}");
    let opts = LoadOptions {
        heads: Some(4),
        ..Default::default()
    };
    let (model, info) = clip::load(&fixture("sd1/base_ldm.safetensors"), &opts).unwrap();
    assert_eq!(info.layout, "ldm sd1 (HF CLIP)");
    let d = max_diff(&model, &ids, &want);
    assert!(d <= 1e-4, "single file: max |Δ| = {d}");
}

/// SD2's OpenCLIP layout (fused in_proj) gives transformers' hidden states.
/// The tiny fixture encoder uses quick_gelu and keeps all its blocks (real
/// SD2 uses exact GELU and the penultimate block: the defaults).
#[test]
fn sd2_openclip_hidden_states_match_transformers() {
    let (ids, want) = ids_and_hidden("hidden_sd2");
    let opts = LoadOptions {
        heads: Some(4),
        activation: Some(Activation::QuickGelu),
        openclip_layers: Some(2),
    };
    let (model, info) = clip::load(&fixture("sd2/base_ldm.safetensors"), &opts).unwrap();
    assert_eq!(info.layout, "ldm sd2 (OpenCLIP)");
    let d = max_diff(&model, &ids, &want);
    assert!(d <= 1e-4, "max |Δ| = {d}");
    // The wrong activation is caught by the same comparison.
    let wrong = LoadOptions {
        activation: Some(Activation::Gelu),
        ..opts
    };
    let (model, _) = clip::load(&fixture("sd2/base_ldm.safetensors"), &wrong).unwrap();
    assert!(max_diff(&model, &ids, &want) > 1e-2);
}

#[test]
fn sdxl_is_reported_as_not_yet_supported() {
    for p in ["sdxl/base", "sdxl/base_ldm.safetensors"] {
        let e = clip::load(&fixture(p), &LoadOptions::default())
            .err()
            .expect("must fail");
        assert!(e.to_string().contains("SDXL"), "{e}");
    }
}

fn engine() -> Engine {
    let (model, _) = clip::load(&fixture("sd1/base"), &LoadOptions::default()).unwrap();
    Engine::new(ClipTokenizer::embedded(), Some(model), EOS)
}

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("transport/gates.json")).unwrap())
        .unwrap()
}

fn membranes(r: &serde_json::Value) -> Vec<Membrane> {
    r["membranes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| Membrane {
            name: m["name"].as_str().unwrap().into(),
            file: Path::new("-").into(),
            concepts: m["concepts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().into())
                .collect(),
            rank: Some(1),
            arch: "sd1".into(),
        })
        .collect()
}

/// Gates equal the torch rendering of the reference within 1e-5 for every
/// prompt, membrane (single and multi-concept) and metric, both curves.
#[test]
fn gates_match_reference_formula() {
    let r = reference();
    let mut e = engine();
    e.set_membranes(membranes(&r)).unwrap();
    let mut checked = 0;
    for metric in [Metric::Clipcos, Metric::Tokenuni, Metric::ClipcosTokenuni] {
        let key = serde_json::to_value(metric).unwrap();
        let key = key.as_str().unwrap();
        for curve in [Curve::Reference, Curve::Linear] {
            let opts = GateOptions {
                metric,
                curve,
                facilitate: 1.0,
                ..Default::default()
            };
            for p in r["prompts"].as_array().unwrap() {
                let prompt = p["prompt"].as_str().unwrap();
                let got: HashMap<String, _> =
                    e.gate(prompt, None, &opts).unwrap().into_iter().collect();
                for (name, want) in p["membranes"].as_object().unwrap() {
                    let g = got[name];
                    let w = &want["metrics"][key];
                    let strength = match curve {
                        Curve::Reference => w["strength_reference"].as_f64().unwrap(),
                        Curve::Linear => w["strength_linear"].as_f64().unwrap(),
                    };
                    assert!(
                        (g.rate - w["rate"].as_f64().unwrap()).abs() <= 1e-5,
                        "{prompt} {name} {key}: {} vs {}",
                        g.rate,
                        w["rate"]
                    );
                    assert!(
                        (g.strength - strength).abs() <= 1e-5,
                        "{prompt} {name} {key} {curve:?}"
                    );
                    let concepts = want["concepts"].as_object().unwrap();
                    let tok = concepts
                        .values()
                        .map(|c| c["tokenuni"].as_f64().unwrap())
                        .fold(0.0, f64::max);
                    let cos = concepts
                        .values()
                        .map(|c| c["clipcos"].as_f64().unwrap())
                        .fold(f64::MIN, f64::max);
                    assert!((g.tokenuni - tok).abs() <= 1e-12, "{prompt} {name}");
                    assert!((g.clipcos.unwrap() - cos).abs() <= 1e-5, "{prompt} {name}");
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 30 * 3 * 3 * 2);
}

/// Facilitate multiplies the rate before the curve; allone is 1; without
/// an encoder clipcos is refused while tokenuni works.
#[test]
fn facilitate_allone_and_tokenuni_only() {
    let r = reference();
    let mut e = engine();
    e.set_membranes(membranes(&r)).unwrap();
    let base = e
        .gate(
            "a duck",
            Some(&["cartoons".into()]),
            &GateOptions::default(),
        )
        .unwrap()[0]
        .1;
    let half = GateOptions {
        facilitate: 0.5,
        ..Default::default()
    };
    let g = e.gate("a duck", Some(&["cartoons".into()]), &half).unwrap()[0].1;
    assert!((g.rate - base.rate * 0.5).abs() < 1e-12);
    assert!((g.strength - base.rate * base.rate * 0.25).abs() < 1e-12);
    let one = GateOptions {
        metric: Metric::Allone,
        ..Default::default()
    };
    assert_eq!(e.gate("anything", None, &one).unwrap()[0].1.strength, 1.0);
    let mut bare = Engine::new(ClipTokenizer::embedded(), None, EOS);
    bare.set_membranes(membranes(&r)).unwrap();
    assert!(bare.gate("mickey", None, &GateOptions::default()).is_err());
    let tok = GateOptions {
        metric: Metric::Tokenuni,
        ..Default::default()
    };
    let g: HashMap<_, _> = bare
        .gate("mickey", None, &tok)
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(g["cartoons"].rate, 0.5); // "mickey mouse": 1 of 2 tokens
    assert_eq!(g["cartoons"].clipcos, None);
    assert!(bare.gate("x", Some(&["nope".into()]), &tok).is_err());
}

/// WebUI syntax is removed before gating, and AND takes the max of its parts.
#[test]
fn webui_prompts_gate_like_their_words() {
    let r = reference();
    let mut e = engine();
    e.set_membranes(membranes(&r)).unwrap();
    let opts = GateOptions::default();
    let plain = e.gate("a photo of pikachu", None, &opts).unwrap();
    let webui = e
        .gate(
            "<lora:erase:0.8> (a photo:1.2) of [pikachu] BREAK",
            None,
            &opts,
        )
        .unwrap();
    assert_eq!(plain, webui);
    let and: HashMap<_, _> = e
        .gate("a cat sitting on a mat AND van gogh:0.7", None, &opts)
        .unwrap()
        .into_iter()
        .collect();
    let style = e.gate("van gogh", Some(&["style".into()]), &opts).unwrap()[0].1;
    assert_eq!(and["style"], style);
}

/// Random prompts built from syntax characters, unicode and emoji never
/// panic the normaliser or the tokenizer, and always give 77 ids that start
/// with BOS and hold EOS.
#[test]
fn random_prompts_never_panic() {
    let alphabet: Vec<char> =
        "ab cAND BREAK()[]{}<>:|\\,.!?'0123456789éßЖ東🙂👍🏽\u{200d}\u{0301}\t\n&amp;lora:x:1"
            .chars()
            .collect();
    let tok = ClipTokenizer::embedded();
    let mut seed: u64 = 42;
    for _ in 0..2000 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let len = (seed >> 58) as usize * 3;
        let s: String = (0..len)
            .map(|i| {
                let x =
                    seed.rotate_left(i as u32 * 7) ^ (i as u64).wrapping_mul(0x9e3779b97f4a7c15);
                alphabet[(x % alphabet.len() as u64) as usize]
            })
            .collect();
        for part in spm::transport::prompt::normalize(&s) {
            let ids = tok.encode_padded(&part, 77, EOS);
            assert_eq!(ids.len(), 77, "{s:?}");
            assert_eq!(ids[0], 49406, "{s:?}");
            assert!(ids.contains(&EOS), "{s:?}");
        }
    }
}
