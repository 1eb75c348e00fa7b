//! Tensor-key grammar of every scheme: split a key into a module name and a
//! parameter, and spell a module/parameter pair back in a given scheme.
//!
//! Parsing follows lora-schemes.md §8: flattened kohya names split on the
//! first ".", dotted diffusers/PEFT names are recognised by their ending.

use super::inventory::Component;

/// The parameter a tensor plays for its module.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Param {
    /// kohya `lora_down.weight`, PEFT `lora_A.weight`, old diffusers `down.weight`.
    Down,
    /// kohya `lora_up.weight`, PEFT `lora_B.weight`, old diffusers `up.weight`.
    Up,
    Alpha,
    /// Anything else kept verbatim in kohya spelling: `lora_mid.weight`,
    /// `dora_scale`, LyCORIS `hada_w1_a`, …
    Other(String),
}

/// How a module was named in the file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ModuleName {
    /// A kohya-style flattened name with its prefix (`lora_unet_…`).
    Flat(String),
    /// A dotted path inside a component (diffusers / PEFT / old diffusers).
    Dotted(Component, String),
}

/// The spelling family a key came in; drives scheme detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyStyle {
    Kohya,
    Peft,
    /// diffusers example-script spelling `…to_q.lora.down.weight`.
    DiffusersLora,
    DiffusersOld,
}

#[derive(Debug, Clone)]
pub enum ParsedKey {
    Module {
        name: ModuleName,
        param: Param,
        style: KeyStyle,
    },
    /// Textual-inversion embeddings bundled in a LoRA: kept untouched.
    Passthrough,
    /// Not a LoRA key at all.
    Unknown,
}

const FLAT_PREFIXES: [&str; 6] = [
    "lora_unet_",
    "lora_te1_",
    "lora_te2_",
    "lora_te_",
    "lycoris_",
    "oft_unet_",
];

/// LyCORIS and friends: parameter names other than LoRA's down/up/alpha.
pub const OTHER_PARAMS: [&str; 20] = [
    "lora_mid.weight",
    "dora_scale",
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t2",
    "oft_blocks",
    "oft_diag",
    "diff",
    "diff_b",
    "on_input",
];

fn flat_param(p: &str) -> Option<Param> {
    Some(match p {
        "lora_down.weight" | "lora_A.weight" => Param::Down,
        "lora_up.weight" | "lora_B.weight" => Param::Up,
        "alpha" => Param::Alpha,
        "scale" | "weight" | "w_norm" | "b_norm" | "bias" | "a1.weight" | "a2.weight"
        | "b1.weight" | "b2.weight" | "rescale" => Param::Other(p.to_string()),
        p if OTHER_PARAMS.contains(&p) => Param::Other(p.to_string()),
        _ => return None,
    })
}

/// Split one tensor key.
pub fn parse_key(key: &str) -> ParsedKey {
    if key.starts_with("bundle_emb.") {
        return ParsedKey::Passthrough;
    }
    if FLAT_PREFIXES.iter().any(|p| key.starts_with(p)) {
        let Some((name, param)) = key.split_once('.') else {
            return ParsedKey::Unknown;
        };
        return match flat_param(param) {
            Some(param) => ParsedKey::Module {
                name: ModuleName::Flat(name.to_string()),
                param,
                style: KeyStyle::Kohya,
            },
            None => ParsedKey::Unknown,
        };
    }
    parse_dotted(key).unwrap_or(ParsedKey::Unknown)
}

fn parse_dotted(key: &str) -> Option<ParsedKey> {
    let (component, rest) = if let Some(r) = key.strip_prefix("unet.") {
        (Component::Unet, r)
    } else if let Some(r) = key.strip_prefix("text_encoder_2.") {
        (Component::TextEncoder2, r)
    } else if let Some(r) = key.strip_prefix("text_encoder.") {
        (Component::TextEncoder, r)
    } else if let Some(r) = key.strip_prefix("base_model.model.") {
        (Component::Unet, r)
    } else {
        // Pre-2023 attention-processor files carry no component prefix.
        (Component::Unet, key)
    };
    let module = |path: &str, param: Param, style: KeyStyle| ParsedKey::Module {
        name: ModuleName::Dotted(component, path.to_string()),
        param,
        style,
    };
    // Endings, longest first so that `.lora.down.weight` is not read as `.weight`.
    const ENDINGS: [(&str, KeyStyle, bool); 8] = [
        (".lora_A.weight", KeyStyle::Peft, true),
        (".lora_B.weight", KeyStyle::Peft, false),
        (
            ".lora_linear_layer.down.weight",
            KeyStyle::DiffusersOld,
            true,
        ),
        (
            ".lora_linear_layer.up.weight",
            KeyStyle::DiffusersOld,
            false,
        ),
        ("_lora.down.weight", KeyStyle::DiffusersOld, true),
        ("_lora.up.weight", KeyStyle::DiffusersOld, false),
        (".lora.down.weight", KeyStyle::DiffusersLora, true),
        (".lora.up.weight", KeyStyle::DiffusersLora, false),
    ];
    for (ending, style, down) in ENDINGS {
        if let Some(path) = rest.strip_suffix(ending) {
            let param = if down { Param::Down } else { Param::Up };
            let path = if ending.starts_with("_lora") {
                old_processor_path(component, path)?
            } else {
                path.replace(".processor.", ".")
            };
            return Some(module(&path, param, style));
        }
    }
    if let Some(path) = rest.strip_suffix(".alpha") {
        return Some(module(path, Param::Alpha, KeyStyle::Peft));
    }
    if let Some(path) = rest.strip_suffix(".lora_magnitude_vector") {
        return Some(module(
            path,
            Param::Other("dora_scale".into()),
            KeyStyle::Peft,
        ));
    }
    None
}

