//! The demo (`server.demo`): the embedded page and files with their headers,
//! `GET /demo/token` and the tokens it mints, JSON 400s counted in metrics,
//! 404 when off, and the demo price feed (`server.demo_feed`).

mod common;

use std::time::Duration;

use common::{Client, PATIENCE, TestNode, http, http_full, metric};
use herald::config::Config;
use serde_json::Value;

async fn demo_node() -> TestNode {
    TestNode::start_with(|config| config.server.demo = Some(true)).await
}

/// `GET /demo/token?QUERY`: the status and the JSON body.
async fn demo_token(node: &TestNode, query: &str) -> (u16, Value) {
    let (status, body) = http(
        node.addr,
        "GET",
        &format!("/demo/token?{query}"),
        &[],
        String::new(),
    )
    .await;
    (status, serde_json::from_str(&body).expect("a JSON body"))
}

fn unix_now() -> u64 {
    herald::auth::unix_now()
}

#[tokio::test]
async fn the_page_and_its_files_are_embedded_with_their_headers() {
    let node = demo_node().await;
    for (path, content_type, file) in [
        (
            "/",
            "text/html; charset=utf-8",
            include_str!("../clients/demo/index.html"),
        ),
        (
            "/app.js",
            "text/javascript; charset=utf-8",
            include_str!("../clients/demo/app.js"),
        ),
        (
            "/style.css",
            "text/css; charset=utf-8",
            include_str!("../clients/demo/style.css"),
        ),
        (
            "/herald.min.js",
            "text/javascript; charset=utf-8",
            include_str!("../clients/js/dist/herald.min.js"),
        ),
    ] {
        let (status, headers, body) = http_full(node.addr, "GET", path, &[], String::new()).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(body, file, "{path}");
        assert_eq!(headers["content-type"], content_type, "{path}");
        assert_eq!(headers["cache-control"], "no-cache", "{path}");
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        let csp = headers["content-security-policy"].to_str().unwrap();
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe"), "{csp}");
        // Only the client bundle may be imported by pages of other origins.
        assert_eq!(
            headers.contains_key("access-control-allow-origin"),
            path == "/herald.min.js",
            "{path}"
        );

        // Revalidation: the same ETag answers 304 without a body.
        let etag = headers["etag"].to_str().unwrap().to_owned();
        assert!(etag.starts_with('"') && etag.len() == 34, "{etag}");
        let (status, headers, body) = http_full(
            node.addr,
            "GET",
            path,
            &[("if-none-match", &etag)],
            String::new(),
        )
        .await;
        assert_eq!((status, body.as_str()), (304, ""), "{path}");
        assert_eq!(headers["etag"], etag.as_str());
        let (status, _, _) = http_full(
            node.addr,
            "GET",
            path,
            &[("if-none-match", "\"stale\"")],
            String::new(),
        )
        .await;
        assert_eq!(status, 200, "{path}");
    }
    let (status, body) = http(node.addr, "POST", "/", &[], String::new()).await;
    assert_eq!(status, 405);
    assert!(body.contains("method_not_allowed"));
    let metrics = node.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "herald_http_requests_total{route=\"demo\",status=\"200\"}"
        ),
        8.0
    );
    assert_eq!(
        metric(
            &metrics,
            "herald_http_requests_total{route=\"demo\",status=\"304\"}"
        ),
        4.0
    );
}

