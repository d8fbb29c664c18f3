//! The one HTTP client for the admin APIs (`smtp-lb ctl`, the test harness):
//! blocking (ureq), plain HTTP, bounded in time and answer size, path
//! segments and query values escaped.
use std::{fmt::Write as _, net::SocketAddr, path::Path, time::Duration};

use anyhow::Context;

/// Time for a whole request: connect, send, the daemon's work, the answer.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer read (a metrics page of a relay with many pairs).
const MAX_ANSWER: u64 = 64 * 1024 * 1024;

/// A client of one daemon's admin API.
#[derive(Clone, Debug)]
pub struct Client {
    agent: ureq::Agent,
    addr: SocketAddr,
    token: Option<String>,
    max_answer: u64,
}

/// An answer: status and body.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as JSON, or as a JSON string when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|_| serde_json::Value::String(self.body.clone()))
    }

    /// The `error` of a JSON error answer, else the body.
    pub fn message(&self) -> String {
        let v = self.json();
        v.get("error")
            .and_then(serde_json::Value::as_str)
            .map_or_else(|| self.body.trim().to_owned(), str::to_owned)
    }
}

impl Client {
    /// A client sending `token` (if any) as a bearer token.
    pub fn new(addr: SocketAddr, token: Option<String>) -> Self {
        Self {
            agent: agent(TIMEOUT),
            addr,
            token,
            max_answer: MAX_ANSWER,
        }
    }

    /// The same client with tighter bounds: for a peer polled often (the
    /// dashboard reading relays' metrics), which must not hold it up.
    #[must_use]
    pub fn with_limits(self, timeout: Duration, max_answer: u64) -> Self {
        Self {
            agent: agent(timeout),
            max_answer,
            ..self
        }
    }

    /// A client with the token read from `file`.
    pub fn with_token_file(addr: SocketAddr, file: &Path) -> anyhow::Result<Self> {
        let token = std::fs::read_to_string(file).with_context(|| {
            format!(
                "read the admin token {} (pass --token-file)",
                file.display()
            )
        })?;
        Ok(Self::new(addr, Some(token.trim().to_owned())))
    }

    /// `GET` the path made of `segments` (each escaped), with `query`.
    pub fn get(&self, segments: &[&str], query: &[(&str, &str)]) -> anyhow::Result<Answer> {
        self.call("GET", segments, query)
    }

    /// `POST` (no body) to the path made of `segments`, with `query`.
    pub fn post(&self, segments: &[&str], query: &[(&str, &str)]) -> anyhow::Result<Answer> {
        self.call("POST", segments, query)
    }

    fn call(
        &self,
        method: &str,
        segments: &[&str],
        query: &[(&str, &str)],
    ) -> anyhow::Result<Answer> {
        let mut target = path(segments);
        for (i, (k, v)) in query.iter().enumerate() {
            let _ = write!(
                target,
                "{}{}={}",
                if i == 0 { '?' } else { '&' },
                escape(k),
                escape(v)
            );
        }
        self.raw(method, &target, None)
    }

    /// Sends `method target` as given (already escaped) with an optional body.
    pub fn raw(&self, method: &str, target: &str, body: Option<&[u8]>) -> anyhow::Result<Answer> {
        let uri = format!("http://{}{target}", self.addr);
        let mut req = ureq::http::Request::builder().method(method).uri(&uri);
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req
            .body(body.unwrap_or_default().to_vec())
            .with_context(|| format!("bad request {method} {target}"))?;
        let mut resp = self
            .agent
            .run(req)
            .with_context(|| format!("{method} {uri}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(self.max_answer)
            .read_to_string()
            .with_context(|| format!("read the answer to {method} {uri}"))?;
        Ok(Answer { status, body })
    }
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .new_agent()
}

/// `/a/b/c` from segments, each percent-escaped (a `/` in a name stays in its segment).
pub fn path(segments: &[&str]) -> String {
    let mut out = String::new();
    for s in segments {
        out.push('/');
        out.push_str(&escape(s));
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// Percent-escapes everything but RFC 3986 unreserved characters.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(
            path(&["backends", "relay1", "drain"]),
            "/backends/relay1/drain"
        );
        assert_eq!(
            path(&["backends", "a/b c?", "drain"]),
            "/backends/a%2Fb%20c%3F/drain"
        );
        assert_eq!(
            path(&["backends", "2001:db8::1"]),
            "/backends/2001%3Adb8%3A%3A1"
        );
        assert_eq!(path(&[]), "/");
    }
}
