//! A group of clients: the slice of the connections that one process runs,
//! and the messages it exchanges with the parent that coordinates it.
//!
//! The conversation is the same whether the group runs inside the parent
//! (`--workers 1`) or in a worker process: the parent sends a [`GroupSpec`],
//! then [`Command`]s; the group answers with [`Event`]s, ending with a
//! [`Report`]. Between processes each message is one JSON line.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::client::{Attempt, ClientSpec, Connector, Failure, unix_nanos};
use crate::history::ExpectedRange;
use crate::loss::ChannelOutage;
use crate::scenario::{churn, connect, drain, fanout, storm};
use crate::stats::{Micros, Reasons};

/// How often a group reports its counters.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);

/// Everything one group needs; a worker reads it as its first line on stdin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupSpec {
    /// Which connections this group runs.
    pub slice: Slice,
    /// How to open connections.
    pub clients: ClientSpec,
    /// What to do with them.
    pub plan: Plan,
}

/// The scenario-specific part of a [`GroupSpec`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Plan {
    Connect(connect::Plan),
    Fanout(fanout::Plan),
    Storm(storm::Plan),
    Churn(churn::Plan),
    Drain(drain::Plan),
}

/// The connections of group `group` out of `groups`: global indices `i`
/// with `i % groups == group`, so every group gets an even share of every
/// gateway, source address and channel.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Slice {
    pub group: usize,
    pub groups: usize,
}

impl Slice {
    /// The global indices below `total` that belong to this slice.
    pub fn indices(&self, total: u64) -> impl Iterator<Item = u64> + use<> {
        (self.group as u64..total).step_by(self.groups.max(1))
    }
}

/// From the parent to a group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    /// Storm: drop the chosen connections now and reconnect them. Churn:
    /// close the current wave's connections.
    Drop,
    /// Churn: run wave `n` (connect the wave's connections, then disconnect them).
    Wave(u64),
    /// End the run: close every connection and report. For fanout, what was
    /// published.
    Finish(Published),
}

/// What the parent tells fanout groups at the end of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Published {
    /// Messages published per channel, warm-up included: sequence numbers `0..n`.
    pub per_channel: Vec<u64>,
    /// Per channel, the messages that never certainly reached the gateway;
    /// empty unless a fault check needs it.
    pub outage: Vec<ChannelOutage>,
    /// Per channel, with --history, the offsets the measured publishes
    /// landed at: what every subscriber must receive.
    pub history: Vec<Vec<ExpectedRange>>,
}

impl Published {
    /// Channel `channel`'s outage, when it was sent.
    pub fn outage_for(&self, channel: u64) -> Option<&ChannelOutage> {
        self.outage.get(channel as usize)
    }

    /// Channel `channel`'s expected offsets; none without --history.
    pub fn history_for(&self, channel: u64) -> &[ExpectedRange] {
        self.history
            .get(channel as usize)
            .map_or(&[], Vec::as_slice)
    }
}

/// From a group to the parent.
#[derive(Debug, Serialize, Deserialize)]
pub enum Event {
    /// Cumulative counters, sent periodically.
    Progress(Progress),
    /// The current phase is complete: every connection was attempted, or
    /// every dropped connection has reconnected or given up.
    Ready,
    /// The final report; the last event.
    Report(Box<Report>),
    /// The group could not run; the last event.
    Failed(String),
}

/// A group's final report.
// Sent once per group, already boxed in `Event::Report`.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Serialize, Deserialize)]
pub enum Report {
    Connect(connect::GroupReport),
    Fanout(fanout::GroupReport),
    Storm(storm::GroupReport),
    Churn(churn::GroupReport),
    Drain(drain::GroupReport),
}

