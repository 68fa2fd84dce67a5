//! Interactive channels: clients publishing with grants, and pattern
//! subscriptions, on the memory broker, standalone Redis (three nodes) and
//! Redis Cluster.

mod common;

use std::time::Duration;

use common::redis_server::{RedisCluster, RedisServer};
use common::{Client, SECRET, TestNode, eventually_metric, eventually_ready, rule};
use herald::config::{BrokerKind, Config, RedisUrl, SlowPolicy};
use serde_json::{Value, json};

fn publisher_token(sub: &str, channels: &[&str], publish: &[&str]) -> String {
    let owned = |list: &[&str]| list.iter().map(|c| c.to_string()).collect::<Vec<_>>();
    herald::auth::mint_hs256_publishing(
        SECRET,
        sub,
        &owned(channels),
        &owned(publish),
        Duration::from_secs(3600),
    )
}

async fn connect(node: &TestNode, sub: &str, channels: &[&str], publish: &[&str]) -> Client {
    Client::connect(&node.ws_url(&publisher_token(sub, channels, publish))).await
}

async fn publish(client: &mut Client, channel: &str, data: Value) -> Value {
    client
        .request(json!({"op": "publish", "channel": channel, "data": data}))
        .await
}

/// The next message frame, skipping other frames.
async fn next_message(client: &mut Client) -> Value {
    loop {
        let frame = client.next_json().await;
        if frame["type"] == "message" {
            return frame;
        }
    }
}

async fn nothing_more(client: &mut Client) {
    if let Some(frame) = client.try_next_json(Duration::from_millis(300)).await {
        panic!("unexpected frame {frame}");
    }
}

fn chat(config: &mut Config) {
    let mut stamped = rule("chat.*", SlowPolicy::Disconnect, None);
    stamped.stamp_from = true;
    config.channels.push(stamped);
    config.limits.publish_per_second = 5.0;
    config.limits.publish_burst = 3;
    config.limits.max_publish_bytes = 1024;
}

#[tokio::test]
async fn clients_publish_within_their_grants_and_limits() {
    let node = TestNode::start_with(chat).await;
    let mut alice = connect(&node, "alice", &["chat.*", "news"], &["chat.lobby"]).await;
    let mut bob = connect(&node, "bob", &["chat.*"], &[]).await;
    // The publisher's own copy may come before its reply; bob reads.
    bob.subscribe(&["chat.lobby"]).await;

    let reply = publish(&mut alice, "chat.lobby", json!({"text": "hi"})).await;
    assert_eq!(reply, json!({"type": "reply", "id": reply["id"]}));
    let frame = next_message(&mut bob).await;
    assert_eq!(frame["data"], json!({"text": "hi"}));
    assert_eq!(frame["from"], "alice", "stamped by the server: {frame}");

    let check = async |client: &mut Client, channel: &str, data: Value, code: &str| {
        let reply = publish(client, channel, data).await;
        assert_eq!(reply["error"]["code"], code, "{reply}");
    };
    check(&mut bob, "chat.lobby", json!(1), "forbidden").await;
    check(&mut alice, "news", json!(1), "forbidden").await;
    check(&mut alice, "chat.*", json!(1), "invalid_channel").await;
    check(&mut alice, "chat lobby", json!(1), "invalid_channel").await;
    check(
        &mut alice,
        "chat.lobby",
        json!("x".repeat(2000)),
        "too_large",
    )
    .await;
    let reply = alice
        .request(json!({"op": "publish", "channel": "chat.lobby"}))
        .await;
    assert_eq!(reply["code"], "invalid_request", "{reply}");
    // A burst of 3, of which one is spent.
    publish(&mut alice, "chat.lobby", json!(2)).await;
    publish(&mut alice, "chat.lobby", json!(3)).await;
    check(&mut alice, "chat.lobby", json!(4), "rate_limited").await;
    eventually_metric(&node, "herald_client_publishes_total{outcome=\"ok\"}", 3.0).await;
    eventually_metric(
        &node,
        "herald_client_publishes_total{outcome=\"rate_limited\"}",
        1.0,
    )
    .await;
    eventually_metric(
        &node,
        "herald_client_publishes_total{outcome=\"forbidden\"}",
        2.0,
    )
    .await;
}

