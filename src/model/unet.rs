//! diffusers' `UNet2DConditionModel`, written for adapters and autograd.
//!
//! candle-transformers ships a UNet, but it has no place for adapters and
//! two of its ops cut the autograd graph silently (`shared/spec/candle.md`
//! §1), which the trainer cannot live with. This one mirrors diffusers'
//! module tree, so a `unet/` state dict loads without a rename table, and
//! every Linear/Conv2d is an [`nn`](super::nn) layer that carries its
//! adapters. Any diffusers `unet/config.json` of the SD1/SD2 family works:
//! block widths, layers per block, heads (or, in diffusers' old spelling,
//! `attention_head_dim` meaning heads), cross-attention width, linear or
//! 1×1-conv projections, `upcast_attention`, and SDXL's per-block
//! transformer depth with its `text_time` conditioning (pooled text
//! embedding + size/crop ids through `add_embedding`).

use candle_core::{DType, Result, Tensor, D};
use serde::Deserialize;

use super::nn::{attention, attention_probed, Builder, Conv2d, GroupNorm, LayerNorm, Linear, Rows};

/// An int or a per-block list, as diffusers configs write several fields.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    fn expand(&self, n: usize, field: &str) -> std::result::Result<Vec<usize>, String> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => Err(format!("`{field}` has {} entries for {n} blocks", v.len())),
        }
    }
}

/// The fields of a diffusers `unet/config.json` this network reads.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "default_mid")]
    pub mid_block_type: Option<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "two")]
    pub layers_per_block: PerBlock,
    #[serde(default = "eight")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    pub cross_attention_dim: PerBlock,
    #[serde(default)]
    pub transformer_layers_per_block: Option<PerBlock>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "eps5")]
    pub norm_eps: f64,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "one")]
    pub downsample_padding: usize,
    #[serde(default = "one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "silu")]
    pub act_fn: String,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// SDXL: width of each size/crop id's sinusoidal embedding (256).
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// SDXL: pooled text width + 6 × `addition_time_embed_dim` (2816).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
    #[serde(default)]
    pub sample_size: Option<usize>,
}

fn four() -> usize {
    4
}
fn two() -> PerBlock {
    PerBlock::One(2)
}
fn eight() -> PerBlock {
    PerBlock::One(8)
}
fn one() -> usize {
    1
}
fn one_f() -> f64 {
    1.0
}
fn thirty_two() -> usize {
    32
}
fn eps5() -> f64 {
    1e-5
}
fn yes() -> bool {
    true
}
fn silu() -> String {
    "silu".into()
}
fn default_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}

