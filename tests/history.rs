//! History and recovery: history channels lose nothing across pub/sub drops,
//! node restarts and client reconnects, against real `redis-server`
//! processes (standalone and a 3-primary cluster) and the memory broker.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::redis_server::{RedisCluster, RedisServer, StallingProxy};
use common::{
    Client, PATIENCE, TestNode, eventually_metric, eventually_ready, history_rule, metric, token,
};
use herald::config::{BrokerKind, Config, RedisUrl};
use serde_json::{Value, json};
use tokio::time::Instant;

const CHANNEL: &str = "notify.alice";

/// History on `notify.*`, with quick Redis failure detection.
fn history_config(config: &mut Config, size: u64, recover_max: u64) {
    config
        .channels
        .push(history_rule("notify.*", size, recover_max));
    config.broker.reconnect_min = Duration::from_millis(50);
    config.broker.reconnect_max = Duration::from_millis(300);
    config.broker.probe_interval = Duration::from_millis(200);
    config.broker.probe_timeout = Duration::from_millis(600);
    config.broker.command_timeout = Duration::from_secs(2);
}

async fn redis_node(redis_url: &str, size: u64, recover_max: u64) -> TestNode {
    let url = redis_url.to_owned();
    let node = TestNode::start_with(move |c| {
        c.broker.kind = BrokerKind::Redis;
        c.broker.url = Some(RedisUrl::new(url));
        history_config(c, size, recover_max);
    })
    .await;
    eventually_ready(&node, true).await;
    node
}

async fn client(node: &TestNode) -> Client {
    Client::connect(&node.ws_url(&token("alice", &["notify.*", "plain.*"]))).await
}

/// Subscribes to `channel`, with `since` when given; returns the reply.
async fn subscribe(client: &mut Client, channel: &str, since: Option<(u64, &str)>) -> Value {
    let mut request = json!({"op": "subscribe", "channels": [channel]});
    if let Some((offset, epoch)) = since {
        request["since"] = json!({channel: {"offset": offset, "epoch": epoch}});
    }
    let reply = client.request(request).await;
    assert_eq!(reply["errors"], json!([]), "{reply}");
    reply
}

/// Reads frames until `count` messages of `channel` arrived; returns their
/// offsets, with the epoch of the last. Panics on a `gap`.
async fn offsets(client: &mut Client, channel: &str, count: usize) -> (Vec<u64>, String) {
    let mut offsets = Vec::new();
    let mut epoch = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while offsets.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = client
            .try_next_json(left)
            .await
            .unwrap_or_else(|| panic!("only {} of {count} messages: {offsets:?}", offsets.len()));
        assert_ne!(
            frame["type"],
            "gap",
            "unexpected gap after {} messages, the last {:?}",
            offsets.len(),
            &offsets[offsets.len().saturating_sub(5)..]
        );
        if frame["type"] == "message" && frame["channel"] == channel {
            offsets.push(frame["offset"].as_u64().expect("an offset"));
            epoch = frame["epoch"].as_str().expect("an epoch").to_owned();
        }
    }
    (offsets, epoch)
}

async fn publish(node: &TestNode, channel: &str, n: u64) -> Vec<Value> {
    let mut replies = Vec::new();
    for i in 0..n {
        let (status, body) = node.publish(channel, json!({"n": i})).await;
        assert_eq!(status, 200, "{body}");
        replies.push(body);
    }
    replies
}

fn position(reply: &Value, channel: &str) -> (u64, String, Value, Value) {
    let position = &reply["positions"][channel];
    (
        position["offset"].as_u64().expect("an offset"),
        position["epoch"].as_str().expect("an epoch").to_owned(),
        position["recovered"].clone(),
        position["reason"].clone(),
    )
}

