//! `herald-loadtest chart`, run as a binary on small summaries written here.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};

/// A directory of its own for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "herald-loadtest-chart-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A lossless `fanout` summary with the fields the chart reads.
fn summary(rate: f64, deliveries_per_sec: f64, [p50, p90, p99]: [f64; 3]) -> Value {
    json!({
        "scenario": "fanout",
        "config": {"rate": rate, "subscribers": 1000},
        "results": {
            "deliveries_per_sec": deliveries_per_sec,
            "missing": 0,
            "latency_ms": {"count": 1000, "p50": p50, "p90": p90, "p99": p99, "p999": p99, "max": p99},
        },
    })
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn chart(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_herald-loadtest"))
        .arg("chart")
        .args(args)
        .output()
        .expect("the tool starts")
}

/// The text of every `<text>` element, trimmed.
fn texts(document: &roxmltree::Document) -> Vec<String> {
    document
        .descendants()
        .filter(|node| node.has_tag_name("text"))
        .filter_map(|node| node.text())
        .map(|text| text.trim().to_owned())
        .collect()
}

#[test]
fn renders_both_servers_percentiles_and_axes() {
    let dir = scratch("render");
    let herald = [(100.0, [2.0, 5.0, 9.0]), (200.0, [3.0, 7.0, 14.0])];
    let floor = [
        (100.0, [1.5, 4.0, 8.0]),
        (200.0, [2.5, 6.0, 12.0]),
        (400.0, [400.0, 900.0, 2000.0]),
    ];
    let files = |server: &str, points: &[(f64, [f64; 3])]| {
        points
            .iter()
            .map(|&(rate, latency)| {
                let mut summary = summary(rate, rate * 1000.0, latency);
                if server == "floor" && rate == 400.0 {
                    // It fell behind: fewer deliveries than asked for, and losses.
                    summary["results"]["deliveries_per_sec"] = json!(150_000.0);
                    summary["results"]["missing"] = json!(5000);
                }
                write(&dir, &format!("{server}-{rate}.json"), &summary.to_string())
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let herald = format!("herald={}", files("herald", &herald));
    let floor = format!("floor={}", files("floor", &floor));
    let out = dir.join("chart.svg");
    let output = chart(&[
        "--series",
        &herald,
        "--series",
        &floor,
        "--title",
        "A test chart",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    // The points come in order of the publish rate, not of deliveries/s.
    assert!(
        stdout.contains(
            "floor: deliveries per second 200000, p50 2.5 ms, p90 6 ms, p99 12 ms, 0 deliveries missing\n\
             floor: deliveries per second 150000, p50 400 ms, p90 900 ms, p99 2000 ms, 5000 deliveries missing\n"
        ),
        "{stdout}"
    );

    let svg = std::fs::read_to_string(&out).unwrap();
    let document = roxmltree::Document::parse(&svg).expect("well-formed XML");
    let root = document.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    assert_eq!(
        root.tag_name().namespace(),
        Some("http://www.w3.org/2000/svg")
    );
    let texts = texts(&document);
    for expected in [
        "A test chart",
        "deliveries per second",
        "latency (ms, log scale)",
        "herald p50",
        "herald p90",
        "herald p99",
        "floor p50",
        "floor p90",
        "floor p99",
        "hollow: messages lost",
        "200k",
        "1000",
    ] {
        assert!(
            texts.iter().any(|text| text == expected),
            "no {expected:?} in {texts:?}"
        );
    }
    // A marker per percentile at each of the five points, hollow for the
    // lossy one, and a hollow one in the legend.
    let markers: Vec<_> = document
        .descendants()
        .filter(|node| node.has_tag_name("circle"))
        .collect();
    assert_eq!(markers.len(), 5 * 3 + 1);
    let hollow = markers
        .iter()
        .filter(|node| node.attribute("fill") == Some("none"))
        .count();
    assert_eq!(hollow, 3 + 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_x_axis_may_be_the_publish_rate() {
    let dir = scratch("publishes");
    let file = write(
        &dir,
        "a.json",
        &summary(3.0, 29_900.0, [40.0, 80.0, 100.0]).to_string(),
    );
    let out = dir.join("chart.svg");
    let series = format!("herald={file}");
    let output = chart(&[
        "--series",
        &series,
        "--x",
        "publishes",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{output:?}");
    let svg = std::fs::read_to_string(&out).unwrap();
    let texts = texts(&roxmltree::Document::parse(&svg).unwrap());
    assert!(
        texts.iter().any(|text| text == "publishes per second"),
        "{texts:?}"
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("publishes per second 3,"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs the chart on one bad file and checks that it fails, writes nothing,
/// and says which file and what is wrong.
fn check_refused(name: &str, text: &str, expected: &str) {
    let dir = scratch(name);
    let good = write(
        &dir,
        "good.json",
        &summary(1.0, 1000.0, [1.0, 2.0, 3.0]).to_string(),
    );
    let bad = write(&dir, "bad.json", text);
    let out = dir.join("chart.svg");
    let series = format!("herald={good},{bad}");
    let output = chart(&["--series", &series, "--out", out.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{name}: {output:?}");
    assert!(
        stderr.contains(&bad),
        "{name}: the file is not named: {stderr}"
    );
    assert!(stderr.contains(expected), "{name}: {stderr}");
    assert!(!out.exists(), "{name}: a chart was written");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_summaries_are_refused_by_name() {
    check_refused(
        "malformed",
        r#"{"scenario": "fanout", "results": "#,
        "is not a JSON summary",
    );
    let mut missing = summary(1.0, 1000.0, [1.0, 2.0, 3.0]);
    missing["results"]["latency_ms"]
        .as_object_mut()
        .unwrap()
        .remove("p99");
    check_refused(
        "missing",
        &missing.to_string(),
        "no number at results.latency_ms.p99",
    );
    let mut connect = summary(1.0, 1000.0, [1.0, 2.0, 3.0]);
    connect["scenario"] = json!("connect");
    check_refused("scenario", &connect.to_string(), r#"a "connect" summary"#);
}
