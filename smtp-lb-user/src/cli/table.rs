//! Tables for `ctl` (comfy-table): borderless, numbers right-aligned, and a
//! missing value printed as `-`, never as `null`.
use comfy_table::{CellAlignment, ContentArrangement, Table, presets};
use serde_json::Value;

/// A table with `header`; columns whose name is in `right` are right-aligned.
pub fn new(header: &[&str], right: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.iter().copied());
    for (i, h) in header.iter().enumerate() {
        if right.contains(h)
            && let Some(c) = t.column_mut(i)
        {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

/// A JSON value as a cell: strings unquoted, `null` as `-`, booleans as yes/no.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.to_owned(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Prints `t` without the trailing spaces of its last column.
pub fn print(t: &Table) {
    for line in t.lines() {
        println!("{}", line.trim_end());
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn missing_values_are_dashes_and_columns_align() {
        let mut t = new(&["NAME", "FLOWS"], &["FLOWS"]);
        t.add_row([cell(&json!("relay1")), cell(&json!(12_345))]);
        t.add_row([cell(&json!("r2")), cell(&Value::Null)]);
        let lines: Vec<String> = t.lines().map(|l| l.trim_end().to_owned()).collect();
        assert!(!lines.iter().any(|l| l.contains("null")), "{lines:?}");
        let ends: Vec<usize> = lines.iter().map(String::len).collect();
        assert!(
            ends.windows(2).all(|w| w[0] == w[1]),
            "right-aligned column: {lines:?}"
        );
        assert!(lines[2].ends_with(" -"), "{lines:?}");
    }
}