#[tokio::test]
async fn user_publish_templates_grant_only_the_users_own_channel() {
    let node = TestNode::start_with(|c| {
        c.auth.user_publish = vec!["inbox.{sub}".into()];
    })
    .await;
    let mut alice = connect(&node, "alice", &["inbox.*"], &[]).await;
    let mut reader = connect(&node, "reader", &["inbox.*"], &[]).await;
    reader.subscribe(&["inbox.alice"]).await;
    let reply = publish(&mut alice, "inbox.alice", json!(1)).await;
    assert_eq!(reply, json!({"type": "reply", "id": reply["id"]}));
    let frame = next_message(&mut reader).await;
    assert_eq!((frame["data"].clone(), frame.get("from")), (json!(1), None));
    // `alice.bob` may publish to its own escaped channel only.
    let mut evil = connect(&node, "alice.bob", &[], &[]).await;
    let reply = publish(&mut evil, "inbox.alice=2Ebob", json!(1)).await;
    assert_eq!(reply["error"], Value::Null, "{reply}");
    let reply = publish(&mut evil, "inbox.alice.bob", json!(1)).await;
    assert_eq!(reply["error"]["code"], "forbidden", "{reply}");
    let reply = publish(&mut evil, "inbox.alice", json!(1)).await;
    assert_eq!(reply["error"]["code"], "forbidden", "{reply}");
}

async fn redis_node(url: &str) -> TestNode {
    let url = url.to_owned();
    let node = TestNode::start_with(move |c| {
        c.broker.kind = BrokerKind::Redis;
        c.broker.url = Some(RedisUrl::new(url));
        chat(c);
    })
    .await;
    eventually_ready(&node, true).await;
    node
}

#[tokio::test]
async fn a_publish_on_one_node_reaches_every_node_once() {
    let redis = RedisServer::start();
    let nodes = [
        redis_node(&redis.url()).await,
        redis_node(&redis.url()).await,
        redis_node(&redis.url()).await,
    ];
    let mut clients = Vec::new();
    for node in &nodes {
        let mut client = connect(node, "reader", &["chat.*"], &[]).await;
        client.subscribe(&["chat.lobby"]).await;
        clients.push(client);
    }
    let mut alice = connect(&nodes[0], "alice", &[], &["chat.*"]).await;
    let reply = publish(&mut alice, "chat.lobby", json!({"n": 1})).await;
    assert_eq!(reply["error"], Value::Null, "{reply}");
    for client in &mut clients {
        let frame = next_message(client).await;
        assert_eq!(
            (frame["data"].clone(), frame["from"].clone()),
            (json!({"n": 1}), json!("alice"))
        );
        nothing_more(client).await;
    }
}

async fn pattern_deliveries(node: &TestNode, publish_via: impl AsyncFn(&str, Value)) {
    let mut client = connect(node, "u", &["prices.*", "news.*"], &[]).await;
    let reply = client
        .subscribe(&["prices.*", "prices.A*", "news.eu"])
        .await;
    assert_eq!(reply["errors"], json!([]), "{reply}");
    assert_eq!(
        reply["channels"],
        json!(["prices.*", "prices.A*", "news.eu"])
    );
    // Grants must cover the whole pattern.
    let reply = client.subscribe(&["news.*", "*", "other.*"]).await;
    assert_eq!(reply["channels"], json!(["news.*"]), "{reply}");
    let codes: Vec<&str> = reply["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["forbidden", "forbidden"]);

    publish_via("prices.AAPL", json!(1)).await;
    publish_via("prices.MSFT", json!(2)).await;
    publish_via("news.eu", json!(3)).await;
    publish_via("other.x", json!(4)).await;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let frame = next_message(&mut client).await;
        seen.push((
            frame["channel"].as_str().unwrap().to_owned(),
            frame["data"].clone(),
        ));
    }
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        seen,
        [
            ("news.eu".to_owned(), json!(3)),
            ("prices.AAPL".to_owned(), json!(1)),
            ("prices.MSFT".to_owned(), json!(2)),
        ],
        "each once, named by its channel, through two patterns and an exact subscription"
    );
    nothing_more(&mut client).await;

    let reply = client.unsubscribe(&["prices.*", "prices.A*"]).await;
    assert_eq!(reply["channels"], json!(["prices.*", "prices.A*"]));
    publish_via("prices.AAPL", json!(5)).await;
    publish_via("news.eu", json!(6)).await;
    assert_eq!(next_message(&mut client).await["data"], 6);
    nothing_more(&mut client).await;
}

#[tokio::test]
async fn pattern_subscriptions_on_the_memory_broker() {
    let node = TestNode::start().await;
    pattern_deliveries(&node, async |channel, data| {
        let (status, body) = node.publish(channel, data).await;
        assert_eq!(status, 200, "{body}");
    })
    .await;
}

