//! `drain`: the reconnect rate other gateways see while one drains.
//!
//! Connections are opened to the gateways of `--url` (normally the one to
//! stop), and the gateway `--signal-pid` gets a SIGTERM once all are up.
//! Each connection that the gateway closes (or drops) reconnects at once to
//! one of `--reconnect-url`, retrying with backoff, as a client library would.
//! The tool records when every reconnect attempt started, which is when the
//! other gateways see it arrive, and reports the arrivals per second and per
//! 100 ms against their mean: a paced drain (`shutdown.drain_period`) gives
//! a steady trickle, a drain period of zero a storm.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cli::{DrainArgs, GlobalArgs};
use crate::client::{ClientSpec, Connector, Failure, close, idle_until, unix_nanos};
use crate::fault::{FaultPlan, SignalRun};
use crate::group::{
    Command, Control, Counters, EstablishStats, Outcome, Plan as GroupPlan, Published, Report,
    Slice, instant_at, ramp_slot,
};
use crate::proc::{Gateway, Usage};
use crate::report::{CheckOutcome, Summary, Table, round3};
use crate::scenario::connect::{channel_count, channels_for};
use crate::scenario::storm::backoff;
use crate::scenario::{group_specs, metric_checks, options, positive_rate, ramp_start};
use crate::scrape::Watch;
use crate::stats::{LatencySummary, Micros, Reasons};
use crate::worker::Fleet;

/// The windows the arrivals are counted in.
const WINDOWS: [(&str, Duration); 3] = [
    ("100ms", Duration::from_millis(100)),
    ("200ms", Duration::from_millis(200)),
    ("1s", Duration::from_secs(1)),
];

/// What each client group does in `drain`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub connections: u64,
    pub channels_per_conn: usize,
    pub channel_count: usize,
    pub connect_rate: f64,
    /// Where closed connections reconnect: connection `i` uses `i mod n`.
    pub reconnect_urls: Vec<String>,
    pub attempts: u32,
    /// When connection 0 starts, in unix nanoseconds.
    pub start_at_unix_nanos: i64,
}

/// A group's result.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct GroupReport {
    pub establish: EstablishStats,
    /// How the first connections ended: `closed 1001`, `eof without close`...
    pub ends: Reasons,
    /// When each first connection ended, in unix nanoseconds.
    pub ended_at: Vec<i64>,
    /// Every reconnect attempt: when it started (unix nanoseconds) and the
    /// index of the reconnect URL it went to.
    pub arrivals: Vec<(i64, u32)>,
    pub reconnected: u64,
    pub reconnect_failures: Reasons,
    /// From the end of the first connection to resubscribed on another gateway.
    pub time_to_resubscribe: Micros,
}

/// From a connection task to its group.
enum Event {
    Established(Outcome),
    /// The first connection ended (why, when), and the reconnection's fate.
    Moved {
        end: Failure,
        ended_at: i64,
        arrivals: Vec<(i64, u32)>,
        reconnected: Result<Duration, Failure>,
    },
    /// The first connection ended when the group was stopped, or was lost
    /// before it could be counted: nothing to wait for.
    Unmoved,
}

