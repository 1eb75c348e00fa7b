//! `spm convert`: write an adapter's modules under another scheme.
//!
//! Lossless by construction for the kohya family and PEFT: tensors keep their
//! bytes and dtype; only names change, plus the 2-D ↔ 4-D view change that
//! 1×1-conv vs linear projections need (lora-schemes.md §7). Anything that
//! would lose information (old diffusers' missing layers and alphas, unknown
//! keys) is refused unless the user opts in, and then listed.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::adapter::{most_common, Adapter, Module, ALPHA_DTYPE_KEY};
use crate::error::{Error, Result};
use crate::io::tensor::{dtype_name, is_float, Dtype, RawTensor};
use crate::schemes::keys::old_diffusers_key;
use crate::schemes::{inventory, Arch, Class, Component, Inventory, Kind, Scheme};

/// How a static strength is baked into the factors.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Curve {
    /// SPM's reference: both factors are multiplied by m, so ΔW scales by m².
    Reference,
    /// Only `lora_up` is multiplied: ΔW scales by m, like a WebUI weight.
    Linear,
}

#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub to: Scheme,
    /// Cast floating tensors (alpha included) to this dtype.
    pub dtype: Option<Dtype>,
    pub strength: Option<f32>,
    pub curve: Curve,
    pub allow_lossy: bool,
    pub allow_unknown: bool,
    /// `modelspec.title` / `ss_output_name` (the output file stem).
    pub title: String,
    /// PEFT output: fold alpha/r into `lora_B` and write alpha = r, so the
    /// file means the same to a loader that ignores the header's alphas.
    pub peft_fold_alpha: bool,
}

/// The output of a conversion, before it is written.
pub struct Rendered {
    pub tensors: Vec<(String, RawTensor)>,
    pub metadata: BTreeMap<String, String>,
    /// What a lossy conversion dropped or approximated (empty when lossless).
    pub lossy: Vec<String>,
}

/// Metadata keys never carried over: stale hashes and scheme-specific keys
/// that are regenerated for the output scheme.
const DROPPED_METADATA: [&str; 5] = [
    "sshs_model_hash",
    "sshs_legacy_hash",
    "format",
    "lora_adapter_metadata",
    ALPHA_DTYPE_KEY,
];

