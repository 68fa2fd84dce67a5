//! History channels under load, at a size that fits CI: two herald nodes in
//! this process behind the test's own `redis-server` on a free port, with
//! history on `fanout.*`; 40 subscribers over two channels, 200 messages/s
//! published with `FCALL herald_publish`. The tool accounts every
//! subscriber's deliveries by offset and asserts the outcome itself.

mod common;

use std::time::Duration;

use common::{Node, Redis, SECRET, run_tool, run_tool_failing, strings};
use herald::config::{BrokerKind, ChannelRule, RedisUrl};
use serde_json::Value;

async fn history_node(redis: &Redis) -> Node {
    let url = redis.url();
    Node::start_with(|config| {
        config.broker.kind = BrokerKind::Redis;
        config.broker.url = Some(RedisUrl::new(url));
        config.broker.reconnect_min = Duration::from_millis(20);
        config.broker.reconnect_max = Duration::from_millis(200);
        config.channels.push(ChannelRule {
            pattern: "fanout.*".into(),
            history_size: 10_000,
            history_ttl: Some(Duration::from_secs(600)),
            recover_max: 1000,
            ..ChannelRule::default()
        });
    })
    .await
}

fn count(summary: &Value, path: &str) -> u64 {
    let mut value = &summary["results"];
    for key in path.split('.') {
        value = &value[key];
    }
    value
        .as_u64()
        .unwrap_or_else(|| panic!("{path} is not a count: {summary:#}"))
}

/// The load both tests run, for `duration` after a 0.5 s warm-up.
fn load(nodes: &[&Node], redis: &Redis, publish: &str, duration: &str) -> Vec<String> {
    let mut args = strings(&["fanout", "--secret", SECRET]);
    for node in nodes {
        args.extend(["--url".to_owned(), node.ws_url()]);
        args.extend(["--metrics-url".to_owned(), node.metrics_url()]);
    }
    args.extend(strings(&[
        "--publish",
        publish,
        "--redis-url",
        &redis.url(),
        "--history",
        "--subscribers",
        "40",
        "--channels",
        "2",
        "--rate",
        "200",
        "--payload",
        "100",
        "--warmup",
        "0.5s",
        "--duration",
        duration,
    ]));
    args
}

/// `CLIENT KILL TYPE pubsub` every second, and a fifth of the subscribers
/// reconnecting every second to the other node with `since`: every
/// subscriber gets every offset exactly once, in order, and no `gap`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_kills_and_reconnects_lose_no_offset() {
    let redis = Redis::start();
    let first = history_node(&redis).await;
    let second = history_node(&redis).await;
    let mut args = load(&[&first, &second], &redis, "function", "4s");
    args.extend(strings(&[
        "--kill-pubsub-every",
        "1s",
        "--reconnect-fraction",
        "0.2",
        "--reconnect-every",
        "1s",
        "--check",
        "offsets-exact",
        "--check",
        "no-gap",
        "--check",
        "recovered",
        "--check",
        "lossless",
        "--expect-metric",
        "increase(herald_broker_reconnects_total)>=6",
        "--expect-metric",
        "increase(herald_gap_notices_total)==0",
        // The kills did cost messages, which the nodes fetched from the streams.
        "--expect-metric",
        "increase(herald_history_filled_messages_total)>0",
    ]));
    let summary = run_tool("history-kills", &args).await;
    // 4 s at 100/s per channel, 40 subscribers: about 16,000 offsets.
    assert!(
        count(&summary, "history.expected_offsets") >= 15_000,
        "{summary:#}"
    );
    let kills = summary["results"]["faults"]["kills"]
        .as_array()
        .expect("the kills are logged");
    assert_eq!(kills.len(), 3, "{summary:#}");
    // 8 subscribers, each disconnected about every second for 4 s.
    assert!(
        count(&summary, "history.forced_disconnects") >= 16,
        "{summary:#}"
    );
    assert!(
        count(&summary, "history.resumes") >= count(&summary, "history.forced_disconnects"),
        "{summary:#}"
    );
    first.shutdown().await;
    second.shutdown().await;
}

/// A raw `PUBLISH` to a history channel is delivered without an offset:
/// nothing can be accounted, and `offsets-exact` fails the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_without_offsets_fail_the_accounting() {
    let redis = Redis::start();
    let node = history_node(&redis).await;
    let mut args = load(&[&node], &redis, "redis", "1s");
    args.extend(strings(&["--check", "offsets-exact"]));
    let (summary, stdout) = run_tool_failing("history-raw", &args).await;
    assert!(stdout.contains("FAIL"), "{stdout}");
    assert_eq!(count(&summary, "history.expected_offsets"), 0);
    assert!(
        count(&summary, "history.unsequenced") >= 40 * 100,
        "{summary:#}"
    );
    node.shutdown().await;
}

/// At saturation the publisher has thousands of commands in flight on one
/// connection; Redis must still run them in the order they were scheduled.
/// The stream shows the order it ran them in: each entry's payload carries
/// its sequence number.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publisher_keeps_its_order_at_saturation() {
    let redis = Redis::start();
    let node = history_node(&redis).await;
    let args = strings(&[
        "fanout",
        "--url",
        &node.ws_url(),
        "--secret",
        SECRET,
        "--publish",
        "function",
        "--redis-url",
        &redis.url(),
        "--subscribers",
        "1",
        "--rate",
        "100000",
        "--warmup",
        "0.1s",
        "--duration",
        "1s",
        "--payload",
        "60",
    ]);
    let summary = run_tool("history-order", &args).await;
    assert!(
        count(&summary, "publish_acknowledged") >= 10_000,
        "{summary:#}"
    );
    let mut connection = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("{fanout.0}:s")
        .arg("-")
        .arg("+")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(entries.len(), 10_000, "the stream keeps history_size");
    let seqs: Vec<u64> = entries
        .iter()
        .map(|(_, fields)| {
            let payload: Value = serde_json::from_str(&fields[0].1).unwrap();
            payload["seq"].as_u64().unwrap()
        })
        .collect();
    let reordered = seqs.windows(2).filter(|pair| pair[1] < pair[0]).count();
    assert_eq!(reordered, 0, "Redis ran publishes out of order");
    node.shutdown().await;
}
