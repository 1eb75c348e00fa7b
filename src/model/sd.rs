//! A Stable Diffusion 1.x/2.x/XL model as one value: UNet (with the adapters
//! it was asked to carry), VAE, CLIP text encoder(s), tokenizer(s) and the
//! scheduler config, loaded from a diffusers folder or an LDM/SGM single
//! file.
//!
//! `spm generate` and the trainer both start here, so there is one way to
//! read a checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::clip::{self, ClipTextModel, LoadOptions};
use super::load::{self, Store};
use super::nn::{AdapterSet, Builder, Factor, Rows, Trainables};
use super::scheduler::SchedulerConfig;
use super::unet::{Added, Cond, UNet, UNetConfig};
use super::vae::{Vae, VaeConfig};
use crate::adapter::Adapter;
use crate::error::{Error, Result};
use crate::schemes::{Arch, Component};
use crate::transport::tokenizer::ClipTokenizer;
use crate::transport::{check_vocab, encoder_folder, single_file_tokenizer};

/// How to load.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// A diffusers pipeline folder or an LDM `.safetensors`/`.ckpt`.
    pub model: PathBuf,
    /// A diffusers folder whose configs describe a single-file checkpoint
    /// (as diffusers' `from_single_file(config=…)`); built-in SD1/SD2
    /// configs otherwise.
    pub config: Option<PathBuf>,
    pub device: Device,
    pub dtype: DType,
    /// Load the VAE encoder too (the trainer's `--images`).
    pub vae_encoder: bool,
    /// `epsilon` or `v_prediction`, overriding the model's own.
    pub prediction_type: Option<String>,
    /// What a trainer makes trainable. The UNet built with them is
    /// [`StableDiffusion::trained`]; `unet` stays the frozen base.
    pub train: Option<Arc<Trainables>>,
}

/// What was loaded, for reports and infotext.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub path: PathBuf,
    /// `diffusers` or `ldm`.
    pub layout: &'static str,
    /// SD1 / SD2 when the cross-attention width says so (768 / 1024).
    pub arch: Option<&'static str>,
    pub prediction_type: String,
    /// How the prediction type was decided.
    pub prediction_source: String,
    /// The name A1111 would show (`Model:` in infotext).
    pub name: String,
}

/// SDXL's second text encoder (OpenCLIP ViT-bigG with its projection) and
/// what goes with it.
pub struct XlText {
    pub text: Arc<ClipTextModel>,
    pub tokenizer: Arc<ClipTokenizer>,
    pub pad_id: u32,
    /// `force_zeros_for_empty_prompt` (model_index.json; true for SDXL base
    /// and for single files, as A1111 does): an empty negative prompt is
    /// all-zero conditioning, text and pooled, instead of the encoding of "".
    pub zero_empty_negative: bool,
}

/// A loaded model.
pub struct StableDiffusion {
    pub unet: UNet,
    /// The UNet with [`LoadSpec::train`]'s variables, when asked for.
    pub trained: Option<UNet>,
    pub vae: Vae,
    pub text: Arc<ClipTextModel>,
    pub tokenizer: Arc<ClipTokenizer>,
    pub pad_id: u32,
    /// SDXL's second encoder (None for SD1/SD2).
    pub xl: Option<XlText>,
    /// `scheduler_config.json` (prediction type already settled).
    pub scheduler: SchedulerConfig,
    pub info: ModelInfo,
    pub device: Device,
    pub dtype: DType,
}

/// SDXL 1.0 base's `scheduler/scheduler_config.json` (for single files).
const SDXL_SCHEDULER: &str = r#"{"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
  "timestep_spacing": "leading", "interpolation_type": "linear", "use_karras_sigmas": false,
  "prediction_type": "epsilon"}"#;

const SD_SCHEDULER: &str = r#"{"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": false,
  "skip_prk_steps": true, "steps_offset": 1, "clip_sample": false, "prediction_type": "epsilon"}"#;

