//! The paced drain: on SIGTERM a node closes its connections over
//! `shutdown.drain_period`, each after what is queued for it, so that the
//! other nodes see a steady trickle of reconnects instead of a storm.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Client, TestNode, readyz, token};
use futures_util::StreamExt;
use futures_util::future::join_all;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// What one client saw: the sequence numbers it received, and when and how
/// the node closed it.
#[derive(Default)]
struct Seen {
    sequence: Vec<u64>,
    close: Option<(u16, Instant)>,
}

/// Reads `client` until the node closes it.
fn watch(mut client: Client) -> tokio::task::JoinHandle<Seen> {
    tokio::spawn(async move {
        let mut seen = Seen::default();
        while let Some(Ok(message)) = client.ws.next().await {
            match message {
                Message::Text(text) => {
                    let frame: Value = serde_json::from_str(&text).unwrap();
                    if frame["type"] == "message" {
                        seen.sequence.push(frame["data"].as_u64().unwrap());
                    }
                }
                Message::Close(frame) => {
                    let code = frame.map_or(1005, |f| u16::from(f.code));
                    seen.close = Some((code, Instant::now()));
                }
                _ => {}
            }
        }
        seen
    })
}

async fn subscribed_clients(node: &TestNode, count: usize) -> Vec<Client> {
    let url = node.ws_url(&token("user", &["news"]));
    let mut clients = Vec::with_capacity(count);
    for _ in 0..count / 100 {
        let batch = join_all((0..100).map(|_| async {
            let mut client = Client::connect(&url).await;
            client.subscribe(&["news"]).await;
            client
        }))
        .await;
        clients.extend(batch);
    }
    clients
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closes_are_paced_over_the_period_and_lose_nothing() {
    let period = Duration::from_secs(4);
    let mut node = TestNode::start_with(|c| {
        c.shutdown.drain_period = period;
        c.shutdown.timeout = Duration::from_secs(10);
    })
    .await;
    let clients = subscribed_clients(&node, 2000).await;
    let watchers: Vec<_> = clients.into_iter().map(watch).collect();

    // A publisher keeps going through the drain: the API stays open.
    let published = Arc::new(Mutex::new(0u64));
    let publisher = {
        let published = published.clone();
        let addr = node.addr;
        tokio::spawn(async move {
            for sequence in 0u64.. {
                let body = json!({"channel": "news", "data": sequence}).to_string();
                let (status, _) = common::http(
                    addr,
                    "POST",
                    "/api/publish",
                    &[("authorization", &format!("Bearer {}", common::API_KEY))],
                    body,
                )
                .await;
                if status != 200 {
                    return;
                }
                *published.lock().await = sequence + 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    let at_drain = *published.lock().await;
    node.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, body) = readyz(&node).await;
    assert_eq!((status, body.as_str()), (503, r#"{"status":"draining"}"#));
    let refused = Client::try_connect(&node.ws_url(&token("late", &["news"]))).await;
    assert_eq!(refused.err().map(|(status, _)| status), Some(503));

    tokio::time::timeout(Duration::from_secs(12), node.wait())
        .await
        .expect("the node exits within shutdown.timeout")
        .unwrap();
    let exited = started.elapsed();
    assert!(exited < Duration::from_secs(10), "{exited:?}");
    publisher.abort();

    let mut closes = Vec::new();
    let mut received_by_the_last = 0;
    let mut last_close = Duration::ZERO;
    for watcher in watchers {
        let seen = watcher.await.unwrap();
        let (code, at) = seen.close.expect("every client gets a close frame");
        assert_eq!(code, 1001);
        closes.push(at.duration_since(started));
        if at.duration_since(started) > last_close {
            last_close = at.duration_since(started);
            received_by_the_last = seen.sequence.len() as u64;
        }
        // Nothing queued was lost: every message from the first one on, with
        // no hole, up to the close.
        let expected: Vec<u64> = (0..seen.sequence.len() as u64).collect();
        assert_eq!(seen.sequence, expected, "a hole before the close");
    }
    closes.sort();
    let spread = closes[closes.len() - 1] - closes[0];
    assert!(
        spread >= Duration::from_secs(3),
        "closes spread over {spread:?}"
    );
    // No 200 ms window holds more than three times the mean.
    let windows = (period.as_millis() / 200) as usize;
    let mut counts = vec![0usize; windows + 10];
    for at in &closes {
        counts[(at.as_millis() / 200) as usize] += 1;
    }
    let mean = closes.len() / windows;
    let busiest = *counts.iter().max().unwrap();
    assert!(
        busiest <= 3 * mean,
        "{busiest} closes in one window, mean {mean}: {counts:?}"
    );
    // Messages published during the drain reached the clients not yet closed:
    // the last one closed got the messages of about 4 s more than there were
    // when the drain began (some 150 on a quiet machine, 70 to 90 with every
    // core busy; without the paced drain, none).
    assert!(
        received_by_the_last > at_drain + 20,
        "{received_by_the_last} received, {at_drain} published before the drain"
    );
}

#[tokio::test]
async fn a_second_signal_skips_the_pacing() {
    let mut node = TestNode::start_with(|c| {
        c.shutdown.drain_period = Duration::from_secs(60);
        c.shutdown.timeout = Duration::from_secs(70);
    })
    .await;
    let clients = subscribed_clients(&node, 100).await;
    let watchers: Vec<_> = clients.into_iter().map(watch).collect();
    let started = Instant::now();
    node.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    node.hurry();
    tokio::time::timeout(Duration::from_secs(5), node.wait())
        .await
        .expect("the node exits at once")
        .unwrap();
    for watcher in watchers {
        let seen = watcher.await.unwrap();
        assert_eq!(seen.close.map(|(code, _)| code), Some(1001));
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn the_timeout_must_cover_the_drain_period() {
    let mut config = common::test_config();
    config.shutdown.drain_period = Duration::from_secs(20);
    config.shutdown.timeout = Duration::from_secs(21);
    let error = config.validate().unwrap_err().to_string();
    assert!(
        error.contains("shutdown.timeout") && error.contains("shutdown.drain_period"),
        "{error}"
    );
    config.shutdown.timeout = Duration::from_secs(25);
    config.validate().unwrap();
}
