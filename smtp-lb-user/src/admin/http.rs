//! The one HTTP server of both daemons (admin APIs and metrics listeners):
//! axum routes served by hyper's HTTP/1 connection, every peer bounded —
//! head size and read time, body size, handler time, open connections —
//! and a shutdown that waits a bounded time for requests in flight.
use std::{
    fs,
    future::Future,
    io::Read,
    net::SocketAddr,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use axum::{
    Json, Router,
    body::Body,
    extract::Request,
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore, task::JoinSet, time::timeout};
use tracing::debug;

/// Largest request head (request line and headers); hyper answers 431 above.
/// hyper's floor for this buffer is 8 KiB.
const MAX_HEAD: usize = 16 * 1024;
/// Largest request body; 413 above.
pub const MAX_BODY: usize = 64 * 1024;
/// Time a client gets to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client gets to send its body.
const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a handler gets (a reload reprograms maps; a scrape walks conntrack).
const HANDLER_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; further ones wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;
/// On shutdown, time requests in flight get to finish before they are cancelled.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// A JSON error answer `{"error": message}`.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

/// A JSON answer with status 200.
pub fn json(value: serde_json::Value) -> Response {
    Json(value).into_response()
}

/// Runs blocking work (map reads, a reload, a lock shared with the control
/// loop) off the runtime's threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Response> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))
}

/// Wraps `router` so that every request needs `Authorization: Bearer <token>`.
pub fn require_token(router: Router, token: String) -> Router {
    let token: Arc<str> = token.into();
    router.layer(middleware::from_fn(move |req: Request, next: Next| {
        let token = token.clone();
        async move {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            if given.is_some_and(|t| constant_time_eq(t.as_bytes(), token.as_bytes())) {
                next.run(req).await
            } else {
                error(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong bearer token (see the admin token file)",
                )
            }
        }
    }))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The outermost layer: body size and read time, handler time. It runs
/// before the token check, so an oversized request is refused unread.
async fn bounded(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
    }
    let (parts, body) = req.into_parts();
    let body = match timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) if too_large(&e) => {
            return error(StatusCode::PAYLOAD_TOO_LARGE, "request body too large");
        }
        Ok(Err(_)) => return error(StatusCode::BAD_REQUEST, "incomplete body"),
        Err(_) => return error(StatusCode::REQUEST_TIMEOUT, "request timed out"),
    };
    let req = Request::from_parts(parts, Body::from(body));
    timeout(HANDLER_TIMEOUT, next.run(req))
        .await
        .unwrap_or_else(|_| error(StatusCode::SERVICE_UNAVAILABLE, "request took too long"))
}

fn too_large(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}

async fn not_found(req: Request) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no such endpoint {}", req.uri().path()),
    )
}

/// Binds `addr` for [`serve`], naming what failed.
pub async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("{what}: bind {addr}"))
}

/// Serves `router` on `listener` until `shutdown` resolves; then stops
/// accepting, gives requests in flight [`SHUTDOWN_GRACE`] and cancels the
/// rest. Malformed requests get a 4xx; nothing a client sends stops the server.
pub async fn serve(listener: TcpListener, router: Router, shutdown: impl Future<Output = ()>) {
    let router = router
        .fallback(not_found)
        .layer(middleware::from_fn(bounded));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = slots.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let (socket, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEAD_TIMEOUT)
            .max_buf_size(MAX_HEAD)
            .serve_connection(
                TokioIo::new(socket),
                TowerToHyperService::new(router.clone()),
            );
        let conn = graceful.watch(conn);
        connections.spawn(async move {
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
            drop(permit);
        });
        // Reap finished connections so the set stays small.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    if timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        debug!("HTTP requests still open after the grace period: cancelled");
    }
    connections.shutdown().await;
}

/// The token in `file`, created (random, mode 0600) when missing.
pub fn token(file: &Path) -> anyhow::Result<String> {
    if let Ok(t) = fs::read_to_string(file) {
        let t = t.trim().to_owned();
        anyhow::ensure!(
            !t.is_empty(),
            "admin token file {} is empty",
            file.display()
        );
        return Ok(t);
    }
    let mut bytes = [0u8; 24];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("read /dev/urandom")?;
    let t = bytes.iter().fold(String::with_capacity(48), |mut t, b| {
        use std::fmt::Write;
        let _ = write!(t, "{b:02x}");
        t
    });
    if let Some(dir) = file.parent() {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
        .and_then(|mut f| std::io::Write::write_all(&mut f, t.as_bytes()))
        .with_context(|| format!("write admin token {}", file.display()))?;
    fs::set_permissions(file, fs::Permissions::from_mode(0o600))?;
    Ok(t)
}