fn map_candle<'a>(path: &'a Path, what: &str) -> impl Fn(candle_core::Error) -> Error + 'a {
    let what = what.to_string();
    move |e| Error::file(path, format!("{what}: {}", super::nn::error_message(&e)))
}

/// Adapters as the UNet's layers take them: slot k = `adapters[k]`.
/// Only plain LoRA factors (every naming scheme `spm` reads); text-encoder
/// modules are counted and returned so the caller can say they are unused.
pub fn adapter_set(
    adapters: &[Adapter],
    dtype: DType,
    device: &Device,
) -> Result<(AdapterSet, usize)> {
    let mut by_path: HashMap<String, Vec<Factor>> = HashMap::new();
    let mut te = 0;
    for (slot, ad) in adapters.iter().enumerate() {
        ad.ensure_plain("apply")?;
        let inv = ad.inventory();
        let from: Arc<str> = ad.path.display().to_string().into();
        for m in &ad.modules {
            let spec = &inv.modules[m.index];
            if spec.component != Component::Unet {
                te += 1;
                continue;
            }
            let (down, up) = (
                m.down.as_ref().expect("plain"),
                m.up.as_ref().expect("plain"),
            );
            let t = |r: &crate::io::tensor::RawTensor, which: &str| -> Result<Tensor> {
                let v = r.to_f32().ok_or_else(|| {
                    Error::key(
                        &ad.path,
                        format!("{}.{which}", spec.path),
                        "not a float tensor",
                    )
                })?;
                if v.iter().any(|x| !x.is_finite()) {
                    return Err(Error::key(
                        &ad.path,
                        format!("{} ({which})", inv.flat_name(m.index, false)),
                        "holds NaN or infinite values",
                    ));
                }
                Tensor::from_vec(v, r.shape.clone(), &Device::Cpu)
                    .and_then(|t| t.to_dtype(dtype))
                    .and_then(|t| t.to_device(device))
                    .map_err(|e| Error::key(&ad.path, &spec.path, e.to_string()))
            };
            let scale = m.scale().ok_or_else(|| {
                Error::key(
                    &ad.path,
                    inv.flat_name(m.index, false),
                    "no usable alpha/rank",
                )
            })?;
            by_path.entry(spec.path.clone()).or_default().push(Factor {
                down: t(down, "down")?,
                up: t(up, "up")?,
                scale,
                slot,
                from: from.clone(),
            });
        }
    }
    Ok((AdapterSet::new(by_path), te))
}

impl StableDiffusion {
    pub fn load(spec: &LoadSpec, adapters: Arc<AdapterSet>) -> Result<Self> {
        let path = &spec.model;
        if !path.exists() {
            return Err(Error::file(path, "No such file or folder"));
        }
        let mut sd = if path.is_dir() {
            Self::load_diffusers(spec, adapters.clone())?
        } else {
            Self::load_single(spec, adapters.clone())?
        };
        let unused = adapters.unused();
        if !unused.is_empty() {
            return Err(Error::usage(format!(
                "{} adapter module(s) match no layer of this UNet (first: {}); is the adapter for another architecture?",
                unused.len(),
                unused[0]
            )));
        }
        if let Some(p) = &spec.prediction_type {
            sd.scheduler.prediction_type = Some(p.clone());
            sd.info.prediction_type = p.clone();
            sd.info.prediction_source = "--prediction-type".into();
        }
        Ok(sd)
    }

