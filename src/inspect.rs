//! `spm inspect`: what is in an adapter file, against what its architecture
//! expects, with every key that maps to no module.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::adapter::{algorithm, class_counts, has_standard_dims, Adapter};
use crate::convert::py_float;
use crate::io::tensor::dtype_name;
use crate::io::Container;
use crate::schemes::Class;

#[derive(Debug, Serialize)]
pub struct Coverage {
    pub component: String,
    pub class: String,
    pub found: usize,
    pub expected: usize,
}

#[derive(Debug, Serialize)]
pub struct InspectReport {
    pub file: String,
    pub size_bytes: u64,
    pub container: String,
    pub scheme: Option<String>,
    pub unet_names: String,
    pub arch: String,
    pub arch_reason: String,
    pub algorithm: String,
    pub modules: usize,
    pub tensors: usize,
    pub coverage: Vec<Coverage>,
    /// rank → number of modules.
    pub ranks: BTreeMap<usize, usize>,
    /// alpha (as text) → number of modules.
    pub alphas: BTreeMap<String, usize>,
    /// dtype → number of tensors.
    pub dtypes: BTreeMap<String, usize>,
    /// Whether factor sizes equal the full-size model's (false for tiny or
    /// pruned test models).
    pub standard_dims: bool,
    pub concepts: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    pub unknown_keys: Vec<String>,
    pub problems: Vec<String>,
}

fn class_name(c: Class) -> &'static str {
    match c {
        Class::Transformer => "transformer",
        Class::Conv => "conv (LoCon)",
        Class::Extra => "extra (LyCORIS)",
        Class::TextEncoder => "text encoder",
    }
}

pub fn inspect(ad: &Adapter) -> InspectReport {
    let inv = ad.inventory();
    let counts = class_counts(inv, &ad.modules);
    let coverage = counts
        .iter()
        .map(|((comp, class), found)| Coverage {
            component: comp.name().into(),
            class: class_name(*class).into(),
            found: *found,
            expected: inv.count(*comp, *class),
        })
        .collect();
    let mut ranks = BTreeMap::new();
    let mut alphas = BTreeMap::new();
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    let mut tensors = ad.passthrough.len();
    for m in &ad.modules {
        if let Some(r) = m.rank() {
            *ranks.entry(r).or_default() += 1;
        }
        let a = match (&m.alpha, m.alpha_value()) {
            (Some(_), Some(v)) => py_float(v),
            (None, Some(v)) => format!("{} (absent: = rank)", py_float(v)),
            _ => "-".into(),
        };
        *alphas.entry(a).or_default() += 1;
        for t in [&m.down, &m.up, &m.alpha]
            .into_iter()
            .flatten()
            .chain(m.other.values())
        {
            *dtypes.entry(dtype_name(t.dtype)).or_default() += 1;
            tensors += 1;
        }
    }
    InspectReport {
        file: ad.path.display().to_string(),
        size_bytes: ad.file_size,
        container: match ad.container {
            Container::Safetensors => "safetensors".into(),
            Container::Pickle => "pytorch pickle (read as data)".into(),
        },
        scheme: ad.scheme.map(|s| s.name().to_string()),
        unet_names: if ad.sai_names { "sai/ldm" } else { "diffusers" }.into(),
        arch: ad.arch.name().into(),
        arch_reason: ad.arch_reason.clone(),
        algorithm: algorithm(&ad.modules),
        modules: ad.modules.len(),
        tensors,
        coverage,
        ranks,
        alphas,
        dtypes,
        standard_dims: ad.modules.iter().all(|m| has_standard_dims(inv, m)),
        concepts: ad.concepts(),
        metadata: ad.metadata.clone(),
        unknown_keys: ad.unknown.clone(),
        problems: ad.problems.clone(),
    }
}

