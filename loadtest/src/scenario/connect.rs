//! `connect`: open connections at a fixed rate (open loop), subscribe each,
//! hold them, close them. Measures the handshake rate achieved, connect and
//! handshake latency, failures, and the gateway's memory per connection.

use std::sync::Arc;

use anyhow::bail;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cli::{ConnectArgs, GlobalArgs};
use crate::client::{Connector, Failure, close, idle_until};
use crate::group::{
    Command, Control, Counters, EstablishStats, Outcome, Plan as GroupPlan, Published, Report,
    Slice, instant_at, ramp_slot,
};
use crate::proc::{Gateway, Usage};
use crate::report::{Summary, Table, round3};
use crate::scenario::{group_specs, options, positive_rate, ramp_start};
use crate::stats::{LatencySummary, Reasons};
use crate::worker::Fleet;

/// What each client group does in `connect`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// Connections in total, over all groups.
    pub connections: u64,
    /// Channels each connection subscribes to.
    pub channels_per_conn: usize,
    /// Distinct channels `load.0 ..`.
    pub channel_count: usize,
    /// Connections started per second, over all groups.
    pub rate: f64,
    /// When connection 0 starts, in unix nanoseconds.
    pub start_at_unix_nanos: i64,
}

/// A group's result.
#[derive(Debug, Serialize, Deserialize)]
pub struct GroupReport {
    pub establish: EstablishStats,
}

/// The channels of connection `index`: `per_conn` consecutive ones from
/// `load.0 .. load.<count-1>`, starting where the previous connection
/// stopped, so that every channel gets used.
pub fn channels_for(index: u64, per_conn: usize, count: usize) -> Vec<String> {
    let count = count.max(1) as u64;
    (0..per_conn as u64)
        .map(|k| format!("load.{}", (index * per_conn as u64 + k) % count))
        .collect()
}

/// Checks `--channels-per-conn` and `--channel-count`; returns the count.
pub fn channel_count(per_conn: usize, count: Option<usize>) -> anyhow::Result<usize> {
    let count = count.unwrap_or(per_conn);
    if count < per_conn {
        bail!("--channel-count must be at least --channels-per-conn");
    }
    Ok(count)
}

/// Parent side.
pub async fn run(global: &GlobalArgs, args: &ConnectArgs) -> anyhow::Result<Summary> {
    positive_rate("--rate", args.rate)?;
    let plan = Plan {
        connections: args.connections as u64,
        channels_per_conn: args.channels_per_conn,
        channel_count: channel_count(args.channels_per_conn, args.channel_count)?,
        rate: args.rate,
        start_at_unix_nanos: ramp_start(global),
    };
    let gateway = Gateway::new(&global.pids);
    let before = gateway.sample()?;
    let mut fleet = Fleet::start(group_specs(global, GroupPlan::Connect(plan.clone()))?)?;
    fleet.ready().await?;
    let connected_sample = gateway.sample()?;
    tokio::time::sleep(args.hold).await;
    let reports = fleet.finish(Command::Finish(Published::default())).await?;
    let mut establish = EstablishStats::default();
    for report in reports {
        match report {
            Report::Connect(group) => establish.merge(&group.establish),
            other => bail!("a group answered with the wrong report: {other:?}"),
        }
    }
    let usage = before
        .zip(connected_sample)
        .map(|(before, after)| Usage::between(before, after));
    let results = Results::new(&plan, &establish, usage);
    let table = results.table();
    Summary::new("connect", &options(global, args)?, &results, table)
}

/// The `connect` results.
#[derive(Debug, Serialize)]
struct Results {
    connections: u64,
    attempted: u64,
    /// Upgrades completed (HTTP 101).
    upgrades: u64,
    /// Upgraded and subscribed.
    connected: u64,
    failed: u64,
    failures: Reasons,
    /// Connections lost during the hold.
    disconnects: Reasons,
    /// From the first scheduled start to the last completed upgrade.
    ramp_seconds: f64,
    handshakes_per_sec: f64,
    connect_latency_ms: LatencySummary,
    handshake_latency_ms: LatencySummary,
    memory_per_connection_bytes: Option<f64>,
    memory_per_connection_kib: Option<f64>,
    /// Gateway CPU during the ramp per connection.
    cpu_us_per_connection: Option<f64>,
    /// Gateway usage from before the first connection to all connected.
    gateway: Option<Usage>,
}

