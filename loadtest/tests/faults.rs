//! The Redis faults of `loadtest/bench.sh faults-redis-kill`,
//! `faults-client-kill` and `faults-redis-pause`, at a size that fits CI: a herald node in this
//! process, its own `redis-server` on a free port, 50 subscribers over two
//! channels and 200 messages/s published through Redis. The tool asserts
//! the outcome itself (`--check`, `--expect-metric`) and exits 1 when an
//! assertion fails.

mod common;

use std::time::Duration;

use common::{Node, Redis, SECRET, run_tool, strings};
use herald::config::{BrokerKind, RedisUrl};
use serde_json::Value;

async fn redis_node(redis: &Redis) -> Node {
    redis_node_with(redis, |_| {}).await
}

async fn redis_node_with(redis: &Redis, more: impl FnOnce(&mut herald::config::Config)) -> Node {
    let url = redis.url();
    Node::start_with(|config| {
        config.broker.kind = BrokerKind::Redis;
        config.broker.url = Some(RedisUrl::new(url));
        // A short outage should not leave the node waiting out a long backoff.
        config.broker.reconnect_max = Duration::from_millis(500);
        more(config);
    })
    .await
}

/// The fan-out both tests run, before their faults and checks.
fn load(node: &Node, redis: &Redis) -> Vec<String> {
    strings(&[
        "fanout",
        "--url",
        &node.ws_url(),
        "--secret",
        SECRET,
        "--publish",
        "redis",
        "--redis-url",
        &redis.url(),
        "--subscribers",
        "50",
        "--channels",
        "2",
        "--rate",
        "200",
        "--payload",
        "100",
        "--warmup",
        "0.5s",
        "--duration",
        "5s",
        "--metrics-url",
        &node.metrics_url(),
        "--expect-metric",
        "herald_connections_open==50",
        // Nothing the node received was dropped as coming from a replaced
        // connection: what went missing at an outage's edge stayed in Redis.
        "--expect-metric",
        "increase(herald_broker_stale_pushes_total)==0",
    ])
}

fn number(summary: &Value, path: &str) -> u64 {
    let mut value = &summary["results"];
    for key in path.split('.') {
        value = &value[key];
    }
    value
        .as_u64()
        .unwrap_or_else(|| panic!("{path} is not a count: {summary:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_loses_exactly_the_outage() {
    let redis = Redis::start();
    let node = redis_node(&redis).await;
    let mut args = load(&node, &redis);
    args.extend([
        "--fault-exec".to_owned(),
        format!("1.5s=kill -9 {}", redis.pid()),
        "--fault-exec".to_owned(),
        format!("2.5s={}", redis.restart_command()),
    ]);
    args.extend(strings(&[
        "--check",
        "loss-only-in-outage",
        "--check",
        "loss-announced",
        "--check",
        "gap-every-subscriber",
        "--check",
        "no-disconnects",
        "--expect-metric",
        "increase(herald_broker_reconnects_total)>=1",
    ]));
    let summary = run_tool("redis-kill", &args).await;
    // The outage happened and cost messages; the tool has already checked
    // that each subscriber lost exactly those.
    assert!(
        number(&summary, "publish_fates.unreached") > 0,
        "{summary:#}"
    );
    assert!(number(&summary, "loss.lost_in_outage") > 0, "{summary:#}");
    assert_eq!(number(&summary, "loss.lost_outside_outage"), 0);
    assert_eq!(number(&summary, "loss.unannounced_runs"), 0);
    assert_eq!(number(&summary, "loss.subscribers_without_gap"), 0);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kill_every_second_is_announced_each_time() {
    let redis = Redis::start();
    let node = redis_node(&redis).await;
    let mut args = load(&node, &redis);
    args.extend(strings(&[
        "--kill-pubsub-every",
        "1s",
        "--check",
        "loss-only-in-outage",
        "--check",
        "loss-announced",
        "--check",
        "gap-per-kill",
        "--check",
        "no-disconnects",
        "--expect-metric",
        "increase(herald_broker_reconnects_total)>=4",
    ]));
    let summary = run_tool("client-kill", &args).await;
    let kills = summary["results"]["faults"]["kills"]
        .as_array()
        .expect("the kills are logged");
    assert_eq!(kills.len(), 4, "{summary:#}");
    assert!(number(&summary, "loss.min_gaps_per_subscriber") >= 4);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_past_the_probe_is_detected_and_announced() {
    let redis = Redis::start();
    // The pause (2 s) outlasts a probe interval plus its timeout (0.8 s), so
    // only the probe can notice it: the connection stays open throughout.
    let node = redis_node_with(&redis, |config| {
        config.broker.probe_interval = Duration::from_millis(500);
        config.broker.probe_timeout = Duration::from_millis(300);
    })
    .await;
    let mut args = load(&node, &redis);
    args.extend([
        "--fault-exec".to_owned(),
        format!("1.5s=redis-cli -u {} client pause 2000 all", redis.url()),
    ]);
    args.extend(strings(&[
        "--check",
        "loss-only-in-outage",
        "--check",
        "loss-announced",
        "--check",
        "gap-every-subscriber",
        "--check",
        "no-disconnects",
        "--expect-metric",
        "increase(herald_broker_probe_failures_total)>=1",
        "--expect-metric",
        "increase(herald_broker_reconnects_total)>=1",
    ]));
    let summary = run_tool("redis-pause", &args).await;
    assert_eq!(number(&summary, "loss.lost_outside_outage"), 0);
    assert_eq!(number(&summary, "loss.unannounced_runs"), 0);
    assert_eq!(number(&summary, "loss.subscribers_without_gap"), 0);
    node.shutdown().await;
}
