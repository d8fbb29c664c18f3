//! The outcome of one delivery attempt, as a pure function: a recipient's
//! final reply, what the policy layer and the operator said, and the
//! message's age give delivered, retry after T, bounce or expire; the
//! transaction's replies decide whether the connection is suspended.
//! Nothing here touches a socket, a clock or the spool.
use std::{
    hash::{BuildHasher, Hasher},
    time::Duration,
};

use super::super::{config::RetryConfig, policy::shaping::Verdict};
use crate::smtp::reply::Reply;

/// What decides a recipient's fate besides its reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The reply decides.
    Reply,
    /// Bounce even a temporary failure: a route that can never work, the
    /// operator's `ctl relay bounce`, a reply rule that bounces.
    Bounce,
}

/// What happens to one recipient after an attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Try again after this long.
    Retry {
        after: Duration,
    },
    /// Give up; the DSN carries this reply.
    Bounced(Reply),
    /// Temporary failure past the maximum age; the DSN carries a `4.4.7`.
    Expired(Reply),
}

impl Outcome {
    /// The status word of the delivery log and the metrics.
    pub fn status(&self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Retry { .. } => "deferred",
            Self::Bounced(_) => "bounced",
            Self::Expired(_) => "expired",
        }
    }
}

/// Retry schedule for temporary failures: `min · 2^attempt`, capped at
/// `max`, spread by ±`jitter`; a message older than `max_age` expires.
#[derive(Clone, Debug)]
pub struct RetrySchedule {
    pub min: Duration,
    pub max: Duration,
    pub max_age: Duration,
    pub jitter: f64,
}

impl RetrySchedule {
    pub fn new(c: &RetryConfig) -> Self {
        Self {
            min: c.min,
            max: c.max,
            max_age: c.max_age,
            jitter: c.jitter.clamp(0.0, 1.0),
        }
    }

    /// The delay before retry `attempt + 1` for a random `unit` in [0, 1):
    /// 0.5 is the middle of the jitter band.
    pub fn delay_at(&self, attempt: u32, unit: f64) -> Duration {
        let base = self
            .min
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max);
        base.mul_f64(1.0 + self.jitter * (unit * 2.0 - 1.0))
    }

    /// [`Self::delay_at`] with a fresh random unit.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_at(attempt, random_unit())
    }
}

/// A random fraction in [0, 1).
pub fn random_unit() -> f64 {
    let r = std::hash::RandomState::new().build_hasher().finish();
    #[expect(
        clippy::cast_precision_loss,
        reason = "a random fraction needs no precision"
    )]
    let unit = (r >> 11) as f64 / (1u64 << 53) as f64;
    unit
}

/// The outcome for one recipient whose final reply is `reply`, of a message
/// `age` old, at its `attempt`-th failure so far; `unit` is the jitter draw.
pub fn classify(
    reply: &Reply,
    action: Action,
    age: Duration,
    retry: &RetrySchedule,
    attempt: u32,
    unit: f64,
) -> Outcome {
    if reply.is_positive() {
        Outcome::Delivered
    } else if reply.is_permanent() || action == Action::Bounce {
        Outcome::Bounced(reply.clone())
    } else if age >= retry.max_age {
        Outcome::Expired(Reply::local(
            reply.code,
            "4.4.7",
            format!(
                "message expired after {:?}; last error: {reply}",
                retry.max_age
            ),
        ))
    } else {
        Outcome::Retry {
            after: retry.delay_at(attempt, unit),
        }
    }
}

