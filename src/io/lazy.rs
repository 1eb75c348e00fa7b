//! Tensors listed up front, read one at a time on demand.
//!
//! Commands that walk a whole checkpoint but use each tensor once (extract
//! compares and decomposes a UNet pair) must not hold the checkpoint in
//! memory, nor in a memory map whose touched pages count as the process's
//! resident memory until it exits. Here a safetensors file is a parsed
//! header plus positioned reads of one tensor's byte range into a buffer
//! that is freed after use, and a PyTorch pickle is candle's lazy reader,
//! which parses only the pickle's opcodes (never running code) and reads a
//! single tensor's record from the zip archive per request.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::pickle::PthTensors;

use super::pickle::to_raw;
use super::positioned::read_at;
use super::safetensors::read_header;
use super::tensor::{Dtype, RawTensor};
use crate::error::{Error, Result};

/// Where one listed tensor's bytes are.
#[derive(Clone)]
enum Source {
    Safetensors {
        file: Arc<File>,
        start: u64,
        end: u64,
    },
    Pickle {
        pth: Arc<PthTensors>,
    },
}

/// One tensor of a file, not yet read.
#[derive(Clone)]
pub struct LazyTensor {
    /// The key as stored in the file.
    pub key: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub path: Arc<PathBuf>,
    source: Source,
}

impl LazyTensor {
    /// Read this tensor's bytes now.
    pub fn read(&self) -> Result<RawTensor> {
        match &self.source {
            Source::Safetensors { file, start, end } => {
                let mut buf = vec![0u8; (end - start) as usize];
                read_at(file, &mut buf, *start).map_err(|e| Error::io(&self.path, e))?;
                Ok(RawTensor::from_bytes(self.dtype, self.shape.clone(), buf))
            }
            Source::Pickle { pth } => {
                let t = pth
                    .get(&self.key)
                    .map_err(|e| Error::key(&self.path, &self.key, e.to_string()))?
                    .ok_or_else(|| Error::key(&self.path, &self.key, "vanished from the file"))?;
                to_raw(&t).map_err(|e| Error::key(&self.path, &self.key, e))
            }
        }
    }
}

/// List the tensors of a `.safetensors` file or a pickled state dict
/// (`.pt`/`.ckpt`/`.bin`/`.pth`; a `state_dict` wrapper is looked into),
/// in file order (pickles: by name, as the archive has no order to keep).
pub fn list(path: &Path) -> Result<Vec<LazyTensor>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::file(path, "is a folder, expected a file"));
    }
    let shared = Arc::new(path.to_path_buf());
    if super::is_pickle(path) {
        return list_pickle(path, shared);
    }
    let header = read_header(path)?;
    let file = Arc::new(File::open(path).map_err(|e| Error::io(path, e))?);
    Ok(header
        .tensors
        .into_iter()
        .map(|t| LazyTensor {
            key: t.name,
            dtype: t.dtype,
            shape: t.shape,
            path: shared.clone(),
            source: Source::Safetensors {
                file: file.clone(),
                start: t.start,
                end: t.end,
            },
        })
        .collect())
}

pub(crate) fn list_pickle(path: &Path, shared: Arc<PathBuf>) -> Result<Vec<LazyTensor>> {
    // A plain state dict first, then the `state_dict` wrapper LDM `.ckpt`
    // files use; the first attempt's error is the one worth showing.
    let open = |key: Option<&str>| match PthTensors::new(path, key) {
        Ok(p) if p.tensor_infos().is_empty() => Err("no tensors found".to_string()),
        Ok(p) => Ok(p),
        Err(e) => Err(e.to_string()),
    };
    let pth = match open(None) {
        Ok(p) => p,
        Err(why) => open(Some("state_dict")).map_err(|_| {
            Error::file(path, format!("cannot read as a PyTorch state dict: {why}"))
        })?,
    };
    let pth = Arc::new(pth);
    let mut infos: Vec<_> = pth.tensor_infos().values().collect();
    infos.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = Vec::with_capacity(infos.len());
    for ti in infos {
        let dtype = match ti.dtype {
            candle_core::DType::F32 => Dtype::F32,
            candle_core::DType::F16 => Dtype::F16,
            candle_core::DType::BF16 => Dtype::BF16,
            candle_core::DType::F64 => Dtype::F64,
            candle_core::DType::I64 => Dtype::I64,
            candle_core::DType::U8 => Dtype::U8,
            candle_core::DType::U32 => Dtype::U32,
            other => {
                return Err(Error::key(
                    path,
                    &ti.name,
                    format!("unsupported tensor dtype {other:?}"),
                ))
            }
        };
        out.push(LazyTensor {
            key: ti.name.clone(),
            dtype,
            shape: ti.layout.dims().to_vec(),
            path: shared.clone(),
            source: Source::Pickle { pth: pth.clone() },
        });
    }
    Ok(out)
}
