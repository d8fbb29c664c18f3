//! Reading another daemon's metrics page (the balancer reads its relays'):
//! the samples of one metric family, with their labels. A page is input
//! like any other: lines that do not parse, and values that are not finite
//! and non-negative, are skipped.
use std::collections::BTreeMap;

/// The samples of metric `name` on `page`: each one's labels and value.
pub fn samples<'a>(
    page: &'a str,
    name: &'a str,
) -> impl Iterator<Item = (BTreeMap<String, String>, f64)> + 'a {
    page.lines().filter_map(move |line| {
        let rest = line.strip_prefix(name)?;
        let (labels, value) = match rest.strip_prefix('{') {
            Some(r) => {
                let (labels, value) = r.rsplit_once('}')?;
                (parse_labels(labels), value)
            }
            None if rest.starts_with(' ') => (BTreeMap::new(), rest),
            None => return None,
        };
        // The value may be followed by a timestamp; counters may print as floats.
        let value = value
            .split_whitespace()
            .next()?
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)?;
        Some((labels, value))
    })
}

/// The value of `name` without labels (a gauge like a queue depth).
pub fn value(page: &str, name: &str) -> Option<f64> {
    samples(page, name)
        .find(|(l, _)| l.is_empty())
        .map(|(_, v)| v)
}

/// `a="x",b="y \"q\""` → {a: x, b: y "q"}.
fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some((name, after)) = rest.split_once("=\"") {
        let name = name.trim_start_matches(',').trim().to_owned();
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(name, value);
        rest = &after[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gauge_without_labels_is_told_from_longer_names() {
        let page = "# TYPE smtp_lb_relay_queue_messages gauge\n\
            smtp_lb_relay_queue_messages_other 9\n\
            smtp_lb_relay_queue_messages 7\n";
        assert_eq!(value(page, "smtp_lb_relay_queue_messages"), Some(7.0));
        assert_eq!(
            value(
                "smtp_lb_relay_queue_messages NaN\n",
                "smtp_lb_relay_queue_messages"
            ),
            None
        );
        assert_eq!(value("", "smtp_lb_relay_queue_messages"), None);
    }
}