#[tokio::test]
async fn pattern_subscriptions_across_redis_nodes() {
    let redis = RedisServer::start();
    let subscriber = redis_node(&redis.url()).await;
    let publisher = redis_node(&redis.url()).await;
    pattern_deliveries(&subscriber, async |channel, data| {
        let (status, body) = publisher.publish(channel, data).await;
        assert_eq!(status, 200, "{body}");
    })
    .await;
    // The client is gone: the node lets every pattern go at Redis.
    let mut connection = redis.connection().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let patterns: i64 = redis::cmd("PUBSUB")
            .arg("NUMPAT")
            .query_async(&mut connection)
            .await
            .unwrap();
        if patterns == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{patterns} patterns left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn pattern_subscriptions_are_refused_on_a_cluster() {
    let cluster = RedisCluster::start().await;
    let urls = cluster.urls();
    let node = TestNode::start_with(move |c| {
        c.broker.kind = BrokerKind::RedisCluster;
        c.broker.cluster_urls = urls.iter().map(RedisUrl::new).collect();
    })
    .await;
    eventually_ready(&node, true).await;
    let mut client = connect(&node, "u", &["prices.*"], &[]).await;
    let reply = client.subscribe(&["prices.*", "prices.AAPL"]).await;
    assert_eq!(reply["channels"], json!(["prices.AAPL"]));
    assert_eq!(reply["errors"][0]["code"], "not_supported", "{reply}");
}

fn presence_rules(config: &mut Config) {
    let mut room = rule("chat.*", SlowPolicy::Disconnect, None);
    room.presence = true;
    room.join_leave = true;
    config.channels.push(room);
    config.presence.heartbeat_interval = Duration::from_millis(200);
    config.presence.ttl = Duration::from_millis(1500);
}

/// The next `join` or `leave` frame, as `"join alice"`.
async fn next_event(client: &mut Client) -> String {
    loop {
        let frame = client.next_json().await;
        if frame["type"] == "join" || frame["type"] == "leave" {
            assert_eq!(frame["channel"], "chat.lobby", "{frame}");
            return format!(
                "{} {}",
                frame["type"].as_str().unwrap(),
                frame["user"].as_str().unwrap()
            );
        }
    }
}

async fn members(client: &mut Client) -> (Value, Value) {
    let list = client
        .request(json!({"op": "presence", "channel": "chat.lobby"}))
        .await;
    let count = client
        .request(json!({"op": "presence_count", "channel": "chat.lobby"}))
        .await;
    (
        list["presence"].clone(),
        json!([count["users"], count["connections"]]),
    )
}

/// Polls `presence` until it lists `expected` (user, connections).
async fn eventually_members(client: &mut Client, expected: Value) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (list, _) = members(client).await;
        if list == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "presence is {list}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn presence_counts_users_once_and_tells_joins_and_leaves() {
    let node = TestNode::start_with(presence_rules).await;
    let mut watcher = connect(&node, "watcher", &["chat.*"], &[]).await;
    watcher.subscribe(&["chat.lobby"]).await;
    assert_eq!(next_event(&mut watcher).await, "join watcher");

    let mut tab1 = connect(&node, "alice", &["chat.*"], &[]).await;
    tab1.subscribe(&["chat.lobby"]).await;
    let mut tab2 = connect(&node, "alice", &["chat.*"], &[]).await;
    tab2.subscribe(&["chat.lobby"]).await;
    assert_eq!(next_event(&mut watcher).await, "join alice");
    let (list, count) = members(&mut watcher).await;
    assert_eq!(
        list,
        json!([{"user": "alice", "connections": 2}, {"user": "watcher", "connections": 1}])
    );
    assert_eq!(count, json!([2, 3]));

    drop(tab1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, count) = members(&mut watcher).await;
    assert_eq!(count, json!([2, 2]), "one tab left, alice stays");
    tab2.unsubscribe(&["chat.lobby"]).await;
    assert_eq!(next_event(&mut watcher).await, "leave alice");
    nothing_more(&mut watcher).await;

    // Presence needs a subscribe grant, and a presence channel.
    let mut stranger = connect(&node, "s", &["news"], &[]).await;
    let reply = stranger
        .request(json!({"op": "presence", "channel": "chat.lobby"}))
        .await;
    assert_eq!(reply["error"]["code"], "forbidden", "{reply}");
    let reply = stranger
        .request(json!({"op": "presence_count", "channel": "news"}))
        .await;
    assert_eq!(reply["error"]["code"], "not_supported", "{reply}");
}

