//! systemd readiness for `Type=notify` units: `READY=1` once a daemon
//! serves, `STOPPING=1` when it begins to shut down. Outside systemd
//! (`$NOTIFY_SOCKET` unset) every call does nothing.
use sd_notify::NotifyState;
use tracing::warn;

/// The daemon serves: its listeners are bound and the program is attached.
pub fn ready() {
    notify(&[NotifyState::Ready]);
}

/// The daemon has begun to shut down.
pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        // systemd then reports the start as timed out; say why here.
        warn!(error = %e, "cannot notify systemd through $NOTIFY_SOCKET");
    }
}
