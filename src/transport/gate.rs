//! Facilitated Transport gates, as SPM's reference computes them
//! (spm-reference.md §3.2):
//!
//! - `clipcos` = cosine of the *flattened* 77×D `last_hidden_state` of the
//!   prompt and of the concept (every position, BOS and padding included);
//! - `tokenuni` = |P ∩ T| / |T|, P and T the sets of ids of the padded
//!   prompt and concept rows minus the special ids (BOS, EOS, pad);
//! - a concept's score under the metric (`clipcos`, `tokenuni`, their max
//!   `clipcos_tokenuni` — the default — or `allone`, a constant 1);
//! - a membrane's **rate** m = facilitate · max over its concepts;
//! - its **strength** = m² by default, because the reference multiplies both
//!   LoRA factors by m (quirk 3.4.1); `Curve::Linear` gives m.
//!
//! There is no threshold, sigmoid or temperature, as in the reference.
//! Concept encodings are computed once per membrane set; a prompt's scores
//! against every concept are cached (LRU, 4096 prompts), so a repeated
//! prompt costs a look-up and a fold (≈1.5 µs).

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::prompt::normalize;
use super::strict::{self, Normalize};
use super::tokenizer::ClipTokenizer;
use crate::adapter::Adapter;
use crate::convert::Curve;
use crate::error::{Error, Result};
use crate::model::clip::{cosine, ClipTextModel};

/// CLIP's begin/end-of-text ids.
pub const BOS: u32 = 49406;
pub const EOS: u32 = 49407;
/// Padded sequence length of every SD text encoder.
pub const MAX_LEN: usize = 77;

/// How a concept's score is formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Metric {
    Clipcos,
    Tokenuni,
    /// max(clipcos, tokenuni): the reference default.
    ClipcosTokenuni,
    /// Always 1: no FT (the membrane at full strength).
    Allone,
}

impl Metric {
    /// The name users type (`--metric`, the `metric` field), from the one
    /// table clap and serde already share.
    pub fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self)
            .expect("no skipped variants")
            .get_name()
            .to_string()
    }

    pub fn needs_encoder(self) -> bool {
        matches!(self, Metric::Clipcos | Metric::ClipcosTokenuni)
    }
}

/// Options of one gate computation.
#[derive(Debug, Clone, Copy)]
pub struct GateOptions {
    pub metric: Metric,
    pub curve: Curve,
    /// Multiplies the rate before the curve (`--facilitate_factor`);
    /// finite and ≥ 0 (a negative factor would square back to a positive
    /// strength under the reference curve).
    pub facilitate: f64,
    /// How the prompt text is prepared (reference: as typed).
    pub normalize: Normalize,
}

/// The one rule for a facilitate factor, shared by the CLI, the sidecar and
/// the engine: finite and ≥ 0, because a negative factor would square back
/// to a positive strength under the reference curve.
pub fn check_facilitate(f: f64) -> std::result::Result<f64, String> {
    if f.is_finite() && f >= 0.0 {
        Ok(f)
    } else {
        Err(format!("{f} is not a finite number ≥ 0"))
    }
}

/// A WebUI prompt as the gates see it: folded under `mode`, WebUI syntax
/// removed, split into its `AND` sub-prompts (see `transport::prompt`).
pub fn sub_prompts(prompt: &str, mode: Normalize) -> Vec<String> {
    normalize(&strict::apply(mode, prompt))
}

impl Default for GateOptions {
    fn default() -> Self {
        GateOptions {
            metric: Metric::ClipcosTokenuni,
            curve: Curve::Reference,
            facilitate: 1.0,
            normalize: Normalize::Reference,
        }
    }
}

/// A membrane as the gate engine knows it.
#[derive(Debug, Clone, Serialize)]
pub struct Membrane {
    pub name: String,
    pub file: PathBuf,
    pub concepts: Vec<String>,
    pub rank: Option<usize>,
    pub arch: String,
}

impl Membrane {
    /// Read a membrane's concepts (metadata `prompts`, also kept by
    /// `spm convert --to kohya`) and facts from its file.
    pub fn from_file(path: &Path) -> Result<Membrane> {
        Self::from_adapter(&Adapter::load(path, None)?)
    }