impl UNetConfig {
    /// SD1.x (`runwayml/stable-diffusion-v1-5`'s `unet/config.json`).
    pub fn v1_5() -> Self {
        serde_json::from_str(
            r#"{"down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],
                "up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"],
                "block_out_channels":[320,640,1280,1280],"attention_head_dim":8,
                "cross_attention_dim":768,"sample_size":64}"#,
        )
        .expect("built-in config")
    }

    /// SD2.x (`stabilityai/stable-diffusion-2-1`'s `unet/config.json`).
    pub fn v2_1() -> Self {
        serde_json::from_str(
            r#"{"down_block_types":["CrossAttnDownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D","DownBlock2D"],
                "up_block_types":["UpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D","CrossAttnUpBlock2D"],
                "block_out_channels":[320,640,1280,1280],"attention_head_dim":[5,10,20,20],
                "cross_attention_dim":1024,"use_linear_projection":true,"upcast_attention":true,
                "sample_size":96}"#,
        )
        .expect("built-in config")
    }

    /// SDXL 1.0 base's `unet/config.json`.
    pub fn xl_base() -> Self {
        serde_json::from_str(
            r#"{"down_block_types":["DownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D"],
                "up_block_types":["CrossAttnUpBlock2D","CrossAttnUpBlock2D","UpBlock2D"],
                "block_out_channels":[320,640,1280],"attention_head_dim":[5,10,20],
                "transformer_layers_per_block":[1,2,10],"cross_attention_dim":2048,
                "use_linear_projection":true,"addition_embed_type":"text_time",
                "addition_time_embed_dim":256,"projection_class_embeddings_input_dim":2816,
                "sample_size":128}"#,
        )
        .expect("built-in config")
    }

    /// The cross-attention width (the text encoder's hidden size).
    pub fn context_dim(&self) -> usize {
        match &self.cross_attention_dim {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => v.first().copied().unwrap_or(0),
        }
    }

    /// Everything this network does not implement, as one message.
    pub fn check(&self) -> std::result::Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!(
                "{} block widths but {} down and {} up block types",
                n,
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return Err(format!("down block type `{t}` is not supported"));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return Err(format!("up block type `{t}` is not supported"));
            }
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            other => return Err(format!("mid block type {other:?} is not supported")),
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time")
                if self.addition_time_embed_dim.is_none()
                    || self.projection_class_embeddings_input_dim.is_none() =>
            {
                return Err("addition_embed_type `text_time` needs addition_time_embed_dim and projection_class_embeddings_input_dim".into());
            }
            Some("text_time") => {}
            Some(a) => return Err(format!("addition_embed_type `{a}` is not supported")),
        }
        if self
            .reverse_transformer_layers_per_block
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            return Err("reverse_transformer_layers_per_block is not supported".into());
        }
        if let Some(c) = &self.class_embed_type {
            return Err(format!("class_embed_type `{c}` is not supported"));
        }
        if self.time_cond_proj_dim.is_some() {
            return Err("time_cond_proj_dim (LCM) is not supported".into());
        }
        if self.dual_cross_attention || self.only_cross_attention.as_bool() == Some(true) {
            return Err("dual/only cross-attention is not supported".into());
        }
        if matches!(&self.only_cross_attention, serde_json::Value::Array(a) if a.iter().any(|v| v.as_bool() == Some(true)))
        {
            return Err("only_cross_attention is not supported".into());
        }
        if self.mid_block_scale_factor != 1.0 {
            return Err("mid_block_scale_factor other than 1 is not supported".into());
        }
        if self.act_fn != "silu" {
            return Err(format!("act_fn `{}` is not supported", self.act_fn));
        }
        if let Some(s) = &self.resnet_time_scale_shift {
            if s != "default" {
                return Err(format!("resnet_time_scale_shift `{s}` is not supported"));
            }
        }
        let heads = self.heads()?;
        for (i, (&c, &h)) in self.block_out_channels.iter().zip(&heads).enumerate() {
            if h == 0 || c % h != 0 {
                return Err(format!(
                    "block {i}: {c} channels do not split into {h} heads"
                ));
            }
            if c % self.norm_num_groups != 0 {
                return Err(format!(
                    "block {i}: {c} channels do not split into {} norm groups",
                    self.norm_num_groups
                ));
            }
        }
        self.layers()?;
        self.depths()?;
        self.contexts()?;
        Ok(())
    }

    /// Heads per block. diffusers' old configs call the head *count*
    /// `attention_head_dim`; `num_attention_heads` wins where given.
    fn heads(&self) -> std::result::Result<Vec<usize>, String> {
        let n = self.block_out_channels.len();
        match &self.num_attention_heads {
            Some(h) => h.expand(n, "num_attention_heads"),
            None => self.attention_head_dim.expand(n, "attention_head_dim"),
        }
    }
    /// Resnets per down block (up blocks have one more).
    pub fn layers(&self) -> std::result::Result<Vec<usize>, String> {
        self.layers_per_block
            .expand(self.block_out_channels.len(), "layers_per_block")
    }
    fn depths(&self) -> std::result::Result<Vec<usize>, String> {
        let n = self.block_out_channels.len();
        match &self.transformer_layers_per_block {
            Some(d) => d.expand(n, "transformer_layers_per_block"),
            None => Ok(vec![1; n]),
        }
    }
    fn contexts(&self) -> std::result::Result<Vec<usize>, String> {
        self.cross_attention_dim
            .expand(self.block_out_channels.len(), "cross_attention_dim")
    }
}

