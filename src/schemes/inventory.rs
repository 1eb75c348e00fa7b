//! The module inventory of each architecture: every layer a LoRA can adapt,
//! with its diffusers path, its SAI/LDM path, its kind and its sizes.
//!
//! The tables are data (`converters/*.json`, embedded at build time) and live
//! only there. Here they are expanded once into a flat list plus reverse
//! lookups. kohya flattens paths by replacing "." with "_", which is not
//! reversible by string rules (`transformer_blocks`, `to_out`, `ff_net` all
//! contain "_"), so every flattened name is resolved against this list.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde::Deserialize;

/// A supported base-model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Arch {
    Sd1,
    Sd2,
    Sdxl,
}

impl Arch {
    pub const ALL: [Arch; 3] = [Arch::Sd1, Arch::Sd2, Arch::Sdxl];

    pub fn name(self) -> &'static str {
        match self {
            Arch::Sd1 => "sd1",
            Arch::Sd2 => "sd2",
            Arch::Sdxl => "sdxl",
        }
    }

    pub fn parse(s: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.name() == s)
    }
}

/// Which network a module belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Unet,
    /// The only text encoder of SD1/SD2, or SDXL's first (CLIP-L).
    TextEncoder,
    /// SDXL's second text encoder (OpenCLIP bigG).
    TextEncoder2,
}

impl Component {
    /// Prefix of dotted (diffusers/PEFT) keys.
    pub fn dotted_prefix(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "te",
            Component::TextEncoder2 => "te2",
        }
    }
}

/// What kind of layer a module wraps; decides the factor layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Linear,
    Conv1x1,
    Conv3x3,
}

/// Which family of targets a module belongs to, for "expected count" reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// Linear/Conv inside a Transformer2DModel: kohya LoRA and SPM targets.
    Transformer,
    /// ResNet convs, shortcuts, time projections, samplers (LoCon).
    Conv,
    /// conv_in/conv_out/time and label embeddings (LyCORIS only).
    Extra,
    /// Text-encoder attention and MLP projections.
    TextEncoder,
}

/// One adaptable layer.
#[derive(Debug, Clone)]
pub struct ModuleSpec {
    pub component: Component,
    /// Dotted diffusers path (UNet) or transformers path (`text_model.…`).
    pub path: String,
    /// Dotted SAI/LDM path (UNet only).
    pub sai: Option<String>,
    pub kind: Kind,
    pub class: Class,
    pub in_dim: usize,
    pub out_dim: usize,
    /// For text encoders kept in OpenCLIP layout: the LDM parameter base
    /// and, for q/k/v, which third of the fused `in_proj` rows it is.
    pub openclip: Option<(String, Option<usize>)>,
}

