//! Checkpoint layouts → one canonical (diffusers) naming.
//!
//! Networks take a `VarBuilder` and never see a file format: this module
//! turns a diffusers pipeline folder (`unet/ vae/ text_encoder/ tokenizer/
//! scheduler/`, fp32/fp16/bf16, sharded or not) or an A1111/LDM single file
//! (`.safetensors`, or a `.ckpt` pickle read as data only) into a
//! [`Store`]: canonical name → tensor, read lazily from a memory map, with
//! errors that name the file and the key a user would look for in it.
//! The LDM UNet renaming is computed from the UNet config (the same rule
//! `converters/*.json` tabulates for SD1/SD2 LoRA names), so tiny test
//! models and SD1.5/SD2.1 go through the same code.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
use crate::io::tensor::RawTensor;
use crate::io::{open_tensor_file, safetensors::SafetensorsFile};

/// One stored tensor and where it came from (for messages).
#[derive(Clone)]
struct Entry {
    tensor: RawTensor,
    file: Arc<PathBuf>,
    key: String,
}

/// Canonical name → tensor. Implements candle's `SimpleBackend`, so a
/// network builds from it through an ordinary `VarBuilder`.
#[derive(Clone, Default)]
pub struct Store {
    entries: HashMap<String, Entry>,
    /// What a missing name was looked up in, for the error.
    origin: String,
}

/// Every tensor of some files, read once (memory-mapped safetensors, or a
/// pickle parsed as data), so one checkpoint can feed several stores.
pub struct Tensors {
    files: Vec<PathBuf>,
    items: Vec<(Arc<PathBuf>, String, RawTensor)>,
}

impl Tensors {
    pub fn read(files: &[PathBuf]) -> Result<Tensors> {
        let mut items = Vec::new();
        for path in files {
            let file = Arc::new(path.clone());
            for (key, tensor) in read_tensors(path)? {
                items.push((file.clone(), key, tensor));
            }
        }
        Ok(Tensors {
            files: files.to_vec(),
            items,
        })
    }

    /// `(key, tensor)` pairs, in file order.
    pub fn pairs(&self) -> Vec<(String, RawTensor)> {
        self.items
            .iter()
            .map(|(_, k, t)| (k.clone(), t.clone()))
            .collect()
    }

    /// A store of the tensors `rename` keeps, under its names (tensors
    /// share their bytes with this set).
    pub fn store(&self, rename: impl Fn(&str) -> Option<String>) -> Store {
        let mut entries = HashMap::new();
        for (file, key, tensor) in &self.items {
            if let Some(name) = rename(key) {
                entries.insert(
                    name,
                    Entry {
                        tensor: tensor.clone(),
                        file: file.clone(),
                        key: key.clone(),
                    },
                );
            }
        }
        let origin = self
            .files
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Store { entries, origin }
    }
}

impl Store {
    /// All tensors of the given files, renamed by `rename` (None: skip).
    pub fn from_files(files: &[PathBuf], rename: impl Fn(&str) -> Option<String>) -> Result<Store> {
        Ok(Tensors::read(files)?.store(rename))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The shape of a stored tensor, by canonical name.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.tensor.shape.as_slice())
    }

    /// A `VarBuilder` over this store, converting to `dtype` on `device`.
    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn load(
        &self,
        name: &str,
        shape: Option<&Shape>,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let e = self.entries.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("{}: missing weight `{name}`", self.origin))
        })?;
        let where_ = || format!("{}: `{}`", e.file.display(), e.key);
        let values = e
            .tensor
            .to_f32()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: not a float tensor", where_())))?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            candle_core::bail!(
                "{}: value {} at index {i} is not finite; the checkpoint is damaged",
                where_(),
                values[i]
            );
        }
        let stored = e.tensor.shape.clone();
        let t = Tensor::from_vec(values, stored.clone(), &Device::Cpu)?;
        let t = match shape {
            Some(want) if want.dims() != stored.as_slice() => {
                // LDM stores some Linear weights as 1×1 convolutions (the
                // VAE's attention); those differ only by trailing 1s.
                let strip = |d: &[usize]| {
                    let mut d = d.to_vec();
                    while d.len() > 2 && d.last() == Some(&1) {
                        d.pop();
                    }
                    d
                };
                if strip(want.dims()) == strip(&stored) {
                    t.reshape(want.dims())?
                } else {
                    candle_core::bail!(
                        "{}: shape {:?}, but the model (from its config) expects {:?}",
                        where_(),
                        stored,
                        want.dims()
                    );
                }
            }
            _ => t,
        };
        t.to_dtype(dtype)?.to_device(dev)
    }
}

