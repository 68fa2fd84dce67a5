//! Cross-node fan-out over real Redis servers started by the tests.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::redis_server::{
    RedisCluster, RedisServer, StallingProxy, eventually_channels, pubsub_channels,
};
use common::{
    PATIENCE, RawClient, TestNode, eventually_metric, eventually_ready, http, metric, readyz,
};
use herald::config::{BrokerKind, Config, RedisUrl};
use serde_json::json;

fn use_redis(config: &mut Config, url: &str) {
    config.broker.kind = BrokerKind::Redis;
    config.broker.url = Some(RedisUrl::new(url));
    config.broker.reconnect_min = Duration::from_millis(50);
    config.broker.reconnect_max = Duration::from_millis(500);
}

async fn redis_node(url: &str) -> TestNode {
    TestNode::start_with(|c| use_redis(c, url)).await
}

/// A node on `url` that has finished connecting to Redis.
async fn ready_redis_node(url: &str) -> TestNode {
    let node = redis_node(url).await;
    eventually_ready(&node, true).await;
    node
}

async fn redis_publish(
    connection: &mut redis::aio::MultiplexedConnection,
    channel: &str,
    payload: &[u8],
) -> i64 {
    redis::cmd("PUBLISH")
        .arg(channel)
        .arg(payload)
        .query_async(connection)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_backend_publish_reaches_every_subscriber_on_every_node_exactly_once() {
    let redis = RedisServer::start();
    let nodes = [
        ready_redis_node(&redis.url()).await,
        ready_redis_node(&redis.url()).await,
        ready_redis_node(&redis.url()).await,
    ];
    let mut clients = Vec::new();
    for node in &nodes {
        for _ in 0..4 {
            let mut client = node.client(&["prices.*"]).await;
            let reply = client.subscribe(&["prices.AAPL"]).await;
            assert_eq!(reply["channels"], json!(["prices.AAPL"]));
            clients.push(client);
        }
    }
    let mut backend = redis.connection().await;
    for i in 0..20 {
        // One subscriber connection per node, not per client.
        let receivers = redis_publish(
            &mut backend,
            "prices.AAPL",
            json!({"price": i}).to_string().as_bytes(),
        )
        .await;
        assert_eq!(receivers, 3);
    }
    // The publish API goes through Redis too.
    let (status, _) = nodes[1].publish("prices.AAPL", json!({"price": 20})).await;
    assert_eq!(status, 200);
    for client in &mut clients {
        for i in 0..=20 {
            let message = client.next_json().await;
            assert_eq!(message["channel"], "prices.AAPL");
            assert_eq!(message["data"]["price"], i);
        }
        assert_eq!(client.try_next_json(Duration::from_millis(50)).await, None);
    }
}

#[tokio::test]
async fn a_node_subscribes_only_to_what_its_clients_hold() {
    let redis = RedisServer::start();
    let node = ready_redis_node(&redis.url()).await;
    let mut admin = redis.connection().await;
    let mut first = node.client(&["*"]).await;
    let mut second = node.client(&["*"]).await;
    first.subscribe(&["a", "b"]).await;
    second.subscribe(&["a"]).await;
    assert_eq!(pubsub_channels(&mut admin, "CHANNELS").await, ["a", "b"]);
    let numsub: Vec<redis::Value> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg("a")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(
        numsub[1],
        redis::Value::Int(1),
        "one Redis subscription per node"
    );

    first.unsubscribe(&["a", "b"]).await;
    eventually_channels(&mut admin, "CHANNELS", &["a"]).await;
    drop(second);
    eventually_channels(&mut admin, "CHANNELS", &[]).await;
    drop(first);
}

#[tokio::test]
async fn racing_joins_and_leaves_converge_on_the_truth() {
    let redis = RedisServer::start();
    let node = ready_redis_node(&redis.url()).await;
    let mut admin = redis.connection().await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut client = node.client(&["*"]).await;
        tasks.push(tokio::spawn(async move {
            for _ in 0..25 {
                client.subscribe(&["race"]).await;
                client.unsubscribe(&["race"]).await;
            }
            // Even clients end subscribed, odd ones not.
            if i % 2 == 0 {
                client.subscribe(&["race"]).await;
            }
            client
        }));
    }
    let mut clients = Vec::new();
    for task in tasks {
        clients.push(task.await.unwrap());
    }
    eventually_channels(&mut admin, "CHANNELS", &["race"]).await;
    redis_publish(&mut admin, "race", b"1").await;
    for (i, client) in clients.iter_mut().enumerate() {
        let got = client
            .try_next_json(Duration::from_millis(if i % 2 == 0 { 2000 } else { 100 }))
            .await;
        assert_eq!(got.is_some(), i % 2 == 0, "client {i}: {got:?}");
    }
    for client in clients.iter_mut().step_by(2) {
        client.unsubscribe(&["race"]).await;
    }
    eventually_channels(&mut admin, "CHANNELS", &[]).await;
}

