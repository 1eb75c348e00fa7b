//! # spm — Concept Semi-Permeable Membranes for Stable Diffusion
//!
//! An SPM is a rank-1 LoRA-style adapter on every Linear/Conv2d inside the
//! UNet's transformer blocks that erases one concept. This crate reads,
//! converts, merges and bakes such adapters (and any kohya/PEFT LoRA) for
//! SD1.x, SD2.x and SDXL.
//!
//! Layout, one concern per module:
//! - [`io`]: safetensors (zero-copy reads, streamed writes), pickles read as
//!   data, and [`io::output`]: the rules that keep users' files safe (no
//!   output is, contains or lies inside an input; atomic, ordinary
//!   permissions; `--force` swaps only spm's own output).
//! - [`schemes`]: module inventories (data in `converters/`), key grammar of
//!   every naming scheme.
//! - [`adapter`]: a file resolved into modules of an architecture.
//! - [`inspect`], [`convert`], [`merge`], [`bake`], [`extract`]: the
//!   commands' logic.
//! - [`transport`]: Facilitated Transport (tokenizer, CLIP text encoder,
//!   WebUI prompt syntax, optional strict folding, the gate formula) and
//!   [`serve`], its HTTP sidecar.
//!
//! Loading a membrane and checking it covers every transformer layer:
//!
//! ```
//! use std::path::Path;
//! use spm::adapter::Adapter;
//! use spm::schemes::{Arch, Class, Component, Scheme};
//!
//! let spm = Adapter::load(Path::new("fixtures/data/sd1/spm.safetensors"), None)?;
//! assert_eq!(spm.arch, Arch::Sd1);
//! assert_eq!(spm.scheme, Some(Scheme::Spm));
//! assert_eq!(spm.concepts(), ["pikachu"]);
//! let expected = spm.inventory().count(Component::Unet, Class::Transformer);
//! assert_eq!((spm.modules.len(), expected), (192, 192));
//! # Ok::<(), spm::Error>(())
//! ```

pub mod adapter;
pub mod bake;
pub mod convert;
pub mod error;
pub mod extract;
pub mod generate;
pub mod inspect;
pub mod io;
pub mod merge;
pub mod model;
pub mod schemes;
pub mod serve;
pub mod train;
pub mod transport;

pub use error::{Error, Result};

/// candle re-derives its default thread count on every CPU matmul
/// (`num_cpus::get_physical`, a parse of /proc/cpuinfo on Linux) unless
/// `RAYON_NUM_THREADS` is set: on small networks that parse cost more than
/// the arithmetic (2× on the tiny training runs). The same number, fixed
/// once, before any thread starts.
pub fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var(
            "RAYON_NUM_THREADS",
            num_cpus::get_physical().max(1).to_string(),
        );
    }
}
