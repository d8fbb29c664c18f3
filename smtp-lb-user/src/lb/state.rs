//! What the balancer keeps across restarts, in `<state_dir>/lb-state.json`:
//! per relay address, its name and [`Runtime`] (health, warmup ramps,
//! drain, operator weight), and each service's last good relays. Written atomically (temporary file, fsync,
//! rename, fsync of the directory), so a crash leaves the old or the new
//! file, never half of one.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File},
    io::{self, Write},
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::balance::weights::Runtime;

const FILE: &str = "lb-state.json";

/// One relay's persisted state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    pub name: String,
    pub runtime: Runtime,
}

/// The whole file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub backends: BTreeMap<IpAddr, Saved>,
    /// Per service (VIP and ports), the relays it had alive the last time
    /// it was not in panic: what a restart in panic keeps sending to.
    #[serde(default)]
    pub last_good: BTreeMap<String, BTreeSet<IpAddr>>,
    /// `ctl node drain`: the node stays withdrawn from the routers across
    /// restarts until `ctl node undrain`.
    #[serde(default)]
    pub node_drained: bool,
}

fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// Reads the state; a missing file is an empty state. A file that cannot be
/// parsed is moved aside (`lb-state.json.corrupt`) and reported, and the
/// balancer starts as if new: relays must pass their checks again.
pub fn load(dir: &Path) -> io::Result<State> {
    let p = path(dir);
    match fs::read(&p) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(state) => Ok(state),
            Err(e) => {
                let aside = p.with_extension("json.corrupt");
                warn!(file = %p.display(), error = %e, moved_to = %aside.display(), "state file unreadable; starting fresh");
                fs::rename(&p, &aside)?;
                Ok(State::default())
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(State::default()),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("read {}: {e}", p.display()),
        )),
    }
}

/// Writes the state atomically.
pub fn save(dir: &Path, state: &State) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let p = path(dir);
    let tmp = p.with_extension("json.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(state).map_err(io::Error::other)?)?;
    f.sync_all()?;
    fs::rename(&tmp, &p)?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_survives_a_corrupt_file() {
        let dir = std::env::temp_dir().join(format!("slb-state-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(
            load(&dir).unwrap(),
            State::default(),
            "missing file = empty state"
        );
        let mut s = State::default();
        s.backends.insert(
            "198.51.100.3".parse().unwrap(),
            Saved {
                name: "relay1".into(),
                runtime: Runtime::added(),
            },
        );
        save(&dir, &s).unwrap();
        assert_eq!(load(&dir).unwrap(), s);
        fs::write(path(&dir), b"{ not json").unwrap();
        assert_eq!(load(&dir).unwrap(), State::default());
        assert!(
            dir.join("lb-state.json.corrupt").exists(),
            "the corrupt file is kept for inspection"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
