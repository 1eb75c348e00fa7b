//! A port of `ftfy.fix_text` (ftfy 6.3.1, default settings) — the text
//! clean-up Hugging Face's slow `CLIPTokenizer` runs before BPE when ftfy is
//! installed, as it is in SD WebUIs. What is and is not reproduced is listed
//! in the tokenizer's module docs; the tables (`assets/ftfy/`) are generated
//! from ftfy by `fixtures/make_ftfy_tables.py`.

use std::collections::HashMap;
use std::sync::OnceLock;

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

const HTML_ENTITIES: &str = include_str!("../../assets/ftfy/html_entities.tsv");
const BADNESS: &str = include_str!("../../assets/ftfy/badness.regex");
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
