//! Runs the real XDP programs on crafted packets with `BPF_PROG_TEST_RUN`
//! (kernel 4.12+, XDP support since 5.x), so fixtures exercise exactly the
//! object that ships.
use std::time::Duration;

use aya::{
    Ebpf, EbpfLoader,
    programs::{TestRun, TestRunOptions, Xdp},
};

use crate::env;

/// An XDP verdict (`enum xdp_action`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Aborted,
    Drop,
    Pass,
    Tx,
    Redirect,
}

impl Verdict {
    fn from_raw(v: u32) -> Self {
        match v {
            0 => Self::Aborted,
            1 => Self::Drop,
            2 => Self::Pass,
            3 => Self::Tx,
            4 => Self::Redirect,
            other => panic!("XDP program returned unknown action {other}"),
        }
    }
}

/// What one run produced.
#[derive(Debug)]
pub struct Outcome {
    pub verdict: Verdict,
    /// The packet as the program left it.
    pub output: Vec<u8>,
    /// Mean time per run in nanoseconds: this thread's CPU time over the
    /// whole test run (`CLOCK_THREAD_CPUTIME_ID`) divided by the repeats.
    /// Not the kernel's own figure, which is truncated to whole nanoseconds
    /// (4-5 % of the empty program's cost here). Like the kernel's, it
    /// leaves out the time the thread was preempted; the syscall's setup is
    /// in it, microseconds spread over a million runs.
    pub cpu_ns: f64,
}

/// The eBPF object loaded with fresh (unpinned) maps.
pub struct XdpHarness {
    ebpf: Ebpf,
}

impl XdpHarness {
    /// Loads every XDP program of the object. Panics if the object is
    /// missing or empty (build it with `cargo xtask build`).
    pub fn load() -> Self {
        Self::load_from(&env::ebpf_object())
    }

    /// Like [`Self::load`], from the object at `path`.
    pub fn load_from(path: &std::path::Path) -> Self {
        env::require_root();
        let bytes = std::fs::read(path).unwrap_or_else(|e| {
            panic!(
                "read eBPF object {}: {e}; run `cargo xtask build`",
                path.display()
            )
        });
        assert!(
            !bytes.is_empty(),
            "eBPF object {} is empty; run `cargo xtask build`",
            path.display()
        );
        let ebpf = EbpfLoader::new().load(&bytes).expect("load eBPF object");
        let mut harness = Self { ebpf };
        harness.each_program(|name, prog| {
            prog.load()
                .unwrap_or_else(|e| panic!("load program {name}: {e:?}"));
        });
        harness
    }

    /// Unloads and loads every program again, maps untouched. The JIT puts
    /// each program's code at a random offset in its memory (against JIT
    /// spraying), and that placement alone moves a path's cost by several
    /// nanoseconds: a benchmark that loads again between rounds measures
    /// over placements instead of drawing one.
    pub fn reload_programs(&mut self) {
        self.each_program(|name, prog| {
            prog.unload()
                .unwrap_or_else(|e| panic!("unload program {name}: {e:?}"));
            prog.load()
                .unwrap_or_else(|e| panic!("load program {name}: {e:?}"));
        });
    }

    fn each_program(&mut self, mut f: impl FnMut(&str, &mut Xdp)) {
        let names: Vec<String> = self.ebpf.programs().map(|(n, _)| n.to_owned()).collect();
        for name in names {
            let prog: &mut Xdp = self
                .ebpf
                .program_mut(&name)
                .unwrap()
                .try_into()
                .expect("every program is XDP");
            f(&name, prog);
        }
    }

    /// Runs program `prog` once on `packet`.
    pub fn run(&mut self, prog: &str, packet: &[u8]) -> Outcome {
        self.run_repeat(prog, packet, 1)
    }

    /// Runs program `prog` `repeat` times on `packet` (the kernel re-runs it
    /// on the same input each time) and reports the mean duration.
    pub fn run_repeat(&mut self, prog: &str, packet: &[u8], repeat: u32) -> Outcome {
        let program: &Xdp = self
            .ebpf
            .program(prog)
            .unwrap_or_else(|| panic!("no program `{prog}` in the object"))
            .try_into()
            .expect("XDP program");
        // Room for encapsulation headers the program may push.
        let mut out = vec![0u8; packet.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.data_out = Some(&mut out);
        opts.repeat = repeat;
        let before = thread_cpu_time();
        let res = program
            .test_run(opts)
            .unwrap_or_else(|e| panic!("test_run {prog}: {e:?}"));
        let cpu = thread_cpu_time().saturating_sub(before);
        out.truncate(res.data_size_out as usize);
        Outcome {
            verdict: Verdict::from_raw(res.return_value),
            output: out,
            cpu_ns: cpu.as_secs_f64() * 1e9 / f64::from(repeat.max(1)),
        }
    }

    /// The loaded object, to read and write maps in fixtures.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

/// CPU time this thread has used.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec to write.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    assert_eq!(rc, 0, "clock_gettime: {}", std::io::Error::last_os_error());
    Duration::new(
        ts.tv_sec.unsigned_abs(),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// The counters that changed from `before` to `after` (both from a counter
/// struct's `fields()`), with by how much.
pub fn changed(
    before: &[(&'static str, u64)],
    after: &[(&'static str, u64)],
) -> Vec<(&'static str, u64)> {
    after
        .iter()
        .zip(before)
        .filter(|((_, a), (_, b))| a != b)
        .map(|((n, a), (_, b))| (*n, a - b))
        .collect()
}