/// Parent side.
pub async fn run(global: &GlobalArgs, args: &DrainArgs) -> anyhow::Result<Summary> {
    positive_rate("--connect-rate", args.connect_rate)?;
    if args.attempts == 0 {
        bail!("--attempts must be at least 1");
    }
    let plan = Plan {
        connections: args.connections as u64,
        channels_per_conn: args.channels_per_conn,
        channel_count: channel_count(args.channels_per_conn, args.channel_count)?,
        connect_rate: args.connect_rate,
        reconnect_urls: args.reconnect_urls.clone(),
        attempts: args.attempts,
        start_at_unix_nanos: ramp_start(global),
    };
    let gateway = Gateway::new(&global.pids);
    let mut watch = Watch::new(&args.metrics.metrics_urls);
    let mut fleet = Fleet::start(group_specs(global, GroupPlan::Drain(plan.clone()))?)?;
    fleet.ready().await?;
    let before = gateway.sample()?;
    watch.before().await;
    let signalled_at = unix_nanos();
    let signal = crate::fault::start(
        &FaultPlan {
            sigterm_at: Some(Duration::ZERO),
            pids: vec![args.signal_pid],
            ..FaultPlan::default()
        },
        Instant::now(),
        Duration::ZERO,
    )
    .await?;
    fleet.ready().await?;
    let settled = gateway.sample().unwrap_or(None);
    let log = signal.finish().await?;
    if !watch.is_empty() {
        watch.after().await;
    }
    let reports = fleet.finish(Command::Finish(Published::default())).await?;
    let mut total = GroupReport::default();
    for report in reports {
        match report {
            Report::Drain(group) => {
                total.establish.merge(&group.establish);
                total.ends.merge(&group.ends);
                total.ended_at.extend(group.ended_at);
                total.arrivals.extend(group.arrivals);
                total.reconnected += group.reconnected;
                total.reconnect_failures.merge(&group.reconnect_failures);
                total.time_to_resubscribe.merge(&group.time_to_resubscribe);
            }
            other => bail!("a group answered with the wrong report: {other:?}"),
        }
    }
    let results = Results::new(
        &plan,
        &total,
        signalled_at,
        log.signals.first().cloned(),
        before.zip(settled).map(|(a, b)| Usage::between(a, b)),
        (!watch.is_empty()).then(|| watch.report()),
    );
    let mut checks = vec![
        CheckOutcome::new(
            "all-connected",
            results.connected == results.connections,
            format!(
                "{} of {} subscribed",
                results.connected, results.connections
            ),
        ),
        CheckOutcome::new(
            "closed-1001",
            results.ends.count("closed 1001") == results.connected,
            format!("ends: {}", results.ends.describe()),
        ),
        CheckOutcome::new(
            "all-reconnected",
            results.reconnected == results.connected,
            format!(
                "{} of {} reconnected; failures: {}",
                results.reconnected,
                results.connected,
                results.reconnect_failures.describe()
            ),
        ),
    ];
    if let Some(limit) = args.exit_within {
        let exited = results
            .signal
            .as_ref()
            .and_then(|signal| signal.exited_after_ms);
        checks.push(CheckOutcome::new(
            "exit-within",
            exited.is_some_and(|ms| ms <= limit.as_secs_f64() * 1000.0),
            format!("exited after {exited:?} ms (limit {limit:?})"),
        ));
    }
    if let Some(ratio) = args.max_window_ratio {
        let window = results.arrivals.windows.get("200ms");
        checks.push(CheckOutcome::new(
            "max-window-ratio",
            window.is_some_and(|window| window.peak_to_mean <= ratio),
            match window {
                Some(window) => format!(
                    "busiest 200 ms window {} arrivals, {:.2}x the mean {:.1} (limit {ratio}x)",
                    window.peak, window.peak_to_mean, window.mean
                ),
                None => "no arrivals".to_owned(),
            },
        ));
    }
    checks.extend(metric_checks(&watch, &args.metrics.expect_metrics));
    let table = results.table();
    Ok(Summary::new("drain", &options(global, args)?, &results, table)?.with_checks(checks))
}

/// Arrivals counted in windows of one size, aligned on the signal.
#[derive(Debug, Clone, Serialize)]
struct WindowCounts {
    /// The most arrivals in one window.
    peak: u64,
    /// Where the busiest window starts, in ms after the signal.
    peak_at_ms: f64,
    /// Arrivals per window on average over the span of the arrivals (at
    /// least one window long).
    mean: f64,
    peak_to_mean: f64,
}

/// The reconnect attempts the other gateways saw.
#[derive(Debug, Default, Serialize)]
struct Arrivals {
    total: u64,
    /// Per reconnect URL.
    per_url: BTreeMap<String, u64>,
    /// From the signal to the first and to the last arrival, in ms.
    first_ms: f64,
    last_ms: f64,
    /// From the first arrival to the last, in ms.
    span_ms: f64,
    /// Arrivals per second over the span (at least one second).
    mean_per_sec: f64,
    /// Keyed `100ms`, `200ms`, `1s`.
    windows: BTreeMap<String, WindowCounts>,
    /// Arrivals in each 100 ms after the signal, up to the last.
    per_100ms: Vec<u64>,
}

