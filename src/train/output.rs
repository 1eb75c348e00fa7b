//! What training writes: a kohya-style LoRA (SPM's own file format:
//! `lora_unet_<diffusers path, dots as _>.lora_down.weight` / `.lora_up.weight`
//! / `.alpha`, F32, with the reference's `prompts`/`rank`/`alpha` metadata),
//! or, for `--full`, the trained tensors as a partial diffusers state dict.
//! Both carry the concept in `prompts`, which is what lets the sidecar gate
//! ESD and Forget-Me-Not erasers too. Writes are atomic.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Var};
use safetensors::Dtype;

use crate::error::{Error, Result};
use crate::io::output::AtomicFile;
use crate::io::tensor::RawTensor;

/// Python's `str(float)` for the values the reference writes ("1.0").
pub fn py_float(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e16 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

pub fn raw(var: &Var) -> Result<RawTensor> {
    let t = var.as_tensor();
    let shape = t.dims().to_vec();
    let vals = t
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| Error::usage(e.to_string()))?;
    Ok(RawTensor::from_f32(Dtype::F32, shape, &vals))
}

/// Write `tensors` with `metadata` to `dest`, atomically.
pub fn write(
    dest: &Path,
    metadata: &BTreeMap<String, String>,
    tensors: &[(String, RawTensor)],
) -> Result<()> {
    let mut f = AtomicFile::create(dest)?;
    {
        let mut w = f.buffered();
        crate::io::safetensors::write_tensors(&mut w, metadata, tensors)
            .map_err(|e| Error::io(dest, e))?;
        std::io::Write::flush(&mut w).map_err(|e| Error::io(dest, e))?;
    }
    f.commit()
}

/// The LoRA file for trained factors named `<path>.down` / `<path>.up`.
pub fn lora_tensors(vars: &[(String, Var)], alpha: f64) -> Result<Vec<(String, RawTensor)>> {
    let mut out = Vec::new();
    for (name, var) in vars {
        let (path, which) = name
            .rsplit_once('.')
            .ok_or_else(|| Error::usage(format!("bad factor name {name}")))?;
        let key = format!("lora_unet_{}", path.replace('.', "_"));
        match which {
            "down" => {
                out.push((format!("{key}.lora_down.weight"), raw(var)?));
            }
            "up" => {
                out.push((format!("{key}.lora_up.weight"), raw(var)?));
                out.push((format!("{key}.alpha"), RawTensor::scalar(Dtype::F32, alpha)));
            }
            _ => return Err(Error::usage(format!("bad factor name {name}"))),
        }
    }
    Ok(out)
}

/// Full trained tensors under their diffusers parameter names.
pub fn full_tensors(vars: &[(String, Var)]) -> Result<Vec<(String, RawTensor)>> {
    vars.iter().map(|(n, v)| Ok((n.clone(), raw(v)?))).collect()
}
