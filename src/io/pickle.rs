//! PyTorch `.pt`/`.ckpt` files (`torch.save` of a state dict), read as data.
//!
//! candle-core's pickle reader interprets only the opcodes needed to rebuild
//! tensors from the zip archive; it never imports or calls Python objects,
//! so a malicious pickle cannot run code here (unlike `torch.load`).

use std::path::Path;

use candle_core::{DType, Tensor};

use super::tensor::{Dtype, RawTensor};
use crate::error::{Error, Result};

/// Every tensor of the state dict (top level, or under `state_dict`), by
/// name; the same listing the lazy reader uses, read at once.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, RawTensor)>> {
    if !path.exists() {
        return Err(Error::file(path, "no such file"));
    }
    super::lazy::list_pickle(path, std::sync::Arc::new(path.to_path_buf()))?
        .into_iter()
        .map(|t| Ok((t.key.clone(), t.read()?)))
        .collect()
}

pub(crate) fn to_raw(t: &Tensor) -> std::result::Result<RawTensor, String> {
    let shape = t.dims().to_vec();
    let flat = t.flatten_all().map_err(|e| e.to_string())?;
    let err = |e: candle_core::Error| e.to_string();
    let (dtype, bytes): (Dtype, Vec<u8>) = match t.dtype() {
        DType::F32 => (
            Dtype::F32,
            flat.to_vec1::<f32>()
                .map_err(err)?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::F64 => (
            Dtype::F64,
            flat.to_vec1::<f64>()
                .map_err(err)?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::F16 => (
            Dtype::F16,
            flat.to_vec1::<half::f16>()
                .map_err(err)?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::BF16 => (
            Dtype::BF16,
            flat.to_vec1::<half::bf16>()
                .map_err(err)?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::I64 => (
            Dtype::I64,
            flat.to_vec1::<i64>()
                .map_err(err)?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::U8 => (Dtype::U8, flat.to_vec1::<u8>().map_err(err)?),
        DType::U32 => (
            Dtype::U32,
            flat.to_vec1::<u32>()
                .map_err(err)?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        other => return Err(format!("unsupported tensor dtype {other:?}")),
    };
    Ok(RawTensor::from_bytes(dtype, shape, bytes))
}
