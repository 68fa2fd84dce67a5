//! `churn`: connect and disconnect in waves, to find leaks. Each wave opens
//! its connections at a fixed rate (open loop), subscribes each, holds them,
//! and closes them, a third each way: a close handshake, a TCP reset, and an
//! orderly FIN without a close frame. The gateway's memory (`--pid`) is
//! sampled while each wave's connections are open and again after they are
//! closed, and its metrics (`--metrics-url`) after each wave, so a leak shows
//! up as growth from wave to wave, and the open-connection gauge must come
//! back to zero.

use std::sync::Arc;

use anyhow::bail;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cli::{ChurnArgs, DropMode, GlobalArgs};
use crate::client::{Connector, close, idle_until, tcp};
use crate::group::{
    Command, Control, Counters, EstablishStats, Outcome, Plan as GroupPlan, Published, Report,
    Slice, ramp_slot,
};
use crate::proc::Gateway;
use crate::report::{CheckOutcome, Summary, Table, round3};
use crate::scenario::connect::{channel_count, channels_for};
use crate::scenario::{group_specs, metric_checks, options, positive_rate};
use crate::scrape::Watch;
use crate::stats::{LatencySummary, Reasons};
use crate::worker::Fleet;

/// How far ahead of the command a wave's ramp starts, so that every group
/// has received it.
const WAVE_LEAD: std::time::Duration = std::time::Duration::from_millis(50);

/// What each client group does in `churn`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub waves: u64,
    /// Connections per wave, over all groups.
    pub wave_connections: u64,
    pub channels_per_conn: usize,
    pub channel_count: usize,
    /// Connections started per second within a wave, over all groups.
    pub rate: f64,
}

/// A group's result.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct GroupReport {
    /// Every wave's connections.
    pub establish: EstablishStats,
    /// Connections closed, by how.
    pub closes: Reasons,
}

/// How connection `index` is closed: a third each way.
enum Ending {
    Handshake,
    Drop(DropMode),
}

fn ending(index: u64) -> Ending {
    match index % 3 {
        0 => Ending::Handshake,
        1 => Ending::Drop(DropMode::Rst),
        _ => Ending::Drop(DropMode::Fin),
    }
}