/// Facts about an architecture besides its modules (metadata to write).
#[derive(Debug, Clone, Deserialize)]
pub struct ArchInfo {
    pub title: String,
    pub context_dim: usize,
    pub kohya_unet_names: String,
    pub ss_base_model_version: String,
    pub ss_v2: String,
    pub modelspec_architecture: String,
    pub modelspec_implementation: String,
    pub resolution: String,
    pub text_encoders: Vec<TextEncoderSpec>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TextEncoderSpec {
    /// kohya prefix: `lora_te_`, `lora_te1_`, `lora_te2_`.
    pub prefix: String,
    /// diffusers folder / dotted prefix: `text_encoder`, `text_encoder_2`.
    pub component: String,
    pub layers: usize,
    pub hidden: usize,
    pub mlp: usize,
    /// Prefix of this encoder's weights in a single-file LDM checkpoint.
    pub ldm_prefix: String,
    /// `hf` (transformers names) or `openclip` (fused `in_proj`).
    pub ldm_layout: String,
}

/// An architecture's expanded module list and lookups.
pub struct Inventory {
    pub arch: Arch,
    pub info: ArchInfo,
    pub modules: Vec<ModuleSpec>,
    /// kohya flattened name (with prefix) → module index. Holds the diffusers
    /// spelling and the SAI spelling of UNet names, and the transformers-4 and
    /// transformers-5 spellings of text-encoder names.
    by_flat: HashMap<String, usize>,
    /// (component, dotted path) → module index.
    by_dotted: HashMap<(Component, String), usize>,
    /// Whether a flat name used SAI block names.
    sai_flat: HashMap<String, bool>,
}

// ---- raw JSON shapes -------------------------------------------------------

#[derive(Deserialize)]
struct RawArch {
    projection: String,
    time_embed_dim: usize,
    attention_blocks: Vec<RawAttn>,
    resnets: Vec<RawResnet>,
    samplers: Vec<RawSampler>,
    extras: Vec<RawExtra>,
    #[serde(flatten)]
    info: ArchInfo,
}
#[derive(Deserialize)]
struct RawAttn {
    diffusers: String,
    sai: String,
    channels: usize,
    depth: usize,
}
#[derive(Deserialize)]
struct RawResnet {
    diffusers: String,
    sai: String,
    #[serde(rename = "in")]
    in_ch: usize,
    out: usize,
    shortcut: bool,
}
#[derive(Deserialize)]
struct RawSampler {
    diffusers: String,
    sai: String,
    channels: usize,
}
#[derive(Deserialize)]
struct RawExtra {
    diffusers: String,
    sai: String,
    kind: String,
    #[serde(rename = "in")]
    in_ch: usize,
    out: usize,
}
#[derive(Deserialize)]
struct RawCommon {
    transformer_block_children: Vec<RawChild>,
    resnet_children: Vec<RawResChild>,
    text_encoder_children: Vec<RawTeChild>,
}
#[derive(Deserialize)]
struct RawChild {
    name: String,
    #[serde(rename = "in")]
    in_sz: String,
    out: String,
}
#[derive(Deserialize)]
struct RawResChild {
    diffusers: String,
    sai: String,
    kind: String,
    #[serde(rename = "in")]
    in_sz: String,
    out: String,
    #[serde(default)]
    shortcut_only: bool,
}
#[derive(Deserialize)]
struct RawTeChild {
    hf: String,
    openclip: String,
    #[serde(default)]
    openclip_rows: Option<usize>,
    #[serde(rename = "in")]
    in_sz: String,
    out: String,
}

const COMMON_JSON: &str = include_str!("../../converters/common.json");
const SD1_JSON: &str = include_str!("../../converters/sd1.json");
const SD2_JSON: &str = include_str!("../../converters/sd2.json");
const SDXL_JSON: &str = include_str!("../../converters/sdxl.json");

fn kind_of(s: &str) -> Kind {
    match s {
        "linear" => Kind::Linear,
        "conv1x1" => Kind::Conv1x1,
        "conv3x3" => Kind::Conv3x3,
        other => panic!("converters/*.json: unknown layer kind {other}"),
    }
}

/// Evaluate a size symbol from `common.json` (`C`, `8C`, `X`, `in`, …).
fn size(sym: &str, vars: &[(&str, usize)]) -> usize {
    let (mult, var) = match sym.find(|c: char| !c.is_ascii_digit()) {
        Some(0) | None => (1, sym),
        Some(i) => (sym[..i].parse::<usize>().unwrap(), &sym[i..]),
    };
    let v = vars
        .iter()
        .find(|(n, _)| *n == var)
        .unwrap_or_else(|| panic!("converters/common.json: unknown size symbol {sym}"))
        .1;
    mult * v
}

fn flatten(prefix: &str, dotted: &str) -> String {
    format!("{prefix}{}", dotted.replace('.', "_"))
}

impl Inventory {
    fn build(arch: Arch) -> Inventory {
        let src = match arch {
            Arch::Sd1 => SD1_JSON,
            Arch::Sd2 => SD2_JSON,
            Arch::Sdxl => SDXL_JSON,
        };
        let raw: RawArch =
            serde_json::from_str(src).expect("embedded converters/<arch>.json parses");
        let common: RawCommon =
            serde_json::from_str(COMMON_JSON).expect("embedded converters/common.json parses");
        let x = raw.info.context_dim;
        let proj = kind_of(&raw.projection);
        let mut modules = Vec::new();
        let unet = |path: String, sai: String, kind, class, i, o| ModuleSpec {
            component: Component::Unet,
            path,
            sai: Some(sai),
            kind,
            class,
            in_dim: i,
            out_dim: o,
            openclip: None,
        };
        for b in &raw.attention_blocks {
            let c = b.channels;
            let vars = [("C", c), ("X", x)];
            let mut push = |child: &str, kind, i, o| {
                modules.push(unet(
                    format!("{}.{child}", b.diffusers),
                    format!("{}.{child}", b.sai),
                    kind,
                    Class::Transformer,
                    i,
                    o,
                ))
            };
            push("proj_in", proj, c, c);
            for t in 0..b.depth {
                for ch in &common.transformer_block_children {
                    let child = format!("transformer_blocks.{t}.{}", ch.name);
                    push(
                        &child,
                        Kind::Linear,
                        size(&ch.in_sz, &vars),
                        size(&ch.out, &vars),
                    );
                }
            }
            push("proj_out", proj, c, c);
        }
        for r in &raw.resnets {
            let vars = [
                ("in", r.in_ch),
                ("out", r.out),
                ("temb", raw.time_embed_dim),
            ];
            for ch in &common.resnet_children {
                if ch.shortcut_only && !r.shortcut {
                    continue;
                }
                modules.push(unet(
                    format!("{}.{}", r.diffusers, ch.diffusers),
                    format!("{}.{}", r.sai, ch.sai),
                    kind_of(&ch.kind),
                    Class::Conv,
                    size(&ch.in_sz, &vars),
                    size(&ch.out, &vars),
                ));
            }
        }
        for s in &raw.samplers {
            modules.push(unet(
                s.diffusers.clone(),
                s.sai.clone(),
                Kind::Conv3x3,
                Class::Conv,
                s.channels,
                s.channels,
            ));
        }
        for e in &raw.extras {
            modules.push(unet(
                e.diffusers.clone(),
                e.sai.clone(),
                kind_of(&e.kind),
                Class::Extra,
                e.in_ch,
                e.out,
            ));
        }
        for (n, te) in raw.info.text_encoders.iter().enumerate() {
            let component = if n == 0 {
                Component::TextEncoder
            } else {
                Component::TextEncoder2
            };
            let vars = [("H", te.hidden), ("M", te.mlp)];
            for layer in 0..te.layers {
                for ch in &common.text_encoder_children {
                    let openclip = (te.ldm_layout == "openclip").then(|| {
                        (
                            format!("transformer.resblocks.{layer}.{}", ch.openclip),
                            ch.openclip_rows,
                        )
                    });
                    modules.push(ModuleSpec {
                        component,
                        path: format!("text_model.encoder.layers.{layer}.{}", ch.hf),
                        sai: None,
                        kind: Kind::Linear,
                        class: Class::TextEncoder,
                        in_dim: size(&ch.in_sz, &vars),
                        out_dim: size(&ch.out, &vars),
                        openclip,
                    });
                }
            }
        }

        let mut by_flat = HashMap::new();
        let mut sai_flat = HashMap::new();
        let mut by_dotted = HashMap::new();
        for (i, m) in modules.iter().enumerate() {
            by_dotted.insert((m.component, m.path.clone()), i);
            match m.component {
                Component::Unet => {
                    let d = flatten("lora_unet_", &m.path);
                    sai_flat.insert(d.clone(), false);
                    by_flat.insert(d, i);
                    if let Some(sai) = &m.sai {
                        let s = flatten("lora_unet_", sai);
                        sai_flat.insert(s.clone(), true);
                        by_flat.insert(s, i);
                    }
                }
                c => {
                    let te = &raw.info.text_encoders[(c == Component::TextEncoder2) as usize];
                    by_flat.insert(flatten(&te.prefix, &m.path), i);
                    // transformers ≥ 5 enumerates CLIPTextModel without `text_model.`.
                    let short = m.path.trim_start_matches("text_model.");
                    by_flat.insert(flatten(&te.prefix, short), i);
                    // Also accept both dotted spellings.
                    by_dotted.insert((c, short.to_string()), i);
                }
            }
        }
        Inventory {
            arch,
            info: raw.info,
            modules,
            by_flat,
            by_dotted,
            sai_flat,
        }
    }

