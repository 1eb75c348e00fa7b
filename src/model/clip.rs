//! The CLIP text transformer, in candle, returning `last_hidden_state`
//! (after the final layer norm) — the embedding SPM's Facilitated Transport
//! compares prompts with (spm-reference.md §3.1) and the UNet is
//! conditioned on (with A1111's clip skip where asked).
//!
//! Written here rather than taken from candle-transformers because FT needs
//! every activation HF configs name (`quick_gelu` for OpenAI CLIP, exact
//! `gelu` for OpenCLIP, which candle-transformers approximates with tanh),
//! and because weights come from three layouts: a diffusers `text_encoder/`
//! folder, an A1111 SD1 single file and SD2's OpenCLIP single file with a
//! fused `in_proj`. Only the text-encoder tensors are read, from a memory map.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::io::safetensors::SafetensorsFile;
use crate::io::tensor::RawTensor;

/// The activation of the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// OpenAI CLIP (SD1, SDXL text encoder 1): x·σ(1.702x).
    QuickGelu,
    /// Exact (erf) GELU: OpenCLIP (SD2, SDXL text encoder 2).
    Gelu,
    /// tanh-approximated GELU (`gelu_new` in transformers).
    GeluNew,
}

/// The sizes a `config.json` of a `CLIPTextModel` gives.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Pad token of the tokenizer that goes with this model, if the config says.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// transformers pools at the first `eos_token_id`, or — for configs
    /// that still say 2, as SDXL's do — at the highest id (the EOS of the
    /// real vocabulary).
    #[serde(default)]
    pub eos_token_id: Option<u32>,
}