    /// The same from an adapter already loaded (`spm generate` also
    /// applies it, and need not read the file twice).
    pub fn from_adapter(ad: &Adapter) -> Result<Membrane> {
        let path = ad.path.as_path();
        let concepts = ad.concepts();
        if concepts.is_empty() {
            return Err(Error::file(
                path,
                "no concepts: metadata `prompts` is missing or empty",
            ));
        }
        Ok(Membrane {
            name: path
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default(),
            file: path.to_path_buf(),
            concepts,
            rank: ad.common_rank_alpha().0,
            arch: ad.arch.name().into(),
        })
    }
}

/// A membrane's gate for one prompt.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Gate {
    pub rate: f64,
    pub strength: f64,
    /// Highest cosine over the concepts (None without a text encoder).
    pub clipcos: Option<f64>,
    /// Highest token recall over the concepts.
    pub tokenuni: f64,
}

/// One text, encoded: its id set without special ids, and its flattened
/// hidden state when an encoder is loaded.
struct Encoded {
    tokens: HashSet<u32>,
    embedding: Option<Vec<f32>>,
}

struct Prepared {
    membrane: Membrane,
    concepts: Vec<Encoded>,
    /// The concepts folded by `--normalize strict`, where that changes any.
    strict: Option<Vec<Encoded>>,
}

/// A prompt's (cosine, token recall) against every concept of every
/// membrane, in membrane order. This — not the 77×D embedding — is what the
/// prompt cache keeps: a few bytes per concept, and a repeated prompt costs
/// a look-up and a fold.
type Scores = Vec<Vec<(Option<f64>, f64)>>;

/// Set when the request that asked for a gate is gone (timed out or
/// disconnected): checked between sub-prompts so abandoned work stops.
pub type Cancel = AtomicBool;

/// SDXL's second encoder with its own tokenizer and pad. With it, FT's
/// embedding is the conditioning the SDXL UNet sees: both encoders'
/// penultimate hidden states side by side (77 × 2048), compared by one
/// cosine; token recall stays on the first tokenizer (the BPE is shared).
/// The reference has no SDXL FT; this is its natural extension, and SD1/SD2
/// gates are unchanged.
#[derive(Clone)]
pub struct Second {
    pub encoder: Arc<ClipTextModel>,
    pub tokenizer: Arc<ClipTokenizer>,
    pub pad_id: u32,
}

/// Computes gates; shareable between threads.
pub struct Engine {
    tokenizer: Arc<ClipTokenizer>,
    encoder: Option<Arc<ClipTextModel>>,
    pad_id: u32,
    second: Option<Second>,
    membranes: Vec<Prepared>,
    cache: Mutex<lru::LruCache<String, Arc<Scores>>>,
}

impl Engine {
    /// `pad_id`: 49407 (EOS) for SD1's tokenizer, 0 ("!") for SD2's.
    pub fn new(tokenizer: ClipTokenizer, encoder: Option<ClipTextModel>, pad_id: u32) -> Engine {
        Self::shared(Arc::new(tokenizer), encoder.map(Arc::new), pad_id)
    }

