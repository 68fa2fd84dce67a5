//! `storm`: establish subscribed connections, drop a number of them at once,
//! and reconnect and resubscribe those immediately, all together. Measures
//! how long until 50%, 99% and 100% of them are back, and what failed.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cli::{DropMode, GlobalArgs, StormArgs};
use crate::client::{Connector, Failure, Session, Ws, close, idle_until, tcp};
use crate::group::{
    Command, Control, Counters, EstablishStats, Outcome, Plan as GroupPlan, Published, Report,
    Slice, instant_at, ramp_slot,
};
use crate::proc::{Gateway, Usage};
use crate::report::{Summary, Table, round3};
use crate::scenario::connect::{channel_count, channels_for};
use crate::scenario::{group_specs, options, positive_rate, ramp_start};
use crate::stats::{LatencySummary, Micros, Reasons};
use crate::worker::Fleet;

/// The first pause between reconnect attempts; it doubles each time.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Up to this much random-looking jitter is added to each pause.
const BACKOFF_JITTER_MS: u64 = 100;

/// What each client group does in `storm`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// Connections in total, over all groups.
    pub connections: u64,
    /// Connections `0..drop` are dropped and reconnected.
    pub drop: u64,
    pub channels_per_conn: usize,
    pub channel_count: usize,
    /// Connections started per second while establishing.
    pub connect_rate: f64,
    /// Reconnect attempts per dropped connection.
    pub attempts: u32,
    pub drop_mode: DropMode,
    /// When connection 0 starts, in unix nanoseconds.
    pub start_at_unix_nanos: i64,
}

/// A group's result.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct GroupReport {
    /// The initial connections.
    pub establish: EstablishStats,
    /// Established connections chosen for dropping.
    pub dropped: u64,
    /// Dropped connections that reconnected and resubscribed.
    pub resubscribed: u64,
    /// From the drop to resubscribed, per reconnected connection.
    pub time_to_resubscribe: Micros,
    /// Why dropped connections did not come back (last attempt's reason).
    pub reconnect_failures: Reasons,
}

/// The phases a storm connection goes through; all tasks watch one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Holding,
    /// Drop now; the instant is when the drop was ordered.
    Drop(Instant),
    Stop,
}

/// From a connection task to its group.
#[derive(Debug)]
enum ConnectionEvent {
    Established(Outcome),
    /// A dropped connection is back (time since the drop), or gave up.
    Reconnected(Result<Duration, Failure>),
}

/// Parent side.
pub async fn run(global: &GlobalArgs, args: &StormArgs) -> anyhow::Result<Summary> {
    positive_rate("--connect-rate", args.connect_rate)?;
    if args.drop > args.connections {
        bail!("--drop must not exceed --connections");
    }
    if args.attempts == 0 {
        bail!("--attempts must be at least 1");
    }
    let plan = Plan {
        connections: args.connections as u64,
        drop: args.drop as u64,
        channels_per_conn: args.channels_per_conn,
        channel_count: channel_count(args.channels_per_conn, args.channel_count)?,
        connect_rate: args.connect_rate,
        attempts: args.attempts,
        drop_mode: args.drop_mode,
        start_at_unix_nanos: ramp_start(global),
    };
    let gateway = Gateway::new(&global.pids);
    let mut fleet = Fleet::start(group_specs(global, GroupPlan::Storm(plan.clone()))?)?;
    fleet.ready().await?;
    let before = gateway.sample()?;
    fleet.command(Command::Drop).await?;
    fleet.ready().await?;
    let after = gateway.sample()?;
    let reports = fleet.finish(Command::Finish(Published::default())).await?;
    let mut total = GroupReport::default();
    for report in reports {
        match report {
            Report::Storm(group) => {
                total.establish.merge(&group.establish);
                total.dropped += group.dropped;
                total.resubscribed += group.resubscribed;
                total.time_to_resubscribe.merge(&group.time_to_resubscribe);
                total.reconnect_failures.merge(&group.reconnect_failures);
            }
            other => bail!("a group answered with the wrong report: {other:?}"),
        }
    }
    let usage = before
        .zip(after)
        .map(|(before, after)| Usage::between(before, after));
    let results = Results::new(&plan, &total, usage);
    let table = results.table();
    Summary::new("storm", &options(global, args)?, &results, table)
}

/// Times until a fraction of the dropped connections were back, in ms;
/// `null` when that many never came back.
#[derive(Debug, Serialize)]
struct Resubscribed {
    p50: Option<f64>,
    p99: Option<f64>,
    p100: Option<f64>,
}

