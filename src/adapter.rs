//! An adapter file parsed into modules of a known architecture.
//!
//! Loading resolves every key against the inventory, groups the tensors of
//! each module, detects the architecture and scheme, and checks that factor
//! shapes are consistent. Nothing is converted here; keys that map to no
//! module are kept in `unknown` so that every command can report them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::tensor::{dtype_name, RawTensor};
use crate::io::{open_tensor_file, Container};
use crate::schemes::keys::{parse_key, KeyStyle, ModuleName, Param, ParsedKey};
use crate::schemes::{inventory, Arch, Class, Component, Inventory, Kind, Scheme};

/// One adapted layer and its tensors.
#[derive(Debug, Clone)]
pub struct Module {
    /// Index into the architecture's inventory.
    pub index: usize,
    pub down: Option<RawTensor>,
    pub up: Option<RawTensor>,
    pub alpha: Option<RawTensor>,
    /// Non-LoRA parameters (LoHa, LoKr, DoRA, Tucker mid, …) in kohya spelling.
    pub other: BTreeMap<String, RawTensor>,
}

impl Module {
    /// The rank: rows of the down factor (LoHa: of `hada_w1_b`; LoKr: of its
    /// low-rank `b` factor; `None` for full-rank LoKr blocks).
    pub fn rank(&self) -> Option<usize> {
        if let Some(d) = &self.down {
            return d.shape.first().copied();
        }
        ["hada_w1_b", "lokr_w2_b", "lokr_w1_b"]
            .iter()
            .find_map(|k| self.other.get(*k))
            .and_then(|t| t.shape.first().copied())
    }

    /// Alpha as a number; a missing alpha means alpha = rank (scale 1) in
    /// kohya, A1111, ComfyUI and diffusers alike.
    pub fn alpha_value(&self) -> Option<f64> {
        match &self.alpha {
            Some(a) => a.scalar_value(),
            None => self.rank().map(|r| r as f64),
        }
    }

    /// `alpha / rank`, the factor kohya applies to `up @ down`.
    pub fn scale(&self) -> Option<f64> {
        Some(self.alpha_value()? / self.rank()? as f64)
    }

    pub fn is_plain_lora(&self) -> bool {
        self.other.is_empty() && self.down.is_some() && self.up.is_some()
    }
}

/// An adapter file resolved against one architecture.
pub struct Adapter {
    pub path: PathBuf,
    pub container: Container,
    pub file_size: u64,
    pub arch: Arch,
    /// Why this architecture was chosen (shown by `inspect`).
    pub arch_reason: String,
    pub scheme: Option<Scheme>,
    /// Styles of the keys seen; more than one means a mixed file.
    pub styles: BTreeSet<KeyStyle>,
    /// Whether UNet names were SAI (LDM) names.
    pub sai_names: bool,
    pub modules: Vec<Module>,
    /// Keys that map to no module of the architecture.
    pub unknown: Vec<String>,
    /// Keys kept verbatim (bundled embeddings).
    pub passthrough: Vec<(String, RawTensor)>,
    pub metadata: BTreeMap<String, String>,
    /// Shape and consistency problems, each naming its key.
    pub problems: Vec<String>,
}

/// The one-line family of adapter found in a file.
pub fn algorithm(modules: &[Module]) -> String {
    let mut kinds = BTreeSet::new();
    for m in modules {
        let o = &m.other;
        if o.keys().any(|k| k.starts_with("hada_")) {
            kinds.insert("loha");
        } else if o.keys().any(|k| k.starts_with("lokr_")) {
            kinds.insert("lokr");
        } else if o.keys().any(|k| k.starts_with("oft_")) {
            kinds.insert("oft");
        } else if o.contains_key("diff") {
            kinds.insert("full");
        } else if o.contains_key("on_input") {
            kinds.insert("ia3");
        } else if m.down.is_some() {
            kinds.insert("lora");
        }
        if o.contains_key("dora_scale") {
            kinds.insert("dora");
        }
    }
    if kinds.is_empty() {
        "none".into()
    } else {
        kinds.into_iter().collect::<Vec<_>>().join("+")
    }
}

struct RawEntry {
    key: String,
    name: ModuleName,
    param: Param,
    style: KeyStyle,
    tensor: RawTensor,
}