fn default_positions() -> usize {
    77
}
fn default_act() -> Activation {
    Activation::QuickGelu
}
fn default_eps() -> f64 {
    1e-5
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl Attention {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Attention {
            q: candle_nn::linear(h, h, vb.pp("q_proj"))?,
            k: candle_nn::linear(h, h, vb.pp("k_proj"))?,
            v: candle_nn::linear(h, h, vb.pp("v_proj"))?,
            out: candle_nn::linear(h, h, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let hd = d / self.heads;
        let split = |y: Tensor| {
            y.reshape((b, t, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split((self.q.forward(x)? * (hd as f64).powf(-0.5))?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let att = q.matmul(&k.t()?)?.broadcast_add(mask)?;
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        self.out.forward(&y)
    }
}

struct EncoderLayer {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(EncoderLayer {
            ln1: candle_nn::layer_norm(h, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            attn: Attention::new(vb.pp("self_attn"), cfg)?,
            ln2: candle_nn::layer_norm(h, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: candle_nn::linear(h, cfg.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: candle_nn::linear(cfg.intermediate_size, h, vb.pp("mlp.fc2"))?,
            act: cfg.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln1.forward(x)?, mask)?)?;
        let h = self.fc1.forward(&self.ln2.forward(&x)?)?;
        let h = match self.act {
            Activation::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
            Activation::Gelu => h.gelu_erf()?,
            Activation::GeluNew => h.gelu()?,
        };
        x + self.fc2.forward(&h)?
    }
}

/// A CLIP text encoder: token ids `[B, T]` → `last_hidden_state` `[B, T, D]`.
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    /// `CLIPTextModelWithProjection`'s `text_projection` (SDXL's second
    /// encoder), when the weights have one.
    text_projection: Option<Linear>,
    pub config: ClipTextConfig,
}

impl ClipTextModel {
    /// Build from a VarBuilder laid out like transformers' `text_model.*`
    /// (without the `text_model.` prefix).
    pub fn new(vb: VarBuilder, config: ClipTextConfig) -> candle_core::Result<Self> {
        let emb = vb.pp("embeddings");
        let h = config.hidden_size;
        let token_embedding =
            candle_nn::embedding(config.vocab_size, h, emb.pp("token_embedding"))?;
        let position_embedding = candle_nn::embedding(
            config.max_position_embeddings,
            h,
            emb.pp("position_embedding"),
        )?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::new(vb.pp(format!("encoder.layers.{i}")), &config))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_layer_norm =
            candle_nn::layer_norm(h, config.layer_norm_eps, vb.pp("final_layer_norm"))?;
        let text_projection = if vb.contains_tensor("text_projection.weight") {
            let w = vb.get_unchecked("text_projection.weight")?;
            if w.dims().len() != 2 || w.dim(1)? != h {
                candle_core::bail!("text_projection.weight has shape {:?}", w.dims());
            }
            Some(Linear::new(w, None))
        } else {
            None
        };
        Ok(ClipTextModel {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            config,
        })
    }

    /// Width of the pooled, projected output, when there is a projection.
    pub fn projection_dim(&self) -> Option<usize> {
        self.text_projection
            .as_ref()
            .map(|l| l.weight().dim(0).unwrap_or(0))
    }

    /// Embeddings and the first `keep` encoder layers (no final norm).
    fn run(&self, ids: &Tensor, keep: usize) -> candle_core::Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let positions = Tensor::arange(0u32, t as u32, ids.device())?;
        let mut x = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(t, ids.device())?;
        for layer in &self.layers[..keep] {
            x = layer.forward(&x, &mask)?;
        }
        Ok(x)
    }

    /// Layers kept for A1111's clip skip `n` (1 = all), or an error.
    fn keep(&self, clip_skip: usize) -> candle_core::Result<usize> {
        self.layers
            .len()
            .checked_sub(clip_skip.max(1) - 1)
            .filter(|k| *k > 0)
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "clip skip {clip_skip} leaves no layer of {}",
                    self.layers.len()
                ))
            })
    }

    /// SDXL's conditioning from this encoder: `hidden_states[-(n + 1)]`
    /// for clip skip `n` (1 = the penultimate layer SDXL was trained on),
    /// *without* the final layer norm — as diffusers' SDXL pipeline (its
    /// `clip_skip` is `n − 1`) and SGM's `layer: penultimate` take it.
    pub fn forward_hidden(&self, ids: &Tensor, clip_skip: usize) -> candle_core::Result<Tensor> {
        let keep = self.keep(clip_skip + 1)?;
        self.run(ids, keep)
    }

    /// [`forward_hidden`](Self::forward_hidden) and the pooled, projected
    /// embedding `[B, P]` (`text_embeds` of `CLIPTextModelWithProjection`:
    /// the final-normed last layer at each row's EOS, through
    /// `text_projection`) from one pass through the layers — SDXL needs both
    /// of its second encoder for every prompt.
    pub fn forward_hidden_pooled(
        &self,
        ids: &Tensor,
        clip_skip: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let proj = self.text_projection.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("this text encoder has no text_projection".into())
        })?;
        let keep = self.keep(clip_skip + 1)?;
        let hidden = self.run(ids, keep)?;
        let mask = causal_mask(ids.dim(1)?, ids.device())?;
        let mut x = hidden.clone();
        for layer in &self.layers[keep..] {
            x = layer.forward(&x, &mask)?;
        }
        let h = self.final_layer_norm.forward(&x)?;
        let rows = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let legacy = matches!(self.config.eos_token_id, None | Some(2));
        let eos = self.config.eos_token_id.unwrap_or(2);
        let mut picked = Vec::with_capacity(rows.len());
        for (b, r) in rows.iter().enumerate() {
            let pos = if legacy {
                // argmax: the first of the highest ids.
                r.iter()
                    .enumerate()
                    .fold(
                        (0, 0u32),
                        |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) },
                    )
                    .0
            } else {
                r.iter().position(|&v| v == eos).unwrap_or(0)
            };
            picked.push(h.get(b)?.get(pos)?.unsqueeze(0)?);
        }
        Ok((hidden, proj.forward(&Tensor::cat(&picked, 0)?)?))
    }

    /// `last_hidden_state` for a batch of padded id rows (causal attention,
    /// no padding mask — as the reference calls `text_encoder(ids)`).
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_skip(ids, 1)
    }

    /// The hidden state A1111's "Clip skip" `n` conditions on: the output of
    /// the `n`-th layer from the end, through the final layer norm (`n` = 1
    /// is `last_hidden_state`; diffusers' `clip_skip` is `n − 1`). For an
    /// SD2 encoder, whose penultimate layer is already its last here, `n`
    /// counts from there as A1111 does.
    pub fn forward_skip(&self, ids: &Tensor, clip_skip: usize) -> candle_core::Result<Tensor> {
        let keep = self.keep(clip_skip)?;
        self.final_layer_norm.forward(&self.run(ids, keep)?)
    }

    /// Encode padded id rows into flattened f32 vectors (`last_hidden_state`),
    /// one per row.
    pub fn embed(&self, rows: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        self.embed_by(rows, |ids| self.forward(ids))
    }

    /// The same with SDXL's penultimate hidden state (no final norm).
    pub fn embed_penultimate(&self, rows: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        self.embed_by(rows, |ids| self.forward_hidden(ids, 1))
    }

    fn embed_by(
        &self,
        rows: &[Vec<u32>],
        f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    ) -> Result<Vec<Vec<f32>>> {
        let t = rows.first().map_or(0, Vec::len);
        let flat: Vec<u32> = rows.iter().flatten().copied().collect();
        let run = || -> candle_core::Result<Vec<Vec<f32>>> {
            let ids = Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu)?;
            f(&ids)?
                .flatten_from(1)?
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()
        };
        run().map_err(|e| Error::usage(format!("text encoder failed: {e}")))
    }
}

