//! The relay (delivery engine): SMTP in, durable spool, routing, delivery,
//! retries and bounces.
//!
//! # Layout
//! - [`config`]: the TOML configuration.
//! - [`proto`]: SMTP command and reply grammar (pure, property-tested).
//! - [`ingress`]: listeners and SMTP server sessions.
//! - [`spool`]: the durable log of messages with group commit and recovery.
//! - [`queue`]: live messages, scheduled and ready queues, delivery workers.
//! - [`route`]: static routes and MX resolution.
//! - [`provider`], [`shaping`]: MX hosts → providers, per-provider limits (issue 6).
//! - [`limiter`], [`cluster`]: rate and connection limiters, local or shared through Redis.
//! - [`egress`]: source IPs, pools (weighted round robin), warmup caps.
//! - [`dkim`]: DKIM signing at ingress; [`identity`]: `relay check-identity`.
//! - [`client`]: the SMTP client that delivers.
//! - [`dsn`]: RFC 3464 bounces.
//! - [`log`]: the JSON-lines delivery log.
//! - [`metrics`], [`admin`]: counters and the admin HTTP listener.
//!
//! Message flow: ingress → `spool.store` (durable) → `250` → `queue.submit`
//! → ready queue per destination → worker → `client.send` → done record in
//! the spool, or scheduled retry, or DSN.
pub mod admin;
pub mod client;
pub mod cluster;
pub mod config;
pub mod dkim;
pub mod dsn;
pub mod egress;
pub mod identity;
pub mod ingress;
pub mod limiter;
pub mod log;
pub mod metrics;
pub mod proto;
pub mod provider;
pub mod queue;
pub mod route;
pub mod rules;
pub mod shaping;
pub mod spool;
pub mod stream;

use std::{future::Future, sync::Arc, sync::atomic::Ordering};

use anyhow::Context;
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
};
use tracing::{info, warn};

pub use config::Config;

use crate::admin::http;

/// Runs the relay until `shutdown` resolves, then stops accepting, lets
/// sessions finish their transaction (up to `timeouts.shutdown_grace`) and returns.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let metrics = Arc::new(metrics::Metrics::default());
    let (stop_http, http_stopped) = watch::channel(false);
    let until_stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut servers = Vec::new();
    // The metrics listener answers /healthz while the spool is recovered.
    let readiness = Arc::new(admin::Readiness::default());
    let serving = Arc::new(std::sync::OnceLock::new());
    if let Some(addr) = cfg.metrics {
        let listener = http::bind(addr, "metrics listener").await?;
        info!(address = %addr, "metrics listener ready: /metrics /healthz /readyz");
        servers.push(tokio::spawn(http::serve(
            listener,
            admin::listener(metrics.clone(), serving.clone(), readiness.clone()),
            until_stopped(http_stopped.clone()),
        )));
    }
    let (spool, recovered, corrupt) = spool::Spool::open(&cfg.spool_dir)?;
    for c in &corrupt {
        warn!(segment = %c.segment.display(), moved_to = %c.moved_to.display(), bad_bytes = c.bad_bytes, "corrupt spool data reported");
    }
    metrics
        .spool_corrupt
        .store(corrupt.len() as u64, Ordering::Relaxed);
    let router = route::Router::new(&cfg.routes, &cfg.dns, cfg.delivery.port)?;
    let log = log::DeliveryLog::open(cfg.delivery_log.as_deref())?;
    tokio::spawn(reopen_on_sigusr1(log.clone()));
    let limiters = match &cfg.cluster {
        Some(c) => limiter::Limiters::shared(cluster::Cluster::start(c, metrics.clone()).await?),
        None => limiter::Limiters::local(),
    };
    let shaper = shaping::Shaper::load(cfg.shaping.as_deref(), &limiters)?;
    let egress = egress::Egress::from_config(&cfg, shaper.providers())?;
    egress.check_override_keys(shaper.override_keys())?;
    let queue = queue::Queue::new(&cfg, spool, router, log, metrics.clone(), shaper, egress);
    let n = recovered.len();
    for r in recovered {
        queue.submit(queue::QueuedMessage::new(
            r.id,
            r.sender,
            r.rcpts,
            r.received_ms,
            r.location,
            r.done,
        ));
    }
    if n > 0 {
        info!(messages = n, "recovered messages queued again");
    }
    tokio::spawn(queue.clone().run_scheduler());
    tokio::spawn(reload_on_sighup(queue.clone()));

    let shared = Arc::new(ingress::Shared::new(&cfg, queue.clone(), metrics)?);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    for l in &cfg.listeners {
        let listener = TcpListener::bind(l.address)
            .await
            .with_context(|| format!("bind SMTP listener {}", l.address))?;
        info!(address = %l.address, submission = l.submission, "SMTP listener ready");
        tokio::spawn(ingress::serve(
            listener,
            l.submission,
            shared.clone(),
            shutdown_rx.clone(),
            done_tx.clone(),
        ));
    }
    if let Some(addr) = cfg.admin {
        let token = http::token(&cfg.admin_token_file())?;
        let listener = http::bind(addr, "admin API").await?;
        info!(address = %addr, "admin API ready");
        servers.push(tokio::spawn(http::serve(
            listener,
            http::require_token(admin::router(queue.clone()), token),
            until_stopped(http_stopped),
        )));
    }
    let _ = serving.set(queue.clone());
    readiness.ready();
    crate::systemd::ready();

    shutdown.await;
    readiness.stopping();
    crate::systemd::stopping();
    info!("shutting down: no new connections; open transactions may finish");
    let _ = shutdown_tx.send(true);
    drop(done_tx);
    queue.stop();
    // Every session holds a sender; `recv` yields `None` once all are gone.
    if tokio::time::timeout(cfg.timeouts.shutdown_grace, done_rx.recv())
        .await
        .is_err()
    {
        warn!("shutdown grace period over; closing remaining sessions");
    }
    let _ = stop_http.send(true);
    for server in servers {
        let _ = server.await;
    }
    Ok(())
}

/// SIGUSR1 reopens the delivery log (after logrotate renamed it).
async fn reopen_on_sigusr1(log: log::DeliveryLog) {
    let Ok(mut usr1) =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
    else {
        warn!("cannot listen for SIGUSR1: the delivery log is not reopened on rotation");
        return;
    };
    while usr1.recv().await.is_some() {
        log.reopen();
    }
}

/// SIGHUP reloads the shaping file; a bad one is logged and the running one stays.
async fn reload_on_sighup(queue: Arc<queue::Queue>) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        warn!("cannot listen for SIGHUP: shaping reload only through the admin API");
        return;
    };
    while hup.recv().await.is_some() {
        if let Err(e) = queue.reload_shaping() {
            warn!(
                error = format!("{e:#}"),
                "shaping reload refused; the running shaping stays"
            );
        }
    }
}