/// Parent side.
pub async fn run(global: &GlobalArgs, args: &ChurnArgs) -> anyhow::Result<Summary> {
    positive_rate("--rate", args.rate)?;
    if args.waves == 0 || args.wave_connections == 0 {
        bail!("--waves and --wave-connections must be at least 1");
    }
    if args.rss_tolerance.is_some() && global.pids.is_empty() {
        bail!("--rss-tolerance needs --pid");
    }
    let plan = Plan {
        waves: args.waves as u64,
        wave_connections: args.wave_connections as u64,
        channels_per_conn: args.channels_per_conn,
        channel_count: channel_count(args.channels_per_conn, args.channel_count)?,
        rate: args.rate,
    };
    let gateway = Gateway::new(&global.pids);
    let mut watch = Watch::new(&args.metrics.metrics_urls);
    let before = gateway.sample()?;
    watch.before().await;
    let started = Instant::now();
    let mut fleet = Fleet::start(group_specs(global, GroupPlan::Churn(plan.clone()))?)?;
    let mut waves = Vec::with_capacity(args.waves);
    for wave in 0..plan.waves {
        fleet.command(Command::Wave(wave)).await?;
        fleet.ready().await?;
        tokio::time::sleep(args.hold).await;
        let open = gateway.sample()?;
        fleet.command(Command::Drop).await?;
        fleet.ready().await?;
        tokio::time::sleep(args.settle).await;
        let sample = gateway.sample()?;
        if !watch.is_empty() {
            watch.after().await;
        }
        let progress = fleet.total_progress();
        waves.push(Wave {
            wave: wave + 1,
            connections_so_far: (wave + 1) * plan.wave_connections,
            seconds: round3(started.elapsed().as_secs_f64()),
            rss_open_bytes: open.map(|sample| sample.rss_bytes),
            rss_bytes: sample.map(|sample| sample.rss_bytes),
            rss_anon_bytes: sample.map(|sample| sample.rss_anon_bytes),
            cpu_ticks: sample.map(|sample| sample.cpu_ticks),
            connections_open: watch.latest("herald_connections_open"),
            subscriptions: watch.latest("herald_subscriptions"),
            errors_so_far: progress.errors,
        });
        eprintln!(
            "wave {}/{}: rss {} bytes (anon {}), herald_connections_open {}",
            wave + 1,
            plan.waves,
            sample.map_or("-".to_owned(), |sample| sample.rss_bytes.to_string()),
            sample.map_or("-".to_owned(), |sample| sample.rss_anon_bytes.to_string()),
            watch
                .latest("herald_connections_open")
                .map_or("-".to_owned(), |open| open.to_string())
        );
    }
    let reports = fleet.finish(Command::Finish(Published::default())).await?;
    let mut total = GroupReport::default();
    for report in reports {
        match report {
            Report::Churn(group) => {
                total.establish.merge(&group.establish);
                total.closes.merge(&group.closes);
            }
            other => bail!("a group answered with the wrong report: {other:?}"),
        }
    }
    let results = Results::new(&plan, &total, before.map(|s| s.rss_bytes), waves);
    let mut checks = Vec::new();
    if let Some(tolerance) = args.rss_tolerance {
        let within = |growth: Option<f64>| growth.is_some_and(|growth| growth <= tolerance);
        let show = |bytes: Option<u64>| bytes.map_or("-".to_owned(), |bytes| bytes.to_string());
        checks.push(CheckOutcome::new(
            "rss-returns",
            within(results.rss_growth_after_first_wave),
            format!(
                "after the connections closed: {} bytes after the first wave, {} after the last ({:+.1}%, limit {:.0}%)",
                show(results.rss_after_first_wave),
                show(results.rss_after_last_wave),
                results.rss_growth_after_first_wave.unwrap_or(f64::NAN) * 100.0,
                tolerance * 100.0
            ),
        ));
        checks.push(CheckOutcome::new(
            "rss-open-stable",
            within(results.rss_open_growth),
            format!(
                "with a wave's connections open: {} bytes in the first wave, {} in the last ({:+.1}%, limit {:.0}%)",
                show(results.rss_open_first_wave),
                show(results.rss_open_last_wave),
                results.rss_open_growth.unwrap_or(f64::NAN) * 100.0,
                tolerance * 100.0
            ),
        ));
    }
    if !checks.is_empty() || !args.metrics.expect_metrics.is_empty() {
        checks.insert(
            0,
            CheckOutcome::new(
                "all-connected",
                results.failed == 0,
                format!(
                    "{} of {} connected; failures: {}",
                    results.connected,
                    results.connections,
                    results.failures.describe()
                ),
            ),
        );
    }
    checks.extend(metric_checks(&watch, &args.metrics.expect_metrics));
    let table = results.table();
    Ok(Summary::new("churn", &options(global, args)?, &results, table)?.with_checks(checks))
}

/// The gateway after one wave's connections were closed and `--settle` passed.
#[derive(Debug, Serialize)]
struct Wave {
    /// 1-based.
    wave: u64,
    connections_so_far: u64,
    /// Since the first wave started.
    seconds: f64,
    /// While the wave's connections were open.
    rss_open_bytes: Option<u64>,
    /// Once they were closed.
    rss_bytes: Option<u64>,
    /// Of which anonymous memory (the heap), without code pages.
    rss_anon_bytes: Option<u64>,
    cpu_ticks: Option<u64>,
    /// `herald_connections_open`, summed over the --metrics-url gateways.
    connections_open: Option<f64>,
    /// `herald_subscriptions`, likewise.
    subscriptions: Option<f64>,
    /// Failed attempts and lost connections so far.
    errors_so_far: u64,
}

/// The `churn` results.
#[derive(Debug, Serialize)]
struct Results {
    connections: u64,
    connected: u64,
    failed: u64,
    failures: Reasons,
    /// Connections lost before they were closed, by reason.
    disconnects: Reasons,
    closes: Reasons,
    connect_latency_ms: LatencySummary,
    rss_before_bytes: Option<u64>,
    rss_after_first_wave: Option<u64>,
    rss_after_last_wave: Option<u64>,
    /// (last − first) / first.
    rss_growth_after_first_wave: Option<f64>,
    rss_anon_after_first_wave: Option<u64>,
    rss_anon_after_last_wave: Option<u64>,
    /// RSS growth from the middle wave to the last, per connection made in
    /// between: a leak grows steadily, allocator high-water marks level off.
    rss_bytes_per_connection_second_half: Option<f64>,
    /// RSS while the first and the last wave's connections were open.
    rss_open_first_wave: Option<u64>,
    rss_open_last_wave: Option<u64>,
    /// (last − first) / first, with the connections open.
    rss_open_growth: Option<f64>,
    /// Gateway CPU per connection, over all waves.
    cpu_us_per_connection: Option<f64>,
    waves: Vec<Wave>,
}