fn causal_mask(t: usize, dev: &Device) -> candle_core::Result<Tensor> {
    let m: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(m, (t, t), dev)
}

/// Overrides for single-file checkpoints, whose configs are not stored.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Attention heads (default: hidden size / 64, as in every SD encoder).
    pub heads: Option<usize>,
    pub activation: Option<Activation>,
    /// OpenCLIP: how many residual blocks to run. Default: all but the last
    /// (SD2 conditions on the penultimate layer; HF's conversion keeps 23 of 24).
    pub openclip_layers: Option<usize>,
}

/// Where a text encoder was found, for reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EncoderInfo {
    pub path: PathBuf,
    pub layout: String,
    pub hidden_size: usize,
    pub layers: usize,
}

/// Load a text encoder from a diffusers `text_encoder/` folder or pipeline
/// root, an A1111 SD1 single file (`cond_stage_model.transformer.…`) or an
/// SD2 single file (`cond_stage_model.model.…`, OpenCLIP layout).
pub fn load(path: &Path, opts: &LoadOptions) -> Result<(ClipTextModel, EncoderInfo)> {
    if path.is_dir() {
        let dir = if path.join("text_encoder").is_dir() {
            path.join("text_encoder")
        } else {
            path.to_path_buf()
        };
        if path.join("text_encoder_2").is_dir() {
            return Err(Error::file(
                path,
                "an SDXL pipeline has two text encoders; this loader reads one (FT loads both through transport::build_engine)",
            ));
        }
        return load_folder(&dir, opts);
    }
    // `.safetensors` through a memory map, `.ckpt` pickles read as data.
    let file = crate::io::open_tensor_file(path)?;
    load_single(path, &file.tensors, opts)
}

/// One diffusers text-encoder folder (`config.json` + `model.safetensors`):
/// `CLIPTextModel`, or `CLIPTextModelWithProjection` whose
/// `text_projection` is kept for the pooled output.
pub fn load_folder(dir: &Path, opts: &LoadOptions) -> Result<(ClipTextModel, EncoderInfo)> {
    let cfg_path = dir.join("config.json");
    let cfg_text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let mut config: ClipTextConfig = serde_json::from_str(&cfg_text)
        .map_err(|e| Error::file(&cfg_path, format!("not a CLIPTextModel config: {e}")))?;
    if let Some(a) = opts.activation {
        config.hidden_act = a;
    }
    let weights = ["model.safetensors", "pytorch_model.safetensors"]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.exists())
        .ok_or_else(|| Error::file(dir, "no model.safetensors in the text encoder folder"))?;
    let f = SafetensorsFile::open(&weights)?;
    let tensors = collect(&weights, &f.tensors(), |k| {
        let k = k.strip_prefix("text_model.").unwrap_or(k);
        (k.starts_with("embeddings.")
            || k.starts_with("encoder.")
            || k.starts_with("final_layer_norm.")
            || k == "text_projection.weight")
            .then(|| k.to_string())
    })?;
    build(&weights, tensors, config, "diffusers text_encoder")
}

