//! `--normalize strict`: fold the spellings that hide a concept from token
//! gating but not from a person reading the prompt.
//!
//! The reference tokenizes the prompt as typed, so `pi\u{200b}ka\u{200b}chu`,
//! `p̶i̶k̶a̶c̶h̶u̶`, `ｐｉｋａｃｈｕ` or a Cyrillic `рikachu` share no token
//! with `pikachu` and bring `tokenuni` to 0 — and an always-on moderation
//! membrane run without a text encoder has nothing else. Strict folding, in
//! this order:
//!
//! 1. NFKD: compatibility forms (full-width, ligatures, circled and
//!    mathematical letters) become their plain letters, and accented letters
//!    split into letter + combining mark;
//! 2. drop every combining mark (`Mn`/`Me`, so `é` → `e`, strike-through and
//!    zalgo vanish) and every *default-ignorable* code point (zero-width
//!    space/joiners, word joiner, soft hyphen, BOM, variation selectors, bidi
//!    controls, tags — Unicode's `Default_Ignorable_Code_Point`, which
//!    renders as nothing);
//! 3. NFKC to recompose what is left;
//! 4. confusables: each remaining non-ASCII character whose UTS #39
//!    skeleton (the `unicode-security` crate's data) is ASCII becomes that
//!    skeleton (Cyrillic `а`, Greek `ο` → Latin). ASCII is never folded, so
//!    ordinary words keep their tokens (the skeleton of `m` is `rn`).
//!
//! It is an option, not the default: the reference behaviour is kept for
//! fidelity, and folding changes the gates of legitimate non-Latin prompts
//! (a Greek word made of Latin look-alikes now reads as Latin).

use unicode_normalization::char::is_combining_mark;
use unicode_normalization::UnicodeNormalization;

/// How prompt text is prepared for gating.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    /// As the reference: the text as typed (WebUI syntax removed).
    #[default]
    Reference,
    /// Fold zero-width characters, combining marks, compatibility forms and
    /// confusable letters first (see `transport::strict`).
    Strict,
}

/// Unicode 15.1 `Default_Ignorable_Code_Point` (DerivedCoreProperties.txt).
const IGNORABLE: &[(u32, u32)] = &[
    (0x00AD, 0x00AD),
    (0x034F, 0x034F),
    (0x061C, 0x061C),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x206F),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFF8),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
];

fn is_ignorable(c: char) -> bool {
    let u = c as u32;
    IGNORABLE.iter().any(|&(lo, hi)| (lo..=hi).contains(&u))
}

/// Strict folding of one text (see the module docs).
pub fn fold(text: &str) -> String {
    let stripped: String = text
        .nfkd()
        .filter(|&c| !is_combining_mark(c) && !is_ignorable(c))
        .collect();
    let mut out = String::with_capacity(stripped.len());
    for c in stripped.nfkc() {
        if c.is_ascii() {
            out.push(c);
            continue;
        }
        let mut buf = [0u8; 4];
        let skel: String =
            unicode_security::confusable_detection::skeleton(c.encode_utf8(&mut buf)).collect();
        if !skel.is_empty() && skel.is_ascii() {
            out.push_str(&skel);
        } else {
            out.push(c);
        }
    }
    out
}

/// Apply a normalisation mode.
pub fn apply(mode: Normalize, text: &str) -> String {
    match mode {
        Normalize::Reference => text.to_string(),
        Normalize::Strict => fold(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Adversarial spellings of one word, each built from its code points so
    /// the test shows exactly what it contains.
    #[test]
    fn adversarial_spellings_fold_to_the_word() {
        let zw = "pi\u{200b}ka\u{200b}chu";
        let joiners = "p\u{200d}i\u{200c}k\u{2060}a\u{feff}c\u{ad}h\u{180e}u";
        let strike: String = "pikachu".chars().flat_map(|c| [c, '\u{336}']).collect();
        let zalgo = "p\u{300}\u{301}\u{302}ika\u{316}\u{317}chu\u{489}";
        let fullwidth = "\u{ff50}\u{ff49}\u{ff4b}\u{ff41}\u{ff43}\u{ff48}\u{ff55}";
        let cyrillic = "\u{440}\u{456}k\u{430}\u{441}hu"; // р і а с
        let greek_o = "p\u{3bf}kem\u{3bf}n"; // ο
        let accents = "Pok\u{e9}mon";
        let math_bold = "\u{1d429}\u{1d422}\u{1d424}\u{1d41a}\u{1d41c}\u{1d421}\u{1d42e}";
        let selectors = "pika\u{fe0f}chu\u{e0041}";
        for (s, want) in [
            (zw, "pikachu"),
            (joiners, "pikachu"),
            (strike.as_str(), "pikachu"),
            (zalgo, "pikachu"),
            (fullwidth, "pikachu"),
            (cyrillic, "pikachu"),
            (greek_o, "pokemon"),
            (accents, "Pokemon"),
            (math_bold, "pikachu"),
            (selectors, "pikachu"),
        ] {
            assert_eq!(fold(s), want, "{s:?}");
        }
    }

    #[test]
    fn plain_ascii_is_untouched() {
        for s in [
            "a photo of a man, modern room",
            "rn m l I 0 O 1",
            "16:9, (best quality:1.2)",
        ] {
            assert_eq!(fold(s), s);
        }
    }

    #[test]
    fn reference_mode_keeps_the_text() {
        assert_eq!(
            apply(Normalize::Reference, "pi\u{200b}kachu"),
            "pi\u{200b}kachu"
        );
    }
}
