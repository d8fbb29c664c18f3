//! A raw SMTP client for tests: send exact bytes, read replies.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

/// Postfix `smtp-source`: `n` messages from `sender@src.test` to `rcpt`
/// over `sessions` parallel sessions; panics when it fails.
pub fn smtp_source(server: SocketAddr, rcpt: &str, n: usize, sessions: usize) {
    smtp_source_with(server, rcpt, n, sessions, &[]);
}

/// [`smtp_source`] with more of its options (`-l LENGTH` …).
pub fn smtp_source_with(server: SocketAddr, rcpt: &str, n: usize, sessions: usize, extra: &[&str]) {
    let out = std::process::Command::new("smtp-source")
        .args(["-s", &sessions.to_string(), "-m", &n.to_string()])
        .args(extra)
        .args(["-f", "sender@src.test", "-t", rcpt])
        .arg(server.to_string())
        .output()
        .expect("run smtp-source (package postfix)");
    assert!(
        out.status.success(),
        "smtp-source: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `swaks` with `args`: (success, stdout and stderr).
pub fn swaks(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("swaks")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run swaks");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

pub struct RawSmtp {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// One reply: its code and full text (all lines).
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub text: String,
}

impl RawSmtp {
    /// Connects and reads the greeting (asserted to be 220).
    pub fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut s = Self {
            stream,
            buf: Vec::new(),
        };
        let g = s.reply().expect("greeting");
        assert_eq!(g.code, 220, "greeting: {g:?}");
        s
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to relay");
    }

    /// Sends one command line (CRLF added) and returns its reply.
    pub fn cmd(&mut self, line: &str) -> Reply {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
            .unwrap_or_else(|| panic!("no reply to {line:?}"))
    }

    /// Reads one (multi-line) reply; `None` on EOF or timeout.
    pub fn reply(&mut self) -> Option<Reply> {
        let mut text = String::new();
        loop {
            while let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                let line = String::from_utf8_lossy(&line).trim_end().to_owned();
                text.push_str(&line);
                text.push('\n');
                if line.len() < 4 || line.as_bytes()[3] == b' ' {
                    let code = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
                    return Some(Reply { code, text });
                }
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// True once the server has closed the connection (EOF within the read timeout).
    pub fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    }

    /// EHLO, MAIL, RCPT, DATA, the given data (already dot-stuffed and
    /// terminated by the caller), returning the final reply.
    pub fn transaction(&mut self, from: &str, to: &[&str], data: &[u8]) -> Reply {
        let r = self.cmd(&format!("MAIL FROM:<{from}>"));
        assert_eq!(r.code, 250, "MAIL: {r:?}");
        for t in to {
            let r = self.cmd(&format!("RCPT TO:<{t}>"));
            assert_eq!(r.code, 250, "RCPT: {r:?}");
        }
        let r = self.cmd("DATA");
        assert_eq!(r.code, 354, "DATA: {r:?}");
        self.send(data);
        self.reply().expect("reply to end of data")
    }
}
