//! Reading and writing the safetensors container.
//!
//! We parse the header ourselves instead of calling
//! `safetensors::SafeTensors::deserialize` for two reasons: every check must
//! name the file and the offending key (the crate's errors do not), and bake
//! needs the exact tensor order and offsets to stream a checkpoint through
//! `copy_file_range` without ever holding it in memory. Tensor bytes are
//! borrowed from a read-only memory map (zero-copy).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde_json::{Map, Value};

use super::tensor::{dtype_name, dtype_size, parse_dtype, Dtype, RawTensor};
use crate::error::{Error, Result};

/// Largest header we accept. The format's reference implementation uses the
/// same 100 MB bound; it keeps a hostile length field from allocating.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// Where one tensor lies in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub start: u64,
    pub end: u64,
}

/// A parsed header: tensor table in file order, and the string metadata.
#[derive(Debug, Clone)]
pub struct Header {
    pub metadata: BTreeMap<String, String>,
    /// Sorted by offset (file order).
    pub tensors: Vec<TensorInfo>,
    /// Size of the 8-byte length plus the JSON header.
    pub data_start: u64,
}

/// Read and validate only the header of `path`: no tensor data is touched.
pub fn read_header(path: &Path) -> Result<Header> {
    let (mut file, size) = open_sized(path)?;
    let mut len8 = [0u8; 8];
    file.read_exact(&mut len8).map_err(|e| Error::io(path, e))?;
    let n = check_header_len(path, u64::from_le_bytes(len8), size)?;
    let mut json = vec![0u8; n as usize];
    file.read_exact(&mut json).map_err(|e| Error::io(path, e))?;
    parse_header(path, &json, size)
}

/// Open `path` and check it can hold the 8-byte header length at all.
fn open_sized(path: &Path) -> Result<(File, u64)> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if size < 8 {
        return Err(Error::file(
            path,
            format!("not a safetensors file: {size} bytes, shorter than the 8-byte header length"),
        ));
    }
    Ok((file, size))
}

fn check_header_len(path: &Path, n: u64, size: u64) -> Result<u64> {
    if n > MAX_HEADER_LEN {
        return Err(Error::file(
            path,
            format!("header length {n} exceeds the {MAX_HEADER_LEN}-byte limit (corrupt or not safetensors)"),
        ));
    }
    if 8 + n > size {
        return Err(Error::file(
            path,
            format!("header length {n} runs past the end of the file ({size} bytes): truncated or corrupt"),
        ));
    }
    Ok(n)
}

fn parse_header(path: &Path, json: &[u8], size: u64) -> Result<Header> {
    let data_start = 8 + json.len() as u64;
    let root: Map<String, Value> = serde_json::from_slice(json)
        .map_err(|e| Error::file(path, format!("header is not valid JSON: {e}")))?;
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(root.len());
    for (name, value) in root {
        if name == "__metadata__" {
            let obj = value
                .as_object()
                .ok_or_else(|| Error::key(path, "__metadata__", "must be an object of strings"))?;
            for (k, v) in obj {
                let s = v.as_str().ok_or_else(|| {
                    Error::key(
                        path,
                        format!("__metadata__.{k}"),
                        "metadata values must be strings",
                    )
                })?;
                metadata.insert(k.clone(), s.to_string());
            }
            continue;
        }
        let bad = |msg: &str| Error::key(path, &name, msg.to_string());
        let obj = value
            .as_object()
            .ok_or_else(|| bad("tensor entry is not an object"))?;
        let dtype_s = obj
            .get("dtype")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("missing `dtype`"))?;
        let dtype =
            parse_dtype(dtype_s).ok_or_else(|| bad(&format!("unknown dtype `{dtype_s}`")))?;
        let elem = dtype_size(dtype)
            .ok_or_else(|| bad(&format!("dtype `{dtype_s}` is not byte-sized")))?;
        let shape: Vec<usize> = obj
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("missing `shape`"))?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("`shape` must be a list of non-negative integers"))?;
        let offs = obj
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .ok_or_else(|| bad("`data_offsets` must be [start, end]"))?;
        let (Some(s), Some(e)) = (offs[0].as_u64(), offs[1].as_u64()) else {
            return Err(bad("`data_offsets` must be non-negative integers"));
        };
        let want = shape
            .iter()
            .try_fold(elem as u64, |acc, d| acc.checked_mul(*d as u64))
            .ok_or_else(|| bad("shape overflows"))?;
        if e < s || e - s != want {
            return Err(bad(&format!(
                "data_offsets [{s}, {e}] hold {} bytes but dtype {dtype_s} × shape {shape:?} needs {want}",
                e.saturating_sub(s)
            )));
        }
        if data_start + e > size {
            return Err(bad(&format!(
                "data_offsets [{s}, {e}] run past the end of the file ({size} bytes): truncated"
            )));
        }
        tensors.push(TensorInfo {
            name,
            dtype,
            shape,
            start: data_start + s,
            end: data_start + e,
        });
    }
    tensors.sort_by_key(|t| (t.start, t.end));
    for pair in tensors.windows(2) {
        if pair[1].start < pair[0].end {
            return Err(Error::key(
                path,
                &pair[1].name,
                format!("data overlaps tensor `{}`", pair[0].name),
            ));
        }
    }
    Ok(Header {
        metadata,
        tensors,
        data_start,
    })
}

