//! Key-naming schemes: the module inventory of each architecture (data in
//! `converters/`), the key grammar of every scheme, and detection.

pub mod inventory;
pub mod keys;

pub use inventory::{inventory, Arch, Class, Component, Inventory, Kind, ModuleSpec};

/// An output (and detected input) key-naming scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheme {
    /// SPM's own files: kohya keys with diffusers names, metadata prompts/rank/alpha.
    Spm,
    /// What kohya sd-scripts and A1111 expect: diffusers names for SD1/SD2,
    /// SAI/LDM names for SDXL, `ss_*` and `modelspec.*` metadata.
    Kohya,
    /// kohya prefixes over LDM/compvis (SAI) UNet names, for every arch.
    Ldm,
    /// diffusers-PEFT: `unet.<path>.lora_A.weight`, alpha in `lora_adapter_metadata`.
    Peft,
    /// Pre-PEFT diffusers attention processors (`…processor.to_q_lora.down.weight`).
    /// Attention layers only and no alpha: usually lossy.
    DiffusersOld,
}

impl Scheme {
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Spm => "spm",
            Scheme::Kohya => "kohya",
            Scheme::Ldm => "ldm",
            Scheme::Peft => "peft",
            Scheme::DiffusersOld => "diffusers-old",
        }
    }

    /// Whether kohya-family (flattened) names are written.
    pub fn is_flat(self) -> bool {
        matches!(self, Scheme::Spm | Scheme::Kohya | Scheme::Ldm)
    }

    /// Whether UNet names are written in SAI spelling for `arch`.
    pub fn sai_names(self, arch: Arch) -> bool {
        match self {
            Scheme::Ldm => true,
            Scheme::Kohya => inventory(arch).info.kohya_unet_names == "sai",
            _ => false,
        }
    }
}