#[tokio::test]
async fn memory_broker_recovers_across_a_reconnect() {
    let node = TestNode::start_with(|c| history_config(c, 100, 300)).await;
    let mut alice = client(&node).await;
    let reply = subscribe(&mut alice, CHANNEL, None).await;
    let (top, epoch, recovered, _) = position(&reply, CHANNEL);
    assert_eq!((top, recovered), (0, Value::Null), "{reply}");
    assert_eq!(epoch, "", "no history yet");

    let published = publish(&node, CHANNEL, 3).await;
    assert_eq!(published[2]["offset"], 3, "{published:?}");
    let (seen, epoch) = offsets(&mut alice, CHANNEL, 3).await;
    assert_eq!(seen, [1, 2, 3]);
    assert_eq!(published[0]["epoch"], epoch.as_str());
    drop(alice);

    publish(&node, CHANNEL, 2).await;
    let mut alice = client(&node).await;
    let reply = subscribe(&mut alice, CHANNEL, Some((3, &epoch))).await;
    assert_eq!(
        position(&reply, CHANNEL),
        (5, epoch.clone(), json!(true), Value::Null)
    );
    publish(&node, CHANNEL, 1).await;
    assert_eq!(offsets(&mut alice, CHANNEL, 3).await.0, [4, 5, 6]);
    eventually_metric(
        &node,
        "herald_history_recoveries_total{outcome=\"recovered\",reason=\"none\"}",
        1.0,
    )
    .await;

    // A client that subscribed before the first message holds (0, ""): it
    // recovers from the channel's start.
    let mut early = client(&node).await;
    let reply = subscribe(&mut early, "notify.early", Some((0, ""))).await;
    assert_eq!(
        position(&reply, "notify.early"),
        (0, String::new(), json!(true), Value::Null)
    );
    drop(early);
    publish(&node, "notify.early", 2).await;
    let mut early = client(&node).await;
    let reply = subscribe(&mut early, "notify.early", Some((0, ""))).await;
    assert_eq!(
        reply["positions"]["notify.early"]["recovered"], true,
        "{reply}"
    );
    assert_eq!(offsets(&mut early, "notify.early", 2).await.0, [1, 2]);

    // A plain channel's reply has no position, and `since` for it is ignored.
    let reply = alice
        .request(json!({"op": "subscribe", "channels": ["plain.x"],
                        "since": {"plain.x": {"offset": 1, "epoch": "E"}}}))
        .await;
    assert_eq!(reply["positions"], Value::Null, "{reply}");
    assert_eq!(reply["channels"], json!(["plain.x"]));
}

#[tokio::test]
async fn a_client_resumes_on_another_node_with_exactly_what_it_missed() {
    let redis = RedisServer::start();
    let first = redis_node(&redis.url(), 1000, 300).await;
    let second = redis_node(&redis.url(), 1000, 300).await;

    let mut alice = client(&first).await;
    subscribe(&mut alice, CHANNEL, None).await;
    publish(&first, CHANNEL, 10).await;
    let (seen, epoch) = offsets(&mut alice, CHANNEL, 10).await;
    assert_eq!(seen, (1..=10).collect::<Vec<_>>());
    drop(alice);

    publish(&first, CHANNEL, 20).await;
    let mut alice = client(&second).await;
    let reply = subscribe(&mut alice, CHANNEL, Some((10, &epoch))).await;
    assert_eq!(
        position(&reply, CHANNEL),
        (30, epoch.clone(), json!(true), Value::Null)
    );
    // The 20, then live messages published through either node.
    publish(&first, CHANNEL, 2).await;
    publish(&second, CHANNEL, 2).await;
    let (seen, _) = offsets(&mut alice, CHANNEL, 24).await;
    assert_eq!(seen, (11..=34).collect::<Vec<_>>());
    assert!(
        alice
            .try_next_json(Duration::from_millis(300))
            .await
            .is_none(),
        "nothing twice"
    );
}

