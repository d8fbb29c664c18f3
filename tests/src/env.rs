//! Paths to the artifacts `cargo xtask build` produced.
use std::path::PathBuf;

/// The repository's root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_owned()
}

/// The eBPF object: `SMTP_LB_EBPF_OBJ`, else where `cargo xtask build` puts it.
pub fn ebpf_object() -> PathBuf {
    std::env::var_os("SMTP_LB_EBPF_OBJ").map_or_else(
        || workspace_root().join("target/ebpf/bpfel-unknown-none/release/smtp-lb"),
        PathBuf::from,
    )
}

/// The `smtp-lb` binary: `SMTP_LB_BIN`, else `target/release/smtp-lb`.
pub fn smtp_lb_bin() -> PathBuf {
    std::env::var_os("SMTP_LB_BIN").map_or_else(
        || workspace_root().join("target/release/smtp-lb"),
        PathBuf::from,
    )
}

/// A file the project ships under `deploy/` (units, configs, rules, dashboard).
pub fn deploy(file: &str) -> PathBuf {
    workspace_root().join("deploy").join(file)
}

/// Panics with a clear message unless running as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert!(
        unsafe { libc::geteuid() } == 0,
        "this test needs root (network namespaces, XDP, bpffs): run it through `cargo xtask test` as root"
    );
}
