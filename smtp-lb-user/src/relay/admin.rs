//! The relay's admin API (bearer token, loopback by default) and the routes
//! of its metrics listener; both served by [`crate::admin::http`].
//!
//! | method | path                   | answer                              |
//! |--------|------------------------|-------------------------------------|
//! | GET    | `/metrics`             | Prometheus text                     |
//! | GET    | `/queue`               | JSON: depth, oldest, per domain     |
//! | GET    | `/sources`             | JSON: egress sources, warmup        |
//! | GET    | `/queue/ID`            | JSON: one message                   |
//! | GET    | `/trace?client=IP:PORT`| JSON: messages that session sent    |
//! | GET    | `/trace?id=ID`         | JSON: one message, its client       |
//! | POST   | `/queue/retry`         | all scheduled jobs ready now        |
//! | POST   | `/queue/ID/retry`      | one message's jobs ready now        |
//! | POST   | `/queue/ID/bounce`     | bounce its pending recipients (DSN) |
//! | POST   | `/queue/ID/delete`     | drop it without a DSN               |
//! | POST   | `/reload`              | re-read the shaping file            |
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU8, Ordering},
    },
};

use axum::{
    Router,
    extract::{Path, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::json;

use super::{
    metrics::{EgressSample, Metrics},
    queue::Queue,
};
use crate::admin::{
    http::{blocking, error, json},
    monitor::{self, Probe},
    prom,
};

type Shared = Arc<Queue>;

/// The admin API's routes (the caller adds the token and serves them).
pub fn router(queue: Shared) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route(
            "/sources",
            get(|State(q): State<Shared>| async move { json(q.sources_view()) }),
        )
        .route("/reload", post(reload))
        .route("/queue", get(summary))
        .route(
            "/queue/retry",
            post(
                |State(q): State<Shared>| async move { json(json!({ "jobs": q.retry_now(None) })) },
            ),
        )
        .route("/queue/{id}", get(show))
        .route("/trace", get(trace))
        .route("/queue/{id}/{action}", post(act))
        .with_state(queue)
}

async fn metrics(State(q): State<Shared>) -> Response {
    match blocking(move || q.render_metrics()).await {
        Ok(page) => ([(header::CONTENT_TYPE, prom::CONTENT_TYPE)], page).into_response(),
        Err(e) => e,
    }
}

async fn reload(State(q): State<Shared>) -> Response {
    match blocking(move || q.reload_shaping()).await {
        Ok(Ok(())) => json(json!({ "reloaded": "shaping" })),
        Ok(Err(e)) => error(
            StatusCode::BAD_REQUEST,
            format!("reload refused, the running shaping stays: {e:#}"),
        ),
        Err(e) => e,
    }
}

async fn summary(State(q): State<Shared>) -> Response {
    let (depth, oldest) = q.depth();
    json(json!({
        "messages": depth,
        "oldest_secs": oldest,
        "domains": q.summary(),
    }))
}

/// Messages one `/trace` answer lists at most (a client that sent more in
/// one session gets the first ones and `"truncated": true`).
const TRACE_LIMIT: usize = 100;

/// `/trace?client=IP:PORT` (every kept message that SMTP session submitted)
/// or `/trace?id=ID` (one message): who sent it, each attempt's provider,
/// egress source and reply. From the delivery log's memory of recent
/// messages, so it answers for delivered messages too.
async fn trace(
    State(q): State<Shared>,
    Query(params): Query<BTreeMap<String, String>>,
) -> Response {
    let log = q.log();
    let (messages, truncated) = match (params.get("client"), params.get("id")) {
        (Some(c), None) => {
            let Ok(client) = c.parse::<SocketAddr>() else {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("`{c}` is not a client address and port, like 198.51.100.7:40312"),
                );
            };
            let mut m = log.by_client(client, TRACE_LIMIT + 1);
            let truncated = m.len() > TRACE_LIMIT;
            m.truncate(TRACE_LIMIT);
            (m, truncated)
        }
        (None, Some(i)) => {
            let i = match id(i) {
                Ok(i) => i,
                Err(e) => return *e,
            };
            (log.by_id(&format!("{i:016x}")).into_iter().collect(), false)
        }
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "give one of client=IP:PORT or id=ID".to_owned(),
            );
        }
    };
    json(json!({ "messages": messages, "truncated": truncated }))
}

/// A message id as `ctl relay queue` prints it (16 hex digits).
fn id(s: &str) -> Result<u64, Box<Response>> {
    u64::from_str_radix(s, 16).map_err(|_| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("`{s}` is not a message id (hex, as `ctl relay queue` prints it)"),
        ))
    })
}

fn no_message(id: u64) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no message {id:016x} in the queue"),
    )
}

async fn show(State(q): State<Shared>, Path(i): Path<String>) -> Response {
    let i = match id(&i) {
        Ok(i) => i,
        Err(e) => return *e,
    };
    match q.show(i) {
        Some(v) => json(serde_json::to_value(v).unwrap_or_default()),
        None => no_message(i),
    }
}

async fn act(State(q): State<Shared>, Path((i, action)): Path<(String, String)>) -> Response {
    let i = match id(&i) {
        Ok(i) => i,
        Err(e) => return *e,
    };
    if !matches!(action.as_str(), "retry" | "bounce" | "delete") {
        return error(
            StatusCode::NOT_FOUND,
            format!("no action `{action}`: retry, bounce or delete"),
        );
    }
    if q.show(i).is_none() {
        return no_message(i);
    }
    let jobs = match action.as_str() {
        "retry" => q.retry_now(Some(i)),
        "bounce" => q.bounce_now(i).await,
        _ => q.delete(i),
    };
    json(json!({ "jobs": jobs }))
}

/// The relay's readiness, as `/readyz` reports it.
#[derive(Debug, Default)]
pub struct Readiness(AtomicU8);

impl Readiness {
    const STARTING: u8 = 0;
    const READY: u8 = 1;
    const STOPPING: u8 = 2;

    /// The spool is open and every listener bound.
    pub fn ready(&self) {
        self.0.store(Self::READY, Ordering::Relaxed);
    }

    /// Shutdown began: listeners closed, open transactions finishing.
    pub fn stopping(&self) {
        self.0.store(Self::STOPPING, Ordering::Relaxed);
    }
}

/// The metrics listener's routes: `/metrics`, `/healthz`, `/readyz`.
/// It starts before the spool is open; `queue` is set once it is.
pub fn listener(
    metrics: Arc<Metrics>,
    queue: Arc<OnceLock<Shared>>,
    readiness: Arc<Readiness>,
) -> Router {
    monitor::router(Arc::new(Monitor {
        metrics,
        queue,
        readiness,
    }))
}

struct Monitor {
    metrics: Arc<Metrics>,
    queue: Arc<OnceLock<Shared>>,
    readiness: Arc<Readiness>,
}

impl Probe for Monitor {
    fn metrics(&self) -> String {
        match self.queue.get() {
            Some(q) => q.render_metrics(),
            None => self.metrics.render(0, 0, EgressSample::default()),
        }
    }

    fn ready(&self) -> Result<(), String> {
        match self.readiness.0.load(Ordering::Relaxed) {
            Readiness::READY => Ok(()),
            Readiness::STARTING => Err("starting: spool or listeners not ready yet".into()),
            _ => Err("shutting down".into()),
        }
    }
}
