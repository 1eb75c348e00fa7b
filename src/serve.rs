//! `spm serve`: a small local HTTP daemon that computes FT gates for the
//! WebUI extension.
//!
//! Safe by default: it binds to loopback, can require a bearer token, caps
//! request bodies, the number of prompts, of `AND` sub-prompts and of
//! tokens, and the time and concurrency of gate computations, answers every
//! error as JSON with a 4xx/5xx status, and shuts down gracefully on
//! SIGINT/SIGTERM. The model is loaded *before* the port opens, so a
//! listening daemon is a ready one. A membrane file that fails to parse is
//! reported in `/v1/membranes` and skipped.
//!
//! Work never outlives its request: a gate computation that times out (504)
//! or whose client goes away is cancelled between sub-prompts, and it holds
//! its concurrency permit until it has actually stopped, so abandoned work
//! cannot crowd out the next request. An oversize body is read and discarded
//! up to a bound before the JSON 413 goes out, so a client that sends its
//! whole body before reading (Python's `urllib`, `requests`) reads the 413
//! instead of a connection reset.
//!
//! | endpoint | answer |
//! |---|---|
//! | `GET /healthz` | `{"status":"ok","encoder":…,"membranes":N}` (no token needed) |
//! | `GET /v1/membranes` | `{"membranes":[{name,file,concepts,rank,arch}],"errors":[{file,error}]}` |
//! | `POST /v1/gate` | `{"prompts":[…],"membranes"?:[names],"metric"?,"curve"?,"facilitate"?,"normalize"?}` → `{"results":[{"prompt","gates":{name:{rate,strength,clipcos,tokenuni}}}]}` |
//! | `POST /v1/reload` | rescans the membrane folder; answers like `/v1/membranes` |

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::convert::Curve;
use crate::error::{Error, Result};
use crate::model::clip::EncoderInfo;
use crate::transport::gate::{sub_prompts, Engine, GateOptions, Membrane, Metric};
use crate::transport::strict::Normalize;

/// Limits and defaults of a running daemon.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub addr: SocketAddr,
    pub membranes_dir: Option<PathBuf>,
    pub token: Option<String>,
    pub max_body_bytes: usize,
    pub max_prompts: usize,
    /// Most `AND` sub-prompts over all prompts of one request (each costs
    /// one text-encoder pass).
    pub max_subprompts: usize,
    /// Most tokens (before the 77-token cut) over all prompts of one request.
    pub max_tokens: usize,
    pub timeout: Duration,
    pub concurrency: usize,
    pub defaults: GateOptions,
}

/// A membrane file that could not be used, for `/v1/membranes`.
#[derive(Debug, Clone, Serialize)]
pub struct LoadError {
    pub file: String,
    pub error: String,
}

struct AppState {
    engine: RwLock<Engine>,
    errors: RwLock<Vec<LoadError>>,
    encoder: Option<EncoderInfo>,
    cfg: ServeConfig,
    permits: Arc<Semaphore>,
}

/// Membrane files under `dir` and its subfolders (`.safetensors`, `.pt`,
/// `.ckpt`), parsed; failures are returned beside the good ones, never
/// fatal. A membrane is named by its file stem, the name A1111 and Forge
/// give a LoRA in `<lora:NAME:…>` whatever subfolder of `Lora/` it lies in.
/// When two files share a stem, A1111 keeps the last one it walks (folders
/// and files in sorted order, `networks.py` `list_available_networks`), so
/// the last in path order is served here too and the other is listed as an
/// error, since the extension resolves the name through the WebUI.
pub fn scan_membranes(dir: &Path) -> (Vec<Membrane>, Vec<LoadError>) {
    let mut good: Vec<Membrane> = Vec::new();
    let mut bad = Vec::new();
    let mut files = Vec::new();
    if let Err(e) = walk_membranes(dir, &mut files, &mut bad, 0) {
        bad.push(LoadError {
            file: dir.display().to_string(),
            error: e.to_string(),
        });
        return (good, bad);
    }
    files.sort();
    for f in files {
        match Membrane::from_file(&f) {
            Ok(m) => {
                if let Some(k) = good.iter().position(|g| g.name == m.name) {
                    let shadowed = std::mem::replace(&mut good[k], m);
                    bad.push(LoadError {
                        file: shadowed.file.display().to_string(),
                        error: format!(
                            "shadowed: {} is also named `{}` and wins, as in A1111 (the last file in folder order); rename one of them",
                            good[k].file.display(),
                            good[k].name
                        ),
                    });
                } else {
                    good.push(m);
                }
            }
            Err(e) => {
                warn!("skipping membrane: {e}");
                bad.push(LoadError {
                    file: f.display().to_string(),
                    error: e.to_string(),
                });
            }
        }
    }
    (good, bad)
}

