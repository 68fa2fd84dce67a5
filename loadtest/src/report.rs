//! The end of a run: a human-readable table on stdout and, with `--json`, a
//! summary file `{"scenario": ..., "config": {...}, "results": {...}}`.

use std::path::Path;

use anyhow::Context;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::stats::{LatencySummary, Reasons};

/// What a scenario produced.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// `connect`, `fanout`, `slow` or `storm`.
    pub scenario: &'static str,
    /// The options of the run, secrets left out.
    pub config: Value,
    /// Plain numeric results.
    pub results: Value,
    /// The assertions asked for (`--check`, `--expect-metric` and the
    /// like), each passed or failed; any failure makes the tool exit 1.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<CheckOutcome>,
    /// The same results as labelled rows for the terminal.
    #[serde(skip)]
    pub table: Table,
}

/// One assertion and how it came out.
#[derive(Debug, Clone, Serialize)]
pub struct CheckOutcome {
    pub name: String,
    pub passed: bool,
    /// The figures it was decided on.
    pub detail: String,
}

impl CheckOutcome {
    pub fn new(name: impl Into<String>, passed: bool, detail: impl Into<String>) -> CheckOutcome {
        CheckOutcome {
            name: name.into(),
            passed,
            detail: detail.into(),
        }
    }
}

impl Summary {
    /// Builds a summary; `options` are serializable option structs whose
    /// fields are merged into one `config` object.
    pub fn new(
        scenario: &'static str,
        options: &[Value],
        results: &impl Serialize,
        table: Table,
    ) -> anyhow::Result<Summary> {
        let mut config = Map::new();
        for option in options {
            if let Value::Object(fields) = option {
                config.extend(fields.clone());
            }
        }
        Ok(Summary {
            scenario,
            config: Value::Object(config),
            results: serde_json::to_value(results).context("encoding the results")?,
            checks: Vec::new(),
            table,
        })
    }

    pub fn with_checks(mut self, checks: Vec<CheckOutcome>) -> Summary {
        self.checks = checks;
        self
    }

    /// The names of the checks that failed.
    pub fn failed_checks(&self) -> Vec<&str> {
        self.checks
            .iter()
            .filter(|check| !check.passed)
            .map(|check| check.name.as_str())
            .collect()
    }

    /// Prints the table and writes the JSON file, if one was asked for.
    pub fn emit(&self, json: Option<&Path>) -> anyhow::Result<()> {
        let mut table = self.table.render(self.scenario);
        if !self.checks.is_empty() {
            table.push_str("-- checks\n");
            for check in &self.checks {
                let verdict = if check.passed { "PASS" } else { "FAIL" };
                table.push_str(&format!("{verdict}  {}: {}\n", check.name, check.detail));
            }
        }
        println!("{table}");
        if let Some(path) = json {
            let text = serde_json::to_string_pretty(self).context("encoding the summary")?;
            std::fs::write(path, text + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}

/// Labelled rows, printed as two aligned columns.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<(String, String)>,
}

impl Table {
    pub fn row(&mut self, label: &str, value: impl ToString) -> &mut Table {
        self.rows.push((label.to_owned(), value.to_string()));
        self
    }

    /// A section heading.
    pub fn section(&mut self, title: &str) -> &mut Table {
        self.rows.push((format!("-- {title}"), String::new()));
        self
    }

    pub fn latency(&mut self, label: &str, latency: &LatencySummary) -> &mut Table {
        self.row(
            label,
            format!(
                "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  (n={})",
                latency.p50, latency.p90, latency.p99, latency.p999, latency.max, latency.count
            ),
        )
    }

    pub fn reasons(&mut self, label: &str, reasons: &Reasons) -> &mut Table {
        self.row(
            label,
            format!("{} ({})", reasons.total(), reasons.describe()),
        )
    }

    fn render(&self, scenario: &str) -> String {
        let width = self
            .rows
            .iter()
            .filter(|(_, value)| !value.is_empty())
            .map(|(label, _)| label.chars().count())
            .max()
            .unwrap_or(0);
        let mut out = format!("== herald-loadtest {scenario} ==\n");
        for (label, value) in &self.rows {
            if value.is_empty() {
                out.push_str(label);
            } else {
                out.push_str(&format!("{label:<width$}  {value}"));
            }
            out.push('\n');
        }
        out
    }
}

/// Rounds to three decimals for friendlier JSON.
pub fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_their_values() {
        let mut table = Table::default();
        table.row("a", 1).section("more").row("longer", "x");
        assert_eq!(
            table.render("demo"),
            "== herald-loadtest demo ==\na       1\n-- more\nlonger  x\n"
        );
    }

    #[test]
    fn summaries_merge_their_options() {
        let summary = Summary::new(
            "demo",
            &[serde_json::json!({"a": 1}), serde_json::json!({"b": "x"})],
            &serde_json::json!({"n": 2}),
            Table::default(),
        )
        .unwrap();
        let text = serde_json::to_value(&summary).unwrap();
        assert_eq!(
            text,
            serde_json::json!({"scenario": "demo", "config": {"a": 1, "b": "x"}, "results": {"n": 2}})
        );
        let checked = summary.with_checks(vec![
            CheckOutcome::new("good", true, "1 == 1"),
            CheckOutcome::new("bad", false, "1 != 2"),
        ]);
        assert_eq!(checked.failed_checks(), ["bad"]);
        let text = serde_json::to_value(&checked).unwrap();
        assert_eq!(text["checks"][1]["passed"], false);
    }
}
