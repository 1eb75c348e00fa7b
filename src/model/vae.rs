//! diffusers' `AutoencoderKL`: the decoder turns latents into images, the
//! encoder (the trainer's `--images` option) turns images into latents.
//!
//! Same module tree as diffusers (`encoder.down_blocks.N.resnets.M…`,
//! `decoder.up_blocks…`, `quant_conv`, `post_quant_conv`), so a `vae/`
//! folder loads as is; `load` renames LDM single files onto it.
//! `scaling_factor` comes from the config (0.18215 for SD1/SD2).

use candle_core::{Result, Tensor};
use serde::Deserialize;

use super::nn::{attention, Builder, Conv2d, GroupNorm, Linear, Rows};
use super::unet::ResnetBlock;

/// The fields of a diffusers `vae/config.json` this network reads.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "two")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "sf")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    /// SDXL's VAE overflows in fp16: diffusers decodes it in fp32, and so
    /// does this one (the weights are then kept in f32).
    #[serde(default)]
    pub force_upcast: bool,
}

fn three() -> usize {
    3
}
fn two() -> usize {
    2
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn sf() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}

impl VaeConfig {
    /// The SD1/SD2 VAE (`vae/config.json` of SD1.5 and SD2.1).
    pub fn sd() -> Self {
        serde_json::from_str(r#"{"block_out_channels":[128,256,512,512]}"#).expect("built-in")
    }

    /// SDXL's VAE (`vae/config.json` of SDXL 1.0 base): the same network,
    /// scaled by 0.13025 and decoded in fp32.
    pub fn sdxl() -> Self {
        serde_json::from_str(
            r#"{"block_out_channels":[128,256,512,512],"scaling_factor":0.13025,"force_upcast":true}"#,
        )
        .expect("built-in")
    }

    pub fn check(&self) -> std::result::Result<(), String> {
        if self.block_out_channels.is_empty() {
            return Err("block_out_channels is empty".into());
        }
        for t in &self.down_block_types {
            if t != "DownEncoderBlock2D" {
                return Err(format!("down block type `{t}` is not supported"));
            }
        }
        for t in &self.up_block_types {
            if t != "UpDecoderBlock2D" {
                return Err(format!("up block type `{t}` is not supported"));
            }
        }
        for c in &self.block_out_channels {
            if c % self.norm_num_groups != 0 {
                return Err(format!(
                    "{c} channels do not split into {} norm groups",
                    self.norm_num_groups
                ));
            }
        }
        Ok(())
    }

    /// Pixels per latent cell: 2^(blocks − 1), 8 for SD.
    pub fn factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// The single-head attention of the VAE's mid block (its own GroupNorm,
/// q/k/v with bias, residual).
#[derive(Debug)]
struct SelfAttention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl SelfAttention {
    fn new(b: Builder, c: usize, groups: usize) -> Result<Self> {
        Ok(SelfAttention {
            norm: b.pp("group_norm").group_norm(groups, c, 1e-6)?,
            q: b.pp("to_q").linear(c, c, true)?,
            k: b.pp("to_k").linear(c, c, true)?,
            v: b.pp("to_v").linear(c, c, true)?,
            out: b.pp("to_out.0").linear(c, c, true)?,
        })
    }

    fn forward(&self, x: &Tensor, rows: &Rows) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let s = self
            .norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.q.forward(&s, rows)?;
        let k = self.k.forward(&s, rows)?;
        let v = self.v.forward(&s, rows)?;
        let o = attention(&q, &k, &v, (c as f64).powf(-0.5))?;
        let o = self.out.forward(&o, rows)?;
        let o = o.transpose(1, 2)?.reshape((b, c, h, w))?;
        o + x
    }
}

#[derive(Debug)]
struct Mid {
    res1: ResnetBlock,
    attn: Option<SelfAttention>,
    res2: ResnetBlock,
}

impl Mid {
    fn new(b: Builder, c: usize, cfg: &VaeConfig) -> Result<Self> {
        let g = cfg.norm_num_groups;
        Ok(Mid {
            res1: ResnetBlock::new(b.pp("resnets.0"), c, c, None, g, 1e-6)?,
            attn: if cfg.mid_block_add_attention {
                Some(SelfAttention::new(b.pp("attentions.0"), c, g)?)
            } else {
                None
            },
            res2: ResnetBlock::new(b.pp("resnets.1"), c, c, None, g, 1e-6)?,
        })
    }

    fn forward(&self, x: &Tensor, rows: &Rows) -> Result<Tensor> {
        let mut x = self.res1.forward(x, None, rows)?;
        if let Some(a) = &self.attn {
            x = a.forward(&x, rows)?;
        }
        self.res2.forward(&x, None, rows)
    }
}

#[derive(Debug)]
struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<(Vec<ResnetBlock>, Option<Conv2d>)>,
    mid: Mid,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(b: Builder, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let mut blocks = Vec::new();
        let mut c_out = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let c_in = c_out;
            c_out = c;
            let bb = b.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let cin = if j == 0 { c_in } else { c_out };
                    ResnetBlock::new(bb.pp(format!("resnets.{j}")), cin, c_out, None, g, 1e-6)
                })
                .collect::<Result<_>>()?;
            // diffusers pads (0,1,0,1) and convolves without padding here.
            let down = if i + 1 < ch.len() {
                Some(bb.pp("downsamplers.0.conv").conv2d(c_out, c_out, 3, 2, 0)?)
            } else {
                None
            };
            blocks.push((resnets, down));
        }
        let last = ch[ch.len() - 1];
        Ok(Encoder {
            conv_in: b.pp("conv_in").conv2d(cfg.in_channels, ch[0], 3, 1, 1)?,
            blocks,
            mid: Mid::new(b.pp("mid_block"), last, cfg)?,
            norm_out: b.pp("conv_norm_out").group_norm(g, last, 1e-6)?,
            conv_out: b
                .pp("conv_out")
                .conv2d(last, 2 * cfg.latent_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor, rows: &Rows) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x, rows)?;
        for (resnets, down) in &self.blocks {
            for r in resnets {
                x = r.forward(&x, None, rows)?;
            }
            if let Some(d) = down {
                x = d.forward(&x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?, rows)?;
            }
        }
        let x = self.mid.forward(&x, rows)?;
        self.conv_out
            .forward(&self.norm_out.forward(&x)?.silu()?, rows)
    }
}