    fn load_diffusers(spec: &LoadSpec, adapters: Arc<AdapterSet>) -> Result<Self> {
        let root = &spec.model;
        let index = root.join("model_index.json");
        if !index.is_file() {
            return Err(Error::file(
                root,
                "not a diffusers pipeline folder (no model_index.json)",
            ));
        }
        let idx: serde_json::Value = load::read_config(&index)?;
        let is_xl = idx.get("text_encoder_2").is_some() || root.join("text_encoder_2").is_dir();
        let unet_dir = root.join("unet");
        let unet_cfg: UNetConfig = load::read_config(&unet_dir.join("config.json"))?;
        let unet_files = load::component_files(&unet_dir, "diffusion_pytorch_model")?;
        let store = Store::from_files(&unet_files, |k| Some(k.to_string()))?;
        if is_xl != unet_cfg.addition_embed_type.is_some() {
            return Err(Error::file(
                &unet_dir.join("config.json"),
                if is_xl {
                    "an SDXL pipeline (text_encoder_2) whose UNet has no addition_embed_type"
                } else {
                    "a UNet with addition_embed_type (SDXL) in a pipeline without text_encoder_2"
                },
            ));
        }
        let (unet, trained) = build_unet(store, unet_cfg, spec, adapters, &unet_dir)?;

        let vae_dir = root.join("vae");
        let vae_cfg: VaeConfig = load::read_config(&vae_dir.join("config.json"))?;
        let vae_files = load::component_files(&vae_dir, "diffusion_pytorch_model")?;
        let store = Store::from_files(&vae_files, |k| Some(k.to_string()))?;
        let vae = build_vae(store, vae_cfg, spec, &vae_dir)?;

        let no = LoadOptions::default();
        let (text, _, tokenizer, pad_id) =
            encoder_folder(root, "text_encoder", "tokenizer", &no, false)?;
        let xl = if is_xl {
            let (text2, _, tokenizer, pad_id) =
                encoder_folder(root, "text_encoder_2", "tokenizer_2", &no, true)?;
            check_xl(&unet.config, &text, &text2, root)?;
            Some(XlText {
                text: Arc::new(text2),
                tokenizer: Arc::new(tokenizer),
                pad_id,
                zero_empty_negative: zeroes_empty_negative(Some(&idx)),
            })
        } else {
            None
        };
        let sched_path = root.join("scheduler/scheduler_config.json");
        let scheduler = SchedulerConfig::load(&sched_path)?;
        let prediction = scheduler
            .prediction_type
            .clone()
            .unwrap_or_else(|| "epsilon".into());
        let info = ModelInfo {
            path: root.clone(),
            layout: "diffusers",
            arch: if is_xl {
                Some(Arch::Sdxl.name())
            } else {
                arch_of(unet.config.context_dim()).map(Arch::name)
            },
            prediction_type: prediction,
            prediction_source: "scheduler/scheduler_config.json".into(),
            name: model_name(root),
        };
        Ok(StableDiffusion {
            unet,
            trained,
            vae,
            text: Arc::new(text),
            tokenizer: Arc::new(tokenizer),
            pad_id,
            xl,
            scheduler,
            info,
            device: spec.device.clone(),
            dtype: spec.dtype,
        })
    }

