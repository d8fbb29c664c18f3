//! Durations written the way operators write them: `500ms`, `2s`, `5m`,
//! `12h`, `7d`. Use as `#[serde(with = "crate::config::duration")]`.
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Parses `<number><unit>` with unit `ms`, `s`, `m`, `h` or `d`.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like `500ms`, `2s`, `5m`, `12h`, `7d`"))?;
    let secs = |mult: u64| Duration::from_secs(n.saturating_mul(mult));
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(secs(1)),
        "m" | "min" => Ok(secs(60)),
        "h" => Ok(secs(3600)),
        "d" => Ok(secs(86_400)),
        "" => Err(format!("`{text}` has no unit; write e.g. `{n}s`")),
        other => Err(format!(
            "`{text}`: unknown unit `{other}` (use ms, s, m, h or d)"
        )),
    }
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
        assert_eq!(parse("12h"), Ok(Duration::from_hours(12)));
        assert_eq!(parse("7d"), Ok(Duration::from_hours(168)));
    }

    #[test]
    fn missing_or_unknown_units_are_refused_with_a_hint() {
        assert!(parse("10").unwrap_err().contains("no unit"));
        assert!(parse("3w").unwrap_err().contains("unknown unit `w`"));
        assert!(parse("fast").unwrap_err().contains("not a duration"));
    }
}