#[tokio::test]
async fn recoveries_that_cannot_be_made_say_why() {
    let mut redis = RedisServer::start();
    // A stream of 5, at most 8 per recovery.
    let node = redis_node(&redis.url(), 5, 8).await;
    let mut alice = client(&node).await;
    subscribe(&mut alice, CHANNEL, None).await;
    publish(&node, CHANNEL, 2).await;
    let (_, epoch) = offsets(&mut alice, CHANNEL, 2).await;
    drop(alice);

    let check = async |since: (u64, &str), channel: &str, expected: &str| {
        let mut alice = client(&node).await;
        let reply = subscribe(&mut alice, channel, Some(since)).await;
        let (_, _, recovered, reason) = position(&reply, channel);
        assert_eq!(
            (recovered, reason),
            (json!(false), json!(expected)),
            "{reply}"
        );
    };
    // Offsets 3..=8: the stream holds only 4..=8.
    publish(&node, CHANNEL, 6).await;
    check((2, &epoch), CHANNEL, "trimmed").await;
    // Offsets 9..=18 are 10 > recover_max.
    publish(&node, CHANNEL, 10).await;
    check((8, &epoch), CHANNEL, "too_many").await;
    check((1, "NoSuchEpoch"), CHANNEL, "epoch_changed").await;
    check((1, &epoch), "notify.nobody", "unknown_channel").await;

    // Redis restarts without persistence: the next publish begins a new epoch.
    redis.restart();
    eventually_ready(&node, true).await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, body) = node.publish(CHANNEL, json!("after")).await;
        if status == 200 {
            assert_eq!(body["offset"], 1, "{body}");
            assert_ne!(body["epoch"], epoch.as_str());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "publish after the restart: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    check((18, &epoch), CHANNEL, "epoch_changed").await;
    let text = node.metrics().await;
    for reason in ["trimmed", "too_many", "epoch_changed", "unknown_channel"] {
        let series =
            format!("herald_history_recoveries_total{{outcome=\"failed\",reason=\"{reason}\"}}");
        assert!(metric(&text, &series) >= 1.0, "{series}");
    }
}

#[tokio::test]
async fn backends_publish_with_fcall_and_raw_publishes_are_counted() {
    let redis = RedisServer::start();
    let first = redis_node(&redis.url(), 100, 300).await;
    let second = redis_node(&redis.url(), 100, 300).await;
    let mut on_first = client(&first).await;
    let mut on_second = client(&second).await;
    subscribe(&mut on_first, CHANNEL, None).await;
    subscribe(&mut on_second, CHANNEL, None).await;

    let mut connection = redis.connection().await;
    for i in 0..3 {
        let (epoch, offset): (String, u64) = redis::cmd("FCALL")
            .arg("herald_publish")
            .arg(1)
            .arg(CHANNEL)
            .arg(format!("{{\"i\":{i}}}"))
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_eq!(offset, i + 1);
        assert!(!epoch.is_empty());
    }
    assert_eq!(offsets(&mut on_first, CHANNEL, 3).await.0, [1, 2, 3]);
    assert_eq!(offsets(&mut on_second, CHANNEL, 3).await.0, [1, 2, 3]);

    let _: i64 = redis::cmd("PUBLISH")
        .arg(CHANNEL)
        .arg("{\"raw\":true}")
        .query_async(&mut connection)
        .await
        .unwrap();
    let frame = on_first.next_json().await;
    assert_eq!(frame["data"], json!({"raw": true}));
    assert_eq!(frame["offset"], Value::Null, "{frame}");
    eventually_metric(&first, "herald_messages_unsequenced_total", 1.0).await;

    // A channel without history: FCALL publishes it as it is.
    let mut plain = client(&first).await;
    subscribe(&mut plain, "plain.x", None).await;
    let (epoch, offset): (String, u64) = redis::cmd("FCALL")
        .arg("herald_publish")
        .arg(1)
        .arg("plain.x")
        .arg("1")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!((epoch.as_str(), offset), ("", 0));
    let frame = plain.next_json().await;
    assert_eq!(
        (frame["data"].clone(), frame["offset"].clone()),
        (json!(1), Value::Null)
    );
}

