//! CLIP tokenizer ids against HF's slow `CLIPTokenizer` + ftfy
//! (fixtures/data/tokenizer/ids.json, made by fixtures/make_tokenizer_fixtures.py).

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;
use spm::transport::tokenizer::{ClipTokenizer, BOS, EOS, PAD_SD2};

fn fixture() -> Value {
    let text = std::fs::read_to_string("fixtures/data/tokenizer/ids.json").unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Prompts whose ids differ from the oracle; panics listing the first few
/// unexpected ones.
fn mismatches(tok: &ClipTokenizer, rows: &[Value], pad: u32) -> BTreeSet<String> {
    let mut bad = BTreeSet::new();
    for r in rows {
        let p = r["prompt"].as_str().unwrap();
        let mut ok = tok.encode_padded(p, 77, pad) == ids(&r["ids"]);
        if let Some(full) = r.get("full") {
            ok &= pad != EOS || tok.encode(p) == ids(full);
        }
        if !ok {
            bad.insert(p.to_string());
        }
    }
    bad
}

fn report(
    tok: &ClipTokenizer,
    rows: &[Value],
    bad: &BTreeSet<String>,
    known: &BTreeSet<String>,
    pad: u32,
) {
    let unexpected: Vec<_> = bad.difference(known).collect();
    let fixed: Vec<_> = known.difference(bad).collect();
    for p in unexpected.iter().take(5) {
        let r = rows.iter().find(|r| r["prompt"] == p.as_str()).unwrap();
        eprintln!(
            "MISMATCH {p:?}\n  hf   {:?}\n  ours {:?}",
            ids(&r["ids"]),
            tok.encode_padded(p, 77, pad)
        );
    }
    assert!(
        unexpected.is_empty() && fixed.is_empty(),
        "{} unexpected mismatches, {} known differences now match: {fixed:?}",
        unexpected.len(),
        fixed.len()
    );
}

#[test]
fn corpus_matches_hf_slow_tokenizer() {
    let f = fixture();
    let tok = ClipTokenizer::embedded();
    let rows = f["sd1"].as_array().unwrap();
    let known: BTreeSet<String> = f["known_differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    assert!(rows.len() >= 500, "corpus has {} prompts", rows.len());
    let bad = mismatches(&tok, rows, EOS);
    eprintln!(
        "sd1: {}/{} prompts equal, {} known differences",
        rows.len() - bad.len(),
        rows.len(),
        known.len()
    );
    report(&tok, rows, &bad, &known, EOS);
}

#[test]
fn sd2_pad_and_bang_split() {
    let f = fixture();
    let tok = ClipTokenizer::embedded();
    let rows = f["sd2"].as_array().unwrap();
    let known: BTreeSet<String> = f["known_differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let bad = mismatches(&tok, rows, PAD_SD2);
    let in_rows: BTreeSet<String> = rows
        .iter()
        .map(|r| r["prompt"].as_str().unwrap().to_string())
        .collect();
    let known: BTreeSet<String> = known.intersection(&in_rows).cloned().collect();
    eprintln!(
        "sd2: {}/{} prompts equal",
        rows.len() - bad.len(),
        rows.len()
    );
    report(&tok, rows, &bad, &known, PAD_SD2);
    let v = tok.encode_padded("hello!!", 77, PAD_SD2);
    assert_eq!(&v[..5], &[BOS, 3306, 0, 0, EOS]);
    assert!(v[5..].iter().all(|&i| i == 0));
    assert_eq!(tok.special_ids(PAD_SD2), vec![BOS, EOS, 0]);
    assert_eq!(tok.special_ids(EOS), vec![BOS, EOS]);
    assert_eq!((tok.bos(), tok.eos()), (BOS, EOS));
}

#[test]
fn truncation_keeps_eos_last() {
    let tok = ClipTokenizer::embedded();
    let long = "masterpiece ".repeat(300);
    let v = tok.encode_padded(&long, 77, EOS);
    assert_eq!(v.len(), 77);
    assert_eq!((v[0], v[76]), (BOS, EOS));
    assert!(v[1..76].iter().all(|&i| i == 12066));
    assert_eq!(tok.encode(&long).len(), 300);
    assert_eq!(
        tok.encode_padded("", 77, EOS),
        [vec![BOS], vec![EOS; 76]].concat()
    );
}

#[test]
fn oracle_example() {
    let tok = ClipTokenizer::embedded();
    let v = tok.encode_padded(
        "a photo of an astronaut riding a horse, Van Gogh style",
        77,
        EOS,
    );
    assert_eq!(
        &v[..14],
        &[49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 267, 2451, 19697, 1844, 49407]
    );
    assert!(v[14..].iter().all(|&i| i == EOS));
}

/// vocab.json + merges.txt as oracles.md §7.1 builds them, from the same gz.
fn write_hf_files(dir: &Path) {
    let gz = std::fs::read("assets/bpe_simple_vocab_16e6.txt.gz").unwrap();
    let mut text = String::new();
    flate2_read(&gz, &mut text);
    let merges: Vec<&str> = text.split('\n').skip(1).take(48894).collect();
    let mut bs: Vec<u32> = (0x21..=0x7E)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let syms: Vec<String> = cs
        .iter()
        .map(|&c| char::from_u32(c).unwrap().to_string())
        .collect();
    let mut vocab: Vec<String> = syms.clone();
    vocab.extend(syms.iter().map(|s| format!("{s}</w>")));
    vocab.extend(merges.iter().map(|m| m.replace(' ', "")));
    vocab.push("<|startoftext|>".into());
    vocab.push("<|endoftext|>".into());
    let map: serde_json::Map<String, Value> = vocab
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, Value::from(i)))
        .collect();
    std::fs::write(dir.join("vocab.json"), serde_json::to_string(&map).unwrap()).unwrap();
    std::fs::write(
        dir.join("merges.txt"),
        format!("#version: 0.2\n{}\n", merges.join("\n")),
    )
    .unwrap();
}

fn flate2_read(gz: &[u8], out: &mut String) {
    use std::io::Read;
    flate2::read::GzDecoder::new(gz)
        .read_to_string(out)
        .unwrap();
}

#[test]
fn from_files_and_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    assert!(ClipTokenizer::from_folder(root).unwrap().is_none());
    let tokdir = root.join("tokenizer");
    std::fs::create_dir(&tokdir).unwrap();
    write_hf_files(&tokdir);
    let emb = ClipTokenizer::embedded();
    let f = fixture();
    for tok in [
        ClipTokenizer::from_files(&tokdir.join("vocab.json"), &tokdir.join("merges.txt")).unwrap(),
        ClipTokenizer::from_folder(root).unwrap().unwrap(),
        ClipTokenizer::from_folder(&tokdir).unwrap().unwrap(),
    ] {
        for r in f["sd1"].as_array().unwrap().iter().step_by(7) {
            let p = r["prompt"].as_str().unwrap();
            assert_eq!(
                tok.encode_padded(p, 77, EOS),
                emb.encode_padded(p, 77, EOS),
                "{p:?}"
            );
        }
    }
    // Missing and corrupt vocab.json: the error names the file.
    let missing = root.join("nope/vocab.json");
    let e = ClipTokenizer::from_files(&missing, &tokdir.join("merges.txt"))
        .unwrap_err()
        .to_string();
    assert!(e.contains(&missing.display().to_string()), "{e}");
    std::fs::write(tokdir.join("vocab.json"), "{\"a\": 1,").unwrap();
    let e = ClipTokenizer::from_folder(root).unwrap_err().to_string();
    assert!(
        e.contains(&tokdir.join("vocab.json").display().to_string()),
        "{e}"
    );
    std::fs::write(tokdir.join("vocab.json"), "{\"a\": 1}").unwrap();
    let e = ClipTokenizer::from_folder(root).unwrap_err().to_string();
    assert!(
        e.contains(&tokdir.join("vocab.json").display().to_string()) && e.contains("<|endoftext|>"),
        "{e}"
    );
}

/// Micro-benchmark: `cargo test --release --test tokenizer -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_corpus() {
    let f = fixture();
    let prompts: Vec<&str> = f["sd1"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["prompt"].as_str().unwrap())
        .collect();
    let t0 = std::time::Instant::now();
    let tok = ClipTokenizer::embedded();
    eprintln!("embedded(): {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
    let t0 = std::time::Instant::now();
    for p in &prompts {
        std::hint::black_box(tok.encode_padded(p, 77, EOS));
    }
    let cold = t0.elapsed().as_secs_f64() * 1e6 / prompts.len() as f64;
    let t0 = std::time::Instant::now();
    for _ in 0..20 {
        for p in &prompts {
            std::hint::black_box(tok.encode_padded(p, 77, EOS));
        }
    }
    let warm = t0.elapsed().as_secs_f64() * 1e6 / (20 * prompts.len()) as f64;
    eprintln!(
        "{} prompts: cold cache {cold:.1} us/prompt, warm cache {warm:.1} us/prompt",
        prompts.len()
    );
}
