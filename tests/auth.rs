//! Authentication is decided before the upgrade: every refusal is a 401 with
//! a JSON reason, and no socket is upgraded.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{Client, SECRET, TestNode, metric};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn now() -> u64 {
    herald::auth::unix_now()
}

fn sign(algorithm: Algorithm, key: &EncodingKey, claims: Value) -> String {
    jsonwebtoken::encode(&Header::new(algorithm), &claims, key).unwrap()
}

fn hs256(claims: Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        claims,
    )
}

fn valid_claims() -> Value {
    json!({"sub": "alice", "exp": now() + 600, "channels": ["news"]})
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

/// Connects with `token` and expects a 401 whose `error` is `reason`.
async fn check(node: &TestNode, token: &str, reason: &str) {
    common::expect_unauthorized(node, token, reason).await;
}

#[tokio::test]
async fn refusals_name_their_reason() {
    let node = TestNode::start_with(|c| c.auth.audience = Some("herald".into())).await;
    let aud = |claims: Value| with(claims, "aud", json!("herald"));

    check(&node, "", "missing_token").await;
    check(&node, "not-a-jwt", "malformed_token").await;
    check(&node, "a.b.c", "malformed_token").await;
    check(
        &node,
        &hs256(aud(with(valid_claims(), "exp", json!(now() - 60)))),
        "token_expired",
    )
    .await;
    check(
        &node,
        &hs256(aud(with(valid_claims(), "nbf", json!(now() + 600)))),
        "token_not_yet_valid",
    )
    .await;
    let other_secret = EncodingKey::from_secret(b"another-secret-0123456789abcdef0123456789");
    check(
        &node,
        &sign(Algorithm::HS256, &other_secret, aud(valid_claims())),
        "bad_signature",
    )
    .await;
    // alg "none": header {"alg":"none"}, no signature.
    let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0.";
    check(&node, none, "algorithm_not_allowed").await;
    // HS512 is a fine algorithm, but not one this node allows.
    let hs512 = sign(
        Algorithm::HS512,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        aud(valid_claims()),
    );
    check(&node, &hs512, "algorithm_not_allowed").await;
    check(
        &node,
        &hs256(with(valid_claims(), "aud", json!("someone-else"))),
        "wrong_audience",
    )
    .await;
    check(&node, &hs256(valid_claims()), "missing_claim").await;
    let mut no_exp = aud(valid_claims());
    no_exp.as_object_mut().unwrap().remove("exp");
    check(&node, &hs256(no_exp), "missing_claim").await;
    check(
        &node,
        &hs256(aud(with(valid_claims(), "channels", json!("news")))),
        "invalid_claim",
    )
    .await;
    let oversize = hs256(aud(with(
        valid_claims(),
        "padding",
        json!("x".repeat(9000)),
    )));
    check(&node, &oversize, "token_too_large").await;

    // And a good token still works, then the failures were all counted. The
    // client is held: dropped, its close would race the scrape below.
    let _client = Client::connect(&node.ws_url(&hs256(aud(valid_claims())))).await;
    let metrics = node.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "herald_auth_failures_total{reason=\"token_expired\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "herald_connections_rejected_total{reason=\"unauthorized\"}"
        ),
        13.0
    );
    assert_eq!(metric(&metrics, "herald_connections_open"), 1.0);
}

#[tokio::test]
async fn leeway_is_explicit_and_small() {
    let node = TestNode::start().await;
    // 3 s past exp is within the default 5 s leeway; 30 s is not (the library's default would be 60 s).
    Client::connect(&node.ws_url(&hs256(with(valid_claims(), "exp", json!(now() - 3))))).await;
    check(
        &node,
        &hs256(with(valid_claims(), "exp", json!(now() - 30))),
        "token_expired",
    )
    .await;
}

#[tokio::test]
async fn issuer_is_required_when_configured() {
    let node = TestNode::start_with(|c| c.auth.issuer = Some("https://auth.example".into())).await;
    check(&node, &hs256(valid_claims()), "missing_claim").await;
    check(
        &node,
        &hs256(with(valid_claims(), "iss", json!("https://evil.example"))),
        "wrong_issuer",
    )
    .await;
    Client::connect(&node.ws_url(&hs256(with(
        valid_claims(),
        "iss",
        json!("https://auth.example"),
    ))))
    .await;
}