    fn load_single(spec: &LoadSpec, adapters: Arc<AdapterSet>) -> Result<Self> {
        let path = &spec.model;
        let cfg_dir = spec.config.as_deref();
        // Read once: a `.ckpt` pickle is parsed here and nowhere again.
        let all = load::Tensors::read(std::slice::from_ref(path))?;
        let raw = all.store(|k| {
            (k.starts_with("model.diffusion_model.") || k == "v_pred").then(|| k.to_string())
        });
        if raw.is_empty() {
            return Err(Error::file(
                path,
                "not a Stable Diffusion checkpoint (no model.diffusion_model.* keys)",
            ));
        }
        // SGM (SDXL) files keep both text encoders under `conditioner.`.
        let is_xl = !all
            .store(|k| {
                k.starts_with("conditioner.embedders.")
                    .then(|| k.to_string())
            })
            .is_empty();
        let ctx_key = if is_xl {
            "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
        } else {
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        };
        let ctx_dim = raw.shape(ctx_key).map(|s| s[s.len() - 1]);
        if let Some(d) = cfg_dir {
            if !d.join("model_index.json").is_file() {
                return Err(Error::file(
                    d,
                    "--config must be a diffusers pipeline folder (no model_index.json)",
                ));
            }
        }
        let arch = ctx_dim.and_then(arch_of);
        let unet_cfg: UNetConfig = match cfg_dir {
            Some(d) => load::read_config(&d.join("unet/config.json"))?,
            None => match arch {
                Some(Arch::Sd1) if !is_xl => UNetConfig::v1_5(),
                Some(Arch::Sd2) if !is_xl => UNetConfig::v2_1(),
                Some(Arch::Sdxl) if is_xl => UNetConfig::xl_base(),
                _ => {
                    return Err(Error::key(
                        path,
                        ctx_key,
                        format!(
                            "cross-attention width {ctx_dim:?} is not SD1's 768, SD2's 1024 or SDXL's 2048 (for this layout); pass --config with the model's diffusers configs"
                        ),
                    ))
                }
            },
        };
        if is_xl != unet_cfg.addition_embed_type.is_some() {
            return Err(Error::file(
                path,
                if is_xl {
                    "an SDXL checkpoint (conditioner.embedders.*) but --config's UNet has no addition_embed_type"
                } else {
                    "--config describes an SDXL UNet but the checkpoint has no conditioner.embedders.*"
                },
            ));
        }
        unet_cfg
            .check()
            .map_err(|m| Error::file(path, format!("UNet config: {m}")))?;
        let layers = unet_cfg
            .layers()
            .map_err(|m| Error::file(path, format!("UNet config: {m}")))?;
        let down: Vec<bool> = unet_cfg
            .down_block_types
            .iter()
            .map(|t| t.starts_with("CrossAttn"))
            .collect();
        let up: Vec<bool> = unet_cfg
            .up_block_types
            .iter()
            .map(|t| t.starts_with("CrossAttn"))
            .collect();
        let rename = load::ldm_unet_renamer(load::ldm_unet_prefixes(&layers, &down, &up));
        let has_v_key = raw.contains("v_pred");
        let (unet, trained) = build_unet(all.store(rename), unet_cfg, spec, adapters, path)?;

        let vae_cfg: VaeConfig = match cfg_dir {
            Some(d) => load::read_config(&d.join("vae/config.json"))?,
            None if is_xl => VaeConfig::sdxl(),
            None => VaeConfig::sd(),
        };
        let store = all.store(load::ldm_vae_renamer(vae_cfg.block_out_channels.len()));
        if store.is_empty() {
            return Err(Error::file(
                path,
                "no VAE in this checkpoint (no first_stage_model.* keys)",
            ));
        }
        let vae = build_vae(store, vae_cfg, spec, path)?;

        let te_opts = |folder: &str| -> Result<LoadOptions> {
            let mut opts = LoadOptions::default();
            if let Some(d) = cfg_dir {
                let c: clip::ClipTextConfig =
                    load::read_config(&d.join(folder).join("config.json"))?;
                opts.heads = Some(c.num_attention_heads);
                opts.activation = Some(c.hidden_act);
            }
            Ok(opts)
        };
        // The text side: SDXL's two encoders, or SD1/SD2's one.
        let pairs = all.pairs();
        let (text, tokenizer, pad_id, xl) = if is_xl {
            let [(te1, _), (te2, _)] = clip::load_single_xl(
                path,
                &pairs,
                [&te_opts("text_encoder")?, &te_opts("text_encoder_2")?],
            )?;
            check_xl(&unet.config, &te1, &te2, path)?;
            let (tok1, pad1) = single_file_tokenizer(cfg_dir, "tokenizer", false)?;
            let (tok2, pad2) = single_file_tokenizer(cfg_dir, "tokenizer_2", true)?;
            check_vocab(&te2, &tok2, pad2, path)?;
            let index = match cfg_dir {
                Some(d) => Some(load::read_config::<serde_json::Value>(
                    &d.join("model_index.json"),
                )?),
                None => None,
            };
            let xl = XlText {
                text: Arc::new(te2),
                tokenizer: Arc::new(tok2),
                pad_id: pad2,
                zero_empty_negative: zeroes_empty_negative(index.as_ref()),
            };
            (te1, tok1, pad1, Some(xl))
        } else {
            let (text, te_info) = clip::load_single(path, &pairs, &te_opts("text_encoder")?)?;
            let openclip = te_info.layout.contains("OpenCLIP");
            let (tokenizer, pad_id) = single_file_tokenizer(cfg_dir, "tokenizer", openclip)?;
            (text, tokenizer, pad_id, None)
        };
        drop(pairs);
        check_vocab(&text, &tokenizer, pad_id, path)?;
        let mut scheduler = match cfg_dir {
            Some(d) => SchedulerConfig::load(&d.join("scheduler/scheduler_config.json"))?,
            None if is_xl => SchedulerConfig::from_json(SDXL_SCHEDULER)?,
            None => SchedulerConfig::from_json(SD_SCHEDULER)?,
        };
        let (prediction, source) = if has_v_key {
            (
                "v_prediction".to_string(),
                "the checkpoint's `v_pred` key".to_string(),
            )
        } else if cfg_dir.is_some() {
            (
                scheduler
                    .prediction_type
                    .clone()
                    .unwrap_or_else(|| "epsilon".into()),
                "--config scheduler/scheduler_config.json".to_string(),
            )
        } else if arch == Some(Arch::Sd2) {
            let v = is_v_model(&unet, spec).map_err(map_candle(path, "v-prediction probe"))?;
            (
                if v { "v_prediction" } else { "epsilon" }.to_string(),
                "A1111's probe: mean(UNet(0.5, t=999) − 0.5) < −1 means v".to_string(),
            )
        } else {
            let default = if is_xl { "SDXL default" } else { "SD1 default" };
            ("epsilon".to_string(), default.to_string())
        };
        scheduler.prediction_type = Some(prediction.clone());
        if cfg_dir.is_none() && !is_xl && prediction == "v_prediction" {
            // SD2-768's own scheduler (stabilityai/stable-diffusion-2-1).
            scheduler.class_name = Some("DDIMScheduler".into());
        }
        Ok(StableDiffusion {
            unet,
            trained,
            vae,
            text: Arc::new(text),
            tokenizer: Arc::new(tokenizer),
            pad_id,
            xl,
            scheduler,
            info: ModelInfo {
                path: path.clone(),
                layout: if is_xl { "sgm" } else { "ldm" },
                arch: if is_xl {
                    Some(Arch::Sdxl.name())
                } else {
                    arch.map(Arch::name)
                },
                prediction_type: prediction,
                prediction_source: source,
                name: model_name(path),
            },
            device: spec.device.clone(),
            dtype: spec.dtype,
        })
    }

