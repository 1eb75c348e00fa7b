//! `spm extract`'s flags, and the text report.

use std::io::IsTerminal;
use std::path::PathBuf;

use spm::error::Result;
use spm::extract::{extract, ExtractOptions, Modules, Report, Rule};
use spm::io::output::{check_output, OutputKind};
use spm::io::tensor::Dtype;
use spm::schemes::{Arch, Scheme};

/// Turn a fine-tuned eraser (ESD, Forget-Me-Not, any fine-tune) into a LoRA.
///
/// Each target layer's difference ΔW = W_tuned − W_base is factored by a
/// truncated SVD (up = U·S, down = Vᵀ, alpha = rank, as kohya's
/// extract_lora_from_models.py), so the result loads in A1111/Forge/ComfyUI,
/// stacks with other LoRAs, and — with --concept — is gated per prompt by
/// Facilitated Transport (`spm serve`, `spm generate`).
///
/// BASE and TUNED: a diffusers UNet or pipeline folder, an A1111/LDM single
/// file, or a full or partial diffusers state dict (.safetensors, or a
/// .pt/.ckpt pickle read as data, never executed): ESD's released .pt
/// files, ESD's partial bf16 files, Forget-Me-Not's folders.
///
/// Before subtracting, every tensor outside the extracted layers is compared
/// with BASE: a method leaves some untouched, so a full TUNED none of whose
/// tensors matches was trained from another base (e.g. SD1.4's EMA vs
/// non-EMA weights) and spm stops, naming the first differing key.
///
/// Rank: --rank R (default 4), or a dynamic rule with R as its cap, with
/// kohya resize_lora.py's formulas (including their +1):
///   --sv-ratio X       keep singular values above S₀/X
///   --sv-fro F         keep fraction F of ‖ΔW‖_F
///   --sv-cumulative C  keep fraction C of ΣS
///
/// Layers whose ΔW is exactly zero are skipped and counted. Biases, norms
/// and conv_in cannot be carried by a LoRA: their differences are listed.
/// Memory: one tensor pair at a time.
///
/// Example (ESD-x from its released weights, against the non-EMA SD1.4):
///   spm extract --base sd-v1-4.ckpt --tuned diffusers-VanGogh-ESDx1-UNET.pt \
///       --rank 8 --modules attn2 --concept "Van Gogh" -o vangogh_esdx.safetensors
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct ExtractArgs {
    /// The model TUNED was trained from (read, never modified).
    #[arg(long)]
    base: PathBuf,
    /// The fine-tuned model (read, never modified).
    #[arg(long)]
    tuned: PathBuf,
    /// Output .safetensors: never an input, never inside an input folder; atomic write.
    #[arg(short, long)]
    output: PathBuf,
    /// Rank of every module, or the cap of a dynamic rule.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    rank: u32,
    /// Dynamic rank: keep singular values larger than S₀/X (X ≥ 1).
    #[arg(long, value_name = "X", group = "dynamic", value_parser = at_least_one)]
    sv_ratio: Option<f64>,
    /// Dynamic rank: keep fraction F (0..1] of the Frobenius norm.
    #[arg(long, value_name = "F", group = "dynamic", value_parser = fraction)]
    sv_fro: Option<f64>,
    /// Dynamic rank: keep fraction C (0..1] of the sum of singular values.
    #[arg(long, value_name = "C", group = "dynamic", value_parser = fraction)]
    sv_cumulative: Option<f64>,
    /// Layers to extract: transformer (kohya LoRA / SPM: 192), attn2 (64, ESD-x's), all (+ LoCon convs: 278).
    #[arg(long, value_enum, default_value = "transformer")]
    modules: Modules,
    /// kohya's clamp of both factors at this signed quantile (kohya uses 0.99); off by default.
    #[arg(long, value_name = "Q", value_parser = fraction)]
    clamp_quantile: Option<f64>,
    /// The erased concept, written to `prompts` so Facilitated Transport can gate the LoRA.
    #[arg(long)]
    concept: Option<String>,
    /// Output scheme (see `spm convert --help`).
    #[arg(long, value_enum, default_value = "kohya")]
    to: Scheme,
    /// Skip layers whose largest |ΔW| is at most D (default: only exact zeros).
    #[arg(long, value_name = "D", default_value_t = 0.0, value_parser = non_negative)]
    min_diff: f32,
    /// Extract even when no untouched tensor matches BASE (a full fine-tune of it).
    #[arg(long)]
    force_base: bool,
    /// Output dtype (factors and alphas).
    #[arg(long, value_enum, default_value = "fp32")]
    dtype: SaveDtype,
    /// Architecture; by default read from the base's shapes.
    #[arg(long, value_enum)]
    arch: Option<ArchChoice>,
    /// Replace an existing output file (never an input).
    #[arg(long)]
    force: bool,
    /// Print the report as JSON on stdout (for scripts).
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SaveDtype {
    Fp32,
    Fp16,
    Bf16,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ArchChoice {
    Sd1,
    Sd2,
}

fn fraction(s: &str) -> std::result::Result<f64, String> {
    let v: f64 = crate::finite(s)?;
    if v > 0.0 && v <= 1.0 {
        Ok(v)
    } else {
        Err(format!("{s} must be in (0, 1]"))
    }
}

fn at_least_one(s: &str) -> std::result::Result<f64, String> {
    let v: f64 = crate::finite(s)?;
    if v >= 1.0 {
        Ok(v)
    } else {
        Err(format!("{s} must be a finite number ≥ 1"))
    }
}

fn non_negative(s: &str) -> std::result::Result<f32, String> {
    let v: f32 = crate::finite(s)?;
    if v >= 0.0 {
        Ok(v)
    } else {
        Err(format!("{s} must be a finite number ≥ 0"))
    }
}

pub fn run(a: ExtractArgs) -> Result<()> {
    check_output(&a.output, &[&a.base, &a.tuned], OutputKind::File, a.force)?;
    let rule = match (a.sv_ratio, a.sv_fro, a.sv_cumulative) {
        (Some(p), _, _) => Rule::SvRatio(p),
        (_, Some(p), _) => Rule::SvFro(p),
        (_, _, Some(p)) => Rule::SvCumulative(p),
        _ => Rule::Fixed,
    };
    let opts = ExtractOptions {
        rank: a.rank as usize,
        rule,
        modules: a.modules,
        clamp_quantile: a.clamp_quantile,
        concept: a.concept.clone(),
        to: a.to,
        min_diff: a.min_diff,
        force_base: a.force_base,
        dtype: match a.dtype {
            SaveDtype::Fp32 => Dtype::F32,
            SaveDtype::Fp16 => Dtype::F16,
            SaveDtype::Bf16 => Dtype::BF16,
        },
        arch: a.arch.map(|c| match c {
            ArchChoice::Sd1 => Arch::Sd1,
            ArchChoice::Sd2 => Arch::Sd2,
        }),
        title: crate::stem(&a.output),
        progress: !a.json && std::io::stderr().is_terminal(),
    };
    let (rendered, report) = extract(&a.base, &a.tuned, &opts)?;
    let bytes = crate::write_file(&a.output, &rendered.metadata, &rendered.tensors)?;
    if a.json {
        let mut v = serde_json::to_value(&report).expect("json");
        v["output"] = serde_json::json!(a.output);
        v["bytes"] = serde_json::json!(bytes);
        v["tensors"] = serde_json::json!(rendered.tensors.len());
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
    } else {
        print_text(&report, &a.output, bytes);
    }
    Ok(())
}

/// The text report, written in one go; a closed pipe (`| head`) ends it
/// quietly instead of panicking in `println!`.
fn print_text(r: &Report, out: &std::path::Path, bytes: u64) {
    use std::fmt::Write as _;
    let mut o = String::new();
    let rule = match r.rule.param {
        Some(p) => format!("{} {p} (cap {})", r.rule.kind, r.rule.rank),
        None => format!("rank {}", r.rule.rank),
    };
    writeln!(
        o,
        "{} ({}) − {} ({}) → {} ({}, {}, {bytes} bytes)",
        r.tuned,
        r.tuned_layout.describe(),
        r.base,
        r.base_layout.describe(),
        out.display(),
        r.scheme,
        r.arch
    )
    .ok();
    writeln!(o,
        "  {} of {} target layers extracted ({rule}); {} identical to the base, {} not in the tuned file",
        r.extracted, r.selected, r.skipped_zero, r.absent
    ).ok();
    let check = match r.base_check.verdict {
        "ok" => format!(
            "base check: {} of {} untouched-candidate tensors equal the base",
            r.base_check.equal, r.base_check.compared
        ),
        "partial-file" => "base check: not possible — the tuned file holds only trained tensors; make sure the base is the model it was trained from".into(),
        _ => "base check: FAILED, overridden by --force-base".into(),
    };
    writeln!(o, "  {check}").ok();
    writeln!(
        o,
        "  {:<72} {:>5} {:>10} {:>8} {:>9}",
        "layer", "rank", "‖ΔW‖", "kept", "residual"
    )
    .ok();
    for m in &r.modules {
        writeln!(
            o,
            "  {:<72} {:>5} {:>10.3e} {:>7.2}% {:>9.2e}",
            m.path,
            m.rank,
            m.delta_fro,
            100.0 * m.kept,
            m.residual
        )
        .ok();
    }
    writeln!(
        o,
        "  worst residual ‖ΔW − up·down‖/‖ΔW‖ = {:.3e}",
        r.max_residual
    )
    .ok();
    if !r.dropped.is_empty() {
        writeln!(o,
            "  not carried by a LoRA: {} differing tensors (biases, norms, other layers), ‖Δ‖_F = {:.3e} together:",
            r.dropped.len(),
            r.dropped_fro
        ).ok();
        for d in r.dropped.iter().take(10) {
            writeln!(o, "    {} (‖Δ‖ = {:.3e})", d.key, d.delta_fro).ok();
        }
        if r.dropped.len() > 10 {
            writeln!(o, "    … {} more (all in --json)", r.dropped.len() - 10).ok();
        }
    }
    if !r.unmatched.is_empty() {
        writeln!(
            o,
            "  {} tuned tensors are not in the base and were ignored (first: {})",
            r.unmatched.len(),
            r.unmatched[0]
        )
        .ok();
    }
    use std::io::Write as _;
    let _ = std::io::stdout().lock().write_all(o.as_bytes());
}