/// SDXL's two encoders from a single file: `conditioner.embedders.0`
/// (OpenAI CLIP ViT-L, transformers layout) and `conditioner.embedders.1`
/// (OpenCLIP ViT-bigG: every block kept, since the pooled output reads the
/// last one, and `text_projection` transposed from OpenCLIP's `x @ P`).
pub fn load_single_xl(
    path: &Path,
    all: &[(String, RawTensor)],
    opts: [&LoadOptions; 2],
) -> Result<[(ClipTextModel, EncoderInfo); 2]> {
    let p0 = if all
        .iter()
        .any(|(k, _)| k.starts_with("conditioner.embedders.0.transformer.text_model."))
    {
        "conditioner.embedders.0.transformer.text_model."
    } else {
        "conditioner.embedders.0.transformer."
    };
    let t0 = collect(path, all, |k| k.strip_prefix(p0).map(String::from))?;
    if t0.is_empty() {
        return Err(Error::file(
            path,
            "no first SDXL text encoder (conditioner.embedders.0.transformer.*)",
        ));
    }
    let c0 = infer_config(path, &t0, opts[0], Activation::QuickGelu)?;
    let te1 = build(path, t0, c0, "ldm sdxl te1 (HF CLIP)")?;
    let prefix = "conditioner.embedders.1.model.";
    let mut o = opts[1].clone();
    o.openclip_layers.get_or_insert(usize::MAX);
    let mut t1 = openclip_to_hf(path, all, prefix, &o)?;
    let key = format!("{prefix}text_projection");
    let proj = all
        .iter()
        .find(|(k, _)| *k == key)
        .ok_or_else(|| Error::key(path, &key, "missing"))?;
    let proj = to_tensor(&proj.1, path, &key)?
        .t()
        .and_then(|t| t.contiguous())
        .map_err(|e| Error::key(path, &key, e.to_string()))?;
    t1.insert("text_projection.weight".into(), proj);
    let mut c1 = infer_config(path, &t1, &o, Activation::Gelu)?;
    // OpenCLIP's vocabulary ends with <|endoftext|>: pool at the first one.
    c1.eos_token_id = Some(c1.vocab_size as u32 - 1);
    let te2 = build(path, t1, c1, "ldm sdxl te2 (OpenCLIP)")?;
    Ok([te1, te2])
}

/// The text encoder of a single-file checkpoint whose tensors are already
/// read (`spm generate` reads a checkpoint once for all three networks).
pub fn load_single(
    path: &Path,
    all: &[(String, RawTensor)],
    opts: &LoadOptions,
) -> Result<(ClipTextModel, EncoderInfo)> {
    let has = |p: &str| all.iter().any(|(k, _)| k.starts_with(p));
    if has("conditioner.embedders.") {
        return Err(Error::file(
            path,
            "an SDXL checkpoint has two text encoders; this loader reads one (see load_single_xl)",
        ));
    }
    if has("cond_stage_model.transformer.") {
        let prefix = if has("cond_stage_model.transformer.text_model.") {
            "cond_stage_model.transformer.text_model."
        } else {
            "cond_stage_model.transformer."
        };
        let tensors = collect(path, all, |k| k.strip_prefix(prefix).map(String::from))?;
        let config = infer_config(path, &tensors, opts, Activation::QuickGelu)?;
        return build(path, tensors, config, "ldm sd1 (HF CLIP)");
    }
    if has("cond_stage_model.model.transformer.resblocks.") {
        let tensors = openclip_to_hf(path, all, "cond_stage_model.model.", opts)?;
        let config = infer_config(path, &tensors, opts, Activation::Gelu)?;
        return build(path, tensors, config, "ldm sd2 (OpenCLIP)");
    }
    Err(Error::file(
        path,
        "no text encoder found (expected a diffusers text_encoder/ folder, or cond_stage_model.* keys)",
    ))
}

fn to_tensor(t: &RawTensor, path: &Path, key: &str) -> Result<Tensor> {
    let v = t
        .to_f32()
        .ok_or_else(|| Error::key(path, key, "not a float tensor"))?;
    Tensor::from_vec(v, t.shape.clone(), &Device::Cpu)
        .map_err(|e| Error::key(path, key, e.to_string()))
}

/// Read the tensors whose renamed key `rename` returns, as f32.
fn collect(
    path: &Path,
    all: &[(String, RawTensor)],
    rename: impl Fn(&str) -> Option<String>,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (name, t) in all {
        if let Some(k) = rename(name) {
            out.insert(k, to_tensor(t, path, name)?);
        }
    }
    Ok(out)
}