    /// Token ids of `text`, padded to 77 with this model's pad id.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        self.tokenizer.encode_padded(text, 77, self.pad_id)
    }

    /// Conditioning `[N, 77, D]` for texts, with A1111's clip skip. SDXL:
    /// both encoders' `hidden_states[-(skip + 1)]` side by side (D = 2048),
    /// as diffusers' `encode_prompt` and SGM's conditioner build it.
    pub fn encode(&self, texts: &[&str], clip_skip: usize) -> Result<Tensor> {
        let run = || -> candle_core::Result<Tensor> {
            let ids1 = padded_ids(&self.tokenizer, self.pad_id, texts)?;
            let h = match &self.xl {
                None => self.text.forward_skip(&ids1, clip_skip)?,
                Some(xl) => {
                    let ids2 = padded_ids(&xl.tokenizer, xl.pad_id, texts)?;
                    Tensor::cat(
                        &[
                            self.text.forward_hidden(&ids1, clip_skip)?,
                            xl.text.forward_hidden(&ids2, clip_skip)?,
                        ],
                        2,
                    )?
                }
            };
            h.to_dtype(self.dtype)?.to_device(&self.device)
        };
        run().map_err(|e| Error::usage(format!("text encoder failed: {e}")))
    }

    /// The whole conditioning of texts at image size `(h, w)`: the context
    /// and, for SDXL, the second encoder's pooled projection (from the same
    /// pass as its hidden state) with the size ids — original = target = the
    /// image size, crop (0, 0), the defaults of diffusers' pipeline and A1111.
    pub fn conditions(
        &self,
        texts: &[&str],
        clip_skip: usize,
        size: (usize, usize),
    ) -> Result<Cond> {
        let Some(xl) = &self.xl else {
            return Ok(Cond::text(self.encode(texts, clip_skip)?));
        };
        let run = || -> candle_core::Result<Cond> {
            let ids1 = padded_ids(&self.tokenizer, self.pad_id, texts)?;
            let ids2 = padded_ids(&xl.tokenizer, xl.pad_id, texts)?;
            let a = self.text.forward_hidden(&ids1, clip_skip)?;
            let (b, pooled) = xl.text.forward_hidden_pooled(&ids2, clip_skip)?;
            let on = |t: Tensor| t.to_dtype(self.dtype)?.to_device(&self.device);
            Ok(Cond {
                ctx: on(Tensor::cat(&[a, b], 2)?)?,
                added: Some(Added {
                    text_embeds: on(pooled)?,
                    time_ids: self.time_ids(texts.len(), size)?,
                }),
            })
        };
        run().map_err(|e| Error::usage(format!("text encoder failed: {e}")))
    }

    /// One text's whole conditioning `[1, …]` at image size `(h, w)`
    /// (the trainer's; clip skip 1, as every reference trains).
    pub fn condition(&self, text: &str, size: (usize, usize)) -> Result<Cond> {
        self.conditions(&[text], 1, size)
    }

    /// `[n, 6]` size ids: (h, w) original, (0, 0) crop, (h, w) target.
    pub fn time_ids(&self, n: usize, (h, w): (usize, usize)) -> candle_core::Result<Tensor> {
        let (h, w) = (h as f32, w as f32);
        let row = [h, w, 0.0, 0.0, h, w];
        Tensor::from_vec(row.repeat(n), (n, 6), &self.device)
    }

    /// Whether `negative` is encoded as zeros (SDXL's
    /// `force_zeros_for_empty_prompt`: an empty negative prompt).
    pub fn zeroes_negative(&self, negative: &str) -> bool {
        negative.is_empty() && self.xl.as_ref().is_some_and(|x| x.zero_empty_negative)
    }
}

