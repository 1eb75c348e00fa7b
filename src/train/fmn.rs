//! Forget-Me-Not attention re-steering (SHI-Labs/Forget-Me-Not
//! `train_attn.py`, trainer-methods.md §2).
//!
//! The loss is the plain L2 norm (not squared, not a mean) of every
//! cross-attention probability at the concept's token columns, over the 16
//! `attn2` layers, all heads and all query pixels; the UNet's output is
//! discarded. With `use_pooler` the reference also marks every column whose
//! id is `<|endoftext|>` — which on SD1, whose tokenizer pads with that id,
//! is the EOS *and all the padding* ([`Mask::Pooler`], the default);
//! [`Mask::EosOnly`] marks the first EOS only, [`Mask::Concept`] none.
//!
//! Data-free by default: the "concept images" are latents the base model
//! itself samples for the prompt (a deviation from the reference, which
//! reads photos; `--images` does that, through the VAE encoder: short side
//! resized to the resolution, bilinear, then a center crop — the reference
//! crops at random — and a fresh `latent_dist.sample()` every step).

/// Read every PNG/JPEG in `dir` (sorted) as `[1, 3, res, res]` in [-1, 1]:
/// the short side resized to `res` (bilinear, torchvision's `Resize`),
/// then the center `res × res`.
pub fn read_images(
    dir: &std::path::Path,
    res: usize,
    dev: &Device,
    dtype: DType,
) -> crate::error::Result<Vec<(std::path::PathBuf, Tensor)>> {
    use crate::error::Error;
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::file(dir, "no .png/.jpg/.jpeg images in this folder"));
    }
    files
        .into_iter()
        .map(|f| {
            let img = image::open(&f)
                .map_err(|e| Error::file(&f, format!("not a readable image: {e}")))?
                .to_rgb8();
            let (w, h) = img.dimensions();
            if w == 0 || h == 0 {
                return Err(Error::file(&f, "empty image"));
            }
            let s = res as f64 / w.min(h) as f64;
            let (nw, nh) = (
                ((w as f64 * s).round() as u32).max(res as u32),
                ((h as f64 * s).round() as u32).max(res as u32),
            );
            let img = image::imageops::resize(&img, nw, nh, image::imageops::FilterType::Triangle);
            let (x0, y0) = ((nw - res as u32) / 2, (nh - res as u32) / 2);
            let crop = image::imageops::crop_imm(&img, x0, y0, res as u32, res as u32).to_image();
            let mut v = vec![0f32; 3 * res * res];
            for (x, y, p) in crop.enumerate_pixels() {
                for c in 0..3 {
                    v[c * res * res + y as usize * res + x as usize] = p[c] as f32 / 127.5 - 1.0;
                }
            }
            let t = Tensor::from_vec(v, (1, 3, res, res), dev)
                .and_then(|t| t.to_dtype(dtype))
                .map_err(|e| Error::usage(e.to_string()))?;
            Ok((f, t))
        })
        .collect()
}

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

use super::{randint, randn, Net, Step, Terms};
use crate::model::nn::AttnProbe;
use crate::model::noise::TorchRng;
use crate::model::unet::Cond;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Mask {
    /// Concept tokens plus every `<|endoftext|>` id (the reference).
    Pooler,
    /// Concept tokens plus the first EOS.
    EosOnly,
    /// Concept tokens only.
    Concept,
}

/// The reference's prompt templates.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// "a photo of {concept}".
    Object,
    /// "a photo in the style of {concept}".
    Style,
}

impl Kind {
    pub fn prompt(self, concept: &str) -> String {
        match self {
            Kind::Object => format!("a photo of {concept}"),
            Kind::Style => format!("a photo in the style of {concept}"),
        }
    }
}

/// The 77 mask positions for `ids` (the padded prompt) and `cids` (the
/// concept's tokens without specials): every occurrence of the concept
/// sub-sequence, plus EOS columns per `mask`.
pub fn token_mask(ids: &[u32], cids: &[u32], eos: u32, mask: Mask) -> Vec<usize> {
    let mut on = vec![false; ids.len()];
    if !cids.is_empty() {
        for i in 0..ids.len() {
            if ids[i..].starts_with(cids) {
                for o in &mut on[i..i + cids.len()] {
                    *o = true;
                }
            }
        }
    }
    match mask {
        Mask::Pooler => {
            for (i, id) in ids.iter().enumerate() {
                if *id == eos {
                    on[i] = true;
                }
            }
        }
        Mask::EosOnly => {
            if let Some(i) = ids.iter().position(|id| *id == eos) {
                on[i] = true;
            }
        }
        Mask::Concept => {}
    }
    on.iter()
        .enumerate()
        .filter(|(_, o)| **o)
        .map(|(i, _)| i)
        .collect()
}

