//! `spm serve`: a small local HTTP daemon that computes FT gates for the
//! WebUI extension.
//!
//! Safe by default: it binds to loopback, can require a bearer token, caps
//! request bodies, the number of prompts and the time and concurrency of
//! gate computations, answers every error as JSON with a 4xx/5xx status, and
//! shuts down gracefully on SIGINT/SIGTERM. The model is loaded *before* the
//! port opens, so a listening daemon is a ready one. A membrane file that
//! fails to parse is reported in `/v1/membranes` and skipped.
//!
//! | endpoint | answer |
//! |---|---|
//! | `GET /healthz` | `{"status":"ok","encoder":…,"membranes":N}` (no token needed) |
//! | `GET /v1/membranes` | `{"membranes":[{name,file,concepts,rank,arch}],"errors":[{file,error}]}` |
//! | `POST /v1/gate` | `{"prompts":[…],"membranes"?:[names],"metric"?,"curve"?,"facilitate"?}` → `{"results":[{"prompt","gates":{name:{rate,strength,clipcos,tokenuni}}}]}` |
//! | `POST /v1/reload` | rescans the membrane folder; answers like `/v1/membranes` |

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::convert::Curve;
use crate::error::{Error, Result};
use crate::transport::clip::EncoderInfo;
use crate::transport::gate::{Engine, GateOptions, Membrane, Metric};

/// Limits and defaults of a running daemon.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub addr: SocketAddr,
    pub membranes_dir: Option<PathBuf>,
    pub token: Option<String>,
    pub max_body_bytes: usize,
    pub max_prompts: usize,
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
    permits: Semaphore,
}

/// Membrane files in `dir` (`.safetensors`, `.pt`), parsed; failures are
/// returned beside the good ones, never fatal.
pub fn scan_membranes(dir: &Path) -> (Vec<Membrane>, Vec<LoadError>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) => {
            bad.push(LoadError {
                file: dir.display().to_string(),
                error: e.to_string(),
            });
            return (good, bad);
        }
    };
    files.sort();
    for f in files {
        let ext = f
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        if !matches!(ext.as_str(), "safetensors" | "pt" | "ckpt") || !f.is_file() {
            continue;
        }
        match Membrane::from_file(&f) {
            Ok(m) => good.push(m),
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

fn err(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

fn authorised(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(token) = &state.cfg.token else {
        return true;
    };
    let want = format!("Bearer {token}");
    let got = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // Constant-time comparison: the token guards a local daemon, but a
    // timing side channel costs nothing to close.
    got.len() == want.len()
        && got
            .bytes()
            .zip(want.bytes())
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
}

#[derive(Serialize)]
struct GateResult {
    prompt: String,
    gates: BTreeMap<String, crate::transport::gate::Gate>,
}

async fn gate(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    if !authorised(&s, &headers) {
        return err(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    let body = match body {
        Ok(b) => b,
        Err(rej) => return err(rej.status(), rej.body_text()),
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
                "{} prompts; at most {} per request",
                req.prompts.len(),
                s.cfg.max_prompts
            ),
        );
    }
    let opts = GateOptions {
        metric: req.metric.unwrap_or(s.cfg.defaults.metric),
        curve: req.curve.unwrap_or(s.cfg.defaults.curve),
        facilitate: req.facilitate.unwrap_or(s.cfg.defaults.facilitate),
    };
    if !opts.facilitate.is_finite() {
        return err(
            StatusCode::UNPROCESSABLE_ENTITY,
            "`facilitate` must be a finite number",
        );
    }
    {
        let engine = s.engine.read().expect("engine lock");
        if opts.metric.needs_encoder() && !engine.has_encoder() {
            return err(
                StatusCode::UNPROCESSABLE_ENTITY,
                "this daemon has no text encoder (--text-encoder); use metric tokenuni or allone",
            );
        }
        if let Some(names) = &req.membranes {
            if let Some(n) = names
                .iter()
                .find(|n| !engine.membranes().any(|m| &m.name == *n))
            {
                return err(StatusCode::NOT_FOUND, format!("unknown membrane `{n}`"));
            }
        }
    }
    let permit = match tokio::time::timeout(s.cfg.timeout, s.permits.acquire()).await {
        Ok(Ok(p)) => p,
        _ => {
            return err(
                StatusCode::SERVICE_UNAVAILABLE,
                "busy: too many gate requests in flight",
            )
        }
    };
    let s2 = s.clone();
    let work = tokio::task::spawn_blocking(move || -> Result<Vec<GateResult>> {
        let engine = s2.engine.read().expect("engine lock");
        req.prompts
            .iter()
            .map(|p| {
                let gates = engine.gate(p, req.membranes.as_deref(), &opts)?;
                Ok(GateResult {
                    prompt: p.clone(),
                    gates: gates.into_iter().collect(),
                })
            })
            .collect()
    });
    let out = tokio::time::timeout(s.cfg.timeout, work).await;
    drop(permit);
    match out {
        Ok(Ok(Ok(results))) => {
            Json(json!({ "results": results, "metric": opts.metric, "curve": opts.curve }))
                .into_response()
        }
        Ok(Ok(Err(Error::Usage(m)))) => err(StatusCode::UNPROCESSABLE_ENTITY, m),
        Ok(Ok(Err(e))) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Ok(Err(e)) => err(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("gate task failed: {e}"),
        ),
        Err(_) => err(
            StatusCode::GATEWAY_TIMEOUT,
            format!("gate computation exceeded {} ms", s.cfg.timeout.as_millis()),
        ),
    }
}

async fn not_found() -> Response {
    err(StatusCode::NOT_FOUND, "no such endpoint")
}

/// Build the router over a ready engine (used by `run` and by tests).
fn router(state: Arc<AppState>) -> Router {
    let limit = state.cfg.max_body_bytes;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/membranes", get(membranes))
        .route("/v1/gate", post(gate))
        .route("/v1/reload", post(reload))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
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
            permits: Semaphore::new(cfg.concurrency.max(1)),
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