impl Results {
    fn new(plan: &Plan, establish: &EstablishStats, usage: Option<Usage>) -> Results {
        let ramp_seconds = if establish.upgrades > 0 {
            (establish.last_upgrade_unix_nanos - plan.start_at_unix_nanos).max(1) as f64 / 1e9
        } else {
            0.0
        };
        let handshakes_per_sec = if ramp_seconds > 0.0 {
            establish.upgrades as f64 / ramp_seconds
        } else {
            0.0
        };
        let memory_per_connection_bytes = usage
            .filter(|_| establish.connected > 0)
            .map(|usage| usage.rss_growth() as f64 / establish.connected as f64);
        Results {
            connections: plan.connections,
            attempted: establish.attempted,
            upgrades: establish.upgrades,
            connected: establish.connected,
            failed: establish.failures.total(),
            failures: establish.failures.clone(),
            disconnects: establish.disconnects.clone(),
            ramp_seconds: round3(ramp_seconds),
            handshakes_per_sec: round3(handshakes_per_sec),
            connect_latency_ms: establish.connect_latency.summary(),
            handshake_latency_ms: establish.handshake_latency.summary(),
            memory_per_connection_bytes: memory_per_connection_bytes.map(f64::round),
            memory_per_connection_kib: memory_per_connection_bytes
                .map(|bytes| round3(bytes / 1024.0)),
            cpu_us_per_connection: usage
                .and_then(|usage| usage.cpu_micros_per(establish.connected))
                .map(round3),
            gateway: usage,
        }
    }

    fn table(&self) -> Table {
        let mut table = Table::default();
        table
            .row("connections", self.connections)
            .row("upgraded (101)", self.upgrades)
            .row("connected+subscribed", self.connected)
            .reasons("failures", &self.failures)
            .reasons("lost during hold", &self.disconnects)
            .row("ramp seconds", self.ramp_seconds)
            .row("handshakes/s", self.handshakes_per_sec)
            .latency("connect latency ms", &self.connect_latency_ms)
            .latency("handshake latency ms", &self.handshake_latency_ms);
        if let Some(usage) = &self.gateway {
            table
                .section("gateway (--pid)")
                .row("rss before", format!("{} bytes", usage.rss_before_bytes))
                .row("rss connected", format!("{} bytes", usage.rss_after_bytes))
                .row("cpu seconds (ramp)", round3(usage.cpu_seconds));
        }
        if let (Some(bytes), Some(kib)) = (
            self.memory_per_connection_bytes,
            self.memory_per_connection_kib,
        ) {
            table.row("memory/connection", format!("{bytes} bytes ({kib} KiB)"));
        }
        if let Some(micros) = self.cpu_us_per_connection {
            table.row("cpu/connection", format!("{micros} µs"));
        }
        table
    }
}

/// Client side: open this group's slice on the shared schedule, hold until
/// told to finish, close.
pub async fn run_group(
    plan: Plan,
    slice: Slice,
    connector: Arc<Connector>,
    mut control: Control,
) -> anyhow::Result<GroupReport> {
    let start = instant_at(plan.start_at_unix_nanos);
    let indices: Vec<u64> = slice.indices(plan.connections).collect();
    let (stop, stopped) = watch::channel(false);
    // Each task sends exactly one outcome, so this bound is never reached.
    let (outcomes, mut outcomes_received) = mpsc::channel(indices.len().max(1));
    let mut tasks = JoinSet::new();
    for &index in &indices {
        tasks.spawn(hold_connection(
            index,
            channels_for(index, plan.channels_per_conn, plan.channel_count),
            ramp_slot(start, index, plan.rate),
            connector.clone(),
            outcomes.clone(),
            stopped.clone(),
            control.counters.clone(),
        ));
    }
    drop(outcomes);
    let mut establish = EstablishStats::default();
    while let Some(outcome) = outcomes_received.recv().await {
        establish.record(&outcome);
    }
    control.ready().await?;
    control.finish().await?;
    let _ = stop.send(true);
    while let Some(joined) = tasks.join_next().await {
        if let Ok(Some(failure)) = joined {
            establish.disconnects.add(failure.reason());
        }
    }
    Ok(GroupReport { establish })
}

/// One connection: start on schedule, report the attempt, hold until stopped.
/// Returns why it ended early, if it did.
async fn hold_connection(
    index: u64,
    channels: Vec<String>,
    start_at: Instant,
    connector: Arc<Connector>,
    outcomes: mpsc::Sender<Outcome>,
    mut stopped: watch::Receiver<bool>,
    counters: Arc<Counters>,
) -> Option<Failure> {
    tokio::time::sleep_until(start_at).await;
    let attempt = connector.open(index, &channels).await;
    let _ = outcomes.send(Outcome::of(index, &attempt)).await;
    drop(outcomes);
    let Ok(mut session) = attempt.result else {
        counters.error();
        return None;
    };
    counters.connection_opened();
    let end = idle_until(&mut session.ws, &mut stopped, |stop| *stop).await;
    counters.connection_closed();
    match end {
        Ok(()) => {
            close(session.ws).await;
            None
        }
        Err(failure) => {
            counters.error();
            Some(failure)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_channel_gets_used() {
        assert_eq!(channels_for(0, 2, 5), ["load.0", "load.1"]);
        assert_eq!(channels_for(1, 2, 5), ["load.2", "load.3"]);
        assert_eq!(channels_for(2, 2, 5), ["load.4", "load.0"]);
        assert_eq!(channels_for(7, 1, 1), ["load.0"]);
        assert!(channels_for(3, 0, 0).is_empty());
        assert!(channel_count(3, Some(2)).is_err());
        assert_eq!(channel_count(3, None).unwrap(), 3);
    }
}