/// Deepest folder level scanned (a symlink loop ends here).
const MAX_SCAN_DEPTH: usize = 16;

fn walk_membranes(
    dir: &Path,
    files: &mut Vec<PathBuf>,
    bad: &mut Vec<LoadError>,
    depth: usize,
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            if depth + 1 >= MAX_SCAN_DEPTH {
                bad.push(LoadError {
                    file: path.display().to_string(),
                    error: format!("not scanned: deeper than {MAX_SCAN_DEPTH} folders"),
                });
            } else if let Err(e) = walk_membranes(&path, files, bad, depth + 1) {
                bad.push(LoadError {
                    file: path.display().to_string(),
                    error: e.to_string(),
                });
            }
            continue;
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        if matches!(ext.as_str(), "safetensors" | "pt" | "ckpt") && path.is_file() {
            files.push(path);
        }
    }
    Ok(())
}

/// Refuse to start on a membrane path that is missing or not a folder: a
/// daemon serving 0 membranes would answer every gate with "unknown
/// membrane", which the extension treats as full strength.
pub fn check_membranes_dir(dir: &Path) -> Result<()> {
    match std::fs::metadata(dir) {
        Err(e) => Err(Error::io(dir, e)),
        Ok(m) if !m.is_dir() => Err(Error::file(
            dir,
            "--membranes must be a folder of membrane files (it is scanned recursively)",
        )),
        Ok(_) => Ok(()),
    }
}

fn err(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

fn authorised(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(token) = &state.cfg.token else {
        return true;
    };
    let got = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // The auth scheme is case-insensitive (RFC 9110 §11.1), one or more
    // spaces separate it from the credentials (RFC 9110 §11.4).
    let Some((scheme, cred)) = got.split_once(' ') else {
        return false;
    };
    let cred = cred.trim_start_matches(' ');
    // Constant-time comparison: the token guards a local daemon, but a
    // timing side channel costs nothing to close.
    scheme.eq_ignore_ascii_case("bearer")
        && cred.len() == token.len()
        && cred
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |a, (x, y)| a | (x ^ y))
            == 0
}

async fn healthz(State(s): State<Arc<AppState>>) -> Response {
    let n = s.engine.read().expect("engine lock").membranes().count();
    Json(json!({
        "status": "ok",
        "encoder": s.encoder,
        "membranes": n,
        "metric": s.cfg.defaults.metric,
        "curve": s.cfg.defaults.curve,
        "normalize": s.cfg.defaults.normalize,
        // Gate computations running now; abandoned ones stop within one
        // sub-prompt, so this falls back to 0 once clients go away.
        "busy": s.cfg.concurrency.max(1) - s.permits.available_permits(),
    }))
    .into_response()
}

fn membranes_body(s: &AppState) -> Value {
    let engine = s.engine.read().expect("engine lock");
    let list: Vec<&Membrane> = engine.membranes().collect();
    json!({ "membranes": list, "errors": *s.errors.read().expect("errors lock") })
}

