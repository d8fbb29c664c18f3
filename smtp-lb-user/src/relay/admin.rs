//! The admin listener: a minimal HTTP/1.1 server (one request per
//! connection) for `/metrics` and the queue API that `smtp-lb ctl relay` uses.
//!
//! | method | path                   | answer                              |
//! |--------|------------------------|-------------------------------------|
//! | GET    | `/metrics`             | Prometheus text                     |
//! | GET    | `/queue`               | JSON: depth, oldest, per domain     |
//! | GET    | `/sources`             | JSON: egress sources, warmup        |
//! | GET    | `/queue/ID`            | JSON: one message                   |
//! | POST   | `/queue/retry`         | all scheduled jobs ready now        |
//! | POST   | `/queue/ID/retry`      | one message's jobs ready now        |
//! | POST   | `/queue/ID/bounce`     | bounce its pending recipients (DSN) |
//! | POST   | `/queue/ID/delete`     | drop it without a DSN               |
use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};
use tracing::debug;

use super::queue::Queue;

pub async fn serve(listener: TcpListener, queue: Arc<Queue>) {
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            continue;
        };
        let queue = queue.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(socket, &queue).await {
                debug!(error = %e, "admin request failed");
            }
        });
    }
}

async fn handle(mut socket: TcpStream, queue: &Arc<Queue>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        let n = timeout(Duration::from_secs(5), socket.read(&mut chunk))
            .await
            .map_err(std::io::Error::other)??;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut words = head.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, ctype, body) = route(method, path, queue).await;
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(resp.as_bytes()).await?;
    socket.shutdown().await
}

fn json(v: &serde_json::Value) -> (&'static str, &'static str, String) {
    ("200 OK", "application/json", v.to_string())
}

fn not_found() -> (&'static str, &'static str, String) {
    (
        "404 Not Found",
        "application/json",
        r#"{"error":"not found"}"#.to_owned(),
    )
}

async fn route(
    method: &str,
    path: &str,
    queue: &Arc<Queue>,
) -> (&'static str, &'static str, String) {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let id = |s: &str| u64::from_str_radix(s, 16).ok();
    match (method, parts.as_slice()) {
        ("GET", ["metrics"]) => (
            "200 OK",
            "text/plain; version=0.0.4",
            queue.render_metrics(),
        ),
        ("GET", ["sources"]) => json(&queue.sources_view()),
        ("POST", ["reload"]) => match queue.reload_shaping() {
            Ok(()) => json(&serde_json::json!({ "reloaded": "shaping" })),
            Err(e) => (
                "400 Bad Request",
                "text/plain",
                format!("reload refused, the running shaping stays: {e:#}\n"),
            ),
        },
        ("GET", ["queue"]) => {
            let (depth, oldest) = queue.depth();
            json(&serde_json::json!({
                "messages": depth,
                "oldest_secs": oldest,
                "domains": queue.summary(),
            }))
        }
        ("POST", ["queue", "retry"]) => json(&serde_json::json!({ "jobs": queue.retry_now(None) })),
        ("GET", ["queue", i]) => match id(i).and_then(|i| queue.show(i)) {
            Some(v) => json(&serde_json::to_value(v).unwrap_or_default()),
            None => not_found(),
        },
        ("POST", ["queue", i, action]) => {
            let Some(i) = id(i) else { return not_found() };
            if queue.show(i).is_none() {
                return not_found();
            }
            let n = match *action {
                "retry" => queue.retry_now(Some(i)),
                "bounce" => queue.bounce_now(i).await,
                "delete" => queue.delete(i),
                _ => return not_found(),
            };
            json(&serde_json::json!({ "jobs": n }))
        }
        _ => not_found(),
    }
}
