//! `chart`: `fanout` and `slow` JSON summaries drawn as an SVG chart of p50,
//! p90 and p99 latency against the delivery rate, one colour per server and
//! one line style per percentile. Each summary file is one point; a
//! server's points are joined in the order of the publish rate asked for,
//! so a server that delivers less when asked for more is seen turning back.
//! The latency axis is logarithmic: the same ratio between two servers is
//! the same distance at 5 ms and at 5 s, and a collapse stays on the chart.
//! A hollow marker is a run that lost messages.
//!
//! Text is written as SVG `<text>` elements laid out by plotters' estimate,
//! so no font is read and no C library is needed; the viewer draws the text
//! in its own sans-serif.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context, bail};
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use serde_json::Value;

use crate::cli::{ChartArgs, ChartX};

/// The size of the chart in SVG user units (pixels).
const SIZE: (u32, u32) = (900, 560);

/// One colour per server, in the order of `--series`.
const COLOURS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(230, 110, 10),
    RGBColor(44, 160, 44),
    RGBColor(200, 40, 40),
];

/// The percentiles drawn, with their field in `results.latency_ms` and their
/// line style: solid, dashed, dotted.
const PERCENTILES: [Percentile; 3] = [
    Percentile {
        name: "p50",
        dash: None,
    },
    Percentile {
        name: "p90",
        dash: Some((10, 5)),
    },
    Percentile {
        name: "p99",
        dash: Some((2, 4)),
    },
];

/// Reads the summaries, writes the chart to `--out`, and prints the points
/// it drew.
pub fn run(args: &ChartArgs) -> anyhow::Result<()> {
    let mut names = HashSet::new();
    let mut series = Vec::new();
    for files in &args.series {
        if !names.insert(files.name.as_str()) {
            bail!("--series {}: the name is given twice", files.name);
        }
        let mut points = files
            .files
            .iter()
            .map(|path| load_point(path, args.x))
            .collect::<anyhow::Result<Vec<Point>>>()?;
        points.sort_by(|a, b| a.rate.total_cmp(&b.rate).then(a.x.total_cmp(&b.x)));
        series.push(Series {
            name: files.name.clone(),
            points,
        });
    }
    let title = args
        .title
        .clone()
        .unwrap_or_else(|| format!("Delivery latency against {}", axis_label(args.x)));
    let svg = render(&series, args.x, &title)?;
    std::fs::write(&args.out, svg).with_context(|| format!("writing {}", args.out.display()))?;
    for series in &series {
        for point in &series.points {
            println!(
                "{}: {} {}, p50 {} ms, p90 {} ms, p99 {} ms, {} deliveries missing",
                series.name,
                axis_label(args.x),
                point.x,
                point.latency_ms[0],
                point.latency_ms[1],
                point.latency_ms[2],
                point.missing
            );
        }
    }
    println!("wrote {}", args.out.display());
    Ok(())
}

/// One summary: its x value and its latency at each of [`PERCENTILES`].
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Publishes per second asked for (`config.rate`): the order of the points.
    pub rate: f64,
    pub x: f64,
    pub latency_ms: [f64; 3],
    /// Deliveries that never arrived (`results.missing`).
    pub missing: f64,
}

/// One server's points, in order of the publish rate.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<Point>,
}

/// Reads one summary written by `--json`; errors name the file and the field.
pub fn load_point(path: &Path, x: ChartX) -> anyhow::Result<Point> {
    let file = path.display();
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {file}"))?;
    let summary: Value =
        serde_json::from_str(&text).with_context(|| format!("{file} is not a JSON summary"))?;
    let scenario = summary["scenario"].as_str().unwrap_or("unknown");
    if scenario != "fanout" && scenario != "slow" {
        bail!("{file}: a {scenario:?} summary; charts are drawn from fanout or slow summaries");
    }
    let number = |pointer: &str| {
        summary
            .pointer(pointer)
            .and_then(Value::as_f64)
            .with_context(|| format!("{file}: no number at {}", &pointer[1..].replace('/', ".")))
    };
    let rate = number("/config/rate")?;
    let x = match x {
        ChartX::Deliveries => number("/results/deliveries_per_sec")?,
        ChartX::Publishes => rate,
    };
    let mut latency_ms = [0.0; 3];
    for (value, percentile) in latency_ms.iter_mut().zip(PERCENTILES) {
        *value = number(&format!("/results/latency_ms/{}", percentile.name))?;
    }
    Ok(Point {
        rate,
        x,
        latency_ms,
        missing: number("/results/missing")?,
    })
}