pub struct Fmn {
    /// The prompt's conditioning `[1, …]`.
    pub prompt: Cond,
    /// `[1, 77]` 0/1.
    pub mask: Tensor,
    /// Clean latents `[1, 4, h, w]` to noise (the base model's samples).
    pub latents: Vec<Tensor>,
    /// Encoded photos (`--images`): the VAE's latent distribution, mean and
    /// std already times the scaling factor; each step draws a fresh sample
    /// (`latent_dist.sample()`, as the reference).
    pub encoded: Vec<(Tensor, Tensor)>,
    /// ᾱ of the model's training schedule.
    pub alphas_cumprod: Vec<f32>,
    pub device: Device,
    pub dtype: DType,
}

pub struct Draws {
    /// Into `latents`, then `encoded`.
    pub index: usize,
    pub t: usize,
    pub eps: Tensor,
    /// The latent-distribution sample's noise, for an encoded photo.
    pub sample: Option<Tensor>,
}

impl Fmn {
    /// `√ᾱ_t·x₀ + √(1−ᾱ_t)·ε` (DDPMScheduler.add_noise).
    pub fn noised(&self, x0: &Tensor, eps: &Tensor, t: usize) -> Result<Tensor> {
        let a = self.alphas_cumprod[t] as f64;
        (x0 * a.sqrt())? + (eps * (1.0 - a).sqrt())?
    }

    pub fn loss_at(&self, net: &Net, x_t: &Tensor, t: usize) -> Result<Terms> {
        let probe = Arc::new(AttnProbe::new(self.mask.clone()));
        let _ = net.eps_probed(x_t, t as f64, &self.prompt, probe.clone())?;
        let sums = probe.take();
        if sums.is_empty() {
            candle_core::bail!("no cross-attention layer reported to the probe");
        }
        let total = Tensor::stack(&sums, 0)?.sum_all()?.sqrt()?;
        let mut trace = std::collections::BTreeMap::new();
        trace.insert("layer_sums".into(), Tensor::stack(&sums, 0)?.detach());
        Ok(Terms {
            parts: vec![("attn", total.to_dtype(DType::F64)?.to_scalar::<f64>()?)],
            total,
            trace,
        })
    }
}

impl Step for Fmn {
    type Draws = Draws;

    fn draw(&self, rng: &mut TorchRng) -> crate::error::Result<Draws> {
        let map = |e: candle_core::Error| crate::error::Error::usage(e.to_string());
        let n = self.latents.len() + self.encoded.len();
        let index = randint(rng, 0, n);
        let dims = match self.latents.get(index) {
            Some(l) => l.dims().to_vec(),
            None => self.encoded[index - self.latents.len()].0.dims().to_vec(),
        };
        let sample = if index >= self.latents.len() {
            Some(randn(rng, &dims, &self.device, self.dtype).map_err(map)?)
        } else {
            None
        };
        let t = randint(rng, 0, self.alphas_cumprod.len());
        let eps = randn(rng, &dims, &self.device, self.dtype).map_err(map)?;
        Ok(Draws {
            index,
            t,
            eps,
            sample,
        })
    }

    fn loss(&self, net: &Net, d: &Draws) -> Result<Terms> {
        let x0 = match (self.latents.get(d.index), &d.sample) {
            (Some(l), _) => l.clone(),
            (None, Some(n)) => {
                let (m, s) = &self.encoded[d.index - self.latents.len()];
                (m + (s * n)?)?
            }
            (None, None) => candle_core::bail!("an encoded image needs its sample noise"),
        };
        let x_t = self.noised(&x0, &d.eps, d.t)?;
        self.loss_at(net, &x_t, d.t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// trainer-methods.md §6.3 with the real CLIP ids of "a photo of elon
    /// musk" (49406 320 1125 539 … 49407): SD2 (pad "!" = 0) marks
    /// {4, 5, 6}; SD1 (pad = EOS) marks {4, 5} ∪ {6…76}.
    #[test]
    fn pooler_mask_covers_sd1_padding() {
        let (bos, eos) = (49406, 49407);
        let prompt = [bos, 320, 1125, 539, 11406, 19063, eos];
        let cids = [11406, 19063];
        let pad = |p: u32| {
            let mut v = prompt.to_vec();
            v.resize(77, p);
            v
        };
        assert_eq!(token_mask(&pad(0), &cids, eos, Mask::Pooler), vec![4, 5, 6]);
        let sd1 = token_mask(&pad(eos), &cids, eos, Mask::Pooler);
        assert_eq!(sd1, (4..77).collect::<Vec<_>>());
        assert_eq!(
            token_mask(&pad(eos), &cids, eos, Mask::EosOnly),
            vec![4, 5, 6]
        );
        assert_eq!(token_mask(&pad(eos), &cids, eos, Mask::Concept), vec![4, 5]);
    }
}