async fn presence_node(url: &str) -> TestNode {
    let url = url.to_owned();
    let node = TestNode::start_with(move |c| {
        c.broker.kind = BrokerKind::Redis;
        c.broker.url = Some(RedisUrl::new(url));
        presence_rules(c);
    })
    .await;
    eventually_ready(&node, true).await;
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_converges_across_nodes_and_tabs_on_two_nodes_join_once() {
    let redis = RedisServer::start();
    let mut nodes = Vec::new();
    for i in 0..3 {
        let url = redis.url();
        let node = TestNode::start_with(move |c| {
            c.node.id = Some(format!("presence-{i}"));
            c.broker.kind = BrokerKind::Redis;
            c.broker.url = Some(RedisUrl::new(url));
            presence_rules(c);
        })
        .await;
        eventually_ready(&node, true).await;
        nodes.push(node);
    }
    let mut watcher = connect(&nodes[0], "watcher", &["chat.*"], &[]).await;
    watcher.subscribe(&["chat.lobby"]).await;
    assert_eq!(next_event(&mut watcher).await, "join watcher");
    let mut tab1 = connect(&nodes[1], "alice", &["chat.*"], &[]).await;
    tab1.subscribe(&["chat.lobby"]).await;
    let mut tab2 = connect(&nodes[2], "alice", &["chat.*"], &[]).await;
    tab2.subscribe(&["chat.lobby"]).await;
    assert_eq!(next_event(&mut watcher).await, "join alice");
    for node in &nodes {
        let mut reader = connect(node, "reader", &["chat.*"], &[]).await;
        eventually_members(
            &mut reader,
            json!([{"user": "alice", "connections": 2}, {"user": "watcher", "connections": 1}]),
        )
        .await;
    }
    drop(tab1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(tab2);
    assert_eq!(next_event(&mut watcher).await, "leave alice");
    nothing_more(&mut watcher).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_a_killed_node_drop_out_within_the_ttl() {
    use std::process::{Command, Stdio};
    let redis = RedisServer::start();
    let survivor = presence_node(&redis.url()).await;
    let mut watcher = connect(&survivor, "watcher", &["chat.*"], &[]).await;
    watcher.subscribe(&["chat.lobby"]).await;
    assert_eq!(next_event(&mut watcher).await, "join watcher");

    let dir = std::env::temp_dir().join(format!("herald-presence-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("herald.toml");
    std::fs::write(
        &file,
        "[presence]\nheartbeat_interval = \"200ms\"\nttl = \"1500ms\"\n\
         [[channels]]\npattern = \"chat.*\"\npresence = true\njoin_leave = true\n",
    )
    .unwrap();
    let port = common::redis_server::free_port();
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut doomed = Killed(
        Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["serve", "--config", file.to_str().unwrap()])
            .env("HERALD_AUTH__HMAC_SECRET", SECRET)
            .env("HERALD_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env("HERALD_BROKER__KIND", "redis")
            .env("HERALD_BROKER__URL", redis.url())
            .env("HERALD_NODE__ID", "doomed")
            .env("HERALD_LOG__LEVEL", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!(
        "ws://127.0.0.1:{port}/ws?token={}",
        publisher_token("bob", &["chat.*"], &[])
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut bob = loop {
        if let Ok((ws, _)) = tokio_tungstenite::connect_async(&url).await {
            break ws;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the doomed node never started"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    use futures_util::SinkExt;
    bob.send(tokio_tungstenite::tungstenite::Message::text(
        json!({"op": "subscribe", "id": 1, "channels": ["chat.lobby"]}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(next_event(&mut watcher).await, "join bob");
    // SIGKILL: the node cleans nothing up.
    let killed = tokio::time::Instant::now();
    let _ = doomed.0.kill();
    let _ = doomed.0.wait();
    assert_eq!(next_event(&mut watcher).await, "leave bob");
    let took = killed.elapsed();
    assert!(
        took <= Duration::from_millis(1500 + 200 + 1000),
        "leave after {took:?}: at most presence.ttl + heartbeat_interval (+ slack)"
    );
    let (list, _) = members(&mut watcher).await;
    assert_eq!(list, json!([{"user": "watcher", "connections": 1}]));
    let _ = std::fs::remove_dir_all(&dir);
}
