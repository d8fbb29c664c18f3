//! The one duration grammar of both daemons and the command line:
//! humantime's (`500ms`, `2s`, `5m`, `12h`, `7d`, `1w`, `1h 30m`), as the
//! relay's `humantime_serde` fields read it too. Use as
//! `#[serde(with = "crate::config::duration")]`; serde names the field.
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Parses a humantime duration; a bare number other than `0` needs a unit.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    humantime::parse_duration(text).map_err(|e| {
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            format!("`{text}` has no unit; write e.g. `{text}s`")
        } else {
            format!("`{text}` is not a duration like `500ms`, `2s`, `5m`, `12h`, `7d`, `1w` ({e})")
        }
    })
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse(&text).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unit_parses() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse("5m"), Ok(Duration::from_mins(5)));
        assert_eq!(parse("5min"), Ok(Duration::from_mins(5)));
        assert_eq!(parse("12h"), Ok(Duration::from_hours(12)));
        assert_eq!(parse("7d"), Ok(Duration::from_hours(168)));
        assert_eq!(parse("1w"), Ok(Duration::from_hours(168)));
        assert_eq!(parse("1h 30m"), Ok(Duration::from_mins(90)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn missing_or_unknown_units_are_refused_with_a_hint() {
        assert!(parse("10").unwrap_err().contains("no unit"));
        assert!(
            parse("3x").unwrap_err().contains("unknown time unit \"x\""),
            "{}",
            parse("3x").unwrap_err()
        );
        assert!(parse("fast").unwrap_err().contains("not a duration"));
    }
}
