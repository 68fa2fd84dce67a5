//! One node on the in-memory broker: subscribe, publish, fan-out, keepalive,
//! slow consumers, bad input and shutdown, over real sockets.

mod common;

use std::time::{Duration, Instant};

use common::{
    API_KEY, PATIENCE, RawClient, TestNode, eventually_metric, http, http_full, metric, token,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn welcome_comes_first() {
    let node = TestNode::start().await;
    let client = node.client(&["news"]).await;
    let welcome = &client.welcome;
    assert_eq!(welcome["node_id"], "test-node");
    assert_eq!(welcome["user"], "user");
    assert_eq!(welcome["protocol"], "herald.v1");
    assert_eq!(welcome["ping_interval_ms"], 25_000);
    assert!(welcome["connection_id"].is_u64());
}

#[tokio::test]
async fn subscribe_is_checked_per_channel() {
    let node = TestNode::start().await;
    let mut client = node.client(&["prices.*", "news"]).await;
    let reply = client
        .subscribe(&["prices.AAPL", "news", "secret", "bad name", "prices.AAPL"])
        .await;
    assert_eq!(reply["type"], "reply");
    assert_eq!(reply["channels"], json!(["prices.AAPL", "news"]));
    let errors = reply["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 2, "{reply}");
    assert_eq!(errors[0]["channel"], "secret");
    assert_eq!(errors[0]["code"], "forbidden");
    assert_eq!(errors[1]["channel"], "bad name");
    assert_eq!(errors[1]["code"], "invalid_channel");
    assert!(errors[1]["message"].as_str().unwrap().contains("character"));
}

#[tokio::test]
async fn a_publish_reaches_every_subscriber_exactly_once_and_nobody_else() {
    let node = TestNode::start().await;
    let mut subscribers = Vec::new();
    for _ in 0..1000 {
        let mut client = node.client(&["news", "sports"]).await;
        client.subscribe(&["news"]).await;
        subscribers.push(client);
    }
    let mut bystander = node.client(&["news", "sports"]).await;
    bystander.subscribe(&["sports"]).await;

    let (status, body) = node.publish("news", json!({"headline": "hello"})).await;
    assert_eq!((status, &body), (200, &json!({"ok": true})));
    node.publish("news", json!(2)).await;

    for client in &mut subscribers {
        let first = client.next_json().await;
        assert_eq!(
            first,
            json!({"type": "message", "channel": "news", "data": {"headline": "hello"}})
        );
        assert_eq!(client.next_json().await["data"], 2);
        assert_eq!(client.try_next_json(Duration::from_millis(1)).await, None);
    }
    assert_eq!(
        bystander.try_next_json(Duration::from_millis(200)).await,
        None
    );
    let metrics = node.metrics().await;
    assert_eq!(metric(&metrics, "herald_frames_delivered_total"), 2000.0);
    assert_eq!(metric(&metrics, "herald_messages_published_total"), 2.0);
    assert_eq!(metric(&metrics, "herald_subscriptions"), 1001.0);
    assert_eq!(metric(&metrics, "herald_connections_open"), 1001.0);
}

#[tokio::test]
async fn nothing_arrives_after_unsubscribe() {
    let node = TestNode::start().await;
    let mut client = node.client(&["news"]).await;
    client.subscribe(&["news"]).await;
    node.publish("news", json!(1)).await;
    assert_eq!(client.next_json().await["data"], 1);
    let reply = client.unsubscribe(&["news"]).await;
    assert_eq!(reply["channels"], json!(["news"]));
    node.publish("news", json!(2)).await;
    assert_eq!(client.try_next_json(Duration::from_millis(200)).await, None);
    let metrics = node.metrics().await;
    assert_eq!(metric(&metrics, "herald_subscriptions"), 0.0);
    assert_eq!(metric(&metrics, "herald_channels"), 0.0);
}

#[tokio::test]
async fn payloads_are_embedded_as_json() {
    let node = TestNode::start().await;
    let mut client = node.client(&["c"]).await;
    client.subscribe(&["c"]).await;
    for data in [
        json!({"a": [1, 2]}),
        json!("text"),
        json!(1.5),
        json!(null),
        json!([true]),
    ] {
        node.publish("c", data.clone()).await;
        assert_eq!(client.next_json().await["data"], data);
    }
}

#[tokio::test]
async fn bad_requests_get_error_frames_and_the_connection_stays() {
    let node = TestNode::start().await;
    let mut client = node.client(&["news"]).await;
    let cases = [
        ("{not json", "invalid_json", None),
        ("[1,2]", "invalid_request", None),
        (r#"{"op":"dance","id":9}"#, "unknown_op", Some(9)),
        (
            r#"{"op":"subscribe","id":10,"channels":"news"}"#,
            "invalid_request",
            Some(10),
        ),
    ];
    for (text, code, id) in cases {
        client.send_text(text).await;
        let frame = client.next_json().await;
        assert_eq!(frame["type"], "error", "{text}");
        assert_eq!(frame["code"], code, "{text}");
        assert_eq!(frame["id"], id.map(Value::from).unwrap_or(Value::Null));
    }
    client
        .ws
        .send(Message::binary(vec![1, 2, 3]))
        .await
        .unwrap();
    assert_eq!(client.next_json().await["code"], "unsupported_frame");
    // Still fully usable.
    assert_eq!(client.request(json!({"op": "ping"})).await["type"], "pong");
    assert_eq!(
        client.subscribe(&["news"]).await["channels"],
        json!(["news"])
    );
    let metrics = node.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "herald_client_errors_total{code=\"invalid_json\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn oversize_message_is_closed_with_1009() {
    let node = TestNode::start().await;
    let mut raw = RawClient::connect(node.addr, &format!("/ws?token={}", token("u", &["*"]))).await;
    raw.send_frame(true, 0x1, &vec![b'x'; 70 * 1024], true)
        .await;
    assert_eq!(raw.expect_close(PATIENCE).await, 1009);
}

#[tokio::test]
async fn silent_client_is_closed_at_ping_timeout() {
    let node = TestNode::start_with(|c| {
        c.ping.interval = Duration::from_millis(200);
        c.ping.timeout = Duration::from_millis(300);
    })
    .await;
    // A polite client answers pings (tungstenite does while it reads).
    let mut polite = node.client(&["news"]).await;
    let polite = tokio::spawn(async move {
        assert_eq!(
            polite.try_next_json(Duration::from_millis(1500)).await,
            None
        );
        assert_eq!(
            polite.request(json!({"op": "ping", "id": 1})).await["type"],
            "pong"
        );
    });
    let started = Instant::now();
    let mut raw = RawClient::connect(node.addr, &format!("/ws?token={}", token("u", &["*"]))).await;
    let mut pings = 0;
    let code = loop {
        match raw.read_frame().await {
            Some((0x9, _)) => pings += 1,
            Some((0x8, payload)) => break u16::from_be_bytes([payload[0], payload[1]]),
            Some(_) => {}
            None => panic!("closed without a close frame"),
        }
    };
    let elapsed = started.elapsed();
    assert_eq!(code, 4003);
    assert!(pings >= 1);
    assert!(elapsed >= Duration::from_millis(450), "{elapsed:?}");
    assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");
    polite.await.unwrap();
    eventually_metric(
        &node,
        "herald_disconnects_total{reason=\"ping_timeout\"}",
        1.0,
    )
    .await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_and_its_neighbour_loses_nothing() {
    let node = TestNode::start_with(|c| c.limits.queue_messages = 8).await;
    let mut healthy = node.client(&["feed"]).await;
    healthy.subscribe(&["feed"]).await;
    // Subscribed, and from now on not reading.
    let mut stalled = RawClient::subscribed(&node, "feed").await;

    let count = 300;
    let reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        while seen.len() < count {
            seen.push(healthy.next_json().await["data"]["n"].as_u64().unwrap());
        }
        seen
    });
    let padding = "x".repeat(60 * 1024);
    for n in 0..count {
        let (status, _) = node.publish("feed", json!({"n": n, "pad": padding})).await;
        assert_eq!(status, 200);
    }
    let seen = reader.await.unwrap();
    assert_eq!(
        seen,
        (0..count as u64).collect::<Vec<_>>(),
        "healthy neighbour lost nothing"
    );

    assert_eq!(stalled.expect_close(Duration::from_secs(15)).await, 4002);
    eventually_metric(
        &node,
        "herald_disconnects_total{reason=\"slow_consumer\"}",
        1.0,
    )
    .await;
}

#[tokio::test]
async fn shutdown_closes_clients_with_1001_within_the_timeout() {
    let node = TestNode::start().await;
    let addr = node.addr;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut client = node.client(&["news"]).await;
        client.subscribe(&["news"]).await;
        clients.push(client);
    }
    let started = Instant::now();
    let drained = tokio::spawn(node.shutdown());
    for client in &mut clients {
        let (code, _) = client.expect_close().await;
        assert_eq!(code, 1001);
    }
    drained.await.unwrap().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed"
    );
}