/// Counters for the progress line, shared by a group's connection tasks.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections currently established and subscribed.
    pub connected: AtomicU64,
    /// Deliveries received (after the warm-up).
    pub deliveries: AtomicU64,
    /// Failed attempts and lost connections.
    pub errors: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> Progress {
        Progress {
            connected: self.connected.load(Ordering::Relaxed),
            deliveries: self.deliveries.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }

    pub fn connection_opened(&self) {
        self.connected.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_closed(&self) {
        self.connected.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Progress {
    pub connected: u64,
    pub deliveries: u64,
    pub errors: u64,
}

impl Progress {
    pub fn add(&mut self, other: &Progress) {
        self.connected += other.connected;
        self.deliveries += other.deliveries;
        self.errors += other.errors;
    }
}

/// The group's end of the conversation with the parent.
pub struct Control {
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    pub counters: Arc<Counters>,
}

impl Control {
    /// Tells the parent the current phase is complete.
    pub async fn ready(&self) -> anyhow::Result<()> {
        self.events
            .send(Event::Ready)
            .await
            .context("the parent went away")
    }

    /// The parent's next command.
    pub async fn next_command(&mut self) -> anyhow::Result<Command> {
        self.commands
            .recv()
            .await
            .context("the parent went away before finishing the run")
    }

    /// Waits for [`Command::Finish`], failing on anything else.
    pub async fn finish(&mut self) -> anyhow::Result<Published> {
        match self.next_command().await? {
            Command::Finish(published) => Ok(published),
            other => bail!("unexpected command {other:?}"),
        }
    }
}

/// Runs one group to completion, sending its events to `events`.
///
/// Errors are reported as [`Event::Failed`] too, so the caller only needs to
/// forward events.
pub async fn run(spec: GroupSpec, commands: mpsc::Receiver<Command>, events: mpsc::Sender<Event>) {
    let counters = Arc::new(Counters::default());
    let progress = tokio::spawn(report_progress(counters.clone(), events.clone()));
    let control = Control {
        commands,
        events: events.clone(),
        counters: counters.clone(),
    };
    let result = run_plan(spec, control).await;
    progress.abort();
    let last = match result {
        Ok(report) => {
            let _ = events.send(Event::Progress(counters.snapshot())).await;
            Event::Report(Box::new(report))
        }
        Err(error) => Event::Failed(format!("{error:#}")),
    };
    let _ = events.send(last).await;
}

async fn run_plan(spec: GroupSpec, control: Control) -> anyhow::Result<Report> {
    let connector = Arc::new(Connector::new(&spec.clients).await?);
    Ok(match spec.plan {
        Plan::Connect(plan) => {
            Report::Connect(connect::run_group(plan, spec.slice, connector, control).await?)
        }
        Plan::Fanout(plan) => Report::Fanout(
            fanout::run_group(plan, spec.slice, connector, &spec.clients, control).await?,
        ),
        Plan::Storm(plan) => {
            Report::Storm(storm::run_group(plan, spec.slice, connector, control).await?)
        }
        Plan::Churn(plan) => {
            Report::Churn(churn::run_group(plan, spec.slice, connector, control).await?)
        }
        Plan::Drain(plan) => Report::Drain(
            drain::run_group(plan, spec.slice, connector, &spec.clients, control).await?,
        ),
    })
}

async fn report_progress(counters: Arc<Counters>, events: mpsc::Sender<Event>) {
    let mut ticks = tokio::time::interval(PROGRESS_INTERVAL);
    loop {
        ticks.tick().await;
        if events
            .send(Event::Progress(counters.snapshot()))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// What a connection task tells its group about its first attempt.
#[derive(Debug)]
pub struct Outcome {
    /// Global index of the connection.
    pub index: u64,
    /// Latency to the HTTP 101, when the upgrade completed.
    pub handshake: Option<Duration>,
    /// When the upgrade completed, in unix nanoseconds.
    pub upgraded_at: Option<i64>,
    /// Latency to subscribed, or why it failed.
    pub result: Result<Duration, Failure>,
}

impl Outcome {
    pub fn of(index: u64, attempt: &Attempt) -> Outcome {
        Outcome {
            index,
            handshake: attempt.upgrade.map(|upgrade| upgrade.latency),
            upgraded_at: attempt.upgrade.map(|upgrade| upgrade.at_unix_nanos),
            result: match &attempt.result {
                Ok(session) => Ok(session.subscribed),
                Err(failure) => Err(failure.clone()),
            },
        }
    }
}

/// How connections were established: every scenario reports this.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EstablishStats {
    /// Connections attempted.
    pub attempted: u64,
    /// Connections upgraded (HTTP 101), subscribed or not.
    pub upgrades: u64,
    /// Connections upgraded and subscribed.
    pub connected: u64,
    /// TCP connect start to subscription confirmed, for connected ones.
    pub connect_latency: Micros,
    /// TCP connect start to HTTP 101, for upgraded ones.
    pub handshake_latency: Micros,
    /// Why attempts failed.
    pub failures: Reasons,
    /// Why established connections ended before the run did.
    pub disconnects: Reasons,
    /// When the last upgrade completed, in unix nanoseconds.
    pub last_upgrade_unix_nanos: i64,
}

impl EstablishStats {
    pub fn record(&mut self, outcome: &Outcome) {
        self.attempted += 1;
        if let Some(latency) = outcome.handshake {
            self.upgrades += 1;
            self.handshake_latency.record(latency);
        }
        if let Some(at) = outcome.upgraded_at {
            self.last_upgrade_unix_nanos = self.last_upgrade_unix_nanos.max(at);
        }
        match &outcome.result {
            Ok(latency) => {
                self.connected += 1;
                self.connect_latency.record(*latency);
            }
            Err(failure) => self.failures.add(failure.reason()),
        }
    }

    pub fn merge(&mut self, other: &EstablishStats) {
        self.attempted += other.attempted;
        self.upgrades += other.upgrades;
        self.connected += other.connected;
        self.connect_latency.merge(&other.connect_latency);
        self.handshake_latency.merge(&other.handshake_latency);
        self.failures.merge(&other.failures);
        self.disconnects.merge(&other.disconnects);
        self.last_upgrade_unix_nanos = self
            .last_upgrade_unix_nanos
            .max(other.last_upgrade_unix_nanos);
    }
}

/// The tokio instant corresponding to a unix time in nanoseconds; the past
/// maps to now.
pub fn instant_at(unix_nanos_then: i64) -> Instant {
    let ahead = unix_nanos_then.saturating_sub(unix_nanos());
    Instant::now() + Duration::from_nanos(u64::try_from(ahead).unwrap_or(0))
}

/// When connection `index` starts in an open-loop ramp at `rate` per second
/// beginning at `start`.
pub fn ramp_slot(start: Instant, index: u64, rate: f64) -> Instant {
    if rate.is_finite() && rate > 0.0 {
        start + Duration::from_secs_f64(index as f64 / rate)
    } else {
        start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_partition_the_indices() {
        let slices: Vec<Vec<u64>> = (0..3)
            .map(|group| Slice { group, groups: 3 }.indices(8).collect())
            .collect();
        assert_eq!(slices, [vec![0, 3, 6], vec![1, 4, 7], vec![2, 5]]);
        assert_eq!(
            Slice {
                group: 0,
                groups: 1
            }
            .indices(8)
            .count(),
            8
        );
    }
}
