//! CLIP's byte-level BPE tokenizer, offline, with ids equal to Hugging Face's
//! *slow* `CLIPTokenizer` run with `ftfy` installed (transformers 4.x) — the
//! tokenizer Stable Diffusion pipelines and SPM's reference code used.
//!
//! Why not the `tokenizers` crate / HF's fast tokenizer: the fast one skips
//! ftfy and differs on HTML entities, mojibake, curly quotes, ligatures and
//! fullwidth forms; FT gates depend on the exact ids (spm-reference.md §3.1),
//! and a 3.6 MB `tokenizer.json` would have to ship anyway. The vocabulary is
//! compiled in (`assets/bpe_simple_vocab_16e6.txt.gz`, OpenAI CLIP, MIT) and
//! built as oracles.md §7.1 says, so no hub access is ever needed.
//!
//! The pipeline, per input string, mirrors `PreTrainedTokenizer.tokenize` +
//! `CLIPTokenizer._tokenize`:
//! 1. split on the literal added tokens (`<|startoftext|>`, `<|endoftext|>`,
//!    and SD2's pad token `!` when it is one), case-sensitively;
//! 2. each other piece: `ftfy.fix_text` ([`super::ftfy::fix_text`]), collapse
//!    `\s+` to one space, strip, lowercase;
//! 3. split with CLIP's pattern (case-insensitive, as HF compiles it);
//! 4. map UTF-8 bytes through `bytes_to_unicode`, run BPE (cached per word);
//!    a piece equal to a special token's text (e.g. `<|ENDOFTEXT|>` lowered)
//!    maps to that token, as the slow tokenizer's BPE cache does.
//!
//! ftfy 6.3.1 `fix_text` with default settings is reproduced step by step
//! in [`super::ftfy`] (HTML-entity unescape unless the line holds `<`, mojibake repair, C1
//! controls, Latin ligatures, fullwidth forms, curly quotes, line breaks,
//! terminal escapes, control characters, NFC, repeated to a fixed point).
//! Not reproduced — the text is left as is where ftfy would act:
//! mojibake that only decodes through code pages other than Latin-1 /
//! Windows-1252 (1250/1251/1253/1254/1257, ISO-8859-2, MacRoman, cp437), the
//! `restore_byte_a0` / `replace_lossy_sequences` / `utf-8-variants` repairs,
//! `decode_inconsistent_utf8` (mojibake embedded in otherwise good text),
//! and the split of lines longer than 10⁶ characters. The fixture corpus
//! lists every prompt where this shows (`known_differences`).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use super::ftfy::fix_text;
use regex::Regex;

use crate::{Error, Result};

/// `<|startoftext|>`.
pub const BOS: u32 = 49406;
/// `<|endoftext|>`; also SD1's pad and unknown token.
pub const EOS: u32 = 49407;
/// SD2's pad token `!`.
pub const PAD_SD2: u32 = 0;

const BPE_GZ: &[u8] = include_bytes!("../../assets/bpe_simple_vocab_16e6.txt.gz");
/// Merges CLIP reads: lines `[1 : 49152 - 256 - 2 + 1]` of the merges file.
const N_MERGES: usize = 49152 - 256 - 2;
const PATTERN: &str = r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A CLIP BPE tokenizer. Cheap to share (`&self` everywhere; the BPE cache
/// is behind a mutex).
pub struct ClipTokenizer {
    /// Symbol → vocabulary id (`None`: not in the vocabulary → unknown).
    sym_id: Vec<Option<u32>>,
    /// (left, right) symbol pair → (rank, merged symbol).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// `bytes_to_unicode`: byte → its symbol, plain and with `</w>`.
    byte_sym: [(u32, u32); 256],
    /// Literal added tokens split off before normalisation.
    added: Vec<(String, u32)>,
    /// Vocabulary id → token text.
    id_text: HashMap<u32, String>,
    /// Special tokens' text → id (what the slow tokenizer's BPE cache holds).
    specials: Vec<(String, u32)>,
    unk: u32,
    pat: Regex,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab", &self.sym_id.iter().filter(|i| i.is_some()).count())
            .field("merges", &self.merges.len())
            .field("added", &self.added)
            .finish()
    }
}