#[derive(Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid: Mid,
    blocks: Vec<(Vec<ResnetBlock>, Option<Conv2d>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn dtype(&self) -> candle_core::DType {
        self.conv_in.weight.dtype()
    }

    fn new(b: Builder, cfg: &VaeConfig) -> Result<Self> {
        let rch: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let mut blocks = Vec::new();
        let mut c_out = rch[0];
        for (i, &c) in rch.iter().enumerate() {
            let prev = c_out;
            c_out = c;
            let bb = b.pp(format!("up_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let cin = if j == 0 { prev } else { c_out };
                    ResnetBlock::new(bb.pp(format!("resnets.{j}")), cin, c_out, None, g, 1e-6)
                })
                .collect::<Result<_>>()?;
            let up = if i + 1 < rch.len() {
                Some(bb.pp("upsamplers.0.conv").conv2d(c_out, c_out, 3, 1, 1)?)
            } else {
                None
            };
            blocks.push((resnets, up));
        }
        let first = cfg.block_out_channels[0];
        Ok(Decoder {
            conv_in: b
                .pp("conv_in")
                .conv2d(cfg.latent_channels, rch[0], 3, 1, 1)?,
            mid: Mid::new(b.pp("mid_block"), rch[0], cfg)?,
            blocks,
            norm_out: b.pp("conv_norm_out").group_norm(g, first, 1e-6)?,
            conv_out: b.pp("conv_out").conv2d(first, cfg.out_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, z: &Tensor, rows: &Rows) -> Result<Tensor> {
        let mut x = self.conv_in.forward(z, rows)?;
        x = self.mid.forward(&x, rows)?;
        for (resnets, up) in &self.blocks {
            for r in resnets {
                x = r.forward(&x, None, rows)?;
            }
            if let Some(u) = up {
                let (h, w) = (x.dim(2)? * 2, x.dim(3)? * 2);
                x = u.forward(&x.upsample_nearest2d(h, w)?, rows)?;
            }
        }
        self.conv_out
            .forward(&self.norm_out.forward(&x)?.silu()?, rows)
    }
}

/// The latent distribution the encoder gives: mean and standard deviation.
pub struct LatentDist {
    pub mean: Tensor,
    pub std: Tensor,
}

/// `AutoencoderKL`.
#[derive(Debug)]
pub struct Vae {
    encoder: Option<Encoder>,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    pub config: VaeConfig,
}

impl Vae {
    /// Build the decoder, and the encoder too when `with_encoder` (the
    /// encoder's weights are then required; generation does not need them).
    pub fn new(b: Builder, config: VaeConfig, with_encoder: bool) -> Result<Self> {
        config.check().map_err(candle_core::Error::msg)?;
        let l = config.latent_channels;
        let (encoder, quant_conv) = if with_encoder {
            (
                Some(Encoder::new(b.pp("encoder"), &config)?),
                if config.use_quant_conv {
                    Some(b.pp("quant_conv").conv2d(2 * l, 2 * l, 1, 1, 0)?)
                } else {
                    None
                },
            )
        } else {
            (None, None)
        };
        Ok(Vae {
            encoder,
            decoder: Decoder::new(b.pp("decoder"), &config)?,
            quant_conv,
            post_quant_conv: if config.use_post_quant_conv {
                Some(b.pp("post_quant_conv").conv2d(l, l, 1, 1, 0)?)
            } else {
                None
            },
            config,
        })
    }

    /// Latents (already divided by `scaling_factor`) → image in [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let rows = Rows::none();
        let z = &z.to_dtype(self.decoder.dtype())?;
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(z, &rows)?,
            None => z.clone(),
        };
        self.decoder.forward(&z, &rows)
    }

    /// Image in [-1, 1] → latent distribution (diffusers'
    /// `DiagonalGaussianDistribution`: log-variance clamped to [-30, 20]).
    pub fn encode(&self, x: &Tensor) -> Result<LatentDist> {
        let rows = Rows::none();
        let enc = self
            .encoder
            .as_ref()
            .ok_or_else(|| candle_core::Error::msg("the VAE was loaded without its encoder"))?;
        let x = &x.to_dtype(self.decoder.dtype())?;
        let mut h = enc.forward(x, &rows)?;
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h, &rows)?;
        }
        let l = self.config.latent_channels;
        let mean = h.narrow(1, 0, l)?;
        let logvar = h.narrow(1, l, l)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok(LatentDist { mean, std })
    }
}