#[tokio::test]
async fn many_channels_are_subscribed_in_one_batch() {
    let redis = RedisServer::start();
    let node = ready_redis_node(&redis.url()).await;
    let mut admin = redis.connection().await;
    let mut client = node.client(&["bulk.*"]).await;
    let channels: Vec<String> = (0..100).map(|i| format!("bulk.{i:03}")).collect();
    let names: Vec<&str> = channels.iter().map(String::as_str).collect();
    let reply = client.subscribe(&names).await;
    assert_eq!(reply["channels"].as_array().unwrap().len(), 100);
    assert_eq!(pubsub_channels(&mut admin, "CHANNELS").await.len(), 100);
    redis_publish(&mut admin, "bulk.042", b"42").await;
    assert_eq!(client.next_json().await["channel"], "bulk.042");
}

#[tokio::test]
async fn redis_restart_keeps_clients_and_sends_a_gap() {
    let mut redis = RedisServer::start();
    let node = ready_redis_node(&redis.url()).await;
    let mut client = node.client(&["news", "later"]).await;
    client.subscribe(&["news"]).await;
    let mut backend = redis.connection().await;
    redis_publish(&mut backend, "news", b"1").await;
    assert_eq!(client.next_json().await["data"], 1);

    redis.kill();
    eventually_ready(&node, false).await;
    assert_eq!(readyz(&node).await.1, r#"{"status":"broker_unavailable"}"#);
    let (status, _) = http(node.addr, "GET", "/healthz", &[], String::new()).await;
    assert_eq!(status, 200);
    let (status, body) = node.publish("news", json!(2)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("broker_unavailable"))
    );
    // Subscribing during the outage is accepted and takes effect on reconnect.
    let reply = client.subscribe(&["later"]).await;
    assert_eq!(reply["channels"], json!(["later"]), "{reply}");

    redis.restart();
    let gap = client.next_json().await;
    assert_eq!(gap["type"], "gap", "{gap}");
    let mut channels: Vec<String> = serde_json::from_value(gap["channels"].clone()).unwrap();
    channels.sort();
    assert_eq!(channels, ["later", "news"]);
    eventually_ready(&node, true).await;

    let mut backend = redis.connection().await;
    redis_publish(&mut backend, "news", b"3").await;
    redis_publish(&mut backend, "later", b"4").await;
    assert_eq!(client.next_json().await["data"], 3);
    assert_eq!(client.next_json().await["data"], 4);
    let metrics = node.metrics().await;
    assert_eq!(metric(&metrics, "herald_broker_connected"), 1.0);
    assert!(metric(&metrics, "herald_broker_reconnects_total") >= 1.0);
    assert!(metric(&metrics, "herald_broker_resubscribed_channels_total") >= 2.0);
    assert_eq!(metric(&metrics, "herald_gap_notices_total"), 1.0);
}

#[tokio::test]
async fn a_silently_stalled_connection_is_detected_by_the_probe() {
    let redis = RedisServer::start();
    let proxy = StallingProxy::start(redis.port).await;
    let node = TestNode::start_with(|c| {
        use_redis(c, &proxy.url());
        c.broker.probe_interval = Duration::from_millis(200);
        c.broker.probe_timeout = Duration::from_millis(300);
        c.broker.command_timeout = Duration::from_millis(500);
    })
    .await;
    eventually_ready(&node, true).await;
    let mut client = node.client(&["news"]).await;
    client.subscribe(&["news"]).await;
    proxy.stall_current();
    let gap = client.next_json().await;
    assert_eq!(gap, json!({"type": "gap", "channels": ["news"]}));
    let mut backend = redis.connection().await;
    redis_publish(&mut backend, "news", b"after").await;
    assert_eq!(client.next_json().await["data"], "after");
    let metrics = node.metrics().await;
    assert!(metric(&metrics, "herald_broker_probe_failures_total") >= 1.0);
    assert!(metric(&metrics, "herald_broker_roundtrip_seconds_count") >= 1.0);
}

