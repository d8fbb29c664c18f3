//! The relay (delivery engine): SMTP in, durable spool, routing, delivery,
//! retries and bounces.
//!
//! # Layout
//! Layers, each importing only from those below it (checked by the
//! `layers` test; the SMTP wire is [`crate::smtp`], shared with the balancer):
//! - [`ingress`]: listeners and SMTP server sessions; [`admin`]: the admin API.
//! - [`queue`]: live messages, ready and scheduled queues, the delivery
//!   loop behind a `Dispatcher`, the pure attempt outcome, operator control.
//! - [`metrics`]: the relay's counters; [`config`]: the TOML configuration.
//! - [`egress`]: source IPs, pools (weighted round robin), warmup caps.
//! - [`route`]: static routes and MX resolution.
//! - [`policy`]: throttles, limiters (local or through Redis), providers,
//!   reply rules, shaping.
//! - [`fdlimit`]: the open-file limit, raised and checked at start.
//! - leaves: [`spool`] (the durable log with group commit and recovery),
//!   [`dsn`] (RFC 3464 bounces, pure), [`dkim`] (signing at ingress),
//!   [`log`] (the JSON-lines delivery log).
//!
//! Message flow: ingress → `spool.store` (durable) → `250` → `queue.submit`
//! → ready queue per (source, provider) → worker → `Dispatcher` (SMTP) →
//! done record in the spool, or scheduled retry, or DSN.
pub mod admin;
pub mod config;
pub mod dkim;
pub mod dsn;
pub mod egress;
pub mod fdlimit;
pub mod ingress;
#[cfg(test)]
mod layers;
pub mod log;
pub mod metrics;
pub mod policy;
pub mod queue;
pub mod route;
pub mod spool;

use std::{future::Future, sync::Arc, sync::atomic::Ordering};

use anyhow::Context;
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
};
use tracing::{info, warn};

pub use config::Config;
use policy::{cluster::Cluster, limiter::Limiters, shaping::Shaper};

use crate::admin::http;

/// Runs the relay until `shutdown` resolves, then stops accepting, lets
/// sessions finish their transaction (up to `timeouts.shutdown_grace`) and returns.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    fdlimit::raise(cfg.limits.max_connections)?;
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
    let (spool, recovered, corrupt) =
        spool::Spool::open(&cfg.spool_dir, cfg.spool.compact_interval)?;
    for c in &corrupt {
        warn!(segment = %c.segment.display(), moved_to = %c.moved_to.display(), bad_bytes = c.bad_bytes, "corrupt spool data reported");
    }
    metrics
        .spool_corrupt
        .store(corrupt.len() as u64, Ordering::Relaxed);
    let myself = route::Myself::new(
        cfg.listeners.iter().map(|l| l.address),
        &cfg.delivery.own_addresses,
    );
    let router = route::Router::new(&cfg.routes, &cfg.dns, cfg.delivery.port, myself)?;
    let log = log::DeliveryLog::open(cfg.delivery_log.as_deref())?;
    tokio::spawn(reopen_on_sigusr1(log.clone()));
    let limiters = match &cfg.cluster {
        Some(c) => Limiters::shared(Cluster::start(c, metrics.cluster.clone()).await?),
        None => Limiters::local(),
    };
    let shaper = Shaper::load(cfg.shaping.as_deref(), &limiters)?;
    let egress = egress_for(&cfg, &shaper)?;
    let queue = queue::Queue::new(
        &cfg,
        spool,
        router,
        log,
        metrics.clone(),
        shaper,
        egress,
        Box::new(queue::SmtpDispatcher::new(&cfg.delivery, {
            let metrics = metrics.clone();
            Box::new(move || metrics.tls_fallback())
        })),
    );
    let n = recovered.len();
    for r in recovered {
        queue.submit(
            queue::QueuedMessage::new(r.id, r.sender, r.rcpts, r.received_ms, r.size, r.done)
                .resume(r.retry),
        );
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
        info!(address = %l.address, submission = l.submission, tls = ?l.tls, "SMTP listener ready");
        tokio::spawn(ingress::serve(
            listener,
            l.submission,
            l.tls,
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
    queue.spool().flush().await;
    queue.log().flush().await;
    Ok(())
}

/// The egress sources and pools `cfg` describes, checked against the
/// shaping file's per-source overrides (at start and by `check-config`).
pub fn egress_for(cfg: &Config, shaper: &Shaper) -> anyhow::Result<egress::Egress> {
    let egress = egress::Egress::from_config(
        cfg.egress.as_ref(),
        cfg.default_helo(),
        cfg.delivery.source_ip,
        shaper.providers(),
    )?;
    egress.check_override_keys(shaper.override_keys())?;
    Ok(egress)
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