/// Draws the chart and returns the SVG document.
pub fn render(series: &[Series], x: ChartX, title: &str) -> anyhow::Result<String> {
    let points = || series.iter().flat_map(|series| &series.points);
    if points().next().is_none() {
        bail!("nothing to draw: no summaries");
    }
    let x_max = points().map(|point| point.x).fold(0.0, f64::max);
    let latencies = || points().flat_map(|point| point.latency_ms);
    // Below 1 µs a latency is off the chart rather than at minus infinity.
    let y_min = latencies().fold(f64::INFINITY, f64::min).max(0.001);
    let y_max = latencies().fold(0.0, f64::max).max(y_min);
    let lost = points().any(|point| point.missing > 0.0);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        let ranges = (x_max * 1.05, (y_min / 1.5, y_max * 1.5));
        draw(&root, series, x, title, ranges, lost)
            .map_err(|error| anyhow::anyhow!("drawing the chart: {error}"))?;
        root.present()
            .map_err(|error| anyhow::anyhow!("drawing the chart: {error}"))?;
    }
    Ok(svg)
}

/// A percentile's name (its field in `results.latency_ms`) and its dash
/// (length and gap, in pixels), or `None` for a solid line.
#[derive(Debug, Clone, Copy)]
struct Percentile {
    name: &'static str,
    dash: Option<(u32, u32)>,
}

type DrawResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;

fn draw(
    root: &DrawingArea<SVGBackend, Shift>,
    series: &[Series],
    x: ChartX,
    title: &str,
    (x_max, (y_min, y_max)): (f64, (f64, f64)),
    lost: bool,
) -> DrawResult {
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, (y_min..y_max).log_scale())?;
    chart
        .configure_mesh()
        .x_desc(axis_label(x))
        .y_desc("latency (ms, log scale)")
        .x_label_formatter(&|value| thousands(*value))
        .y_label_formatter(&|value| format!("{value}"))
        .axis_desc_style(("sans-serif", 16))
        .label_style(("sans-serif", 13))
        .light_line_style(RGBColor(240, 240, 240))
        .max_light_lines(4)
        .draw()?;
    for (series, colour) in series.iter().zip(COLOURS.iter().cycle()) {
        let colour = *colour;
        for (index, percentile) in PERCENTILES.iter().enumerate() {
            let line: Vec<(f64, f64)> = series
                .points
                .iter()
                .map(|point| (point.x, point.latency_ms[index]))
                .collect();
            let style = colour.stroke_width(2);
            let label = format!("{} {}", series.name, percentile.name);
            // The legend's sample is 24 pixels of the same line.
            match percentile.dash {
                None => {
                    chart
                        .draw_series(LineSeries::new(line.clone(), style))?
                        .label(label)
                        .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], style));
                }
                Some((dash, gap)) => {
                    chart
                        .draw_series(DashedLineSeries::new(line.clone(), dash, gap, style))?
                        .label(label)
                        .legend(move |(x, y)| {
                            DashedPathElement::new([(x, y), (x + 24, y)], dash, gap, style)
                        });
                }
            }
            chart.draw_series(line.iter().zip(&series.points).map(|(&at, point)| {
                let marker = if point.missing > 0.0 {
                    colour.stroke_width(2)
                } else {
                    colour.filled()
                };
                Circle::new(at, 4, marker)
            }))?;
        }
    }
    if lost {
        chart
            .draw_series(std::iter::empty::<Circle<(f64, f64), u32>>())?
            .label("hollow: messages lost")
            .legend(|(x, y)| Circle::new((x + 12, y), 4, BLACK.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(180, 180, 180))
        .draw()?;
    Ok(())
}

fn axis_label(x: ChartX) -> &'static str {
    match x {
        ChartX::Deliveries => "deliveries per second",
        ChartX::Publishes => "publishes per second",
    }
}

/// `250000` as `250k`; small values as they are.
fn thousands(value: f64) -> String {
    if value.abs() >= 1000.0 {
        format!("{}k", (value / 100.0).round() / 10.0)
    } else {
        format!("{}", (value * 100.0).round() / 100.0)
    }
}