impl SimpleBackend for Store {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, Some(&s), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, None, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}

/// Tensors of a safetensors file (memory-mapped) or a pickle (read as data).
fn read_tensors(path: &Path) -> Result<Vec<(String, RawTensor)>> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ext == "safetensors" {
        Ok(SafetensorsFile::open(path)?.tensors())
    } else {
        Ok(open_tensor_file(path)?.tensors)
    }
}

/// The weight files of a diffusers component folder: a single file,
/// an fp16 variant, or the shards a `*.index.json` lists.
pub fn component_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(Error::file(dir, "missing component folder"));
    }
    for name in [
        format!("{stem}.safetensors"),
        format!("{stem}.fp16.safetensors"),
    ] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(vec![p]);
        }
    }
    for name in [
        format!("{stem}.safetensors.index.json"),
        format!("{stem}.safetensors.index.fp16.json"),
        format!("{stem}.fp16.safetensors.index.json"),
    ] {
        let idx = dir.join(&name);
        if idx.is_file() {
            let text = std::fs::read_to_string(&idx).map_err(|e| Error::io(&idx, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::file(&idx, format!("not a shard index: {e}")))?;
            let map = v["weight_map"]
                .as_object()
                .ok_or_else(|| Error::key(&idx, "weight_map", "missing or not an object"))?;
            let mut files: Vec<PathBuf> = Vec::new();
            for f in map.values() {
                let f = f
                    .as_str()
                    .ok_or_else(|| Error::key(&idx, "weight_map", "file names must be strings"))?;
                if f.contains('/') || f.contains('\\') || f.contains("..") {
                    return Err(Error::key(
                        &idx,
                        "weight_map",
                        format!("`{f}` is not a file name in this folder"),
                    ));
                }
                let p = dir.join(f);
                if !files.contains(&p) {
                    files.push(p);
                }
            }
            return Ok(files);
        }
    }
    for name in [format!("{stem}.bin"), format!("{stem}.fp16.bin")] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(vec![p]);
        }
    }
    Err(Error::file(
        dir,
        format!("no {stem}.safetensors (or fp16 variant, shard index or .bin) in this folder"),
    ))
}

/// Read and parse a JSON config, naming the file on failure.
pub fn read_config<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::file(path, format!("bad config: {e}")))
}

// ------------------------------------------------------------------------
// LDM (A1111 / original Stable Diffusion) single-file names
// ------------------------------------------------------------------------