impl Adapter {
    /// Load `path`, detecting the architecture unless `arch` is given.
    pub fn load(path: &Path, arch: Option<Arch>) -> Result<Adapter> {
        let file = open_tensor_file(path)?;
        let mut entries = Vec::new();
        let mut unknown = Vec::new();
        let mut passthrough = Vec::new();
        for (key, tensor) in file.tensors {
            match parse_key(&key) {
                ParsedKey::Module { name, param, style } => entries.push(RawEntry {
                    key,
                    name,
                    param,
                    style,
                    tensor,
                }),
                ParsedKey::Passthrough => passthrough.push((key, tensor)),
                ParsedKey::Unknown => unknown.push(key),
            }
        }
        if entries.is_empty() {
            return Err(Error::file(
                path,
                format!(
                    "no LoRA keys found ({} tensors, none named like kohya `lora_unet_…`, PEFT `…lora_A.weight` or diffusers `…_lora.down.weight`)",
                    unknown.len() + passthrough.len()
                ),
            ));
        }
        let (arch, arch_reason) = match arch {
            Some(a) => (a, "given with --arch".to_string()),
            None => detect_arch(&entries, &file.metadata),
        };
        let inv = inventory(arch);
        let peft_alphas = peft_alpha_table(path, &file.metadata)?;

        let mut modules: Vec<Module> = Vec::new();
        let mut slot: HashMap<usize, usize> = HashMap::new();
        let mut styles = BTreeSet::new();
        let mut sai_names = false;
        let mut problems = Vec::new();
        for e in entries {
            let Some(index) = resolve(inv, &e.name) else {
                unknown.push(e.key);
                continue;
            };
            styles.insert(e.style);
            if let ModuleName::Flat(n) = &e.name {
                sai_names |= inv.is_sai_name(n);
            }
            let at = *slot.entry(index).or_insert_with(|| {
                modules.push(Module {
                    index,
                    down: None,
                    up: None,
                    alpha: None,
                    other: BTreeMap::new(),
                });
                modules.len() - 1
            });
            let m = &mut modules[at];
            let place = match e.param {
                Param::Down => &mut m.down,
                Param::Up => &mut m.up,
                Param::Alpha => &mut m.alpha,
                Param::Other(p) => {
                    if m.other.insert(p, e.tensor).is_some() {
                        problems.push(format!(
                            "`{}`: module given twice under different names",
                            e.key
                        ));
                    }
                    continue;
                }
            };
            if place.replace(e.tensor).is_some() {
                problems.push(format!(
                    "`{}`: module given twice under different names",
                    e.key
                ));
            }
        }
        // PEFT keeps alphas in metadata; give them back to their modules.
        if let Some(table) = &peft_alphas {
            for m in &mut modules {
                if m.alpha.is_none() {
                    let spec = &inv.modules[m.index];
                    if let Some((v, dtype)) = table.alpha_for(spec.component, &spec.path, m.rank())
                    {
                        m.alpha = Some(RawTensor::scalar(dtype, v));
                    }
                }
            }
        }
        for m in &modules {
            check_module(inv, m, &mut problems);
        }
        let scheme = detect_scheme(&styles, sai_names, arch, &file.metadata);
        Ok(Adapter {
            path: path.to_path_buf(),
            container: file.container,
            file_size: file.file_size,
            arch,
            arch_reason,
            scheme,
            styles,
            sai_names,
            modules,
            unknown,
            passthrough,
            metadata: file.metadata,
            problems,
        })
    }

    pub fn inventory(&self) -> &'static Inventory {
        inventory(self.arch)
    }

    /// Fail with every problem and unknown key listed, for commands that
    /// must not silently drop data.
    pub fn ensure_clean(&self, allow_unknown: bool) -> Result<()> {
        let mut msgs = self.problems.clone();
        if !allow_unknown && !self.unknown.is_empty() {
            let shown: Vec<_> = self
                .unknown
                .iter()
                .take(12)
                .map(|k| format!("`{k}`"))
                .collect();
            msgs.push(format!(
                "{} key(s) map to no {} module: {}{} (pass --allow-unknown to drop them)",
                self.unknown.len(),
                self.arch.name(),
                shown.join(", "),
                if self.unknown.len() > 12 { ", …" } else { "" }
            ));
        }
        if msgs.is_empty() {
            Ok(())
        } else {
            Err(Error::file(&self.path, msgs.join("; ")))
        }
    }

    /// For merge and bake, which add `up @ down` deltas: no problems, no
    /// unknown keys, and only plain LoRA/LoCon modules. `what` names the
    /// operation in the error ("merged", "baked").
    pub fn ensure_plain(&self, what: &str) -> Result<()> {
        self.ensure_clean(false)?;
        if let Some(m) = self.modules.iter().find(|m| !m.is_plain_lora()) {
            return Err(Error::key(
                &self.path,
                self.inventory().flat_name(m.index, false),
                format!(
                    "only plain LoRA/LoCon modules can be {what} (LoHa/LoKr/DoRA/Tucker found)"
                ),
            ));
        }
        Ok(())
    }

    /// Concepts this membrane erases: SPM `prompts` split on ",".
    pub fn concepts(&self) -> Vec<String> {
        concepts_of(&self.metadata)
    }

    /// The most common value, used for the file-level rank/alpha metadata.
    pub fn common_rank_alpha(&self) -> (Option<usize>, Option<f64>) {
        (
            most_common(self.modules.iter().filter_map(Module::rank)),
            most_common(self.modules.iter().filter_map(Module::alpha_value)),
        )
    }
}