impl Results {
    fn new(plan: &Plan, total: &GroupReport, rss_before: Option<u64>, waves: Vec<Wave>) -> Results {
        let first = waves.first().and_then(|wave| wave.rss_bytes);
        let last = waves.last().and_then(|wave| wave.rss_bytes);
        let growth = first
            .zip(last)
            .filter(|(first, _)| *first > 0)
            .map(|(first, last)| round3((last as f64 - first as f64) / first as f64));
        let open_first = waves.first().and_then(|wave| wave.rss_open_bytes);
        let open_last = waves.last().and_then(|wave| wave.rss_open_bytes);
        let anon_first = waves.first().and_then(|wave| wave.rss_anon_bytes);
        let anon_last = waves.last().and_then(|wave| wave.rss_anon_bytes);
        let middle = waves.get(waves.len() / 2).filter(|_| waves.len() >= 2);
        let second_half = middle.and_then(|middle| {
            let connections = (waves.len() - 1 - waves.len() / 2) as u64 * plan.wave_connections;
            let (from, to) = (middle.rss_bytes?, last?);
            (connections > 0).then(|| round3((to as f64 - from as f64) / connections as f64))
        });
        let cpu = waves
            .first()
            .and_then(|wave| wave.cpu_ticks)
            .zip(waves.last().and_then(|wave| wave.cpu_ticks));
        let connected = total.establish.connected;
        Results {
            connections: plan.waves * plan.wave_connections,
            connected,
            failed: total.establish.failures.total(),
            failures: total.establish.failures.clone(),
            disconnects: total.establish.disconnects.clone(),
            closes: total.closes.clone(),
            connect_latency_ms: total.establish.connect_latency.summary(),
            rss_before_bytes: rss_before,
            rss_after_first_wave: first,
            rss_after_last_wave: last,
            rss_growth_after_first_wave: growth,
            rss_anon_after_first_wave: anon_first,
            rss_anon_after_last_wave: anon_last,
            rss_bytes_per_connection_second_half: second_half,
            rss_open_first_wave: open_first,
            rss_open_last_wave: open_last,
            rss_open_growth: open_first
                .zip(open_last)
                .filter(|(first, _)| *first > 0)
                .map(|(first, last)| round3((last as f64 - first as f64) / first as f64)),
            // From the end of the first wave to the end of the last, so that
            // the process's start-up is not counted.
            cpu_us_per_connection: cpu.filter(|_| plan.waves > 1).map(|(first, last)| {
                let seconds = last.saturating_sub(first) as f64 / crate::proc::TICKS_PER_SECOND;
                round3(seconds * 1e6 / ((plan.waves - 1) * plan.wave_connections) as f64)
            }),
            waves,
        }
    }

