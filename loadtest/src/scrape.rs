//! Reading the gateways' Prometheus metrics (`--metrics-url`) and checking
//! expectations on them (`--expect-metric`).
//!
//! The tool scrapes every URL before and after the part of a run that
//! matters, and reports the series that changed. An expectation compares
//! either a metric's value in the last scrape (summed over every URL and
//! every series whose labels match), or its increase between the two
//! scrapes: `herald_connections_open==0`,
//! `increase(herald_broker_reconnects_total)>=1`,
//! `increase(herald_disconnects_total{reason="shutdown"})==1000`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::http::Uri;

/// How long one scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest response read.
const MAX_RESPONSE_BYTES: usize = 8 << 20;

/// One scrape of one URL: every sample, keyed by `name{labels}` as written.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    series: BTreeMap<String, f64>,
}

impl Samples {
    /// Parses the Prometheus text format; comments and unparsable lines are skipped.
    pub fn parse(text: &str) -> Samples {
        let mut series = BTreeMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // The value follows the last space outside the labels; a
            // timestamp, if any, follows the value.
            let key_end = match line.find('}') {
                Some(close) => close + 1,
                None => line.find(' ').unwrap_or(line.len()),
            };
            let (key, rest) = line.split_at(key_end);
            let Some(value) = rest.split_whitespace().next() else {
                continue;
            };
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                other => match other.parse() {
                    Ok(value) => value,
                    Err(_) => continue,
                },
            };
            series.insert(key.trim().to_owned(), value);
        }
        Samples { series }
    }

    /// The sum of every series of `name` whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(String, String)]) -> f64 {
        self.series
            .iter()
            .filter(|(key, _)| {
                let (series_name, series_labels) = split_key(key);
                series_name == name
                    && labels.iter().all(|(label, value)| {
                        series_labels.iter().any(|(l, v)| l == label && v == value)
                    })
            })
            .map(|(_, value)| value)
            .sum::<f64>()
            + 0.0
    }
}

/// `name{a="1",b="2"}` into the name and its label pairs.
fn split_key(key: &str) -> (&str, Vec<(String, String)>) {
    let Some(open) = key.find('{') else {
        return (key, Vec::new());
    };
    let name = &key[..open];
    let inner = key[open + 1..].trim_end_matches('}');
    (name, parse_labels(inner))
}

/// `a="1",b="2"` into pairs. Label values here never contain `",`, which
/// keeps this simple.
fn parse_labels(inner: &str) -> Vec<(String, String)> {
    inner
        .split("\",")
        .filter_map(|pair| {
            let (label, value) = pair.split_once('=')?;
            Some((
                label.trim().to_owned(),
                value.trim().trim_matches('"').to_owned(),
            ))
        })
        .collect()
}

/// GETs `url` (plain `http://`) and parses the body.
pub async fn scrape(url: &str) -> anyhow::Result<Samples> {
    tokio::time::timeout(SCRAPE_TIMEOUT, scrape_once(url))
        .await
        .with_context(|| format!("scraping {url} timed out"))?
}

async fn scrape_once(url: &str) -> anyhow::Result<Samples> {
    let uri: Uri = url
        .parse()
        .with_context(|| format!("invalid URL {url:?}"))?;
    if uri.scheme_str() != Some("http") {
        bail!("{url:?}: only http:// metrics URLs are supported");
    }
    let host = uri.host().context("the metrics URL has no host")?;
    let port = uri.port_u16().unwrap_or(80);
    let path = uri
        .path_and_query()
        .map_or("/metrics", |path| path.as_str());
    let mut stream = TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        uri.authority().map_or(host, |authority| authority.as_str())
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    (&mut stream)
        .take(MAX_RESPONSE_BYTES as u64)
        .read_to_end(&mut response)
        .await
        .with_context(|| format!("reading {url}"))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{url}: no HTTP response"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("{url} answered {}", head.lines().next().unwrap_or_default());
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        bail!("{url}: chunked responses are not supported");
    }
    Ok(Samples::parse(body))
}

/// A comparison `--expect-metric` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Comparison {
    #[serde(rename = ">=")]
    AtLeast,
    #[serde(rename = "<=")]
    AtMost,
    #[serde(rename = "==")]
    Equal,
    #[serde(rename = ">")]
    Above,
    #[serde(rename = "<")]
    Below,
}

impl Comparison {
    fn symbol(self) -> &'static str {
        match self {
            Comparison::AtLeast => ">=",
            Comparison::AtMost => "<=",
            Comparison::Equal => "==",
            Comparison::Above => ">",
            Comparison::Below => "<",
        }
    }

    fn holds(self, actual: f64, expected: f64) -> bool {
        match self {
            Comparison::AtLeast => actual >= expected,
            Comparison::AtMost => actual <= expected,
            Comparison::Equal => (actual - expected).abs() < 1e-9,
            Comparison::Above => actual > expected,
            Comparison::Below => actual < expected,
        }
    }
}