    /// Resolve a kohya flattened module name (with its prefix).
    pub fn lookup_flat(&self, name: &str) -> Option<usize> {
        if let Some(i) = self.by_flat.get(name) {
            return Some(*i);
        }
        // Aliases seen in the wild: SDXL te1 written as `lora_te_` by some
        // tools, SD1 te written as `lora_te1_` by diffusers' kohya export,
        // and additional-networks' internal `lora_te_wrapped_` spelling.
        let alt = if let Some(rest) = name.strip_prefix("lora_te1_") {
            format!("lora_te_{rest}")
        } else if let Some(rest) = name.strip_prefix("lora_te_wrapped_transformer_") {
            format!("lora_te_{rest}")
        } else if let Some(rest) = name.strip_prefix("lora_te_") {
            format!("lora_te1_{rest}")
        } else if let Some(rest) = name.strip_prefix("lycoris_") {
            format!("lora_unet_{rest}")
        } else {
            return None;
        };
        self.by_flat.get(&alt).copied()
    }

    /// Whether `name` (a resolved flat UNet name) uses SAI block names.
    pub fn is_sai_name(&self, name: &str) -> bool {
        self.sai_flat.get(name).copied().unwrap_or(false)
    }

    pub fn lookup_dotted(&self, component: Component, path: &str) -> Option<usize> {
        self.by_dotted.get(&(component, path.to_string())).copied()
    }

