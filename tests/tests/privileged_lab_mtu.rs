//! Path MTU through the balancer, end to end with real TCP, both ways, for
//! IPv4 and IPv6, in the IPIP topology (relay behind a router):
//!
//! - **client → relay**: the client's full-size (1500) segments do not fit
//!   the tunnel (1500 + 20 / 40 on the LB's 1500 link). The balancer
//!   answers them with ICMP "fragmentation needed" / "packet too big"
//!   (`tx_too_big`); the client's TCP lowers its segment size and the upload
//!   completes. Without the answer they vanish and the upload stalls.
//! - **relay → client**: the router's route to the client carries only 1400
//!   bytes; the relay's 1500-byte replies (DSR: from the VIP) make the router
//!   send ICMP to the VIP, which routes to the balancer. The balancer sends
//!   the error, through the tunnel, to the relay that owns the flow
//!   (`icmp_to_flow`); the relay's TCP lowers its segment size and the
//!   download completes. Without it the download stalls (a PMTU black hole).
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::Stdio,
    time::Duration,
};

use smtp_lb_tests::{
    env,
    lab::Lab,
    topology::{ctl_stats, ipip_router, pass_on_switch_port, wait_for},
};

const VIP4: &str = "203.0.113.10";
const VIP6: &str = "2001:db8:10::10";
/// Bytes moved each way: many full-size segments.
const BYTES: usize = 256 * 1024;
/// A stalled transfer fails here instead of hanging.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

