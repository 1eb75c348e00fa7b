//! `spm merge`: combine several membranes/LoRAs into one file, exactly.
//!
//! Concatenating ranks is an exact sum of deltas: with parts i of weight w_i,
//! ΔW = Σ w_i·(α_i/r_i)·U_i·D_i = [c_1U_1 … c_nU_n]·[D_1; …; D_n] where
//! c_i = w_i·α_i/r_i, stored with alpha = total rank (scale 1). Nothing is
//! approximated (no SVD); when every c_i is 1 the factors keep their bits.
//!
//! This is *not* SPM's inference-time mixing, which multiplies each factor
//! by its own gate and so adds cross terms (spm-reference.md §3); a merged
//! file has one fixed delta.

use std::collections::{BTreeMap, HashMap};

use serde_json::json;

use crate::adapter::{Adapter, Module};
use crate::convert::conform;
use crate::error::{Error, Result};
use crate::io::tensor::{is_float, Dtype, RawTensor};
use crate::schemes::Kind;

/// One input of a merge and its weight.
pub struct Part<'a> {
    pub adapter: &'a Adapter,
    pub weight: f32,
}

/// The merged modules and the metadata that describes their origin.
pub struct Merged {
    pub modules: Vec<Module>,
    pub metadata: BTreeMap<String, String>,
    /// Output float dtype chosen for the factors.
    pub dtype: Dtype,
}

/// Merge `parts` (same architecture) into one rank-concatenated adapter.
pub fn merge(parts: &[Part], dtype: Option<Dtype>) -> Result<Merged> {
    let first = parts
        .first()
        .ok_or_else(|| Error::usage("merge needs at least one input"))?;
    let arch = first.adapter.arch;
    for p in parts {
        if p.adapter.arch != arch {
            return Err(Error::file(
                &p.adapter.path,
                format!(
                    "is {} but {} is {}: membranes of different architectures cannot be merged",
                    p.adapter.arch.name(),
                    first.adapter.path.display(),
                    arch.name()
                ),
            ));
        }
        p.adapter.ensure_plain("merged")?;
    }
    let dtype = dtype.unwrap_or_else(|| widest(parts));
    let inv = first.adapter.inventory();

    let mut order: Vec<usize> = Vec::new();
    let mut by_index: HashMap<usize, Vec<(&Module, f32)>> = HashMap::new();
    for p in parts {
        for m in &p.adapter.modules {
            let e = by_index.entry(m.index).or_insert_with(|| {
                order.push(m.index);
                Vec::new()
            });
            e.push((m, p.weight));
        }
    }
    let mut modules = Vec::with_capacity(order.len());
    for index in order {
        let kind = inv.modules[index].kind;
        let list = &by_index[&index];
        modules.push(
            concat(&inv.modules[index].path, kind, list, dtype)
                .map_err(|msg| Error::key(&first.adapter.path, inv.flat_name(index, false), msg))?,
        );
    }

    let mut metadata = BTreeMap::new();
    let mut concepts: Vec<String> = Vec::new();
    let mut from = Vec::new();
    for p in parts {
        let c = p.adapter.concepts();
        for x in &c {
            if !concepts.contains(x) {
                concepts.push(x.clone());
            }
        }
        from.push(json!({
            "file": p.adapter.path.file_name().map(|s| s.to_string_lossy().to_string()),
            "weight": p.weight,
            "concepts": c,
            "modules": p.adapter.modules.len(),
        }));
    }
    if !concepts.is_empty() {
        metadata.insert("prompts".into(), concepts.join(","));
    }
    metadata.insert(
        "spm.merged_from".into(),
        serde_json::to_string(&from).expect("json"),
    );
    Ok(Merged {
        modules,
        metadata,
        dtype,
    })
}

/// The widest float dtype among the inputs' factors.
fn widest(parts: &[Part]) -> Dtype {
    let rank = |d: Dtype| match d {
        Dtype::F64 => 3,
        Dtype::F32 => 2,
        Dtype::BF16 => 1,
        _ => 0,
    };
    let mut best = Dtype::F16;
    for p in parts {
        for m in &p.adapter.modules {
            if let Some(d) = &m.down {
                if is_float(d.dtype) && rank(d.dtype) > rank(best) {
                    best = d.dtype;
                }
            }
        }
    }
    // Mixed F16/BF16 inputs: neither holds the other, go to F32.
    let mixed = parts
        .iter()
        .flat_map(|p| &p.adapter.modules)
        .filter_map(|m| m.down.as_ref())
        .any(|d| {
            matches!(
                (d.dtype, best),
                (Dtype::F16, Dtype::BF16) | (Dtype::BF16, Dtype::F16)
            )
        });
    if mixed {
        Dtype::F32
    } else {
        best
    }
}

fn concat(
    path: &str,
    kind: Kind,
    list: &[(&Module, f32)],
    dtype: Dtype,
) -> std::result::Result<Module, String> {
    let index = list[0].0.index;
    let mut downs: Vec<f32> = Vec::new();
    let mut ups: Vec<Vec<f32>> = Vec::new();
    let mut down_tail: Option<Vec<usize>> = None;
    let mut out_dim = None;
    let mut total_rank = 0usize;
    for (m, w) in list {
        let down = conform(m.down.clone().expect("plain lora"), kind, true);
        let up = conform(m.up.clone().expect("plain lora"), kind, false);
        let r = down.shape[0];
        let tail = down.shape[1..].to_vec();
        match &down_tail {
            None => down_tail = Some(tail),
            Some(t) if *t != tail => {
                return Err(format!(
                    "{path}: parts disagree on the down factor shape ({t:?} vs {tail:?})"
                ))
            }
            _ => {}
        }
        match out_dim {
            None => out_dim = Some(up.shape[0]),
            Some(o) if o != up.shape[0] => {
                return Err(format!("{path}: parts disagree on output size"))
            }
            _ => {}
        }
        let c = (*w as f64 * m.scale().ok_or("missing rank")?) as f32;
        downs.extend(down.to_f32().ok_or("down factor is not a float tensor")?);
        let u = up.to_f32().ok_or("up factor is not a float tensor")?;
        ups.push(u.into_iter().map(|x| x * c).collect());
        total_rank += r;
    }
    let out = out_dim.unwrap();
    // Interleave columns: row o of the result is [U_1[o,:] … U_n[o,:]].
    let mut up_cat = Vec::with_capacity(out * total_rank);
    for o in 0..out {
        for (u, (m, _)) in ups.iter().zip(list) {
            let r = m.rank().unwrap();
            up_cat.extend_from_slice(&u[o * r..(o + 1) * r]);
        }
    }
    let mut down_shape = vec![total_rank];
    down_shape.extend(down_tail.unwrap());
    let up_shape = if kind == Kind::Linear {
        vec![out, total_rank]
    } else {
        vec![out, total_rank, 1, 1]
    };
    Ok(Module {
        index,
        down: Some(RawTensor::from_f32(dtype, down_shape, &downs)),
        up: Some(RawTensor::from_f32(dtype, up_shape, &up_cat)),
        alpha: Some(RawTensor::scalar(dtype, total_rank as f64)),
        other: BTreeMap::new(),
    })
}
