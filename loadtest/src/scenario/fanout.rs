//! `fanout` and `slow`: subscribers spread over channels, one open-loop
//! publisher at a fixed total rate. Measures delivery latency (receive time
//! minus intended send time), loss, duplicates and reordering, and the
//! gateway's CPU per delivery. In `slow`, a fraction of the subscribers never
//! read after subscribing; the healthy ones are measured as in `fanout`, the
//! slow ones are checked at the end for how the gateway closed them.
//!
//! Both take faults (see [`crate::fault`]) and attackers (stalled readers,
//! slowloris sockets) beside the subscribers, count `gap` notices, judge
//! every subscriber's losses against what never reached the gateway (see
//! [`crate::loss`]), and assert what `--check` and `--expect-metric` ask.
//!
//! With `--history`, the channels are herald history channels: each
//! subscriber also accounts its deliveries by offset and epoch (see
//! [`crate::history`]), and one that loses its connection, or is made to
//! drop it (`--reconnect-fraction`), resubscribes with `since` its last
//! offset and must receive exactly what it missed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_tungstenite::tungstenite::Message;

use crate::cli::{Check, FanoutArgs, GlobalArgs};
use crate::client::{Attempt, ClientSpec, Connector, Failure, Session, Ws, close, unix_nanos};
use crate::fault::{FaultLog, FaultPlan};
use crate::group::{
    Command, Control, Counters, EstablishStats, Outcome, Plan as GroupPlan, Published, Report,
    Slice, instant_at, ramp_slot,
};
use crate::history::{
    self, HistoryStats, OffsetArrival, OffsetTracker, expected_ranges, reply_position, resume_frame,
};
use crate::loss::{ChannelOutage, SubscriberLoss, analyse};
use crate::proc::{Gateway, Usage};
use crate::publisher::{Fate, PublishReport, Publisher, Schedule};
use crate::report::{CheckOutcome, Summary, Table, round3};
use crate::scan::{FieldScanner, contains};
use crate::scenario::{group_specs, metric_checks, options, positive_rate, ramp_start};
use crate::scrape::{MetricsReport, Watch};
use crate::slowloris::{self, SlowlorisStats};
use crate::stats::{Arrival, LatencySummary, Micros, Reasons, SeqTracker};
use crate::worker::Fleet;

/// How long subscribers may take, after the last message was acknowledged,
/// to receive everything before the rest counts as missing.
const DRAIN_WAIT: Duration = Duration::from_secs(2);
/// How often the drain checks whether everything arrived.
const DRAIN_POLL: Duration = Duration::from_millis(10);
/// The gap between connecting the publisher and its first message.
const PUBLISH_LEAD: Duration = Duration::from_millis(50);
/// Pause after the last acknowledgement before sampling the gateway's CPU,
/// so that the last deliveries are included.
const CPU_SETTLE: Duration = Duration::from_millis(250);
/// A slow subscriber read at the end is "still open" once nothing arrives for this long...
const SLOW_IDLE: Duration = Duration::from_millis(500);
/// ...or once reading its backlog took this long in total.
const SLOW_READ_LIMIT: Duration = Duration::from_secs(10);
/// Latency histograms per group, each behind its own lock, to keep
/// contention between runtime threads low.
const LATENCY_SHARDS: usize = 16;
/// The first pause before a failed resubscription is tried again; it
/// doubles up to [`RESUME_BACKOFF_MAX`].
const RESUME_BACKOFF_MIN: Duration = Duration::from_millis(50);
const RESUME_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What each client group does in `fanout` and `slow`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// Subscribers in total, over all groups; subscriber `i` uses channel `i % channels`.
    pub subscribers: u64,
    /// Channels `fanout.0 .. fanout.<channels-1>`.
    pub channels: u64,
    /// Subscriber connections started per second.
    pub connect_rate: f64,
    /// Fraction of each channel's subscribers that never read (0 for `fanout`).
    pub slow_fraction: f64,
    /// Messages published, in total, before the measurement starts.
    pub warmup_messages: u64,
    /// When subscriber 0 starts, in unix nanoseconds.
    pub start_at_unix_nanos: i64,
    /// Stalled readers after the subscribers: indices `subscribers..subscribers + stalled`.
    pub stalled: u64,
    /// `SO_RCVBUF` of the stalled readers.
    pub stalled_rcvbuf: u32,
    /// Slowloris sockets, over all groups.
    pub slowloris: u64,
    /// The pause between two bytes of a slowloris socket.
    pub slowloris_interval: Duration,
    /// A frame containing this is a `gap` notice.
    pub gap_match: String,
    /// The channels have history: account deliveries by offset, resume with `since`.
    pub history: bool,
    /// Fraction of each channel's reading subscribers that disconnect every
    /// `reconnect_every` and resume.
    pub reconnect_fraction: f64,
    pub reconnect_every: Duration,
}

impl Plan {
    pub fn channel_of(&self, index: u64) -> u64 {
        index % self.channels.max(1)
    }

    /// Subscriber connections, stalled readers included.
    pub fn connections(&self) -> u64 {
        self.subscribers + self.stalled
    }

    /// Whether connection `index` is a stalled reader.
    pub fn is_stalled(&self, index: u64) -> bool {
        index >= self.subscribers
    }

    /// Whether subscriber `index` never reads: a stalled reader, or a slow
    /// subscriber. Slowness is decided by rank among the channel's
    /// subscribers, so every channel gets its share.
    pub fn is_slow(&self, index: u64) -> bool {
        if self.is_stalled(index) {
            return true;
        }
        let rank = index / self.channels.max(1);
        let slow_up_to = |count: u64| (count as f64 * self.slow_fraction + 1e-9).floor();
        slow_up_to(rank + 1) > slow_up_to(rank)
    }

    /// Whether subscriber `index` disconnects every `reconnect_every` and
    /// resumes: chosen by rank among its channel's subscribers, as slow ones
    /// are but from the other end of each run of ranks (the first of every
    /// `1 / fraction`, where the slow ones are the last), and never a slow one.
    pub fn reconnects(&self, index: u64) -> bool {
        if !self.history || self.is_slow(index) {
            return false;
        }
        let rank = index / self.channels.max(1);
        let chosen_up_to = |count: u64| (count as f64 * self.reconnect_fraction - 1e-9).ceil();
        chosen_up_to(rank + 1) > chosen_up_to(rank)
    }

    /// When subscriber `index` first disconnects, after it subscribed:
    /// between half a period and one and a half, spread evenly by a hash of
    /// its index, so that the disconnections of all of them spread over time.
    pub fn first_reconnect(&self, index: u64) -> Duration {
        let spread = (index.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
        self.reconnect_every.mul_f64(0.5 + spread)
    }

    /// How many warm-up messages go to `channel`: message `i` goes to
    /// channel `i % channels`, so these are its sequence numbers `0..n`.
    pub fn warmup_on(&self, channel: u64) -> u64 {
        let channels = self.channels.max(1);
        self.warmup_messages / channels + u64::from(channel < self.warmup_messages % channels)
    }
}

pub fn channel_name(channel: u64) -> String {
    format!("fanout.{channel}")
}

/// A group's result.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct GroupReport {
    pub establish: EstablishStats,
    pub healthy: DeliveryStats,
    pub slow: SlowStats,
    pub loss: LossStats,
    pub slowloris: SlowlorisStats,
    /// With --history: the reading subscribers' accounting by offset.
    pub history: HistoryStats,
}

/// The healthy subscribers' losses judged against the outage, and their
/// `gap` notices (see [`crate::loss`]).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct LossStats {
    /// Missing messages that never certainly reached the gateway.
    pub lost_in_outage: u64,
    /// Missing messages Redis counted as heard, freed with a killed
    /// connection where an announced outage begins (see [`crate::loss`]).
    pub lost_at_edge: u64,
    /// Missing messages that did reach it: loss the outage does not explain.
    pub lost_outside_outage: u64,
    /// Received messages whose publish failed after it was sent (possible).
    pub delivered_uncertain: u64,
    /// Received messages that were refused or heard by nobody (impossible).
    pub delivered_unreached: u64,
    /// Runs of consecutive missing messages, over all subscribers.
    pub loss_runs: u64,
    /// Runs no `gap` notice followed.
    pub unannounced_runs: u64,
    /// `gap` notices received, over all subscribers.
    pub gaps: u64,
    pub subscribers_without_gap: u64,
    pub min_gaps_per_subscriber: Option<u64>,
    pub max_gaps_per_subscriber: u64,
    /// Missing messages below the highest one each subscriber received.
    pub holes: u64,
    pub subscribers_with_holes: u64,
    /// Missing messages acknowledged before the --sigterm-at signal.
    pub lost_before_signal: u64,
}

