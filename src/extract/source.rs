//! A UNet checkpoint in any layout, as canonical (diffusers) tensor names
//! over lazily read tensors.
//!
//! Erasers ship in every shape: ESD's released weights are a full diffusers
//! UNet pickled with `torch.save` (`.pt`), ESD's current code writes only
//! the trained tensors (a partial bf16 `.safetensors`), Forget-Me-Not saves
//! pipeline folders, and the base a user has is often an A1111/LDM single
//! file. Extraction pairs base and tuned tensors by name, so each is
//! resolved here to the names a diffusers `UNet2DConditionModel` uses.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::lazy::{self, LazyTensor};
use crate::model::load::{component_files, ldm_unet_prefixes, ldm_unet_renamer};
use crate::schemes::Arch;

/// How the file or folder stored the UNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// A diffusers `unet/` folder (or a pipeline holding one).
    DiffusersFolder,
    /// An A1111/LDM single file (`model.diffusion_model.*`).
    Ldm,
    /// A bare state dict with diffusers names (optionally `unet.`-prefixed).
    StateDict,
}

impl Layout {
    pub fn describe(self) -> &'static str {
        match self {
            Layout::DiffusersFolder => "diffusers UNet folder",
            Layout::Ldm => "LDM single file",
            Layout::StateDict => "diffusers state dict",
        }
    }
}

/// One UNet: canonical name → tensor, in the source's order.
pub struct Checkpoint {
    pub path: PathBuf,
    pub layout: Layout,
    /// `(canonical name, tensor)` in file order.
    pub tensors: Vec<(String, LazyTensor)>,
    by_name: HashMap<String, usize>,
}

impl Checkpoint {
    /// Open `path`: a diffusers UNet or pipeline folder, an LDM single file,
    /// or a (full or partial) diffusers state dict, `.safetensors` or pickle.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let (layout, files) = if path.is_dir() {
            let unet = if path.join("unet").is_dir() {
                path.join("unet")
            } else {
                path.to_path_buf()
            };
            (
                Layout::DiffusersFolder,
                component_files(&unet, "diffusion_pytorch_model")?,
            )
        } else {
            (Layout::StateDict, vec![path.to_path_buf()])
        };
        let mut all = Vec::new();
        for f in &files {
            all.extend(lazy::list(f)?);
        }
        if !all.is_empty()
            && all
                .iter()
                .all(|t| t.key.contains("lora") || t.key.ends_with(".alpha"))
        {
            return Err(Error::file(
                path,
                "is a LoRA/adapter file, not a model: extract takes two checkpoints (full or partial); `spm inspect` reads adapters",
            ));
        }
        let ldm = all
            .iter()
            .any(|t| t.key.starts_with("model.diffusion_model."));
        let layout = if ldm { Layout::Ldm } else { layout };
        let prefixed = all.iter().any(|t| t.key.starts_with("unet."));
        // SD1/SD2 share one block layout; SGM (SDXL) files have three
        // levels, the first without attention, and a `label_emb`.
        let sgm = all
            .iter()
            .any(|t| t.key.starts_with("model.diffusion_model.label_emb."));
        let rename = if sgm {
            ldm_unet_renamer(ldm_unet_prefixes(
                &[2, 2, 2],
                &[false, true, true],
                &[true, true, false],
            ))
        } else {
            ldm_unet_renamer(ldm_unet_prefixes(
                &[2, 2, 2, 2],
                &[true, true, true, false],
                &[false, true, true, true],
            ))
        };
        let mut tensors = Vec::new();
        let mut unmapped = Vec::new();
        for t in all {
            let name = if ldm {
                if !t.key.starts_with("model.diffusion_model.") {
                    continue; // VAE, text encoder, EMA copy
                }
                match rename(&t.key) {
                    Some(n) => n,
                    None => {
                        unmapped.push(t.key.clone());
                        continue;
                    }
                }
            } else if prefixed {
                match t.key.strip_prefix("unet.") {
                    Some(n) => n.to_string(),
                    None => continue, // other components of a pipeline dict
                }
            } else {
                t.key.clone()
            };
            tensors.push((name, t));
        }
        if let Some(k) = unmapped.first() {
            return Err(Error::key(
                path,
                k,
                format!(
                    "not a key of an SD1/SD2/SDXL UNet ({} such keys)",
                    unmapped.len()
                ),
            ));
        }
        if tensors.is_empty() {
            return Err(Error::file(
                path,
                "no UNet tensors (expected diffusers names such as `down_blocks.0…`, `unet.`-prefixed ones, or LDM `model.diffusion_model.…`)",
            ));
        }
        // One index, after renaming: it also catches a key stored in two
        // shards, and diffusers and LDM spellings of one tensor mixed.
        let mut by_name = HashMap::with_capacity(tensors.len());
        for (i, (name, t)) in tensors.iter().enumerate() {
            if let Some(j) = by_name.insert(name.clone(), i) {
                let other = &tensors[j].1;
                return Err(Error::key(
                    &t.path,
                    &t.key,
                    format!(
                        "names the same UNet tensor `{name}` as `{}` in {}",
                        other.key,
                        other.path.display()
                    ),
                ));
            }
        }
        Ok(Checkpoint {
            path: path.to_path_buf(),
            layout,
            tensors,
            by_name,
        })
    }

    pub fn get(&self, name: &str) -> Option<&LazyTensor> {
        self.by_name.get(name).map(|&i| &self.tensors[i].1)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The architecture from the tensors themselves, so that every layout
    /// (and the tiny test models) is decided the same way: SDXL's
    /// `add_embedding`, the cross-attention width (768 SD1, 1024 SD2, 2048
    /// SDXL), else the projection layout (1×1 conv in SD1, linear in SD2).
    pub fn arch(&self) -> Result<(Arch, String)> {
        if self.get("add_embedding.linear_1.weight").is_some() {
            return Ok((Arch::Sdxl, "add_embedding (text-time conditioning)".into()));
        }
        let ctx = self
            .tensors
            .iter()
            .find(|(n, t)| n.ends_with("attn2.to_k.weight") && t.shape.len() == 2)
            .map(|(_, t)| t.shape[1]);
        match ctx {
            Some(768) => return Ok((Arch::Sd1, "cross-attention width 768".into())),
            Some(1024) => return Ok((Arch::Sd2, "cross-attention width 1024".into())),
            Some(2048) => return Ok((Arch::Sdxl, "cross-attention width 2048".into())),
            _ => {}
        }
        let proj = self
            .tensors
            .iter()
            .find(|(n, _)| n.ends_with(".proj_in.weight"))
            .map(|(_, t)| t.shape.len());
        match proj {
            Some(4) => Ok((Arch::Sd1, "proj_in is a 1×1 conv".into())),
            Some(2) => Ok((Arch::Sd2, "proj_in is linear".into())),
            _ => Err(Error::file(
                &self.path,
                "cannot tell SD1 from SD2 (no attn2.to_k or proj_in weight): pass --arch",
            )),
        }
    }
}
