//! The delivery log: one JSON object per line for every attempt and
//! recipient, written by a thread of its own so delivery never waits on it
//! (in batches: a line reaches the file within about 50 ms).
//! It also keeps the recent messages in memory, each with the client
//! address and port of the SMTP session that submitted it and its
//! attempts, so one client connection can be followed to its replies
//! (`/trace`, `smtp-lb ctl trace`) without reading the file back.
use std::{
    collections::{HashMap, VecDeque},
    fs::File,
    io::{BufWriter, Write},
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex, mpsc},
    time::Duration,
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
    /// The provider its MX hosts roll up to, once routed.
    pub provider: Option<&'a str>,
    /// The egress source's name, once routed.
    pub source: Option<&'a str>,
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
    /// Answered once every line sent before it is written.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// How long the writer thread lets lines gather after the first one: one
/// wake-up per line would cost more than writing it.
const GATHER: Duration = Duration::from_millis(50);

#[derive(Clone)]
pub struct DeliveryLog {
    tx: Option<mpsc::Sender<Entry>>,
    recent: Arc<Mutex<Recent>>,
}

/// Messages [`DeliveryLog`] keeps in memory, the oldest forgotten first:
/// 10,000 messages of at most [`ATTEMPTS_KEPT`] lines is a few MiB.
pub const MESSAGES_KEPT: usize = 10_000;
/// Attempt lines (recipient × attempt) kept per message; later ones are
/// counted in [`Traced::more_attempts`].
pub const ATTEMPTS_KEPT: usize = 32;

/// A message as `/trace` shows it: who submitted it, and what became of it.
#[derive(Clone, Debug, Serialize)]
pub struct Traced {
    pub id: String,
    /// The SMTP client's address and port (DSR: the client's own).
    pub client: SocketAddr,
    /// Unix seconds the message was accepted.
    pub received: f64,
    pub attempts: Vec<TracedAttempt>,
    /// Attempt lines past [`ATTEMPTS_KEPT`], not kept.
    pub more_attempts: u32,
}

/// One [`Attempt`] of a [`Traced`] message.
#[derive(Clone, Debug, Serialize)]
pub struct TracedAttempt {
    pub rcpt: String,
    pub status: String,
    pub queue: String,
    pub provider: Option<String>,
    pub source: Option<String>,
    pub source_ip: Option<IpAddr>,
    pub mx: Option<String>,
    pub ip: Option<IpAddr>,
    pub code: u16,
    pub enhanced: Option<String>,
    pub text: String,
    pub attempt: u32,
    pub ts: f64,
}

#[derive(Default)]
struct Recent {
    by_id: HashMap<String, Traced>,
    order: VecDeque<String>,
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl DeliveryLog {
    /// A log appending to `path`, or one that drops everything.
    pub fn open(path: Option<&Path>) -> anyhow::Result<Self> {
        let recent = Arc::default();
        let Some(path) = path else {
            return Ok(Self { tx: None, recent });
        };
        let path = path.to_owned();
        let mut w = BufWriter::new(append(&path)?);
        let (tx, rx) = mpsc::channel::<Entry>();
        std::thread::Builder::new()
            .name("delivery-log".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    // Let more come, take what is queued, then flush once.
                    std::thread::sleep(GATHER);
                    let mut flushed = Vec::new();
                    for entry in std::iter::once(first).chain(rx.try_iter()) {
                        match entry {
                            Entry::Line(line) => {
                                let _ = w.write_all(line.as_bytes());
                            }
                            Entry::Reopen => reopen(&mut w, &path),
                            Entry::Flush(done) => flushed.push(done),
                        }
                    }
                    if let Err(e) = w.flush() {
                        warn!(error = %e, "delivery log write failed");
                    }
                    for done in flushed {
                        let _ = done.send(());
                    }
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            recent,
        })
    }

    /// Message `id` was accepted from the SMTP client at `client`.
    pub fn received(&self, id: &str, client: SocketAddr) {
        let mut r = self.recent.lock().expect("trace lock");
        if r.order.len() >= MESSAGES_KEPT
            && let Some(old) = r.order.pop_front()
        {
            r.by_id.remove(&old);
        }
        r.order.push_back(id.to_owned());
        r.by_id.insert(
            id.to_owned(),
            Traced {
                id: id.to_owned(),
                client,
                received: now_secs(),
                attempts: Vec::new(),
                more_attempts: 0,
            },
        );
    }