#[tokio::test]
async fn rsa_tokens_verify_and_key_confusion_is_refused() {
    // An RS256 token verifying proves the crypto backend is compiled in.
    let node = TestNode::start_with(|c| {
        c.auth.hmac_secret = None;
        c.auth.algorithms = vec!["RS256".into()];
        c.auth.public_key_file = Some(fixture("rsa_public.pem"));
    })
    .await;
    let private =
        EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa_private.pem")).unwrap()).unwrap();
    Client::connect(&node.ws_url(&sign(Algorithm::RS256, &private, valid_claims()))).await;

    // HS256 "signed" with the RSA public key as the HMAC secret.
    let public_pem = std::fs::read(fixture("rsa_public.pem")).unwrap();
    let confused = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(&public_pem),
        valid_claims(),
    );
    check(&node, &confused, "algorithm_not_allowed").await;

    // Even where HS256 is also allowed, the public key is never an HMAC secret.
    let both = TestNode::start_with(|c| {
        c.auth.algorithms = vec!["HS256".into(), "RS256".into()];
        c.auth.public_key_file = Some(fixture("rsa_public.pem"));
    })
    .await;
    check(&both, &confused, "bad_signature").await;
    Client::connect(&both.ws_url(&sign(Algorithm::RS256, &private, valid_claims()))).await;
    Client::connect(&both.ws_url(&hs256(valid_claims()))).await;
}

#[tokio::test]
async fn ec_and_ed25519_tokens_verify() {
    let cases = [
        (
            "ES256",
            Algorithm::ES256,
            "ec_public.pem",
            EncodingKey::from_ec_pem(&std::fs::read(fixture("ec_private.pem")).unwrap()).unwrap(),
        ),
        (
            "EdDSA",
            Algorithm::EdDSA,
            "ed25519_public.pem",
            EncodingKey::from_ed_pem(&std::fs::read(fixture("ed25519_private.pem")).unwrap())
                .unwrap(),
        ),
    ];
    for (name, algorithm, public, private) in cases {
        let node = TestNode::start_with(|c| {
            c.auth.hmac_secret = None;
            c.auth.algorithms = vec![name.into()];
            c.auth.public_key_file = Some(fixture(public));
        })
        .await;
        Client::connect(&node.ws_url(&sign(algorithm, &private, valid_claims()))).await;
        check(&node, &hs256(valid_claims()), "algorithm_not_allowed").await;
    }
}

#[tokio::test]
async fn token_travels_in_header_or_subprotocol() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let node = TestNode::start().await;
    let token = hs256(valid_claims());

    let mut request = format!("ws://{}/ws", node.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (_ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.status(), 101);

    let mut request = format!("ws://{}/ws", node.addr)
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        format!("herald.v1, herald.auth.{token}").parse().unwrap(),
    );
    let (_ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "herald.v1");

    // Offering only unknown subprotocols is refused rather than half-accepted.
    let mut request = format!("ws://{}/ws?token={token}", node.addr)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "mqtt".parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 400)
        }
        other => panic!("expected 400, got {other:?}"),
    }
}

#[tokio::test]
async fn expiry_closes_unless_refreshed() {
    let node = TestNode::start_with(|c| c.auth.leeway = Duration::ZERO).await;
    let short = || hs256(json!({"sub": "alice", "exp": now() + 2, "channels": ["news"]}));

    let mut lapsing = Client::connect(&node.ws_url(&short())).await;
    let mut refreshed = Client::connect(&node.ws_url(&short())).await;
    let reply = refreshed
        .request(json!({"op": "refresh", "token": hs256(valid_claims())}))
        .await;
    assert_eq!(reply["type"], "reply");
    assert!(
        reply["expires_at"].as_u64().unwrap() > now() + 500,
        "{reply}"
    );

    // A refresh that is not valid is refused and changes nothing.
    let reply = refreshed
        .request(json!({"op": "refresh", "token": hs256(with(valid_claims(), "exp", json!(now() - 60)))}))
        .await;
    assert_eq!(reply["error"]["code"], "invalid_token", "{reply}");
    // Another subject's token ends the connection.
    let mut hijacked = Client::connect(&node.ws_url(&hs256(valid_claims()))).await;
    let mallory = hs256(with(valid_claims(), "sub", json!("mallory")));
    hijacked
        .send_json(json!({"op": "refresh", "id": 1, "token": mallory}))
        .await;
    assert_eq!(
        hijacked.expect_close().await,
        (4004, "forbidden".to_owned())
    );

    let (code, reason) = lapsing.expect_close_within(Duration::from_secs(4)).await;
    assert_eq!((code, reason.as_str()), (4001, "token_expired"));

    // The refreshed connection outlives the first token.
    let reply = refreshed.request(json!({"op": "ping"})).await;
    assert_eq!(reply["type"], "pong");
}

#[tokio::test]
async fn refresh_with_narrower_grants_revokes_channels() {
    let node = TestNode::start().await;
    let mut client = Client::connect(&node.ws_url(&hs256(with(
        valid_claims(),
        "channels",
        json!(["news", "prices.*"]),
    ))))
    .await;
    client.subscribe(&["news", "prices.AAPL"]).await;
    let reply = client
        .request(json!({"op": "refresh", "token": hs256(valid_claims())}))
        .await;
    assert_eq!(reply["revoked"], json!(["prices.AAPL"]), "{reply}");
    node.publish("prices.AAPL", json!(1)).await;
    node.publish("news", json!(2)).await;
    let message = client.next_json().await;
    assert_eq!(
        (message["channel"].as_str(), &message["data"]),
        (Some("news"), &json!(2))
    );
}
