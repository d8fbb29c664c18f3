//! The delivery log: one JSON object per line for every attempt and
//! recipient, written by a thread of its own so delivery never waits on it.
use std::{
    io::{BufWriter, Write},
    net::IpAddr,
    path::Path,
    sync::mpsc,
};

use serde::Serialize;
use tracing::warn;

/// One attempt for one recipient.
#[derive(Serialize)]
pub struct Attempt<'a> {
    pub id: &'a str,
    /// The queue (destination domain) the attempt came from.
    pub queue: &'a str,
    pub sender: &'a str,
    pub rcpt: &'a str,
    /// `delivered`, `deferred`, `bounced` or `expired`.
    pub status: &'a str,
    pub mx: Option<&'a str>,
    pub ip: Option<IpAddr>,
    pub source_ip: Option<IpAddr>,
    pub code: u16,
    pub enhanced: Option<String>,
    pub text: &'a str,
    pub duration_ms: u64,
    pub attempt: u32,
}

#[derive(Clone)]
pub struct DeliveryLog {
    tx: Option<mpsc::Sender<String>>,
}

impl DeliveryLog {
    /// A log appending to `path`, or one that drops everything.
    pub fn open(path: Option<&Path>) -> anyhow::Result<Self> {
        use anyhow::Context;
        let Some(path) = path else {
            return Ok(Self { tx: None });
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("open delivery log {}", path.display()))?;
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::Builder::new()
            .name("delivery-log".into())
            .spawn(move || {
                let mut w = BufWriter::new(file);
                while let Ok(line) = rx.recv() {
                    let _ = w.write_all(line.as_bytes());
                    while let Ok(line) = rx.try_recv() {
                        let _ = w.write_all(line.as_bytes());
                    }
                    if let Err(e) = w.flush() {
                        warn!(error = %e, "delivery log write failed");
                    }
                }
            })?;
        Ok(Self { tx: Some(tx) })
    }

    pub fn write(&self, a: &Attempt<'_>) {
        let Some(tx) = &self.tx else { return };
        let mut v = serde_json::to_value(a).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            o.insert("ts".into(), serde_json::json!(now.as_secs_f64()));
        }
        let _ = tx.send(v.to_string() + "\n");
    }
}