impl LossStats {
    fn add(&mut self, loss: &SubscriberLoss, gaps: u64) {
        self.lost_in_outage += loss.lost_in_outage;
        self.lost_at_edge += loss.lost_at_edge;
        self.lost_outside_outage += loss.lost_outside_outage;
        self.delivered_uncertain += loss.delivered_uncertain;
        self.delivered_unreached += loss.delivered_unreached;
        self.loss_runs += loss.runs;
        self.unannounced_runs += loss.unannounced_runs;
        self.gaps += gaps;
        self.subscribers_without_gap += u64::from(gaps == 0);
        self.min_gaps_per_subscriber =
            Some(self.min_gaps_per_subscriber.map_or(gaps, |m| m.min(gaps)));
        self.max_gaps_per_subscriber = self.max_gaps_per_subscriber.max(gaps);
        self.holes += loss.holes;
        self.subscribers_with_holes += u64::from(loss.holes > 0);
        self.lost_before_signal += loss.lost_before_signal;
    }

    fn merge(&mut self, other: &LossStats) {
        self.lost_in_outage += other.lost_in_outage;
        self.lost_at_edge += other.lost_at_edge;
        self.lost_outside_outage += other.lost_outside_outage;
        self.delivered_uncertain += other.delivered_uncertain;
        self.delivered_unreached += other.delivered_unreached;
        self.loss_runs += other.loss_runs;
        self.unannounced_runs += other.unannounced_runs;
        self.gaps += other.gaps;
        self.subscribers_without_gap += other.subscribers_without_gap;
        self.min_gaps_per_subscriber =
            match (self.min_gaps_per_subscriber, other.min_gaps_per_subscriber) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        self.max_gaps_per_subscriber = self
            .max_gaps_per_subscriber
            .max(other.max_gaps_per_subscriber);
        self.holes += other.holes;
        self.subscribers_with_holes += other.subscribers_with_holes;
        self.lost_before_signal += other.lost_before_signal;
    }
}

/// Deliveries to subscribers that read, after the warm-up.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct DeliveryStats {
    /// Subscribed subscribers that read.
    pub subscribers: u64,
    /// Messages published on their channels, summed over them.
    pub expected: u64,
    /// Distinct messages they received.
    pub deliveries: u64,
    /// Expected messages never received (gaps and tail).
    pub missing: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// Subscribers missing at least one message.
    pub with_loss: u64,
    /// Receive time minus intended send time, first arrivals only.
    pub latency: Micros,
}

impl DeliveryStats {
    fn merge(&mut self, other: &DeliveryStats) {
        self.subscribers += other.subscribers;
        self.expected += other.expected;
        self.deliveries += other.deliveries;
        self.missing += other.missing;
        self.duplicates += other.duplicates;
        self.out_of_order += other.out_of_order;
        self.with_loss += other.with_loss;
        self.latency.merge(&other.latency);
    }
}

/// What became of the subscribers that never read.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct SlowStats {
    /// Slow subscribers that subscribed.
    pub subscribers: u64,
    /// Closed by the gateway with a close frame, by close code.
    pub close_codes: Reasons,
    /// Ended without a close frame (reset, EOF), by reason.
    pub ended_without_close: Reasons,
    /// Still open at the end.
    pub still_open: u64,
}

impl SlowStats {
    fn merge(&mut self, other: &SlowStats) {
        self.subscribers += other.subscribers;
        self.close_codes.merge(&other.close_codes);
        self.ended_without_close.merge(&other.ended_without_close);
        self.still_open += other.still_open;
    }

    fn closed_by_server(&self) -> u64 {
        self.close_codes.total()
    }
}

/// Parent side. `slow_fraction` is `None` for `fanout`.
pub async fn run(
    global: &GlobalArgs,
    args: &FanoutArgs,
    slow_fraction: Option<f64>,
) -> anyhow::Result<Summary> {
    let scenario = if slow_fraction.is_some() {
        "slow"
    } else {
        "fanout"
    };
    let slow_fraction = slow_fraction.unwrap_or(0.0);
    if !(0.0..1.0).contains(&slow_fraction) {
        bail!("--slow-fraction must be at least 0 and below 1");
    }
    if args.subscribers == 0 || args.channels == 0 {
        bail!("--subscribers and --channels must be at least 1");
    }
    positive_rate("--rate", args.rate)?;
    positive_rate("--connect-rate", args.connect_rate)?;
    if args.duration.is_zero() {
        bail!("--duration must be greater than zero");
    }
    let faults = &args.faults;
    if faults.sigterm_at.is_some() && global.pids.is_empty() {
        bail!("--sigterm-at signals the --pid processes: give at least one");
    }
    if faults.slowloris > 0 && faults.slowloris_interval.is_zero() {
        bail!("--slowloris-interval must be greater than zero");
    }
    if !(0.0..=1.0).contains(&args.history.reconnect_fraction) {
        bail!("--reconnect-fraction must be between 0 and 1");
    }
    if args.history.reconnect_fraction > 0.0 && args.history.reconnect_every.is_zero() {
        bail!("--reconnect-every must be greater than zero");
    }
    let publisher = Publisher::from_args(&args.publisher)?;
    let plan = Plan {
        subscribers: args.subscribers as u64,
        channels: args.channels as u64,
        connect_rate: args.connect_rate,
        slow_fraction,
        warmup_messages: (args.rate * args.warmup.as_secs_f64()).round() as u64,
        start_at_unix_nanos: ramp_start(global),
        stalled: faults.stalled as u64,
        stalled_rcvbuf: faults.stalled_rcvbuf,
        slowloris: faults.slowloris as u64,
        slowloris_interval: faults.slowloris_interval,
        gap_match: args.gap_match.clone(),
        history: args.history.history,
        reconnect_fraction: args.history.reconnect_fraction,
        reconnect_every: args.history.reconnect_every,
    };
    let fault_plan = FaultPlan {
        kill_pubsub_every: faults.kill_pubsub_every,
        redis_url: faults
            .fault_redis_url
            .clone()
            .or_else(|| args.publisher.redis_url.clone()),
        commands: faults.fault_exec.clone(),
        sigterm_at: faults.sigterm_at,
        pids: global.pids.clone(),
    };
    let measured_messages = ((args.rate * args.duration.as_secs_f64()).round() as u64).max(1);
    let channels: Vec<String> = (0..plan.channels).map(channel_name).collect();

    let gateway = Gateway::new(&global.pids);
    let mut watch = Watch::new(&args.metrics.metrics_urls);
    let idle = gateway.sample()?;
    let mut fleet = Fleet::start(group_specs(global, GroupPlan::Fanout(plan.clone()))?)?;
    fleet.ready().await?;
    let subscribed = gateway.sample()?;
    watch.before().await;

    let publisher = publisher.connect(&channels).await?;
    let start_unix_nanos = unix_nanos() + PUBLISH_LEAD.as_nanos() as i64;
    let measure_from = start_unix_nanos + args.warmup.as_nanos() as i64;
    let window_start = {
        let gateway = gateway.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(instant_at(measure_from)).await;
            gateway.sample()
        })
    };
    let running_faults =
        crate::fault::start(&fault_plan, instant_at(measure_from), args.duration).await?;
    let published = publisher
        .run(Schedule {
            channels,
            rate: args.rate,
            total: plan.warmup_messages + measured_messages,
            payload_bytes: args.payload,
            start_unix_nanos,
        })
        .await?;
    let acknowledged_per_sec = acknowledged_rate(&published, start_unix_nanos);
    // A gateway stopped by --sigterm-at can no longer be sampled.
    let window_end = gateway.sample_after(CPU_SETTLE).await.unwrap_or(None);
    let window_start = window_start
        .await
        .context("the gateway sampling task failed")?
        .unwrap_or(None);
    let fault_log = running_faults.finish().await?;
    if !watch.is_empty() {
        watch.after().await;
    }

    let signal_at = fault_log
        .signals
        .iter()
        .map(|signal| signal.at_unix_nanos)
        .min();
    let reports = fleet
        .finish(Command::Finish(Published {
            per_channel: published.sent_per_channel.clone(),
            outage: outage(&published, signal_at),
            history: if plan.history {
                published
                    .records
                    .iter()
                    .enumerate()
                    .map(|(channel, records)| {
                        expected_ranges(
                            records.iter().skip(plan.warmup_on(channel as u64) as usize),
                        )
                    })
                    .collect()
            } else {
                Vec::new()
            },
        }))
        .await?;
    let mut total = GroupReport::default();
    for report in reports {
        match report {
            Report::Fanout(group) => {
                total.establish.merge(&group.establish);
                total.healthy.merge(&group.healthy);
                total.slow.merge(&group.slow);
                total.loss.merge(&group.loss);
                total.slowloris.merge(&group.slowloris);
                total.history.merge(&group.history);
            }
            other => bail!("a group answered with the wrong report: {other:?}"),
        }
    }
    let gateway = match (idle, subscribed, window_start, window_end) {
        (Some(idle), Some(subscribed), Some(start), Some(end)) => Some(GatewayResults {
            rss_idle_bytes: idle.rss_bytes,
            rss_subscribed_bytes: subscribed.rss_bytes,
            window: Usage::between(start, end),
        }),
        _ => None,
    };
    let results = Results::new(
        &plan,
        args.duration,
        &published,
        acknowledged_per_sec,
        &total,
        gateway,
        scenario == "slow" || plan.stalled > 0,
        (!fault_plan.is_empty()).then_some(fault_log),
        (!watch.is_empty()).then(|| watch.report()),
    );
    let mut checks = fault_checks(args, &plan, &results);
    checks.extend(metric_checks(&watch, &args.metrics.expect_metrics));
    let table = results.table();
    let mut config = options(global, args)?;
    config.push(serde_json::json!({ "slow_fraction": slow_fraction }));
    Ok(Summary::new(scenario, &config, &results, table)?.with_checks(checks))
}

