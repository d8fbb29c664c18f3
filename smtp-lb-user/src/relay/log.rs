//! The delivery log: one JSON object per line for every attempt and
//! recipient, written by a thread of its own so delivery never waits on it.
use std::{
    fs::File,
    io::{BufWriter, Write},
    net::IpAddr,
    path::Path,
    sync::mpsc,
};

use anyhow::Context;
use serde::Serialize;
use tracing::{info, warn};

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

/// What the writer thread receives.
enum Entry {
    Line(String),
    /// Close the file and open the path again (logrotate renamed it).
    Reopen,
}

#[derive(Clone)]
pub struct DeliveryLog {
    tx: Option<mpsc::Sender<Entry>>,
}

impl DeliveryLog {
    /// A log appending to `path`, or one that drops everything.
    pub fn open(path: Option<&Path>) -> anyhow::Result<Self> {
        let Some(path) = path else {
            return Ok(Self { tx: None });
        };
        let path = path.to_owned();
        let mut w = BufWriter::new(append(&path)?);
        let (tx, rx) = mpsc::channel::<Entry>();
        std::thread::Builder::new()
            .name("delivery-log".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    // Drain what is queued, then flush once.
                    for entry in std::iter::once(first).chain(rx.try_iter()) {
                        match entry {
                            Entry::Line(line) => {
                                let _ = w.write_all(line.as_bytes());
                            }
                            Entry::Reopen => reopen(&mut w, &path),
                        }
                    }
                    if let Err(e) = w.flush() {
                        warn!(error = %e, "delivery log write failed");
                    }
                }
            })?;
        Ok(Self { tx: Some(tx) })
    }

    /// Lines written after this call go to a file opened anew at the
    /// configured path; those before it stay in the old one (SIGUSR1).
    pub fn reopen(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Entry::Reopen);
        }
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
        let _ = tx.send(Entry::Line(v.to_string() + "\n"));
    }
}

fn append(path: &Path) -> anyhow::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open delivery log {}", path.display()))
}

/// Flushes the old file and swaps in a new one; when the path cannot be
/// opened the old file stays, so no line is lost.
fn reopen(w: &mut BufWriter<File>, path: &Path) {
    if let Err(e) = w.flush() {
        warn!(error = %e, "delivery log write failed");
    }
    match append(path) {
        Ok(file) => {
            *w = BufWriter::new(file);
            info!(path = %path.display(), "delivery log reopened");
        }
        Err(e) => {
            warn!(error = %format!("{e:#}"), "delivery log not reopened; writing on to the old file");
        }
    }
}
