//! Load and abuse: slow-consumer policies, inbound limits, admission, handshake
//! and Origin checks. Each limit is set low so that each test is quick.

mod common;

use std::time::{Duration, Instant};

use common::redis_server::RedisServer;
use common::{
    Client, PATIENCE, RawClient, TestNode, eventually_metric, http_full, metric,
    read_messages_until, rule, token,
};
use herald::config::SlowPolicy;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[tokio::test]
async fn drop_oldest_keeps_the_connection_and_the_newest_messages() {
    let redis = RedisServer::start();
    let node = TestNode::start_with(|c| {
        redis.configure(c);
        c.channels = vec![rule("news.*", SlowPolicy::DropOldest, None)];
        c.limits.queue_messages = 8;
        c.limits.write_timeout = Duration::from_secs(120);
    })
    .await;
    let mut stalled = RawClient::subscribed(&node, "news.world").await;
    let total = 600;
    let pad = "p".repeat(32 * 1024);
    redis
        .publish_many(
            "news.world",
            (0..total).map(|seq| json!({"seq": seq, "pad": pad}).to_string()),
        )
        .await;
    eventually_metric(&node, "herald_messages_received_total", total as f64).await;
    let mut last = -1i64;
    let received = read_messages_until(&mut stalled, |frame| {
        let seq = frame["data"]["seq"].as_i64().unwrap();
        assert!(seq > last, "in order");
        last = seq;
        seq == total - 1
    })
    .await;
    assert!(received < total as usize, "some were dropped");
    let metrics = node.metrics().await;
    assert!(
        metric(
            &metrics,
            "herald_messages_dropped_total{reason=\"queue_full\",policy=\"drop_oldest\"}"
        ) > 0.0
    );
}

#[tokio::test]
async fn a_reader_that_stops_reading_is_dropped_within_the_write_timeout() {
    // Small messages at a modest rate: 400 KB in all, far below the 4 MB
    // that Linux lets a socket buffer for a peer that reads nothing. Only
    // `server.max_unsent_bytes` makes the socket stop taking writes, so
    // that the write timeout can act (BENCHMARKS.md, figure 6).
    let node = TestNode::start_with(|c| c.limits.write_timeout = Duration::from_secs(1)).await;
    let mut healthy = node.client(&["feed"]).await;
    healthy.subscribe(&["feed"]).await;
    let _stalled = RawClient::subscribed_with(&node, "feed", Some(4096)).await;
    let count = 200;
    let reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        while seen.len() < count {
            seen.push(healthy.next_json().await["data"]["n"].as_u64().unwrap());
        }
        (healthy, seen)
    });
    let padding = "x".repeat(2000);
    for n in 0..count {
        let (status, _) = node.publish("feed", json!({"n": n, "pad": padding})).await;
        assert_eq!(status, 200);
    }
    let (_healthy, seen) = reader.await.unwrap();
    assert_eq!(
        seen,
        (0..count as u64).collect::<Vec<_>>(),
        "the healthy neighbour lost nothing"
    );
    // The stalled reader's socket is full after a few dozen messages; one
    // write timeout later it is dropped.
    eventually_metric(
        &node,
        "herald_disconnects_total{reason=\"slow_consumer\"}",
        1.0,
    )
    .await;
    eventually_metric(&node, "herald_connections_open", 1.0).await;
}

