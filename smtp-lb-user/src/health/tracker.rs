//! Rise/fall hysteresis over probe results, and a short history of them.
use std::{
    collections::VecDeque,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

/// Probe results kept per relay for `ctl backends`.
const HISTORY: usize = 16;

/// Whether a relay may receive new connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Passes its checks: takes new connections.
    Up,
    /// Alive but at capacity: greets with `421`. Takes no new connections
    /// while another relay has room; keeps the ones it has.
    Full,
    /// Fails its checks.
    Down,
}

/// A change of [`Health`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    WentUp,
    WentFull,
    WentDown,
}

/// What one probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    /// The relay greeted with `421`: alive, but full.
    Full(String),
    Failed(String),
}

impl Outcome {
    /// The health this outcome argues for.
    fn health(&self) -> Health {
        match self {
            Self::Passed => Health::Up,
            Self::Full(_) => Health::Full,
            Self::Failed(_) => Health::Down,
        }
    }

    fn error(self) -> Option<String> {
        match self {
            Self::Passed => None,
            Self::Full(e) | Self::Failed(e) => Some(e),
        }
    }
}

/// One probe's result as kept in the history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProbeRecord {
    /// When the probe finished.
    #[serde(with = "unix_secs")]
    pub at: SystemTime,
    /// How long it took.
    pub took_ms: u64,
    /// `None` when the relay passed; else why not.
    pub error: Option<String>,
}

/// A relay's health state machine.
#[derive(Clone, Debug)]
pub struct Tracker {
    rise: u32,
    fall: u32,
    health: Health,
    /// Consecutive results that disagree with `health`.
    streak: u32,
    history: VecDeque<ProbeRecord>,
}

impl Tracker {
    /// Starts in `initial`: `Down` for a relay never seen before (it must
    /// pass `rise` probes), `Up` for one the previous daemon had up, so a
    /// daemon restart does not empty the tables.
    pub fn new(rise: u32, fall: u32, initial: Health) -> Self {
        Self {
            rise: rise.max(1),
            fall: fall.max(1),
            health: initial,
            streak: 0,
            history: VecDeque::new(),
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// Newest first.
    pub fn history(&self) -> impl Iterator<Item = &ProbeRecord> {
        self.history.iter().rev()
    }

    /// Records one probe; returns the transition it caused, if any.
    /// Consecutive probes that disagree with the current health count
    /// towards a change; `rise` of them move a relay up, `fall` of them move
    /// it to what the last one found (full or down).
    pub fn record(&mut self, outcome: Outcome, took: Duration) -> Option<Transition> {
        let found = outcome.health();
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(ProbeRecord {
            at: SystemTime::now(),
            took_ms: took.as_millis() as u64,
            error: outcome.error(),
        });
        if found == self.health {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if found == Health::Up {
            self.rise
        } else {
            self.fall
        };
        if self.streak < needed {
            return None;
        }
        self.health = found;
        self.streak = 0;
        Some(match found {
            Health::Up => Transition::WentUp,
            Health::Full => Transition::WentFull,
            Health::Down => Transition::WentDown,
        })
    }
}

mod unix_secs {
    use std::time::{SystemTime, UNIX_EPOCH};

    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(t: &mut Tracker) -> Option<Transition> {
        t.record(Outcome::Passed, Duration::from_millis(1))
    }
    fn fail(t: &mut Tracker) -> Option<Transition> {
        t.record(Outcome::Failed("refused".into()), Duration::from_millis(1))
    }
    fn full(t: &mut Tracker) -> Option<Transition> {
        t.record(
            Outcome::Full("greeting: 421".into()),
            Duration::from_millis(1),
        )
    }

    #[test]
    fn a_new_relay_needs_rise_successes_to_come_up() {
        let mut t = Tracker::new(2, 3, Health::Down);
        assert_eq!(ok(&mut t), None);
        assert_eq!(ok(&mut t), Some(Transition::WentUp));
        assert_eq!(t.health(), Health::Up);
    }

    #[test]
    fn fall_consecutive_failures_take_it_down_and_a_success_resets_the_count() {
        let mut t = Tracker::new(2, 3, Health::Up);
        assert_eq!(fail(&mut t), None);
        assert_eq!(fail(&mut t), None);
        assert_eq!(ok(&mut t), None, "a success in between resets the streak");
        assert_eq!(fail(&mut t), None);
        assert_eq!(fail(&mut t), None);
        assert_eq!(fail(&mut t), Some(Transition::WentDown));
        assert_eq!(fail(&mut t), None, "already down");
    }

    #[test]
    fn history_keeps_the_newest_results_first() {
        let mut t = Tracker::new(1, 1, Health::Up);
        for i in 0..(HISTORY + 3) {
            t.record(Outcome::Failed(format!("e{i}")), Duration::ZERO);
        }
        let h: Vec<_> = t.history().map(|r| r.error.clone().unwrap()).collect();
        assert_eq!(h.len(), HISTORY);
        assert_eq!(h[0], format!("e{}", HISTORY + 2));
    }

    #[test]
    fn a_relay_greeting_421_is_full_not_down_and_comes_back_with_rise_passes() {
        let mut t = Tracker::new(2, 2, Health::Up);
        assert_eq!(full(&mut t), None);
        assert_eq!(full(&mut t), Some(Transition::WentFull));
        assert_eq!(t.health(), Health::Full);
        assert_eq!(ok(&mut t), None);
        assert_eq!(ok(&mut t), Some(Transition::WentUp));
        // A full relay that then stops answering goes down.
        full(&mut t);
        full(&mut t);
        assert_eq!(fail(&mut t), None);
        assert_eq!(fail(&mut t), Some(Transition::WentDown));
        // A down relay that answers 421 is alive again: full.
        full(&mut t);
        assert_eq!(full(&mut t), Some(Transition::WentFull));
    }
}