#[tokio::test]
async fn a_node_fills_a_hole_from_the_stream_itself() {
    let redis = RedisServer::start();
    let node = redis_node(&redis.url(), 100, 300).await;
    let mut alice = client(&node).await;
    subscribe(&mut alice, CHANNEL, None).await;
    publish(&node, CHANNEL, 1).await;
    let (_, epoch) = offsets(&mut alice, CHANNEL, 1).await;
    // Offsets 2 and 3 go into the stream without a PUBLISH (as if the pub/sub
    // link dropped them); offset 4 is published.
    let mut connection = redis.connection().await;
    for offset in [2, 3] {
        let _: () = redis::cmd("XADD")
            .arg(format!("{{{CHANNEL}}}:s"))
            .arg(format!("{offset}-0"))
            .arg("d")
            .arg(offset.to_string())
            .query_async(&mut connection)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("HSET")
        .arg(format!("{{{CHANNEL}}}:m"))
        .arg("t")
        .arg(3)
        .query_async(&mut connection)
        .await
        .unwrap();
    publish(&node, CHANNEL, 1).await;
    let (seen, again) = offsets(&mut alice, CHANNEL, 3).await;
    assert_eq!((seen, again), (vec![2, 3, 4], epoch));
    // 2, 3 and 4 came from the stream; the live 4 was a duplicate.
    eventually_metric(&node, "herald_history_filled_messages_total", 3.0).await;
    eventually_metric(&node, "herald_history_duplicates_total", 1.0).await;
}

#[tokio::test]
async fn the_periodic_check_catches_a_lost_tail_on_a_quiet_channel() {
    let redis = RedisServer::start();
    let url = redis.url();
    let node = TestNode::start_with(move |c| {
        c.broker.kind = BrokerKind::Redis;
        c.broker.url = Some(RedisUrl::new(url));
        history_config(c, 100, 300);
        c.broker.history_check_interval = Duration::from_millis(500);
    })
    .await;
    eventually_ready(&node, true).await;
    let mut alice = client(&node).await;
    subscribe(&mut alice, CHANNEL, None).await;
    publish(&node, CHANNEL, 1).await;
    offsets(&mut alice, CHANNEL, 1).await;
    // The last message of a burst never reaches the node's pub/sub link.
    let mut connection = redis.connection().await;
    let _: () = redis::cmd("XADD")
        .arg(format!("{{{CHANNEL}}}:s"))
        .arg("2-0")
        .arg("d")
        .arg("\"tail\"")
        .query_async(&mut connection)
        .await
        .unwrap();
    let _: () = redis::cmd("HINCRBY")
        .arg(format!("{{{CHANNEL}}}:m"))
        .arg("t")
        .arg(1)
        .query_async(&mut connection)
        .await
        .unwrap();
    let (seen, _) = offsets(&mut alice, CHANNEL, 1).await;
    assert_eq!(seen, [2]);
}

/// Publishes through `publisher`'s API at about `rate` per second for
/// `duration`; returns the top offset. A publish refused while the
/// publisher's own Redis connection is being rebuilt (`CLIENT KILL TYPE
/// pubsub` closes it too) is retried: the offsets tell what Redis holds.
async fn publish_at(publisher: &TestNode, rate: u64, duration: Duration) -> u64 {
    let interval = Duration::from_micros(1_000_000 / rate);
    let mut ticker = tokio::time::interval(interval);
    let end = Instant::now() + duration;
    let mut top = 0;
    let mut refused = 0;
    while Instant::now() < end {
        ticker.tick().await;
        let (status, body) = publisher.publish(CHANNEL, json!({"n": top})).await;
        match status {
            200 => top = top.max(body["offset"].as_u64().expect("an offset")),
            503 => refused += 1,
            _ => panic!("publish: {status} {body}"),
        }
    }
    assert!(refused < 500, "{refused} publishes refused");
    top
}

/// 100 subscribers on `subscriber_node`; `publisher_node` publishes 500/s for
/// 5 s while `fault` runs. Every subscriber gets every offset exactly once,
/// in order, and no gap.
async fn zero_loss(
    subscriber_node: &TestNode,
    publisher_node: &TestNode,
    fault: impl Future<Output = ()>,
) {
    let mut clients = Vec::new();
    for _ in 0..100 {
        let mut c = client(subscriber_node).await;
        subscribe(&mut c, CHANNEL, None).await;
        clients.push(c);
    }
    // The subscribers read while the messages arrive, as clients do: one
    // that read nothing for the 5 s would hold 2,500 messages, more than its
    // outbox may (`limits.queue_messages`), and be closed with 4002.
    let (top_sender, top) = tokio::sync::watch::channel(None);
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            let mut top = top.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let published: u64 = loop {
                    tokio::select! {
                        // Reading one offset is cancelled only while it waits
                        // for a frame, so none is lost.
                        (more, _) = offsets(&mut c, CHANNEL, 1) => seen.extend(more),
                        published = top.wait_for(Option::is_some) => {
                            break published.expect("the sender outlives the readers").expect("set");
                        }
                    }
                };
                let rest = (published as usize).saturating_sub(seen.len());
                seen.extend(offsets(&mut c, CHANNEL, rest).await.0);
                seen
            })
        })
        .collect();
    let (published, ()) = tokio::join!(
        async {
            let published = publish_at(publisher_node, 500, Duration::from_secs(5)).await;
            top_sender.send_replace(Some(published));
            published
        },
        fault
    );
    for (i, reader) in readers.into_iter().enumerate() {
        let seen = reader.await.unwrap();
        assert_eq!(
            seen,
            (1..=published).collect::<Vec<_>>(),
            "subscriber {i}: missing, duplicated or out of order"
        );
    }
    let text = subscriber_node.metrics().await;
    assert_eq!(metric(&text, "herald_gap_notices_total"), 0.0);
}

