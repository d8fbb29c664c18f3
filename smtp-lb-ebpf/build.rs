//! Emits `bpf_target_arch` for aya-ebpf, and rebuilds when bpf-linker changes.
fn main() {
    // aya-ebpf reads this cfg to pick the right pt_regs layout.
    let arch = std::env::var("CARGO_CFG_BPF_TARGET_ARCH")
        .unwrap_or_else(|_| std::env::consts::ARCH.to_owned());
    println!("cargo::rustc-cfg=bpf_target_arch=\"{arch}\"");
    println!(
        "cargo::rustc-check-cfg=cfg(bpf_target_arch, values(\"x86_64\", \"arm\", \"aarch64\", \"riscv64\", \"powerpc64\", \"s390x\", \"mips\", \"loongarch64\"))"
    );
}