async fn membranes(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if !authorised(&s, &headers) {
        return err(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    Json(membranes_body(&s)).into_response()
}

async fn reload(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if !authorised(&s, &headers) {
        return err(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    let Some(dir) = s.cfg.membranes_dir.clone() else {
        return err(
            StatusCode::BAD_REQUEST,
            "no membrane folder configured (--membranes DIR)",
        );
    };
    let s2 = s.clone();
    let done = tokio::task::spawn_blocking(move || -> Result<()> {
        let (good, bad) = scan_membranes(&dir);
        // Encode the new set before taking the write lock, so gates keep
        // flowing while concepts are encoded.
        let mut fresh = s2.engine.read().expect("engine lock").sibling();
        fresh.set_membranes(good)?;
        *s2.engine.write().expect("engine lock") = fresh;
        *s2.errors.write().expect("errors lock") = bad;
        Ok(())
    })
    .await;
    match done {
        Ok(Ok(())) => Json(membranes_body(&s)).into_response(),
        Ok(Err(e)) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => err(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reload failed: {e}"),
        ),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GateRequest {
    prompts: Vec<String>,
    #[serde(default)]
    membranes: Option<Vec<String>>,
    #[serde(default)]
    metric: Option<Metric>,
    #[serde(default)]
    curve: Option<Curve>,
    #[serde(default)]
    facilitate: Option<f64>,
    #[serde(default)]
    normalize: Option<Normalize>,
}

#[derive(Serialize)]
struct GateResult {
    prompt: String,
    gates: BTreeMap<String, crate::transport::gate::Gate>,
}

/// Why a request body was not taken.
enum BodyFail {
    TooLarge,
    Slow,
    Broken(String),
}

/// Read a request body of at most `limit` bytes within `deadline`. A larger
/// one is read on and discarded up to `drain` bytes (or the deadline) so the
/// client, which may be writing the whole body before it reads, gets the
/// 413 rather than a reset; beyond that the connection is closed.
async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    drain: usize,
    deadline: Instant,
) -> std::result::Result<Bytes, BodyFail> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > drain as u64) {
        return Err(BodyFail::TooLarge);
    }
    let mut body = body;
    let mut buf: Vec<u8> = Vec::new();
    let mut seen = 0usize;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = match tokio::time::timeout(left, body.frame()).await {
            Err(_) => {
                return Err(if seen > limit {
                    BodyFail::TooLarge
                } else {
                    BodyFail::Slow
                })
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(BodyFail::Broken(e.to_string())),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len();
        if seen <= limit {
            buf.extend_from_slice(&data);
        } else if seen > drain {
            return Err(BodyFail::TooLarge);
        }
    }
    if seen > limit {
        return Err(BodyFail::TooLarge);
    }
    Ok(Bytes::from(buf))
}

/// An error answer that also closes the connection (its body may be unread).
fn err_close(status: StatusCode, msg: impl Into<String>) -> Response {
    let mut r = err(status, msg);
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// Sets the cancel flag when dropped: on every way out of the handler —
/// answer, timeout, or the client going away (hyper drops the future).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Why a gate computation produced no gates.
enum GateFail {
    /// Over one of the request limits (413).
    TooMuch(String),
    Failed(Error),
}

async fn gate(State(s): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    if !authorised(&s, &headers) {
        return err_close(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    let started = Instant::now();
    let limit = s.cfg.max_body_bytes;
    // As nginx's lingering close: keep reading (and dropping) a while, so a
    // client still writing can read the answer; bounded in bytes and time.
    let drain = limit.saturating_mul(64).clamp(8 << 20, 64 << 20);
    let body = match read_body(body, &headers, limit, drain, started + s.cfg.timeout).await {
        Ok(b) => b,
        Err(BodyFail::TooLarge) => {
            return err_close(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body larger than {limit} bytes (--max-body-bytes)"),
            )
        }
        Err(BodyFail::Slow) => {
            return err_close(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "request body not received within {} ms",
                    s.cfg.timeout.as_millis()
                ),
            )
        }
        Err(BodyFail::Broken(e)) => {
            return err_close(StatusCode::BAD_REQUEST, format!("bad request body: {e}"))
        }
    };
    let req: GateRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return err(StatusCode::BAD_REQUEST, format!("bad JSON: {e}")),
    };
    if req.prompts.is_empty() {
        return err(StatusCode::UNPROCESSABLE_ENTITY, "`prompts` is empty");
    }
    if req.prompts.len() > s.cfg.max_prompts {
        return err(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "`prompts`: {} prompts; at most {} per request (--max-prompts)",
                req.prompts.len(),
                s.cfg.max_prompts
            ),
        );
    }
    let opts = GateOptions {
        metric: req.metric.unwrap_or(s.cfg.defaults.metric),
        curve: req.curve.unwrap_or(s.cfg.defaults.curve),
        facilitate: req.facilitate.unwrap_or(s.cfg.defaults.facilitate),
        normalize: req.normalize.unwrap_or(s.cfg.defaults.normalize),
    };
    {
        let engine = s.engine.read().expect("engine lock");
        if opts.metric.needs_encoder() && !engine.has_encoder() {
            return err(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "`metric`: {} needs a text encoder and this daemon has none (--text-encoder); use tokenuni or allone",
                    opts.metric.name()
                ),
            );
        }
        if let Some(names) = &req.membranes {
            if let Some(n) = names
                .iter()
                .find(|n| !engine.membranes().any(|m| &m.name == *n))
            {
                return err(
                    StatusCode::NOT_FOUND,
                    format!("`membranes`: unknown membrane `{n}`"),
                );
            }
        }
    }
    let left = s.cfg.timeout.saturating_sub(started.elapsed());
    let permit = match tokio::time::timeout(left, s.permits.clone().acquire_owned()).await {
        Ok(Ok(p)) => p,
        _ => {
            return err(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy: too many gate requests in flight",
            )
        }
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let _guard = CancelOnDrop(cancel.clone());
    let s2 = s.clone();
    let work = tokio::task::spawn_blocking(
        move || -> std::result::Result<Vec<GateResult>, GateFail> {
            // The permit lives as long as the work does, not the request.
            let _permit = permit;
            let engine = s2.engine.read().expect("engine lock");
            let (mut parts, mut tokens) = (0usize, 0usize);
            // Split once: the same sub-prompts are counted, then gated.
            let split: Vec<Vec<String>> = req
                .prompts
                .iter()
                .map(|p| sub_prompts(p, opts.normalize))
                .collect();
            for subs in &split {
                for sub in subs {
                    parts += 1;
                    tokens += engine.token_count(sub);
                    if parts % 64 == 0 && cancel.load(Ordering::Relaxed) {
                        return Err(GateFail::Failed(Error::Cancelled));
                    }
                }
                if parts > s2.cfg.max_subprompts {
                    return Err(GateFail::TooMuch(format!(
                    "`prompts`: more than {} sub-prompts (prompts and their AND parts) in one request (--max-subprompts)",
                    s2.cfg.max_subprompts
                )));
                }
                if tokens > s2.cfg.max_tokens {
                    return Err(GateFail::TooMuch(format!(
                        "`prompts`: more than {} tokens in one request (--max-tokens)",
                        s2.cfg.max_tokens
                    )));
                }
                if cancel.load(Ordering::Relaxed) {
                    return Err(GateFail::Failed(Error::Cancelled));
                }
            }
            req.prompts
                .iter()
                .zip(&split)
                .map(|(p, subs)| {
                    let gates = engine
                        .gate_parts(subs, req.membranes.as_deref(), &opts, Some(&cancel))
                        .map_err(GateFail::Failed)?;
                    Ok(GateResult {
                        prompt: p.clone(),
                        gates: gates.into_iter().collect(),
                    })
                })
                .collect()
        },
    );
    let left = s.cfg.timeout.saturating_sub(started.elapsed());
    match tokio::time::timeout(left, work).await {
        Ok(Ok(Ok(results))) => Json(json!({
            "results": results, "metric": opts.metric, "curve": opts.curve, "normalize": opts.normalize,
        }))
        .into_response(),
        Ok(Ok(Err(GateFail::TooMuch(m)))) => err(StatusCode::PAYLOAD_TOO_LARGE, m),
        Ok(Ok(Err(GateFail::Failed(Error::Usage(m))))) => {
            err(StatusCode::UNPROCESSABLE_ENTITY, m)
        }
        Ok(Ok(Err(GateFail::Failed(e)))) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Ok(Err(e)) => err(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("gate task failed: {e}"),
        ),
        // `_guard` drops on return and cancels the abandoned work.
        Err(_) => err(
            StatusCode::GATEWAY_TIMEOUT,
            format!("gate computation exceeded {} ms", s.cfg.timeout.as_millis()),
        ),
    }
}

async fn not_found() -> Response {
    err(StatusCode::NOT_FOUND, "no such endpoint")
}

/// The methods each endpoint answers, for 405's `Allow` header.
const ROUTES: [(&str, &str); 4] = [
    ("/healthz", "GET"),
    ("/v1/membranes", "GET"),
    ("/v1/gate", "POST"),
    ("/v1/reload", "POST"),
];

/// axum answers a wrong method with an empty 405; every error here is JSON,
/// and a 405 names the allowed method (`Allow`, RFC 9110 §15.5.6).
async fn json_405(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let allow = ROUTES
        .iter()
        .find(|(p, _)| *p == req.uri().path())
        .map(|(_, m)| *m);
    let res = next.run(req).await;
    if res.status() != StatusCode::METHOD_NOT_ALLOWED
        || res.headers().contains_key(header::CONTENT_TYPE)
    {
        return res;
    }
    let allow = allow.unwrap_or("");
    let mut r = err(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed here; use {allow}"),
    );
    if let Ok(v) = HeaderValue::from_str(allow) {
        r.headers_mut().insert(header::ALLOW, v);
    }
    r
}

/// Build the router over a ready engine (used by `run` and by tests).
fn router(state: Arc<AppState>) -> Router {
    // /v1/gate reads its body itself (bounded, drained); no other route
    // reads one.
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/membranes", get(membranes))
        .route("/v1/gate", post(gate))
        .route("/v1/reload", post(reload))
        .fallback(not_found)
        .layer(axum::middleware::from_fn(json_405))
        .with_state(state)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    info!("shutting down");
}

/// Serve until SIGINT/SIGTERM. `ready` is called with the bound address
/// once the port is open (the engine is already loaded by then).
pub fn run(
    engine: Engine,
    errors: Vec<LoadError>,
    encoder: Option<EncoderInfo>,
    cfg: ServeConfig,
    ready: impl FnOnce(SocketAddr),
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::usage(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(async move {
        if !cfg.addr.ip().is_loopback() {
            warn!(
                "binding to {} — reachable from other machines; set --token",
                cfg.addr
            );
        }
        let listener = tokio::net::TcpListener::bind(cfg.addr)
            .await
            .map_err(|e| Error::usage(format!("cannot listen on {}: {e}", cfg.addr)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::usage(e.to_string()))?;
        let state = Arc::new(AppState {
            permits: Arc::new(Semaphore::new(cfg.concurrency.max(1))),
            engine: RwLock::new(engine),
            errors: RwLock::new(errors),
            encoder,
            cfg,
        });
        ready(addr);
        axum::serve(listener, router(state))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .map_err(|e| Error::usage(format!("server error: {e}")))
    })
}