    /// An engine over a tokenizer and encoder that something else uses too
    /// (`spm generate` conditions its UNet with the same encoder).
    pub fn shared(
        tokenizer: Arc<ClipTokenizer>,
        encoder: Option<Arc<ClipTextModel>>,
        pad_id: u32,
    ) -> Engine {
        Engine {
            tokenizer,
            encoder,
            pad_id,
            second: None,
            membranes: Vec::new(),
            cache: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(4096).expect("non-zero"),
            )),
        }
    }

    /// An engine with the same tokenizer and encoder and no membranes, to
    /// prepare a new membrane set while this one keeps serving.
    pub fn sibling(&self) -> Engine {
        Engine {
            tokenizer: self.tokenizer.clone(),
            encoder: self.encoder.clone(),
            pad_id: self.pad_id,
            second: self.second.clone(),
            membranes: Vec::new(),
            cache: Mutex::new(lru::LruCache::new(
                NonZeroUsize::new(4096).expect("non-zero"),
            )),
        }
    }

    /// Make this an SDXL engine (before membranes are set).
    pub fn with_second(mut self, second: Second) -> Engine {
        self.second = Some(second);
        self
    }

    pub fn has_encoder(&self) -> bool {
        self.encoder.is_some()
    }

    /// Whether gates compare SDXL's two-encoder conditioning.
    pub fn is_xl(&self) -> bool {
        self.second.is_some()
    }

    pub fn membranes(&self) -> impl Iterator<Item = &Membrane> {
        self.membranes.iter().map(|p| &p.membrane)
    }

    /// Replace the membrane set, encoding every concept once (one batch).
    pub fn set_membranes(&mut self, membranes: Vec<Membrane>) -> Result<()> {
        let texts: Vec<&str> = membranes
            .iter()
            .flat_map(|m| m.concepts.iter().map(String::as_str))
            .collect();
        let mut encoded = self.encode_batch(&texts)?.into_iter();
        let mut prepared: Vec<Prepared> = membranes
            .into_iter()
            .map(|m| {
                let concepts = (0..m.concepts.len())
                    .map(|_| encoded.next().expect("one per concept"))
                    .collect();
                Prepared {
                    membrane: m,
                    concepts,
                    strict: None,
                }
            })
            .collect();
        for p in &mut prepared {
            let folded: Vec<String> = p
                .membrane
                .concepts
                .iter()
                .map(|c| strict::fold(c))
                .collect();
            if folded != p.membrane.concepts {
                let refs: Vec<&str> = folded.iter().map(String::as_str).collect();
                p.strict = Some(self.encode_batch(&refs)?);
            }
        }
        self.membranes = prepared;
        self.cache.lock().expect("cache lock").clear();
        Ok(())
    }

    fn ids(&self, text: &str) -> Vec<u32> {
        self.tokenizer.encode_padded(text, MAX_LEN, self.pad_id)
    }

    fn token_set(&self, ids: &[u32]) -> HashSet<u32> {
        let specials = self.tokenizer.special_ids(self.pad_id);
        ids.iter()
            .copied()
            .filter(|i| !specials.contains(i))
            .collect()
    }

    fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Encoded>> {
        let rows: Vec<Vec<u32>> = texts.iter().map(|t| self.ids(t)).collect();
        let embeddings: Vec<Option<Vec<f32>>> = match (&self.encoder, &self.second) {
            (Some(enc), None) if !rows.is_empty() => {
                enc.embed(&rows)?.into_iter().map(Some).collect()
            }
            (Some(enc), Some(xl)) if !rows.is_empty() => {
                // Flattened te1 rows then te2 rows: the same dot product
                // and norms as the [77, 2048] concatenation, so the same
                // cosine.
                let rows2: Vec<Vec<u32>> = texts
                    .iter()
                    .map(|t| xl.tokenizer.encode_padded(t, MAX_LEN, xl.pad_id))
                    .collect();
                let a = enc.embed_penultimate(&rows)?;
                let b = xl.encoder.embed_penultimate(&rows2)?;
                a.into_iter()
                    .zip(b)
                    .map(|(mut a, b)| {
                        a.extend(b);
                        Some(a)
                    })
                    .collect()
            }
            _ => vec![None; rows.len()],
        };
        // NaN/inf weights give NaN cosines, which JSON can only show as
        // `null`: an error instead of a poisoned gate.
        if embeddings
            .iter()
            .flatten()
            .any(|e| e.iter().any(|x| !x.is_finite()))
        {
            return Err(Error::usage(
                "the text encoder produced NaN/inf hidden states (its weights are not finite)",
            ));
        }
        Ok(rows
            .iter()
            .zip(embeddings)
            .map(|(r, embedding)| Encoded {
                tokens: self.token_set(r),
                embedding,
            })
            .collect())
    }

    /// Encode one probe text, so that a broken encoder fails at load.
    pub fn probe(&self) -> Result<()> {
        self.encode_batch(&["a photo"]).map(|_| ())
    }

    /// Tokens of a text before the 77-token cut, for request limits.
    pub fn token_count(&self, text: &str) -> usize {
        self.tokenizer.encode(text).len()
    }

    /// The highest id the tokenizer can produce.
    pub fn max_token_id(&self) -> u32 {
        self.tokenizer.max_id()
    }

    fn scores_cached(&self, text: &str, mode: Normalize) -> Result<Arc<Scores>> {
        // Strict scores differ only where a concept folds differently; the
        // key carries the mode so the two never mix.
        let key = match mode {
            Normalize::Reference => text.to_string(),
            Normalize::Strict => format!("\u{0}strict\u{0}{text}"),
        };
        if let Some(e) = self.cache.lock().expect("cache lock").get(&key) {
            return Ok(e.clone());
        }
        let prompt = self.encode_batch(&[text])?.pop().expect("one row");
        let scores: Scores = self
            .membranes
            .iter()
            .map(|p| {
                let concepts = match (mode, &p.strict) {
                    (Normalize::Strict, Some(folded)) => folded,
                    _ => &p.concepts,
                };
                concepts.iter().map(|c| concept_score(&prompt, c)).collect()
            })
            .collect();
        let scores = Arc::new(scores);
        self.cache
            .lock()
            .expect("cache lock")
            .put(key, scores.clone());
        Ok(scores)
    }

    /// Gates of the named membranes (all when `names` is None) for one
    /// WebUI prompt. `AND` sub-prompts are gated separately; each membrane
    /// keeps its highest rate.
    pub fn gate(
        &self,
        prompt: &str,
        names: Option<&[String]>,
        opts: &GateOptions,
    ) -> Result<Vec<(String, Gate)>> {
        self.gate_parts(&sub_prompts(prompt, opts.normalize), names, opts, None)
    }

    /// [`Engine::gate`] of a prompt already split by [`sub_prompts`] (the
    /// sidecar splits once, to count before it computes), giving up with
    /// [`Error::Cancelled`] between sub-prompts once `cancel` is set.
    pub fn gate_parts(
        &self,
        parts: &[String],
        names: Option<&[String]>,
        opts: &GateOptions,
        cancel: Option<&Cancel>,
    ) -> Result<Vec<(String, Gate)>> {
        if opts.metric.needs_encoder() && self.encoder.is_none() {
            return Err(Error::usage(format!(
                "metric {} needs a text encoder (--text-encoder); only tokenuni and allone work without one",
                opts.metric.name()
            )));
        }
        check_facilitate(opts.facilitate)
            .map_err(|m| Error::usage(format!("`facilitate`: {m}")))?;
        let selected: Vec<usize> = match names {
            None => (0..self.membranes.len()).collect(),
            Some(names) => names
                .iter()
                .map(|n| {
                    self.membranes
                        .iter()
                        .position(|p| &p.membrane.name == n)
                        .ok_or_else(|| Error::usage(format!("unknown membrane `{n}`")))
                })
                .collect::<Result<_>>()?,
        };
        if parts.is_empty() {
            return Err(Error::usage("no sub-prompts to gate"));
        }
        let scored = parts
            .iter()
            .map(|p| {
                if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                    return Err(Error::Cancelled);
                }
                self.scores_cached(p, opts.normalize)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(selected
            .into_iter()
            .map(|k| {
                let best = scored
                    .iter()
                    .map(|s| membrane_gate(&s[k], opts))
                    .max_by(|a, b| a.rate.total_cmp(&b.rate))
                    .expect("at least one sub-prompt");
                (self.membranes[k].membrane.name.clone(), best)
            })
            .collect())
    }
}

