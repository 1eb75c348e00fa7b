//! The real `spm serve` binary on an ephemeral loopback port: every
//! endpoint, auth, limits, malformed input, concurrency, reload and
//! graceful shutdown. Requests are written by hand over TcpStream.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Daemon {
    child: Child,
    addr: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, extra: &[&str]) -> Daemon {
    let mut child = Command::new(env!("CARGO_BIN_EXE_spm"))
        .args([
            "serve",
            "--port",
            "0",
            "--membranes",
            p(dir),
            "--text-encoder",
            p(&fixture("sd1/base")),
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    assert!(
        addr.starts_with("127.0.0.1:"),
        "binds loopback by default: {addr}"
    );
    Daemon { child, addr }
}

/// One HTTP/1.1 request; returns (status, body).
fn request(addr: &str, method: &str, path: &str, headers: &[&str], body: &[u8]) -> (u16, String) {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let (_, status, body) = write_all_then_read(addr, &head, body);
    (status, body)
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

fn post_gate(addr: &str, token: &str, body: &str) -> (u16, serde_json::Value) {
    let auth = format!("Authorization: Bearer {token}");
    let (s, b) = request(
        addr,
        "POST",
        "/v1/gate",
        &[&auth, "Content-Type: application/json"],
        body.as_bytes(),
    );
    (s, json(&b))
}

/// A membrane folder: the SD1 SPM ("pikachu"), a second one, and a broken file.
fn membrane_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("sd1/spm.safetensors"),
        d.path().join("pikachu.safetensors"),
    )
    .unwrap();
    std::fs::copy(
        fixture("sd1/spm2.safetensors"),
        d.path().join("cat.safetensors"),
    )
    .unwrap();
    std::fs::write(
        d.path().join("broken.safetensors"),
        b"\x10\0\0\0\0\0\0\0{not json}",
    )
    .unwrap();
    d
}

#[test]
fn endpoints_auth_and_errors() {
    let dir = membrane_dir();
    let d = start(
        dir.path(),
        &[
            "--token",
            "s3cret",
            "--max-body-bytes",
            "2048",
            "--max-prompts",
            "4",
        ],
    );
    let a = d.addr.as_str();

    let (s, b) = request(a, "GET", "/healthz", &[], b"");
    assert_eq!(s, 200);
    let h = json(&b);
    assert_eq!(
        (h["status"].as_str(), h["membranes"].as_u64()),
        (Some("ok"), Some(2))
    );

    // Auth on /v1/*.
    assert_eq!(request(a, "GET", "/v1/membranes", &[], b"").0, 401);
    assert_eq!(
        request(
            a,
            "GET",
            "/v1/membranes",
            &["Authorization: Bearer wrong"],
            b""
        )
        .0,
        401
    );
    let (s, b) = request(
        a,
        "GET",
        "/v1/membranes",
        &["Authorization: Bearer s3cret"],
        b"",
    );
    assert_eq!(s, 200);
    let m = json(&b);
    let names: Vec<&str> = m["membranes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cat", "pikachu"]);
    assert_eq!(
        m["membranes"][1]["concepts"],
        serde_json::json!(["pikachu"])
    );
    assert_eq!(m["membranes"][1]["rank"], 1);
    let errs = m["errors"].as_array().unwrap();
    assert_eq!(errs.len(), 1);
    assert!(errs[0]["file"]
        .as_str()
        .unwrap()
        .ends_with("broken.safetensors"));

    // A gate request; values are checked against the reference in tests/transport.rs.
    let (s, v) = post_gate(
        a,
        "s3cret",
        r#"{"prompts":["a photo of pikachu","a cat"],"membranes":["pikachu"]}"#,
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["results"].as_array().unwrap().len(), 2);
    let g = &v["results"][0]["gates"]["pikachu"];
    assert_eq!(g["tokenuni"], 1.0);
    assert_eq!(g["rate"], 1.0);
    assert_eq!(g["strength"], 1.0);
    assert!(v["results"][0]["gates"].get("cat").is_none());
    assert_eq!(v["metric"], "clipcos_tokenuni");
    let (s, v) = post_gate(
        a,
        "s3cret",
        r#"{"prompts":["a cat"],"metric":"tokenuni","curve":"linear"}"#,
    );
    assert_eq!(s, 200);
    assert_eq!(v["results"][0]["gates"]["cat"]["strength"], 1.0);
    assert_eq!(v["results"][0]["gates"]["pikachu"]["strength"], 0.0);

    // Bad input gets a JSON error with a 4xx status.
    for (body, status) in [
        ("{not json", 400),
        (r#"{"prompts":"a cat"}"#, 400),
        (r#"{"prompts":["a"],"bogus":1}"#, 400),
        (r#"{"prompts":["a"],"metric":"cosine"}"#, 400),
        (r#"{"prompts":[]}"#, 422),
        (r#"{"prompts":["a"],"membranes":["nope"]}"#, 404),
        (r#"{"prompts":["a","b","c","d","e"]}"#, 413),
        (r#"{"prompts":["a"],"facilitate":1e999}"#, 400),
    ] {
        let (s, v) = post_gate(a, "s3cret", body);
        assert_eq!(s, status, "{body}: {v}");
        assert!(v["error"].is_string(), "{body}: {v}");
    }
    let big = format!(r#"{{"prompts":["{}"]}}"#, "x".repeat(4096));
    let (s, _) = post_gate(a, "s3cret", &big);
    assert_eq!(s, 413);
    let (s, b) = request(a, "GET", "/v2/nothing", &[], b"");
    assert_eq!(s, 404);
    assert!(json(&b)["error"].is_string());
    assert_eq!(
        request(a, "GET", "/v1/gate", &["Authorization: Bearer s3cret"], b"").0,
        405
    );
}

#[test]
fn concurrent_requests_and_reload() {
    let dir = membrane_dir();
    let d = start(dir.path(), &["--concurrency", "2"]);
    let a = d.addr.clone();
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let a = a.clone();
            std::thread::spawn(move || {
                for j in 0..5 {
                    let body = format!(r#"{{"prompts":["prompt {i} {j} pikachu","a cat {j}"]}}"#);
                    let (s, v) = post_gate(&a, "", &body);
                    assert_eq!(s, 200, "{v}");
                    assert_eq!(v["results"][0]["gates"]["pikachu"]["tokenuni"], 1.0);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    // Reload picks up a new file (a kohya conversion keeps the concepts).
    let out = dir.path().join("pika_kohya.safetensors");
    run_ok(&[
        "convert",
        p(&fixture("sd1/spm.safetensors")),
        "--to",
        "kohya",
        "-o",
        p(&out),
    ]);
    let (s, b) = request(&a, "POST", "/v1/reload", &[], b"");
    assert_eq!(s, 200, "{b}");
    assert_eq!(json(&b)["membranes"].as_array().unwrap().len(), 3);
    let (_, v) = post_gate(
        &a,
        "",
        r#"{"prompts":["pikachu"],"membranes":["pika_kohya"]}"#,
    );
    // The prompt is the concept: cosine 1 up to rounding (the last bit
    // differs between platforms' float kernels), tokenuni exactly 1.
    let rate = v["results"][0]["gates"]["pika_kohya"]["rate"]
        .as_f64()
        .unwrap();
    assert!((rate - 1.0).abs() < 1e-9, "{rate}");
}

#[test]
fn timeout_is_a_json_504() {
    let dir = membrane_dir();
    let d = start(dir.path(), &["--timeout-ms", "1", "--max-prompts", "64"]);
    let prompts: Vec<String> = (0..64)
        .map(|i| format!("\"distinct prompt number {i} about a forest\""))
        .collect();
    let (s, v) = post_gate(
        &d.addr,
        "",
        &format!(r#"{{"prompts":[{}]}}"#, prompts.join(",")),
    );
    assert_eq!(s, 504, "{v}");
    assert!(v["error"].as_str().unwrap().contains("exceeded"));
}

#[cfg(unix)]
#[test]
fn sigterm_shuts_down_cleanly() {
    let dir = membrane_dir();
    let mut d = start(dir.path(), &[]);
    assert_eq!(request(&d.addr, "GET", "/healthz", &[], b"").0, 200);
    let pid = d.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let t = Instant::now();
    loop {
        if let Some(status) = d.child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn gate_command_without_encoder_uses_tokenuni() {
    let out = spm()
        .args([
            "gate",
            "--json",
            "--membrane",
            p(&fixture("sd1/spm.safetensors")),
            "a photo of pikachu",
            "a tree",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tokenuni only"));
    let v = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(v["metric"], "tokenuni");
    assert_eq!(v["results"][0]["gates"]["spm"]["rate"], 1.0);
    assert_eq!(v["results"][1]["gates"]["spm"]["rate"], 0.0);
    // clipcos without an encoder is refused with a clear message.
    let out = spm()
        .args([
            "gate",
            "--metric",
            "clipcos",
            "--membrane",
            p(&fixture("sd1/spm.safetensors")),
            "x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a text encoder"));
}

/// Send `head` and `body` in full before reading anything, as Python's
/// urllib and requests do; returns whether the whole body could be sent,
/// the status and the response body.
fn write_all_then_read(addr: &str, head: &str, body: &[u8]) -> (bool, u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let wrote = s
        .write_all(head.as_bytes())
        .and_then(|_| s.write_all(body))
        .is_ok();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (wrote, status, body)
}

#[test]
fn oversize_body_gets_a_readable_json_413() {
    let dir = membrane_dir();
    let d = start(dir.path(), &["--max-body-bytes", "65536"]);
    let body = format!(r#"{{"prompts":["{}"]}}"#, "a".repeat(100_000));
    let head = format!(
        "POST /v1/gate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let (wrote, status, text) = write_all_then_read(&d.addr, &head, body.as_bytes());
    assert!(
        wrote,
        "the body could not be sent in full (connection reset)"
    );
    assert_eq!(status, 413, "{text}");
    assert!(json(&text)["error"].as_str().unwrap().contains("65536"));
    // Larger than loopback's socket buffers (where a server that stops
    // reading resets the connection): still drained, still a readable 413.
    let big = format!(r#"{{"prompts":["{}"]}}"#, "a".repeat(6_000_000));
    let head = format!(
        "POST /v1/gate HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        big.len()
    );
    let (wrote, status, _) = write_all_then_read(&d.addr, &head, big.as_bytes());
    assert!(wrote && status == 413, "wrote {wrote}, status {status}");
    // Chunked, without a length: the same.
    let chunk = "a".repeat(30_000);
    let mut chunked = String::new();
    for _ in 0..4 {
        chunked.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
    }
    chunked.push_str("0\r\n\r\n");
    let head = "POST /v1/gate HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n";
    let (wrote, status, text) = write_all_then_read(&d.addr, head, chunked.as_bytes());
    assert!(wrote);
    assert_eq!(status, 413, "{text}");
    // The daemon is fine afterwards.
    assert_eq!(post_gate(&d.addr, "", r#"{"prompts":["pikachu"]}"#).0, 200);
}

#[test]
fn errors_are_json_and_the_auth_scheme_is_case_insensitive() {
    let dir = membrane_dir();
    let d = start(dir.path(), &["--token", "s3cret"]);
    let (s, body) = request(
        &d.addr,
        "GET",
        "/v1/gate",
        &["Authorization: Bearer s3cret"],
        b"",
    );
    assert_eq!(s, 405);
    assert!(
        json(&body)["error"].as_str().unwrap().contains("POST"),
        "{body}"
    );
    let (s, body) = request(&d.addr, "DELETE", "/healthz", &[], b"");
    assert_eq!(s, 405);
    json(&body);
    let gate = br#"{"prompts":["pikachu"]}"#;
    for auth in [
        "Authorization: bearer s3cret",
        "Authorization: BEARER s3cret",
        "Authorization: Bearer   s3cret",
    ] {
        assert_eq!(
            request(&d.addr, "POST", "/v1/gate", &[auth], gate).0,
            200,
            "{auth}"
        );
    }
    for auth in [
        "Authorization: Basic s3cret",
        "Authorization: bearer s3cre",
        "Authorization: s3cret",
    ] {
        let (s, body) = request(&d.addr, "POST", "/v1/gate", &[auth], gate);
        assert_eq!(s, 401, "{auth}");
        json(&body);
    }
}

#[test]
fn numbers_caps_and_normalisation_over_http() {
    let dir = membrane_dir();
    let d = start(dir.path(), &["--max-subprompts", "8", "--max-tokens", "40"]);
    for f in ["-1", "-0.5"] {
        let (s, v) = post_gate(
            &d.addr,
            "",
            &format!(r#"{{"prompts":["pikachu"],"facilitate":{f}}}"#),
        );
        assert_eq!(s, 422, "{f}: {v}");
        assert!(v["error"].as_str().unwrap().contains("facilitate"), "{v}");
    }
    // Not a finite JSON number: refused as bad JSON.
    let (s, _) = post_gate(&d.addr, "", r#"{"prompts":["pikachu"],"facilitate":1e999}"#);
    assert!(s == 400 || s == 422, "{s}");
    let many_and = ["a"; 9].join(" AND ");
    let (s, v) = post_gate(&d.addr, "", &format!(r#"{{"prompts":["{many_and}"]}}"#));
    assert_eq!(s, 413, "{v}");
    assert!(v["error"].as_str().unwrap().contains("sub-prompts"), "{v}");
    let long = ["word"; 41].join(" ");
    let (s, v) = post_gate(&d.addr, "", &format!(r#"{{"prompts":["{long}"]}}"#));
    assert_eq!(s, 413, "{v}");
    assert!(v["error"].as_str().unwrap().contains("tokens"), "{v}");
    // `normalize`: reference by default, strict on request.
    let evasive = "pi\u{200b}ka\u{200b}chu";
    let body = |mode: &str| {
        format!(r#"{{"prompts":["{evasive}"],"membranes":["pikachu"],"metric":"tokenuni"{mode}}}"#)
    };
    let (s, v) = post_gate(&d.addr, "", &body(""));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["normalize"], "reference");
    assert!(
        v["results"][0]["gates"]["pikachu"]["tokenuni"]
            .as_f64()
            .unwrap()
            < 1.0
    );
    let (s, v) = post_gate(&d.addr, "", &body(r#","normalize":"strict""#));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["results"][0]["gates"]["pikachu"]["tokenuni"], 1.0);
    let (s, _) = post_gate(&d.addr, "", &body(r#","normalize":"loose""#));
    assert_eq!(s, 400);
}

/// A request that times out stops computing: the daemon's busy count goes
/// back to 0 long before the abandoned work (tens of seconds of sub-prompts)
/// could have finished, and the next request is answered.
#[test]
fn timed_out_work_is_cancelled() {
    let dir = membrane_dir();
    let d = start(
        dir.path(),
        &[
            "--timeout-ms",
            "300",
            "--max-body-bytes",
            "2000000",
            "--max-subprompts",
            "1000000",
            "--max-tokens",
            "100000000",
            "--concurrency",
            "1",
        ],
    );
    let parts: Vec<String> = (0..60_000).map(|i| format!("w{i}")).collect();
    let body = format!(r#"{{"prompts":["{}"]}}"#, parts.join(" AND "));
    let (s, v) = post_gate(&d.addr, "", &body);
    assert_eq!(s, 504, "{v}");
    let t = Instant::now();
    loop {
        let (_, h) = request(&d.addr, "GET", "/healthz", &[], b"");
        if json(&h)["busy"] == 0 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "abandoned work still running: {h}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (s, v) = post_gate(&d.addr, "", r#"{"prompts":["pikachu"]}"#);
    assert_eq!(s, 200, "{v}");
}

#[test]
fn membrane_folder_is_scanned_recursively_and_must_exist() {
    let d = tempfile::tempdir().unwrap();
    let lora = d.path().join("Lora");
    std::fs::create_dir_all(lora.join("erasers/characters")).unwrap();
    std::fs::copy(
        fixture("sd1/spm.safetensors"),
        lora.join("erasers/characters/pikachu.safetensors"),
    )
    .unwrap();
    std::fs::copy(
        fixture("sd1/spm2.safetensors"),
        lora.join("cat.safetensors"),
    )
    .unwrap();
    // The same name twice: the last in path order wins, as in A1111.
    std::fs::create_dir_all(lora.join("zz")).unwrap();
    std::fs::copy(
        fixture("sd1/spm2.safetensors"),
        lora.join("zz/pikachu.safetensors"),
    )
    .unwrap();
    let daemon = start(&lora, &[]);
    let (s, body) = request(&daemon.addr, "GET", "/v1/membranes", &[], b"");
    assert_eq!(s, 200);
    let v = json(&body);
    let list = v["membranes"].as_array().unwrap();
    let names: Vec<&str> = list.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["cat", "pikachu"]);
    let pika = list.iter().find(|m| m["name"] == "pikachu").unwrap();
    assert!(pika["file"].as_str().unwrap().contains("zz"), "{pika}");
    assert!(v["errors"].as_array().unwrap().iter().any(|e| e["file"]
        .as_str()
        .unwrap()
        .contains("erasers")
        && e["error"].as_str().unwrap().contains("shadowed")));
    // A membrane three folders deep is gated (here: the one in erasers/,
    // once the clash is gone).
    std::fs::remove_dir_all(lora.join("zz")).unwrap();
    let (s, _) = request(&daemon.addr, "POST", "/v1/reload", &[], b"");
    assert_eq!(s, 200);
    let (s, v) = post_gate(
        &daemon.addr,
        "",
        r#"{"prompts":["a photo of pikachu"],"membranes":["pikachu"],"metric":"tokenuni"}"#,
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["results"][0]["gates"]["pikachu"]["tokenuni"], 1.0);
    // A missing folder, or a file, stops the daemon at start, naming it.
    for bad in [d.path().join("missing"), lora.join("cat.safetensors")] {
        let out = spm()
            .args(["serve", "--port", "0", "--membranes", p(&bad)])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(p(&bad)), "{err}");
    }
}

#[test]
fn host_may_be_a_name() {
    // `start` checks the announced address is loopback (127.0.0.1).
    let dir = membrane_dir();
    let d = start(dir.path(), &["--host", "localhost"]);
    assert_eq!(request(&d.addr, "GET", "/healthz", &[], b"").0, 200);
}