/// What the policy layer's verdicts on a transaction's replies mean for the
/// job and the connection: one bouncing reply bounces the job's temporary
/// failures; one suspending reply closes the connection (the pair is
/// suspended; the rest waits).
pub fn after_transaction(verdicts: impl IntoIterator<Item = Verdict>) -> (Action, bool) {
    let (mut action, mut suspend) = (Action::Reply, false);
    for v in verdicts {
        match v {
            Verdict::Continue => {}
            Verdict::Suspended => suspend = true,
            Verdict::Bounce => action = Action::Bounce,
        }
    }
    (action, suspend)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::reply::parse_reply;

    const MIN: Duration = Duration::from_mins(1);

    fn schedule() -> RetrySchedule {
        RetrySchedule {
            min: MIN,
            max: Duration::from_hours(1),
            max_age: Duration::from_hours(120),
            jitter: 0.2,
        }
    }

    fn wire(text: &str) -> Reply {
        parse_reply(format!("{text}\r\n").as_bytes())
            .expect("well-formed")
            .expect("complete")
            .0
    }

    /// What a row expects: the status, the code and enhanced code the DSN
    /// carries (bounces), the retry delay (deferrals), the connection closed.
    #[derive(Debug, PartialEq)]
    struct Expect {
        status: &'static str,
        dsn: Option<(u16, String)>,
        retry: Option<Duration>,
        suspend: bool,
    }

    fn run(reply: &str, verdict: Verdict, operator: Action, age_h: u64, attempt: u32) -> Expect {
        let reply = wire(reply);
        let (rule, suspend) = after_transaction([verdict]);
        let action = if operator == Action::Bounce {
            operator
        } else {
            rule
        };
        let o = classify(
            &reply,
            action,
            Duration::from_hours(age_h),
            &schedule(),
            attempt,
            0.5,
        );
        let dsn = match &o {
            Outcome::Bounced(r) | Outcome::Expired(r) => Some((
                r.code,
                r.enhanced.map(|e| e.to_string()).unwrap_or_default(),
            )),
            _ => None,
        };
        let retry = match o {
            Outcome::Retry { after } => Some(after),
            _ => None,
        };
        Expect {
            status: o.status(),
            dsn,
            retry,
            suspend,
        }
    }

    fn e(
        status: &'static str,
        dsn: Option<(u16, &str)>,
        retry: Option<u64>,
        suspend: bool,
    ) -> Expect {
        Expect {
            status,
            dsn: dsn.map(|(c, x)| (c, x.to_owned())),
            retry: retry.map(|m| MIN * u32::try_from(m).unwrap()),
            suspend,
        }
    }

    /// The spec: (reply, policy verdict, operator action, age in hours,
    /// failures so far) → (status, DSN reply, retry delay in minutes, suspend).
    #[test]
    fn attempt_outcomes_follow_the_spec_table() {
        use Action::{Bounce as OpBounce, Reply as NoOp};
        use Verdict::{Bounce, Continue, Suspended};
        let rows: &[(&str, Verdict, Action, u64, u32, Expect)] = &[
            // Positive replies are delivered, whatever else is said.
            (
                "250 2.0.0 Ok: queued as X",
                Continue,
                NoOp,
                0,
                0,
                e("delivered", None, None, false),
            ),
            (
                "251 2.1.5 user not local; will forward",
                Continue,
                NoOp,
                0,
                0,
                e("delivered", None, None, false),
            ),
            (
                "250 ok",
                Continue,
                OpBounce,
                200,
                3,
                e("delivered", None, None, false),
            ),
            // Temporary failures retry with backoff: min · 2^attempt, capped.
            (
                "451 4.3.0 try again later",
                Continue,
                NoOp,
                0,
                0,
                e("deferred", None, Some(1), false),
            ),
            (
                "450 4.2.1 mailbox busy",
                Continue,
                NoOp,
                1,
                1,
                e("deferred", None, Some(2), false),
            ),
            (
                "452 4.2.2 mailbox full",
                Continue,
                NoOp,
                2,
                3,
                e("deferred", None, Some(8), false),
            ),
            (
                "421 4.4.2 timeout",
                Continue,
                NoOp,
                3,
                9,
                e("deferred", None, Some(60), false),
            ),
            // A temporary failure without an enhanced code still retries.
            (
                "451 local error",
                Continue,
                NoOp,
                0,
                0,
                e("deferred", None, Some(1), false),
            ),
            // Permanent failures bounce with the server's reply.
            (
                "550 5.1.1 user unknown",
                Continue,
                NoOp,
                0,
                0,
                e("bounced", Some((550, "5.1.1")), None, false),
            ),
            (
                "554 5.7.1 rejected by policy",
                Continue,
                NoOp,
                0,
                0,
                e("bounced", Some((554, "5.7.1")), None, false),
            ),
            (
                "552 message too large",
                Continue,
                NoOp,
                0,
                0,
                e("bounced", Some((552, "")), None, false),
            ),
            // Past max_age a temporary failure expires with a 4.4.7 of the same code.
            (
                "451 4.3.0 try again later",
                Continue,
                NoOp,
                120,
                7,
                e("expired", Some((451, "4.4.7")), None, false),
            ),
            (
                "421 4.7.0 too busy",
                Continue,
                NoOp,
                500,
                30,
                e("expired", Some((421, "4.4.7")), None, false),
            ),
            // Past max_age a permanent failure is a plain bounce.
            (
                "550 5.1.1 user unknown",
                Continue,
                NoOp,
                500,
                30,
                e("bounced", Some((550, "5.1.1")), None, false),
            ),
            // The operator's bounce (and a route that can never work) bounces a 4xx as it is.
            (
                "451 4.3.0 try again later",
                Continue,
                OpBounce,
                0,
                0,
                e("bounced", Some((451, "4.3.0")), None, false),
            ),
            // A reply rule that bounces does the same.
            (
                "421 4.7.28 unusual rate of unsolicited mail",
                Bounce,
                NoOp,
                0,
                0,
                e("bounced", Some((421, "4.7.28")), None, false),
            ),
            // A suspending rule closes the connection; the recipient retries.
            (
                "421 4.7.28 unusual rate of unsolicited mail",
                Suspended,
                NoOp,
                0,
                0,
                e("deferred", None, Some(1), true),
            ),
            (
                "451 4.7.0 temporarily deferred",
                Suspended,
                NoOp,
                0,
                2,
                e("deferred", None, Some(4), true),
            ),
            // Suspended and expired: the recipient expires, the connection still closes.
            (
                "421 4.7.28 unusual rate",
                Suspended,
                NoOp,
                130,
                2,
                e("expired", Some((421, "4.4.7")), None, true),
            ),
        ];
        assert!(rows.len() >= 15);
        for (reply, verdict, op, age, attempt, want) in rows {
            let got = run(reply, *verdict, *op, *age, *attempt);
            assert_eq!(
                &got, want,
                "{reply} / {verdict:?} / {op:?} / {age}h / attempt {attempt}"
            );
        }
    }

    #[test]
    fn an_expired_reply_names_the_age_and_the_last_error() {
        let o = classify(
            &wire("451 4.3.0 try again later"),
            Action::Reply,
            Duration::from_hours(121),
            &schedule(),
            0,
            0.5,
        );
        let Outcome::Expired(r) = o else {
            panic!("{o:?}")
        };
        assert_eq!(
            r.text(),
            "message expired after 432000s; last error: 451 4.3.0 try again later"
        );
    }

    #[test]
    fn one_bounce_verdict_bounces_the_job_and_one_suspension_closes_it() {
        use Verdict::{Bounce, Continue, Suspended};
        assert_eq!(after_transaction([]), (Action::Reply, false));
        assert_eq!(
            after_transaction([Continue, Continue]),
            (Action::Reply, false)
        );
        assert_eq!(
            after_transaction([Continue, Bounce]),
            (Action::Bounce, false)
        );
        assert_eq!(
            after_transaction([Suspended, Continue]),
            (Action::Reply, true)
        );
        assert_eq!(
            after_transaction([Bounce, Suspended]),
            (Action::Bounce, true)
        );
    }

    #[test]
    fn backoff_doubles_within_jitter_and_caps() {
        let s = RetrySchedule {
            min: Duration::from_secs(10),
            max: Duration::from_secs(100),
            max_age: Duration::MAX,
            jitter: 0.2,
        };
        for _ in 0..100 {
            let d0 = s.delay(0).as_secs_f64();
            let d2 = s.delay(2).as_secs_f64();
            let d9 = s.delay(9).as_secs_f64();
            assert!((8.0..=12.0).contains(&d0), "{d0}");
            assert!((32.0..=48.0).contains(&d2), "{d2}");
            assert!((80.0..=120.0).contains(&d9), "{d9}");
        }
    }
}
