//! Conflation keeps memory bounded. In a test binary of its own, because it
//! reads the process's RSS, which tests running beside it would disturb.

mod common;

use std::time::Duration;

use common::redis_server::RedisServer;
use common::{RawClient, TestNode, eventually_metric, metric, read_messages_until, rule};
use herald::config::SlowPolicy;
use serde_json::json;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[tokio::test]
async fn conflate_delivers_the_newest_value_with_bounded_memory() {
    let redis = RedisServer::start();
    let node = TestNode::start_with(|c| {
        redis.configure(c);
        c.channels = vec![rule("ticker.*", SlowPolicy::Conflate, None)];
        c.limits.queue_messages = 16;
        c.limits.write_timeout = Duration::from_secs(120);
    })
    .await;
    let mut stalled = RawClient::subscribed(&node, "ticker.AAPL").await;
    let before = rss_bytes();
    let total = 100_000;
    let pad = "p".repeat(500);
    redis
        .publish_many(
            "ticker.AAPL",
            (0..total).map(|seq| json!({"seq": seq, "pad": pad}).to_string()),
        )
        .await;
    eventually_metric(&node, "herald_messages_received_total", total as f64).await;
    let growth = rss_bytes().saturating_sub(before);
    // 100k messages of ~520 bytes would be ~52 MB if they were all kept.
    assert!(growth < 20 << 20, "RSS grew by {} MB", growth >> 20);

    let received =
        read_messages_until(&mut stalled, |frame| frame["data"]["seq"] == total - 1).await;
    assert!(
        received < total as usize / 2,
        "conflation kept {received} of {total}"
    );
    let metrics = node.metrics().await;
    assert!(
        metric(
            &metrics,
            "herald_messages_dropped_total{reason=\"conflated\",policy=\"conflate\"}"
        ) > 0.0
    );
    assert_eq!(
        metric(
            &metrics,
            "herald_disconnects_total{reason=\"slow_consumer\"}"
        ),
        0.0
    );
}
