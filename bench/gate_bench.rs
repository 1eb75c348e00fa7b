//! FT gate benchmark (run by `bench/gate.sh`): latency of a new prompt,
//! a cached prompt and tokenuni-only gating, and requests/s of `spm serve`
//! under a bounded concurrent loopback load.
//!
//!   cargo run --release --example gate_bench -- TEXT_ENCODER [SPM_BINARY] [NEW_PROMPTS]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use spm::transport::gate::{GateOptions, Membrane, Metric};
use spm::transport::{build_engine, EngineSpec};

const ADJ: [&str; 10] = [
    "red", "tiny", "ancient", "glowing", "wooden", "furry", "metallic", "sleepy", "giant", "paper",
];
const NOUN: [&str; 10] = [
    "fox",
    "castle",
    "robot",
    "teapot",
    "dragon",
    "lighthouse",
    "bicycle",
    "owl",
    "cactus",
    "ship",
];

fn prompt(i: usize) -> String {
    format!(
        "a {} {} next to a {} {}, photo number {i}, highly detailed",
        ADJ[i % 10],
        NOUN[(i / 10) % 10],
        ADJ[(i / 100) % 10],
        NOUN[(i / 7) % 10]
    )
}

fn stats(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(f64::total_cmp);
    let q = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    serde_json::json!({"n": v.len(), "median": q(0.5), "p90": q(0.9), "p99": q(0.99), "min": v[0], "max": v[v.len() - 1]})
}

fn membranes() -> Vec<Membrane> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/data/sd1");
    ["spm.safetensors", "spm2.safetensors"]
        .iter()
        .map(|f| Membrane::from_file(&root.join(f)).expect("fixture membrane"))
        .collect()
}

fn request(addr: &str, body: &str) -> u16 {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let req = format!(
        "POST /v1/gate HTTP/1.1\r\nHost: b\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    String::from_utf8_lossy(&raw)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let te = PathBuf::from(
        args.get(1)
            .expect("usage: gate_bench TEXT_ENCODER_DIR [SPM_BINARY]"),
    );
    let spm_bin = args
        .get(2)
        .cloned()
        .unwrap_or_else(|| "target/release/spm".into());
    // How many new prompts to time (SDXL's two encoders take seconds each on
    // a small CPU).
    let runs: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(50);
    let t0 = Instant::now();
    let (mut engine, _) = build_engine(&EngineSpec {
        text_encoder: Some(te.clone()),
        ..Default::default()
    })
    .expect("load encoder");
    let load_s = t0.elapsed().as_secs_f64();
    engine.set_membranes(membranes()).unwrap();
    let opts = GateOptions::default();
    for i in 0..5 {
        engine.gate(&prompt(10_000 + i), None, &opts).unwrap();
    }
    // New prompts: tokenise + encode + gate against 2 membranes.
    let new: Vec<f64> = (0..runs)
        .map(|i| {
            let t = Instant::now();
            engine.gate(&prompt(i), None, &opts).unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    // The same prompts again: served from the LRU cache.
    let cached: Vec<f64> = (0..2000)
        .map(|i| {
            let t = Instant::now();
            engine.gate(&prompt(i % runs), None, &opts).unwrap();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    // tokenuni only, no encoder: every prompt new.
    let (mut bare, _) = build_engine(&EngineSpec::default()).unwrap();
    bare.set_membranes(membranes()).unwrap();
    let tok = GateOptions {
        metric: Metric::Tokenuni,
        ..Default::default()
    };
    let tokenuni: Vec<f64> = (0..5000)
        .map(|i| {
            let t = Instant::now();
            bare.gate(&prompt(100_000 + i), None, &tok).unwrap();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();

    // Requests/s of the daemon: C client threads, R requests each, one
    // prompt per request, half of them repeats (cache hits), bounded.
    let membrane_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/data/sd1");
    let mut child = Command::new(&spm_bin)
        .args([
            "serve",
            "--port",
            "0",
            "--concurrency",
            "2",
            "--text-encoder",
        ])
        .arg(&te)
        .arg("--membranes")
        .arg(&membrane_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start spm serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .to_string();
    let mut load = serde_json::Map::new();
    for (label, fresh) in [("cached", false), ("new", true)] {
        let (clients, per) = (8usize, if fresh { 4 } else { 250 });
        let t = Instant::now();
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    (0..per)
                        .filter(|r| {
                            let i = if fresh {
                                200_000 + c * 1000 + r
                            } else {
                                r % 20
                            };
                            let body = format!(r#"{{"prompts":["{}"]}}"#, prompt(i));
                            request(&addr, &body) == 200
                        })
                        .count()
                })
            })
            .collect();
        let ok: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        let secs = t.elapsed().as_secs_f64();
        load.insert(
            label.into(),
            serde_json::json!({"clients": clients, "requests": clients * per, "ok": ok, "seconds": secs, "requests_per_s": ok as f64 / secs}),
        );
    }
    let _ = child.kill();
    let _ = child.wait();
    let out = serde_json::json!({
        "encoder_load_s": load_s,
        "new_prompt_ms": stats(new),
        "cached_prompt_us": stats(cached),
        "tokenuni_only_us": stats(tokenuni),
        "serve": load,
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
}
