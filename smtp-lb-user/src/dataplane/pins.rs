//! bpffs handling: make sure the pin directory lives on a mounted bpffs.
use std::{ffi::CString, fs, io, path::Path};

/// `BPF_FS_MAGIC` from `include/uapi/linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a valid out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[expect(
        clippy::useless_conversion,
        reason = "f_type's width differs between targets"
    )]
    Ok(i64::from(st.f_type) == BPF_FS_MAGIC)
}

/// Ensures `pin_dir` exists on a bpffs. If its parent (normally `/sys/fs/bpf`)
/// is not a bpffs yet, mounts one there, as `bpftool` does.
pub fn ensure_bpffs(pin_dir: &Path) -> io::Result<()> {
    let parent = pin_dir.parent().unwrap_or(pin_dir);
    if !is_bpffs(parent)? {
        let target =
            CString::new(parent.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
        // SAFETY: all arguments are valid C strings or null.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let err = io::Error::last_os_error();
            return Err(io::Error::new(
                err.kind(),
                format!("mount bpffs on {}: {err}", parent.display()),
            ));
        }
    }
    fs::create_dir_all(pin_dir)
}