/// `…attn1.processor.to_q` → `…attn1.to_q`, `…processor.to_out` → `…to_out.0`;
/// text encoder `…self_attn.to_q` → `…self_attn.q_proj`.
fn old_processor_path(component: Component, path: &str) -> Option<String> {
    let path = path.replace(".processor.", ".");
    let (base, proj) = path.rsplit_once('.')?;
    Some(match (component, proj) {
        (Component::Unet, "to_out") => format!("{base}.to_out.0"),
        (Component::Unet, _) => path.clone(),
        (_, "to_q") => format!("{base}.q_proj"),
        (_, "to_k") => format!("{base}.k_proj"),
        (_, "to_v") => format!("{base}.v_proj"),
        (_, "to_out") => format!("{base}.out_proj"),
        _ => path.clone(),
    })
}

/// kohya spelling of a parameter.
pub fn kohya_param(p: &Param) -> String {
    match p {
        Param::Down => "lora_down.weight".into(),
        Param::Up => "lora_up.weight".into(),
        Param::Alpha => "alpha".into(),
        Param::Other(s) => s.clone(),
    }
}

/// Old-diffusers key of a module, if that format can express it at all:
/// UNet attention projections and text-encoder layers only.
pub fn old_diffusers_key(component: Component, path: &str, down: bool) -> Option<String> {
    let dir = if down { "down" } else { "up" };
    let prefix = component.dotted_prefix();
    if component == Component::Unet {
        let (base, proj) = path
            .strip_suffix(".to_out.0")
            .map(|b| (b, "to_out"))
            .or_else(|| {
                ["to_q", "to_k", "to_v"]
                    .into_iter()
                    .find_map(|p| path.strip_suffix(&format!(".{p}")).map(|b| (b, p)))
            })?;
        if !(base.ends_with(".attn1") || base.ends_with(".attn2")) {
            return None;
        }
        return Some(format!(
            "{prefix}.{base}.processor.{proj}_lora.{dir}.weight"
        ));
    }
    for (hf, old) in [
        ("q_proj", "to_q"),
        ("k_proj", "to_k"),
        ("v_proj", "to_v"),
        ("out_proj", "to_out"),
    ] {
        if let Some(base) = path.strip_suffix(&format!(".{hf}")) {
            return Some(format!("{prefix}.{base}.{old}_lora.{dir}.weight"));
        }
    }
    Some(format!("{prefix}.{path}.lora_linear_layer.{dir}.weight"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_keys_split_on_first_dot() {
        let ParsedKey::Module { name, param, .. } =
            parse_key("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight")
        else {
            panic!()
        };
        assert_eq!(
            name,
            ModuleName::Flat(
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0".into()
            )
        );
        assert_eq!(param, Param::Up);
    }

    #[test]
    fn old_processor_keys_map_to_module_paths() {
        let ParsedKey::Module { name, param, style } =
            parse_key("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight")
        else {
            panic!()
        };
        assert_eq!(
            name,
            ModuleName::Dotted(
                Component::Unet,
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0".into()
            )
        );
        assert_eq!((param, style), (Param::Down, KeyStyle::DiffusersOld));
        let back = old_diffusers_key(
            Component::Unet,
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
            true,
        );
        assert_eq!(
            back.as_deref(),
            Some("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight")
        );
        assert_eq!(
            old_diffusers_key(Component::Unet, "down_blocks.0.attentions.0.proj_in", true),
            None
        );
    }

    #[test]
    fn unknown_params_are_unknown() {
        assert!(matches!(
            parse_key("lora_unet_x.lora_sideways.weight"),
            ParsedKey::Unknown
        ));
        assert!(matches!(
            parse_key("model.diffusion_model.foo.weight"),
            ParsedKey::Unknown
        ));
    }
}
