//! A deliberately small HTTP/1.1 server and client for the admin API: one
//! request per connection, bounded head and body, a timeout per request.
//! Enough for `ctl` and Prometheus; nothing else talks to it.
use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};
use tracing::debug;

/// Largest request head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;
/// Time a client gets to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A parsed request.
#[derive(Debug, Default)]
pub struct Request {
    pub method: String,
    /// The path without the query string.
    pub path: String,
    pub query: BTreeMap<String, String>,
    /// Header names lower-cased.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Request {
    /// True when the request carries `Authorization: Bearer <token>`.
    pub fn authorized(&self, token: &str) -> bool {
        self.headers
            .get("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| constant_time_eq(t.trim().as_bytes(), token.as_bytes()))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn json(status: u16, value: &serde_json::Value) -> Self {
        Self {
            status,
            content_type: "application/json",
            body: value.to_string() + "\n",
        }
    }

    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    /// A JSON error `{"error": message}`.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Self::json(status, &serde_json::json!({ "error": message.into() }))
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        _ => "Error",
    }
}

/// Why a request could not be parsed; answered with the status given.
#[derive(Debug)]
struct BadRequest(u16, &'static str);

async fn read_request(socket: &mut TcpStream) -> Result<Request, BadRequest> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err(BadRequest(413, "request head too large"));
        }
        let n = socket
            .read(&mut chunk)
            .await
            .map_err(|_| BadRequest(400, "read failed"))?;
        if n == 0 {
            return Err(BadRequest(400, "incomplete request"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| BadRequest(400, "request head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let (Some(method), Some(target), Some(version)) = (first.next(), first.next(), first.next())
    else {
        return Err(BadRequest(400, "malformed request line"));
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Err(BadRequest(400, "malformed request line"));
    }
    let mut req = Request {
        method: method.to_owned(),
        ..Request::default()
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    req.path = path.to_owned();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        req.query.insert(k.to_owned(), v.to_owned());
    }
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or(BadRequest(400, "malformed header"))?;
        req.headers
            .insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    let len: usize = match req.headers.get("content-length") {
        Some(v) => v
            .parse()
            .map_err(|_| BadRequest(400, "bad Content-Length"))?,
        None => 0,
    };
    if len > MAX_BODY {
        return Err(BadRequest(413, "request body too large"));
    }
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = socket
            .read(&mut chunk)
            .await
            .map_err(|_| BadRequest(400, "read failed"))?;
        if n == 0 {
            return Err(BadRequest(400, "incomplete body"));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    req.body = body;
    Ok(req)
}

async fn write_response(socket: &mut TcpStream, resp: &Response) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        resp.status,
        reason(resp.status),
        resp.content_type,
        resp.body.len()
    );
    socket.write_all(head.as_bytes()).await?;
    socket.write_all(resp.body.as_bytes()).await?;
    socket.shutdown().await
}

/// The function that answers a request.
pub type Handler = Arc<dyn Fn(Request) -> Response + Send + Sync>;

/// Serves `listener` until the task is dropped. Malformed requests get a
/// 4xx answer; nothing a client sends can stop the server.
pub async fn serve(listener: TcpListener, handler: Handler) {
    loop {
        let Ok((mut socket, peer)) = listener.accept().await else {
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let resp = match timeout(REQUEST_TIMEOUT, read_request(&mut socket)).await {
                Ok(Ok(req)) => {
                    // The handler may do blocking work (map reads, a reload).
                    match tokio::task::spawn_blocking(move || handler(req)).await {
                        Ok(resp) => resp,
                        Err(_) => Response::error(500, "internal error"),
                    }
                }
                Ok(Err(BadRequest(status, why))) => Response::error(status, why),
                Err(_) => Response::error(408, "request timed out"),
            };
            if let Err(e) = write_response(&mut socket, &resp).await {
                debug!(%peer, error = %e, "admin response not sent");
            }
        });
    }
}

/// Sends one request and returns the status and body.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut socket = timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect to {addr} timed out"),
            )
        })??;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or_default();
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    socket.write_all(head.as_bytes()).await?;
    socket.write_all(body.as_bytes()).await?;
    let mut raw = Vec::new();
    timeout(Duration::from_secs(30), socket.read_to_end(&mut raw))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 30s"))??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("malformed answer from {addr}")))?;
    Ok((status, body.to_owned()))
}