/// The `storm` results.
#[derive(Debug, Serialize)]
struct Results {
    connections: u64,
    connected: u64,
    connect_failures: Reasons,
    /// Established connections that were dropped.
    dropped: u64,
    resubscribed: u64,
    reconnect_failures: Reasons,
    time_to_resubscribe_ms: Resubscribed,
    /// Distribution over the connections that came back.
    resubscribe_latency_ms: LatencySummary,
    /// Connections lost outside the drop, by reason.
    disconnects: Reasons,
    /// Gateway CPU during the storm per dropped connection.
    cpu_us_per_reconnect: Option<f64>,
    /// Gateway usage from the drop to the last reconnect.
    gateway: Option<Usage>,
}

impl Results {
    fn new(plan: &Plan, total: &GroupReport, usage: Option<Usage>) -> Results {
        let until = |fraction: f64| {
            let rank = ((fraction * total.dropped as f64).ceil() as u64).max(1);
            if total.dropped == 0 {
                None
            } else {
                total.time_to_resubscribe.rank_ms(rank)
            }
        };
        Results {
            connections: plan.connections,
            connected: total.establish.connected,
            connect_failures: total.establish.failures.clone(),
            dropped: total.dropped,
            resubscribed: total.resubscribed,
            reconnect_failures: total.reconnect_failures.clone(),
            time_to_resubscribe_ms: Resubscribed {
                p50: until(0.5),
                p99: until(0.99),
                p100: until(1.0),
            },
            resubscribe_latency_ms: total.time_to_resubscribe.summary(),
            disconnects: total.establish.disconnects.clone(),
            cpu_us_per_reconnect: usage
                .and_then(|usage| usage.cpu_micros_per(total.dropped))
                .map(round3),
            gateway: usage,
        }
    }

    fn table(&self) -> Table {
        let show = |value: Option<f64>| match value {
            Some(ms) => format!("{ms:.3}"),
            None => "never".to_owned(),
        };
        let mut table = Table::default();
        table
            .row("connections", self.connections)
            .row("connected", self.connected)
            .reasons("connect failures", &self.connect_failures)
            .row("dropped", self.dropped)
            .row("resubscribed", self.resubscribed)
            .reasons("reconnect failures", &self.reconnect_failures)
            .row(
                "resubscribed by (ms)",
                format!(
                    "50% {}  99% {}  100% {}",
                    show(self.time_to_resubscribe_ms.p50),
                    show(self.time_to_resubscribe_ms.p99),
                    show(self.time_to_resubscribe_ms.p100)
                ),
            )
            .reasons("other disconnects", &self.disconnects);
        if let Some(usage) = &self.gateway {
            table
                .section("gateway (--pid)")
                .row(
                    "rss before drop",
                    format!("{} bytes", usage.rss_before_bytes),
                )
                .row(
                    "rss after storm",
                    format!("{} bytes", usage.rss_after_bytes),
                )
                .row("cpu seconds (storm)", round3(usage.cpu_seconds));
        }
        if let Some(micros) = self.cpu_us_per_reconnect {
            table.row("cpu/reconnect", format!("{micros} µs"));
        }
        table
    }
}

/// Client side.
pub async fn run_group(
    plan: Plan,
    slice: Slice,
    connector: Arc<Connector>,
    mut control: Control,
) -> anyhow::Result<GroupReport> {
    let start = instant_at(plan.start_at_unix_nanos);
    let indices: Vec<u64> = slice.indices(plan.connections).collect();
    let (phase, phases) = watch::channel(Phase::Holding);
    // Each task sends at most two events.
    let (events, mut received) = mpsc::channel(2 * indices.len().max(1));
    let mut tasks = JoinSet::new();
    for &index in &indices {
        tasks.spawn(storm_connection(
            index,
            ramp_slot(start, index, plan.connect_rate),
            plan.clone(),
            connector.clone(),
            events.clone(),
            phases.clone(),
            control.counters.clone(),
        ));
    }
    drop(events);
    let mut report = GroupReport::default();
    let mut tally = Tally::default();
    while tally.established < indices.len() {
        let Some(event) = received.recv().await else {
            bail!("connection tasks ended early");
        };
        tally.record(event, plan.drop, &mut report);
    }
    control.ready().await?;
    match control.next_command().await? {
        Command::Drop => {}
        other => bail!("expected the drop command, got {other:?}"),
    }
    let _ = phase.send(Phase::Drop(Instant::now()));
    while tally.reconnected < report.dropped {
        let Some(event) = received.recv().await else {
            bail!("connection tasks ended early");
        };
        tally.record(event, plan.drop, &mut report);
    }
    control.ready().await?;
    control.finish().await?;
    let _ = phase.send(Phase::Stop);
    while let Some(joined) = tasks.join_next().await {
        if let Ok(Some(failure)) = joined {
            report.establish.disconnects.add(failure.reason());
        }
    }
    Ok(report)
}

/// How many of each event a group has received.
#[derive(Debug, Default)]
struct Tally {
    established: usize,
    reconnected: u64,
}