    /// kohya flattened name of module `i` in diffusers or SAI naming.
    pub fn flat_name(&self, i: usize, sai: bool) -> String {
        let m = &self.modules[i];
        match m.component {
            Component::Unet => {
                let path = if sai {
                    m.sai.as_deref().unwrap_or(&m.path)
                } else {
                    &m.path
                };
                flatten("lora_unet_", path)
            }
            c => flatten(&self.te_spec(c).prefix, &m.path),
        }
    }

    pub fn te_spec(&self, c: Component) -> &TextEncoderSpec {
        &self.info.text_encoders[(c == Component::TextEncoder2) as usize]
    }

    /// Number of modules of a class in a component: the "expected" count.
    pub fn count(&self, component: Component, class: Class) -> usize {
        self.modules
            .iter()
            .filter(|m| m.component == component && m.class == class)
            .count()
    }
}

/// The inventory of `arch`, expanded once per process.
pub fn inventory(arch: Arch) -> &'static Inventory {
    static CELLS: [OnceLock<Inventory>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let idx = arch as usize;
    CELLS[idx].get_or_init(|| Inventory::build(arch))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts from lora-schemes.md §6.1 (kohya's LoRANetwork, executed).
    #[test]
    fn counts_match_spec_table() {
        for (arch, tr, conv, te1, te2) in [
            (Arch::Sd1, 192, 86, 72, 0),
            (Arch::Sd2, 192, 86, 138, 0),
            (Arch::Sdxl, 722, 66, 72, 192),
        ] {
            let inv = inventory(arch);
            assert_eq!(
                inv.count(Component::Unet, Class::Transformer),
                tr,
                "{arch:?}"
            );
            assert_eq!(inv.count(Component::Unet, Class::Conv), conv, "{arch:?}");
            assert_eq!(
                inv.count(Component::TextEncoder, Class::TextEncoder),
                te1,
                "{arch:?}"
            );
            assert_eq!(
                inv.count(Component::TextEncoder2, Class::TextEncoder),
                te2,
                "{arch:?}"
            );
        }
    }

    /// SD1.x r=1 parameter count from spm-reference.md §1.3: 423,936.
    #[test]
    fn sd1_spm_parameter_count() {
        let inv = inventory(Arch::Sd1);
        let n: usize = inv
            .modules
            .iter()
            .filter(|m| m.class == Class::Transformer)
            .map(|m| m.in_dim + m.out_dim)
            .sum();
        assert_eq!(n, 423_936);
    }

    #[test]
    fn flat_names_resolve_both_spellings() {
        let inv = inventory(Arch::Sdxl);
        let a = inv
            .lookup_flat("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q")
            .unwrap();
        let b = inv
            .lookup_flat("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q")
            .unwrap();
        assert_eq!(a, b);
        let up = inv.lookup_flat("lora_unet_output_blocks_2_2_conv").unwrap();
        assert_eq!(inv.modules[up].path, "up_blocks.0.upsamplers.0.conv");
        let sd1 = inventory(Arch::Sd1);
        let up1 = sd1.lookup_flat("lora_unet_output_blocks_2_1_conv").unwrap();
        assert_eq!(sd1.modules[up1].path, "up_blocks.0.upsamplers.0.conv");
    }
}
