//! A benchmark's result: named numbers in the order they were measured.

/// Flat, ordered `name → value` pairs, with a unit for the table.
#[derive(Debug, Default)]
pub struct Report {
    rows: Vec<(String, f64, &'static str)>,
}

impl Report {
    /// Adds one figure. `unit` is only for the printed table ("ns", "×", "msg/s").
    pub fn add(&mut self, key: &str, value: f64, unit: &'static str) -> &mut Self {
        self.rows.push((key.to_owned(), value, unit));
        self
    }

    pub fn print(&self, name: &str) {
        println!("bench {name}");
        let width = self.rows.iter().map(|(k, ..)| k.len()).max().unwrap_or(0);
        for (key, value, unit) in &self.rows {
            println!("  {key:<width$}  {value:>14.3} {unit}");
        }
    }

    pub fn to_json(&self) -> String {
        let map: serde_json::Map<String, serde_json::Value> = self
            .rows
            .iter()
            .map(|(k, v, _)| {
                (
                    k.clone(),
                    serde_json::Number::from_f64(*v).map_or(serde_json::Value::Null, Into::into),
                )
            })
            .collect();
        serde_json::to_string_pretty(&serde_json::Value::Object(map)).expect("numbers serialize")
            + "\n"
    }
}

/// The median of `values` (the mean of the middle two for an even count):
/// the figure of interleaved rounds that one noisy round cannot move.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        f64::midpoint(v[mid - 1], v[mid])
    } else {
        v[mid]
    }
}