/// A safetensors file opened through a read-only memory map.
pub struct SafetensorsFile {
    pub path: PathBuf,
    pub header: Header,
    map: Arc<Mmap>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let (file, size) = open_sized(path)?;
        // SAFETY: the map is read-only; spm never writes to an input file
        // (outputs go to a temp file renamed into place), so the only way the
        // bytes change under us is another process truncating the file.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let n = check_header_len(path, u64::from_le_bytes(map[..8].try_into().unwrap()), size)?;
        let header = parse_header(path, &map[8..8 + n as usize], size)?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            header,
            map: Arc::new(map),
        })
    }

    /// All tensors in file order, borrowing bytes from the map.
    pub fn tensors(&self) -> Vec<(String, RawTensor)> {
        self.header
            .tensors
            .iter()
            .map(|t| (t.name.clone(), self.tensor(t)))
            .collect()
    }

    pub fn tensor(&self, t: &TensorInfo) -> RawTensor {
        RawTensor::mapped(
            t.dtype,
            t.shape.clone(),
            self.map.clone(),
            t.start as usize..t.end as usize,
        )
    }

    pub fn file_size(&self) -> u64 {
        self.map.len() as u64
    }
}

/// Serialise a header for `tensors` (name, dtype, shape, byte length) in the
/// given order, padded with spaces to an 8-byte boundary as the format asks.
pub fn encode_header(
    metadata: &BTreeMap<String, String>,
    tensors: &[(String, Dtype, Vec<usize>, u64)],
) -> Vec<u8> {
    let mut root = Map::new();
    if !metadata.is_empty() {
        let m: Map<String, Value> = metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        root.insert("__metadata__".into(), Value::Object(m));
    }
    let mut offset = 0u64;
    for (name, dtype, shape, len) in tensors {
        let mut entry = Map::new();
        entry.insert("dtype".into(), Value::String(dtype_name(*dtype)));
        entry.insert("shape".into(), Value::from(shape.clone()));
        entry.insert(
            "data_offsets".into(),
            Value::from(vec![offset, offset + len]),
        );
        root.insert(name.clone(), Value::Object(entry));
        offset += len;
    }
    let mut json = serde_json::to_vec(&Value::Object(root)).expect("header serialises");
    while !(json.len() + 8).is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(json.len() + 8);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

/// Write a whole in-memory tensor list to `w` in the given order.
pub fn write_tensors<W: Write>(
    w: &mut W,
    metadata: &BTreeMap<String, String>,
    tensors: &[(String, RawTensor)],
) -> std::io::Result<()> {
    let table: Vec<_> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.dtype, t.shape.clone(), t.bytes().len() as u64))
        .collect();
    w.write_all(&encode_header(metadata, &table))?;
    for (_, t) in tensors {
        w.write_all(t.bytes())?;
    }
    Ok(())
}
