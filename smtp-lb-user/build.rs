//! Embeds the eBPF object that `cargo xtask build` produced.
//!
//! xtask builds `smtp-lb-ebpf` (nightly, bpfel-unknown-none, bpf-linker) and
//! passes its path in `SMTP_LB_EBPF_OBJ`. Without it (plain `cargo build`,
//! `cargo clippy`) an empty stub is embedded, so nothing here needs the BPF
//! toolchain; the loader then refuses with "built without eBPF".
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo::rerun-if-env-changed=SMTP_LB_EBPF_OBJ");
    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("smtp-lb.bpf.o");
    match env::var_os("SMTP_LB_EBPF_OBJ") {
        Some(obj) => {
            println!("cargo::rerun-if-changed={}", obj.to_string_lossy());
            fs::copy(&obj, &out)
                .unwrap_or_else(|e| panic!("copy eBPF object {}: {e}", obj.to_string_lossy()));
        }
        None => fs::write(&out, []).expect("write empty eBPF stub"),
    }
}
