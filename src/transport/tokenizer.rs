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
//! 2. each other piece: `ftfy.fix_text` ([`fix_text`], below), collapse
//!    `\s+` to one space, strip, lowercase;
//! 3. split with CLIP's pattern (case-insensitive, as HF compiles it);
//! 4. map UTF-8 bytes through `bytes_to_unicode`, run BPE (cached per word);
//!    a piece equal to a special token's text (e.g. `<|ENDOFTEXT|>` lowered)
//!    maps to that token, as the slow tokenizer's BPE cache does.
//!
//! ftfy 6.3.1 `fix_text` with default settings is reproduced step by step
//! (HTML-entity unescape unless the line holds `<`, mojibake repair, C1
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

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

use crate::{Error, Result};

/// `<|startoftext|>`.
pub const BOS: u32 = 49406;
/// `<|endoftext|>`; also SD1's pad and unknown token.
pub const EOS: u32 = 49407;
/// SD2's pad token `!`.
pub const PAD_SD2: u32 = 0;

const BPE_GZ: &[u8] = include_bytes!("../../assets/bpe_simple_vocab_16e6.txt.gz");
const HTML_ENTITIES: &str = include_str!("../../assets/ftfy/html_entities.tsv");
const BADNESS: &str = include_str!("../../assets/ftfy/badness.regex");
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
        let extra = self
            .id_text
            .get(&pad_id)
            .filter(|_| pad_id != BOS && pad_id != EOS);
        let mut ids = self.encode_split(text, extra.map(|t| (t.as_str(), pad_id)));
        ids.truncate(max_len.saturating_sub(2));
        let mut out = Vec::with_capacity(max_len.max(ids.len() + 2));
        out.push(BOS);
        out.extend(ids);
        out.push(EOS);
        out.resize(max_len.max(out.len()), pad_id);
        out
    }

    /// The ids SPM's FT treats as special (spm-reference.md §3.1): BOS, EOS
    /// and the pad id (0 for SD2, EOS again for SD1).
    pub fn special_ids(pad_id: u32) -> Vec<u32> {
        let mut v = vec![BOS, EOS];
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

// ---------------------------------------------------------------------------
// ftfy.fix_text (6.3.1, default TextFixerConfig)
// ---------------------------------------------------------------------------

/// Windows-1252 bytes 0x80–0x9F; the five undefined ones map to themselves
/// (ftfy's "sloppy" codec, and html.unescape's `_invalid_charrefs`).
const CP1252_HIGH: [u32; 32] = [
    0x20AC, 0x81, 0x201A, 0x192, 0x201E, 0x2026, 0x2020, 0x2021, 0x2C6, 0x2030, 0x160, 0x2039,
    0x152, 0x8D, 0x17D, 0x8F, 0x90, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022, 0x2013, 0x2014, 0x2DC,
    0x2122, 0x161, 0x203A, 0x153, 0x9D, 0x17E, 0x178,
];

/// ftfy's `fix_text`: fix each line (keeping its `\n`), HTML unescaping
/// switched off from the first line that contains `<` on.
pub fn fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut unescape = true;
    for seg in text.split_inclusive('\n') {
        if unescape && seg.contains('<') {
            unescape = false;
        }
        out.push_str(&fix_segment(seg, unescape));
    }
    out
}

fn fix_segment(seg: &str, unescape: bool) -> String {
    let mut text = seg.to_string();
    loop {
        let orig = text.clone();
        if unescape {
            text = unescape_html(&text);
        }
        text = fix_encoding(&text);
        text = text
            .chars()
            .map(|c| {
                if ('\u{80}'..='\u{9f}').contains(&c) {
                    cp1252(c as u32)
                } else {
                    c
                }
            })
            .collect();
        text = fix_ligatures_width_quotes(&text);
        text = text
            .replace("\r\n", "\n")
            .replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n");
        text = remove_terminal_escapes(&text);
        text.retain(|c| !is_control_removed(c as u32));
        text = text.nfc().collect();
        if text == orig {
            return text;
        }
    }
}

fn cp1252(b: u32) -> char {
    char::from_u32(CP1252_HIGH[(b - 0x80) as usize]).unwrap()
}

fn fix_ligatures_width_quotes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let lig = match c {
            '\u{132}' => "IJ",
            '\u{133}' => "ij",
            '\u{149}' => "\u{2bc}n",
            '\u{1f1}' => "DZ",
            '\u{1f2}' => "Dz",
            '\u{1f3}' => "dz",
            '\u{1c4}' => "D\u{17d}",
            '\u{1c5}' => "D\u{17e}",
            '\u{1c6}' => "d\u{17e}",
            '\u{1c7}' => "LJ",
            '\u{1c8}' => "Lj",
            '\u{1c9}' => "lj",
            '\u{1ca}' => "NJ",
            '\u{1cb}' => "Nj",
            '\u{1cc}' => "nj",
            '\u{fb00}' => "ff",
            '\u{fb01}' => "fi",
            '\u{fb02}' => "fl",
            '\u{fb03}' => "ffi",
            '\u{fb04}' => "ffl",
            '\u{fb05}' => "\u{17f}t",
            '\u{fb06}' => "st",
            _ => "",
        };
        if !lig.is_empty() {
            out.push_str(lig);
        } else if c == '\u{3000}' {
            out.push(' ');
        } else if ('\u{ff01}'..='\u{ffef}').contains(&c) {
            out.extend(std::iter::once(c).nfkc());
        } else {
            out.push(c);
        }
    }
    // Ligatures and widths are one `translate` each; quotes come after both.
    out.chars()
        .map(|c| match c {
            '\u{2bc}' | '\u{2018}'..='\u{201b}' => '\'',
            '\u{201c}'..='\u{201f}' => '"',
            c => c,
        })
        .collect()
}