#[tokio::test]
async fn a_stalled_client_never_stalls_the_redis_connection() {
    let redis = RedisServer::start();
    let node = TestNode::start_with(|c| {
        use_redis(c, &redis.url());
        c.limits.queue_messages = 64;
        c.limits.write_timeout = Duration::from_secs(60);
    })
    .await;
    let mut admin = redis.connection().await;
    let mut healthy = node.client(&["feed"]).await;
    healthy.subscribe(&["feed"]).await;
    // Subscribed, and from now on not reading.
    let mut stalled = RawClient::subscribed(&node, "feed").await;
    let client_list = |list: String| -> HashSet<String> {
        list.lines()
            .filter(|line| {
                line.contains("cmd=ssubscribe")
                    || line.contains("sub=1")
                    || line.contains("flags=P")
            })
            .filter_map(|line| {
                line.split(' ')
                    .find(|f| f.starts_with("id="))
                    .map(str::to_owned)
            })
            .collect()
    };
    let before = client_list(
        redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut admin)
            .await
            .unwrap(),
    );
    assert_eq!(before.len(), 1, "{before:?}");

    // 600 x 60 KB = 36 MB: past Redis's 32 MB pub/sub output buffer hard limit.
    let count = 600u64;
    let reader = tokio::spawn(async move {
        for n in 0..count {
            let message = healthy.next_json().await;
            assert_eq!(message["data"]["n"], n);
        }
        healthy
    });
    let padding = "x".repeat(60 * 1024);
    for n in 0..count {
        let payload = json!({"n": n, "pad": padding}).to_string();
        redis_publish(&mut admin, "feed", payload.as_bytes()).await;
    }
    tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .unwrap()
        .unwrap();

    let after = client_list(
        redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut admin)
            .await
            .unwrap(),
    );
    assert_eq!(before, after, "the node's Redis connection survived");
    let metrics = node.metrics().await;
    assert_eq!(metric(&metrics, "herald_broker_reconnects_total"), 0.0);
    assert_eq!(
        metric(&metrics, "herald_messages_received_total"),
        count as f64
    );
    assert_eq!(stalled.expect_close(Duration::from_secs(30)).await, 4002);
}

#[tokio::test]
async fn odd_payloads_are_delivered_encoded_and_oversize_ones_dropped() {
    let redis = RedisServer::start();
    let node = TestNode::start_with(|c| {
        use_redis(c, &redis.url());
        c.limits.max_publish_bytes = 1024;
    })
    .await;
    let mut client = node.client(&["raw"]).await;
    client.subscribe(&["raw"]).await;
    let mut backend = redis.connection().await;
    redis_publish(&mut backend, "raw", b"plain text").await;
    redis_publish(&mut backend, "raw", &[0xff, 0xfe, 0x00]).await;
    redis_publish(&mut backend, "raw", &vec![b'x'; 2000]).await;
    redis_publish(&mut backend, "raw", b"{\"ok\":true}").await;
    assert_eq!(client.next_json().await["data"], "plain text");
    let binary = client.next_json().await;
    assert_eq!(
        (&binary["data"], &binary["encoding"]),
        (&json!("//4A"), &json!("base64"))
    );
    assert_eq!(client.next_json().await["data"], json!({"ok": true}));
    let metrics = node.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "herald_messages_dropped_total{reason=\"too_large\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn the_channel_prefix_namespaces_redis_channels() {
    let redis = RedisServer::start();
    let node = TestNode::start_with(|c| {
        use_redis(c, &redis.url());
        c.broker.channel_prefix = "app1:".into();
    })
    .await;
    let mut admin = redis.connection().await;
    let mut client = node.client(&["news"]).await;
    client.subscribe(&["news"]).await;
    assert_eq!(pubsub_channels(&mut admin, "CHANNELS").await, ["app1:news"]);
    redis_publish(&mut admin, "news", b"1").await;
    redis_publish(&mut admin, "app1:news", b"2").await;
    assert_eq!(
        client.next_json().await,
        json!({"type": "message", "channel": "news", "data": 2})
    );
}

#[tokio::test]
async fn a_node_started_while_redis_is_down_connects_when_it_comes_up() {
    let port = common::redis_server::free_port();
    let node = redis_node(&format!("redis://127.0.0.1:{port}")).await;
    eventually_ready(&node, false).await;
    let mut client = node.client(&["news"]).await;
    assert_eq!(
        client.subscribe(&["news"]).await["channels"],
        json!(["news"])
    );
    let redis = RedisServer::start_on(port, &[]);
    // Messages before the first connection were missed: a gap says so.
    assert_eq!(
        client.next_json().await,
        json!({"type": "gap", "channels": ["news"]})
    );
    eventually_ready(&node, true).await;
    let mut backend = redis.connection().await;
    redis_publish(&mut backend, "news", b"1").await;
    assert_eq!(client.next_json().await["data"], 1);
}

