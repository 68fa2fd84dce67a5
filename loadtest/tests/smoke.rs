//! End to end: the built `herald-loadtest` binary against a real herald node
//! running in the test process, on `127.0.0.1:0`.

mod common;

use common::{API_KEY, Node, SECRET, run_tool, strings};
use serde_json::Value;

fn fanout_args(node: &Node, subscribers: &str) -> Vec<String> {
    strings(&[
        "fanout",
        "--url",
        &node.ws_url(),
        "--secret",
        SECRET,
        "--api-url",
        &node.api_url(),
        "--api-key",
        API_KEY,
        "--subscribers",
        subscribers,
        "--channels",
        "2",
        "--rate",
        "100",
        "--payload",
        "100",
        "--duration",
        "1s",
        "--warmup",
        "0.3s",
    ])
}

/// Every expected delivery arrived exactly once and in order.
fn assert_lossless(summary: &Value) {
    let results = &summary["results"];
    let deliveries = results["deliveries"].as_u64().unwrap();
    assert!(deliveries > 0, "{summary:#}");
    assert_eq!(
        results["expected_deliveries"].as_u64(),
        Some(deliveries),
        "{summary:#}"
    );
    for field in [
        "missing",
        "duplicates",
        "out_of_order",
        "subscribers_with_loss",
    ] {
        assert_eq!(results[field], 0, "{field}: {summary:#}");
    }
    assert!(results["latency_ms"]["p50"].as_f64().unwrap() > 0.0);
    assert!(
        results["latency_ms"]["max"].as_f64().unwrap()
            >= results["latency_ms"]["p99"].as_f64().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_delivers_every_message_exactly_once() {
    let node = Node::start().await;
    let summary = run_tool("fanout", &fanout_args(&node, "200")).await;
    assert_eq!(summary["scenario"], "fanout");
    assert_lossless(&summary);
    let results = &summary["results"];
    assert_eq!(results["connected"], 200);
    assert_eq!(results["published"], 100);
    // 100 messages over 2 channels, 100 subscribers each.
    assert_eq!(results["expected_deliveries"], 100 * 100);
    assert_eq!(summary["config"]["subscribers"], 200);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_with_two_worker_processes() {
    let node = Node::start().await;
    let mut args = fanout_args(&node, "101");
    args.extend(strings(&["--workers", "2"]));
    let summary = run_tool("workers", &args).await;
    assert_lossless(&summary);
    assert_eq!(summary["results"]["connected"], 101);
    // Channel 0 has 51 subscribers, channel 1 has 50; 50 messages each.
    assert_eq!(summary["results"]["expected_deliveries"], 101 * 50);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_opens_every_connection() {
    let node = Node::start().await;
    let pid = std::process::id().to_string();
    let args = strings(&[
        "connect",
        "--url",
        &node.ws_url(),
        "--secret",
        SECRET,
        "--connections",
        "50",
        "--channels-per-conn",
        "2",
        "--channel-count",
        "5",
        "--rate",
        "500",
        "--hold",
        "0.5s",
        "--pid",
        &pid,
    ]);
    let summary = run_tool("connect", &args).await;
    let results = &summary["results"];
    assert_eq!(results["connected"], 50, "{summary:#}");
    assert_eq!(results["upgrades"], 50, "{summary:#}");
    assert_eq!(results["failed"], 0, "{summary:#}");
    assert_eq!(results["disconnects"], serde_json::json!({}), "{summary:#}");
    assert!(results["handshakes_per_sec"].as_f64().unwrap() > 0.0);
    assert!(results["connect_latency_ms"]["p99"].as_f64().unwrap() > 0.0);
    // The node runs in this process, so --pid can watch it (along with
    // whatever else this test binary does, so only the presence is checked).
    assert!(
        results["memory_per_connection_bytes"].is_number(),
        "{summary:#}"
    );
    assert!(results["gateway"]["rss_after_bytes"].as_u64().unwrap() > 0);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_reports_refusals_by_reason() {
    let node = Node::start().await;
    let args = strings(&[
        "connect",
        "--url",
        &node.ws_url(),
        "--token",
        "not-a-jwt",
        "--connections",
        "5",
        "--rate",
        "1000",
        "--hold",
        "0s",
    ]);
    let summary = run_tool("refused", &args).await;
    let results = &summary["results"];
    assert_eq!(results["connected"], 0, "{summary:#}");
    assert_eq!(results["failures"]["http 401"], 5, "{summary:#}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_reconnects_the_dropped_connections() {
    let node = Node::start().await;
    let args = strings(&[
        "storm",
        "--url",
        &node.ws_url(),
        "--secret",
        SECRET,
        "--connections",
        "60",
        "--drop",
        "30",
        "--connect-rate",
        "1000",
    ]);
    let summary = run_tool("storm", &args).await;
    let results = &summary["results"];
    assert_eq!(results["connected"], 60, "{summary:#}");
    assert_eq!(results["dropped"], 30, "{summary:#}");
    assert_eq!(results["resubscribed"], 30, "{summary:#}");
    let times = &results["time_to_resubscribe_ms"];
    let p50 = times["p50"].as_f64().unwrap();
    let p100 = times["p100"].as_f64().unwrap();
    assert!(0.0 < p50 && p50 <= p100, "{summary:#}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscribers_are_reported_apart() {
    let node = Node::start().await;
    let mut args = fanout_args(&node, "40");
    args[0] = "slow".to_owned();
    args.extend(strings(&["--slow-fraction", "0.25"]));
    let summary = run_tool("slow", &args).await;
    assert_eq!(summary["scenario"], "slow");
    assert_lossless(&summary);
    let results = &summary["results"];
    assert_eq!(results["healthy_subscribers"], 30, "{summary:#}");
    let slow = &results["slow"];
    assert_eq!(slow["subscribers"], 10, "{summary:#}");
    let accounted = slow["closed_by_server"].as_u64().unwrap()
        + slow["still_open"].as_u64().unwrap()
        + slow["ended_without_close"]
            .as_object()
            .unwrap()
            .values()
            .map(|count| count.as_u64().unwrap())
            .sum::<u64>();
    assert_eq!(accounted, 10, "{summary:#}");
    node.shutdown().await;
}