fn remove_terminal_escapes(text: &str) -> String {
    static ANSI: OnceLock<Regex> = OnceLock::new();
    ANSI.get_or_init(|| Regex::new(r"\x1b\[[\d;]*[a-zA-Z]").unwrap())
        .replace_all(text, "")
        .into_owned()
}

fn is_control_removed(c: u32) -> bool {
    matches!(c, 0x00..=0x08 | 0x0B | 0x0E..=0x1F | 0x7F | 0x206A..=0x206F | 0xFEFF | 0xFFF9..=0xFFFC)
}

fn unescape_html(text: &str) -> String {
    static RE: OnceLock<Regex> = OnceLock::new();
    static TABLE: OnceLock<HashMap<&'static str, String>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        HTML_ENTITIES
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('\t'))
            .map(|(k, v)| (k, unescape_table_value(v)))
            .collect()
    });
    let re = RE.get_or_init(|| Regex::new(r"&#?[0-9A-Za-z]{1,24};").unwrap());
    re.replace_all(text, |c: &regex::Captures| {
        let m = &c[0];
        if let Some(v) = table.get(m) {
            return v.clone();
        }
        numeric_charref(m).unwrap_or_else(|| m.to_string())
    })
    .into_owned()
}

/// `\u{..}` escapes in the entity table.
fn unescape_table_value(v: &str) -> String {
    let mut out = String::new();
    let mut rest = v;
    while let Some(p) = rest.find("\\u{") {
        out.push_str(&rest[..p]);
        let end = rest[p..].find('}').unwrap() + p;
        out.push(char::from_u32(u32::from_str_radix(&rest[p + 3..end], 16).unwrap()).unwrap());
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// Python's `html.unescape` on `&#…;`, kept only when it consumes the whole
/// reference (ftfy's rule).
fn numeric_charref(m: &str) -> Option<String> {
    let body = m.strip_prefix("&#")?.strip_suffix(';')?;
    let num: u128 = if let Some(hex) = body.strip_prefix(['x', 'X']) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u128::from_str_radix(hex, 16).unwrap_or(u128::MAX)
    } else {
        if !body.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        body.parse().unwrap_or(u128::MAX)
    };
    Some(match num {
        0 => "\u{fffd}".into(),
        0x0D => "\r".into(),
        0x80..=0x9F => cp1252(num as u32).to_string(),
        0xD800..=0xDFFF => "\u{fffd}".into(),
        n if n > 0x10FFFF => "\u{fffd}".into(),
        n if matches!(n, 0x1..=0x8 | 0xB | 0xE..=0x1F | 0x7F..=0x9F | 0xFDD0..=0xFDEF)
            || (n & 0xFFFE) == 0xFFFE =>
        {
            String::new()
        }
        n => char::from_u32(n as u32).unwrap().to_string(),
    })
}

/// ftfy's `fix_encoding`, for the Latin-1 / Windows-1252 mojibake that real
/// prompts carry; see the module docs for what is left out.
fn fix_encoding(text: &str) -> String {
    static BAD: OnceLock<Regex> = OnceLock::new();
    let bad = BAD.get_or_init(|| Regex::new(BADNESS).expect("ftfy badness pattern compiles"));
    let mut text = text.to_string();
    loop {
        if text.is_ascii() || !bad.is_match(&text) {
            return text;
        }
        let latin1 = text.chars().all(|c| (c as u32) < 0x100);
        let next = latin1
            .then(|| text.chars().map(|c| c as u8).collect::<Vec<u8>>())
            .and_then(decode_utf8)
            .or_else(|| sloppy_1252_bytes(&text).and_then(decode_utf8));
        let next = match next {
            Some(t) => t,
            // Latin-1 text holding C1 controls, meant as Windows-1252.
            // Latin-1 text holding C1 controls, meant as Windows-1252
            // (ftfy's strict decode, else its sloppy `fix_c1_controls`: same result).
            None if latin1 && text.chars().any(|c| ('\u{80}'..='\u{9f}').contains(&c)) => text
                .chars()
                .map(|c| {
                    if ('\u{80}'..='\u{9f}').contains(&c) {
                        cp1252(c as u32)
                    } else {
                        c
                    }
                })
                .collect(),
            None => return text,
        };
        if next == text {
            return text;
        }
        text = next;
    }
}

/// Strict UTF-8 decode, refusing bytes that need ftfy's `utf-8-variants`.
fn decode_utf8(b: Vec<u8>) -> Option<String> {
    if b.contains(&0xED) || b.contains(&0xC0) {
        return None;
    }
    String::from_utf8(b).ok()
}

/// Encode as ftfy's `sloppy-windows-1252` (U+FFFD → 0x1A), if possible.
fn sloppy_1252_bytes(text: &str) -> Option<Vec<u8>> {
    text.chars()
        .map(|c| {
            let u = c as u32;
            match u {
                0x1A => None,
                0..=0x7F | 0xA0..=0xFF => Some(u as u8),
                0xFFFD => Some(0x1A),
                _ => CP1252_HIGH
                    .iter()
                    .position(|&x| x == u)
                    .map(|p| 0x80 + p as u8),
            }
        })
        .collect()
}