fn build(
    path: &Path,
    tensors: HashMap<String, Tensor>,
    config: ClipTextConfig,
    layout: &str,
) -> Result<(ClipTextModel, EncoderInfo)> {
    let info = EncoderInfo {
        path: path.to_path_buf(),
        layout: layout.into(),
        hidden_size: config.hidden_size,
        layers: config.num_hidden_layers,
    };
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let model = ClipTextModel::new(vb, config)
        .map_err(|e| Error::file(path, format!("text encoder weights do not fit: {e}")))?;
    Ok((model, info))
}

fn dims(path: &Path, tensors: &HashMap<String, Tensor>, key: &str) -> Result<Vec<usize>> {
    tensors
        .get(key)
        .map(|t| t.dims().to_vec())
        .ok_or_else(|| Error::key(path, key, "missing"))
}

/// Sizes from tensor shapes, for single files that carry no config.
fn infer_config(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    opts: &LoadOptions,
    act: Activation,
) -> Result<ClipTextConfig> {
    let tok = dims(path, tensors, "embeddings.token_embedding.weight")?;
    let pos = dims(path, tensors, "embeddings.position_embedding.weight")?;
    let fc1 = dims(path, tensors, "encoder.layers.0.mlp.fc1.weight")?;
    let layers = (0..)
        .take_while(|i| tensors.contains_key(&format!("encoder.layers.{i}.layer_norm1.weight")))
        .count();
    let hidden = tok[1];
    Ok(ClipTextConfig {
        vocab_size: tok[0],
        hidden_size: hidden,
        intermediate_size: fc1[0],
        num_hidden_layers: layers,
        num_attention_heads: opts.heads.unwrap_or((hidden / 64).max(1)),
        max_position_embeddings: pos[0],
        hidden_act: opts.activation.unwrap_or(act),
        layer_norm_eps: 1e-5,
        pad_token_id: None,
        eos_token_id: None,
    })
}

/// Rename OpenCLIP text-tower weights to transformers names, splitting the
/// fused `in_proj` into q/k/v rows (lora-schemes.md §3.4).
fn openclip_to_hf(
    path: &Path,
    all: &[(String, RawTensor)],
    prefix: &str,
    opts: &LoadOptions,
) -> Result<HashMap<String, Tensor>> {
    let raw = collect(path, all, |k| k.strip_prefix(prefix).map(String::from))?;
    let get = |k: &str| {
        raw.get(k)
            .cloned()
            .ok_or_else(|| Error::key(path, format!("{prefix}{k}"), "missing"))
    };
    let blocks = (0..)
        .take_while(|i| raw.contains_key(&format!("transformer.resblocks.{i}.ln_1.weight")))
        .count();
    let keep = opts
        .openclip_layers
        .unwrap_or(blocks.saturating_sub(1))
        .min(blocks);
    let mut out = HashMap::new();
    out.insert(
        "embeddings.token_embedding.weight".to_string(),
        get("token_embedding.weight")?,
    );
    out.insert(
        "embeddings.position_embedding.weight".to_string(),
        get("positional_embedding")?,
    );
    out.insert(
        "final_layer_norm.weight".to_string(),
        get("ln_final.weight")?,
    );
    out.insert("final_layer_norm.bias".to_string(), get("ln_final.bias")?);
    let err =
        |k: &str, e: candle_core::Error| Error::key(path, format!("{prefix}{k}"), e.to_string());
    for i in 0..keep {
        let o = format!("transformer.resblocks.{i}.");
        let h = format!("encoder.layers.{i}.");
        for (from, to) in [
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("attn.out_proj", "self_attn.out_proj"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ] {
            for p in ["weight", "bias"] {
                out.insert(format!("{h}{to}.{p}"), get(&format!("{o}{from}.{p}"))?);
            }
        }
        for (p, key) in [
            ("weight", "attn.in_proj_weight"),
            ("bias", "attn.in_proj_bias"),
        ] {
            let fused = get(&format!("{o}{key}"))?;
            let rows = fused.dim(0).map_err(|e| err(key, e))? / 3;
            for (n, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                let part = fused.narrow(0, n * rows, rows).map_err(|e| err(key, e))?;
                out.insert(format!("{h}self_attn.{name}.{p}"), part);
            }
        }
    }
    Ok(out)
}

/// Cosine similarity of two flattened embeddings, accumulated in f64.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa.sqrt() * bb.sqrt())
    }
}
