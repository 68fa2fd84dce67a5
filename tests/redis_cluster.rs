//! Redis Cluster faults: slots that move, shards that die, and the node's
//! promise that one shard's trouble stays with that shard's channels.

mod common;

use std::time::Duration;

use common::redis_server::RedisCluster;
use common::{Client, PATIENCE, TestNode, eventually_metric, eventually_ready, metric, readyz};
use herald::config::{BrokerKind, RedisUrl};
use serde_json::{Value, json};
use tokio::time::Instant;

async fn cluster_node(cluster: &RedisCluster) -> TestNode {
    let node = TestNode::start_with(|c| {
        c.broker.kind = BrokerKind::RedisCluster;
        c.broker.cluster_urls = cluster.urls().iter().map(RedisUrl::new).collect();
        c.broker.reconnect_min = Duration::from_millis(50);
        c.broker.reconnect_max = Duration::from_millis(500);
        c.broker.command_timeout = Duration::from_secs(1);
    })
    .await;
    eventually_ready(&node, true).await;
    node
}

/// One channel per shard, in shard order.
async fn one_channel_per_shard(cluster: &RedisCluster, prefix: &str) -> Vec<String> {
    let mut by_owner: [Option<String>; 3] = [None, None, None];
    for i in 0.. {
        let channel = format!("{prefix}.{i}");
        let owner = cluster.owner_of(&channel).await;
        by_owner[owner].get_or_insert(channel);
        if by_owner.iter().all(Option::is_some) {
            break;
        }
    }
    by_owner.into_iter().map(Option::unwrap).collect()
}

async fn spublish(cluster: &RedisCluster, node: usize, channel: &str, data: &str) -> Option<i64> {
    let mut connection = redis::Client::open(cluster.nodes[node].url())
        .ok()?
        .get_multiplexed_async_connection()
        .await
        .ok()?;
    redis::cmd("SPUBLISH")
        .arg(channel)
        .arg(data)
        .query_async(&mut connection)
        .await
        .ok()
}

/// Publishes `data` on `channel` at `node` until the client receives it,
/// returning every frame seen on the way.
async fn publish_until_received(
    cluster: &RedisCluster,
    node: usize,
    client: &mut Client,
    channel: &str,
    data: &str,
) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "{channel} never delivered again; saw {seen:?}"
        );
        spublish(cluster, node, channel, data).await;
        while let Some(frame) = client.try_next_json(Duration::from_millis(200)).await {
            let done = frame["type"] == "message" && frame["data"] == data;
            seen.push(frame);
            if done {
                return seen;
            }
        }
    }
}

#[tokio::test]
async fn a_channel_whose_slot_moves_keeps_delivering_after_a_gap() {
    let cluster = RedisCluster::start().await;
    let node = cluster_node(&cluster).await;
    let channels = one_channel_per_shard(&cluster, "moving").await;
    let mut client = node.client(&["moving.*"]).await;
    let names: Vec<&str> = channels.iter().map(String::as_str).collect();
    client.subscribe(&names).await;
    assert_eq!(spublish(&cluster, 0, &channels[0], "before").await, Some(1));
    assert_eq!(client.next_json().await["data"], "before");

    // Shard 0 hands the channel's slot to shard 1. Redis unsubscribes the
    // node from the channel on shard 0 by itself.
    cluster.move_slot_of(&channels[0], 1).await;
    let seen = publish_until_received(&cluster, 1, &mut client, &channels[0], "after").await;
    assert!(
        seen.iter().any(|f| f["type"] == "gap"
            && f["channels"]
                .as_array()
                .unwrap()
                .contains(&json!(channels[0]))),
        "the move was announced with a gap: {seen:?}"
    );
    assert!(
        metric(
            &node.metrics().await,
            "herald_broker_unsolicited_unsubscribes_total"
        ) >= 1.0
    );
    // The other shards' channels never stopped.
    for (shard, channel) in channels.iter().enumerate().skip(1) {
        let data = format!("still-{shard}");
        publish_until_received(&cluster, shard, &mut client, channel, &data).await;
    }
    // And the API publishes to the slot's new owner.
    assert_eq!(node.publish(&channels[0], json!("api")).await.0, 200);
    loop {
        let frame = tokio::time::timeout(PATIENCE, client.next_json())
            .await
            .expect("the API publish arrives");
        if frame["data"] == "api" {
            break;
        }
    }
}

#[tokio::test]
async fn one_shard_down_leaves_the_node_ready_and_the_other_shards_delivering() {
    // Without full coverage the surviving primaries keep serving their slots.
    let mut cluster = RedisCluster::start_with(&["--cluster-require-full-coverage", "no"]).await;
    let node = cluster_node(&cluster).await;
    let channels = one_channel_per_shard(&cluster, "blast").await;
    let mut client = node.client(&["blast.*"]).await;
    let names: Vec<&str> = channels.iter().map(String::as_str).collect();
    client.subscribe(&names).await;
    eventually_metric(&node, "herald_broker_links_up", 3.0).await;

    cluster.nodes[0].kill();
    eventually_metric(&node, "herald_broker_links_up", 2.0).await;
    let metrics = node.metrics().await;
    assert_eq!(metric(&metrics, "herald_broker_links"), 3.0);
    assert_eq!(metric(&metrics, "herald_broker_connected"), 0.0);
    // The node can still serve most channels, so it stays in its endpoints.
    for _ in 0..10 {
        assert_eq!(readyz(&node).await.0, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (shard, channel) in channels.iter().enumerate().skip(1) {
        let data = format!("alive-{shard}");
        publish_until_received(&cluster, shard, &mut client, channel, &data).await;
    }
    // A publish to the dead shard is refused promptly, not retried.
    let started = Instant::now();
    let (status, body) = node.publish(&channels[0], json!("lost")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("broker_unavailable"))
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // Subscribing to a channel of the dead shard is accepted; it takes effect,
    // with a gap, when the shard is back.
    let reply = client.subscribe(&[&channels[0]]).await;
    assert_eq!(reply["channels"], json!([channels[0]]));

    cluster.nodes[0].restart();
    cluster.wait_ok().await;
    let seen = publish_until_received(&cluster, 0, &mut client, &channels[0], "back").await;
    assert!(seen.iter().any(|f| f["type"] == "gap"), "{seen:?}");
    eventually_metric(&node, "herald_broker_connected", 1.0).await;
}
