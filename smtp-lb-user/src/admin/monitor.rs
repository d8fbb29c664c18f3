//! The metrics listener's routes, shared by both daemons: `/metrics`,
//! `/healthz` (the process and its runtime answer) and `/readyz` (the daemon
//! says whether it can do its job). No token: nothing here changes state.
//! Each daemon builds its listener's [`Router`] from [`router`] in one
//! place and may merge read-only routes of its own into it.
use std::sync::Arc;

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

use super::{http::blocking, prom};

/// What a daemon tells its metrics listener. Both may block (map reads,
/// locks shared with the control loop); they run off the runtime threads.
pub trait Probe: Send + Sync + 'static {
    /// The Prometheus page.
    fn metrics(&self) -> String;
    /// `Ok` when ready to serve, else why not.
    fn ready(&self) -> Result<(), String>;
}

/// `/metrics`, `/healthz`, `/readyz` answered from `probe`.
pub fn router(probe: Arc<dyn Probe>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(probe)
}

async fn metrics(State(probe): State<Arc<dyn Probe>>) -> Response {
    match blocking(move || probe.metrics()).await {
        Ok(page) => ([(header::CONTENT_TYPE, prom::CONTENT_TYPE)], page).into_response(),
        Err(e) => e,
    }
}

async fn ready(State(probe): State<Arc<dyn Probe>>) -> Response {
    match blocking(move || probe.ready()).await {
        Ok(Ok(())) => "ready\n".into_response(),
        Ok(Err(why)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
        Err(e) => e,
    }
}
