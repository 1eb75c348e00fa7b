//! WebUI prompt syntax reduced to the words a text encoder should see.
//!
//! A1111/Forge prompts carry syntax that is not text: extra-network tags,
//! attention weights, prompt editing, `BREAK` and `AND`. FT compares the
//! *words* with the erased concepts, so the syntax is removed first:
//!
//! | syntax | becomes |
//! |---|---|
//! | `<lora:name:0.8>`, `<lyco:…>`, `<hypernet:…>` (any `<kind:…>` tag) | removed |
//! | `(word)`, `((word))`, `(word:1.2)`, `[word]` | `word` |
//! | `[from:to:0.5]`, `[from::0.5]`, `[to:0.5]` (prompt editing) | `from to`, `from`, `to` — both sides are kept, so a concept that appears at any step still gates |
//! | `[a\|b]` (alternation) | `a b` |
//! | `\(` `\)` `\[` `\]` (escaped brackets) | the literal bracket |
//! | `BREAK` | removed |
//! | `A AND B:1.2` (composable diffusion) | two sub-prompts, `A` and `B` (part weights dropped); a membrane's gate is the max over them |
//!
//! Whitespace is collapsed. The tokenizer lower-cases afterwards, so case is
//! kept here (`AND`/`BREAK` are recognised in upper case only, as in A1111).

use std::sync::OnceLock;

use regex::Regex;

fn tag_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"<[A-Za-z_][\w-]*:[^<>]*>").expect("regex"))
}

fn weight_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    // `:1.2` (or `: -0.5 `) right before a closing bracket.
    RE.get_or_init(|| Regex::new(r":\s*-?(?:\d+\.?\d*|\.\d+)\s*([\)\]])").expect("regex"))
}

fn and_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"\bAND\b").expect("regex"))
}

fn and_weight_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    // The weight of a composable-diffusion part: `a dog :1.2` at its end.
    RE.get_or_init(|| Regex::new(r":\s*-?(?:\d+\.?\d*|\.\d+)\s*$").expect("regex"))
}

fn break_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"\bBREAK\b").expect("regex"))
}

/// Split a WebUI prompt into plain-text sub-prompts (one unless `AND` is used).
/// Empty sub-prompts are kept as `""` only when the whole prompt is empty.
pub fn normalize(prompt: &str) -> Vec<String> {
    let no_tags = tag_re().replace_all(prompt, " ");
    let parts: Vec<String> = and_re()
        .split(&no_tags)
        .map(|p| {
            clean(&break_re().replace_all(and_weight_re().replace(p.trim_end(), "").as_ref(), " "))
        })
        .filter(|p| !p.is_empty())
        .collect();
    if parts.is_empty() {
        vec![String::new()]
    } else {
        parts
    }
}

/// Placeholders for escaped brackets, from the Unicode private-use area.
const ESCAPES: [(char, char); 4] = [
    ('(', '\u{E000}'),
    (')', '\u{E001}'),
    ('[', '\u{E002}'),
    (']', '\u{E003}'),
];

fn clean(text: &str) -> String {
    // 1. Protect escaped brackets.
    let mut s = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(&n) = chars.peek() {
                if let Some((_, p)) = ESCAPES.iter().find(|(b, _)| *b == n) {
                    s.push(*p);
                    chars.next();
                    continue;
                }
            }
        }
        s.push(c);
    }
    // 2. Drop attention weights and prompt-editing step numbers.
    let s = weight_re().replace_all(&s, "$1");
    // 3. Inside square brackets, `:` and `|` separate alternatives.
    let mut out = String::with_capacity(s.len());
    let mut square = 0usize;
    for c in s.chars() {
        match c {
            '[' => {
                square += 1;
                out.push(' ');
            }
            ']' => {
                square = square.saturating_sub(1);
                out.push(' ');
            }
            '(' | ')' => out.push(' '),
            ':' | '|' if square > 0 => out.push(' '),
            c => out.push(c),
        }
    }
    // 4. Restore escaped brackets and collapse whitespace.
    let out: String = out
        .chars()
        .map(|c| ESCAPES.iter().find(|(_, p)| *p == c).map_or(c, |(b, _)| *b))
        .collect();
    // Brackets became spaces (so `(a)(b)` stays two words, as A1111
    // tokenises its chunks apart); tidy the space they leave before
    // punctuation, which CLIP splits off either way.
    let joined = out.split_whitespace().collect::<Vec<_>>().join(" ");
    space_punct_re().replace_all(&joined, "$1").into_owned()
}

fn space_punct_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r" ([,.;!?])").expect("regex"))
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn webui_syntax_is_reduced_to_words() {
        let cases: [(&str, &[&str]); 12] = [
            ("a photo of pikachu", &["a photo of pikachu"]),
            (
                "<lora:erase_pikachu:0.8> pikachu, <lyco:x:1:0.5>forest",
                &["pikachu, forest"],
            ),
            (
                "(masterpiece:1.2), ((best quality)), [blurry]",
                &["masterpiece, best quality, blurry"],
            ),
            ("(snoopy: 0.9 ) and friends", &["snoopy and friends"]),
            ("[cat:dog:0.5] in a field", &["cat dog in a field"]),
            ("[cat::10] [dog:5]", &["cat dog"]),
            ("[red|blue] car", &["red blue car"]),
            (r"a \(smiling\) face, \[sic\]", &["a (smiling) face, [sic]"]),
            ("mickey BREAK castle", &["mickey castle"]),
            ("a cat AND a dog:1.2", &["a cat", "a dog"]),
            ("ANDROID and BREAKFAST", &["ANDROID and BREAKFAST"]),
            ("  <lora:x:1>  ", &[""]),
        ];
        for (input, want) in cases {
            assert_eq!(
                normalize(input),
                want.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                "{input}"
            );
        }
    }

    #[test]
    fn ratio_like_colons_outside_brackets_stay() {
        assert_eq!(
            normalize("aspect 16:9, style: anime"),
            vec!["aspect 16:9, style: anime".to_string()]
        );
    }
}
