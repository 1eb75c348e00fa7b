//! The reference's `config.yaml` + `prompt.yaml` (Con6924/SPM
//! `src/configs/config.py`, `prompt.py`), read with the same field names
//! and defaults. Unlike pydantic, an unknown field is an error naming it:
//! a misspelt `la_strenght` silently training at the default is the bug
//! this prevents.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::spm::Setting;
use crate::error::{Error, Result};

/// Numbers the reference writes as strings (`guidance_scale: "1.0"`).
pub fn de_num<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        F(f64),
        S(String),
    }
    match N::deserialize(d)? {
        N::F(f) => Ok(f),
        N::S(s) => s
            .trim()
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("`{s}` is not a number"))),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootConfig {
    pub prompts_file: Option<String>,
    pub pretrained_model: PretrainedModel,
    #[serde(default)]
    pub network: Network,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub save: SaveConfig,
    #[serde(default)]
    pub logging: Option<serde_norway::Value>,
    #[serde(default)]
    pub inference: Option<serde_norway::Value>,
    #[serde(default)]
    pub other: Option<Other>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainedModel {
    pub name_or_path: String,
    #[serde(default)]
    pub v2: bool,
    #[serde(default)]
    pub v_pred: bool,
    /// Read, and ignored as the reference ignores it in training.
    #[serde(default)]
    pub clip_skip: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    #[serde(default = "rank1")]
    pub rank: usize,
    #[serde(default = "alpha1", deserialize_with = "de_num")]
    pub alpha: f64,
}

impl Default for Network {
    fn default() -> Self {
        Network {
            rank: 1,
            alpha: 1.0,
        }
    }
}

fn rank1() -> usize {
    1
}
fn alpha1() -> f64 {
    1.0
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub precision: String,
    pub noise_scheduler: String,
    pub iterations: usize,
    pub batch_size: usize,
    #[serde(deserialize_with = "de_num")]
    pub lr: f64,
    #[serde(deserialize_with = "de_num")]
    pub unet_lr: f64,
    #[serde(deserialize_with = "de_num")]
    pub text_encoder_lr: f64,
    pub optimizer_type: String,
    pub optimizer_args: Option<Vec<String>>,
    pub lr_scheduler: String,
    pub lr_warmup_steps: usize,
    pub lr_scheduler_num_cycles: usize,
    #[serde(deserialize_with = "de_num")]
    pub lr_scheduler_power: f64,
    pub lr_scheduler_args: String,
    #[serde(deserialize_with = "de_num")]
    pub max_grad_norm: f64,
    pub max_denoising_steps: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            precision: "float32".into(),
            noise_scheduler: "ddim".into(),
            iterations: 3000,
            batch_size: 1,
            lr: 1e-4,
            unet_lr: 1e-4,
            text_encoder_lr: 5e-5,
            optimizer_type: "AdamW8bit".into(),
            optimizer_args: None,
            lr_scheduler: "cosine_with_restarts".into(),
            lr_warmup_steps: 500,
            lr_scheduler_num_cycles: 3,
            lr_scheduler_power: 1.0,
            lr_scheduler_args: String::new(),
            max_grad_norm: 0.0,
            max_denoising_steps: 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SaveConfig {
    pub name: String,
    pub path: String,
    pub per_steps: usize,
    pub precision: String,
}

impl Default for SaveConfig {
    fn default() -> Self {
        SaveConfig {
            name: "untitled".into(),
            path: "./output".into(),
            per_steps: 500,
            precision: "float32".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Other {
    #[serde(default)]
    pub use_xformers: bool,
}

/// A config and its prompt settings, with paths resolved.
pub struct Loaded {
    pub root: RootConfig,
    pub settings: Vec<Setting>,
    pub files: Vec<PathBuf>,
}

fn read_yaml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_norway::from_str(&text).map_err(|e| {
        // YAML reads backslashes inside double quotes as escapes, so a
        // Windows path written "C:\Users\…" fails with a message about
        // hexadecimal numbers that does not say what to change.
        let hint = if text.contains(":\\") && e.to_string().contains("quoted scalar") {
            " (write Windows paths in 'single quotes' or with forward slashes)"
        } else {
            ""
        };
        Error::file(path, format!("bad config: {e}{hint}"))
    })
}

/// Read `config.yaml` and the `prompts_file` it names (relative paths are
/// tried against the working directory, as the reference does, then
/// against the config's own folder); `prompts` overrides that file.
pub fn load(config: &Path, prompts: Option<&Path>) -> Result<Loaded> {
    let root: RootConfig = read_yaml(config)?;
    let pf = match (prompts, &root.prompts_file) {
        (Some(p), _) => p.to_path_buf(),
        (None, Some(p)) => {
            let p = PathBuf::from(p);
            if p.is_file() || p.is_absolute() {
                p
            } else {
                config.parent().unwrap_or(Path::new(".")).join(&p)
            }
        }
        (None, None) => {
            return Err(Error::file(
                config,
                "`prompts_file` is missing (or pass --prompts)",
            ));
        }
    };
    let settings: Vec<Setting> = read_yaml(&pf)?;
    if settings.is_empty() {
        return Err(Error::file(&pf, "no prompt settings"));
    }
    for (i, s) in settings.iter().enumerate() {
        s.check()
            .map_err(|m| Error::file(&pf, format!("setting {i}: {m}")))?;
    }
    if root.train.optimizer_args.is_some() {
        return Err(Error::file(
            config,
            "`train.optimizer_args` is not supported",
        ));
    }
    Ok(Loaded {
        root,
        settings,
        files: vec![config.to_path_buf(), pf],
    })
}

impl RootConfig {
    /// Fill what the command line left open from the config (a flag wins),
    /// refusing the settings this trainer does not implement by name.
    pub fn apply(&self, o: &mut super::run::TrainOptions, path: &Path) -> Result<()> {
        use super::optim::Rule;
        use super::schedule::Kind;
        let t = &self.train;
        let bad =
            |field: &str, v: &str, why: &str| Error::key(path, field, format!("`{v}`: {why}"));
        match t.precision.as_str() {
            "float32" | "fp32" => {}
            p => {
                return Err(bad(
                    "train.precision",
                    p,
                    "only float32 training is implemented",
                ))
            }
        }
        if t.noise_scheduler != "ddim" {
            return Err(bad(
                "train.noise_scheduler",
                &t.noise_scheduler,
                "the SPM loop samples with DDIM (the only value the shipped configs use)",
            ));
        }
        let kind = match t.lr_scheduler.as_str() {
            "constant" => Kind::Constant,
            "constant_with_warmup" => Kind::ConstantWithWarmup,
            "cosine" => Kind::Cosine,
            "cosine_with_restarts" => Kind::CosineWithRestarts,
            "linear" => Kind::Linear,
            s => return Err(bad(
                "train.lr_scheduler",
                s,
                "not one of constant, constant_with_warmup, cosine, cosine_with_restarts, linear",
            )),
        };
        let rule = match t.optimizer_type.to_ascii_lowercase().as_str() {
            "adamw8bit" => Rule::AdamWAfter,
            "adamw" => Rule::AdamW,
            "adam" => Rule::Adam,
            s => {
                return Err(bad(
                    "train.optimizer_type",
                    s,
                    "not one of AdamW8bit, AdamW, Adam",
                ))
            }
        };
        o.iterations.get_or_insert(t.iterations);
        o.lr.get_or_insert(t.lr);
        o.schedule.get_or_insert(kind);
        o.warmup.get_or_insert(t.lr_warmup_steps);
        o.cycles.get_or_insert(t.lr_scheduler_num_cycles);
        o.rule.get_or_insert(rule);
        o.max_grad_norm.get_or_insert(t.max_grad_norm);
        o.rank.get_or_insert(self.network.rank);
        o.alpha.get_or_insert(self.network.alpha);
        if self.pretrained_model.v_pred && o.prediction_type.is_none() {
            o.prediction_type = Some("v_prediction".into());
        }
        Ok(())
    }
}
