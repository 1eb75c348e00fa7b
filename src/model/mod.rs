//! The networks and samplers of Stable Diffusion, written for SPM.
//!
//! One module per network part, each a config struct, a `new(builder)` that
//! only builds and a `forward` that only computes (candle-transformers'
//! layout): [`unet`], [`vae`], [`clip`]; their layers and the one place
//! adapters live in [`nn`]; checkpoint layouts in [`load`]; the whole model
//! in [`sd`]. `spm generate` and the trainer call the same code.
pub mod autograd;
pub mod clip;
pub mod kernels;
pub mod load;
pub mod nn;
pub mod noise;
pub mod scheduler;
pub mod sd;
pub mod unet;
pub mod vae;