/// GPT-2/CLIP `bytes_to_unicode`: printable bytes map to themselves, the
/// other 68 to U+0100.. in increasing order.
fn bytes_to_unicode() -> [char; 256] {
    let mut out = ['\0'; 256];
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut n = 0;
    for b in 0..256u32 {
        out[b as usize] = if printable(b) {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    out
}

impl ClipTokenizer {
    /// The tokenizer of SD1.x/SD2.x/SDXL, from the compiled-in vocabulary.
    pub fn embedded() -> Self {
        use std::io::Read;
        let mut text = String::new();
        flate2::read::GzDecoder::new(BPE_GZ)
            .read_to_string(&mut text)
            .expect("embedded BPE vocabulary is valid gzip UTF-8");
        let merges: Vec<&str> = text.split('\n').skip(1).take(N_MERGES).collect();
        // Vocabulary order is bytes_to_unicode's dict order: the printable
        // bytes first, then the 68 remapped ones.
        let mut syms: Vec<char> = bytes_to_unicode().to_vec();
        syms.sort_by_key(|&c| (c as u32) >= 0x100);
        let mut vocab: Vec<String> = syms.iter().map(|c| c.to_string()).collect();
        vocab.extend(syms.iter().map(|c| format!("{c}</w>")));
        vocab.extend(merges.iter().map(|m| m.replace(' ', "")));
        vocab.push("<|startoftext|>".into());
        vocab.push("<|endoftext|>".into());
        let vocab = vocab
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32))
            .collect();
        Self::build(vocab, &merges).expect("embedded vocabulary is consistent")
    }

    /// From a Hugging Face tokenizer folder's `vocab.json` and `merges.txt`.
    pub fn from_files(vocab_json: &Path, merges_txt: &Path) -> Result<Self> {
        let read = |p: &Path| fs::read_to_string(p).map_err(|e| Error::io(p, e));
        let vocab: HashMap<String, u32> =
            serde_json::from_str(&read(vocab_json)?).map_err(|e| {
                Error::file(
                    vocab_json,
                    format!("not a CLIP vocab.json ({{token: id}}): {e}"),
                )
            })?;
        let text = read(merges_txt)?;
        // As the slow tokenizer: strip, split lines, drop the header, cap the count.
        let merges: Vec<&str> = text.trim().split('\n').skip(1).take(N_MERGES).collect();
        for (i, m) in merges.iter().enumerate() {
            if m.split_whitespace().count() != 2 {
                return Err(Error::file(
                    merges_txt,
                    format!("line {}: `{m}` is not a merge `a b`", i + 2),
                ));
            }
        }
        Self::build(vocab, &merges).map_err(|msg| Error::file(vocab_json, msg))
    }

    /// The tokenizer of a diffusers pipeline folder (`tokenizer/vocab.json` +
    /// `tokenizer/merges.txt`) or of a tokenizer folder itself; `None` when
    /// neither holds both files.
    pub fn from_folder(dir: &Path) -> Result<Option<Self>> {
        for d in [dir.join("tokenizer"), dir.to_path_buf()] {
            let (v, m): (PathBuf, PathBuf) = (d.join("vocab.json"), d.join("merges.txt"));
            if v.is_file() && m.is_file() {
                return Self::from_files(&v, &m).map(Some);
            }
        }
        Ok(None)
    }

    fn build(vocab: HashMap<String, u32>, merges: &[&str]) -> std::result::Result<Self, String> {
        let get = |t: &str| vocab.get(t).copied();
        let (bos, eos) = (get("<|startoftext|>"), get("<|endoftext|>"));
        let (Some(bos), Some(eos)) = (bos, eos) else {
            return Err("vocabulary lacks <|startoftext|> or <|endoftext|>".into());
        };
        let mut sym: HashMap<String, u32> = HashMap::new();
        let mut names: Vec<String> = Vec::new();
        let mut intern = |s: String, sym: &mut HashMap<String, u32>| -> u32 {
            *sym.entry(s.clone()).or_insert_with(|| {
                names.push(s);
                names.len() as u32 - 1
            })
        };
        let table = bytes_to_unicode();
        let mut byte_sym = [(0, 0); 256];
        for (b, c) in table.iter().enumerate() {
            byte_sym[b] = (
                intern(c.to_string(), &mut sym),
                intern(format!("{c}</w>"), &mut sym),
            );
        }
        let mut merge_map = HashMap::new();
        for (rank, m) in merges.iter().enumerate() {
            let mut it = m.split_whitespace();
            let (Some(a), Some(b)) = (it.next(), it.next()) else {
                continue;
            };
            let (ia, ib) = (
                intern(a.to_string(), &mut sym),
                intern(b.to_string(), &mut sym),
            );
            let ab = intern(format!("{a}{b}"), &mut sym);
            // Python's dict(zip(merges, range)): a repeated pair keeps its last rank.
            merge_map.insert((ia, ib), (rank as u32, ab));
        }
        let sym_id = names.iter().map(|n| get(n)).collect();
        let id_text = vocab.iter().map(|(t, &i)| (i, t.clone())).collect();
        Ok(Self {
            sym_id,
            merges: merge_map,
            byte_sym,
            added: vec![
                ("<|startoftext|>".into(), bos),
                ("<|endoftext|>".into(), eos),
            ],
            id_text,
            specials: vec![
                ("<|startoftext|>".into(), bos),
                ("<|endoftext|>".into(), eos),
            ],
            unk: eos,
            pat: Regex::new(PATTERN).expect("CLIP pattern compiles"),
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The highest id this tokenizer can emit (vocabulary, added and special
    /// tokens, unknown), to check against a text encoder's embedding rows.
    pub fn max_id(&self) -> u32 {
        let vocab = self.sym_id.iter().flatten().copied();
        let added = self.added.iter().map(|(_, i)| *i);
        let specials = self.specials.iter().map(|(_, i)| *i);
        vocab
            .chain(added)
            .chain(specials)
            .chain([self.unk])
            .max()
            .unwrap_or(0)
    }

    /// Token ids of `text`, without BOS/EOS, padding or truncation.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_split(text, None)
    }

    fn encode_split(&self, text: &str, extra: Option<(&str, u32)>) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut rest = text;
        // Leftmost, then longest, added token (HF's trie split).
        while let Some((p, len, id)) = self
            .added
            .iter()
            .map(|(t, id)| (t.as_str(), *id))
            .chain(extra)
            .filter_map(|(t, id)| rest.find(t).map(|p| (p, std::cmp::Reverse(t.len()), id)))
            .min()
            .map(|(p, l, id)| (p, l.0, id))
        {
            self.encode_piece(&rest[..p], &mut ids);
            ids.push(id);
            rest = &rest[p + len..];
        }
        self.encode_piece(rest, &mut ids);
        ids
    }

    /// `tokenizer(text, padding="max_length", max_length=max_len,
    /// truncation=True).input_ids`: BOS, the first `max_len - 2` tokens, EOS,
    /// then `pad_id` up to `max_len`.
    ///
    /// A pad token other than BOS/EOS is an added token to HF's slow
    /// tokenizer, so its text is split off first: with SD2's `!` (id 0),
    /// "hello!!" gives `hello` `!` `!` (0, 0) where SD1 gives `hello` `!!`.
    pub fn encode_padded(&self, text: &str, max_len: usize, pad_id: u32) -> Vec<u32> {
        let (bos, eos) = (self.bos(), self.eos());
        let extra = self
            .id_text
            .get(&pad_id)
            .filter(|_| pad_id != bos && pad_id != eos);
        let mut ids = self.encode_split(text, extra.map(|t| (t.as_str(), pad_id)));
        ids.truncate(max_len.saturating_sub(2));
        let mut out = Vec::with_capacity(max_len.max(ids.len() + 2));
        out.push(bos);
        out.extend(ids);
        out.push(eos);
        out.resize(max_len.max(out.len()), pad_id);
        out
    }

    /// The id of `<|startoftext|>` in this vocabulary (49406 in CLIP's).
    pub fn bos(&self) -> u32 {
        self.specials[0].1
    }

    /// The id of `<|endoftext|>` in this vocabulary (49407 in CLIP's).
    pub fn eos(&self) -> u32 {
        self.specials[1].1
    }

    /// The id of a whole token's text (`!` → 0 in CLIP's vocabulary).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.id_text
            .iter()
            .filter(|(_, t)| t.as_str() == text)
            .map(|(i, _)| *i)
            .min()
    }

    /// The ids SPM's FT treats as special (spm-reference.md §3.1): BOS, EOS
    /// and the pad id (0 for SD2, EOS again for SD1).
    pub fn special_ids(&self, pad_id: u32) -> Vec<u32> {
        let mut v = vec![self.bos(), self.eos()];
        if !v.contains(&pad_id) {
            v.push(pad_id);
        }
        v
    }

    fn encode_piece(&self, raw: &str, ids: &mut Vec<u32>) {
        if raw.is_empty() {
            return;
        }
        let fixed = fix_text(raw);
        let clean = WS
            .get_or_init(|| Regex::new(r"\s+").unwrap())
            .replace_all(&fixed, " ");
        let text = clean.trim().to_lowercase();
        let mut cache = self.cache.lock().unwrap();
        for m in self.pat.find_iter(&text) {
            let word = m.as_str();
            if let Some(v) = cache.get(word) {
                ids.extend_from_slice(v);
                continue;
            }
            let v = match self.specials.iter().find(|(t, _)| t == word) {
                Some(&(_, id)) => vec![id],
                None => self.bpe(word),
            };
            ids.extend_from_slice(&v);
            if cache.len() < 100_000 {
                cache.insert(word.to_string(), v);
            }
        }
    }

    /// CLIP's BPE over one pre-token: repeatedly merge the lowest-ranked
    /// adjacent pair (all its occurrences, left to right).
    fn bpe(&self, word: &str) -> Vec<u32> {
        let bytes = word.as_bytes();
        let n = bytes.len();
        let mut w: Vec<u32> = bytes
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if i + 1 == n {
                    self.byte_sym[b as usize].1
                } else {
                    self.byte_sym[b as usize].0
                }
            })
            .collect();
        while w.len() > 1 {
            let best = w
                .windows(2)
                .filter_map(|p| {
                    self.merges
                        .get(&(p[0], p[1]))
                        .map(|&(r, m)| (r, p[0], p[1], m))
                })
                .min();
            let Some((_, a, b, ab)) = best else { break };
            let mut out = Vec::with_capacity(w.len());
            let mut i = 0;
            while i < w.len() {
                if i + 1 < w.len() && w[i] == a && w[i + 1] == b {
                    out.push(ab);
                    i += 2;
                } else {
                    out.push(w[i]);
                    i += 1;
                }
            }
            w = out;
        }
        w.into_iter()
            .map(|s| self.sym_id[s as usize].unwrap_or(self.unk))
            .collect()
    }
}

static WS: OnceLock<Regex> = OnceLock::new();
