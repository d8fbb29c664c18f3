//! The open-file limit: raised from the soft to the hard limit at start
//! (every connection, spool segment and log is a descriptor), then checked
//! against what the configuration may hold open at once, so a relay that
//! would run out of descriptors under load refuses to start instead.
use anyhow::{Context, bail};
use tracing::info;

/// Descriptors besides ingress connections: listeners, spool segments,
/// delivery connections, DNS sockets, the admin API and logs.
pub const RESERVE: u64 = 1024;

/// Raises `RLIMIT_NOFILE`'s soft limit to the hard one and returns it; an
/// error when it stays below `max_connections + RESERVE`.
pub fn raise(max_connections: usize) -> anyhow::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit(2) reads the struct we own; raising the soft
        // limit up to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) } != 0 {
            return Err(std::io::Error::last_os_error())
                .context("setrlimit(RLIMIT_NOFILE) to the hard limit");
        }
    }
    let now = lim.rlim_cur;
    let need = max_connections as u64 + RESERVE;
    if now < need {
        bail!(
            "open-file limit {now} (hard limit {}) is below the {need} descriptors this relay may need \
             (limits.max_connections {max_connections} + {RESERVE} for listeners, spool, delivery, DNS and logs); \
             raise it (systemd: LimitNOFILE=, shell: ulimit -Hn) or lower limits.max_connections",
            lim.rlim_max
        );
    }
    info!(
        before,
        now, need, "open-file limit (RLIMIT_NOFILE) raised to the hard limit"
    );
    Ok(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one_and_checked() {
        let now = raise(0).unwrap();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as in `raise`.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) },
            0
        );
        assert_eq!(lim.rlim_cur, lim.rlim_max);
        assert_eq!(now, lim.rlim_cur);
        let too_many = usize::try_from(now).unwrap();
        let e = format!("{:#}", raise(too_many).unwrap_err());
        assert!(
            e.contains("limits.max_connections") && e.contains("LimitNOFILE"),
            "{e}"
        );
    }
}
