//! `smtp-lb ctl trace` end to end: two relays running `smtp-lb relay`
//! behind the VIP, each delivering `isp.example` to a Postfix `smtp-sink`
//! from a named egress source bound to its own address. Two `swaks`
//! sessions from fixed client ports; the trace of one of them, asked on
//! the LB node, must name the relay that greeted it (its banner, as swaks
//! printed it), only that session's message id (as its `250` named it),
//! the message's provider, queue and egress source (checked against the
//! address the ISP's sink saw), and the delivery reply.
use std::{net::SocketAddr, process::Stdio, time::Duration};

use smtp_lb_tests::{
    env,
    relay::{lab_config, write_config},
    topology::{DsrLab, VIP, count, wait_for},
};

const ISP: &str = "198.51.100.50";
const RELAY_ADMIN_PORT: u16 = 8025;

/// One `swaks` session from `CLIENT:port` through the VIP: the relay
/// hostname in its banner and the queue id in its `250`, as swaks printed them.
fn session(dsr: &DsrLab, port: u16) -> (String, String) {
    let out = dsr.lab.try_run(
        "client",
        &[
            "timeout",
            "30",
            "swaks",
            "--server",
            &format!("{VIP}:25"),
            "--local-port",
            &port.to_string(),
            "--from",
            "app@lab.example",
            "--to",
            "user@isp.example",
            "--helo",
            "client.lab.example",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "swaks from port {port}: {text}");
    let banner = text
        .lines()
        .find_map(|l| l.strip_prefix("<-  220 "))
        .unwrap_or_else(|| panic!("no banner in swaks output: {text}"));
    let host = banner.split_whitespace().next().unwrap().to_owned();
    let id = text
        .lines()
        .find_map(|l| l.split("queued as ").nth(1))
        .unwrap_or_else(|| panic!("no queue id in swaks output: {text}"))
        .trim()
        .to_owned();
    (host, id)
}

#[test]
fn trace_follows_a_session_through_the_vip_to_its_delivery_reply() {
    env::require_root();
    let mut dsr = DsrLab::bare(2);
    dsr.lab.host("isp", &[&format!("{ISP}/24")]);
    let isp_dump = dsr.work.join("isp-dump");
    std::fs::create_dir_all(&isp_dump).unwrap();
    std::fs::set_permissions(
        &isp_dump,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let mut sink = dsr.lab.command("isp", "smtp-sink");
    sink.args(["-u", "nobody", "-d"])
        .arg(isp_dump.join("m"))
        .args(["0.0.0.0:25", "64"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    dsr.lab.spawn("isp", sink);

    // One admin token for the relays, as an operator would deploy it.
    let token = dsr.work.join("relay.token");
    std::fs::write(&token, "trace-lab-token-0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    for i in 0..dsr.relays.len() {
        let (name, addr) = (dsr.relays[i].name.clone(), dsr.relays[i].addr.clone());
        let dir = dsr.work.join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut cfg = lab_config(&name, &dir);
        cfg.admin = Some(SocketAddr::new(addr.parse().unwrap(), RELAY_ADMIN_PORT));
        cfg.admin_allow_remote = true;
        cfg.admin_token_file = Some(token.clone());
        cfg.routes.insert("isp.example".into(), format!("{ISP}:25"));
        cfg.egress = Some(
            toml::from_str(&format!(
                "default_pool = \"main\"\n\
                 [[source]]\nname = \"out-{name}\"\naddress = \"{addr}\"\nhelo = \"out-{name}.lab.example\"\n\
                 [[pool]]\nname = \"main\"\nsources = [{{ name = \"out-{name}\" }}]\n"
            ))
            .expect("egress config"),
        );
        let path = dir.join("relay.toml");
        write_config(&cfg, &path);
        let mut relay = dsr.lab.command(&name, env::smtp_lb_bin());
        relay
            .arg("relay")
            .arg("--config")
            .arg(&path)
            .env("SMTP_LB_LOG", "error");
        dsr.lab.spawn(&name, relay);
        dsr.wait_listening(i, "smtp-lb relay", Duration::from_secs(20));
        dsr.wait_port(i, RELAY_ADMIN_PORT, "admin API", Duration::from_secs(10));
    }
    let cfg = dsr.config(&[1, 1], "");
    dsr.start_lb(&cfg, &[]);

    let (host_a, id_a) = session(&dsr, 40123);
    let (_, id_b) = session(&dsr, 40124);
    assert_ne!(id_a, id_b);
    wait_for("both messages delivered", Duration::from_secs(20), || {
        count(&isp_dump) >= 2
    });
    // The relay that greeted session A (`hostname = "<name>.lab.example"`).
    let relay_a = host_a.trim_end_matches(".lab.example").to_owned();
    let addr_a = dsr
        .relays
        .iter()
        .find(|r| r.name == relay_a)
        .unwrap_or_else(|| panic!("banner {host_a} names no lab relay"))
        .addr
        .clone();

    let trace = |target: &str| -> serde_json::Value {
        let out = dsr.ctl_raw(&[
            "trace",
            target,
            "--pin-dir",
            dsr.pin_dir.to_str().unwrap(),
            "--relay-token-file",
            token.to_str().unwrap(),
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "ctl trace {target}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    };
    let client_a = "198.51.100.1:40123";
    let t = trace(client_a);
    eprintln!("ctl trace {client_a}: {t:#}");
    let flows = t["flows"].as_array().expect("flows");
    assert_eq!(flows.len(), 1, "one flow from that port: {t}");
    assert_eq!(flows[0]["vip"], format!("{VIP}:25"));
    assert_eq!(
        flows[0]["relay"],
        relay_a.as_str(),
        "the relay that greeted it"
    );
    assert_eq!(flows[0]["address"], addr_a.as_str());
    let messages = t["messages"].as_array().expect("messages");
    let ids: Vec<&str> = messages.iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids, [id_a.as_str()], "only that session's message: {t}");
    let m = &messages[0];
    assert_eq!(m["client"], client_a);
    assert_eq!(m["relay"], relay_a.as_str());
    let attempts = m["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 1, "one recipient, delivered at once: {m}");
    let a = &attempts[0];
    assert_eq!(a["rcpt"], "user@isp.example");
    assert_eq!(a["status"], "delivered");
    assert_eq!(a["queue"], "isp.example");
    // A static route to an address matches no provider rule.
    assert_eq!(a["provider"], "default");
    assert_eq!(a["source"], format!("out-{relay_a}"));
    assert_eq!(a["source_ip"], addr_a.as_str());
    assert_eq!(a["code"], 250, "smtp-sink's reply to the message: {a}");
    // The ISP saw the message of session A from that source address.
    let seen_from_a = std::fs::read_dir(&isp_dump)
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
        .any(|text| text.contains(&format!("X-Client-Addr: {addr_a}")));
    assert!(seen_from_a, "the ISP's sink saw {addr_a}");

    // By message id: every relay is asked, the one that has it answers.
    let t = trace(&id_b);
    let messages = t["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 1, "{t}");
    assert_eq!(messages[0]["id"], id_b.as_str());
    assert_eq!(messages[0]["client"], "198.51.100.1:40124");

    // And as an operator reads it.
    let out = dsr
        .lab
        .command("lb", env::smtp_lb_bin())
        .args(["ctl", "trace", client_a, "--pin-dir"])
        .arg(&dsr.pin_dir)
        .arg("--relay-token-file")
        .arg(&token)
        .arg("--token-file")
        .arg(dsr.work.join("state/admin.token"))
        .output()
        .expect("ctl trace");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("relay {relay_a} ({addr_a})")),
        "{text}"
    );
    assert!(text.contains(&id_a) && text.contains("delivered"), "{text}");
}
