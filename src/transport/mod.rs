//! Facilitated Transport (FT): per-prompt gates for membranes, computed as
//! SPM's reference does (spm-reference.md §3), from a CLIP text encoder run
//! in candle ([`crate::model::clip`]).
pub mod ftfy;
pub mod gate;
pub mod prompt;
pub mod strict;
pub mod tokenizer;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::tensor::RawTensor;
use crate::model::clip::{self, ClipTextModel, EncoderInfo, LoadOptions};
use gate::{Engine, EOS};
use tokenizer::ClipTokenizer;

/// How to build a gate engine.
#[derive(Debug, Clone, Default)]
pub struct EngineSpec {
    /// A diffusers pipeline root or `text_encoder/` folder, or an SD1/SD2
    /// single-file checkpoint; an SDXL pipeline root or SGM single file
    /// gives both encoders. None: no encoder (tokenuni only).
    pub text_encoder: Option<PathBuf>,
    /// Override the tokenizer's pad id (49407 for SD1, 0 for SD2).
    pub pad_id: Option<u32>,
    pub load: LoadOptions,
}

/// Tokenizer files next to a model: `tokenizer/` of a pipeline root, or
/// the sibling `../tokenizer` of a `text_encoder/` folder.
fn tokenizer_dir(model: &Path) -> Option<PathBuf> {
    [
        model.join("tokenizer"),
        model.join("../tokenizer"),
        model.to_path_buf(),
    ]
    .into_iter()
    .find(|d| d.join("vocab.json").is_file() && d.join("merges.txt").is_file())
}