/// Publishes acknowledged per second, warm-up included, from the first one's
/// intended time to the last answer: the publisher's throughput, below the
/// asked rate when it or what it publishes to could not keep up.
fn acknowledged_rate(published: &PublishReport, start_unix_nanos: i64) -> f64 {
    let elapsed = published.last_settled_unix_nanos - start_unix_nanos;
    if elapsed <= 0 {
        return 0.0;
    }
    round3(published.acknowledged as f64 / (elapsed as f64 / 1e9))
}

/// Per channel, the messages that never certainly reached the gateway, and
/// how many were acknowledged before the signal (if there was one).
fn outage(published: &PublishReport, signal_at: Option<i64>) -> Vec<ChannelOutage> {
    published
        .records
        .iter()
        .map(|records| {
            let mut outage = ChannelOutage::default();
            for (seq, record) in records.iter().enumerate() {
                if !record.fate.reached() {
                    outage.unreached.push(seq as u64);
                    if record.fate.uncertain() {
                        outage.uncertain.push(seq as u64);
                    }
                }
            }
            if let Some(signal_at) = signal_at {
                outage.settled_before_signal = records
                    .iter()
                    .take_while(|record| {
                        matches!(record.fate, Fate::Accepted { .. })
                            && record.settled_at_unix_nanos < signal_at
                    })
                    .count() as u64;
            }
            outage
        })
        .collect()
}

/// What `--check`, `--exit-within` and a complete set of connections say.
fn fault_checks(args: &FanoutArgs, plan: &Plan, results: &Results) -> Vec<CheckOutcome> {
    let faults = &args.faults;
    if faults.checks.is_empty()
        && faults.exit_within.is_none()
        && args.metrics.expect_metrics.is_empty()
    {
        return Vec::new();
    }
    let loss = &results.loss;
    let mut checks = vec![CheckOutcome::new(
        "all-connected",
        results.connected == plan.connections(),
        format!("{} of {} subscribed", results.connected, plan.connections()),
    )];
    let reordered = format!(
        "{} duplicates, {} out of order",
        results.duplicates, results.out_of_order
    );
    let clean_order = results.duplicates == 0 && results.out_of_order == 0;
    for check in &faults.checks {
        let (passed, detail) = match check {
            Check::Lossless => (
                results.missing == 0 && clean_order && results.disconnects.total() == 0,
                format!(
                    "{} missing, {reordered}, {} disconnects",
                    results.missing,
                    results.disconnects.total()
                ),
            ),
            Check::LossOnlyInOutage => (
                loss.lost_outside_outage == 0 && loss.delivered_unreached == 0 && clean_order,
                format!(
                    "{} lost in the outage ({} messages unreached, {} uncertain of them delivered), {} at its edge, {} lost outside it, {} refused or unheard yet delivered, {reordered}",
                    loss.lost_in_outage,
                    results.publish_fates.unreached,
                    loss.delivered_uncertain,
                    loss.lost_at_edge,
                    loss.lost_outside_outage,
                    loss.delivered_unreached
                ),
            ),
            Check::LossAnnounced => (
                loss.unannounced_runs == 0,
                format!(
                    "{} of {} runs of losses without a gap after them",
                    loss.unannounced_runs, loss.loss_runs
                ),
            ),
            Check::GapEverySubscriber => (
                results.healthy_subscribers > 0 && loss.subscribers_without_gap == 0,
                format!(
                    "{} of {} subscribers without a gap (gaps per subscriber {}..{})",
                    loss.subscribers_without_gap,
                    results.healthy_subscribers,
                    loss.min_gaps_per_subscriber.unwrap_or(0),
                    loss.max_gaps_per_subscriber
                ),
            ),
            Check::GapPerKill => {
                let kills = results.faults.as_ref().map_or(0, FaultLog::effective_kills);
                let fewest = loss.min_gaps_per_subscriber.unwrap_or(0);
                (
                    kills > 0 && fewest >= kills,
                    format!(
                        "{kills} CLIENT KILLs took effect; gaps per subscriber {fewest}..{}",
                        loss.max_gaps_per_subscriber
                    ),
                )
            }
            Check::NoDisconnects => (
                results.disconnects.total() == 0,
                format!("disconnects: {}", results.disconnects.describe()),
            ),
            Check::FlushedBeforeClose => {
                let signalled = results
                    .faults
                    .as_ref()
                    .is_some_and(|log| !log.signals.is_empty());
                (
                    signalled && loss.holes == 0 && loss.lost_before_signal == 0,
                    format!(
                        "{} messages missing below a subscriber's last one ({} subscribers), {} acknowledged before the signal missing",
                        loss.holes, loss.subscribers_with_holes, loss.lost_before_signal
                    ),
                )
            }
            Check::OffsetsExact => match &results.history {
                Some(history) => (
                    history.expected_offsets > 0
                        && history.missing == 0
                        && history.duplicates == 0
                        && history.out_of_order == 0
                        && history.unsequenced == 0
                        && history.ignored == 0,
                    format!(
                        "{} offsets expected: {} missing, {} duplicated, {} out of order; {} deliveries without an offset, {} ignored",
                        history.expected_offsets,
                        history.missing,
                        history.duplicates,
                        history.out_of_order,
                        history.unsequenced,
                        history.ignored
                    ),
                ),
                None => (false, "needs --history".to_owned()),
            },
            Check::NoGap => (
                loss.gaps == 0,
                format!(
                    "{} gaps, at most {} per subscriber",
                    loss.gaps, loss.max_gaps_per_subscriber
                ),
            ),
            Check::Recovered => match &results.history {
                Some(history) => (
                    history.resumes > 0
                        && history.recovered == history.resumes
                        && history.resubscribed_plain == 0
                        && history.recovered_messages == history.promised_messages,
                    format!(
                        "{} of {} resumes recovered (not: {}), {} resubscribed without since; {} messages replayed of {} promised",
                        history.recovered,
                        history.resumes,
                        history.not_recovered.describe(),
                        history.resubscribed_plain,
                        history.recovered_messages,
                        history.promised_messages
                    ),
                ),
                None => (false, "needs --history".to_owned()),
            },
            Check::Closed1001 => {
                let closed = results.disconnects.count("closed 1001");
                (
                    results.healthy_subscribers > 0 && closed == results.healthy_subscribers,
                    format!(
                        "{closed} of {} closed with 1001; disconnects: {}",
                        results.healthy_subscribers,
                        results.disconnects.describe()
                    ),
                )
            }
        };
        checks.push(CheckOutcome::new(kebab(check), passed, detail));
    }
    if let Some(limit) = faults.exit_within {
        let signals = results
            .faults
            .as_ref()
            .map(|log| log.signals.clone())
            .unwrap_or_default();
        let slowest = signals
            .iter()
            .map(|signal| signal.exited_after_ms)
            .try_fold(0.0f64, |slowest, exited| exited.map(|ms| slowest.max(ms)));
        checks.push(CheckOutcome::new(
            "exit-within",
            !signals.is_empty() && slowest.is_some_and(|ms| ms <= limit.as_secs_f64() * 1000.0),
            match slowest {
                Some(ms) => format!("exited {ms:.0} ms after SIGTERM (limit {limit:?})"),
                None => "a signalled process did not exit".to_owned(),
            },
        ));
    }
    checks
}