/// `[increase(]NAME[{label="value",...}][)] OP NUMBER`.
#[derive(Debug, Clone, PartialEq)]
pub struct Expectation {
    /// Compare the increase between the two scrapes, not the last value.
    pub increase: bool,
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub comparison: Comparison,
    pub value: f64,
}

impl FromStr for Expectation {
    type Err = String;

    fn from_str(text: &str) -> Result<Expectation, String> {
        let text = text.trim();
        // The operator follows the labels and the closing parenthesis, whose
        // values may hold `=` themselves.
        let search_from = text.rfind(['}', ')']).map_or(0, |end| end + 1);
        let position = text[search_from..]
            .find(['<', '>', '='])
            .map(|position| search_from + position)
            .ok_or_else(|| format!("{text:?}: expected NAME OP NUMBER, e.g. x_total>=1"))?;
        let (left, right) = text.split_at(position);
        let (comparison, number) = [
            (">=", Comparison::AtLeast),
            ("<=", Comparison::AtMost),
            ("==", Comparison::Equal),
            (">", Comparison::Above),
            ("<", Comparison::Below),
        ]
        .into_iter()
        .find_map(|(symbol, comparison)| {
            right
                .strip_prefix(symbol)
                .map(|number| (comparison, number))
        })
        .ok_or_else(|| format!("{text:?}: the operator must be >=, <=, ==, > or <"))?;
        let value: f64 = number
            .trim()
            .parse()
            .map_err(|_| format!("{text:?}: {number:?} is not a number"))?;
        let left = left.trim();
        let (increase, metric) = match left.strip_prefix("increase(") {
            Some(inner) => (
                true,
                inner
                    .strip_suffix(')')
                    .ok_or_else(|| format!("{text:?}: unclosed increase("))?,
            ),
            None => (false, left),
        };
        let (name, labels) = split_key(metric);
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return Err(format!("{text:?}: {name:?} is not a metric name"));
        }
        Ok(Expectation {
            increase,
            name: name.to_owned(),
            labels,
            comparison,
            value,
        })
    }
}

impl fmt::Display for Expectation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let labels = if self.labels.is_empty() {
            String::new()
        } else {
            let pairs: Vec<String> = self
                .labels
                .iter()
                .map(|(label, value)| format!("{label}=\"{value}\""))
                .collect();
            format!("{{{}}}", pairs.join(","))
        };
        let metric = format!("{}{labels}", self.name);
        if self.increase {
            write!(f, "increase({metric})")?;
        } else {
            f.write_str(&metric)?;
        }
        write!(f, "{}{}", self.comparison.symbol(), self.value)
    }
}

impl Serialize for Expectation {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl Expectation {
    /// The value compared: summed over every scrape in `after`, minus the
    /// same in `before` for an increase. `None` when a needed scrape failed.
    pub fn actual(&self, before: &[Option<Samples>], after: &[Option<Samples>]) -> Option<f64> {
        let total = |scrapes: &[Option<Samples>]| -> Option<f64> {
            scrapes
                .iter()
                .map(|samples| {
                    samples
                        .as_ref()
                        .map(|samples| samples.sum(&self.name, &self.labels))
                })
                .sum()
        };
        let last = total(after)?;
        if self.increase {
            Some(last - total(before)?)
        } else {
            Some(last)
        }
    }

