//! The `spm` command line. Thin: parses flags, calls the library, prints a
//! summary (or JSON with `--json`), and turns errors into one clear line
//! and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::json;
use tracing::info;

use spm::adapter::Adapter;
use spm::bake::{self, BakeReport};
use spm::convert::{self, ConvertOptions, Curve};
use spm::error::{Error, Result};
use spm::inspect;
use spm::io::output::{check_output, AtomicFile, OutputKind};
use spm::io::safetensors::write_tensors;
use spm::io::tensor::{Dtype, RawTensor};
use spm::merge;
use spm::model::clip::{Activation, LoadOptions};
use spm::schemes::{Arch, Scheme};
use spm::serve::{self as daemon, ServeConfig};
use spm::transport::gate::{GateOptions, Membrane, Metric};
use spm::transport::strict::Normalize;
use spm::transport::{build_engine, EngineSpec};

mod cli;

/// Concept Semi-Permeable Membranes (SPM) for Stable Diffusion.
///
/// An SPM is a rank-1 LoRA on every layer of the UNet's transformer blocks
/// that erases one concept. `spm` turns SPM files into LoRAs that
/// A1111/Forge/ComfyUI/diffusers load, moves any LoRA between key-naming
/// schemes (kohya, LDM, PEFT, old diffusers) for SD1.x/SD2.x/SDXL without
/// loss, merges membranes and bakes them into checkpoints. It also restores
/// SPM's Facilitated Transport (per-prompt membrane strength) with a CLIP
/// text encoder run locally: `spm gate` once, `spm serve` as the sidecar of
/// the WebUI extension.
///
/// Examples:
///   spm inspect erase_pikachu.safetensors
///   spm convert erase_pikachu.safetensors --to kohya -o pikachu_lora.safetensors
///   spm merge snoopy.safetensors mickey.safetensors -o cartoons.safetensors
///   spm bake --base v1-5.safetensors erase_pikachu.safetensors -o v1-5-nopika.safetensors
///   spm gate --membrane erase_pikachu.safetensors --text-encoder sd15/ "a photo of pikachu"
///   spm generate --model sd15/ --membrane erase_pikachu.safetensors --grid "pikachu" -o out/
///   spm serve --membranes membranes/ --text-encoder sd15/
#[derive(Parser)]
#[command(name = "spm", version, verbatim_doc_comment, max_term_width = 100)]
struct Cli {
    /// More log output (-v info, -vv debug). Logs go to stderr.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum ArchArg {
    Auto,
    Sd1,
    Sd2,
    Sdxl,
}