/// diffusers → LDM prefix pairs of the UNet blocks, computed from the block
/// counts: LDM numbers `input_blocks` 1.. with `layers` resnets (+ their
/// attention at `.1`) then one downsampler per level, `middle_block`
/// 0/1/2, and `output_blocks` with `layers + 1` resnets per level and the
/// upsampler after the last (at `.1` without attention, `.2` with).
pub fn ldm_unet_prefixes(
    layers: &[usize],
    cross_down: &[bool],
    cross_up: &[bool],
) -> Vec<(String, String)> {
    let n = layers.len();
    let mut out = vec![
        ("conv_in".to_string(), "input_blocks.0.0".to_string()),
        ("time_embedding.linear_1".into(), "time_embed.0".into()),
        ("time_embedding.linear_2".into(), "time_embed.2".into()),
        // SDXL's text-time embedding (absent from SD1/SD2 files).
        ("add_embedding.linear_1".into(), "label_emb.0.0".into()),
        ("add_embedding.linear_2".into(), "label_emb.0.2".into()),
        ("conv_norm_out".into(), "out.0".into()),
        ("conv_out".into(), "out.2".into()),
        ("mid_block.resnets.0".into(), "middle_block.0".into()),
        ("mid_block.attentions.0".into(), "middle_block.1".into()),
        ("mid_block.resnets.1".into(), "middle_block.2".into()),
    ];
    let mut idx = 1;
    for i in 0..n {
        for j in 0..layers[i] {
            out.push((
                format!("down_blocks.{i}.resnets.{j}"),
                format!("input_blocks.{idx}.0"),
            ));
            if cross_down[i] {
                out.push((
                    format!("down_blocks.{i}.attentions.{j}"),
                    format!("input_blocks.{idx}.1"),
                ));
            }
            idx += 1;
        }
        if i + 1 < n {
            out.push((
                format!("down_blocks.{i}.downsamplers.0.conv"),
                format!("input_blocks.{idx}.0.op"),
            ));
            idx += 1;
        }
    }
    let rlayers: Vec<usize> = layers.iter().rev().copied().collect();
    let mut idx = 0;
    for i in 0..n {
        let count = rlayers[i] + 1;
        for j in 0..count {
            out.push((
                format!("up_blocks.{i}.resnets.{j}"),
                format!("output_blocks.{idx}.0"),
            ));
            if cross_up[i] {
                out.push((
                    format!("up_blocks.{i}.attentions.{j}"),
                    format!("output_blocks.{idx}.1"),
                ));
            }
            if j + 1 == count && i + 1 < n {
                let slot = if cross_up[i] { 2 } else { 1 };
                out.push((
                    format!("up_blocks.{i}.upsamplers.0.conv"),
                    format!("output_blocks.{idx}.{slot}.conv"),
                ));
            }
            idx += 1;
        }
    }
    out
}

/// Resnet children: diffusers name → LDM name.
const RESNET_CHILDREN: [(&str, &str); 6] = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
];

/// A renamer from LDM UNet keys (`model.diffusion_model.…`) to diffusers.
pub fn ldm_unet_renamer(prefixes: Vec<(String, String)>) -> impl Fn(&str) -> Option<String> {
    // LDM prefix → (diffusers prefix, is a resnet)
    let mut by_ldm: Vec<(String, String, bool)> = prefixes
        .into_iter()
        .map(|(d, l)| {
            let res = d.contains(".resnets.");
            (l, d, res)
        })
        .collect();
    // Longest first, so `input_blocks.1.0` never matches `input_blocks.10.…`.
    by_ldm.sort_by_key(|(l, _, _)| std::cmp::Reverse(l.len()));
    move |key: &str| {
        let rest = key.strip_prefix("model.diffusion_model.")?;
        for (l, d, res) in &by_ldm {
            let Some(tail) = rest
                .strip_prefix(l.as_str())
                .and_then(|t| t.strip_prefix('.'))
            else {
                continue;
            };
            if *res {
                for (dn, ln) in RESNET_CHILDREN {
                    if let Some(p) = tail.strip_prefix(ln).and_then(|t| t.strip_prefix('.')) {
                        return Some(format!("{d}.{dn}.{p}"));
                    }
                }
                return None;
            }
            return Some(format!("{d}.{tail}"));
        }
        None
    }
}