#[test]
fn serve_exits_on_a_malformed_url_or_refused_auth() {
    let run = |url: &str| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("serve")
            .env("HERALD_AUTH__HMAC_SECRET", common::SECRET)
            .env("HERALD_BROKER__KIND", "redis")
            .env("HERALD_BROKER__URL", url)
            .env("HERALD_SERVER__LISTEN", "127.0.0.1:0")
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).to_string(),
        )
    };
    let (code, stderr) = run("not a url");
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("broker.url"), "{stderr}");

    let redis = RedisServer::start_with(&["--requirepass", "right-password"]);
    let (code, stderr) = run(&format!("redis://:wrong-password@127.0.0.1:{}", redis.port));
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.to_lowercase().contains("auth"), "{stderr}");
}

#[tokio::test]
async fn authenticated_redis_with_a_db_index_works() {
    let redis = RedisServer::start_with(&["--requirepass", "right-password"]);
    let node = redis_node(&format!(
        "redis://:right-password@127.0.0.1:{}/3",
        redis.port
    ))
    .await;
    eventually_ready(&node, true).await;
    let mut client = node.client(&["news"]).await;
    client.subscribe(&["news"]).await;
    let mut backend =
        redis::Client::open(format!("redis://:right-password@127.0.0.1:{}", redis.port))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
    redis_publish(&mut backend, "news", b"1").await;
    assert_eq!(client.next_json().await["data"], 1);
}

#[tokio::test]
async fn redis_cluster_uses_sharded_pubsub_and_survives_a_primary_restart() {
    let mut cluster = RedisCluster::start().await;
    let node = TestNode::start_with(|c| {
        c.broker.kind = BrokerKind::RedisCluster;
        c.broker.cluster_urls = cluster.urls().iter().map(RedisUrl::new).collect();
        c.broker.reconnect_min = Duration::from_millis(50);
        c.broker.reconnect_max = Duration::from_millis(500);
    })
    .await;
    eventually_ready(&node, true).await;

    // One channel on each shard.
    let mut by_owner: [Option<String>; 3] = [None, None, None];
    for i in 0.. {
        let channel = format!("shard.{i}");
        let owner = cluster.owner_of(&channel).await;
        by_owner[owner].get_or_insert(channel);
        if by_owner.iter().all(Option::is_some) {
            break;
        }
    }
    let channels: Vec<String> = by_owner.into_iter().map(Option::unwrap).collect();
    let mut client = node.client(&["shard.*"]).await;
    let names: Vec<&str> = channels.iter().map(String::as_str).collect();
    assert_eq!(
        client.subscribe(&names).await["channels"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    for (owner, channel) in channels.iter().enumerate() {
        let mut connection = cluster.nodes[owner].connection().await;
        eventually_channels(&mut connection, "SHARDCHANNELS", &[channel.as_str()]).await;
        let receivers: i64 = redis::cmd("SPUBLISH")
            .arg(channel)
            .arg(owner)
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_eq!(receivers, 1);
        let message = client.next_json().await;
        assert_eq!(
            (message["channel"].as_str(), message["data"].as_u64()),
            (Some(channel.as_str()), Some(owner as u64))
        );
    }
    // The publish API uses SPUBLISH.
    assert_eq!(node.publish(&channels[1], json!("api")).await.0, 200);
    assert_eq!(client.next_json().await["data"], "api");

    cluster.nodes[0].restart();
    cluster.wait_ok().await;
    // Publish until the resubscription lands; the first arrivals may trail a gap frame.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    'delivered: loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no delivery after the primary restarted"
        );
        if let Ok(mut connection) = async {
            redis::Client::open(cluster.nodes[0].url())?
                .get_multiplexed_async_connection()
                .await
        }
        .await
        {
            let _: Result<i64, _> = redis::cmd("SPUBLISH")
                .arg(&channels[0])
                .arg("again")
                .query_async(&mut connection)
                .await;
        }
        while let Some(frame) = client.try_next_json(Duration::from_millis(300)).await {
            if frame["type"] == "message" && frame["data"] == "again" {
                break 'delivered;
            }
        }
    }
    // The other shards kept working throughout.
    let mut connection = cluster.nodes[2].connection().await;
    let _: i64 = redis::cmd("SPUBLISH")
        .arg(&channels[2])
        .arg("still")
        .query_async(&mut connection)
        .await
        .unwrap();
    loop {
        let frame = tokio::time::timeout(PATIENCE, client.next_json())
            .await
            .unwrap();
        if frame["data"] == "still" {
            break;
        }
    }
    eventually_metric(&node, "herald_broker_connected", 1.0).await;
}
