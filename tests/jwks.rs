//! Signing keys from a JSON Web Key Set (`auth.jwks_url`), served by a local
//! HTTP(S) server that the tests rotate, break and flood.

mod common;

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{Client, TestNode, eventually_ready, metric, readyz};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::net::TcpListener;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The public keys of the fixtures, by kid: `rsa-1`, `ec-1` and `ed-1`.
fn fixture_key(kid: &str) -> Value {
    let set: Value = serde_json::from_slice(&std::fs::read(fixture("jwks.json")).unwrap()).unwrap();
    set["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|key| key["kid"] == kid)
        .unwrap()
        .clone()
}

fn key_set(kids: &[&str]) -> String {
    json!({"keys": kids.iter().map(|kid| fixture_key(kid)).collect::<Vec<_>>()}).to_string()
}

/// A token for `alice` signed by the fixture key `kid` (or, with `header_kid`,
/// naming another kid in its header).
fn token(kid: &str, header_kid: Option<&str>) -> String {
    let (algorithm, key) = match kid {
        "rsa-1" => (
            Algorithm::RS256,
            EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa_private.pem")).unwrap()),
        ),
        "ec-1" => (
            Algorithm::ES256,
            EncodingKey::from_ec_pem(&std::fs::read(fixture("ec_private.pem")).unwrap()),
        ),
        "ed-1" => (
            Algorithm::EdDSA,
            EncodingKey::from_ed_pem(&std::fs::read(fixture("ed25519_private.pem")).unwrap()),
        ),
        other => panic!("no fixture key {other}"),
    };
    let mut header = Header::new(algorithm);
    header.kid = header_kid.or(Some(kid)).map(str::to_owned);
    let claims =
        json!({"sub": "alice", "exp": herald::auth::unix_now() + 600, "channels": ["news"]});
    jsonwebtoken::encode(&header, &claims, &key.unwrap()).unwrap()
}

/// What the key server answers.
struct Served {
    status: StatusCode,
    body: String,
}

/// A local JWKS endpoint: its answer can be changed, and it counts requests.
struct KeyServer {
    url: String,
    served: Arc<Mutex<Served>>,
    requests: Arc<AtomicUsize>,
}

impl KeyServer {
    async fn start(body: String) -> KeyServer {
        Self::start_tls(body, None).await
    }

    /// With `tls`, serves HTTPS with that certificate and key.
    async fn start_tls(body: String, tls: Option<rustls::ServerConfig>) -> KeyServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = Arc::new(Mutex::new(Served {
            status: StatusCode::OK,
            body,
        }));
        let requests = Arc::new(AtomicUsize::new(0));
        let acceptor = tls.map(|config| tokio_rustls::TlsAcceptor::from(Arc::new(config)));
        let url = match acceptor {
            Some(_) => format!("https://localhost:{port}/.well-known/jwks.json"),
            None => format!("http://127.0.0.1:{port}/.well-known/jwks.json"),
        };
        let (state, count) = (served.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (state, count, acceptor) = (state.clone(), count.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |request: hyper::Request<_>| {
                        assert_eq!(request.uri().path(), "/.well-known/jwks.json");
                        count.fetch_add(1, Ordering::SeqCst);
                        let served = state.lock().unwrap();
                        let mut response =
                            Response::new(Full::new(Bytes::from(served.body.clone())));
                        *response.status_mut() = served.status;
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match acceptor {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(tcp), service).await;
                        }
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(tcp).await {
                                let _ = http.serve_connection(TokioIo::new(tls), service).await;
                            }
                        }
                    }
                });
            }
        });
        KeyServer {
            url,
            served,
            requests,
        }
    }

    fn serve(&self, status: StatusCode, body: String) {
        *self.served.lock().unwrap() = Served { status, body };
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// A node verifying RS256, ES256 and EdDSA tokens with `url`'s keys.
async fn node(url: &str, adjust: impl FnOnce(&mut herald::config::Config)) -> TestNode {
    let url = url.to_owned();
    TestNode::start_with(move |c| {
        c.auth.algorithms = vec!["RS256".into(), "ES256".into(), "EdDSA".into()];
        c.auth.jwks_url = Some(url);
        c.auth.jwks_timeout = Duration::from_secs(2);
        adjust(c);
    })
    .await
}

async fn accepted(node: &TestNode, token: &str) {
    if let Err((status, body)) = Client::try_connect(&node.ws_url(token)).await {
        panic!("refused: {status} {body}");
    }
}

async fn refused(node: &TestNode, token: &str, reason: &str) {
    common::expect_unauthorized(node, token, reason).await;
}

#[tokio::test]
async fn a_rotated_in_key_is_accepted_at_once_and_a_removed_key_is_refused() {
    let keys = KeyServer::start(key_set(&["rsa-1"])).await;
    // A long interval: only an unknown kid can cause an early fetch.
    let node = node_with_intervals(
        &keys.url,
        Duration::from_secs(600),
        Duration::from_millis(100),
    )
    .await;
    eventually_ready(&node, true).await;
    let mut client = Client::connect(&node.ws_url(&token("rsa-1", None))).await;

    // The identity provider rotates: the first token naming the new kid makes
    // the node fetch the set, and is accepted without waiting for the
    // interval, in-band as well as in a handshake.
    keys.serve(StatusCode::OK, key_set(&["rsa-1", "ec-1", "ed-1"]));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let reply = client
        .request(json!({"op": "refresh", "token": token("ed-1", None)}))
        .await;
    assert_eq!(reply["type"], "reply", "{reply}");
    accepted(&node, &token("ec-1", None)).await;
    let metrics = node.metrics().await;
    assert_eq!(metric(&metrics, "herald_jwks_keys"), 3.0);
    assert_eq!(
        metric(
            &metrics,
            "herald_jwks_fetches_total{trigger=\"unknown_kid\",outcome=\"ok\"}"
        ),
        1.0
    );
    node.shutdown().await.unwrap();

    // A removed key stops verifying at the next periodic fetch.
    let node = node_with_interval(&keys.url, Duration::from_millis(300)).await;
    eventually_ready(&node, true).await;
    accepted(&node, &token("rsa-1", None)).await;
    keys.serve(StatusCode::OK, key_set(&["ec-1"]));
    tokio::time::sleep(Duration::from_millis(800)).await;
    refused(&node, &token("rsa-1", None), "unknown_key").await;
    accepted(&node, &token("ec-1", None)).await;
    node.shutdown().await.unwrap();
}

async fn node_with_interval(url: &str, interval: Duration) -> TestNode {
    node_with_intervals(url, interval, interval).await
}

/// `auth.jwks_refresh_interval` and `auth.jwks_min_refresh_interval`.
async fn node_with_intervals(url: &str, refresh: Duration, min_refresh: Duration) -> TestNode {
    node(url, |c| {
        c.auth.jwks_refresh_interval = refresh;
        c.auth.jwks_min_refresh_interval = min_refresh;
    })
    .await
}

#[tokio::test]
async fn a_key_verifies_only_its_own_kid_family_and_alg() {
    let keys = KeyServer::start(key_set(&["rsa-1", "ec-1"])).await;
    let node = node_with_interval(&keys.url, Duration::from_secs(600)).await;
    eventually_ready(&node, true).await;
    // No kid: which key would verify it is not guessed.
    let claims = json!({"sub": "alice", "exp": herald::auth::unix_now() + 600});
    let no_kid = jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        &claims,
        &EncodingKey::from_ec_pem(&std::fs::read(fixture("ec_private.pem")).unwrap()).unwrap(),
    )
    .unwrap();
    refused(&node, &no_kid, "missing_kid").await;
    // An EC token naming the RSA key.
    refused(
        &node,
        &token("ec-1", Some("rsa-1")),
        "algorithm_not_allowed",
    )
    .await;
    // A token signed by another key than the one its kid names.
    refused(&node, &token("ed-1", Some("ec-1")), "algorithm_not_allowed").await;
    // An HS256 token naming a published key cannot be verified with it.
    let hs = jsonwebtoken::encode(
        &Header {
            kid: Some("rsa-1".into()),
            ..Header::new(Algorithm::HS256)
        },
        &claims,
        &EncodingKey::from_secret(common::SECRET.as_bytes()),
    )
    .unwrap();
    refused(&node, &hs, "algorithm_not_allowed").await;
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_endpoint_that_fails_keeps_the_last_good_set() {
    let keys = KeyServer::start(key_set(&["ec-1"])).await;
    let node = node_with_interval(&keys.url, Duration::from_millis(200)).await;
    eventually_ready(&node, true).await;
    keys.serve(StatusCode::SERVICE_UNAVAILABLE, "down".into());
    let before = keys.requests();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(keys.requests() > before, "the node kept fetching");
    // A body that is not a key set is no better.
    keys.serve(StatusCode::OK, "{\"keys\": []}".into());
    tokio::time::sleep(Duration::from_millis(500)).await;
    accepted(&node, &token("ec-1", None)).await;
    assert_eq!(readyz(&node).await.0, 200);
    let metrics = node.metrics().await;
    assert!(
        metric(
            &metrics,
            "herald_jwks_fetches_total{outcome=\"http_status\"}"
        ) >= 1.0
    );
    assert!(metric(&metrics, "herald_jwks_fetches_total{outcome=\"invalid\"}") >= 1.0);
    assert_eq!(metric(&metrics, "herald_jwks_keys"), 1.0);
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_node_that_never_fetched_a_set_is_not_ready() {
    let keys = KeyServer::start("x".repeat(4096)).await;
    let node = node(&keys.url, |c| c.auth.jwks_max_bytes = 1024).await;
    // Too large, then an error status: never ready, and tokens are refused.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = readyz(&node).await;
    assert_eq!(
        (status, body.contains("jwks_unavailable")),
        (503, true),
        "{body}"
    );
    keys.serve(StatusCode::NOT_FOUND, String::new());
    refused(&node, &token("ec-1", None), "unknown_key").await;
    let metrics = node.metrics().await;
    assert_eq!(
        metric(&metrics, "herald_jwks_fetches_total{outcome=\"too_large\"}"),
        1.0
    );
    // Served at last: ready within the startup retry.
    keys.serve(StatusCode::OK, key_set(&["ec-1"]));
    eventually_ready(&node, true).await;
    accepted(&node, &token("ec-1", None)).await;
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_flood_of_unknown_kids_makes_a_bounded_number_of_fetches() {
    let keys = KeyServer::start(key_set(&["ec-1"])).await;
    let node =
        node_with_intervals(&keys.url, Duration::from_secs(600), Duration::from_secs(1)).await;
    eventually_ready(&node, true).await;
    let started = tokio::time::Instant::now();
    let mut refusals = 0;
    // 300 bogus kids over about 2.5 s, 20 at a time.
    for round in 0..15 {
        let attempts = (0..20).map(|i| {
            let url = node.ws_url(&token("ec-1", Some(&format!("bogus-{round}-{i}"))));
            async move { Client::try_connect(&url).await }
        });
        for result in futures_util::future::join_all(attempts).await {
            let (status, body) = result.err().expect("a bogus kid is refused");
            assert_eq!((status, body["error"].as_str()), (401, Some("unknown_key")));
            refusals += 1;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(refusals, 300);
    // The startup fetch, then at most one per second of flood.
    let fetches = keys.requests();
    assert!(
        fetches <= 2 + elapsed.ceil() as usize,
        "{fetches} fetches in {elapsed:.1} s"
    );
    // The real key still works.
    accepted(&node, &token("ec-1", None)).await;
    let metrics = node.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "herald_auth_failures_total{reason=\"unknown_key\"}"
        ),
        300.0
    );
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_https_endpoint_is_trusted_through_jwks_ca_file() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = std::env::temp_dir().join(format!("herald-jwks-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, generated.cert.pem()).unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![generated.cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(generated.signing_key.serialize_der().into()),
        )
        .unwrap();
    let keys = KeyServer::start_tls(key_set(&["ed-1"]), Some(config)).await;
    let node = node(&keys.url, |c| c.auth.jwks_ca_file = Some(ca.clone())).await;
    eventually_ready(&node, true).await;
    accepted(&node, &token("ed-1", None)).await;
    node.shutdown().await.unwrap();

    // Without the CA the certificate is not trusted, and nothing is fetched.
    let untrusting = node_with_interval(&keys.url, Duration::from_secs(600)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(readyz(&untrusting).await.0, 503);
    let metrics = untrusting.metrics().await;
    assert_eq!(
        metric(&metrics, "herald_jwks_fetches_total{outcome=\"tls_error\"}"),
        1.0
    );
    untrusting.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn configuration_errors_name_their_key() {
    let check = |adjust: &dyn Fn(&mut herald::config::Config), key: &str| {
        let mut config = common::test_config();
        config.auth.algorithms = vec!["ES256".into()];
        config.auth.jwks_url = Some("http://127.0.0.1:1/jwks".into());
        adjust(&mut config);
        let error = config
            .validate()
            .and_then(|()| herald::check_config(&config))
            .unwrap_err();
        assert!(error.to_string().contains(key), "{error}");
    };
    check(
        &|c| c.auth.public_key_file = Some(fixture("ec_public.pem")),
        "auth.jwks_url",
    );
    check(
        &|c| c.auth.jwks_url = Some("ftp://keys/jwks".into()),
        "auth.jwks_url",
    );
    check(
        &|c| c.auth.jwks_url = Some("not a url".into()),
        "auth.jwks_url",
    );
    check(
        &|c| c.auth.jwks_url = Some("https://user:pw@keys.example/jwks".into()),
        "auth.jwks_url",
    );
    check(
        &|c| c.auth.jwks_ca_file = Some(fixture("ec_public.pem")),
        "auth.jwks_ca_file",
    );
    check(
        &|c| c.auth.jwks_min_refresh_interval = Duration::from_secs(3600),
        "auth.jwks_min_refresh_interval",
    );
    check(
        &|c| c.auth.jwks_timeout = Duration::ZERO,
        "auth.jwks_timeout",
    );
    check(&|c| c.auth.jwks_max_bytes = 10, "auth.jwks_max_bytes");
    check(
        &|c| {
            c.auth.jwks_url = None;
            c.auth.jwks_ca_file = Some(fixture("ec_public.pem"));
            c.auth.public_key_file = Some(fixture("ec_public.pem"));
        },
        "auth.jwks_ca_file",
    );
}