    pub fn holds(&self, actual: f64) -> bool {
        self.comparison.holds(actual, self.value)
    }
}

/// Scrapes of every `--metrics-url` at two moments, and what changed.
#[derive(Debug, Default)]
pub struct Watch {
    urls: Vec<String>,
    before: Vec<Option<Samples>>,
    after: Vec<Option<Samples>>,
    errors: Vec<String>,
}

/// What the report shows of the scrapes.
#[derive(Debug, Serialize)]
pub struct MetricsReport {
    /// Per URL: the `herald_*` series that changed between the scrapes
    /// (histogram buckets left out), as `[before, after]`.
    pub changed: BTreeMap<String, BTreeMap<String, [f64; 2]>>,
    /// Scrapes that failed.
    pub errors: Vec<String>,
}

/// One `--expect-metric` and how it came out.
#[derive(Debug, Serialize)]
pub struct ExpectationOutcome {
    pub expectation: Expectation,
    pub actual: Option<f64>,
    pub passed: bool,
}

impl Watch {
    pub fn new(urls: &[String]) -> Watch {
        Watch {
            urls: urls.to_vec(),
            ..Watch::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        self.urls.is_empty()
    }

    async fn scrape_all(&mut self) -> Vec<Option<Samples>> {
        let mut scrapes = Vec::with_capacity(self.urls.len());
        for url in &self.urls {
            match scrape(url).await {
                Ok(samples) => scrapes.push(Some(samples)),
                Err(error) => {
                    self.errors.push(format!("{error:#}"));
                    scrapes.push(None);
                }
            }
        }
        scrapes
    }

    /// The first scrape.
    pub async fn before(&mut self) {
        self.before = self.scrape_all().await;
    }

    /// The second scrape; may be taken again (the last one counts).
    pub async fn after(&mut self) {
        self.after = self.scrape_all().await;
    }

    /// The sum of `name` over the latest scrape of every URL, if all succeeded.
    pub fn latest(&self, name: &str) -> Option<f64> {
        let scrapes = if self.after.is_empty() {
            &self.before
        } else {
            &self.after
        };
        let total: Option<f64> = scrapes
            .iter()
            .map(|samples| samples.as_ref().map(|samples| samples.sum(name, &[])))
            .sum();
        // A float sum starts at -0.0.
        total.map(|total| total + 0.0)
    }

    pub fn check(&self, expectations: &[Expectation]) -> Vec<ExpectationOutcome> {
        expectations
            .iter()
            .map(|expectation| {
                let actual = expectation.actual(&self.before, &self.after);
                ExpectationOutcome {
                    expectation: expectation.clone(),
                    actual,
                    passed: actual.is_some_and(|actual| expectation.holds(actual)),
                }
            })
            .collect()
    }

    pub fn report(&self) -> MetricsReport {
        let mut changed = BTreeMap::new();
        for (index, url) in self.urls.iter().enumerate() {
            let (Some(Some(before)), Some(Some(after))) =
                (self.before.get(index), self.after.get(index))
            else {
                continue;
            };
            let mut series = BTreeMap::new();
            for (key, &value) in &after.series {
                if !key.starts_with("herald_") || split_key(key).0.ends_with("_bucket") {
                    continue;
                }
                let old = before.series.get(key).copied().unwrap_or(0.0);
                if old != value {
                    series.insert(key.clone(), [old, value]);
                }
            }
            changed.insert(url.clone(), series);
        }
        MetricsReport {
            changed,
            errors: self.errors.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP herald_connections_open Open.\n\
        # TYPE herald_connections_open gauge\n\
        herald_connections_open{node=\"a\"} 3\n\
        herald_disconnects_total{node=\"a\",reason=\"shutdown\"} 7\n\
        herald_disconnects_total{node=\"a\",reason=\"client_closed\"} 2\n\
        herald_broker_roundtrip_seconds_bucket{node=\"a\",le=\"+Inf\"} 4\n\
        plain_metric 1.5 1700000000\n";

    #[test]
    fn samples_are_summed_over_matching_labels() {
        let samples = Samples::parse(TEXT);
        assert_eq!(samples.sum("herald_connections_open", &[]), 3.0);
        assert_eq!(samples.sum("herald_disconnects_total", &[]), 9.0);
        let shutdown = [("reason".to_owned(), "shutdown".to_owned())];
        assert_eq!(samples.sum("herald_disconnects_total", &shutdown), 7.0);
        assert_eq!(samples.sum("plain_metric", &[]), 1.5);
        assert_eq!(samples.sum("missing", &[]), 0.0);
    }

    fn check(text: &str, expected: Result<&str, ()>) {
        let parsed = text.parse::<Expectation>();
        match expected {
            Ok(display) => assert_eq!(parsed.unwrap().to_string(), display, "{text}"),
            Err(()) => assert!(parsed.is_err(), "{text} parsed"),
        }
    }

    #[test]
    fn expectations_parse_and_print() {
        check(
            "herald_connections_open==0",
            Ok("herald_connections_open==0"),
        );
        check(
            "increase(herald_broker_reconnects_total) >= 14",
            Ok("increase(herald_broker_reconnects_total)>=14"),
        );
        check(
            r#"increase(herald_disconnects_total{reason="shutdown"})==1000"#,
            Ok(r#"increase(herald_disconnects_total{reason="shutdown"})==1000"#),
        );
        check("x<2.5", Ok("x<2.5"));
        check("x", Err(()));
        check("x>=y", Err(()));
        check("increase(x>=1", Err(()));
        check("bad name>=1", Err(()));
    }

    #[test]
    fn expectations_compare_increases_and_values() {
        let before = vec![Some(Samples::parse(TEXT))];
        let after = vec![Some(Samples::parse(
            &TEXT.replace("reason=\"shutdown\"} 7", "reason=\"shutdown\"} 1007"),
        ))];
        let shutdowns: Expectation =
            r#"increase(herald_disconnects_total{reason="shutdown"})==1000"#
                .parse()
                .unwrap();
        assert_eq!(shutdowns.actual(&before, &after), Some(1000.0));
        assert!(shutdowns.holds(1000.0));
        let open: Expectation = "herald_connections_open==0".parse().unwrap();
        assert_eq!(open.actual(&before, &after), Some(3.0));
        assert!(!open.holds(3.0));
        assert_eq!(open.actual(&before, &[None]), None);
    }
}