#[tokio::test]
async fn a_demo_token_grants_the_demo_channels_and_nothing_else() {
    let node = demo_node().await;
    let (status, body) = demo_token(&node, "user=alice&ttl=60").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user"], "alice");
    assert_eq!(body["url"], format!("ws://{}/ws", node.addr));
    let expires_at = body["expires_at"].as_u64().unwrap();
    assert!(expires_at.abs_diff(unix_now() + 60) <= 2, "{expires_at}");

    let token = body["token"].as_str().unwrap();
    let mut client = Client::connect(&node.ws_url(token)).await;
    assert_eq!(client.welcome["user"], "alice");
    let reply = client
        .subscribe(&[
            "prices.AAPL",
            "notify.demo",
            "chat.lobby",
            "counter.demo",
            "news",
            "notify.other",
        ])
        .await;
    assert_eq!(
        reply["channels"],
        serde_json::json!(["prices.AAPL", "notify.demo", "chat.lobby", "counter.demo"])
    );
    let refused: Vec<_> = reply["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|error| {
            (
                error["channel"].as_str().unwrap(),
                error["code"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        refused,
        [("news", "forbidden"), ("notify.other", "forbidden")]
    );

    // Without a user, a guest name is made up.
    let (status, body) = demo_token(&node, "").await;
    assert_eq!(status, 200);
    let user = body["user"].as_str().unwrap();
    assert!(user.starts_with("guest-") && user.len() == 12, "{user}");
    let expires_at = body["expires_at"].as_u64().unwrap();
    assert!(expires_at.abs_diff(unix_now() + 600) <= 2, "{expires_at}");
}

#[tokio::test]
async fn bad_token_requests_get_json_400s_counted_in_metrics() {
    let node = demo_node().await;
    for (query, code) in [
        ("user=", "invalid_user"),
        ("user=a.b", "invalid_user"),
        ("user=%61", "invalid_user"),
        ("ttl=1", "invalid_ttl"),
        ("ttl=3601", "invalid_ttl"),
        ("ttl=1h", "invalid_ttl"),
    ] {
        let (status, body) = demo_token(&node, query).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some(code)),
            "{query}"
        );
        assert!(body["message"].is_string());
    }
    // The helper sends the node's address as Host: this adds a second one.
    let (status, headers, body) = http_full(
        node.addr,
        "GET",
        "/demo/token",
        &[("host", "evil.example")],
        String::new(),
    )
    .await;
    assert_eq!(status, 400);
    assert!(body.contains("invalid_host"), "{body}");
    assert_eq!(headers["cache-control"], "no-store");
    let (status, _) = http(node.addr, "POST", "/demo/token", &[], String::new()).await;
    assert_eq!(status, 405);
    let metrics = node.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "herald_http_requests_total{route=\"demo_token\",status=\"400\"}"
        ),
        7.0
    );
}

#[tokio::test]
async fn demo_tokens_carry_the_configured_issuer_audience_and_claim() {
    let node = TestNode::start_with(|config| {
        config.server.demo = Some(true);
        config.auth.issuer = Some("https://issuer.example".into());
        config.auth.audience = Some("herald-demo".into());
        config.auth.channels_claim = "grants".into();
    })
    .await;
    let (status, body) = demo_token(&node, "user=bob").await;
    assert_eq!(status, 200, "{body}");
    let mut client = Client::connect(&node.ws_url(body["token"].as_str().unwrap())).await;
    let reply = client.subscribe(&["notify.demo"]).await;
    assert_eq!(reply["channels"], serde_json::json!(["notify.demo"]));
}

#[tokio::test]
async fn without_server_demo_the_demo_paths_are_unknown() {
    for demo in [None, Some(false)] {
        let node = TestNode::start_with(|config| config.server.demo = demo).await;
        for path in [
            "/",
            "/app.js",
            "/style.css",
            "/herald.min.js",
            "/demo/token",
        ] {
            let (status, body) = http(node.addr, "GET", path, &[], String::new()).await;
            assert_eq!(status, 404, "{path}");
            let body: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(body["error"], "not_found");
        }
    }
}

#[tokio::test]
async fn the_demo_feed_publishes_prices_through_the_broker() {
    let node =
        TestNode::start_with(|config: &mut Config| config.server.demo_feed = Some(true)).await;
    let mut client = node.client(&["prices.*"]).await;
    let reply = client.subscribe(&["prices.AAPL", "prices.GOOG"]).await;
    assert_eq!(reply["errors"], serde_json::json!([]));
    let mut seen = std::collections::HashMap::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while seen.len() < 2 || seen.values().any(|prices: &Vec<f64>| prices.len() < 2) {
        assert!(tokio::time::Instant::now() < deadline, "{seen:?}");
        let frame = client
            .try_next_json(Duration::from_secs(2))
            .await
            .expect("a price within 2 s");
        assert_eq!(frame["type"], "message");
        let symbol = frame["data"]["symbol"].as_str().unwrap().to_owned();
        assert_eq!(frame["channel"], format!("prices.{symbol}"));
        let price = frame["data"]["price"].as_f64().unwrap();
        assert!(frame["data"]["ts"].as_u64().unwrap() > 1_600_000_000_000);
        seen.entry(symbol).or_insert_with(Vec::new).push(price);
    }
    let open = [("AAPL", 189.50), ("GOOG", 152.80)];
    for (symbol, open) in open {
        for price in &seen[symbol] {
            assert!(
                (open * 0.8..open * 1.25).contains(price),
                "{symbol} {price}"
            );
        }
    }
    // The feed publishes through the broker, not the API.
    let metrics = node.metrics().await;
    assert_eq!(metric(&metrics, "herald_messages_published_total"), 0.0);
    assert!(metric(&metrics, "herald_messages_received_total") >= 4.0);
}
