//! The balancer's metrics listener (`[metrics] listen`, no token):
//! `/metrics`, `/healthz`, `/readyz`, built in [`router`]. Read-only pages
//! (a dashboard, a JSON state endpoint) are merged into that one router.
use std::sync::{Arc, Mutex};

use axum::Router;

use super::Node;
use crate::{
    admin::monitor::{self, Probe},
    dataplane::Dataplane,
    health::Health,
};

/// Every route of the metrics listener.
pub fn router<D: Dataplane + Send + 'static>(node: &Arc<Mutex<Node<D>>>) -> Router {
    monitor::router(Arc::new(Monitor(node.clone()))).merge(super::dashboard::router(node.clone()))
}

struct Monitor<D>(Arc<Mutex<Node<D>>>);

impl<D> Monitor<D> {
    fn node(&self) -> std::sync::MutexGuard<'_, Node<D>> {
        super::lock(&self.0)
    }
}

impl<D: Dataplane + Send + 'static> Probe for Monitor<D> {
    fn metrics(&self) -> String {
        let node = self.node();
        node.metrics.render(&node)
    }

    /// Attached (the listener starts after attach) and at least one relay up
    /// on some port: with none, every new SYN to a VIP is dropped.
    fn ready(&self) -> Result<(), String> {
        let node = self.node();
        if node
            .relays
            .values()
            .flat_map(|r| r.trackers.values())
            .any(|t| t.health() == Health::Up)
        {
            Ok(())
        } else {
            Err("no relay is up".into())
        }
    }
}