/// Token ids `[N, 77]` of texts, padded with `pad`.
fn padded_ids(tok: &ClipTokenizer, pad: u32, texts: &[&str]) -> candle_core::Result<Tensor> {
    let rows: Vec<u32> = texts
        .iter()
        .flat_map(|t| tok.encode_padded(t, 77, pad))
        .collect();
    Tensor::from_vec(rows, (texts.len(), 77), &Device::Cpu)
}

/// Whether `path` is an SDXL model (a pipeline with `text_encoder_2`, or a
/// single file with SGM's `conditioner.embedders`), from names alone —
/// before anything is loaded (the trainer picks SDXL's module rules with
/// it). False when the path cannot be read; loading then says why.
pub fn is_xl_model(path: &Path) -> bool {
    if path.is_dir() {
        return path.join("text_encoder_2").is_dir();
    }
    crate::io::lazy::list(path)
        .map(|ts| {
            ts.iter()
                .any(|t| t.key.starts_with("conditioner.embedders."))
        })
        .unwrap_or(false)
}

fn arch_of(ctx_dim: usize) -> Option<Arch> {
    match ctx_dim {
        768 => Some(Arch::Sd1),
        1024 => Some(Arch::Sd2),
        2048 => Some(Arch::Sdxl),
        _ => None,
    }
}

/// `force_zeros_for_empty_prompt` of a pipeline's `model_index.json`
/// (true when absent or without an index, as SDXL base and A1111 do).
fn zeroes_empty_negative(index: Option<&serde_json::Value>) -> bool {
    index
        .and_then(|i| i.get("force_zeros_for_empty_prompt"))
        .and_then(|v| v.as_bool())
        .unwrap_or(true)
}