/// Python's `str(float)` for the values kohya writes (`1.0`, `0.5`, `16.0`).
pub fn py_float(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e16 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

/// Convert a loaded adapter.
pub fn convert(ad: &Adapter, opts: &ConvertOptions) -> Result<Rendered> {
    ad.ensure_clean(opts.allow_unknown)?;
    let mut r =
        render(ad.arch, &ad.modules, &ad.metadata, &ad.passthrough, opts).map_err(|e| match e {
            Error::Usage(m) => Error::file(&ad.path, m),
            e => e,
        })?;
    if !ad.unknown.is_empty() {
        r.lossy.push(format!(
            "{} unknown key(s) dropped (--allow-unknown)",
            ad.unknown.len()
        ));
    }
    Ok(r)
}

/// Render modules of `arch` in `opts.to`. Shared by convert and merge.
pub fn render(
    arch: Arch,
    modules: &[Module],
    metadata_in: &BTreeMap<String, String>,
    passthrough: &[(String, RawTensor)],
    opts: &ConvertOptions,
) -> Result<Rendered> {
    let inv = inventory(arch);
    let sai = opts.to.sai_names(arch);
    let mut tensors = Vec::new();
    let mut lossy = Vec::new();
    let mut refused: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut kept: Vec<Module> = Vec::new();

    for m in modules {
        let spec = &inv.modules[m.index];
        let prepared = prepare(m, spec.kind, opts);
        let m = &prepared;
        if opts.to.is_flat() {
            let name = inv.flat_name(m.index, sai);
            for (param, t) in [
                ("lora_down.weight", &m.down),
                ("lora_up.weight", &m.up),
                ("alpha", &m.alpha),
            ] {
                if let Some(t) = t {
                    tensors.push((format!("{name}.{param}"), t.clone()));
                }
            }
            for (p, t) in &m.other {
                tensors.push((format!("{name}.{p}"), t.clone()));
            }
            continue;
        }
        if !m.other.is_empty() {
            let params = m.other.keys().cloned().collect::<Vec<_>>().join("/");
            refused.entry(params).or_default().push(spec.path.clone());
            continue;
        }
        let (Some(down), Some(up)) = (&m.down, &m.up) else {
            continue;
        };
        match opts.to {
            Scheme::Peft => {
                // diffusers under transformers ≥ 5 writes CLIPTextModel keys
                // without `text_model.` but keeps it for the SDXL second
                // encoder (CLIPTextModelWithProjection); we match that.
                let path = match spec.component {
                    Component::TextEncoder => spec.path.trim_start_matches("text_model."),
                    _ => spec.path.as_str(),
                };
                let base = format!("{}.{path}", spec.component.dotted_prefix());
                tensors.push((format!("{base}.lora_A.weight"), down.clone()));
                tensors.push((format!("{base}.lora_B.weight"), up.clone()));
            }
            Scheme::DiffusersOld => {
                let (Some(kd), Some(ku)) = (
                    old_diffusers_key(spec.component, &spec.path, true),
                    old_diffusers_key(spec.component, &spec.path, false),
                ) else {
                    lossy.push(format!(
                        "dropped {} {} (old diffusers holds attention layers only)",
                        spec.component.name(),
                        spec.path
                    ));
                    continue;
                };
                let scale = m.scale().unwrap_or(1.0);
                let up = if scale == 1.0 {
                    up.clone()
                } else {
                    if scale.log2().fract() != 0.0 {
                        lossy.push(format!(
                            "{}: alpha/rank = {} folded into lora_up (rounded)",
                            spec.path, scale
                        ));
                    }
                    scale_tensor(up, scale as f32)
                };
                tensors.push((kd, down.clone()));
                tensors.push((ku, up));
            }
            _ => unreachable!("flat schemes handled above"),
        }
        kept.push(prepared.clone());
    }
    if !refused.is_empty() {
        let why: Vec<String> = refused
            .iter()
            .map(|(params, paths)| {
                let shown: Vec<&str> = paths.iter().take(3).map(String::as_str).collect();
                format!(
                    "{} module(s) carry {params} (e.g. {}{})",
                    paths.len(),
                    shown.join(", "),
                    if paths.len() > 3 { ", …" } else { "" }
                )
            })
            .collect();
        return Err(Error::usage(format!(
            "cannot write {}: {}, which it cannot hold (LyCORIS/DoRA files convert between spm/kohya/ldm only)",
            opts.to.name(),
            why.join("; ")
        )));
    }
    if !passthrough.is_empty() {
        if opts.to.is_flat() {
            tensors.extend(passthrough.iter().cloned());
        } else {
            lossy.push(format!(
                "dropped {} bundled embedding tensor(s)",
                passthrough.len()
            ));
        }
    }
    if !lossy.is_empty() && !opts.allow_lossy {
        let shown: Vec<&str> = lossy.iter().take(3).map(String::as_str).collect();
        return Err(Error::usage(format!(
            "converting to {} would lose data ({} item(s): {}{}); pass --allow-lossy to accept",
            opts.to.name(),
            lossy.len(),
            shown.join("; "),
            if lossy.len() > 3 { "; …" } else { "" }
        )));
    }
    let metadata = build_metadata(arch, modules, metadata_in, opts, &kept);
    Ok(Rendered {
        tensors,
        metadata,
        lossy,
    })
}

/// Apply view changes, strength and dtype to one module.
fn prepare(m: &Module, kind: Kind, opts: &ConvertOptions) -> Module {
    let mut m = m.clone();
    m.down = m.down.map(|d| conform(d, kind, true));
    m.up = m.up.map(|u| conform(u, kind, false));
    if let Some(w) = opts.strength {
        match opts.curve {
            Curve::Reference => {
                m.down = m.down.map(|d| scale_tensor(&d, w));
                m.up = m.up.map(|u| scale_tensor(&u, w));
            }
            Curve::Linear => m.up = m.up.map(|u| scale_tensor(&u, w)),
        }
    }
    if opts.peft_fold_alpha && opts.to == Scheme::Peft {
        if let (Some(scale), Some(r)) = (m.scale(), m.rank()) {
            if scale != 1.0 {
                m.up = m.up.map(|u| scale_tensor(&u, scale as f32));
            }
            let dt = m.alpha.as_ref().map(|a| a.dtype).unwrap_or(Dtype::F32);
            m.alpha = Some(RawTensor::scalar(dt, r as f64));
        }
    }
    if let Some(dt) = opts.dtype {
        let cast = |t: RawTensor| if is_float(t.dtype) { t.cast(dt) } else { t };
        m.down = m.down.map(cast);
        m.up = m.up.map(cast);
        m.alpha = m.alpha.map(cast);
        m.other = m.other.into_iter().map(|(k, t)| (k, cast(t))).collect();
    }
    m
}

/// Pure view change to the layout the target layer needs: 1×1 convs take
/// 4-D factors, linears 2-D. Bytes are untouched.
pub fn conform(t: RawTensor, kind: Kind, down: bool) -> RawTensor {
    let s = &t.shape;
    match (kind, s.len()) {
        (Kind::Linear, 4) if s[2] == 1 && s[3] == 1 => {
            let shape = vec![s[0], s[1]];
            t.reshaped(shape)
        }
        (Kind::Conv1x1, 2) => {
            let shape = vec![s[0], s[1], 1, 1];
            t.reshaped(shape)
        }
        (Kind::Conv3x3, 2) if !down => {
            let shape = vec![s[0], s[1], 1, 1];
            t.reshaped(shape)
        }
        _ => t,
    }
}

/// Multiply a float tensor by `w` in f32 and re-encode in its own dtype.
pub fn scale_tensor(t: &RawTensor, w: f32) -> RawTensor {
    let v: Vec<f32> = t
        .to_f32()
        .expect("float factor")
        .iter()
        .map(|x| x * w)
        .collect();
    RawTensor::from_f32(t.dtype, t.shape.clone(), &v)
}

fn build_metadata(
    arch: Arch,
    modules: &[Module],
    input: &BTreeMap<String, String>,
    opts: &ConvertOptions,
    kept: &[Module],
) -> BTreeMap<String, String> {
    let inv = inventory(arch);
    let mut md: BTreeMap<String, String> = input
        .iter()
        .filter(|(k, _)| !DROPPED_METADATA.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let rank = most_common(modules.iter().filter_map(Module::rank));
    let alpha = most_common(modules.iter().filter_map(Module::alpha_value));
    if let Some(w) = opts.strength {
        md.insert("spm.baked_strength".into(), format!("{w}"));
        md.insert(
            "spm.baked_curve".into(),
            match opts.curve {
                Curve::Reference => "reference (both factors × m: ΔW × m²)".into(),
                Curve::Linear => "linear (lora_up × m: ΔW × m)".into(),
            },
        );
    }
    match opts.to {
        Scheme::Spm => {
            if let Some(r) = rank {
                md.insert("rank".into(), r.to_string());
            }
            if let Some(a) = alpha {
                md.insert("alpha".into(), py_float(a));
            }
            md.entry("prompts".into()).or_default();
        }
        Scheme::Kohya | Scheme::Ldm => kohya_metadata(inv, modules, rank, alpha, opts, &mut md),
        Scheme::Peft => {
            md.insert("format".into(), "pt".into());
            md.insert(
                "lora_adapter_metadata".into(),
                peft_metadata(inv, kept, rank, alpha),
            );
            if let Some(dt) = most_common(
                kept.iter()
                    .filter_map(|m| m.alpha.as_ref().map(|a| a.dtype)),
            ) {
                md.insert(ALPHA_DTYPE_KEY.into(), dtype_name(dt));
            }
        }
        Scheme::DiffusersOld => {
            md.insert("format".into(), "pt".into());
        }
    }
    md
}

fn kohya_metadata(
    inv: &Inventory,
    modules: &[Module],
    rank: Option<usize>,
    alpha: Option<f64>,
    opts: &ConvertOptions,
    md: &mut BTreeMap<String, String>,
) {
    let info = &inv.info;
    let has_conv = modules
        .iter()
        .any(|m| inv.modules[m.index].class == Class::Conv);
    let lycoris = modules.iter().any(|m| {
        m.other
            .keys()
            .any(|k| k != "dora_scale" && k != "lora_mid.weight")
    });
    if !md.contains_key("ss_network_module") {
        let module = if lycoris {
            "lycoris.kohya"
        } else {
            "networks.lora"
        };
        md.insert("ss_network_module".into(), module.into());
    }
    let text = |v: Option<String>| v.unwrap_or_else(|| "None".into());
    md.entry("ss_network_dim".into())
        .or_insert_with(|| text(rank.map(|r| r.to_string())));
    md.entry("ss_network_alpha".into())
        .or_insert_with(|| text(alpha.map(py_float)));
    if !md.contains_key("ss_network_args") {
        let args = if has_conv {
            let conv = modules
                .iter()
                .find(|m| inv.modules[m.index].kind == Kind::Conv3x3);
            let r = conv.and_then(Module::rank).or(rank);
            let a = conv.and_then(Module::alpha_value).or(alpha);
            json!({"conv_dim": text(r.map(|r| r.to_string())), "conv_alpha": text(a.map(py_float))})
                .to_string()
        } else {
            "{}".into()
        };
        md.insert("ss_network_args".into(), args);
    }
    // Keep these consistent with the output architecture (§8.6).
    md.insert(
        "ss_base_model_version".into(),
        info.ss_base_model_version.clone(),
    );
    md.insert("ss_v2".into(), info.ss_v2.clone());
    md.entry("ss_output_name".into())
        .or_insert_with(|| opts.title.clone());
    md.insert("modelspec.sai_model_spec".into(), "1.0.1".into());
    md.insert(
        "modelspec.architecture".into(),
        info.modelspec_architecture.clone(),
    );
    md.insert(
        "modelspec.implementation".into(),
        info.modelspec_implementation.clone(),
    );
    md.entry("modelspec.title".into())
        .or_insert_with(|| opts.title.clone());
    md.entry("modelspec.resolution".into())
        .or_insert_with(|| info.resolution.clone());
}

/// `lora_adapter_metadata` as diffusers writes it: LoraConfig kwargs with a
/// component prefix, exact module paths as targets and per-module patterns
/// wherever rank or alpha differ from the most common value.
fn peft_metadata(
    inv: &Inventory,
    kept: &[Module],
    rank: Option<usize>,
    alpha: Option<f64>,
) -> String {
    let mut root = Map::new();
    for component in [
        Component::Unet,
        Component::TextEncoder,
        Component::TextEncoder2,
    ] {
        let ms: Vec<&Module> = kept
            .iter()
            .filter(|m| inv.modules[m.index].component == component)
            .collect();
        if ms.is_empty() {
            continue;
        }
        let r = most_common(ms.iter().filter_map(|m| m.rank()))
            .or(rank)
            .unwrap_or(1);
        let a = most_common(ms.iter().filter_map(|m| m.alpha_value()))
            .or(alpha)
            .unwrap_or(r as f64);
        let mut targets = Vec::new();
        let mut rank_pattern = Map::new();
        let mut alpha_pattern = Map::new();
        for m in ms {
            let spec = &inv.modules[m.index];
            // Text-encoder paths without `text_model.` match both the
            // transformers-4 and -5 module trees (PEFT matches by suffix).
            let target = spec.path.trim_start_matches("text_model.").to_string();
            if let Some(mr) = m.rank() {
                if mr != r {
                    rank_pattern.insert(target.clone(), json!(mr));
                }
            }
            if let Some(ma) = m.alpha_value() {
                if ma != a {
                    alpha_pattern.insert(target.clone(), json!(ma));
                }
            }
            targets.push(Value::String(target));
        }
        let p = component.dotted_prefix();
        root.insert(format!("{p}.r"), json!(r));
        root.insert(format!("{p}.lora_alpha"), json!(a));
        root.insert(format!("{p}.target_modules"), Value::Array(targets));
        root.insert(format!("{p}.rank_pattern"), Value::Object(rank_pattern));
        root.insert(format!("{p}.alpha_pattern"), Value::Object(alpha_pattern));
        root.insert(format!("{p}.use_dora"), json!(false));
        root.insert(format!("{p}.use_rslora"), json!(false));
        root.insert(format!("{p}.bias"), json!("none"));
        root.insert(format!("{p}.lora_dropout"), json!(0.0));
    }
    serde_json::to_string_pretty(&Value::Object(root)).expect("json")
}