/// (cosine of the flattened hidden states, token recall) of a prompt
/// against one concept.
fn concept_score(prompt: &Encoded, c: &Encoded) -> (Option<f64>, f64) {
    let cos = match (&prompt.embedding, &c.embedding) {
        (Some(a), Some(b)) => Some(cosine(a, b)),
        _ => None,
    };
    // The reference divides by |T| unguarded; an empty target (a concept
    // of only special tokens) scores 0 here instead of NaN.
    let tok = if c.tokens.is_empty() {
        0.0
    } else {
        c.tokens.intersection(&prompt.tokens).count() as f64 / c.tokens.len() as f64
    };
    (cos, tok)
}

fn membrane_gate(concepts: &[(Option<f64>, f64)], opts: &GateOptions) -> Gate {
    let mut best_score = f64::NEG_INFINITY;
    let mut best_cos: Option<f64> = None;
    let mut best_tok = 0f64;
    for &(cos, tok) in concepts {
        let score = match opts.metric {
            Metric::Clipcos => cos.unwrap_or(0.0),
            Metric::Tokenuni => tok,
            Metric::ClipcosTokenuni => cos.unwrap_or(0.0).max(tok),
            Metric::Allone => 1.0,
        };
        best_score = best_score.max(score);
        best_cos = match (best_cos, cos) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        best_tok = best_tok.max(tok);
    }
    // No clamping: a negative cosine stays negative, as in the reference.
    let rate = opts.facilitate * best_score;
    let strength = match opts.curve {
        Curve::Reference => rate * rate,
        Curve::Linear => rate,
    };
    Gate {
        rate,
        strength,
        clipcos: best_cos,
        tokenuni: best_tok,
    }
}