/// SDXL's widths must fit together: both encoders' hidden sizes make the
/// UNet's cross-attention width, and the pooled projection plus six size
/// embeddings make `add_embedding`'s input.
fn check_xl(
    unet: &UNetConfig,
    te1: &ClipTextModel,
    te2: &ClipTextModel,
    origin: &Path,
) -> Result<()> {
    let ctx = te1.config.hidden_size + te2.config.hidden_size;
    if ctx != unet.context_dim() {
        return Err(Error::file(
            origin,
            format!(
                "the text encoders' widths {} + {} do not make the UNet's cross_attention_dim {}",
                te1.config.hidden_size,
                te2.config.hidden_size,
                unet.context_dim()
            ),
        ));
    }
    let Some(p) = te2.projection_dim() else {
        return Err(Error::file(
            origin,
            "the second text encoder has no text_projection (needed for SDXL's pooled embedding)",
        ));
    };
    let want = p + 6 * unet.addition_time_embed_dim.unwrap_or(0);
    if Some(want) != unet.projection_class_embeddings_input_dim {
        return Err(Error::file(
            origin,
            format!(
                "pooled width {p} + 6 × addition_time_embed_dim = {want}, but the UNet's projection_class_embeddings_input_dim is {:?}",
                unet.projection_class_embeddings_input_dim
            ),
        ));
    }
    Ok(())
}

fn model_name(path: &Path) -> String {
    path.file_stem()
        .or_else(|| path.file_name())
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default()
}

fn build_unet(
    store: Store,
    cfg: UNetConfig,
    spec: &LoadSpec,
    adapters: Arc<AdapterSet>,
    origin: &Path,
) -> Result<(UNet, Option<UNet>)> {
    if store.is_empty() {
        return Err(Error::file(origin, "no UNet weights found"));
    }
    // Full weights need a second UNet (the frozen base keeps the original
    // values); LoRA factors alone live in the one UNet, off by `Rows`.
    let trained = match &spec.train {
        Some(t) if t.has_full() => {
            let vb = store.clone().var_builder(spec.dtype, &spec.device);
            let b = Builder::new(vb, Arc::new(AdapterSet::default())).with_trainables(t.clone());
            Some(UNet::new(b, cfg.clone()).map_err(map_candle(origin, "UNet"))?)
        }
        _ => None,
    };
    let vb = store.var_builder(spec.dtype, &spec.device);
    let mut b = Builder::new(vb, adapters);
    if let Some(t) = spec.train.as_ref().filter(|t| !t.has_full()) {
        b = b.with_trainables(t.clone());
    }
    let unet = UNet::new(b, cfg).map_err(map_candle(origin, "UNet"))?;
    Ok((unet, trained))
}

fn build_vae(store: Store, cfg: VaeConfig, spec: &LoadSpec, origin: &Path) -> Result<Vae> {
    let dtype = if cfg.force_upcast && spec.dtype == DType::F16 {
        DType::F32
    } else {
        spec.dtype
    };
    let vb = store.var_builder(dtype, &spec.device);
    Vae::new(
        Builder::new(vb, Arc::new(AdapterSet::default())),
        cfg,
        spec.vae_encoder,
    )
    .map_err(map_candle(origin, "VAE"))
}

/// A1111's way to tell an SD2 v-model from an ε-model when nothing in the
/// file says: on a constant input at t = 999, a v-model's output sits far
/// below the input (mean difference < −1).
fn is_v_model(unet: &UNet, spec: &LoadSpec) -> candle_core::Result<bool> {
    let dev = &spec.device;
    let x = (Tensor::ones((1, 4, 8, 8), spec.dtype, dev)? * 0.5)?;
    let ctx_dim = unet.config.context_dim();
    let ctx = (Tensor::ones((1, 2, ctx_dim), spec.dtype, dev)? * 0.5)?;
    let t = Tensor::new(&[999f32], dev)?;
    let out = unet.forward(&x, &t, &ctx, &Rows::none())?;
    let d = (out - &x)?
        .to_dtype(DType::F32)?
        .mean_all()?
        .to_scalar::<f32>()?;
    Ok(d < -1.0)
}