#[tokio::test]
async fn max_rate_hz_caps_deliveries_and_the_newest_wins() {
    let node = TestNode::start_with(|c| {
        c.channels = vec![rule("slow.*", SlowPolicy::Disconnect, Some(5.0))]
    })
    .await;
    let mut client = node.client(&["slow.*"]).await;
    client.subscribe(&["slow.feed"]).await;
    let started = Instant::now();
    for n in 0..40 {
        node.publish("slow.feed", json!(n)).await;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut seen = Vec::new();
    while let Some(frame) = client.try_next_json(Duration::from_millis(400)).await {
        seen.push(frame["data"].as_i64().unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(seen.last(), Some(&39), "the newest is delivered: {seen:?}");
    let allowed = (elapsed * 5.0).ceil() as usize + 1;
    assert!(
        seen.len() <= allowed,
        "{} deliveries in {elapsed:.2}s: {seen:?}",
        seen.len()
    );
    assert!(seen.len() >= 3, "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0] < w[1]));
}

#[tokio::test]
async fn oversize_fragmented_messages_are_closed_with_1009() {
    let node = TestNode::start().await;
    let path = format!("/ws?token={}", token("u", &["*"]));

    // Three 30 KiB fragments: each is fine, the message (90 KiB) is not.
    let mut raw = RawClient::connect(node.addr, &path).await;
    let chunk = vec![b' '; 30 * 1024];
    raw.send_frame(false, 0x1, &chunk, true).await;
    raw.send_frame(false, 0x0, &chunk, true).await;
    raw.send_frame(true, 0x0, &chunk, true).await;
    assert_eq!(raw.expect_close(PATIENCE).await, 1009);

    // A header declaring 1 TiB: refused at once, nothing allocated.
    let mut raw = RawClient::connect(node.addr, &path).await;
    let mut header = vec![0x81, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 40).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    raw.stream.write_all(&header).await.unwrap();
    assert_eq!(raw.expect_close(PATIENCE).await, 1009);

    // A message of exactly the limit is accepted.
    let mut client = node.client(&["*"]).await;
    let shell = r#"{"op":"ping","id":1,"pad":""}"#;
    let exact = format!(
        r#"{{"op":"ping","id":1,"pad":"{}"}}"#,
        " ".repeat(64 * 1024 - shell.len())
    );
    assert_eq!(exact.len(), 64 * 1024);
    client.send_text(&exact).await;
    assert_eq!(client.next_json().await["type"], "pong");
    eventually_metric(
        &node,
        "herald_disconnects_total{reason=\"message_too_big\"}",
        2.0,
    )
    .await;
}

#[tokio::test]
async fn a_request_flood_is_closed_with_4005() {
    let node = TestNode::start_with(|c| {
        c.limits.requests_per_second = 5.0;
        c.limits.request_burst = 10;
    })
    .await;
    let mut client = node.client(&["*"]).await;
    for id in 0..30 {
        client.send_json(json!({"op": "ping", "id": id})).await;
    }
    assert_eq!(
        client.expect_close().await,
        (4005, "policy_violation".to_owned())
    );

    // WebSocket pings count too.
    let mut raw = RawClient::connect(node.addr, &format!("/ws?token={}", token("u", &["*"]))).await;
    for _ in 0..30 {
        raw.send_frame(true, 0x9, b"hi", true).await;
    }
    assert_eq!(raw.expect_close(PATIENCE).await, 4005);

    // A client within the rate is untouched.
    let mut polite = node.client(&["*"]).await;
    for id in 0..5 {
        assert_eq!(
            polite.request(json!({"op": "ping", "id": id})).await["type"],
            "pong"
        );
    }
    eventually_metric(
        &node,
        "herald_disconnects_total{reason=\"policy_violation\"}",
        2.0,
    )
    .await;
}

#[tokio::test]
async fn the_channel_limit_refuses_one_more_and_the_connection_keeps_working() {
    let node = TestNode::start_with(|c| c.limits.max_channels_per_connection = 3).await;
    let mut client = node.client(&["*"]).await;
    let reply = client.subscribe(&["a", "b", "c"]).await;
    assert_eq!(reply["channels"], json!(["a", "b", "c"]));
    let reply = client.subscribe(&["c", "d"]).await;
    assert_eq!(reply["channels"], json!(["c"]));
    assert_eq!(reply["errors"][0]["channel"], "d");
    assert_eq!(reply["errors"][0]["code"], "limit_exceeded");
    assert_eq!(
        client.subscribe(&["e"]).await["errors"][0]["code"],
        "limit_exceeded"
    );
    assert_eq!(client.request(json!({"op": "ping"})).await["type"], "pong");
    client.unsubscribe(&["a"]).await;
    assert_eq!(client.subscribe(&["e"]).await["channels"], json!(["e"]));
    node.publish("e", json!("ok")).await;
    assert_eq!(client.next_json().await["data"], "ok");
    let metrics = node.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "herald_client_errors_total{code=\"limit_exceeded\"}"
        ),
        2.0
    );
}

#[tokio::test]
async fn requests_cannot_amplify_into_large_replies() {
    let node = TestNode::start_with(|c| c.limits.max_channels_per_connection = 50).await;
    let mut client = node.client(&["*"]).await;
    // More channels than a connection may hold: refused whole.
    let names: Vec<String> = (0..51).map(|i| format!("c{i}")).collect();
    let request = json!({"op": "subscribe", "channels": names});
    let reply = client.request(request).await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "limit_exceeded");
    let reply = client
        .request(json!({"op": "unsubscribe", "channels": names}))
        .await;
    assert_eq!(reply["code"], "limit_exceeded");
    assert_eq!(client.subscribe(&["ok"]).await["channels"], json!(["ok"]));
    // Long invalid names are echoed cut to 128 bytes: the reply is smaller
    // than the request.
    let long: Vec<String> = (0..50)
        .map(|i| format!("{i}{}", " ".repeat(1000)))
        .collect();
    let request = json!({"op": "subscribe", "channels": long});
    let request_len = request.to_string().len();
    let reply = client.request(request).await;
    assert_eq!(reply["errors"].as_array().unwrap().len(), 50);
    assert_eq!(reply["errors"][0]["code"], "invalid_channel");
    assert_eq!(reply["errors"][0]["channel"].as_str().unwrap().len(), 128);
    assert!(
        reply.to_string().len() < request_len,
        "{} >= {request_len}",
        reply.to_string().len()
    );
}

#[tokio::test]
async fn a_trickled_frame_is_closed_with_4006() {
    let node = TestNode::start_with(|c| c.limits.frame_timeout = Duration::from_millis(500)).await;
    let mut raw = RawClient::subscribed(&node, "news").await;
    // The header of a 1,000-byte text frame and a few bytes, then silence.
    let mut frame = vec![0x81u8, 0x80 | 126, 0x03, 0xe8, 1, 2, 3, 4];
    frame.extend_from_slice(b"abc");
    raw.stream.write_all(&frame).await.unwrap();
    let started = Instant::now();
    assert_eq!(raw.expect_close(PATIENCE).await, 4006);
    assert!(started.elapsed() < Duration::from_secs(2));
    eventually_metric(
        &node,
        "herald_disconnects_total{reason=\"frame_timeout\"}",
        1.0,
    )
    .await;
    // The node serves everyone else.
    let mut client = node.client(&["news"]).await;
    client.subscribe(&["news"]).await;
    node.publish("news", json!(1)).await;
    assert_eq!(client.next_json().await["data"], 1);
}

/// A WebSocket upgrade with extra headers: the response status and JSON body.
async fn upgrade(node: &TestNode, headers: &[(&str, &str)]) -> (u16, Value, Option<String>) {
    upgrade_url(&node.ws_url(&token("u", &["*"])), headers).await
}

/// An upgrade without a token.
async fn tokenless_upgrade(
    node: &TestNode,
    headers: &[(&str, &str)],
) -> (u16, Value, Option<String>) {
    let url = node.ws_url("x");
    let url = url.split('?').next().unwrap();
    upgrade_url(url, headers).await
}

async fn upgrade_url(url: &str, headers: &[(&str, &str)]) -> (u16, Value, Option<String>) {
    let mut request = url.into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().insert(
            hyper::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((mut ws, response)) => {
            // Keep the connection open until the end of the test.
            let status = response.status().as_u16();
            tokio::spawn(async move {
                use futures_util::StreamExt;
                while ws.next().await.is_some() {}
            });
            (status, Value::Null, None)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            let body = response
                .body()
                .as_ref()
                .map(|b| serde_json::from_slice(b).unwrap())
                .unwrap_or(Value::Null);
            (response.status().as_u16(), body, retry_after)
        }
        Err(error) => panic!("{error}"),
    }
}

#[tokio::test]
async fn admission_limits_refuse_before_the_upgrade() {
    let node = TestNode::start_with(|c| c.limits.max_connections = 2).await;
    assert_eq!(upgrade(&node, &[]).await.0, 101);
    assert_eq!(upgrade(&node, &[]).await.0, 101);
    let (status, body, retry_after) = upgrade(&node, &[]).await;
    assert_eq!(
        (status, body["error"].as_str(), retry_after.as_deref()),
        (503, Some("max_connections"), Some("1"))
    );

    let node = TestNode::start_with(|c| {
        c.limits.max_connections_per_ip = 1;
        c.server.trusted_proxy_header = Some("x-forwarded-for".into());
        c.server.trusted_proxies = vec!["127.0.0.0/8".into()];
    })
    .await;
    assert_eq!(
        upgrade(&node, &[("x-forwarded-for", "203.0.113.7")])
            .await
            .0,
        101
    );
    let (status, body, retry_after) = upgrade(&node, &[("x-forwarded-for", "203.0.113.7")]).await;
    assert_eq!(
        (status, body["error"].as_str(), retry_after.is_some()),
        (429, Some("max_connections_per_ip"), true)
    );
    // The proxy appends the real client last; a spoofed first entry is ignored.
    assert_eq!(
        upgrade(&node, &[("x-forwarded-for", "203.0.113.7, 198.51.100.1")])
            .await
            .0,
        101
    );

    let node = TestNode::start_with(|c| {
        c.limits.connection_rate = 1.0;
        c.limits.connection_burst = 2;
    })
    .await;
    assert_eq!(upgrade(&node, &[]).await.0, 101);
    assert_eq!(upgrade(&node, &[]).await.0, 101);
    let (status, body, retry_after) = upgrade(&node, &[]).await;
    assert_eq!(
        (status, body["error"].as_str(), retry_after.as_deref()),
        (429, Some("connection_rate"), Some("1"))
    );
    let metrics = node.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "herald_connections_rejected_total{reason=\"connection_rate\"}"
        ),
        1.0
    );
    assert_eq!(metric(&metrics, "herald_connections_open"), 2.0);
}