async fn client_kill_pubsub(urls: &[String]) {
    for url in urls {
        let mut connection = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: Result<i64, _> = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut connection)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_loss_across_pubsub_drops_on_standalone_redis() {
    let redis = RedisServer::start();
    let proxy =
        StallingProxy::start(redis.url().rsplit(':').next().unwrap().parse().unwrap()).await;
    let subscriber_node = redis_node(&proxy.url(), 10_000, 1000).await;
    let publisher_node = redis_node(&redis.url(), 10_000, 1000).await;
    let urls = [redis.url()];
    zero_loss(&subscriber_node, &publisher_node, async {
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            client_kill_pubsub(&urls).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        proxy.stall_current();
    })
    .await;
    let text = subscriber_node.metrics().await;
    assert!(
        metric(&text, "herald_broker_reconnects_total") >= 4.0,
        "{text}"
    );
    assert!(metric(&text, "herald_history_filled_messages_total") > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_loss_across_pubsub_drops_on_a_cluster() {
    let cluster = RedisCluster::start().await;
    let start = async || {
        let urls = cluster.urls();
        let node = TestNode::start_with(move |c| {
            c.broker.kind = BrokerKind::RedisCluster;
            c.broker.cluster_urls = urls.iter().map(RedisUrl::new).collect();
            history_config(c, 10_000, 1000);
        })
        .await;
        eventually_ready(&node, true).await;
        node
    };
    let subscriber_node = start().await;
    let publisher_node = start().await;
    let owner = cluster.owner_of(CHANNEL).await;
    let owner_url = cluster.nodes[owner].url();
    let urls = cluster.urls();
    zero_loss(&subscriber_node, &publisher_node, async {
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            client_kill_pubsub(&urls).await;
        }
        // The owner stops answering for longer than the probe timeout.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut connection = redis::Client::open(owner_url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(900)
            .arg("ALL")
            .query_async(&mut connection)
            .await
            .unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_joins_on_one_channel_each_recover_exactly_once() {
    let redis = RedisServer::start();
    let node = redis_node(&redis.url(), 10_000, 1000).await;
    let mut first = client(&node).await;
    subscribe(&mut first, CHANNEL, None).await;
    publish(&node, CHANNEL, 5).await;
    let (_, epoch) = offsets(&mut first, CHANNEL, 5).await;
    drop(first);

    // Publishing goes on while 20 clients rejoin from offset 5.
    let running = Arc::new(AtomicBool::new(true));
    let published = Arc::new(AtomicU64::new(5));
    let publisher = {
        let (running, published) = (running.clone(), published.clone());
        let addr = node.addr;
        tokio::spawn(async move {
            while running.load(Ordering::SeqCst) {
                let (status, _) = common::http(
                    addr,
                    "POST",
                    "/api/publish",
                    &[("authorization", &format!("Bearer {}", common::API_KEY))],
                    json!({"channel": CHANNEL, "data": 1}).to_string(),
                )
                .await;
                assert_eq!(status, 200);
                published.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let joins = (0..20).map(|_| {
        let url = node.ws_url(&token("alice", &["notify.*"]));
        let epoch = epoch.clone();
        tokio::spawn(async move {
            let mut c = Client::connect(&url).await;
            let reply = subscribe(&mut c, CHANNEL, Some((5, &epoch))).await;
            assert_eq!(reply["positions"][CHANNEL]["recovered"], true, "{reply}");
            c
        })
    });
    let mut clients = Vec::new();
    for join in joins {
        clients.push(join.await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    running.store(false, Ordering::SeqCst);
    publisher.await.unwrap();
    let total = published.load(Ordering::SeqCst);
    let mut seen_by: HashMap<usize, Vec<u64>> = HashMap::new();
    for (i, mut c) in clients.into_iter().enumerate() {
        let (seen, _) = offsets(&mut c, CHANNEL, (total - 5) as usize).await;
        seen_by.insert(i, seen);
    }
    for (i, seen) in seen_by {
        assert_eq!(seen, (6..=total).collect::<Vec<_>>(), "client {i}");
    }
}