impl Arrivals {
    fn new(times: &[i64], urls: &[String], per_url: &[u64], signalled_at: i64) -> Arrivals {
        if times.is_empty() {
            return Arrivals::default();
        }
        let offsets: Vec<i64> = times.iter().map(|&at| (at - signalled_at).max(0)).collect();
        let first = *offsets.iter().min().unwrap_or(&0);
        let last = *offsets.iter().max().unwrap_or(&0);
        let span = (last - first) as f64;
        let total = times.len() as u64;
        let counts = |window: Duration| -> Vec<u64> {
            let width = window.as_nanos() as i64;
            let mut counts = vec![0u64; (last / width + 1) as usize];
            for &offset in &offsets {
                counts[(offset / width) as usize] += 1;
            }
            counts
        };
        let mut windows = BTreeMap::new();
        for (name, window) in WINDOWS {
            let per_window = counts(window);
            let (peak_index, &peak) = per_window
                .iter()
                .enumerate()
                .max_by_key(|(_, count)| **count)
                .unwrap_or((0, &0));
            let width = window.as_nanos() as f64;
            let mean = total as f64 * width / span.max(width);
            windows.insert(
                name.to_owned(),
                WindowCounts {
                    peak,
                    peak_at_ms: round3(peak_index as f64 * width / 1e6),
                    mean: round3(mean),
                    peak_to_mean: round3(peak as f64 / mean),
                },
            );
        }
        Arrivals {
            total,
            per_url: urls.iter().cloned().zip(per_url.iter().copied()).collect(),
            first_ms: round3(first as f64 / 1e6),
            last_ms: round3(last as f64 / 1e6),
            span_ms: round3(span / 1e6),
            mean_per_sec: round3(total as f64 * 1e9 / span.max(1e9)),
            windows,
            per_100ms: counts(Duration::from_millis(100)),
        }
    }
}

/// The `drain` results.
#[derive(Debug, Serialize)]
struct Results {
    connections: u64,
    connected: u64,
    connect_failures: Reasons,
    /// How the connections to the stopped gateway ended.
    ends: Reasons,
    /// From the signal to the first and last end, in ms.
    first_end_ms: f64,
    last_end_ms: f64,
    reconnected: u64,
    reconnect_failures: Reasons,
    /// From a connection's end to resubscribed elsewhere.
    time_to_resubscribe_ms: LatencySummary,
    arrivals: Arrivals,
    /// The SIGTERM and how long the gateway took to exit.
    signal: Option<SignalRun>,
    /// The gateways' usage (--pid) from the signal to the last reconnect.
    gateway: Option<Usage>,
    metrics: Option<crate::scrape::MetricsReport>,
}

impl Results {
    fn new(
        plan: &Plan,
        total: &GroupReport,
        signalled_at: i64,
        signal: Option<SignalRun>,
        gateway: Option<Usage>,
        metrics: Option<crate::scrape::MetricsReport>,
    ) -> Results {
        let times: Vec<i64> = total.arrivals.iter().map(|(at, _)| *at).collect();
        let mut per_url = vec![0u64; plan.reconnect_urls.len()];
        for &(_, url) in &total.arrivals {
            if let Some(count) = per_url.get_mut(url as usize) {
                *count += 1;
            }
        }
        let end_ms = |pick: fn(&[i64]) -> Option<i64>| {
            pick(&total.ended_at).map_or(0.0, |at| round3((at - signalled_at) as f64 / 1e6))
        };
        Results {
            connections: plan.connections,
            connected: total.establish.connected,
            connect_failures: total.establish.failures.clone(),
            ends: total.ends.clone(),
            first_end_ms: end_ms(|ends| ends.iter().copied().min()),
            last_end_ms: end_ms(|ends| ends.iter().copied().max()),
            reconnected: total.reconnected,
            reconnect_failures: total.reconnect_failures.clone(),
            time_to_resubscribe_ms: total.time_to_resubscribe.summary(),
            arrivals: Arrivals::new(&times, &plan.reconnect_urls, &per_url, signalled_at),
            signal,
            gateway,
            metrics,
        }
    }