#[tokio::test]
async fn tokenless_floods_do_not_spend_the_connection_budget() {
    let node = TestNode::start_with(|c| {
        c.limits.connection_rate = 1.0;
        c.limits.connection_burst = 2;
        c.limits.connection_rate_per_ip = 0.0;
    })
    .await;
    for _ in 0..50 {
        let (status, body, _) = tokenless_upgrade(&node, &[]).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("missing_token"))
        );
    }
    // The node's budget is intact for clients with a token.
    assert_eq!(upgrade(&node, &[]).await.0, 101);
    assert_eq!(upgrade(&node, &[]).await.0, 101);
    assert_eq!(upgrade(&node, &[]).await.0, 429);
}

#[tokio::test]
async fn attempts_are_limited_per_address_before_the_token_is_checked() {
    let node = TestNode::start_with(|c| {
        c.limits.connection_rate_per_ip = 0.5;
        c.limits.connection_burst_per_ip = 5;
        c.server.trusted_proxy_header = Some("x-forwarded-for".into());
        c.server.trusted_proxies = vec!["127.0.0.0/8".into()];
    })
    .await;
    let attacker = [("x-forwarded-for", "203.0.113.7")];
    for _ in 0..5 {
        assert_eq!(tokenless_upgrade(&node, &attacker).await.0, 401);
    }
    let (status, body, retry_after) = tokenless_upgrade(&node, &attacker).await;
    assert_eq!(
        (status, body["error"].as_str(), retry_after.as_deref()),
        (429, Some("connection_rate_per_ip"), Some("2"))
    );
    // A token does not help an address over its budget...
    assert_eq!(upgrade(&node, &attacker).await.0, 429);
    // ...and other addresses are not affected.
    assert_eq!(
        upgrade(&node, &[("x-forwarded-for", "198.51.100.1")])
            .await
            .0,
        101
    );
    let metrics = node.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "herald_connections_rejected_total{reason=\"connection_rate_per_ip\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &metrics,
            "herald_auth_failures_total{reason=\"missing_token\"}"
        ),
        5.0
    );
}

