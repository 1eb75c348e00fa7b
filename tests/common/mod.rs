//! Test helpers. Files are read back with the `safetensors` crate's own
//! deserializer, an implementation independent of spm's reader.
#![allow(dead_code)]

pub mod gen;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use assert_cmd::Command;
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

pub fn spm() -> Command {
    Command::cargo_bin("spm").unwrap()
}

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/data")
        .join(rel)
}

#[derive(Debug, Clone, PartialEq)]
pub struct T {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl T {
    pub fn values(&self) -> Vec<f64> {
        let b = &self.bytes;
        match self.dtype {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            Dtype::F64 => b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            Dtype::I64 => b
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            other => panic!("dtype {other:?}"),
        }
    }
}

pub struct Loaded {
    pub tensors: BTreeMap<String, T>,
    pub metadata: HashMap<String, String>,
}

pub fn load(path: &Path) -> Loaded {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = meta.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                T {
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    bytes: v.data().to_vec(),
                },
            )
        })
        .collect();
    Loaded { tensors, metadata }
}

/// Write tensors (in order) and metadata with the `safetensors` crate's own
/// serializer, to build modified inputs independently of spm's writer.
pub fn save(path: &Path, tensors: &[(String, T)], metadata: &HashMap<String, String>) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, Some(metadata.clone()), path).unwrap();
}

/// Copy a safetensors file with some tensors changed by `edit(key, tensor)`
/// (metadata kept), through the `safetensors` crate.
pub fn rewrite(src: &Path, dst: &Path, mut edit: impl FnMut(&str, &mut T)) {
    let l = load(src);
    let tensors: Vec<(String, T)> = l
        .tensors
        .into_iter()
        .map(|(k, mut t)| {
            edit(&k, &mut t);
            (k, t)
        })
        .collect();
    save(dst, &tensors, &l.metadata);
}

/// Run spm with `args`, asserting success; returns stdout.
pub fn run_ok(args: &[&str]) -> String {
    let out = spm().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "spm {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Group kohya-style keys `module.param` by module.
pub fn modules(l: &Loaded) -> BTreeMap<String, BTreeMap<String, T>> {
    let mut out: BTreeMap<String, BTreeMap<String, T>> = BTreeMap::new();
    for (k, t) in &l.tensors {
        let (m, param) = k.split_once('.').unwrap();
        out.entry(m.to_string())
            .or_default()
            .insert(param.to_string(), t.clone());
    }
    out
}

/// ΔW = (alpha/r)·up@down for one module (f64), flattened row-major [out, in·k·k].
pub fn delta(down: &T, up: &T, alpha: Option<&T>) -> Vec<f64> {
    let r = down.shape[0];
    let d = down.values();
    let u = up.values();
    let inn = d.len() / r;
    let out = u.len() / r;
    let scale = alpha.map(|a| a.values()[0]).unwrap_or(r as f64) / r as f64;
    let mut w = vec![0.0; out * inn];
    for o in 0..out {
        for k in 0..r {
            for i in 0..inn {
                w[o * inn + i] += scale * u[o * r + k] * d[k * inn + i];
            }
        }
    }
    w
}