/// A check's name as written on the command line.
fn kebab(check: &Check) -> String {
    serde_json::to_value(check)
        .ok()
        .and_then(|value| value.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{check:?}"))
}

/// Gateway usage in `fanout` and `slow`.
#[derive(Debug, Serialize)]
struct GatewayResults {
    /// Before any subscriber connected.
    rss_idle_bytes: u64,
    /// Once every subscriber was subscribed.
    rss_subscribed_bytes: u64,
    /// From the end of the warm-up to shortly after the last acknowledgement.
    window: Usage,
}

/// The `fanout` and `slow` results. Delivery figures are about subscribers
/// that read (all of them in `fanout`).
#[derive(Debug, Serialize)]
struct Results {
    subscribers: u64,
    /// Subscribed, slow ones included.
    connected: u64,
    connect_failures: Reasons,
    channels: u64,
    /// Messages published after the warm-up.
    published: u64,
    warmup_messages: u64,
    /// Publish requests acknowledged, warm-up included.
    publish_acknowledged: u64,
    publish_errors: Reasons,
    /// The publisher's worst delay behind its schedule.
    publisher_max_lag_ms: f64,
    /// Publishes acknowledged per second (warm-up included), from the first
    /// one's intended time to the last answer.
    acknowledged_per_sec: f64,
    healthy_subscribers: u64,
    expected_deliveries: u64,
    deliveries: u64,
    deliveries_per_sec: f64,
    missing: u64,
    duplicates: u64,
    out_of_order: u64,
    subscribers_with_loss: u64,
    /// Subscribers that read and lost their connection, by reason.
    disconnects: Reasons,
    latency_ms: LatencySummary,
    /// Gateway CPU per delivery over the measured window.
    cpu_us_per_delivery: Option<f64>,
    gateway: Option<GatewayResults>,
    slow: Option<SlowResults>,
    /// How the publishes fared.
    publish_fates: FateCounts,
    /// The losses judged against the outage, and the `gap` notices.
    loss: LossStats,
    /// The faults injected, when any were.
    faults: Option<FaultLog>,
    slowloris: Option<SlowlorisResults>,
    /// What changed in the gateways' metrics (`--metrics-url`).
    metrics: Option<MetricsReport>,
    /// With --history: the accounting by offset, and the resumes.
    history: Option<HistoryResults>,
}

/// The reading subscribers' deliveries by offset, and their resumes.
#[derive(Debug, Serialize)]
struct HistoryResults {
    /// Offsets the measured publishes landed at, summed over the subscribers.
    expected_offsets: u64,
    missing: u64,
    duplicates: u64,
    out_of_order: u64,
    /// Deliveries without an offset and epoch.
    unsequenced: u64,
    /// Offsets too far from the rest of their epoch to be tracked.
    ignored: u64,
    subscribers_with_loss: u64,
    max_missing_per_subscriber: u64,
    subscribers_with_epoch_change: u64,
    /// Disconnections made by the tool (`--reconnect-fraction`).
    forced_disconnects: u64,
    /// Resubscriptions with `since`, confirmed.
    resumes: u64,
    recovered: u64,
    /// `recovered: false` (or no position in the reply), by reason.
    not_recovered: Reasons,
    /// Resubscriptions without `since`: no position was known yet.
    resubscribed_plain: u64,
    /// Messages replayed after recovered replies, and what those replies promised.
    recovered_messages: u64,
    promised_messages: u64,
    /// Failed reconnection attempts (each retried), by reason.
    resume_failures: Reasons,
    /// From a disconnection to the resubscription's reply.
    resume_ms: LatencySummary,
}

impl HistoryResults {
    fn new(stats: &HistoryStats) -> HistoryResults {
        HistoryResults {
            expected_offsets: stats.expected,
            missing: stats.missing,
            duplicates: stats.duplicates,
            out_of_order: stats.out_of_order,
            unsequenced: stats.unsequenced,
            ignored: stats.ignored,
            subscribers_with_loss: stats.subscribers_with_loss,
            max_missing_per_subscriber: stats.max_missing_per_subscriber,
            subscribers_with_epoch_change: stats.subscribers_with_epoch_change,
            forced_disconnects: stats.forced_disconnects,
            resumes: stats.resumes,
            recovered: stats.recovered,
            not_recovered: stats.not_recovered.clone(),
            resubscribed_plain: stats.resubscribed_plain,
            recovered_messages: stats.recovered_messages,
            promised_messages: stats.promised_messages,
            resume_failures: stats.resume_failures.clone(),
            resume_ms: stats.resume_time.summary(),
        }
    }
}

/// The publishes by fate, measured ones only.
#[derive(Debug, Default, Serialize)]
struct FateCounts {
    accepted: u64,
    /// Accepted by Redis but heard by no subscriber (no gateway subscribed).
    unheard: u64,
    refused: u64,
    /// Failed after they were sent; they may have run.
    uncertain: u64,
    /// Not certainly received by the gateway: the outage.
    unreached: u64,
}

impl FateCounts {
    fn new(plan: &Plan, published: &PublishReport) -> FateCounts {
        let mut counts = FateCounts::default();
        for (channel, records) in published.records.iter().enumerate() {
            for record in records.iter().skip(plan.warmup_on(channel as u64) as usize) {
                match record.fate {
                    Fate::Accepted { receivers } => {
                        counts.accepted += 1;
                        counts.unheard += u64::from(receivers == Some(0));
                    }
                    Fate::Refused => counts.refused += 1,
                    Fate::Uncertain | Fate::Unanswered => counts.uncertain += 1,
                }
                counts.unreached += u64::from(!record.fate.reached());
            }
        }
        counts
    }
}

/// The slowloris sockets.
#[derive(Debug, Serialize)]
struct SlowlorisResults {
    sockets: u64,
    opened: u64,
    closed_by_gateway: u64,
    answered: u64,
    bytes_sent: u64,
    connect_failures: Reasons,
    /// How long the connections the gateway closed had lived.
    lifetime_ms: LatencySummary,
}

/// Slow subscribers in `slow`.
#[derive(Debug, Serialize)]
struct SlowResults {
    subscribers: u64,
    closed_by_server: u64,
    close_codes: Reasons,
    ended_without_close: Reasons,
    still_open: u64,
}

impl Results {
    #[allow(clippy::too_many_arguments)]
    fn new(
        plan: &Plan,
        duration: Duration,
        published: &PublishReport,
        acknowledged_per_sec: f64,
        total: &GroupReport,
        gateway: Option<GatewayResults>,
        slow: bool,
        faults: Option<FaultLog>,
        metrics: Option<MetricsReport>,
    ) -> Results {
        let measured: u64 = published
            .sent_per_channel
            .iter()
            .enumerate()
            .map(|(channel, &sent)| sent.saturating_sub(plan.warmup_on(channel as u64)))
            .sum();
        let healthy = &total.healthy;
        Results {
            subscribers: plan.subscribers,
            connected: total.establish.connected,
            connect_failures: total.establish.failures.clone(),
            channels: plan.channels,
            published: measured,
            warmup_messages: plan.warmup_messages,
            publish_acknowledged: published.acknowledged,
            publish_errors: published.errors.clone(),
            publisher_max_lag_ms: round3(published.max_lag.as_secs_f64() * 1000.0),
            acknowledged_per_sec,
            healthy_subscribers: healthy.subscribers,
            expected_deliveries: healthy.expected,
            deliveries: healthy.deliveries,
            deliveries_per_sec: round3(healthy.deliveries as f64 / duration.as_secs_f64()),
            missing: healthy.missing,
            duplicates: healthy.duplicates,
            out_of_order: healthy.out_of_order,
            subscribers_with_loss: healthy.with_loss,
            disconnects: total.establish.disconnects.clone(),
            latency_ms: healthy.latency.summary(),
            cpu_us_per_delivery: gateway
                .as_ref()
                .and_then(|gateway| gateway.window.cpu_micros_per(healthy.deliveries))
                .map(round3),
            gateway,
            slow: slow.then(|| SlowResults {
                subscribers: total.slow.subscribers,
                closed_by_server: total.slow.closed_by_server(),
                close_codes: total.slow.close_codes.clone(),
                ended_without_close: total.slow.ended_without_close.clone(),
                still_open: total.slow.still_open,
            }),
            publish_fates: FateCounts::new(plan, published),
            loss: total.loss.clone(),
            faults,
            slowloris: (plan.slowloris > 0).then(|| SlowlorisResults {
                sockets: total.slowloris.sockets,
                opened: total.slowloris.opened,
                closed_by_gateway: total.slowloris.closed_by_gateway,
                answered: total.slowloris.answered,
                bytes_sent: total.slowloris.bytes_sent,
                connect_failures: total.slowloris.connect_failures.clone(),
                lifetime_ms: total.slowloris.lifetime.summary(),
            }),
            metrics,
            history: plan.history.then(|| HistoryResults::new(&total.history)),
        }
    }

    fn table(&self) -> Table {
        let mut table = Table::default();
        table
            .row("subscribers", self.subscribers)
            .row("connected", self.connected)
            .reasons("connect failures", &self.connect_failures)
            .row("channels", self.channels)
            .row(
                "published",
                format!("{} (+{} warm-up)", self.published, self.warmup_messages),
            )
            .reasons("publish errors", &self.publish_errors)
            .row("publisher max lag ms", self.publisher_max_lag_ms)
            .row("acknowledged/s", self.acknowledged_per_sec);
        if self.slow.is_some() {
            table.section("healthy subscribers");
        }
        table
            .row("expected deliveries", self.expected_deliveries)
            .row("deliveries", self.deliveries)
            .row("deliveries/s", self.deliveries_per_sec)
            .latency("latency ms", &self.latency_ms)
            .row(
                "missing / dup / ooo",
                format!(
                    "{} / {} / {}",
                    self.missing, self.duplicates, self.out_of_order
                ),
            )
            .row("subscribers with loss", self.subscribers_with_loss)
            .reasons("disconnects", &self.disconnects);
        if let Some(history) = &self.history {
            table
                .section("history (by offset)")
                .row("expected offsets", history.expected_offsets)
                .row(
                    "missing / dup / ooo",
                    format!(
                        "{} / {} / {}",
                        history.missing, history.duplicates, history.out_of_order
                    ),
                )
                .row("subscribers with loss", history.subscribers_with_loss)
                .row(
                    "without offset / ignored",
                    format!("{} / {}", history.unsequenced, history.ignored),
                )
                .row(
                    "epoch changes (subscribers)",
                    history.subscribers_with_epoch_change,
                )
                .row("forced disconnects", history.forced_disconnects)
                .row(
                    "resumes (recovered)",
                    format!("{} ({})", history.resumes, history.recovered),
                )
                .reasons("not recovered", &history.not_recovered)
                .row("resubscribed without since", history.resubscribed_plain)
                .row(
                    "replayed / promised",
                    format!(
                        "{} / {}",
                        history.recovered_messages, history.promised_messages
                    ),
                )
                .reasons("resume failures", &history.resume_failures)
                .latency("resume ms", &history.resume_ms);
        }
        let fates = &self.publish_fates;
        if fates.unreached > 0 || self.loss.gaps > 0 || self.faults.is_some() {
            let loss = &self.loss;
            table
                .section("faults")
                .row(
                    "publishes",
                    format!(
                        "{} accepted ({} heard by nobody), {} refused, {} uncertain",
                        fates.accepted, fates.unheard, fates.refused, fates.uncertain
                    ),
                )
                .row(
                    "lost in / at edge / outside",
                    format!(
                        "{} / {} / {}",
                        loss.lost_in_outage, loss.lost_at_edge, loss.lost_outside_outage
                    ),
                )
                .row(
                    "delivered though unreached",
                    format!(
                        "{} uncertain, {} refused or unheard",
                        loss.delivered_uncertain, loss.delivered_unreached
                    ),
                )
                .row(
                    "loss runs (unannounced)",
                    format!("{} ({})", loss.loss_runs, loss.unannounced_runs),
                )
                .row(
                    "gaps per subscriber",
                    format!(
                        "{}..{} ({} total, {} subscribers without)",
                        loss.min_gaps_per_subscriber.unwrap_or(0),
                        loss.max_gaps_per_subscriber,
                        loss.gaps,
                        loss.subscribers_without_gap
                    ),
                )
                .row(
                    "holes (subscribers)",
                    format!("{} ({})", loss.holes, loss.subscribers_with_holes),
                )
                .row("lost before signal", loss.lost_before_signal);
            if let Some(log) = &self.faults {
                if !log.kills.is_empty() {
                    let killed: u64 = log.kills.iter().filter_map(|kill| kill.killed).sum();
                    table.row(
                        "CLIENT KILLs",
                        format!("{} ({killed} connections)", log.kills.len()),
                    );
                }
                for command in &log.commands {
                    table.row(
                        "command",
                        format!(
                            "at {:.0} ms: {} -> {:?}",
                            command.at_ms, command.command, command.status
                        ),
                    );
                }
                for signal in &log.signals {
                    table.row(
                        "SIGTERM",
                        format!(
                            "pid {} at {:.0} ms, exited after {}",
                            signal.pid,
                            signal.at_ms,
                            signal
                                .exited_after_ms
                                .map_or("never".to_owned(), |ms| format!("{ms:.0} ms"))
                        ),
                    );
                }
            }
        }
        if let Some(slowloris) = &self.slowloris {
            table
                .section("slowloris")
                .row("sockets", slowloris.sockets)
                .row(
                    "opened / closed by gateway",
                    format!("{} / {}", slowloris.opened, slowloris.closed_by_gateway),
                )
                .reasons("connect failures", &slowloris.connect_failures)
                .latency("lifetime ms", &slowloris.lifetime_ms);
        }
        if let Some(slow) = &self.slow {
            table
                .section("slow subscribers")
                .row("subscribers", slow.subscribers)
                .reasons("closed by server", &slow.close_codes)
                .reasons("ended without close", &slow.ended_without_close)
                .row("still open", slow.still_open);
        }
        if let Some(gateway) = &self.gateway {
            table
                .section("gateway (--pid)")
                .row("rss idle", format!("{} bytes", gateway.rss_idle_bytes))
                .row(
                    "rss subscribed",
                    format!("{} bytes", gateway.rss_subscribed_bytes),
                )
                .row(
                    "rss after",
                    format!("{} bytes", gateway.window.rss_after_bytes),
                )
                .row("cpu seconds (window)", round3(gateway.window.cpu_seconds));
        }
        if let Some(micros) = self.cpu_us_per_delivery {
            table.row("cpu/delivery", format!("{micros} µs"));
        }
        table
    }
}

/// State shared by a group's subscriber tasks.
struct Shared {
    plan: Plan,
    connector: Arc<Connector>,
    counters: Arc<Counters>,
    ts: FieldScanner,
    seq: FieldScanner,
    /// Bytes that mark a `gap` notice.
    gap_match: Vec<u8>,
    /// Sharded latency histograms; subscriber `i` uses shard `i % LATENCY_SHARDS`.
    latency: Vec<Mutex<Micros>>,
    /// First arrivals of measured messages, for the drain to know when
    /// everything has arrived.
    fresh: AtomicU64,
    /// herald's `offset` and `epoch` fields of a delivery on a history channel.
    offset: FieldScanner,
    epoch: FieldScanner,
    /// Set once publishing is over: no more disconnections are made.
    published: AtomicBool,
}

impl Shared {
    /// Records one received frame; frames without both fields are ignored.
    /// Returns the frame's sequence number, warm-up included, if it had one.
    fn on_frame(
        &self,
        frame: &[u8],
        warmup: u64,
        tracker: &mut SeqTracker,
        shard: usize,
    ) -> Option<u64> {
        let received_at = unix_nanos();
        let (Some(seq), Some(ts)) = (self.seq.find(frame), self.ts.find(frame)) else {
            return None;
        };
        let seq = u64::try_from(seq).ok()?;
        if seq < warmup || seq >= SeqTracker::MAX_SEQ {
            return Some(seq);
        }
        if tracker.observe(seq) == Arrival::Duplicate {
            return Some(seq);
        }
        self.fresh.fetch_add(1, Ordering::Relaxed);
        self.counters.deliveries.fetch_add(1, Ordering::Relaxed);
        self.latency[shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record_micros(received_at.saturating_sub(ts) / 1000);
        Some(seq)
    }
}

/// How a subscriber task ended.
enum SubscriberEnd {
    /// It never subscribed (already reported as an outcome).
    NotConnected,
    /// A reading subscriber, with what it received.
    Healthy {
        channel: u64,
        tracker: SeqTracker,
        /// For each `gap` notice, the highest sequence number received
        /// before it (warm-up included), or -1.
        gaps: Vec<i64>,
        /// Why its connections ended before the run did (with --history it
        /// resumed after each).
        disconnects: Vec<Failure>,
        /// With --history: its offsets and resumes.
        history: Option<Box<SubscriberHistory>>,
    },
    /// A subscriber that never read.
    Slow(SlowEnd),
}

/// What a slow subscriber found when finally reading.
enum SlowEnd {
    Closed(Option<u16>),
    Ended(Failure),
    StillOpen,
}

/// Client side.
pub async fn run_group(
    plan: Plan,
    slice: Slice,
    connector: Arc<Connector>,
    clients: &ClientSpec,
    mut control: Control,
) -> anyhow::Result<GroupReport> {
    let start = instant_at(plan.start_at_unix_nanos);
    let indices: Vec<u64> = slice.indices(plan.connections()).collect();
    let shared = Arc::new(Shared {
        plan: plan.clone(),
        connector: connector.clone(),
        counters: control.counters.clone(),
        ts: FieldScanner::new(&clients.ts_field),
        seq: FieldScanner::new(&clients.seq_field),
        gap_match: plan.gap_match.as_bytes().to_vec(),
        latency: (0..LATENCY_SHARDS).map(|_| Mutex::default()).collect(),
        fresh: AtomicU64::new(0),
        offset: FieldScanner::new("offset"),
        epoch: FieldScanner::new("epoch"),
        published: AtomicBool::new(false),
    });
    let (stop, stopped) = watch::channel(false);
    let mut attackers = JoinSet::new();
    for index in slice.indices(plan.slowloris) {
        // Offset from the subscribers' indices, so that they spread over the
        // source addresses and gateways the same way.
        attackers.spawn(slowloris::run(
            plan.connections() + index,
            connector.clone(),
            plan.slowloris_interval,
            stopped.clone(),
        ));
    }
    // Each task sends exactly one outcome, so this bound is never reached.
    let (outcomes, mut outcomes_received) = mpsc::channel(indices.len().max(1));
    let mut tasks = JoinSet::new();
    for &index in &indices {
        tasks.spawn(subscriber(
            index,
            ramp_slot(start, index, plan.connect_rate),
            shared.clone(),
            outcomes.clone(),
            stopped.clone(),
        ));
    }
    drop(outcomes);
    let mut report = GroupReport::default();
    let mut healthy_per_channel = vec![0u64; plan.channels as usize];
    while let Some(outcome) = outcomes_received.recv().await {
        report.establish.record(&outcome);
        if outcome.result.is_ok() && !plan.is_slow(outcome.index) {
            healthy_per_channel[plan.channel_of(outcome.index) as usize] += 1;
        }
    }
    control.ready().await?;
    let published = control.finish().await?;
    shared.published.store(true, Ordering::Relaxed);
    let published_on = |channel: u64| {
        published
            .per_channel
            .get(channel as usize)
            .copied()
            .unwrap_or(0)
    };

    // Drain: wait until every healthy subscriber has every measured message.
    let everything: u64 = healthy_per_channel
        .iter()
        .enumerate()
        .map(|(channel, &subscribers)| {
            let channel = channel as u64;
            subscribers * published_on(channel).saturating_sub(plan.warmup_on(channel))
        })
        .sum();
    let deadline = Instant::now() + DRAIN_WAIT;
    while shared.fresh.load(Ordering::Relaxed) < everything && Instant::now() < deadline {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    let _ = stop.send(true);

    while let Some(joined) = tasks.join_next().await {
        let end = joined.context("a subscriber task failed")?;
        match end {
            SubscriberEnd::NotConnected => {}
            SubscriberEnd::Healthy {
                channel,
                tracker,
                gaps,
                disconnects,
                history,
            } => {
                let warmup = plan.warmup_on(channel);
                let sent = published_on(channel).max(warmup);
                let missing = tracker.missing_in(warmup, sent);
                let healthy = &mut report.healthy;
                healthy.subscribers += 1;
                healthy.expected += sent - warmup;
                healthy.deliveries += sent - warmup - missing;
                healthy.missing += missing;
                healthy.duplicates += tracker.duplicates;
                healthy.out_of_order += tracker.out_of_order;
                healthy.with_loss += u64::from(missing > 0);
                let loss = analyse(&tracker, warmup, sent, published.outage_for(channel), &gaps);
                report.loss.add(&loss, gaps.len() as u64);
                for failure in disconnects {
                    report.establish.disconnects.add(failure.reason());
                }
                if let Some(subscriber) = history {
                    let offsets =
                        history::analyse(&subscriber.offsets, published.history_for(channel));
                    report.history.add(&offsets, &subscriber.offsets);
                    report.history.merge(&subscriber.stats);
                }
            }
            SubscriberEnd::Slow(end) => {
                let slow = &mut report.slow;
                slow.subscribers += 1;
                match end {
                    SlowEnd::Closed(Some(code)) => slow.close_codes.add(code.to_string()),
                    SlowEnd::Closed(None) => slow.close_codes.add("no code"),
                    SlowEnd::Ended(failure) => slow.ended_without_close.add(failure.reason()),
                    SlowEnd::StillOpen => slow.still_open += 1,
                }
            }
        }
    }
    while let Some(joined) = attackers.join_next().await {
        report
            .slowloris
            .merge(&joined.context("a slowloris task failed")?);
    }
    for shard in &shared.latency {
        report
            .healthy
            .latency
            .merge(&shard.lock().unwrap_or_else(PoisonError::into_inner));
    }
    Ok(report)
}

/// One subscriber: start on schedule, subscribe to its channel, then either
/// read and track every delivery, or (slow) never read until the end.
async fn subscriber(
    index: u64,
    start_at: Instant,
    shared: Arc<Shared>,
    outcomes: mpsc::Sender<Outcome>,
    mut stopped: watch::Receiver<bool>,
) -> SubscriberEnd {
    tokio::time::sleep_until(start_at).await;
    let channel = shared.plan.channel_of(index);
    let recv_buffer = shared
        .plan
        .is_stalled(index)
        .then_some(shared.plan.stalled_rcvbuf);
    let attempt = if shared.plan.history && !shared.plan.is_slow(index) {
        // Keep the reply, for the channel's position, and whatever came before it.
        let requests = shared.connector.requests(&[channel_name(channel)]);
        shared.connector.open_keeping(index, 0, &requests).await
    } else {
        shared
            .connector
            .open_with(index, &[channel_name(channel)], recv_buffer)
            .await
    };
    let _ = outcomes.send(Outcome::of(index, &attempt)).await;
    drop(outcomes);
    let Ok(session) = attempt.result else {
        shared.counters.error();
        return SubscriberEnd::NotConnected;
    };
    if shared.plan.history && !shared.plan.is_slow(index) {
        return Resumer::new(index, channel, shared)
            .run(session, stopped)
            .await;
    }
    shared.counters.connection_opened();
    let mut ws = session.ws;
    if shared.plan.is_slow(index) {
        // Never poll the socket until the run is over.
        let _ = stopped.wait_for(|stop| *stop).await;
        let end = read_until_close(ws).await;
        shared.counters.connection_closed();
        return SubscriberEnd::Slow(end);
    }
    let warmup = shared.plan.warmup_on(channel);
    let shard = index as usize % LATENCY_SHARDS;
    let mut tracker = SeqTracker::default();
    let mut gaps = Vec::new();
    let mut highest: i64 = -1;
    let mut on_frame = |frame: &[u8], tracker: &mut SeqTracker| match shared
        .on_frame(frame, warmup, tracker, shard)
    {
        Some(seq) => highest = highest.max(seq as i64),
        None => {
            if contains(frame, &shared.gap_match) {
                gaps.push(highest);
            }
        }
    };
    let disconnect = loop {
        tokio::select! {
            biased;
            _ = stopped.wait_for(|stop| *stop) => break None,
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => on_frame(text.as_bytes(), &mut tracker),
                Some(Ok(Message::Binary(bytes))) => on_frame(&bytes, &mut tracker),
                Some(Ok(Message::Close(frame))) => break Some(Failure::from_close(frame)),
                Some(Ok(_)) => {}
                Some(Err(error)) => break Some(Failure::from_ws(error)),
                None => break Some(Failure::Eof),
            },
        }
    };
    shared.counters.connection_closed();
    match &disconnect {
        None => close(ws).await,
        Some(_) => shared.counters.error(),
    }
    SubscriberEnd::Healthy {
        channel,
        tracker,
        gaps,
        disconnects: disconnect.into_iter().collect(),
        history: None,
    }
}

/// A history subscriber's own accounting, handed to its group at the end.
#[derive(Debug, Default)]
struct SubscriberHistory {
    offsets: OffsetTracker,
    /// Its resumes and deliveries without an offset; the loss figures are
    /// added by the group once it knows the expected offsets.
    stats: HistoryStats,
}

/// Why a history subscriber's connection ended.
enum Ended {
    /// The run is over.
    Stop,
    /// The tool dropped it (`--reconnect-fraction`).
    Forced,
    /// The gateway or the network ended it.
    Lost(Failure),
}

/// A reading subscriber of a history channel: it tracks offsets, and after
/// every disconnection resubscribes with `since` its position, on the next
/// gateway, until the run is over.
struct Resumer {
    index: u64,
    channel: u64,
    name: String,
    shared: Arc<Shared>,
    warmup: u64,
    shard: usize,
    tracker: SeqTracker,
    gaps: Vec<i64>,
    /// The highest sequence number received (warm-up included), or -1.
    highest: i64,
    disconnects: Vec<Failure>,
    history: SubscriberHistory,
    /// A position taken from a reply (the channel's top when subscribing
    /// without `since`, or after a failed recovery), and how many in-order
    /// arrivals there had been then: later arrivals supersede it.
    adopted: Option<(String, u64, u64)>,
    in_order: u64,
    /// After a recovered resume: the epoch and the reply's offset, up to
    /// which arrivals are replays.
    replaying: Option<(String, u64)>,
    /// Resubscriptions tried, which picks the next gateway.
    attempts: u64,
}

impl Resumer {
    fn new(index: u64, channel: u64, shared: Arc<Shared>) -> Resumer {
        Resumer {
            index,
            channel,
            name: channel_name(channel),
            warmup: shared.plan.warmup_on(channel),
            shard: index as usize % LATENCY_SHARDS,
            shared,
            tracker: SeqTracker::default(),
            gaps: Vec::new(),
            highest: -1,
            disconnects: Vec::new(),
            history: SubscriberHistory::default(),
            adopted: None,
            in_order: 0,
            replaying: None,
            attempts: 0,
        }
    }

    async fn run(mut self, session: Session, mut stopped: watch::Receiver<bool>) -> SubscriberEnd {
        let plan = self.shared.plan.clone();
        let forced = plan.reconnects(self.index);
        let mut next_forced = Instant::now() + plan.first_reconnect(self.index);
        let mut ws = self.subscribed(session, None);
        loop {
            let ended = loop {
                let may_force =
                    forced && self.has_position() && !self.shared.published.load(Ordering::Relaxed);
                tokio::select! {
                    biased;
                    _ = stopped.wait_for(|stop| *stop) => break Ended::Stop,
                    _ = tokio::time::sleep_until(next_forced), if may_force => break Ended::Forced,
                    frame = ws.next() => match frame {
                        Some(Ok(Message::Text(text))) => self.on_frame(text.as_bytes()),
                        Some(Ok(Message::Binary(bytes))) => self.on_frame(&bytes),
                        Some(Ok(Message::Close(frame))) => break Ended::Lost(Failure::from_close(frame)),
                        Some(Ok(_)) => {}
                        Some(Err(error)) => break Ended::Lost(Failure::from_ws(error)),
                        None => break Ended::Lost(Failure::Eof),
                    },
                }
            };
            self.shared.counters.connection_closed();
            let disconnected_at = Instant::now();
            match ended {
                Ended::Stop => {
                    close(ws).await;
                    break;
                }
                Ended::Forced => {
                    close(ws).await;
                    self.history.stats.forced_disconnects += 1;
                    next_forced = Instant::now() + plan.reconnect_every;
                }
                Ended::Lost(failure) => {
                    self.shared.counters.error();
                    self.disconnects.push(failure);
                }
            }
            // A replay cut short is promised again by the next resume.
            if let (Some((epoch, top)), Some((at_epoch, at))) = (&self.replaying, self.since()) {
                if *epoch == at_epoch && *top > at {
                    let stats = &mut self.history.stats;
                    stats.promised_messages = stats.promised_messages.saturating_sub(top - at);
                }
            }
            self.replaying = None;
            match self.resume(&mut stopped, disconnected_at).await {
                Some(resumed) => ws = resumed,
                None => break,
            }
        }
        SubscriberEnd::Healthy {
            channel: self.channel,
            tracker: self.tracker,
            gaps: self.gaps,
            disconnects: self.disconnects,
            history: Some(Box::new(self.history)),
        }
    }

    /// Whether there is a position to resume from (without building it).
    fn has_position(&self) -> bool {
        self.adopted.is_some() || self.history.offsets.position().is_some()
    }

    /// Where to resume from: the latest of the last offset received in
    /// order and the position a reply gave.
    fn since(&self) -> Option<(String, u64)> {
        match &self.adopted {
            Some((epoch, offset, arrivals)) if *arrivals == self.in_order => {
                Some((epoch.clone(), *offset))
            }
            _ => self
                .history
                .offsets
                .position()
                .map(|(epoch, offset)| (epoch.to_owned(), offset)),
        }
    }

    /// Takes over a confirmed session: reads its reply (`since` is what was
    /// asked for), then the frames that came before the reply.
    fn subscribed(&mut self, session: Session, since: Option<&(String, u64)>) -> Ws {
        self.shared.counters.connection_opened();
        let position = session
            .confirmations
            .last()
            .and_then(|reply| reply_position(reply, &self.name));
        let stats = &mut self.history.stats;
        match (since, position) {
            (Some((_, from)), Some(position)) if position.recovered == Some(true) => {
                stats.recovered += 1;
                if position.offset > *from {
                    stats.promised_messages += position.offset - from;
                    self.replaying = Some((position.epoch, position.offset));
                }
            }
            (Some(_), Some(position)) => {
                stats
                    .not_recovered
                    .add(position.reason.as_deref().unwrap_or("recovered missing"));
                // The client refetches its state and continues from here.
                self.adopt(position.epoch, position.offset);
            }
            (Some(_), None) => stats.not_recovered.add("no position in the reply"),
            (None, Some(position)) => self.adopt(position.epoch, position.offset),
            (None, None) => {}
        }
        for frame in &session.early {
            self.on_frame(frame);
        }
        session.ws
    }

    fn adopt(&mut self, epoch: String, offset: u64) {
        if !epoch.is_empty() {
            self.adopted = Some((epoch, offset, self.in_order));
        }
    }

    /// Resubscribes, retrying with backoff, until it works or the run is
    /// over (`None`).
    async fn resume(
        &mut self,
        stopped: &mut watch::Receiver<bool>,
        disconnected_at: Instant,
    ) -> Option<Ws> {
        let mut backoff = RESUME_BACKOFF_MIN;
        loop {
            if *stopped.borrow() {
                return None;
            }
            self.attempts += 1;
            let since = self.since();
            let requests = match &since {
                Some((epoch, offset)) => vec![resume_frame(&self.name, epoch, *offset)],
                None => self
                    .shared
                    .connector
                    .requests(std::slice::from_ref(&self.name)),
            };
            let connector = self.shared.connector.clone();
            let attempt: Attempt = tokio::select! {
                _ = stopped.wait_for(|stop| *stop) => return None,
                attempt = connector.open_keeping(self.index, self.attempts, &requests) => attempt,
            };
            match attempt.result {
                Ok(session) => {
                    let stats = &mut self.history.stats;
                    if since.is_some() {
                        stats.resumes += 1;
                    } else {
                        stats.resubscribed_plain += 1;
                    }
                    stats.resume_time.record(disconnected_at.elapsed());
                    return Some(self.subscribed(session, since.as_ref()));
                }
                Err(failure) => {
                    self.history.stats.resume_failures.add(failure.reason());
                    tokio::select! {
                        _ = stopped.wait_for(|stop| *stop) => return None,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(RESUME_BACKOFF_MAX);
                }
            }
        }
    }

    /// One received frame: a delivery (by sequence number, and by offset),
    /// a `gap`, or anything else.
    fn on_frame(&mut self, frame: &[u8]) {
        let shared = &self.shared;
        let Some(seq) = shared.on_frame(frame, self.warmup, &mut self.tracker, self.shard) else {
            if contains(frame, &shared.gap_match) {
                self.gaps.push(self.highest);
            }
            return;
        };
        self.highest = self.highest.max(seq as i64);
        let offset = shared
            .offset
            .find(frame)
            .and_then(|offset| u64::try_from(offset).ok());
        let epoch = shared
            .epoch
            .find_string(frame)
            .and_then(|epoch| std::str::from_utf8(epoch).ok());
        let (Some(offset), Some(epoch)) = (offset, epoch) else {
            self.history.stats.unsequenced += 1;
            return;
        };
        if self.history.offsets.observe(epoch, offset) == OffsetArrival::InOrder {
            self.in_order += 1;
        }
        if let Some((replay_epoch, top)) = &self.replaying {
            if replay_epoch == epoch {
                if offset <= *top {
                    self.history.stats.recovered_messages += 1;
                }
                if offset >= *top {
                    self.replaying = None;
                }
            }
        }
    }
}

/// Reads a slow subscriber's backlog to find out whether the gateway closed it.
async fn read_until_close(mut ws: Ws) -> SlowEnd {
    let deadline = Instant::now() + SLOW_READ_LIMIT;
    let end = loop {
        match timeout_at(deadline, timeout(SLOW_IDLE, ws.next())).await {
            Err(_) | Ok(Err(_)) => break SlowEnd::StillOpen,
            Ok(Ok(Some(Ok(Message::Close(frame))))) => {
                break SlowEnd::Closed(frame.map(|frame| u16::from(frame.code)));
            }
            Ok(Ok(Some(Ok(_)))) => {}
            Ok(Ok(Some(Err(error)))) => break SlowEnd::Ended(Failure::from_ws(error)),
            Ok(Ok(None)) => break SlowEnd::Ended(Failure::Eof),
        }
    };
    if matches!(end, SlowEnd::StillOpen) {
        close(ws).await;
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(channels: u64, slow_fraction: f64, warmup_messages: u64) -> Plan {
        Plan {
            subscribers: 100,
            channels,
            connect_rate: 1000.0,
            slow_fraction,
            warmup_messages,
            start_at_unix_nanos: 0,
            stalled: 0,
            stalled_rcvbuf: 4096,
            slowloris: 0,
            slowloris_interval: Duration::from_secs(1),
            gap_match: r#""type":"gap""#.to_owned(),
            history: false,
            reconnect_fraction: 0.0,
            reconnect_every: Duration::from_secs(2),
        }
    }

    #[test]
    fn slow_subscribers_are_spread_over_channels() {
        let plan = plan(10, 0.1, 0);
        let slow: Vec<u64> = (0..100).filter(|&i| plan.is_slow(i)).collect();
        assert_eq!(slow.len(), 10);
        let mut channels: Vec<u64> = slow.iter().map(|&i| plan.channel_of(i)).collect();
        channels.sort_unstable();
        channels.dedup();
        assert_eq!(channels.len(), 10, "{slow:?}");
        let none = self::plan(3, 0.0, 0);
        assert!((0..100).all(|i| !none.is_slow(i)));
        let quarter = self::plan(1, 0.25, 0);
        assert_eq!((0..100).filter(|&i| quarter.is_slow(i)).count(), 25);
        // Stalled readers come after the subscribers and never read.
        let stalled = Plan {
            stalled: 10,
            ..self::plan(3, 0.0, 0)
        };
        assert_eq!(stalled.connections(), 110);
        assert!((0..100).all(|i| !stalled.is_slow(i)));
        assert!((100..110).all(|i| stalled.is_slow(i) && stalled.is_stalled(i)));
    }

    #[test]
    fn reconnecting_subscribers_are_spread_over_channels_and_time() {
        let plan = Plan {
            history: true,
            reconnect_fraction: 0.2,
            ..plan(10, 0.1, 0)
        };
        let chosen: Vec<u64> = (0..100).filter(|&i| plan.reconnects(i)).collect();
        // A fifth of each channel's subscribers, none of them slow.
        assert!(chosen.iter().all(|&i| !plan.is_slow(i)), "{chosen:?}");
        for channel in 0..10 {
            assert_eq!(
                chosen
                    .iter()
                    .filter(|&&i| plan.channel_of(i) == channel)
                    .count(),
                2,
                "{chosen:?}"
            );
        }
        let firsts: Vec<Duration> = chosen.iter().map(|&i| plan.first_reconnect(i)).collect();
        assert!(
            firsts
                .iter()
                .all(|first| *first >= Duration::from_secs(1) && *first < Duration::from_secs(3))
        );
        let early = firsts
            .iter()
            .filter(|first| **first < Duration::from_secs(2))
            .count();
        assert!((5..=15).contains(&early), "{firsts:?}");
        // Without history, nobody reconnects.
        let plain = Plan {
            history: false,
            ..plan.clone()
        };
        assert!((0..100).all(|i| !plain.reconnects(i)));
    }

    #[test]
    fn warmup_messages_are_counted_per_channel() {
        let plan = plan(3, 0.0, 7);
        // Messages 0..7 go to channels 0,1,2,0,1,2,0.
        assert_eq!(
            [plan.warmup_on(0), plan.warmup_on(1), plan.warmup_on(2)],
            [3, 2, 2]
        );
    }
}
