//! The lab harness leaves nothing behind: not after a panic, not after a
//! killed run, and it never touches the root namespace.
use std::{
    io::{BufRead, BufReader},
    panic::{AssertUnwindSafe, catch_unwind},
    path::Path,
    process::{Command, Stdio},
    sync::Mutex,
};

use smtp_lb_tests::lab::{Lab, list_netns};

fn root_view() -> String {
    let out = |args: &[&str]| {
        String::from_utf8(Command::new("ip").args(args).output().unwrap().stdout).unwrap()
    };
    // Link names and addresses only: counters and states change on their own.
    let links: Vec<String> = out(&["-o", "link"])
        .lines()
        .map(|l| l.split(':').nth(1).unwrap_or_default().trim().to_owned())
        .collect();
    format!(
        "{links:?}\n{}\n{}\n{}",
        out(&["-o", "addr"]),
        out(&["route"]),
        out(&["-6", "route"])
    )
}

#[test]
fn a_panic_inside_a_test_leaves_no_namespace_process_or_pin() {
    let seen = Mutex::new((Vec::new(), String::new(), 0u32));
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut lab = Lab::new();
        lab.host("client", &["198.51.100.1/24"]);
        lab.host("relay", &["198.51.100.3/24"]);
        std::fs::create_dir_all(lab.pin_dir()).unwrap();
        let mut sleeper = lab.command("relay", "sleep");
        sleeper.arg("600");
        let pid = lab.spawn("relay", sleeper);
        *seen.lock().unwrap() = (lab.namespaces(), lab.pin_dir().display().to_string(), pid);
        panic!("deliberate panic inside a lab test");
    }));
    assert!(result.is_err(), "the closure panics");
    let (namespaces, pin_dir, pid) = seen.into_inner().unwrap();
    assert_eq!(namespaces.len(), 3, "switch + two hosts were created");
    let left = list_netns();
    for ns in &namespaces {
        assert!(!left.contains(ns), "namespace {ns} survived the panic");
    }
    assert!(
        !Path::new(&pin_dir).exists(),
        "pin dir {pin_dir} survived the panic"
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} survived the panic"
    );
}

#[test]
fn a_killed_run_is_cleaned_up_by_the_next_lab() {
    let mut holder = Command::new(env!("CARGO_BIN_EXE_lab-hold"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let mut words = line.split_whitespace();
    let pin_dir = words
        .next()
        .expect("lab-hold prints its pin dir")
        .to_owned();
    let namespaces: Vec<String> = words.map(str::to_owned).collect();
    assert!(!namespaces.is_empty());
    assert!(
        namespaces.iter().all(|ns| list_netns().contains(ns)),
        "lab-hold's lab exists while it runs"
    );

    holder.kill().unwrap(); // SIGKILL: no destructor runs, the namespaces stay behind.
    holder.wait().unwrap();

    let _next = Lab::new();
    let left = list_netns();
    for ns in &namespaces {
        assert!(!left.contains(ns), "stale namespace {ns} was not removed");
    }
    assert!(
        !Path::new(&pin_dir).exists(),
        "stale pin dir {pin_dir} was not removed"
    );
}

#[test]
fn the_root_namespace_gets_no_links_addresses_or_routes() {
    let before = root_view();
    let mut lab = Lab::new();
    lab.host("client", &["198.51.100.1/24", "2001:db8::1/64"]);
    lab.host("lb", &["198.51.100.2/24", "2001:db8::2/64"]);
    assert_eq!(
        root_view(),
        before,
        "the root namespace changed while the lab runs"
    );
    drop(lab);
    assert_eq!(
        root_view(),
        before,
        "the root namespace changed after teardown"
    );
}

#[test]
fn two_labs_with_the_same_host_names_run_side_by_side() {
    let mut a = Lab::new();
    let mut b = Lab::new();
    for lab in [&mut a, &mut b] {
        lab.host("client", &["198.51.100.1/24"]);
        lab.host("relay", &["198.51.100.3/24"]);
    }
    assert_ne!(a.get("client").netns, b.get("client").netns);
    for lab in [&a, &b] {
        lab.run("client", &["ping", "-c1", "-W2", "198.51.100.3"]);
    }
}