impl Tally {
    fn record(&mut self, event: ConnectionEvent, drop: u64, report: &mut GroupReport) {
        match event {
            ConnectionEvent::Established(outcome) => {
                report.establish.record(&outcome);
                if outcome.result.is_ok() && outcome.index < drop {
                    report.dropped += 1;
                }
                self.established += 1;
            }
            ConnectionEvent::Reconnected(result) => {
                match result {
                    Ok(elapsed) => {
                        report.resubscribed += 1;
                        report.time_to_resubscribe.record(elapsed);
                    }
                    Err(failure) => report.reconnect_failures.add(failure.reason()),
                }
                self.reconnected += 1;
            }
        }
    }
}

/// One connection: establish on schedule; if chosen, drop at the storm and
/// reconnect; hold until stopped. Returns why it was lost outside the
/// storm, if it was.
async fn storm_connection(
    index: u64,
    start_at: Instant,
    plan: Plan,
    connector: Arc<Connector>,
    events: mpsc::Sender<ConnectionEvent>,
    mut phases: watch::Receiver<Phase>,
    counters: Arc<Counters>,
) -> Option<Failure> {
    tokio::time::sleep_until(start_at).await;
    let channels = channels_for(index, plan.channels_per_conn, plan.channel_count);
    let attempt = connector.open(index, &channels).await;
    let _ = events
        .send(ConnectionEvent::Established(Outcome::of(index, &attempt)))
        .await;
    let Ok(mut session) = attempt.result else {
        counters.error();
        return None;
    };
    counters.connection_opened();
    let chosen = index < plan.drop;
    let held = idle_until(&mut session.ws, &mut phases, |phase| match phase {
        Phase::Holding => false,
        Phase::Drop(_) => chosen,
        Phase::Stop => true,
    })
    .await;
    counters.connection_closed();
    if let Err(failure) = held {
        counters.error();
        if chosen {
            // It cannot take part in the storm; the group still waits for it.
            let lost = Failure::WebSocket(format!("lost before the drop: {failure}"));
            let _ = events.send(ConnectionEvent::Reconnected(Err(lost))).await;
            return None;
        }
        return Some(failure);
    }
    let current = *phases.borrow();
    let dropped_at = match current {
        Phase::Drop(at) => at,
        Phase::Holding | Phase::Stop => {
            close(session.ws).await;
            return None;
        }
    };
    abrupt_drop(session.ws, plan.drop_mode);
    let reconnected = reconnect(index, &channels, plan.attempts, &connector).await;
    let mut session = match reconnected {
        Ok(session) => {
            let _ = events
                .send(ConnectionEvent::Reconnected(Ok(dropped_at.elapsed())))
                .await;
            session
        }
        Err(failure) => {
            counters.error();
            let _ = events
                .send(ConnectionEvent::Reconnected(Err(failure)))
                .await;
            return None;
        }
    };
    drop(events);
    counters.connection_opened();
    let held = idle_until(&mut session.ws, &mut phases, |phase| *phase == Phase::Stop).await;
    counters.connection_closed();
    match held {
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

/// Drops the connection without a WebSocket close frame.
fn abrupt_drop(ws: Ws, mode: DropMode) {
    if mode == DropMode::Rst {
        // SO_LINGER 0 makes the close send a reset; failing to set it leaves a FIN.
        if let Some(tcp) = tcp(&ws) {
            let _ = tcp.set_zero_linger();
        }
    }
    drop(ws);
}

/// Reconnects and resubscribes, retrying with exponential backoff and jitter.
async fn reconnect(
    index: u64,
    channels: &[String],
    attempts: u32,
    connector: &Connector,
) -> Result<Session, Failure> {
    let mut attempt = 1;
    loop {
        match connector.open(index, channels).await.result {
            Ok(session) => return Ok(session),
            Err(failure) if attempt >= attempts => return Err(failure),
            Err(_) => {
                tokio::time::sleep(backoff(attempt, index)).await;
                attempt += 1;
            }
        }
    }
}

/// The pause after failed attempt `attempt` (1-based) of connection `index`.
pub fn backoff(attempt: u32, index: u64) -> Duration {
    let exponential = FIRST_BACKOFF * 2u32.saturating_pow(attempt.saturating_sub(1).min(10));
    // A multiplicative hash of the index spreads connections over the jitter window.
    let jitter = (index.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % BACKOFF_JITTER_MS;
    exponential + Duration::from_millis(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_jittered() {
        assert!(backoff(1, 0) >= FIRST_BACKOFF);
        assert!(backoff(1, 0) < FIRST_BACKOFF + Duration::from_millis(BACKOFF_JITTER_MS));
        assert!(backoff(3, 5) >= FIRST_BACKOFF * 4);
        let jitters: std::collections::HashSet<Duration> =
            (0..50).map(|index| backoff(1, index)).collect();
        assert!(jitters.len() > 10);
    }
}
