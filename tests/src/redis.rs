//! A throwaway `redis-server` on a loopback port: no persistence, never
//! the system service, killed on drop (or earlier with [`RedisServer::kill`]).
use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use crate::tmp::{ChildGuard, free_port, wait_listening};

pub struct RedisServer {
    pub addr: SocketAddr,
    child: ChildGuard,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    /// On a given port (to bring a killed server back at the same address).
    pub fn start_on(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn redis-server (package redis-server)");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        wait_listening(addr, Duration::from_secs(5));
        Self {
            addr,
            child: ChildGuard(Some(child)),
        }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// `kill -9`: the relays see their connection reset.
    pub fn kill(&mut self) {
        self.child.kill();
    }
}
