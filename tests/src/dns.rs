//! dnsmasq as the authoritative-enough DNS server for relay tests: MX and
//! A records on a loopback port of our choosing, no upstream, no hosts file.
use std::{net::SocketAddr, process::Command, time::Duration};

use crate::tmp::{ChildGuard, free_udp_port};

pub struct Dnsmasq {
    pub addr: SocketAddr,
    _child: ChildGuard,
}

impl Dnsmasq {
    /// Answers A queries for each of `hosts` (MX host names such as
    /// `mx.google.com`) with 127.0.0.1; nothing else resolves.
    pub fn loopback_hosts(hosts: &[&str]) -> Self {
        let mut args = vec!["--local=/com/net/test/".to_owned()];
        args.extend(hosts.iter().map(|h| format!("--host-record={h},127.0.0.1")));
        Self::start(&args)
    }

    /// `args` are dnsmasq record options, e.g. `--mx-host=d.test,mx.d.test,10`,
    /// `--host-record=mx.d.test,127.0.0.1`.
    pub fn start(args: &[String]) -> Self {
        let port = free_udp_port();
        let child = Command::new("dnsmasq")
            .args([
                "--no-daemon",
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--no-poll",
            ])
            .args([
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--user=root",
                "--pid-file=",
            ])
            .arg(format!("--port={port}"))
            .args(["--log-facility=-", "--quiet-dhcp"])
            .args(args)
            .spawn()
            .expect("spawn dnsmasq (package dnsmasq-base)");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        crate::tmp::wait_listening(addr, Duration::from_secs(5));
        Self {
            addr,
            _child: ChildGuard(Some(child)),
        }
    }
}