/// A renamer from LDM VAE keys (`first_stage_model.…`) to diffusers, for a
/// VAE with `levels` resolution levels.
pub fn ldm_vae_renamer(levels: usize) -> impl Fn(&str) -> Option<String> {
    move |key: &str| {
        let rest = key.strip_prefix("first_stage_model.")?;
        let (part, tail) = rest.split_once('.')?;
        match part {
            "quant_conv" | "post_quant_conv" => return Some(rest.to_string()),
            "encoder" | "decoder" => {}
            _ => return None,
        }
        let resnet = |t: &str| t.replace("nin_shortcut", "conv_shortcut");
        let mapped = if let Some(t) = tail.strip_prefix("down.") {
            let (i, t) = t.split_once('.')?;
            if let Some(t) = t.strip_prefix("block.") {
                let (j, t) = t.split_once('.')?;
                format!("down_blocks.{i}.resnets.{j}.{}", resnet(t))
            } else {
                format!(
                    "down_blocks.{i}.downsamplers.0.{}",
                    t.strip_prefix("downsample.")?
                )
            }
        } else if let Some(t) = tail.strip_prefix("up.") {
            let (i, t) = t.split_once('.')?;
            let i: usize = i.parse().ok()?;
            let di = levels.checked_sub(1 + i)?;
            if let Some(t) = t.strip_prefix("block.") {
                let (j, t) = t.split_once('.')?;
                format!("up_blocks.{di}.resnets.{j}.{}", resnet(t))
            } else {
                format!(
                    "up_blocks.{di}.upsamplers.0.{}",
                    t.strip_prefix("upsample.")?
                )
            }
        } else if let Some(t) = tail.strip_prefix("mid.block_1.") {
            format!("mid_block.resnets.0.{}", resnet(t))
        } else if let Some(t) = tail.strip_prefix("mid.block_2.") {
            format!("mid_block.resnets.1.{}", resnet(t))
        } else if let Some(t) = tail.strip_prefix("mid.attn_1.") {
            let (n, p) = t.split_once('.')?;
            let d = match n {
                "norm" => "group_norm",
                "q" => "to_q",
                "k" => "to_k",
                "v" => "to_v",
                "proj_out" => "to_out.0",
                _ => return None,
            };
            format!("mid_block.attentions.0.{d}.{p}")
        } else if let Some(t) = tail.strip_prefix("norm_out.") {
            format!("conv_norm_out.{t}")
        } else {
            tail.to_string()
        };
        Some(format!("{part}.{mapped}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The computed SD1 prefixes equal the table `converters/sd1.json`
    /// keeps for LoRA names (one rule, checked against the other source).
    #[test]
    fn unet_prefixes_agree_with_the_sd1_table() {
        let v: serde_json::Value =
            serde_json::from_str(include_str!("../../converters/sd1.json")).unwrap();
        let pre = ldm_unet_prefixes(
            &[2, 2, 2, 2],
            &[true, true, true, false],
            &[false, true, true, true],
        );
        let map: HashMap<_, _> = pre.into_iter().collect();
        let mut checked = 0;
        for table in ["attention_blocks", "resnets", "samplers", "extras"] {
            for row in v[table].as_array().unwrap() {
                let d = row["diffusers"].as_str().unwrap();
                let s = row["sai"].as_str().unwrap();
                if let Some(got) = map.get(d) {
                    assert_eq!(got, s, "{d}");
                    checked += 1;
                }
            }
        }
        assert!(checked >= 16 + 22 + 6 + 4, "{checked}");
    }

    #[test]
    fn vae_names_map_to_diffusers() {
        let r = ldm_vae_renamer(4);
        let cases = [
            (
                "first_stage_model.decoder.up.0.block.2.nin_shortcut.weight",
                "decoder.up_blocks.3.resnets.2.conv_shortcut.weight",
            ),
            (
                "first_stage_model.decoder.up.3.upsample.conv.bias",
                "decoder.up_blocks.0.upsamplers.0.conv.bias",
            ),
            (
                "first_stage_model.encoder.down.1.downsample.conv.weight",
                "encoder.down_blocks.1.downsamplers.0.conv.weight",
            ),
            (
                "first_stage_model.encoder.mid.attn_1.proj_out.weight",
                "encoder.mid_block.attentions.0.to_out.0.weight",
            ),
            (
                "first_stage_model.decoder.norm_out.bias",
                "decoder.conv_norm_out.bias",
            ),
            (
                "first_stage_model.post_quant_conv.weight",
                "post_quant_conv.weight",
            ),
        ];
        for (l, d) in cases {
            assert_eq!(r(l).as_deref(), Some(d), "{l}");
        }
    }
}