    fn table(&self) -> Table {
        let mut table = Table::default();
        table
            .row("connections", self.connections)
            .row("connected", self.connected)
            .reasons("connect failures", &self.connect_failures)
            .reasons("ends", &self.ends)
            .row(
                "ends after signal (ms)",
                format!("{:.0} .. {:.0}", self.first_end_ms, self.last_end_ms),
            )
            .row("reconnected", self.reconnected)
            .reasons("reconnect failures", &self.reconnect_failures)
            .latency("time to resubscribe ms", &self.time_to_resubscribe_ms);
        let arrivals = &self.arrivals;
        table
            .section("arrivals at the other gateways")
            .row("total", arrivals.total)
            .row(
                "per gateway",
                arrivals
                    .per_url
                    .iter()
                    .map(|(url, count)| format!("{url}: {count}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            )
            .row(
                "span (ms)",
                format!(
                    "{:.0} .. {:.0} ({:.0})",
                    arrivals.first_ms, arrivals.last_ms, arrivals.span_ms
                ),
            )
            .row("mean per second", arrivals.mean_per_sec);
        for (name, window) in &arrivals.windows {
            table.row(
                &format!("busiest {name}"),
                format!(
                    "{} at {:.0} ms ({:.2}x the mean {:.1})",
                    window.peak, window.peak_at_ms, window.peak_to_mean, window.mean
                ),
            );
        }
        if let Some(signal) = &self.signal {
            table.row(
                "gateway exited after",
                signal
                    .exited_after_ms
                    .map_or("never".to_owned(), |ms| format!("{ms:.0} ms")),
            );
        }
        table
    }
}

/// Client side.
pub async fn run_group(
    plan: Plan,
    slice: Slice,
    connector: Arc<Connector>,
    clients: &ClientSpec,
    mut control: Control,
) -> anyhow::Result<GroupReport> {
    let reconnector = Arc::new(
        Connector::new(&ClientSpec {
            urls: plan.reconnect_urls.clone(),
            ..clients.clone()
        })
        .await?,
    );
    let start = instant_at(plan.start_at_unix_nanos);
    let indices: Vec<u64> = slice.indices(plan.connections).collect();
    let (stop, stopped) = watch::channel(false);
    // Each task sends at most two events.
    let (events, mut received) = mpsc::channel(2 * indices.len().max(1));
    let mut tasks = JoinSet::new();
    for &index in &indices {
        tasks.spawn(connection(
            index,
            ramp_slot(start, index, plan.connect_rate),
            plan.clone(),
            connector.clone(),
            reconnector.clone(),
            events.clone(),
            stopped.clone(),
            control.counters.clone(),
        ));
    }
    drop(events);
    let mut report = GroupReport::default();
    let mut established = 0;
    let mut to_move = 0u64;
    while established < indices.len() {
        let Some(event) = received.recv().await else {
            bail!("connection tasks ended early");
        };
        if let Event::Established(outcome) = &event {
            established += 1;
            to_move += u64::from(outcome.result.is_ok());
        }
        record(event, &mut report);
    }
    control.ready().await?;
    let mut moved = 0u64;
    while moved < to_move {
        let Some(event) = received.recv().await else {
            bail!("connection tasks ended early");
        };
        if matches!(event, Event::Moved { .. } | Event::Unmoved) {
            moved += 1;
        }
        record(event, &mut report);
    }
    control.ready().await?;
    control.finish().await?;
    let _ = stop.send(true);
    while tasks.join_next().await.is_some() {}
    while let Ok(event) = received.try_recv() {
        record(event, &mut report);
    }
    Ok(report)
}

fn record(event: Event, report: &mut GroupReport) {
    match event {
        Event::Established(outcome) => report.establish.record(&outcome),
        Event::Moved {
            end,
            ended_at,
            arrivals,
            reconnected,
        } => {
            report.ends.add(end.reason());
            report.ended_at.push(ended_at);
            report.arrivals.extend(arrivals);
            match reconnected {
                Ok(took) => {
                    report.reconnected += 1;
                    report.time_to_resubscribe.record(took);
                }
                Err(failure) => report.reconnect_failures.add(failure.reason()),
            }
        }
        Event::Unmoved => {}
    }
}

/// One client: connect to the gateway being stopped, wait for it to end the
/// connection, reconnect elsewhere, hold until stopped.
#[allow(clippy::too_many_arguments)]
async fn connection(
    index: u64,
    start_at: Instant,
    plan: Plan,
    connector: Arc<Connector>,
    reconnector: Arc<Connector>,
    events: mpsc::Sender<Event>,
    mut stopped: watch::Receiver<bool>,
    counters: Arc<Counters>,
) {
    tokio::time::sleep_until(start_at).await;
    let channels = channels_for(index, plan.channels_per_conn, plan.channel_count);
    let attempt = connector.open(index, &channels).await;
    let _ = events
        .send(Event::Established(Outcome::of(index, &attempt)))
        .await;
    let Ok(mut session) = attempt.result else {
        counters.error();
        return;
    };
    counters.connection_opened();
    let held = idle_until(&mut session.ws, &mut stopped, |stop| *stop).await;
    counters.connection_closed();
    let end = match held {
        Ok(()) => {
            close(session.ws).await;
            let _ = events.send(Event::Unmoved).await;
            return;
        }
        Err(end) => end,
    };
    let ended_at = unix_nanos();
    let ended = Instant::now();
    drop(session);
    let url = (index % plan.reconnect_urls.len().max(1) as u64) as u32;
    let mut arrivals = Vec::new();
    let mut attempt = 1;
    let reconnected = loop {
        arrivals.push((unix_nanos(), url));
        match reconnector.open(index, &channels).await.result {
            Ok(session) => break Ok(session),
            Err(failure) if attempt >= plan.attempts => break Err(failure),
            Err(_) => {
                tokio::time::sleep(backoff(attempt, index)).await;
                attempt += 1;
            }
        }
    };
    let took = ended.elapsed();
    match reconnected {
        Ok(mut session) => {
            let _ = events
                .send(Event::Moved {
                    end,
                    ended_at,
                    arrivals,
                    reconnected: Ok(took),
                })
                .await;
            counters.connection_opened();
            let _ = idle_until(&mut session.ws, &mut stopped, |stop| *stop).await;
            counters.connection_closed();
            close(session.ws).await;
        }
        Err(failure) => {
            counters.error();
            let _ = events
                .send(Event::Moved {
                    end,
                    ended_at,
                    arrivals,
                    reconnected: Err(failure),
                })
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_are_counted_in_windows_against_their_mean() {
        // 100 arrivals evenly over 1 s after the signal at 0, then 100 more
        // within the next 100 ms: a burst.
        let mut times: Vec<i64> = (0..100).map(|i| i * 10_000_000).collect();
        times.extend((0..100).map(|i| 1_000_000_000 + i * 1_000_000));
        let urls = vec!["b".to_owned(), "c".to_owned()];
        let arrivals = Arrivals::new(&times, &urls, &[150, 50], 0);
        assert_eq!(arrivals.total, 200);
        assert_eq!(arrivals.per_url["b"], 150);
        assert_eq!(arrivals.first_ms, 0.0);
        assert_eq!(arrivals.last_ms, 1099.0);
        let hundred = &arrivals.windows["100ms"];
        assert_eq!(hundred.peak, 100);
        assert_eq!(hundred.peak_at_ms, 1000.0);
        // 200 arrivals over 1.099 s: 18.2 per 100 ms on average.
        assert!((hundred.mean - 18.198).abs() < 0.01, "{hundred:?}");
        assert_eq!(arrivals.per_100ms.len(), 11);
        assert_eq!(arrivals.per_100ms[0], 10);
        assert_eq!(arrivals.per_100ms[10], 100);
        let second = &arrivals.windows["1s"];
        assert_eq!(second.peak, 100);
        assert!(Arrivals::new(&[], &urls, &[0, 0], 0).windows.is_empty());
    }
}
