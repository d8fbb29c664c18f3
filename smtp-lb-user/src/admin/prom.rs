//! The one metrics exposition of both daemons: a `prometheus-client`
//! registry per daemon, rendered as `OpenMetrics` text, plus what both need
//! around it: escaped label values, bounded label sets, and helpers for
//! values sampled at scrape time (data-plane maps, queue depths).
use std::{
    collections::HashSet,
    fmt::Write as _,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    encoding::{
        DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeLabelValue, EncodeMetric,
        LabelValueEncoder,
    },
    metrics::{counter::ConstCounter, gauge::ConstGauge, histogram::Histogram},
    registry::{Registry, Unit},
};

/// What `/metrics` answers with.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Renders `registry` (and its collectors) as `OpenMetrics` text.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}

/// A label value from outside (a domain, a backend name, an SMTP code),
/// escaped as the text format requires: `prometheus-client` 0.24 writes
/// label values verbatim, so a `"` or a newline would break the page.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct Text(pub Arc<str>);

impl From<&str> for Text {
    fn from(s: &str) -> Self {
        Self(s.into())
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        Self(s.into())
    }
}

impl EncodeLabelValue for Text {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// Label values admitted first come, first served, up to a limit; later
/// values read `other`. First-come keeps every series a true counter (a
/// value never moves between its own series and `other`).
#[derive(Debug)]
pub struct Bounded {
    limit: usize,
    seen: Mutex<HashSet<Arc<str>>>,
}

impl Bounded {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            seen: Mutex::new(HashSet::new()),
        }
    }

    /// `value` if admitted, else `other`.
    pub fn label(&self, value: &str) -> Text {
        let mut seen = self.seen.lock().expect("label set lock");
        if let Some(v) = seen.get(value) {
            return Text(v.clone());
        }
        if seen.len() < self.limit {
            let v: Arc<str> = value.into();
            seen.insert(v.clone());
            return Text(v);
        }
        Text("other".into())
    }
}

/// Histogram buckets from `lowest` (seconds), each `factor` times the last, `count` of them.
pub fn histogram(lowest: f64, factor: f64, count: u16) -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        lowest, factor, count,
    ))
}

/// One family of values sampled at scrape time, written from a
/// [`prometheus_client::collector::Collector`]: `name` gets the registry's
/// prefix and, for counters, `_total`.
pub struct Sampled<'a, 'e> {
    encoder: &'a mut DescriptorEncoder<'e>,
}

impl<'a, 'e> Sampled<'a, 'e> {
    pub fn new(encoder: &'a mut DescriptorEncoder<'e>) -> Self {
        Self { encoder }
    }

    /// A counter family: one sample per label set.
    pub fn counters<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        samples: impl IntoIterator<Item = (L, u64)>,
    ) -> std::fmt::Result {
        let mut family = self.encoder.encode_descriptor(
            name,
            help,
            unit,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (labels, v) in samples {
            ConstCounter::new(v).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// `build_info{version}` (always 1) and `start_time_seconds`.
    pub fn identity(&mut self, started_unix: f64) -> std::fmt::Result {
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct Version {
            version: &'static str,
        }
        self.gauges(
            "build_info",
            "Always 1; the version is a label.",
            None,
            [(
                Version {
                    version: env!("CARGO_PKG_VERSION"),
                },
                1i64,
            )],
        )?;
        self.gauge(
            "start_time",
            "Unix time the daemon started.",
            Some(&Unit::Seconds),
            started_unix,
        )
    }

    /// A counter without labels.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> std::fmt::Result {
        let family = self.encoder.encode_descriptor(
            name,
            help,
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        ConstCounter::new(value).encode(family)
    }

    /// A gauge without labels.
    pub fn gauge<V: EncodeGaugeValue>(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        value: V,
    ) -> std::fmt::Result {
        let family = self.encoder.encode_descriptor(
            name,
            help,
            unit,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        ConstGauge::new(value).encode(family)
    }

    /// A gauge family: one sample per label set.
    pub fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        samples: impl IntoIterator<Item = (L, V)>,
    ) -> std::fmt::Result {
        let mut family = self.encoder.encode_descriptor(
            name,
            help,
            unit,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (labels, v) in samples {
            ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::{counter::Counter, family::Family};

    use super::*;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Labels {
        name: Text,
    }

    #[test]
    fn label_values_are_escaped() {
        let mut r = Registry::with_prefix("x");
        let f = Family::<Labels, Counter>::default();
        r.register("things", "Things.", f.clone());
        f.get_or_create(&Labels {
            name: "a\"b\\c\nd".into(),
        })
        .inc_by(3);
        let text = render(&r);
        assert!(
            text.contains("x_things_total{name=\"a\\\"b\\\\c\\nd\"} 3\n"),
            "{text}"
        );
    }

    #[test]
    fn bounded_labels_admit_the_first_values_then_other() {
        let b = Bounded::new(2);
        assert_eq!(&*b.label("a").0, "a");
        assert_eq!(&*b.label("b").0, "b");
        assert_eq!(&*b.label("c").0, "other");
        assert_eq!(&*b.label("a").0, "a", "admitted values stay admitted");
    }
}