fn silu_t(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// diffusers' `ResnetBlock2D` (time-conditioned when `temb` is given).
#[derive(Debug)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    pub fn new(
        b: Builder,
        c_in: usize,
        c_out: usize,
        temb: Option<usize>,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        Ok(ResnetBlock {
            norm1: b.pp("norm1").group_norm(groups, c_in, eps)?,
            conv1: b.pp("conv1").conv2d(c_in, c_out, 3, 1, 1)?,
            time_emb_proj: match temb {
                Some(t) => Some(b.pp("time_emb_proj").linear(t, c_out, true)?),
                None => None,
            },
            norm2: b.pp("norm2").group_norm(groups, c_out, eps)?,
            conv2: b.pp("conv2").conv2d(c_out, c_out, 3, 1, 1)?,
            conv_shortcut: if c_in != c_out {
                Some(b.pp("conv_shortcut").conv2d(c_in, c_out, 1, 1, 0)?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>, rows: &Rows) -> Result<Tensor> {
        let h = self
            .conv1
            .forward(&silu_t(&self.norm1.forward(x)?)?, rows)?;
        let h = match (&self.time_emb_proj, temb) {
            (Some(p), Some(t)) => {
                let t = p.forward(&silu_t(t)?, rows)?;
                h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?
            }
            _ => h,
        };
        let h = self
            .conv2
            .forward(&silu_t(&self.norm2.forward(&h)?)?, rows)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x, rows)?,
            None => x.clone(),
        };
        skip + h
    }
}

/// diffusers' `Attention` as `BasicTransformerBlock` uses it: no q/k/v bias,
/// `to_out.0` with bias.
#[derive(Debug)]
struct CrossAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

impl CrossAttention {
    fn new(b: Builder, dim: usize, ctx_dim: usize, heads: usize) -> Result<Self> {
        let head_dim = dim / heads;
        Ok(CrossAttention {
            to_q: b.pp("to_q").linear(dim, dim, false)?,
            to_k: b.pp("to_k").linear(ctx_dim, dim, false)?,
            to_v: b.pp("to_v").linear(ctx_dim, dim, false)?,
            to_out: b.pp("to_out.0").linear(dim, dim, true)?,
            heads,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    fn forward(&self, x: &Tensor, ctx: Option<&Tensor>, rows: &Rows) -> Result<Tensor> {
        let cross = ctx.is_some();
        let ctx = ctx.unwrap_or(x);
        let (b, n, dim) = x.dims3()?;
        let m = ctx.dim(1)?;
        let hd = dim / self.heads;
        let split = |t: Tensor, len: usize| {
            t.reshape((b, len, self.heads, hd))?
                .transpose(1, 2)?
                .reshape((b * self.heads, len, hd))
        };
        let q = split(self.to_q.forward(x, rows)?, n)?;
        let k = split(self.to_k.forward(ctx, rows)?, m)?;
        let v = split(self.to_v.forward(ctx, rows)?, m)?;
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let o = match (&rows.probe, cross) {
            (Some(p), true) => attention_probed(&q, &k, &v, self.scale, p)?,
            _ => attention(&q, &k, &v, self.scale)?,
        };
        let o = o
            .reshape((b, self.heads, n, hd))?
            .transpose(1, 2)?
            .reshape((b, n, dim))?;
        self.to_out.forward(&o, rows)
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention, GEGLU MLP.
#[derive(Debug)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: CrossAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff_proj: Linear,
    ff_out: Linear,
}

impl TransformerBlock {
    fn new(b: Builder, dim: usize, ctx_dim: usize, heads: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(TransformerBlock {
            norm1: b.pp("norm1").layer_norm(dim, 1e-5)?,
            attn1: CrossAttention::new(b.pp("attn1"), dim, dim, heads)?,
            norm2: b.pp("norm2").layer_norm(dim, 1e-5)?,
            attn2: CrossAttention::new(b.pp("attn2"), dim, ctx_dim, heads)?,
            norm3: b.pp("norm3").layer_norm(dim, 1e-5)?,
            ff_proj: b.pp("ff.net.0.proj").linear(dim, inner * 2, true)?,
            ff_out: b.pp("ff.net.2").linear(inner, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &Tensor, rows: &Rows) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None, rows)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(ctx), rows)?
            + &x)?;
        let h = self.ff_proj.forward(&self.norm3.forward(&x)?, rows)?;
        let half = h.dim(D::Minus1)? / 2;
        // GEGLU with diffusers' exact (erf) GELU, not the tanh form.
        let g = (h.narrow(D::Minus1, 0, half)? * h.narrow(D::Minus1, half, half)?.gelu_erf()?)?;
        self.ff_out.forward(&g, rows)? + x
    }
}

/// Either projection diffusers' `Transformer2DModel` may have.
#[derive(Debug)]
enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

/// `Transformer2DModel` on continuous (latent) input.
#[derive(Debug)]
struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<TransformerBlock>,
    proj_out: Proj,
}

impl SpatialTransformer {
    fn new(
        b: Builder,
        c: usize,
        ctx_dim: usize,
        heads: usize,
        depth: usize,
        groups: usize,
        linear: bool,
    ) -> Result<Self> {
        let proj = |name: &str| -> Result<Proj> {
            Ok(if linear {
                Proj::Linear(b.pp(name).linear(c, c, true)?)
            } else {
                Proj::Conv(b.pp(name).conv2d(c, c, 1, 1, 0)?)
            })
        };
        Ok(SpatialTransformer {
            norm: b.pp("norm").group_norm(groups, c, 1e-6)?,
            proj_in: proj("proj_in")?,
            blocks: (0..depth)
                .map(|i| {
                    TransformerBlock::new(
                        b.pp(format!("transformer_blocks.{i}")),
                        c,
                        ctx_dim,
                        heads,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &Tensor, rows: &Rows) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let to_seq = |t: Tensor| t.permute((0, 2, 3, 1))?.reshape((b, h * w, c));
        let to_img = |t: Tensor| t.reshape((b, h, w, c))?.permute((0, 3, 1, 2));
        let n = self.norm.forward(x)?;
        let mut s = match &self.proj_in {
            Proj::Conv(p) => to_seq(p.forward(&n, rows)?)?,
            Proj::Linear(p) => p.forward(&to_seq(n)?, rows)?,
        };
        for blk in &self.blocks {
            s = blk.forward(&s, ctx, rows)?;
        }
        let y = match &self.proj_out {
            Proj::Conv(p) => p.forward(&to_img(s)?.contiguous()?, rows)?,
            Proj::Linear(p) => to_img(p.forward(&s, rows)?)?,
        };
        y + x
    }
}

#[derive(Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    downsampler: Option<Conv2d>,
}

#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    upsampler: Option<Conv2d>,
}

#[derive(Debug)]
struct MidBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
}

/// SDXL's extra conditioning, one row per sample: the second text
/// encoder's pooled, projected embedding `[B, P]` and the six size ids
/// `[B, 6]` (original h, w; crop top, left; target h, w) in pixels.
#[derive(Debug, Clone)]
pub struct Added {
    pub text_embeds: Tensor,
    pub time_ids: Tensor,
}

impl Added {
    /// Several row sets stacked (a batch assembled from per-prompt rows).
    pub fn cat(parts: &[&Added]) -> Result<Added> {
        let t: Vec<&Tensor> = parts.iter().map(|a| &a.text_embeds).collect();
        let i: Vec<&Tensor> = parts.iter().map(|a| &a.time_ids).collect();
        Ok(Added {
            text_embeds: Tensor::cat(&t, 0)?,
            time_ids: Tensor::cat(&i, 0)?,
        })
    }

    /// The same row repeated `n` times.
    pub fn repeat(&self, n: usize) -> Result<Added> {
        Ok(Added {
            text_embeds: self.text_embeds.repeat((n, 1))?,
            time_ids: self.time_ids.repeat((n, 1))?,
        })
    }
}

/// Everything the UNet is conditioned on besides the timestep: the text
/// context `[B, T, D]` and, for SDXL, [`Added`]. Batches are built from
/// per-text values with [`repeat`](Cond::repeat) and [`cat`](Cond::cat).
#[derive(Debug, Clone)]
pub struct Cond {
    pub ctx: Tensor,
    pub added: Option<Added>,
}

impl Cond {
    /// SD1/SD2: the context alone.
    pub fn text(ctx: Tensor) -> Cond {
        Cond { ctx, added: None }
    }

    /// Every row `n` times (`[a, b]` → `[a, b, a, b, …]`, as `repeat`).
    pub fn repeat(&self, n: usize) -> Result<Cond> {
        Ok(Cond {
            ctx: self.ctx.repeat((n, 1, 1))?,
            added: self.added.as_ref().map(|a| a.repeat(n)).transpose()?,
        })
    }

    /// Rows of several conditionings stacked.
    pub fn cat(parts: &[&Cond]) -> Result<Cond> {
        let ctx: Vec<&Tensor> = parts.iter().map(|c| &c.ctx).collect();
        let added: Option<Vec<&Added>> = parts.iter().map(|c| c.added.as_ref()).collect();
        Ok(Cond {
            ctx: Tensor::cat(&ctx, 0)?,
            added: added.map(|a| Added::cat(&a)).transpose()?,
        })
    }

    /// All-zero conditioning of the same shape, size ids kept: SDXL's empty
    /// negative prompt under `force_zeros_for_empty_prompt`.
    pub fn zeroed(&self) -> Result<Cond> {
        Ok(Cond {
            ctx: self.ctx.zeros_like()?,
            added: match &self.added {
                Some(a) => Some(Added {
                    text_embeds: a.text_embeds.zeros_like()?,
                    time_ids: a.time_ids.clone(),
                }),
                None => None,
            },
        })
    }

    /// The same texts with other size ids (one `[6]` row for every row).
    pub fn with_time_ids(&self, ids: Option<&[f32]>) -> Result<Cond> {
        let (Some(a), Some(ids)) = (&self.added, ids) else {
            return Ok(self.clone());
        };
        let n = a.text_embeds.dim(0)?;
        let t = Tensor::from_vec(ids.repeat(n), (n, ids.len()), a.text_embeds.device())?;
        Ok(Cond {
            ctx: self.ctx.clone(),
            added: Some(Added {
                text_embeds: a.text_embeds.clone(),
                time_ids: t,
            }),
        })
    }
}

/// The conditional UNet: `(noisy latent [B,C,H,W], timestep per row [B],
/// text context [B,T,D])` → predicted noise (or v) `[B,C,H,W]`.
#[derive(Debug)]
pub struct UNet {
    conv_in: Conv2d,
    time_1: Linear,
    time_2: Linear,
    /// SDXL's `add_embedding` (linear_1, linear_2).
    add: Option<(Linear, Linear)>,
    down: Vec<DownBlock>,
    mid: MidBlock,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    pub config: UNetConfig,
}

impl UNet {
    pub fn new(b: Builder, config: UNetConfig) -> Result<Self> {
        config.check().map_err(candle_core::Error::msg)?;
        let ch = &config.block_out_channels;
        let n = ch.len();
        let heads = config.heads().map_err(candle_core::Error::msg)?;
        let layers = config.layers().map_err(candle_core::Error::msg)?;
        let depths = config.depths().map_err(candle_core::Error::msg)?;
        let ctx = config.contexts().map_err(candle_core::Error::msg)?;
        let (g, eps, lin) = (
            config.norm_num_groups,
            config.norm_eps,
            config.use_linear_projection,
        );
        let temb = ch[0] * 4;
        let conv_in = b.pp("conv_in").conv2d(config.in_channels, ch[0], 3, 1, 1)?;
        let time_1 = b.pp("time_embedding.linear_1").linear(ch[0], temb, true)?;
        let time_2 = b.pp("time_embedding.linear_2").linear(temb, temb, true)?;
        let add = match config.projection_class_embeddings_input_dim {
            Some(p) if config.addition_embed_type.is_some() => Some((
                b.pp("add_embedding.linear_1").linear(p, temb, true)?,
                b.pp("add_embedding.linear_2").linear(temb, temb, true)?,
            )),
            _ => None,
        };

        let mut down = Vec::with_capacity(n);
        let mut c_out = ch[0];
        for i in 0..n {
            let c_in = c_out;
            c_out = ch[i];
            let bb = b.pp(format!("down_blocks.{i}"));
            let cross = config.down_block_types[i] == "CrossAttnDownBlock2D";
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers[i] {
                let cin = if j == 0 { c_in } else { c_out };
                resnets.push(ResnetBlock::new(
                    bb.pp(format!("resnets.{j}")),
                    cin,
                    c_out,
                    Some(temb),
                    g,
                    eps,
                )?);
                if cross {
                    attentions.push(SpatialTransformer::new(
                        bb.pp(format!("attentions.{j}")),
                        c_out,
                        ctx[i],
                        heads[i],
                        depths[i],
                        g,
                        lin,
                    )?);
                }
            }
            let downsampler = if i + 1 < n {
                Some(bb.pp("downsamplers.0.conv").conv2d(
                    c_out,
                    c_out,
                    3,
                    2,
                    config.downsample_padding,
                )?)
            } else {
                None
            };
            down.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
        }

        let last = ch[n - 1];
        let mb = b.pp("mid_block");
        let mut mid_res = vec![ResnetBlock::new(
            mb.pp("resnets.0"),
            last,
            last,
            Some(temb),
            g,
            eps,
        )?];
        let mid_attn = vec![SpatialTransformer::new(
            mb.pp("attentions.0"),
            last,
            ctx[n - 1],
            heads[n - 1],
            depths[n - 1],
            g,
            lin,
        )?];
        mid_res.push(ResnetBlock::new(
            mb.pp("resnets.1"),
            last,
            last,
            Some(temb),
            g,
            eps,
        )?);
        let mid = MidBlock {
            resnets: mid_res,
            attentions: mid_attn,
        };

        let rch: Vec<usize> = ch.iter().rev().copied().collect();
        let (rheads, rlayers, rdepths, rctx): (Vec<_>, Vec<_>, Vec<_>, Vec<_>) = (
            heads.iter().rev().copied().collect(),
            layers.iter().rev().copied().collect(),
            depths.iter().rev().copied().collect(),
            ctx.iter().rev().copied().collect(),
        );
        let mut up = Vec::with_capacity(n);
        let mut c_out = rch[0];
        for i in 0..n {
            let prev = c_out;
            c_out = rch[i];
            let c_in = rch[(i + 1).min(n - 1)];
            let bb = b.pp(format!("up_blocks.{i}"));
            let cross = config.up_block_types[i] == "CrossAttnUpBlock2D";
            let count = rlayers[i] + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..count {
                let skip = if j + 1 == count { c_in } else { c_out };
                let cin = if j == 0 { prev } else { c_out };
                resnets.push(ResnetBlock::new(
                    bb.pp(format!("resnets.{j}")),
                    cin + skip,
                    c_out,
                    Some(temb),
                    g,
                    eps,
                )?);
                if cross {
                    attentions.push(SpatialTransformer::new(
                        bb.pp(format!("attentions.{j}")),
                        c_out,
                        rctx[i],
                        rheads[i],
                        rdepths[i],
                        g,
                        lin,
                    )?);
                }
            }
            let upsampler = if i + 1 < n {
                Some(bb.pp("upsamplers.0.conv").conv2d(c_out, c_out, 3, 1, 1)?)
            } else {
                None
            };
            up.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
        }
        Ok(UNet {
            conv_in,
            time_1,
            time_2,
            add,
            down,
            mid,
            up,
            norm_out: b.pp("conv_norm_out").group_norm(g, ch[0], eps)?,
            conv_out: b
                .pp("conv_out")
                .conv2d(ch[0], config.out_channels, 3, 1, 1)?,
            config,
        })
    }

    /// diffusers' sinusoidal `Timesteps` projection (`flip_sin_to_cos`,
    /// `freq_shift`) to `dim` channels, computed in f32 as diffusers does.
    fn time_proj(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        let half = dim / 2;
        let denom = half as f64 - self.config.freq_shift;
        let freqs: Vec<f32> = (0..half)
            .map(|i| ((-(10000f64.ln() as f32) * i as f32) / denom as f32).exp())
            .collect();
        let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
        let arg = t
            .to_dtype(DType::F32)?
            .unsqueeze(1)?
            .broadcast_mul(&freqs)?;
        let (sin, cos) = (arg.sin()?, arg.cos()?);
        let e = if self.config.flip_sin_to_cos {
            Tensor::cat(&[cos, sin], 1)?
        } else {
            Tensor::cat(&[sin, cos], 1)?
        };
        if dim % 2 == 1 {
            e.pad_with_zeros(1, 0, 1)
        } else {
            Ok(e)
        }
    }

    /// Whether this UNet needs [`Added`] conditioning (SDXL).
    pub fn needs_added(&self) -> bool {
        self.add.is_some()
    }

    /// One denoising call. `timesteps` is `[B]` (f32, fractional for the
    /// Euler family); `rows` gives each adapter's strength per row.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        rows: &Rows,
    ) -> Result<Tensor> {
        self.forward_added(sample, timesteps, context, None, rows)
    }

    /// [`forward_added`](Self::forward_added) with both parts of a [`Cond`].
    pub fn forward_cond(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        cond: &Cond,
        rows: &Rows,
    ) -> Result<Tensor> {
        self.forward_added(sample, timesteps, &cond.ctx, cond.added.as_ref(), rows)
    }

    /// [`forward`](Self::forward) with SDXL's extra conditioning (required
    /// when the config has `addition_embed_type`, ignored otherwise).
    pub fn forward_added(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<&Added>,
        rows: &Rows,
    ) -> Result<Tensor> {
        let dtype = sample.dtype();
        let mut x = if self.config.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        let t = self
            .time_proj(timesteps, self.config.block_out_channels[0])?
            .to_dtype(dtype)?;
        let mut emb = self
            .time_2
            .forward(&self.time_1.forward(&t, rows)?.silu()?, rows)?;
        if let Some((l1, l2)) = &self.add {
            let a = added.ok_or_else(|| {
                candle_core::Error::Msg(
                    "this UNet (SDXL) needs pooled text embeddings and size ids".into(),
                )
            })?;
            let b = a.time_ids.dim(0)?;
            let dim = self.config.addition_time_embed_dim.unwrap_or(256);
            let ids = self
                .time_proj(&a.time_ids.flatten_all()?, dim)?
                .reshape((b, ()))?;
            let x =
                Tensor::cat(&[&a.text_embeds.to_dtype(DType::F32)?, &ids], 1)?.to_dtype(dtype)?;
            let aug = l2.forward(&l1.forward(&x, rows)?.silu()?, rows)?;
            emb = (emb + aug)?;
        }
        x = self.conv_in.forward(&x, rows)?;
        let mut skips = vec![x.clone()];
        for blk in &self.down {
            for (j, r) in blk.resnets.iter().enumerate() {
                x = r.forward(&x, Some(&emb), rows)?;
                if let Some(a) = blk.attentions.get(j) {
                    x = a.forward(&x, context, rows)?;
                }
                skips.push(x.clone());
            }
            if let Some(d) = &blk.downsampler {
                x = d.forward(&x, rows)?;
                skips.push(x.clone());
            }
        }
        x = self.mid.resnets[0].forward(&x, Some(&emb), rows)?;
        x = self.mid.attentions[0].forward(&x, context, rows)?;
        x = self.mid.resnets[1].forward(&x, Some(&emb), rows)?;
        for blk in &self.up {
            for (j, r) in blk.resnets.iter().enumerate() {
                let skip = skips.pop().expect("one skip per up resnet");
                x = Tensor::cat(&[&x, &skip], 1)?;
                x = r.forward(&x, Some(&emb), rows)?;
                if let Some(a) = blk.attentions.get(j) {
                    x = a.forward(&x, context, rows)?;
                }
            }
            if let Some(u) = &blk.upsampler {
                // Upsample to the next skip's size: equal to ×2 when the
                // latent divides by 2^levels, and what diffusers'
                // `forward_upsample_size` does when it does not.
                let (h, w) = match skips.last() {
                    Some(s) => (s.dim(2)?, s.dim(3)?),
                    None => (x.dim(2)? * 2, x.dim(3)? * 2),
                };
                x = u.forward(&x.upsample_nearest2d(h, w)?, rows)?;
            }
        }
        let x = self.norm_out.forward(&x)?.silu()?;
        self.conv_out.forward(&x, rows)
    }
}