    fn table(&self) -> Table {
        let mut table = Table::default();
        table
            .row("connections", self.connections)
            .row("connected+subscribed", self.connected)
            .reasons("failures", &self.failures)
            .reasons("lost before close", &self.disconnects)
            .reasons("closed", &self.closes)
            .latency("connect latency ms", &self.connect_latency_ms);
        let show =
            |bytes: Option<u64>| bytes.map_or("-".to_owned(), |bytes| format!("{bytes} bytes"));
        table
            .section("gateway")
            .row("rss before", show(self.rss_before_bytes))
            .row("rss after wave 1", show(self.rss_after_first_wave))
            .row("rss after last wave", show(self.rss_after_last_wave));
        if let Some(growth) = self.rss_growth_after_first_wave {
            table.row("rss growth since wave 1", format!("{:.1}%", growth * 100.0));
        }
        table
            .row(
                "anon rss after wave 1",
                show(self.rss_anon_after_first_wave),
            )
            .row(
                "anon rss after last wave",
                show(self.rss_anon_after_last_wave),
            );
        table
            .row("rss open, wave 1", show(self.rss_open_first_wave))
            .row("rss open, last wave", show(self.rss_open_last_wave));
        if let Some(growth) = self.rss_open_growth {
            table.row("rss open growth", format!("{:.1}%", growth * 100.0));
        }
        if let Some(bytes) = self.rss_bytes_per_connection_second_half {
            table.row("rss growth/connection, 2nd half", format!("{bytes} bytes"));
        }
        if let Some(micros) = self.cpu_us_per_connection {
            table.row("cpu/connection", format!("{micros} µs"));
        }
        if let Some(last) = self.waves.last() {
            if let Some(open) = last.connections_open {
                table.row("connections open at the end", open);
            }
            if let Some(subscriptions) = last.subscriptions {
                table.row("subscriptions at the end", subscriptions);
            }
        }
        table
    }
}

/// Client side: one wave per [`Command::Wave`], until [`Command::Finish`].
/// A wave connects its share, reports ready, and on [`Command::Drop`]
/// closes them all and reports ready again.
pub async fn run_group(
    plan: Plan,
    slice: Slice,
    connector: Arc<Connector>,
    mut control: Control,
) -> anyhow::Result<GroupReport> {
    let mut report = GroupReport::default();
    loop {
        let wave = match control.next_command().await? {
            Command::Wave(wave) => wave,
            Command::Finish(_) => return Ok(report),
            other => bail!("unexpected command {other:?}"),
        };
        let start = Instant::now() + WAVE_LEAD;
        let first = wave * plan.wave_connections;
        let (release, released) = watch::channel(false);
        let (outcomes, mut outcomes_received) = mpsc::channel(1024);
        let mut tasks = JoinSet::new();
        for offset in slice.indices(plan.wave_connections) {
            tasks.spawn(connect_and_close(
                first + offset,
                ramp_slot(start, offset, plan.rate),
                plan.clone(),
                connector.clone(),
                outcomes.clone(),
                released.clone(),
                control.counters.clone(),
            ));
        }
        drop(outcomes);
        while let Some(outcome) = outcomes_received.recv().await {
            report.establish.record(&outcome);
        }
        control.ready().await?;
        match control.next_command().await? {
            Command::Drop => {}
            other => bail!("expected the command to close the wave, got {other:?}"),
        }
        let _ = release.send(true);
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(closed)) => report.closes.add(closed),
                Ok(Err(Some(lost))) => report.establish.disconnects.add(lost),
                Ok(Err(None)) => {}
                Err(error) => bail!("a connection task failed: {error}"),
            }
        }
        control.ready().await?;
    }
}

/// One connection of a wave: open on schedule, report the attempt, hold
/// until released, close its way. Returns how it was closed, or why it was
/// lost first (`None` when it never connected).
async fn connect_and_close(
    index: u64,
    start_at: Instant,
    plan: Plan,
    connector: Arc<Connector>,
    outcomes: mpsc::Sender<Outcome>,
    mut released: watch::Receiver<bool>,
    counters: Arc<Counters>,
) -> Result<&'static str, Option<String>> {
    tokio::time::sleep_until(start_at).await;
    let channels = channels_for(index, plan.channels_per_conn, plan.channel_count);
    let attempt = connector.open(index, &channels).await;
    let _ = outcomes.send(Outcome::of(index, &attempt)).await;
    drop(outcomes);
    let Ok(session) = attempt.result else {
        counters.error();
        return Err(None);
    };
    counters.connection_opened();
    let mut ws = session.ws;
    let held = idle_until(&mut ws, &mut released, |release| *release).await;
    counters.connection_closed();
    if let Err(lost) = held {
        counters.error();
        return Err(Some(lost.reason()));
    }
    Ok(match ending(index) {
        Ending::Handshake => {
            close(ws).await;
            "close handshake"
        }
        Ending::Drop(DropMode::Rst) => {
            if let Some(tcp) = tcp(&ws) {
                let _ = tcp.set_zero_linger();
            }
            drop(ws);
            "reset"
        }
        Ending::Drop(DropMode::Fin) => {
            drop(ws);
            "fin without close frame"
        }
    })
}
