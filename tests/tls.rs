//! Native TLS: wss:// end to end, certificate rotation through a Kubernetes
//! style symlink swap, bad new pairs, handshake bounds, mutual TLS, and
//! startup errors naming their key.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{API_KEY, PATIENCE, TestNode, token};
use futures_util::{SinkExt, StreamExt};
use herald::config::TlsConfig;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;

/// A certificate for localhost, signed by its own fresh CA.
struct Issued {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

fn ca() -> (rcgen::Certificate, rcgen::KeyPair, rcgen::CertificateParams) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "herald test CA");
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.clone().self_signed(&key).unwrap();
    (cert, key, params)
}

fn issue(names: &[&str]) -> Issued {
    let (ca_cert, ca_key, ca_params) = ca();
    let issuer = rcgen::Issuer::new(ca_params, &ca_key);
    let params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    Issued {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// A directory laid out like a Kubernetes Secret volume: `cert.pem` and
/// `key.pem` are symlinks through `..data`, itself a symlink to a versioned
/// directory, and an update swaps `..data` atomically.
struct SecretVolume {
    dir: PathBuf,
    version: u32,
}

impl SecretVolume {
    fn new(name: &str) -> SecretVolume {
        let dir = std::env::temp_dir().join(format!("herald-tls-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        SecretVolume { dir, version: 0 }
    }

    fn write(&mut self, cert_pem: &str, key_pem: &str) {
        self.version += 1;
        let version = self.dir.join(format!("..v{}", self.version));
        std::fs::create_dir_all(&version).unwrap();
        std::fs::write(version.join("cert.pem"), cert_pem).unwrap();
        std::fs::write(version.join("key.pem"), key_pem).unwrap();
        let staging = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&staging);
        std::os::unix::fs::symlink(format!("..v{}", self.version), &staging).unwrap();
        std::fs::rename(&staging, self.dir.join("..data")).unwrap();
        for file in ["cert.pem", "key.pem"] {
            let link = self.dir.join(file);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(format!("..data/{file}"), &link).unwrap();
            }
        }
    }

    fn tls_config(&self) -> TlsConfig {
        let mut config = TlsConfig::with_files(self.dir.join("cert.pem"), self.dir.join("key.pem"));
        config.reload_interval = Duration::from_millis(100);
        config
    }
}

impl Drop for SecretVolume {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn client_config(trusted: &[&str], identity: Option<&Issued>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for pem in trusted {
        roots
            .add(CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
            .unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some(identity) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(identity.cert_pem.as_bytes()).unwrap()],
                rustls::pki_types::PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
                    .unwrap(),
            )
            .unwrap(),
    };
    Arc::new(config)
}

async fn tls_connect(
    node: &TestNode,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(node.addr).await?;
    tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

fn peer_certificate(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

type Wss = tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>;

async fn wss(stream: TlsStream<TcpStream>, channels: &[&str]) -> Wss {
    let url = format!("wss://localhost/ws?token={}", token("alice", &["*"]));
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome");
    let request = json!({"op": "subscribe", "id": 1, "channels": channels});
    ws.send(Message::text(request.to_string())).await.unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "reply");
    ws
}

async fn next_json(ws: &mut Wss) -> Value {
    loop {
        let message = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("a frame in time")
            .unwrap()
            .unwrap();
        if let Message::Text(text) = message {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

/// One HTTPS request: (status, body).
async fn https(
    node: &TestNode,
    config: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    body: String,
) -> (u16, String) {
    use http_body_util::BodyExt;
    let stream = tls_connect(node, config).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("authorization", format!("Bearer {API_KEY}"))
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn https_metric(node: &TestNode, config: Arc<rustls::ClientConfig>, series: &str) -> f64 {
    let (_, text) = https(node, config, "GET", "/metrics", String::new()).await;
    common::metric(&text, series)
}

#[tokio::test]
async fn wss_works_and_certificates_rotate_without_a_restart() {
    let first = issue(&["localhost"]);
    let second = issue(&["localhost"]);
    let mut volume = SecretVolume::new("rotate");
    volume.write(&first.cert_pem, &first.key_pem);
    let tls = volume.tls_config();
    let node = TestNode::start_with(|c| c.server.tls = Some(tls)).await;
    let trust_both = client_config(&[&first.ca_pem, &second.ca_pem], None);

    let stream = tls_connect(&node, trust_both.clone()).await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), None, "no ALPN offered");
    let old_certificate = peer_certificate(&stream);
    let mut before = wss(stream, &["news"]).await;
    let publish = |data: Value| {
        https(
            &node,
            trust_both.clone(),
            "POST",
            "/api/publish",
            json!({"channel": "news", "data": data}).to_string(),
        )
    };
    assert_eq!(publish(json!(1)).await.0, 200);
    assert_eq!(next_json(&mut before).await["data"], 1);

    // The Secret is updated the way the kubelet does it: a symlink swap.
    volume.write(&second.cert_pem, &second.key_pem);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let new_certificate = loop {
        let stream = tls_connect(&node, trust_both.clone()).await.unwrap();
        let certificate = peer_certificate(&stream);
        if certificate != old_certificate {
            break certificate;
        }
        assert!(tokio::time::Instant::now() < deadline, "never rotated");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Only the new CA is needed from now on.
    let trust_second = client_config(&[&second.ca_pem], None);
    let mut after = wss(
        tls_connect(&node, trust_second.clone()).await.unwrap(),
        &["news"],
    )
    .await;
    // The connection made with the old certificate carries on.
    assert_eq!(publish(json!(2)).await.0, 200);
    assert_eq!(next_json(&mut before).await["data"], 2);
    assert_eq!(next_json(&mut after).await["data"], 2);
    assert_eq!(
        https_metric(
            &node,
            trust_second.clone(),
            "herald_tls_reloads_total{result=\"ok\"}"
        )
        .await,
        1.0
    );

    // A bad new pair (a key that does not match) keeps the current one.
    let third = issue(&["localhost"]);
    volume.write(&third.cert_pem, &second.key_pem);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while https_metric(
        &node,
        trust_second.clone(),
        "herald_tls_reloads_total{result=\"error\"}",
    )
    .await
        < 1.0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bad pair was not noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stream = tls_connect(&node, trust_second).await.unwrap();
    assert_eq!(peer_certificate(&stream), new_certificate);
}

#[tokio::test]
async fn handshakes_are_bounded_in_time_and_number() {
    let issued = issue(&["localhost"]);
    let mut volume = SecretVolume::new("bounds");
    volume.write(&issued.cert_pem, &issued.key_pem);
    let mut tls = volume.tls_config();
    tls.handshake_timeout = Duration::from_millis(500);
    tls.max_handshakes = 2;
    let node = TestNode::start_with(|c| c.server.tls = Some(tls)).await;

    // Two silent connections hold both handshake slots...
    let mut silent: Vec<TcpStream> = Vec::new();
    for _ in 0..2 {
        silent.push(TcpStream::connect(node.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ...so a third is closed at once.
    let mut third = TcpStream::connect(node.addr).await.unwrap();
    let mut buffer = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_millis(300), third.read(&mut buffer))
        .await
        .expect("closed at once");
    assert_eq!(read.unwrap_or(0), 0);
    // The silent ones are dropped at the handshake timeout.
    for stream in &mut silent {
        let read = tokio::time::timeout(PATIENCE, stream.read(&mut buffer))
            .await
            .expect("dropped at the timeout");
        assert_eq!(read.unwrap_or(0), 0);
    }
    // Plain HTTP to the TLS port is a protocol failure.
    let mut plain = TcpStream::connect(node.addr).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let _ = tokio::time::timeout(PATIENCE, plain.read(&mut buffer)).await;

    let trusted = client_config(&[&issued.ca_pem], None);
    assert_eq!(
        https(&node, trusted.clone(), "GET", "/healthz", String::new())
            .await
            .0,
        200
    );
    let (_, text) = https(&node, trusted, "GET", "/metrics", String::new()).await;
    let metric = |series: &str| common::metric(&text, series);
    assert!(metric("herald_tls_handshake_failures_total{reason=\"too_many_handshakes\"}") >= 1.0);
    assert_eq!(
        metric("herald_tls_handshake_failures_total{reason=\"timeout\"}"),
        2.0
    );
    assert_eq!(
        metric("herald_tls_handshake_failures_total{reason=\"protocol\"}"),
        1.0
    );
    assert_eq!(metric("herald_tls_handshakes_in_progress"), 0.0);
}

#[tokio::test]
async fn client_certificates_are_required_with_a_client_ca() {
    let server = issue(&["localhost"]);
    let client = issue(&["alice"]);
    let mut volume = SecretVolume::new("mtls");
    volume.write(&server.cert_pem, &server.key_pem);
    let ca_file = volume.dir.join("client-ca.pem");
    std::fs::write(&ca_file, &client.ca_pem).unwrap();
    let mut tls = volume.tls_config();
    tls.client_ca_file = Some(ca_file);
    let node = TestNode::start_with(|c| c.server.tls = Some(tls)).await;

    // Without a certificate only the probes and the metrics answer: the
    // kubelet and Prometheus present none.
    let anonymous = client_config(&[&server.ca_pem], None);
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            https(&node, anonymous.clone(), "GET", path, String::new())
                .await
                .0,
            200
        );
    }
    let (status, body) = https(
        &node,
        anonymous.clone(),
        "POST",
        "/api/publish",
        "{}".into(),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("client_certificate_required"), "{body}");
    let url = format!("wss://localhost/ws?token={}", token("alice", &["*"]));
    let stream = tls_connect(&node, anonymous.clone()).await.unwrap();
    match tokio_tungstenite::client_async(url, stream).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 403)
        }
        other => panic!(
            "upgraded without a client certificate: {:?}",
            other.map(|_| ())
        ),
    }
    // A certificate from another CA fails the handshake itself (TLS 1.3
    // reports it on the first read).
    let stranger = issue(&["mallory"]);
    let refused = async {
        let config = client_config(&[&server.ca_pem], Some(&stranger));
        let mut stream = tls_connect(&node, config).await?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await?;
        let mut buffer = [0u8; 64];
        match stream.read(&mut buffer).await? {
            0 => Err(std::io::Error::other("closed")),
            _ => Ok(()),
        }
    }
    .await;
    assert!(
        refused.is_err(),
        "served a certificate from an untrusted CA"
    );

    let identified = client_config(&[&server.ca_pem], Some(&client));
    assert_eq!(
        https(&node, identified.clone(), "GET", "/healthz", String::new())
            .await
            .0,
        200
    );
    let mut ws = wss(
        tls_connect(&node, identified.clone()).await.unwrap(),
        &["x"],
    )
    .await;
    ws.close(None).await.unwrap();
    let (_, text) = https(&node, identified, "GET", "/metrics", String::new()).await;
    assert_eq!(
        common::metric(
            &text,
            "herald_tls_handshake_failures_total{reason=\"client_certificate\"}"
        ),
        1.0
    );
}

#[test]
fn bad_files_at_startup_name_their_key() {
    let check = |tls: TlsConfig, key: &str| {
        let mut config = common::test_config();
        config.server.tls = Some(tls);
        let error = herald::check_config(&config).unwrap_err().to_string();
        assert!(error.starts_with(key), "expected {key}: {error}");
    };
    let issued = issue(&["localhost"]);
    let other = issue(&["localhost"]);
    let mut volume = SecretVolume::new("startup");
    volume.write(&issued.cert_pem, &other.key_pem);
    let missing = Path::new("/nonexistent/cert.pem").to_path_buf();
    check(
        TlsConfig::with_files(missing.clone(), volume.dir.join("key.pem")),
        "server.tls.cert_file",
    );
    check(
        TlsConfig::with_files(volume.dir.join("cert.pem"), missing),
        "server.tls.key_file",
    );
    // A key that does not belong to the certificate.
    check(volume.tls_config(), "server.tls.key_file");
    // Not PEM at all.
    std::fs::write(volume.dir.join("junk.pem"), "not a certificate").unwrap();
    check(
        TlsConfig::with_files(volume.dir.join("junk.pem"), volume.dir.join("key.pem")),
        "server.tls.cert_file",
    );
}