/// Human-readable rendering.
pub fn render_text(r: &InspectReport) -> String {
    let mut s = String::new();
    let mut line = |k: &str, v: String| s.push_str(&format!("{k:<14}{v}\n"));
    line(
        "file",
        format!("{} ({} bytes, {})", r.file, r.size_bytes, r.container),
    );
    line(
        "scheme",
        format!(
            "{} (unet names: {})",
            r.scheme.as_deref().unwrap_or("unknown"),
            r.unet_names
        ),
    );
    line("arch", format!("{} ({})", r.arch, r.arch_reason));
    line("algorithm", r.algorithm.clone());
    let cov: Vec<String> = r
        .coverage
        .iter()
        .map(|c| format!("{} {} {}/{}", c.component, c.class, c.found, c.expected))
        .collect();
    line("modules", format!("{} ({})", r.modules, cov.join(", ")));
    line("tensors", r.tensors.to_string());
    let join = |m: Vec<String>| m.join(", ");
    let ranks: Vec<String> = r.ranks.iter().map(|(k, v)| format!("{k} ×{v}")).collect();
    line(
        "rank",
        if ranks.is_empty() {
            "- (full-rank factors)".into()
        } else {
            join(ranks)
        },
    );
    line(
        "alpha",
        join(r.alphas.iter().map(|(k, v)| format!("{k} ×{v}")).collect()),
    );
    line(
        "dtype",
        join(r.dtypes.iter().map(|(k, v)| format!("{k} ×{v}")).collect()),
    );
    line(
        "dims",
        if r.standard_dims {
            "full-size".into()
        } else {
            "non-standard (tiny or pruned model)".into()
        },
    );
    line(
        "concepts",
        if r.concepts.is_empty() {
            "-".into()
        } else {
            r.concepts.join(", ")
        },
    );
    if !r.metadata.is_empty() {
        s.push_str("metadata\n");
        for (k, v) in &r.metadata {
            let v = if v.len() > 100 {
                format!("{}… ({} chars)", &v[..v.floor_char_boundary(100)], v.len())
            } else {
                v.clone()
            };
            s.push_str(&format!("  {k} = {v}\n"));
        }
    }
    if r.unknown_keys.is_empty() {
        s.push_str("unknown keys  none\n");
    } else {
        s.push_str(&format!(
            "unknown keys  {} (map to no {} module)\n",
            r.unknown_keys.len(),
            r.arch
        ));
        for k in &r.unknown_keys {
            s.push_str(&format!("  {k}\n"));
        }
    }
    for p in &r.problems {
        s.push_str(&format!("problem       {p}\n"));
    }
    s
}

/// What `spm inspect` says of a `spm train --full` output: a partial
/// diffusers UNet state dict (the trained layers' weights and biases, as
/// ESD's `esd_sd.py` saves them), not an adapter.
#[derive(Debug, Serialize)]
pub struct PartialReport {
    pub file: String,
    pub kind: &'static str,
    pub method: Option<String>,
    pub modules: usize,
    pub tensors: usize,
    pub parameters: usize,
    pub dtypes: BTreeMap<String, usize>,
    pub concepts: Vec<String>,
    pub metadata: BTreeMap<String, String>,
}

/// `Some` when `path` is a safetensors file of diffusers UNet parameter
/// names only (`…weight` / `…bias` under `down_blocks.`, `mid_block.`,
/// `up_blocks.`, `conv_in`, `conv_out`, `time_embedding.`, `conv_norm_out`).
pub fn inspect_partial(path: &std::path::Path) -> Option<PartialReport> {
    let h = crate::io::safetensors::read_header(path).ok()?;
    if h.tensors.is_empty() {
        return None;
    }
    let roots = [
        "down_blocks.",
        "mid_block.",
        "up_blocks.",
        "conv_in.",
        "conv_out.",
        "time_embedding.",
        "conv_norm_out.",
    ];
    let mut modules = std::collections::BTreeSet::new();
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    let mut parameters = 0;
    for t in &h.tensors {
        let (module, leaf) = t.name.rsplit_once('.')?;
        if !(leaf == "weight" || leaf == "bias") || !roots.iter().any(|r| t.name.starts_with(r)) {
            return None;
        }
        modules.insert(module.to_string());
        *dtypes.entry(dtype_name(t.dtype)).or_default() += 1;
        parameters += t.shape.iter().product::<usize>();
    }
    Some(PartialReport {
        file: path.display().to_string(),
        kind: "partial diffusers UNet state dict (full-weight eraser)",
        method: h.metadata.get("spm_train_method").cloned(),
        modules: modules.len(),
        tensors: h.tensors.len(),
        parameters,
        dtypes,
        concepts: crate::adapter::concepts_of(&h.metadata),
        metadata: h.metadata.clone(),
    })
}

pub fn render_partial(r: &PartialReport) -> String {
    let mut s = String::new();
    s += &format!("file          {}\n", r.file);
    s += &format!("kind          {}\n", r.kind);
    if let Some(m) = &r.method {
        s += &format!("method        {m}\n");
    }
    s += &format!("modules       {}\n", r.modules);
    s += &format!(
        "tensors       {} ({} parameters)\n",
        r.tensors, r.parameters
    );
    let d: Vec<String> = r.dtypes.iter().map(|(k, v)| format!("{k} ×{v}")).collect();
    s += &format!("dtype         {}\n", d.join(", "));
    s += &format!("concepts      {}\n", r.concepts.join(", "));
    s += "note          not an adapter: the trained layers' own weights, loadable with diffusers' `unet.load_state_dict(sd, strict=False)` as ESD's esd_sd.py files are\n";
    s
}