/// The most frequent value; the first seen wins ties, so the result never
/// depends on hashing. Used for file-level rank/alpha metadata.
pub fn most_common<T: PartialEq + Copy>(values: impl Iterator<Item = T>) -> Option<T> {
    let mut counts: Vec<(T, usize)> = Vec::new();
    for v in values {
        match counts.iter_mut().find(|(x, _)| *x == v) {
            Some((_, n)) => *n += 1,
            None => counts.push((v, 1)),
        }
    }
    let mut best: Option<(T, usize)> = None;
    for (v, n) in counts {
        if best.is_none_or(|(_, b)| n > b) {
            best = Some((v, n));
        }
    }
    best.map(|(v, _)| v)
}

/// Concepts from metadata: SPM's `prompts`, split on "," and trimmed.
pub fn concepts_of(metadata: &BTreeMap<String, String>) -> Vec<String> {
    metadata
        .get("prompts")
        .map(|p| {
            p.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

fn resolve(inv: &Inventory, name: &ModuleName) -> Option<usize> {
    match name {
        ModuleName::Flat(n) => inv.lookup_flat(n),
        ModuleName::Dotted(c, p) => inv.lookup_dotted(*c, p),
    }
}

/// Pick the architecture from names first, then shapes, then metadata hints
/// (lora-schemes.md §8.3). SD1 and SD2 share every UNet name, so the
/// cross-attention width, text-encoder depth and projection layout decide.
fn detect_arch(entries: &[RawEntry], metadata: &BTreeMap<String, String>) -> (Arch, String) {
    let resolved = |arch: Arch| {
        let inv = inventory(arch);
        entries
            .iter()
            .filter(|e| resolve(inv, &e.name).is_some())
            .count()
    };
    let n_sd = resolved(Arch::Sd1).max(resolved(Arch::Sd2));
    let n_xl = resolved(Arch::Sdxl);
    if n_xl > n_sd {
        return (
            Arch::Sdxl,
            format!("{n_xl} keys name SDXL modules, {n_sd} SD1/SD2 modules"),
        );
    }
    let inv = inventory(Arch::Sd1);
    let mut votes: Vec<(Arch, String)> = Vec::new();
    for e in entries {
        let Some(i) = resolve(inv, &e.name) else {
            continue;
        };
        let spec = &inv.modules[i];
        if e.param != Param::Down {
            continue;
        }
        if spec.path.ends_with("attn2.to_k") && e.tensor.shape.len() >= 2 {
            match e.tensor.shape[1] {
                768 => votes.push((Arch::Sd1, "cross-attention width 768".into())),
                1024 => votes.push((Arch::Sd2, "cross-attention width 1024".into())),
                _ => {}
            }
        }
        if spec.component == Component::TextEncoder && e.tensor.shape.len() == 2 {
            match e.tensor.shape[1] {
                768 => votes.push((Arch::Sd1, "text-encoder width 768".into())),
                1024 => votes.push((Arch::Sd2, "text-encoder width 1024".into())),
                _ => {}
            }
        }
    }
    if let Some((a, why)) = votes.first() {
        return (*a, why.clone());
    }
    // Non-standard widths (tiny test models, pruned nets): projection layout.
    for e in entries {
        let Some(i) = resolve(inv, &e.name) else {
            continue;
        };
        if inv.modules[i].path.ends_with("proj_in") && e.param == Param::Down {
            return match e.tensor.shape.len() {
                4 => (
                    Arch::Sd1,
                    "proj_in factors are 4-D (1×1 conv projections)".into(),
                ),
                _ => (
                    Arch::Sd2,
                    "proj_in factors are 2-D (linear projections)".into(),
                ),
            };
        }
    }
    if metadata.get("ss_v2").map(String::as_str) == Some("True")
        || metadata
            .get("ss_base_model_version")
            .is_some_and(|v| v.starts_with("sd_v2"))
    {
        return (Arch::Sd2, "metadata ss_v2/ss_base_model_version".into());
    }
    (
        Arch::Sd1,
        "no distinguishing signal; SD1 assumed (use --arch)".into(),
    )
}

fn detect_scheme(
    styles: &BTreeSet<KeyStyle>,
    sai: bool,
    arch: Arch,
    metadata: &BTreeMap<String, String>,
) -> Option<Scheme> {
    if styles.contains(&KeyStyle::DiffusersOld) {
        return Some(Scheme::DiffusersOld);
    }
    if styles.contains(&KeyStyle::Peft) || styles.contains(&KeyStyle::DiffusersLora) {
        return Some(Scheme::Peft);
    }
    if !styles.contains(&KeyStyle::Kohya) {
        return None;
    }
    let is_spm = metadata.contains_key("prompts") && !metadata.keys().any(|k| k.starts_with("ss_"));
    Some(if is_spm && !sai {
        Scheme::Spm
    } else if sai && arch != Arch::Sdxl {
        Scheme::Ldm
    } else {
        Scheme::Kohya
    })
}

/// Check factor shapes against each other and against the layer kind.
fn check_module(inv: &Inventory, m: &Module, problems: &mut Vec<String>) {
    let spec = &inv.modules[m.index];
    let name = inv.flat_name(m.index, false);
    if m.other
        .keys()
        .any(|k| !k.starts_with("lora_mid") && k != "dora_scale")
    {
        return; // LyCORIS algorithms: reported, not shape-checked.
    }
    let (Some(down), Some(up)) = (&m.down, &m.up) else {
        problems.push(format!(
            "`{name}`: has {} but not both lora_down and lora_up",
            present(m)
        ));
        return;
    };
    let ok_down = match (spec.kind, down.shape.len()) {
        (_, 2) => true,
        (Kind::Conv3x3, 4) => true,
        (_, 4) => down.shape[2] == 1 && down.shape[3] == 1,
        _ => false,
    };
    let ok_up =
        up.shape.len() == 2 || (up.shape.len() == 4 && up.shape[2] == 1 && up.shape[3] == 1);
    if !ok_down || !ok_up {
        problems.push(format!(
            "`{name}`: factor shapes down {:?} / up {:?} do not fit a {:?} layer",
            down.shape, up.shape, spec.kind
        ));
        return;
    }
    if down.shape[0] == 0 {
        problems.push(format!("`{name}`: rank 0 (empty lora_down)"));
        return;
    }
    if down.shape[0] != up.shape[1] && !m.other.contains_key("lora_mid.weight") {
        problems.push(format!(
            "`{name}`: rank mismatch: lora_down has {} rows, lora_up has {} columns",
            down.shape[0], up.shape[1]
        ));
    }
    // NaN/inf factors would poison every file made from them (and every
    // image): refused, naming the tensor.
    for (part, t) in [("lora_down.weight", down), ("lora_up.weight", up)]
        .into_iter()
        .chain(m.alpha.as_ref().map(|a| ("alpha", a)))
    {
        let bad = t
            .to_f32()
            .map_or(0, |v| v.iter().filter(|x| !x.is_finite()).count());
        if bad > 0 {
            problems.push(format!(
                "`{name}.{part}`: {bad} value(s) are NaN or infinite"
            ));
        }
    }
    if let Some(a) = &m.alpha {
        if a.numel() != 1 || a.scalar_value().is_none() {
            problems.push(format!(
                "`{name}.alpha`: must be a scalar number, got {} {:?}",
                dtype_name(a.dtype),
                a.shape
            ));
        }
    }
}

fn present(m: &Module) -> String {
    let mut v = Vec::new();
    if m.down.is_some() {
        v.push("lora_down");
    }
    if m.up.is_some() {
        v.push("lora_up");
    }
    if m.alpha.is_some() {
        v.push("alpha");
    }
    if v.is_empty() {
        "nothing".into()
    } else {
        v.join("+")
    }
}

/// Whether a module's factor sizes equal the full-size architecture's.
pub fn has_standard_dims(inv: &Inventory, m: &Module) -> bool {
    let spec = &inv.modules[m.index];
    let (Some(d), Some(u)) = (&m.down, &m.up) else {
        return true;
    };
    let k = if spec.kind == Kind::Conv3x3 && d.shape.len() == 4 {
        9
    } else {
        1
    };
    let rows = d.shape.first().copied().unwrap_or(0);
    d.numel().checked_div(rows) == Some(spec.in_dim * k) && u.shape.first() == Some(&spec.out_dim)
}

/// Alphas stored in PEFT metadata (`lora_adapter_metadata`).
/// Default alpha, (pattern, alpha) overrides and `use_rslora` of one PEFT
/// component.
type AlphaRules = (Option<f64>, Vec<(String, f64)>, bool);

pub struct PeftAlphas {
    /// Per component prefix (`unet`, `text_encoder`, …).
    per_component: BTreeMap<String, AlphaRules>,
    dtype: crate::io::tensor::Dtype,
}

impl PeftAlphas {
    /// The kohya-convention alpha (scale = alpha / rank) of a module of
    /// rank `rank`. rsLoRA scales by alpha/√rank instead, which kohya's
    /// convention expresses as alpha·√rank; the dtype is then F32, since
    /// √rank is rarely a whole number.
    fn alpha_for(
        &self,
        c: Component,
        path: &str,
        rank: Option<usize>,
    ) -> Option<(f64, crate::io::tensor::Dtype)> {
        let (default, patterns, rslora) = self.per_component.get(c.dotted_prefix())?;
        let short = path.trim_start_matches("text_model.");
        let found = patterns
            .iter()
            .find(|(pat, _)| {
                [path, short]
                    .iter()
                    .any(|p| p == pat || p.ends_with(&format!(".{pat}")))
            })
            .map(|(_, v)| *v)
            .or(*default)?;
        if *rslora {
            let r = rank? as f64;
            return Some((found * r.sqrt(), crate::io::tensor::Dtype::F32));
        }
        Some((found, self.dtype))
    }
}

/// Metadata key where spm records the dtype alphas had before they were
/// moved into PEFT metadata, so a round trip restores them bit-exactly.
pub const ALPHA_DTYPE_KEY: &str = "spm.alpha_dtype";

fn peft_alpha_table(
    path: &Path,
    metadata: &BTreeMap<String, String>,
) -> Result<Option<PeftAlphas>> {
    let Some(raw) = metadata.get("lora_adapter_metadata") else {
        return Ok(None);
    };
    let v: Value = serde_json::from_str(raw).map_err(|e| {
        Error::key(
            path,
            "__metadata__.lora_adapter_metadata",
            format!("not valid JSON: {e}"),
        )
    })?;
    let obj = v.as_object().ok_or_else(|| {
        Error::key(
            path,
            "__metadata__.lora_adapter_metadata",
            "must be a JSON object",
        )
    })?;
    let mut per_component: BTreeMap<String, AlphaRules> = BTreeMap::new();
    for (k, val) in obj {
        // diffusers' pipelines prefix each field with its component
        // (`unet.lora_alpha`); `UNet2DConditionModel.save_lora_adapter`
        // writes the bare LoraConfig (`lora_alpha`), which is the UNet's.
        let (comp, field) = match k.split_once('.') {
            Some((c, f)) if ["unet", "text_encoder", "text_encoder_2"].contains(&c) => (c, f),
            Some(_) => continue,
            None => ("unet", k.as_str()),
        };
        let entry = per_component.entry(comp.to_string()).or_default();
        match field {
            "lora_alpha" => entry.0 = val.as_f64(),
            "alpha_pattern" => {
                if let Some(map) = val.as_object() {
                    for (p, a) in map {
                        if let Some(a) = a.as_f64() {
                            entry.1.push((p.clone(), a));
                        }
                    }
                }
            }
            "use_rslora" => entry.2 = val.as_bool() == Some(true),
            _ => {}
        }
    }
    let dtype = metadata
        .get(ALPHA_DTYPE_KEY)
        .and_then(|s| crate::io::tensor::parse_dtype(s))
        .unwrap_or(crate::io::tensor::Dtype::F32);
    Ok(Some(PeftAlphas {
        per_component,
        dtype,
    }))
}

/// Counts of modules found per (component, class), for reports.
pub fn class_counts(inv: &Inventory, modules: &[Module]) -> BTreeMap<(Component, Class), usize> {
    let mut out = BTreeMap::new();
    for m in modules {
        let s = &inv.modules[m.index];
        *out.entry((s.component, s.class)).or_default() += 1;
    }
    out
}