#[test]
fn oversized_packets_both_ways_get_icmp_that_reaches_the_right_host() {
    env::require_root();
    let mut lab = Lab::new();
    let work = lab.scratch_dir();
    lab.host("client", &["198.51.100.1/24", "2001:db8::1/64"]);
    lab.host("lb", &["198.51.100.2/24", "2001:db8::2/64"]);
    lab.host("relay", &["192.0.2.11/24", "2001:db8:2::11/64"]);
    ipip_router(&mut lab);
    // The router carries only 1400 bytes towards the client, and sends its
    // ICMP errors for the VIP to the LB.
    lab.sh(
        "router",
        &format!(
            "ip route replace 198.51.100.0/24 dev eth0 mtu lock 1400 && \
             ip -6 route replace 2001:db8::/64 dev eth0 mtu lock 1400 && \
             ip route add {VIP4}/32 via 198.51.100.2 && ip -6 route add {VIP6}/128 via 2001:db8::2"
        ),
    );
    lab.sh(
        "client",
        &format!(
            "ip route add {VIP4}/32 via 198.51.100.2 && ip -6 route add {VIP6}/128 via 2001:db8::2"
        ),
    );
    lab.sh(
        "relay",
        &format!(
            "ip addr add {VIP4}/32 dev lo && ip addr add {VIP6}/128 dev lo nodad && \
             sysctl -qw net.ipv4.conf.all.arp_ignore=1 net.ipv4.conf.all.arp_announce=2 \
               net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.eth0.rp_filter=0 && \
             ip route add default via 192.0.2.254 && ip -6 route add default via 2001:db8:2::fe"
        ),
    );
    // Health checks go to the relay's own addresses.
    for listen in ["192.0.2.11:25", "[2001:db8:2::11]:25"] {
        let mut cmd = lab.command("relay", "smtp-sink");
        cmd.args(["-u", "nobody", listen, "64"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        lab.spawn("relay", cmd);
    }
    let mut cmd = lab.command("relay", env::smtp_lb_bin());
    cmd.args(["decap", "--iface", "eth0", "--mode", "native"])
        .args(["--allow-source", "172.16.0.0/16"])
        .args(["--allow-source", "fd00:736d:7470::/96"])
        .args(["--vip", VIP4, "--vip", VIP6])
        .env("SMTP_LB_LOG", "warn");
    lab.spawn("relay", cmd);
    wait_for("decap attached", Duration::from_secs(20), || {
        String::from_utf8_lossy(&lab.run("relay", &["ip", "link", "show", "eth0"]).stdout)
            .contains("xdp")
    });

    let cfg = format!(
        "state_dir = \"{state}\"\n[warmup]\nduration = \"0s\"\nrejoin = \"0s\"\n\n\
         [[services]]\nname = \"mx\"\nvip = \"{VIP4}\"\nports = [25]\n\
         [[services.backends]]\nname = \"relay\"\naddress = \"192.0.2.11\"\nforwarding = \"ipip\"\n\
         [[services]]\nname = \"mx6\"\nvip = \"{VIP6}\"\nports = [25]\n\
         [[services.backends]]\nname = \"relay\"\naddress = \"2001:db8:2::11\"\nforwarding = \"ipip\"\n",
        state = work.join("state").display()
    );
    let cfg_path = work.join("lb.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    for addr in ["192.0.2.11", "2001:db8:2::11"] {
        // The first echo may be lost while neighbours resolve on each hop.
        let ok = (0..5).any(|_| {
            lab.try_run("lb", &["ping", "-c1", "-W1", addr])
                .status
                .success()
        });
        assert!(ok, "LB cannot reach the relay at {addr}");
    }
    pass_on_switch_port(&lab, "lb");
    let pin_dir = lab.pin_dir().join("lb");
    let mut cmd = lab.command("lb", env::smtp_lb_bin());
    cmd.args(["lb", "--iface", "eth0", "--mode", "native"])
        .args(["--stats-interval", "0", "--config"])
        .arg(&cfg_path)
        .arg("--pin-dir")
        .arg(&pin_dir)
        .env("SMTP_LB_LOG", "warn");
    let lb_pid = lab.spawn("lb", cmd);
    wait_for("balancer attached", Duration::from_secs(30), || {
        String::from_utf8_lossy(&lab.run("lb", &["ip", "link", "show", "eth0"]).stdout)
            .contains("xdp")
    });

    for vip in [VIP4, VIP6] {
        let addr = SocketAddr::new(vip.parse().unwrap(), 25);
        let listener = lab.in_netns("relay", move || TcpListener::bind(addr).unwrap());
        // The relay: read the upload to its end, then send as much back.
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
            let mut got = Vec::new();
            let read = s.read_to_end(&mut got).map(|_| got.len());
            let sent = read
                .as_ref()
                .map_err(|_| ())
                .and_then(|_| s.write_all(&vec![b'r'; BYTES]).map_err(|_| ()));
            (read.map_err(|e| e.to_string()), sent.is_ok())
        });
        let mut stream = wait_connect(&lab, addr);
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        stream
            .write_all(&vec![b'c'; BYTES])
            .unwrap_or_else(|e| panic!("{vip}: upload: {e}"));
        stream.shutdown(Shutdown::Write).unwrap();
        let (uploaded, sent) = server.join().unwrap();
        assert_eq!(uploaded, Ok(BYTES), "{vip}: the relay got the whole upload");
        assert!(sent, "{vip}: the relay sent the download");
        let mut got = Vec::new();
        let read = stream.read_to_end(&mut got);
        assert!(read.is_ok(), "{vip}: download stalled: {read:?}");
        assert_eq!(got.len(), BYTES, "{vip}: the whole download");
    }

    // Both kinds of error were at work, and nothing went missing.
    let json = ctl_stats(&pin_dir);
    let text = json.to_string();
    eprintln!("stats: {text}");
    let counter =
        |name: &str| find_u64(&json, name).unwrap_or_else(|| panic!("no counter {name} in {text}"));
    assert!(
        counter("tx_too_big") >= 2,
        "the LB answered both uploads: {text}"
    );
    assert!(
        counter("icmp_to_flow") >= 2,
        "router errors reached the relay: {text}"
    );
    assert_eq!(counter("drop_too_big"), 0, "{text}");
    assert_eq!(counter("drop_encap"), 0, "{text}");
    assert!(
        lab.stop(lb_pid, Duration::from_secs(5)),
        "smtp-lb lb exits on SIGTERM"
    );
}

/// Connects from the client, retrying while the balancer's health checks
/// bring the relay up (until then the VIP has no backend).
fn wait_connect(lab: &Lab, addr: SocketAddr) -> TcpStream {
    let mut last = None;
    for _ in 0..60 {
        match lab.in_netns("client", move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        }) {
            Ok(s) => return s,
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("connect {addr}: {last:?}");
}

/// The first number named `name` anywhere in `v`.
fn find_u64(v: &serde_json::Value, name: &str) -> Option<u64> {
    match v {
        serde_json::Value::Object(m) => m
            .get(name)
            .and_then(serde_json::Value::as_u64)
            .or_else(|| m.values().find_map(|x| find_u64(x, name))),
        serde_json::Value::Array(a) => a.iter().find_map(|x| find_u64(x, name)),
        _ => None,
    }
}
