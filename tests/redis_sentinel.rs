//! Redis Sentinel: a node finds the primary through the Sentinels and follows
//! it across a failover, within a documented bound.

mod common;

use std::time::Duration;

use common::redis_server::RedisSentinels;
use common::{TestNode, eventually_ready};
use herald::config::{BrokerKind, Secret};
use serde_json::json;
use tokio::time::Instant;

#[tokio::test]
async fn a_node_follows_the_primary_across_a_sentinel_failover() {
    let set = RedisSentinels::start().await;
    let sentinels = set.addresses();
    let node = TestNode::start_with(|c| {
        c.broker.kind = BrokerKind::RedisSentinel;
        c.broker.sentinels = sentinels.clone();
        c.broker.master_name = Some(RedisSentinels::MASTER_NAME.into());
        c.broker.probe_interval = Duration::from_millis(500);
        c.broker.reconnect_min = Duration::from_millis(50);
        c.broker.reconnect_max = Duration::from_millis(500);
    })
    .await;
    eventually_ready(&node, true).await;
    let mut client = node.client(&["orders"]).await;
    client.subscribe(&["orders"]).await;
    assert_eq!(node.publish("orders", json!("before")).await.0, 200);
    assert_eq!(client.next_json().await["data"], "before");

    set.failover().await;
    let failed_over = Instant::now();
    // Publish through the node until a message arrives that went through the
    // new primary: the node must have moved its link there. The bound is
    // the probe interval (when the node asks the Sentinels again) plus a
    // reconnect.
    let mut saw_gap = false;
    'delivered: loop {
        assert!(
            failed_over.elapsed() < Duration::from_secs(10),
            "delivery did not resume through the new primary"
        );
        let (status, _) = node.publish("orders", json!("after")).await;
        if status == 200 {
            while let Some(frame) = client.try_next_json(Duration::from_millis(200)).await {
                saw_gap |= frame["type"] == "gap";
                if frame["data"] == "after" && saw_gap {
                    break 'delivered;
                }
            }
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The node's subscription now lives on the new primary.
    let mut connection = set.replica.connection().await;
    let numsub: Vec<redis::Value> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg("orders")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(numsub.get(1), Some(&redis::Value::Int(1)), "{numsub:?}");
    eventually_ready(&node, true).await;
}

#[tokio::test]
async fn sentinel_configuration_is_checked() {
    let mut config = common::test_config();
    config.broker.kind = BrokerKind::RedisSentinel;
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("broker.sentinels"), "{error}");
    config.broker.sentinels = vec!["nohost".into()];
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("broker.sentinels"), "{error}");
    config.broker.sentinels = vec!["127.0.0.1:26379".into()];
    let error = config.validate().unwrap_err().to_string();
    assert!(error.contains("broker.master_name"), "{error}");
    config.broker.master_name = Some("mymaster".into());
    config.broker.password = Some(Secret::new("redis-password"));
    config.validate().unwrap();
    herald::check_config(&config).unwrap();
    assert!(!format!("{config:?}").contains("redis-password"));
}