/// Sends `GET /healthz` on a kept-alive connection and reads the response.
async fn healthz(stream: &mut tokio::net::TcpStream) -> String {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: herald\r\n\r\n")
        .await
        .unwrap();
    read_http_response(stream).await
}

async fn read_http_response(stream: &mut tokio::net::TcpStream) -> String {
    let mut response = Vec::new();
    let mut buffer = [0u8; 1024];
    while !response.ends_with(b"}") {
        let read = tokio::time::timeout(PATIENCE, stream.read(&mut buffer))
            .await
            .expect("a response in time")
            .unwrap();
        if read == 0 {
            break;
        }
        response.extend_from_slice(&buffer[..read]);
    }
    String::from_utf8(response).unwrap()
}

#[tokio::test]
async fn http_connections_are_capped() {
    let node = TestNode::start_with(|c| c.server.max_http_connections = 2).await;
    let mut first = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let mut second = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    assert!(healthz(&mut first).await.starts_with("HTTP/1.1 200"));
    assert!(healthz(&mut second).await.starts_with("HTTP/1.1 200"));
    let mut third = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let refused = read_http_response(&mut third).await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(
        refused.contains("\"error\":\"too_many_connections\""),
        "{refused}"
    );
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, third.read_to_end(&mut rest)).await;
    drop(first);
    // The slot comes back when a connection closes.
    let started = Instant::now();
    loop {
        let mut next = tokio::net::TcpStream::connect(node.addr).await.unwrap();
        if healthz(&mut next).await.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(started.elapsed() < PATIENCE, "the slot was not released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The connection still kept alive keeps working.
    assert!(healthz(&mut second).await.starts_with("HTTP/1.1 200"));
    assert!(
        metric(
            &node.metrics().await,
            "herald_http_connection_errors_total{reason=\"too_many_connections\"}"
        ) >= 1.0
    );
}

#[tokio::test]
async fn idle_http_connections_are_closed() {
    let node =
        TestNode::start_with(|c| c.server.http_idle_timeout = Duration::from_millis(300)).await;
    let mut stream = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let started = Instant::now();
    // Requests keep it open past the timeout...
    for _ in 0..4 {
        assert!(healthz(&mut stream).await.starts_with("HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(started.elapsed() > Duration::from_millis(500));
    // ...and idleness closes it.
    let idle = Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest))
        .await
        .expect("closed by the node");
    assert_eq!(read.unwrap(), 0);
    assert!(idle.elapsed() < Duration::from_secs(2));
    eventually_metric(
        &node,
        "herald_http_connection_errors_total{reason=\"idle_timeout\"}",
        1.0,
    )
    .await;
}

#[tokio::test]
async fn origins_are_checked_and_look_alikes_refused() {
    let node = TestNode::start_with(|c| {
        c.server.allowed_origins = vec![
            "https://*.example.com".into(),
            "http://localhost:3000".into(),
        ];
    })
    .await;
    for (origin, expected) in [
        (Some("https://app.example.com"), 101),
        (Some("https://deep.app.example.com"), 101),
        (Some("http://localhost:3000"), 101),
        (None, 101),
        (Some("https://example.com.evil.com"), 403),
        (Some("https://evil-example.com"), 403),
        (Some("http://app.example.com"), 403),
        (Some("https://evil.com"), 403),
        (Some("null"), 403),
    ] {
        let headers: Vec<(&str, &str)> = origin.map(|o| vec![("origin", o)]).unwrap_or_default();
        let (status, body, _) = upgrade(&node, &headers).await;
        assert_eq!(status, expected, "{origin:?}");
        if expected == 403 {
            assert_eq!(body["error"], "forbidden_origin");
        }
    }
}

#[tokio::test]
async fn malformed_upgrades_get_400_and_the_node_carries_on() {
    let node = TestNode::start().await;
    let path = format!("/ws?token={}", token("u", &["*"]));
    let cases: [&[(&str, &str)]; 4] = [
        &[
            ("connection", "upgrade"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ],
        &[
            ("upgrade", "websocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ],
        &[
            ("upgrade", "websocket"),
            ("connection", "upgrade"),
            ("sec-websocket-version", "13"),
        ],
        &[
            ("upgrade", "websocket"),
            ("connection", "upgrade"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "8"),
        ],
    ];
    for headers in cases {
        let (status, _, body) = http_full(node.addr, "GET", &path, headers, String::new()).await;
        assert_eq!(status, 400, "{headers:?}");
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap()["error"],
            "bad_handshake"
        );
    }
    node.client(&["*"]).await;
}

#[tokio::test]
async fn a_slowloris_client_is_dropped_at_the_header_timeout() {
    let node =
        TestNode::start_with(|c| c.server.header_read_timeout = Duration::from_millis(500)).await;
    let mut stream = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let started = Instant::now();
    let request = b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed = false;
    for byte in request {
        if stream.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut buffer = [0u8; 256];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(1), stream.read(&mut buffer)).await
        {
            if n == 0 || String::from_utf8_lossy(&buffer[..n]).starts_with("HTTP/1.1 408") {
                closed = true;
                break;
            }
        }
    }
    let elapsed = started.elapsed();
    assert!(closed, "still open after {elapsed:?}");
    assert!(
        elapsed >= Duration::from_millis(400) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
    eventually_metric(
        &node,
        "herald_http_connection_errors_total{reason=\"header_timeout\"}",
        1.0,
    )
    .await;
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let node = TestNode::start_with(|c| c.server.max_header_bytes = 8192).await;
    let mut stream = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let _ = stream.write_all(request.as_bytes()).await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431"),
        "{text}"
    );
    eventually_metric(
        &node,
        "herald_http_connection_errors_total{reason=\"header_too_large\"}",
        1.0,
    )
    .await;
    // And the node still answers.
    let (status, _, _) = http_full(node.addr, "GET", "/healthz", &[], String::new()).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn an_unmasked_frame_is_closed_with_1002() {
    let node = TestNode::start().await;
    let mut raw = RawClient::connect(node.addr, &format!("/ws?token={}", token("u", &["*"]))).await;
    raw.send_frame(true, 0x1, br#"{"op":"ping","id":1}"#, false)
        .await;
    assert_eq!(raw.expect_close(PATIENCE).await, 1002);
    eventually_metric(
        &node,
        "herald_disconnects_total{reason=\"protocol_error\"}",
        1.0,
    )
    .await;
    // Masked frames on another connection are fine.
    let mut client: Client = node.client(&["*"]).await;
    assert_eq!(client.request(json!({"op": "ping"})).await["type"], "pong");
}

#[tokio::test]
async fn replies_queued_before_a_protocol_error_still_arrive() {
    let node = TestNode::start().await;
    let mut raw = RawClient::connect(node.addr, &format!("/ws?token={}", token("u", &["*"]))).await;
    let (_, welcome) = raw.read_frame().await.expect("the welcome");
    assert!(welcome.starts_with(br#"{"type":"welcome""#));
    // Both frames arrive together: the reader finds the fault while the
    // pong is still queued, and the pong goes out before the close.
    let mut both = Vec::new();
    for (payload, masked) in [(&br#"{"op":"ping","id":1}"#[..], true), (b"x", false)] {
        let mut frame = vec![0x81, if masked { 0x80 } else { 0 } | payload.len() as u8];
        if masked {
            frame.extend_from_slice(&[0; 4]);
        }
        frame.extend_from_slice(payload);
        both.extend(frame);
    }
    raw.stream.write_all(&both).await.unwrap();
    assert_eq!(
        raw.read_frame().await,
        Some((0x1, br#"{"type":"pong","id":1}"#.to_vec()))
    );
    assert_eq!(raw.expect_close(PATIENCE).await, 1002);
}