    /// The kept messages the client at `client` submitted, oldest first, at most `limit`.
    pub fn by_client(&self, client: SocketAddr, limit: usize) -> Vec<Traced> {
        let r = self.recent.lock().expect("trace lock");
        r.order
            .iter()
            .filter_map(|id| r.by_id.get(id))
            .filter(|t| t.client == client)
            .take(limit)
            .cloned()
            .collect()
    }

    /// Message `id`, if it is still kept.
    pub fn by_id(&self, id: &str) -> Option<Traced> {
        self.recent
            .lock()
            .expect("trace lock")
            .by_id
            .get(id)
            .cloned()
    }

    /// Returns once every line logged before it is in the file (at shutdown).
    pub async fn flush(&self) {
        let Some(tx) = &self.tx else { return };
        let (done, rx) = tokio::sync::oneshot::channel();
        if tx.send(Entry::Flush(done)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Lines written after this call go to a file opened anew at the
    /// configured path; those before it stay in the old one (SIGUSR1).
    pub fn reopen(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Entry::Reopen);
        }
    }

    pub fn write(&self, a: &Attempt<'_>) {
        let ts = now_secs();
        self.trace(a, ts);
        let Some(tx) = &self.tx else { return };
        let mut v = serde_json::to_value(a).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("ts".into(), serde_json::json!(ts));
        }
        let _ = tx.send(Entry::Line(v.to_string() + "\n"));
    }

    /// Adds `a` to its message's trace, if the message is kept.
    fn trace(&self, a: &Attempt<'_>, ts: f64) {
        let mut r = self.recent.lock().expect("trace lock");
        let Some(t) = r.by_id.get_mut(a.id) else {
            return;
        };
        if t.attempts.len() >= ATTEMPTS_KEPT {
            t.more_attempts += 1;
            return;
        }
        t.attempts.push(TracedAttempt {
            rcpt: a.rcpt.to_owned(),
            status: a.status.to_owned(),
            queue: a.queue.to_owned(),
            provider: a.provider.map(str::to_owned),
            source: a.source.map(str::to_owned),
            source_ip: a.source_ip,
            mx: a.mx.map(str::to_owned),
            ip: a.ip,
            code: a.code,
            enhanced: a.enhanced.clone(),
            text: a.text.to_owned(),
            attempt: a.attempt,
            ts,
        });
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

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt<'a>(id: &'a str, rcpt: &'a str) -> Attempt<'a> {
        Attempt {
            id,
            queue: "isp.example",
            provider: Some("default"),
            source: Some("out-a"),
            sender: "app@lab.example",
            rcpt,
            status: "delivered",
            mx: Some("mx.isp.example"),
            ip: None,
            source_ip: Some("192.0.2.5".parse().unwrap()),
            code: 250,
            enhanced: Some("2.0.0".into()),
            text: "Ok",
            duration_ms: 1,
            attempt: 1,
        }
    }

    #[test]
    fn traces_are_kept_per_session_and_bounded() {
        let log = DeliveryLog::open(None).unwrap();
        let a: SocketAddr = "198.51.100.1:40000".parse().unwrap();
        let b: SocketAddr = "198.51.100.1:40001".parse().unwrap();
        log.received("01", a);
        log.received("02", b);
        log.received("03", a);
        log.write(&attempt("01", "x@isp.example"));
        log.write(&attempt("99", "unknown message, not kept"));
        let ids: Vec<String> = log.by_client(a, 10).into_iter().map(|t| t.id).collect();
        assert_eq!(ids, ["01", "03"], "the port tells sessions apart");
        assert_eq!(log.by_client(a, 1).len(), 1, "the answer is bounded");
        let t = log.by_id("01").unwrap();
        assert_eq!(t.attempts.len(), 1);
        assert_eq!(t.attempts[0].provider.as_deref(), Some("default"));
        assert_eq!(t.attempts[0].source.as_deref(), Some("out-a"));

        for _ in 0..ATTEMPTS_KEPT + 3 {
            log.write(&attempt("02", "y@isp.example"));
        }
        let t = log.by_id("02").unwrap();
        assert_eq!((t.attempts.len(), t.more_attempts), (ATTEMPTS_KEPT, 3));

        for i in 0..MESSAGES_KEPT {
            log.received(&format!("m{i}"), b);
        }
        assert!(log.by_id("01").is_none(), "the oldest is forgotten first");
        assert!(log.by_id(&format!("m{}", MESSAGES_KEPT - 1)).is_some());
    }
}
