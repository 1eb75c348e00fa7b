//! Resumable training state: every trained tensor, its Adam moments and
//! step count, and the global step, in one safetensors file written
//! atomically (so a crash while saving leaves the previous one intact).
//! Because each step draws from its own seeded generator
//! ([`super::step_rng`]), a resumed run makes the same draws the
//! uninterrupted one would have.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use safetensors::Dtype;

use super::optim::Adam;
use crate::error::{Error, Result};
use crate::io::safetensors::SafetensorsFile;
use crate::io::tensor::RawTensor;

fn raw_of(t: &Tensor) -> Result<RawTensor> {
    let vals = t
        .to_dtype(candle_core::DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| Error::usage(e.to_string()))?;
    Ok(RawTensor::from_f32(Dtype::F32, t.dims().to_vec(), &vals))
}

/// Save `opt`'s parameters and state after `step` steps; `fingerprint`
/// identifies the run's options (a resume with other options is refused).
pub fn save(path: &Path, opt: &Adam, step: usize, fingerprint: &str) -> Result<()> {
    let mut tensors = Vec::new();
    let mut counts = Vec::new();
    for s in &opt.slots {
        tensors.push((format!("param/{}", s.name), raw_of(s.var.as_tensor())?));
        tensors.push((format!("m/{}", s.name), raw_of(&s.m)?));
        tensors.push((format!("v/{}", s.name), raw_of(&s.v)?));
        counts.push(s.t);
    }
    let mut meta = BTreeMap::new();
    meta.insert("spm_train_state".into(), "1".into());
    meta.insert("step".into(), step.to_string());
    meta.insert(
        "slot_steps".into(),
        serde_json::to_string(&counts).expect("json"),
    );
    meta.insert("fingerprint".into(), fingerprint.into());
    super::output::write(path, &meta, &tensors)
}

/// Restore a state saved by [`save`] into `opt`; returns the step to go on from.
pub fn load(path: &Path, opt: &mut Adam, fingerprint: &str, dev: &Device) -> Result<usize> {
    let f = SafetensorsFile::open(path)?;
    let meta = &f.header.metadata;
    if meta.get("spm_train_state").map(String::as_str) != Some("1") {
        return Err(Error::file(path, "not an `spm train` checkpoint"));
    }
    if meta.get("fingerprint").map(String::as_str) != Some(fingerprint) {
        return Err(Error::file(
            path,
            "this checkpoint was written by a run with other options (method, model, concept, rank, lr …); resume with the same ones",
        ));
    }
    let step: usize = meta
        .get("step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::key(path, "step", "missing or not a number"))?;
    let counts: Vec<u64> = meta
        .get("slot_steps")
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| Error::key(path, "slot_steps", "missing or malformed"))?;
    if counts.len() != opt.slots.len() {
        return Err(Error::file(
            path,
            format!(
                "holds {} tensors, this run trains {}",
                counts.len(),
                opt.slots.len()
            ),
        ));
    }
    let tensors: BTreeMap<String, RawTensor> = f.tensors().into_iter().collect();
    let get = |key: String, like: &Tensor| -> Result<Tensor> {
        let r = tensors
            .get(&key)
            .ok_or_else(|| Error::key(path, &key, "missing"))?;
        if r.shape != like.dims() {
            return Err(Error::key(
                path,
                &key,
                format!("shape {:?}, this run has {:?}", r.shape, like.dims()),
            ));
        }
        let v = r
            .to_f32()
            .ok_or_else(|| Error::key(path, &key, "not a float tensor"))?;
        if v.iter().any(|x| !x.is_finite()) {
            return Err(Error::key(path, &key, "holds NaN or infinite values"));
        }
        Tensor::from_vec(v, r.shape.clone(), dev)
            .and_then(|t| t.to_dtype(like.dtype()))
            .map_err(|e| Error::usage(e.to_string()))
    };
    for (s, c) in opt.slots.iter_mut().zip(counts) {
        let p = get(format!("param/{}", s.name), s.var.as_tensor())?;
        s.m = get(format!("m/{}", s.name), &s.m)?;
        s.v = get(format!("v/{}", s.name), &s.v)?;
        s.var.set(&p).map_err(|e| Error::usage(e.to_string()))?;
        s.t = c;
    }
    Ok(step)
}