/// The pad token a tokenizer folder declares (`!` for SD2,
/// `<|endoftext|>` for SD1), resolved to its id in that tokenizer's
/// vocabulary (tiny test vocabularies number their specials differently).
pub(crate) fn folder_pad_id(dir: &Path, tok: &ClipTokenizer) -> Option<u32> {
    let text = std::fs::read_to_string(dir.join("special_tokens_map.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let pad = &v["pad_token"];
    let s = pad.as_str().or_else(|| pad["content"].as_str())?;
    match s {
        "<|endoftext|>" => Some(tok.eos()),
        "!" => tok.token_id("!"),
        _ => None,
    }
}

/// Checked once at load: an id past the embedding table would otherwise
/// fail deep inside candle, per prompt, without naming the file.
pub(crate) fn check_vocab(
    model: &ClipTextModel,
    tokenizer: &ClipTokenizer,
    pad: u32,
    path: &Path,
) -> Result<()> {
    let rows = model.config.vocab_size;
    let max_id = tokenizer.max_id().max(pad);
    if max_id as usize >= rows {
        return Err(Error::file(
            path,
            format!(
                "the text encoder's token embedding has {rows} rows (vocab_size) but the tokenizer emits ids up to {max_id}; this encoder does not belong to its tokenizer"
            ),
        ));
    }
    Ok(())
}

/// A diffusers text-encoder folder `root/te` with its tokenizer folder
/// `root/tok`: the model, where it came from, the tokenizer and its pad id
/// (the folder's, else EOS, or `!` = 0 for an OpenCLIP encoder), checked
/// against each other. SD pipelines and both halves of SDXL's go through it.
pub(crate) fn encoder_folder(
    root: &Path,
    te: &str,
    tok: &str,
    opts: &LoadOptions,
    openclip: bool,
) -> Result<(ClipTextModel, EncoderInfo, ClipTokenizer, u32)> {
    let (model, info) = clip::load_folder(&root.join(te), opts)?;
    let dir = root.join(tok);
    let tokenizer = ClipTokenizer::from_folder(&dir)?
        .ok_or_else(|| Error::file(&dir, "missing tokenizer (vocab.json + merges.txt)"))?;
    let pad = folder_pad_id(&dir, &tokenizer).unwrap_or(if openclip { 0 } else { tokenizer.eos() });
    check_vocab(&model, &tokenizer, pad, &root.join(te))?;
    Ok((model, info, tokenizer, pad))
}

/// The tokenizer of a single-file checkpoint: `config_dir/folder` when
/// given and present, else the embedded CLIP BPE; pad as the folder says,
/// else EOS, or `!` = 0 for an OpenCLIP encoder.
pub(crate) fn single_file_tokenizer(
    config_dir: Option<&Path>,
    folder: &str,
    openclip: bool,
) -> Result<(ClipTokenizer, u32)> {
    match config_dir.map(|d| d.join(folder)) {
        Some(t) if t.is_dir() => {
            let tok = ClipTokenizer::from_folder(&t)?
                .ok_or_else(|| Error::file(&t, "missing vocab.json + merges.txt"))?;
            let pad = folder_pad_id(&t, &tok).unwrap_or(if openclip { 0 } else { tok.eos() });
            Ok((tok, pad))
        }
        _ => Ok((ClipTokenizer::embedded(), if openclip { 0 } else { EOS })),
    }
}

/// Load tokenizer and (optionally) text encoder and make an engine. A
/// single file is opened once, whichever architecture it turns out to be.
pub fn build_engine(spec: &EngineSpec) -> Result<(Engine, Option<EncoderInfo>)> {
    let Some(path) = &spec.text_encoder else {
        let pad = spec.pad_id.unwrap_or(EOS);
        return Ok((Engine::new(ClipTokenizer::embedded(), None, pad), None));
    };
    if !path.exists() {
        return Err(Error::file(path, "no such file or folder"));
    }
    let (model, info) = if path.is_dir() {
        if path.join("text_encoder_2").is_dir() {
            return build_xl(spec, path, None);
        }
        clip::load(path, &spec.load)?
    } else {
        // `.safetensors` through a memory map, `.ckpt` pickles read as data.
        let file = crate::io::open_tensor_file(path)?;
        if file
            .tensors
            .iter()
            .any(|(k, _)| k.starts_with("conditioner.embedders."))
        {
            return build_xl(spec, path, Some(&file.tensors));
        }
        clip::load_single(path, &file.tensors, &spec.load)?
    };
    let (tokenizer, folder_pad) = match path.is_dir().then(|| tokenizer_dir(path)).flatten() {
        Some(dir) => {
            let tok = ClipTokenizer::from_files(&dir.join("vocab.json"), &dir.join("merges.txt"))?;
            let pad = folder_pad_id(&dir, &tok);
            (tok, pad)
        }
        None => (ClipTokenizer::embedded(), None),
    };
    let layout_pad = if info.layout.contains("OpenCLIP") {
        0
    } else {
        tokenizer.eos()
    };
    let pad = spec.pad_id.or(folder_pad).unwrap_or(layout_pad);
    check_vocab(&model, &tokenizer, pad, path)?;
    let engine = Engine::new(tokenizer, Some(model), pad);
    engine
        .probe()
        .map_err(|e| Error::file(path, e.to_string()))?;
    Ok((engine, Some(info)))
}

/// Both SDXL encoders, from a pipeline root (`text_encoder/` +
/// `text_encoder_2/` with their tokenizers) or the tensors of an SGM single
/// file (`conditioner.embedders.0/1`, the embedded BPE, pads EOS and `!`).
fn build_xl(
    spec: &EngineSpec,
    path: &Path,
    single: Option<&[(String, RawTensor)]>,
) -> Result<(Engine, Option<EncoderInfo>)> {
    let ((te1, mut info, tok1, pad1), (te2, tok2, pad2)) = match single {
        None => {
            let first = encoder_folder(path, "text_encoder", "tokenizer", &spec.load, false)?;
            let (te2, _, tok2, pad2) =
                encoder_folder(path, "text_encoder_2", "tokenizer_2", &spec.load, true)?;
            (first, (te2, tok2, pad2))
        }
        Some(tensors) => {
            let [(te1, info), (te2, _)] =
                clip::load_single_xl(path, tensors, [&spec.load, &spec.load])?;
            let (tok1, pad1) = single_file_tokenizer(None, "tokenizer", false)?;
            let (tok2, pad2) = single_file_tokenizer(None, "tokenizer_2", true)?;
            check_vocab(&te2, &tok2, pad2, path)?;
            ((te1, info, tok1, pad1), (te2, tok2, pad2))
        }
    };
    if te2.projection_dim().is_none() {
        return Err(Error::file(
            path,
            "the second text encoder has no text_projection: not an SDXL encoder",
        ));
    }
    let pad1 = spec.pad_id.unwrap_or(pad1);
    check_vocab(&te1, &tok1, pad1, path)?;
    info.layout = format!("{} + text_encoder_2 (SDXL)", info.layout);
    info.hidden_size += te2.config.hidden_size;
    let engine = Engine::new(tok1, Some(te1), pad1).with_second(gate::Second {
        encoder: std::sync::Arc::new(te2),
        tokenizer: std::sync::Arc::new(tok2),
        pad_id: pad2,
    });
    engine
        .probe()
        .map_err(|e| Error::file(path, e.to_string()))?;
    Ok((engine, Some(info)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SD2 pipelines declare "!" (id 0) as pad, SD1 the end token; both
    /// spellings transformers writes (plain string or AddedToken object).
    #[test]
    fn pad_id_from_special_tokens_map() {
        let d = tempfile::tempdir().unwrap();
        let cases = [
            (r#"{"pad_token": "!"}"#, Some(0)),
            (
                r#"{"pad_token": {"content": "<|endoftext|>", "lstrip": false}}"#,
                Some(EOS),
            ),
            (r#"{"pad_token": "<pad>"}"#, None),
            ("not json", None),
        ];
        for (text, want) in cases {
            std::fs::write(d.path().join("special_tokens_map.json"), text).unwrap();
            assert_eq!(
                folder_pad_id(d.path(), &ClipTokenizer::embedded()),
                want,
                "{text}"
            );
        }
    }

    /// A pipeline root's `tokenizer/` folder is found next to `text_encoder/`.
    #[test]
    fn tokenizer_folder_is_found_beside_the_model() {
        let d = tempfile::tempdir().unwrap();
        let tok = d.path().join("tokenizer");
        std::fs::create_dir_all(d.path().join("text_encoder")).unwrap();
        std::fs::create_dir_all(&tok).unwrap();
        assert_eq!(tokenizer_dir(d.path()), None);
        std::fs::write(tok.join("vocab.json"), "{}").unwrap();
        std::fs::write(tok.join("merges.txt"), "").unwrap();
        let found = tokenizer_dir(d.path()).unwrap();
        assert_eq!(found.canonicalize().unwrap(), tok.canonicalize().unwrap());
        let from_te = tokenizer_dir(&d.path().join("text_encoder")).unwrap();
        assert_eq!(from_te.canonicalize().unwrap(), tok.canonicalize().unwrap());
    }
}