#[tokio::test]
async fn http_errors_are_json() {
    let node = TestNode::start().await;
    let check = |status: u16, body: &str, code: &str| {
        let body: Value =
            serde_json::from_str(body).unwrap_or_else(|_| panic!("JSON body: {body}"));
        assert_eq!(body["error"], code, "{body}");
        assert!(status >= 400);
    };
    let (status, body) = http(node.addr, "GET", "/nope", &[], String::new()).await;
    assert_eq!(status, 404);
    check(status, &body, "not_found");
    let (status, body) = http(node.addr, "DELETE", "/api/publish", &[], String::new()).await;
    assert_eq!(status, 405);
    check(status, &body, "method_not_allowed");
    let (status, body) = http(node.addr, "GET", "/ws", &[], String::new()).await;
    assert_eq!(status, 400);
    check(status, &body, "bad_handshake");

    let good_key = format!("Bearer {API_KEY}");
    let publish = |key: Option<String>, body: &str| {
        let body = body.to_owned();
        let addr = node.addr;
        async move {
            let headers: Vec<(&str, &str)> = match &key {
                Some(key) => vec![("authorization", key.as_str())],
                None => vec![],
            };
            http(addr, "POST", "/api/publish", &headers, body).await
        }
    };
    let (status, body) = publish(None, r#"{"channel":"a","data":1}"#).await;
    assert_eq!(status, 401);
    check(status, &body, "unauthorized");
    let (status, body) = publish(
        Some("Bearer wrong-key-0123456789".into()),
        r#"{"channel":"a","data":1}"#,
    )
    .await;
    assert_eq!(status, 401);
    check(status, &body, "unauthorized");
    for bad in [
        r#"{"channel":"a""#,
        r#"{"channel":"a"}"#,
        r#"{"data":1}"#,
        r#"{"channel":1,"data":1}"#,
        r#"{"channel":"a","data":1,"x":2}"#,
    ] {
        let (status, body) = publish(Some(good_key.clone()), bad).await;
        assert_eq!(status, 400, "{bad}");
        check(status, &body, "invalid_body");
    }
    let (status, body) = publish(Some(good_key.clone()), r#"{"channel":"a b","data":1}"#).await;
    assert_eq!(status, 400);
    check(status, &body, "invalid_channel");
    let big = json!({"channel": "a", "data": "x".repeat(70 * 1024)}).to_string();
    let (status, body) = publish(Some(good_key.clone()), &big).await;
    assert_eq!(status, 413);
    check(status, &body, "payload_too_large");

    let (status, _, body) = http_full(node.addr, "GET", "/readyz", &[], String::new()).await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ready"}"#));
    let (status, body) = http(node.addr, "GET", "/healthz", &[], String::new()).await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
}

#[tokio::test]
async fn publish_api_can_be_disabled() {
    let node = TestNode::start_with(|c| c.api.key = None).await;
    let (status, body) = node.publish("a", json!(1)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("api_disabled"))
    );
}

#[tokio::test]
async fn connections_are_counted_and_released() {
    let node = TestNode::start().await;
    let client = node.client(&["news"]).await;
    let mut ws = client.ws;
    ws.close(None).await.unwrap();
    while ws.next().await.is_some() {}
    let deadline = Instant::now() + PATIENCE;
    loop {
        let metrics = node.metrics().await;
        if metric(&metrics, "herald_connections_open") == 0.0 {
            assert_eq!(metric(&metrics, "herald_connections_accepted_total"), 1.0);
            assert_eq!(
                metric(
                    &metrics,
                    "herald_disconnects_total{reason=\"client_closed\"}"
                ),
                1.0
            );
            break;
        }
        assert!(Instant::now() < deadline, "connection never released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
