//! `fanout` and `slow`: subscribers spread over channels, one open-loop
//! publisher at a fixed total rate. Measures delivery latency (receive time
//! minus intended send time), loss, duplicates and reordering, and the
//! gateway's CPU per delivery. In `slow`, a fraction of the subscribers never
//! read after subscribing; the healthy ones are measured as in `fanout`, the
//! slow ones are checked at the end for how the gateway closed them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_tungstenite::tungstenite::Message;

use crate::cli::{FanoutArgs, GlobalArgs};
use crate::client::{ClientSpec, Connector, Failure, Ws, close, unix_nanos};
use crate::group::{
    Command, Control, Counters, EstablishStats, Outcome, Plan as GroupPlan, Report, Slice,
    instant_at, ramp_slot,
};
use crate::proc::{Gateway, Usage};
use crate::publisher::{PublishReport, Publisher, Schedule};
use crate::report::{Summary, Table, round3};
use crate::scan::FieldScanner;
use crate::scenario::{group_specs, options, positive_rate, ramp_start};
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
}

impl Plan {
    pub fn channel_of(&self, index: u64) -> u64 {
        index % self.channels.max(1)
    }

    /// Whether subscriber `index` is slow. Decided by its rank among its
    /// channel's subscribers, so every channel gets its share.
    pub fn is_slow(&self, index: u64) -> bool {
        let rank = index / self.channels.max(1);
        let slow_up_to = |count: u64| (count as f64 * self.slow_fraction + 1e-9).floor();
        slow_up_to(rank + 1) > slow_up_to(rank)
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
    let publisher = Publisher::from_args(&args.publisher)?;
    let plan = Plan {
        subscribers: args.subscribers as u64,
        channels: args.channels as u64,
        connect_rate: args.connect_rate,
        slow_fraction,
        warmup_messages: (args.rate * args.warmup.as_secs_f64()).round() as u64,
        start_at_unix_nanos: ramp_start(global),
    };
    let measured_messages = ((args.rate * args.duration.as_secs_f64()).round() as u64).max(1);
    let channels: Vec<String> = (0..plan.channels).map(channel_name).collect();

    let gateway = Gateway::new(&global.pids);
    let idle = gateway.sample()?;
    let mut fleet = Fleet::start(group_specs(global, GroupPlan::Fanout(plan.clone()))?)?;
    fleet.ready().await?;
    let subscribed = gateway.sample()?;

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
    let published = publisher
        .run(Schedule {
            channels,
            rate: args.rate,
            total: plan.warmup_messages + measured_messages,
            payload_bytes: args.payload,
            start_unix_nanos,
        })
        .await?;
    let window_end = gateway.sample_after(CPU_SETTLE).await?;
    let window_start = window_start
        .await
        .context("the gateway sampling task failed")??;

    let reports = fleet
        .finish(Command::Finish {
            published_per_channel: published.sent_per_channel.clone(),
        })
        .await?;
    let mut total = GroupReport::default();
    for report in reports {
        match report {
            Report::Fanout(group) => {
                total.establish.merge(&group.establish);
                total.healthy.merge(&group.healthy);
                total.slow.merge(&group.slow);
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
        &total,
        gateway,
        scenario == "slow",
    );
    let table = results.table();
    let mut config = options(global, args)?;
    config.push(serde_json::json!({ "slow_fraction": slow_fraction }));
    Summary::new(scenario, &config, &results, table)
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
    fn new(
        plan: &Plan,
        duration: Duration,
        published: &PublishReport,
        total: &GroupReport,
        gateway: Option<GatewayResults>,
        slow: bool,
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
            .row("publisher max lag ms", self.publisher_max_lag_ms);
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
    /// Sharded latency histograms; subscriber `i` uses shard `i % LATENCY_SHARDS`.
    latency: Vec<Mutex<Micros>>,
    /// First arrivals of measured messages, for the drain to know when
    /// everything has arrived.
    fresh: AtomicU64,
}

impl Shared {
    /// Records one received frame; frames without both fields are ignored.
    fn on_frame(&self, frame: &[u8], warmup: u64, tracker: &mut SeqTracker, shard: usize) {
        let received_at = unix_nanos();
        let (Some(seq), Some(ts)) = (self.seq.find(frame), self.ts.find(frame)) else {
            return;
        };
        let Ok(seq) = u64::try_from(seq) else {
            return;
        };
        if seq < warmup || seq >= SeqTracker::MAX_SEQ {
            return;
        }
        if tracker.observe(seq) == Arrival::Duplicate {
            return;
        }
        self.fresh.fetch_add(1, Ordering::Relaxed);
        self.counters.deliveries.fetch_add(1, Ordering::Relaxed);
        self.latency[shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record_micros(received_at.saturating_sub(ts) / 1000);
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
        disconnect: Option<Failure>,
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
    let indices: Vec<u64> = slice.indices(plan.subscribers).collect();
    let shared = Arc::new(Shared {
        plan: plan.clone(),
        connector,
        counters: control.counters.clone(),
        ts: FieldScanner::new(&clients.ts_field),
        seq: FieldScanner::new(&clients.seq_field),
        latency: (0..LATENCY_SHARDS).map(|_| Mutex::default()).collect(),
        fresh: AtomicU64::new(0),
    });
    let (stop, stopped) = watch::channel(false);
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
    let published_on = |channel: u64| published.get(channel as usize).copied().unwrap_or(0);

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
                disconnect,
            } => {
                let warmup = plan.warmup_on(channel);
                let published = published_on(channel).max(warmup);
                let missing = tracker.missing_in(warmup, published);
                let healthy = &mut report.healthy;
                healthy.subscribers += 1;
                healthy.expected += published - warmup;
                healthy.deliveries += published - warmup - missing;
                healthy.missing += missing;
                healthy.duplicates += tracker.duplicates;
                healthy.out_of_order += tracker.out_of_order;
                healthy.with_loss += u64::from(missing > 0);
                if let Some(failure) = disconnect {
                    report.establish.disconnects.add(failure.reason());
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
    let attempt = shared.connector.open(index, &[channel_name(channel)]).await;
    let _ = outcomes.send(Outcome::of(index, &attempt)).await;
    drop(outcomes);
    let Ok(session) = attempt.result else {
        shared.counters.error();
        return SubscriberEnd::NotConnected;
    };
    let mut ws = session.ws;
    shared.counters.connection_opened();
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
    let disconnect = loop {
        tokio::select! {
            biased;
            _ = stopped.wait_for(|stop| *stop) => break None,
            frame = ws.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    shared.on_frame(text.as_bytes(), warmup, &mut tracker, shard);
                }
                Some(Ok(Message::Binary(bytes))) => {
                    shared.on_frame(&bytes, warmup, &mut tracker, shard);
                }
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
        disconnect,
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
