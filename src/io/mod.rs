//! File I/O: the safetensors container (zero-copy reads, streamed writes),
//! PyTorch pickles read as data, and atomic output.

pub mod lazy;
pub mod output;
pub mod pickle;
pub mod positioned;
pub mod safetensors;
pub mod tensor;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use tensor::RawTensor;

/// The container an adapter came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    Safetensors,
    Pickle,
}

/// A whole adapter-sized file in memory (tensors may borrow a memory map).
pub struct TensorFile {
    pub path: PathBuf,
    pub container: Container,
    pub metadata: BTreeMap<String, String>,
    /// In file order.
    pub tensors: Vec<(String, RawTensor)>,
    pub file_size: u64,
}

/// Whether `path` names a PyTorch pickle (`.pt`/`.ckpt`/`.bin`/`.pth`),
/// which is read as data; anything else is taken for safetensors.
pub fn is_pickle(path: &Path) -> bool {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    matches!(ext.as_str(), "pt" | "ckpt" | "bin" | "pth")
}

/// Open a LoRA/SPM file: `.safetensors`, or a pickled `.pt`/`.ckpt`/`.bin`.
pub fn open_tensor_file(path: &Path) -> Result<TensorFile> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::file(
            path,
            "is a folder, expected a .safetensors or .pt file",
        ));
    }
    if is_pickle(path) {
        return Ok(TensorFile {
            path: path.to_path_buf(),
            container: Container::Pickle,
            metadata: BTreeMap::new(),
            tensors: pickle::read_state_dict(path)?,
            file_size: meta.len(),
        });
    }
    let f = safetensors::SafetensorsFile::open(path)?;
    Ok(TensorFile {
        path: path.to_path_buf(),
        container: Container::Safetensors,
        metadata: f.header.metadata.clone(),
        tensors: f.tensors(),
        file_size: f.file_size(),
    })
}