impl ArchArg {
    fn get(self) -> Option<Arch> {
        match self {
            ArchArg::Auto => None,
            ArchArg::Sd1 => Some(Arch::Sd1),
            ArchArg::Sd2 => Some(Arch::Sd2),
            ArchArg::Sdxl => Some(Arch::Sdxl),
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    Keep,
    Fp32,
    Fp16,
    Bf16,
}

impl DtypeArg {
    fn get(self) -> Option<Dtype> {
        match self {
            DtypeArg::Keep => None,
            DtypeArg::Fp32 => Some(Dtype::F32),
            DtypeArg::Fp16 => Some(Dtype::F16),
            DtypeArg::Bf16 => Some(Dtype::BF16),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Show an adapter's scheme, architecture, module coverage, ranks,
    /// alphas, dtypes, concepts, metadata and every key that maps to no module.
    ///
    /// Coverage compares against the architecture's inventory: an SD1 SPM
    /// covers 192/192 transformer layers; a kohya LoCon adds 86 conv layers;
    /// a text-encoder LoRA 72 (SD1), 138 (SD2) or 72+192 (SDXL) layers.
    #[command(verbatim_doc_comment)]
    Inspect {
        /// A .safetensors file, or a PyTorch .pt/.ckpt state dict (read as data, never executed).
        file: PathBuf,
        /// Architecture; `auto` detects it from module names, then shapes, then metadata.
        #[arg(long, value_enum, default_value = "auto")]
        arch: ArchArg,
        /// Print the report as JSON (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Rewrite an adapter in another key-naming scheme.
    ///
    /// Schemes:
    ///   spm            SPM's own files (kohya keys, diffusers names, prompts/rank/alpha metadata)
    ///   kohya          what kohya sd-scripts and A1111/Forge/ComfyUI load: diffusers names for
    ///                  SD1/SD2, SAI/LDM names for SDXL, with ss_* and modelspec.* metadata.
    ///                  SPM concepts (`prompts`) are kept so the sidecar can still gate the file.
    ///   ldm            kohya prefixes over LDM/compvis (SAI) UNet names, for every arch
    ///   peft           diffusers PEFT (`unet.<path>.lora_A.weight`), alphas in lora_adapter_metadata
    ///   diffusers-old  pre-PEFT attention processors; attention layers only, no alpha (lossy)
    ///
    /// Tensors keep their bytes and dtype; only 1×1-conv ↔ linear factors are
    /// reshaped (a view change). Round trips between spm/kohya/ldm/peft are
    /// bit-exact.
    ///
    /// --strength m bakes a static membrane strength into the factors. By
    /// default it follows SPM's reference code, which multiplies *both*
    /// factors by m, so the weight delta scales by m²; `--curve linear`
    /// scales only lora_up (delta × m, like a WebUI LoRA weight).
    #[command(verbatim_doc_comment)]
    Convert {
        /// The adapter to convert: .safetensors, or a PyTorch .pt/.ckpt state dict (read as data).
        input: PathBuf,
        /// Output .safetensors file: never an input, never inside an input folder; written
        /// atomically (a temp file beside it, then renamed).
        #[arg(short, long)]
        output: PathBuf,
        /// Scheme to write (see above).
        #[arg(long, value_enum)]
        to: Scheme,
        /// Architecture of the input; `auto` detects it from names, shapes, metadata.
        #[arg(long, value_enum, default_value = "auto")]
        arch: ArchArg,
        /// Cast floating-point tensors (alpha too).
        #[arg(long, value_enum, default_value = "keep")]
        dtype: DtypeArg,
        /// Bake a static strength m ≥ 0 into the factors (see --curve).
        #[arg(long, value_parser = non_negative_f32, allow_hyphen_values = true)]
        strength: Option<f32>,
        /// How --strength scales the delta: reference (m², SPM's code) or linear (m).
        #[arg(long, value_enum, default_value = "reference")]
        curve: Curve,
        /// Accept output that drops layers or rounds alphas (diffusers-old); one summary line
        /// is printed, the full list with -v or --json.
        #[arg(long)]
        allow_lossy: bool,
        /// Drop keys that map to no module instead of failing.
        #[arg(long)]
        allow_unknown: bool,
        /// With --to peft: fold alpha/r into lora_B and write alpha = r, so loaders that
        /// ignore the header's lora_adapter_metadata (diffusers' `load_lora_adapter(path)`
        /// without `weight_name`) still apply the right scale.
        #[arg(long)]
        peft_fold_alpha: bool,
        /// Replace an existing output file (never an input, never a folder).
        #[arg(long)]
        force: bool,
        /// Print a JSON summary (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Combine membranes/LoRAs into one file, exactly.
    ///
    /// Ranks are concatenated, so the merged delta is exactly
    /// Σ wᵢ·(αᵢ/rᵢ)·Uᵢ·Dᵢ (no SVD, no approximation); alpha becomes the total
    /// rank. Each part's concepts are listed in the metadata (`prompts` is
    /// their union, `spm.merged_from` the per-part detail).
    #[command(verbatim_doc_comment)]
    Merge {
        /// Two or more adapters of the same architecture.
        #[arg(required = true, num_args = 1..)]
        inputs: Vec<PathBuf>,
        /// Output .safetensors file: never an input, never inside an input folder; atomic write.
        #[arg(short, long)]
        output: PathBuf,
        /// Weights, one per input (delta multipliers), e.g. "1,0.5" or "1, -0.5". Default 1
        /// each. A negative weight subtracts that adapter's delta; NaN/inf are refused.
        #[arg(long, value_delimiter = ',', value_parser = finite_f32, allow_hyphen_values = true)]
        weights: Vec<f32>,
        /// Scheme of the merged file.
        #[arg(long, value_enum, default_value = "kohya")]
        to: Scheme,
        /// Architecture of the inputs; `auto` detects it per file.
        #[arg(long, value_enum, default_value = "auto")]
        arch: ArchArg,
        /// Output dtype; `keep` picks the widest input dtype.
        #[arg(long, value_enum, default_value = "keep")]
        dtype: DtypeArg,
        /// Replace an existing output file (never an input, never a folder).
        #[arg(long)]
        force: bool,
        /// Print a JSON summary (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Merge adapters into a full checkpoint: W' = W + Σ w·(α/r)·U·D.
    ///
    /// The base is a single-file LDM .safetensors checkpoint or a diffusers
    /// folder (unet/, text_encoder/, text_encoder_2/; other files are copied).
    /// It is streamed tensor by tensor in its own dtype, so memory stays at
    /// one weight tensor. Every adapter module that found no weight in the
    /// checkpoint is reported.
    #[command(verbatim_doc_comment)]
    Bake {
        /// The checkpoint (.safetensors file or diffusers folder); read, never modified.
        #[arg(long)]
        base: PathBuf,
        /// Adapters to bake in.
        #[arg(required = true, num_args = 1..)]
        inputs: Vec<PathBuf>,
        /// Output: a .safetensors file for a single-file base, a folder for a diffusers base.
        /// Never an input, never inside one, never a folder holding one.
        #[arg(short, long)]
        output: PathBuf,
        /// Weights, one per adapter (delta multipliers), e.g. "1,0.5". Default 1 each. A
        /// negative weight subtracts the delta; NaN/inf are refused.
        #[arg(long, value_delimiter = ',', value_parser = finite_f32, allow_hyphen_values = true)]
        weights: Vec<f32>,
        /// Architecture of the adapters; `auto` detects it. It must match the base's.
        #[arg(long, value_enum, default_value = "auto")]
        arch: ArchArg,
        /// Fail when an adapter module finds no weight in the checkpoint.
        #[arg(long)]
        strict: bool,
        /// Replace an existing output of the same kind. A folder is swapped in whole and only
        /// when it holds nothing but what bake writes; other files are never touched.
        #[arg(long)]
        force: bool,
        /// Print the report as JSON (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Compute Facilitated Transport gates for prompts, once.
    ///
    /// For each membrane and prompt: the rate m = max over the membrane's
    /// concepts of the metric (clipcos: cosine of the CLIP hidden states;
    /// tokenuni: share of the concept's tokens in the prompt;
    /// clipcos_tokenuni: their max, SPM's default), and the strength to apply
    /// (m² by default, as SPM's code applies it; --curve linear for m).
    /// WebUI syntax is understood: <lora:…> tags and (weights:1.2) are
    /// removed, AND splits sub-prompts (a gate is their max).
    ///
    /// Without --text-encoder only tokenuni can be computed, and spm says so:
    /// that is the no-download default.
    #[command(verbatim_doc_comment)]
    Gate {
        /// Prompts to gate.
        #[arg(required = true)]
        prompts: Vec<String>,
        /// A membrane file (SPM or kohya-converted, with `prompts` metadata);
        /// repeat the flag for several.
        #[arg(long = "membrane", required = true)]
        membranes: Vec<PathBuf>,
        #[command(flatten)]
        encoder: EncoderArgs,
        #[command(flatten)]
        gate: GateArgs,
        /// Print the gates as JSON (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Generate images with membranes (Facilitated Transport as SPM's infer_spm.py).
    Generate(cli::generate::GenerateArgs),
    /// Train an eraser: SPM with Latent Anchoring, ESD or Forget-Me-Not.
    Train(Box<cli::train::TrainArgs>),
    /// Extract a LoRA from a fine-tuned checkpoint (ESD, Forget-Me-Not, …) by SVD.
    Extract(Box<cli::extract::ExtractArgs>),
    /// Run the local FT sidecar: an HTTP daemon the WebUI extension asks for gates.
    ///
    /// Binds to 127.0.0.1 by default. Endpoints: GET /healthz,
    /// GET /v1/membranes, POST /v1/gate {"prompts":[…], "membranes"?:[…],
    /// "metric"?, "curve"?, "facilitate"?, "normalize"?}, POST /v1/reload.
    /// Every error is JSON with a 4xx/5xx status. Stops cleanly on
    /// Ctrl-C / SIGTERM.
    #[command(verbatim_doc_comment)]
    Serve {
        /// Address to bind: an IP or a host name such as localhost. Anything but loopback is
        /// reachable from other machines: set --token then.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Port; 0 picks a free one (the address is printed when ready).
        #[arg(long, default_value_t = 7862)]
        port: u16,
        /// Folder of membrane files, scanned with its subfolders (names are file stems, as
        /// A1111 shows LoRAs); rescanned by POST /v1/reload. Must exist.
        #[arg(long)]
        membranes: Option<PathBuf>,
        #[command(flatten)]
        encoder: EncoderArgs,
        #[command(flatten)]
        gate: GateArgs,
        /// Require `Authorization: Bearer TOKEN` on /v1/* (also from SPM_TOKEN).
        #[arg(long, env = "SPM_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Largest request body accepted.
        #[arg(long, default_value_t = 65536)]
        max_body_bytes: usize,
        /// Most prompts in one /v1/gate request.
        #[arg(long, default_value_t = 64)]
        max_prompts: usize,
        /// Most sub-prompts (prompts and their AND parts) in one request; each costs a
        /// text-encoder pass.
        #[arg(long, default_value_t = 256)]
        max_subprompts: usize,
        /// Most tokens (before CLIP's 77-token cut) over all prompts of one request.
        #[arg(long, default_value_t = 32768)]
        max_tokens: usize,
        /// Time limit of one request, body and gate computation (abandoned work is cancelled).
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        /// Gate computations running at once (others wait up to the timeout).
        #[arg(long, default_value_t = 2)]
        concurrency: usize,
    },
}

#[derive(clap::Args)]
struct EncoderArgs {
    /// CLIP text encoder: a diffusers pipeline root or text_encoder/ folder,
    /// or an SD1/SD2 single-file .safetensors checkpoint. An SDXL pipeline
    /// root or single file loads both encoders: gates then compare the
    /// 77×2048 conditioning SDXL's UNet sees.
    #[arg(long)]
    text_encoder: Option<PathBuf>,
    /// Tokenizer pad id (default: from the model; 49407 SD1, 0 SD2).
    #[arg(long)]
    pad_id: Option<u32>,
    /// Single-file checkpoints: attention heads (default hidden/64).
    #[arg(long)]
    heads: Option<usize>,
    /// Override the MLP activation.
    #[arg(long, value_enum)]
    activation: Option<ActivationArg>,
    /// OpenCLIP (SD2) single files: residual blocks to run (default all but
    /// the last, SD2's penultimate-layer conditioning).
    #[arg(long)]
    openclip_layers: Option<usize>,
}

#[derive(Clone, Copy, ValueEnum)]
enum ActivationArg {
    QuickGelu,
    Gelu,
    GeluNew,
}

impl EncoderArgs {
    fn spec(&self) -> EngineSpec {
        EngineSpec {
            text_encoder: self.text_encoder.clone(),
            pad_id: self.pad_id,
            load: LoadOptions {
                heads: self.heads,
                activation: self.activation.map(|a| match a {
                    ActivationArg::QuickGelu => Activation::QuickGelu,
                    ActivationArg::Gelu => Activation::Gelu,
                    ActivationArg::GeluNew => Activation::GeluNew,
                }),
                openclip_layers: self.openclip_layers,
            },
        }
    }
}

#[derive(clap::Args)]
pub(crate) struct GateArgs {
    /// Score of a concept (default clipcos_tokenuni; tokenuni without an encoder).
    #[arg(long, value_enum)]
    metric: Option<Metric>,
    /// Strength from rate: reference (m², SPM's code) or linear (m).
    #[arg(long, value_enum, default_value = "reference")]
    curve: Curve,
    /// Multiply every rate by this factor ≥ 0 (SPM's --facilitate_factor).
    #[arg(long, default_value_t = 1.0, value_parser = facilitate_factor, allow_hyphen_values = true)]
    facilitate: f64,
    /// Prompt text as typed (reference), or folded first (strict): NFKC, zero-width
    /// characters and combining marks removed, confusable letters mapped to Latin, so that
    /// "pi\u{200b}ka\u{200b}chu" still gates like "pikachu".
    #[arg(long, value_enum, default_value = "reference")]
    normalize: Normalize,
}

impl GateArgs {
    pub(crate) fn options(&self, has_encoder: bool) -> GateOptions {
        let metric = self.metric.unwrap_or(if has_encoder {
            Metric::ClipcosTokenuni
        } else {
            Metric::Tokenuni
        });
        GateOptions {
            metric,
            curve: self.curve,
            facilitate: self.facilitate,
            normalize: self.normalize,
        }
    }
}

fn main() -> ExitCode {
    spm::pin_thread_count();
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SPM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal, never in a log file or pipe.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A finite number; spaces around it are fine ("1, 0.5").
fn finite<T: std::str::FromStr + Into<f64> + Copy>(s: &str) -> std::result::Result<T, String> {
    let s = s.trim();
    let v: T = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if v.into().is_finite() {
        Ok(v)
    } else {
        Err(format!("`{s}`: must be a finite number"))
    }
}

pub(crate) fn finite_f64(s: &str) -> std::result::Result<f64, String> {
    finite(s)
}

fn finite_f32(s: &str) -> std::result::Result<f32, String> {
    finite(s)
}

fn non_negative_f32(s: &str) -> std::result::Result<f32, String> {
    let v: f32 = finite(s)?;
    if v < 0.0 {
        return Err(format!(
            "`{}`: must be ≥ 0 (a membrane strength; under the reference curve -m acts as m)",
            s.trim()
        ));
    }
    Ok(v)
}

/// `--facilitate`: the engine's own rule.
fn facilitate_factor(s: &str) -> std::result::Result<f64, String> {
    spm::transport::gate::check_facilitate(finite(s)?)
}

fn weights_for(weights: &[f32], n: usize) -> Result<Vec<f32>> {
    match weights.len() {
        0 => Ok(vec![1.0; n]),
        k if k == n => Ok(weights.to_vec()),
        k => Err(Error::usage(format!(
            "--weights has {k} value(s) for {n} input(s)"
        ))),
    }
}

fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "spm".into())
}

fn write_file(
    out: &Path,
    metadata: &std::collections::BTreeMap<String, String>,
    tensors: &[(String, RawTensor)],
) -> Result<u64> {
    let mut f = AtomicFile::create(out)?;
    {
        let mut w = f.buffered();
        write_tensors(&mut w, metadata, tensors).map_err(|e| Error::io(out, e))?;
        std::io::Write::flush(&mut w).map_err(|e| Error::io(out, e))?;
    }
    f.commit()?;
    Ok(std::fs::metadata(out).map(|m| m.len()).unwrap_or(0))
}

fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Inspect { file, arch, json } => {
            let ad = match Adapter::load(&file, arch.get()) {
                Ok(ad) => ad,
                Err(e) => match inspect::inspect_partial(&file) {
                    Some(r) => {
                        if json {
                            println!("{}", serde_json::to_string_pretty(&r).expect("json"));
                        } else {
                            print!("{}", inspect::render_partial(&r));
                        }
                        return Ok(());
                    }
                    None => return Err(e),
                },
            };
            let report = inspect::inspect(&ad);
            if json {
                println!("{}", serde_json::to_string_pretty(&report).expect("json"));
            } else {
                print!("{}", inspect::render_text(&report));
            }
            Ok(())
        }
        Command::Convert {
            input,
            output,
            to,
            arch,
            dtype,
            strength,
            curve,
            allow_lossy,
            allow_unknown,
            peft_fold_alpha,
            force,
            json,
        } => {
            if peft_fold_alpha && to != Scheme::Peft {
                return Err(spm::Error::usage(
                    "--peft-fold-alpha applies to --to peft only",
                ));
            }
            check_output(&output, &[&input], OutputKind::File, force)?;
            let ad = Adapter::load(&input, arch.get())?;
            info!(
                arch = ad.arch.name(),
                modules = ad.modules.len(),
                "loaded {}",
                input.display()
            );
            let opts = ConvertOptions {
                to,
                dtype: dtype.get(),
                strength,
                curve,
                allow_lossy,
                allow_unknown,
                title: stem(&output),
                peft_fold_alpha,
            };
            let r = convert::convert(&ad, &opts)?;
            let size = write_file(&output, &r.metadata, &r.tensors)?;
            if json {
                let v = json!({
                    "input": input, "output": output, "from": ad.scheme.map(|s| s.name()), "to": to.name(),
                    "arch": ad.arch.name(), "modules": ad.modules.len(), "tensors": r.tensors.len(),
                    "bytes": size, "lossy": r.lossy, "concepts": ad.concepts(),
                });
                println!("{}", serde_json::to_string_pretty(&v).expect("json"));
            } else {
                println!(
                    "{} ({}, {}) -> {} ({}): {} modules, {} tensors, {} bytes",
                    input.display(),
                    ad.scheme.map(|s| s.name()).unwrap_or("?"),
                    ad.arch.name(),
                    output.display(),
                    to.name(),
                    ad.modules.len(),
                    r.tensors.len(),
                    size
                );
                if !r.lossy.is_empty() {
                    println!(
                        "  lossy: {} item(s) dropped or approximated (listed with -v or --json)",
                        r.lossy.len()
                    );
                    for l in &r.lossy {
                        info!("lossy: {l}");
                    }
                }
            }
            Ok(())
        }
        Command::Merge {
            inputs,
            output,
            weights,
            to,
            arch,
            dtype,
            force,
            json,
        } => {
            if inputs.len() < 2 {
                return Err(Error::usage(
                    "merge needs two or more inputs; to rename, cast or scale one file use `spm convert`",
                ));
            }
            let refs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
            check_output(&output, &refs, OutputKind::File, force)?;
            let weights = weights_for(&weights, inputs.len())?;
            let adapters = inputs
                .iter()
                .map(|p| Adapter::load(p, arch.get()))
                .collect::<Result<Vec<_>>>()?;
            let parts: Vec<merge::Part> = adapters
                .iter()
                .zip(&weights)
                .map(|(a, w)| merge::Part {
                    adapter: a,
                    weight: *w,
                })
                .collect();
            let merged = merge::merge(&parts, dtype.get())?;
            let opts = ConvertOptions {
                to,
                dtype: None,
                strength: None,
                curve: Curve::Reference,
                allow_lossy: false,
                allow_unknown: false,
                title: stem(&output),
                peft_fold_alpha: false,
            };
            let r = convert::render(
                adapters[0].arch,
                &merged.modules,
                &merged.metadata,
                &[],
                &opts,
            )?;
            let size = write_file(&output, &r.metadata, &r.tensors)?;
            let rank = merged
                .modules
                .iter()
                .filter_map(|m| m.rank())
                .max()
                .unwrap_or(0);
            if json {
                let v = json!({
                    "inputs": inputs, "weights": weights, "output": output, "to": to.name(),
                    "arch": adapters[0].arch.name(), "modules": merged.modules.len(), "max_rank": rank,
                    "bytes": size, "concepts": spm::adapter::concepts_of(&r.metadata),
                });
                println!("{}", serde_json::to_string_pretty(&v).expect("json"));
            } else {
                println!(
                    "merged {} inputs -> {} ({}, {}): {} modules, rank up to {}, {} bytes",
                    inputs.len(),
                    output.display(),
                    to.name(),
                    adapters[0].arch.name(),
                    merged.modules.len(),
                    rank,
                    size
                );
            }
            Ok(())
        }
        Command::Bake {
            base,
            inputs,
            output,
            weights,
            arch,
            strict,
            force,
            json,
        } => {
            let mut refs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
            refs.push(&base);
            let kind = if base.is_dir() {
                OutputKind::Folder
            } else {
                OutputKind::File
            };
            check_output(&output, &refs, kind, force)?;
            let weights = weights_for(&weights, inputs.len())?;
            let adapters = inputs
                .iter()
                .map(|p| Adapter::load(p, arch.get()))
                .collect::<Result<Vec<_>>>()?;
            let ins: Vec<bake::Input> = adapters
                .iter()
                .zip(&weights)
                .map(|(a, w)| bake::Input {
                    adapter: a,
                    weight: *w,
                })
                .collect();
            let progress = !json && std::io::IsTerminal::is_terminal(&std::io::stderr());
            let report: BakeReport = bake::bake(&base, &ins, &output, progress, strict)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report).expect("json"));
            } else {
                println!(
                    "baked {} adapter(s) into {} ({}): {} modules applied, {}/{} tensors changed, {} bytes",
                    inputs.len(),
                    output.display(),
                    report.layout,
                    report.modules_applied,
                    report.tensors_modified,
                    report.tensors,
                    report.bytes_written
                );
                if !report.unmatched.is_empty() {
                    println!("  {} module(s) found no target:", report.unmatched.len());
                    for u in &report.unmatched {
                        println!("    {u}");
                    }
                }
            }
            Ok(())
        }
        Command::Gate {
            prompts,
            membranes,
            encoder,
            gate,
            json,
        } => {
            let (mut engine, info) = build_engine(&encoder.spec())?;
            if info.is_none() {
                eprintln!("note: no --text-encoder: computing tokenuni only (clipcos needs a CLIP text encoder)");
            }
            let opts = gate.options(info.is_some());
            let list = membranes
                .iter()
                .map(|p| Membrane::from_file(p))
                .collect::<Result<Vec<_>>>()?;
            engine.set_membranes(list)?;
            let mut results = Vec::new();
            for p in &prompts {
                let gates = engine.gate(p, None, &opts)?;
                results.push((p.clone(), gates));
            }
            if json {
                let v: Vec<_> = results
                    .iter()
                    .map(|(p, g)| json!({"prompt": p, "gates": g.iter().cloned().collect::<std::collections::BTreeMap<_, _>>()}))
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({"metric": opts.metric, "curve": opts.curve, "encoder": info, "results": v}))
                        .expect("json")
                );
            } else {
                for (p, gates) in &results {
                    println!("{p}");
                    for (name, g) in gates {
                        let cos = g.clipcos.map_or("-".to_string(), |c| format!("{c:.4}"));
                        println!(
                            "  {name:<24} rate {:.4}  strength {:.4}  clipcos {cos}  tokenuni {:.4}",
                            g.rate, g.strength, g.tokenuni
                        );
                    }
                }
            }
            Ok(())
        }
        Command::Generate(args) => cli::generate::run(args),
        Command::Train(args) => cli::train::run(*args),
        Command::Extract(args) => cli::extract::run(*args),
        Command::Serve {
            host,
            port,
            membranes,
            encoder,
            gate,
            token,
            max_body_bytes,
            max_prompts,
            max_subprompts,
            max_tokens,
            timeout_ms,
            concurrency,
        } => {
            let addr = resolve_host(&host, port)?;
            if let Some(dir) = &membranes {
                daemon::check_membranes_dir(dir)?;
            }
            let (mut engine, info) = build_engine(&encoder.spec())?;
            let (good, bad) = match &membranes {
                Some(dir) => daemon::scan_membranes(dir),
                None => (Vec::new(), Vec::new()),
            };
            engine.set_membranes(good)?;
            let n = engine.membranes().count();
            let cfg = ServeConfig {
                addr,
                membranes_dir: membranes,
                token,
                max_body_bytes,
                max_prompts,
                max_subprompts,
                max_tokens,
                timeout: std::time::Duration::from_millis(timeout_ms),
                concurrency,
                defaults: gate.options(info.is_some()),
            };
            let enc = info
                .as_ref()
                .map_or("none (tokenuni only)".to_string(), |i| i.layout.clone());
            let skipped = bad.len();
            daemon::run(engine, bad, info, cfg, |addr| {
                println!("spm serve: listening on http://{addr} ({n} membranes, {skipped} skipped, encoder: {enc})");
                let _ = std::io::Write::flush(&mut std::io::stdout());
            })
        }
    }
}

/// `--host`: an IP address, or a name resolved by the system (`localhost`).
/// A name with a loopback address among its answers binds that one, so
/// `localhost` stays loopback even where it also resolves elsewhere.
fn resolve_host(host: &str, port: u16) -> Result<std::net::SocketAddr> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(std::net::SocketAddr::new(ip, port));
    }
    let addrs: Vec<std::net::SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .map_err(|e| Error::usage(format!("--host {host}: cannot resolve: {e}")))?
        .collect();
    addrs
        .iter()
        .find(|a| a.ip().is_loopback() && a.is_ipv4())
        .or_else(|| addrs.iter().find(|a| a.ip().is_loopback()))
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| Error::usage(format!("--host {host}: resolves to no address")))
}
