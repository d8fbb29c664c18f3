//! The balancer under systemd's `Type=notify`: `READY=1` comes once the
//! program is attached and the admin API answers, `STOPPING=1` on SIGTERM.
//! (One test in this binary: it sets `NOTIFY_SOCKET` for the processes it
//! starts.)
use std::{os::unix::net::UnixDatagram, time::Duration};

use smtp_lb_tests::{env::require_root, lab::signal, topology::DsrLab};

#[test]
fn balancer_notifies_systemd_when_attached_and_when_stopping() {
    require_root();
    let mut dsr = DsrLab::new(1);
    let socket_path = dsr.work.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // SAFETY: this binary's only test, before it starts any thread of its own;
    // the daemon started next inherits it (nsenter keeps the mount namespace,
    // so the path is the same inside the lab).
    unsafe { std::env::set_var("NOTIFY_SOCKET", &socket_path) };
    let config = dsr.config(&[1], "");
    let pid = dsr.start_lb(&config, &[]);
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("READY=1 from smtp-lb lb");
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim_end(), "READY=1");
    // Ready means attached and answering.
    let link = dsr.lab.run("lb", &["ip", "link", "show", "eth0"]);
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(link.contains("xdp"), "XDP attached at READY=1: {link}");
    assert_eq!(dsr.ctl(&["status"])["iface"], "eth0");

    signal(pid, libc::SIGTERM);
    let n = socket.recv(&mut buf).expect("STOPPING=1 on SIGTERM");
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim_end(), "STOPPING=1");
    assert!(dsr.lab.stop(pid, Duration::from_secs(10)), "exits cleanly");
}
