//! What an idle TLS connection costs the server beyond its socket: `N`
//! loopback connections are accepted and kept, each client closed once
//! connected, and the growth of RSS from the first tenth to all `N` is divided
//! by the connections in between. Three servers, each in a fresh process:
//! plain sockets, tokio-rustls's buffered stream (what herald used before) and
//! herald's unbuffered [`TlsStream`]. The clients are tokio-rustls, TLS 1.3
//! with AES-256-GCM (what `loadtest/bench.sh tls` negotiates), with a P-256
//! certificate; herald is measured again with the other cipher suites and
//! TLS 1.2, which tells how much of its cost is the record keys.
//!
//! `cargo run --release --example tls_idle_cost [N]` (default 10,000). The
//! figures feed BENCHMARKS.md, figure 9.

use std::sync::Arc;

use herald::transport::tls_stream::TlsStream;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy, Debug)]
enum Server {
    Plain,
    TokioRustls,
    Herald,
}

impl Server {
    const ALL: [Server; 3] = [Server::Plain, Server::TokioRustls, Server::Herald];

    fn name(self) -> &'static str {
        match self {
            Server::Plain => "plain",
            Server::TokioRustls => "tokio-rustls",
            Server::Herald => "herald",
        }
    }
}

/// What the server keeps of one connection.
#[allow(dead_code)]
enum Kept {
    Plain(TcpStream),
    TokioRustls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Herald(Box<TlsStream>),
}

fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .unwrap();
    let kib: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// A cipher suite the client offers alone.
#[derive(Clone, Copy)]
struct Suite {
    name: &'static str,
    suite: rustls::SupportedCipherSuite,
    version: &'static rustls::SupportedProtocolVersion,
}

fn suites() -> [Suite; 4] {
    use rustls::crypto::ring::cipher_suite;
    let tls13 = &rustls::version::TLS13;
    [
        Suite {
            name: "TLS 1.3 AES-256-GCM",
            suite: cipher_suite::TLS13_AES_256_GCM_SHA384,
            version: tls13,
        },
        Suite {
            name: "TLS 1.3 AES-128-GCM",
            suite: cipher_suite::TLS13_AES_128_GCM_SHA256,
            version: tls13,
        },
        Suite {
            name: "TLS 1.3 ChaCha20-Poly1305",
            suite: cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            version: tls13,
        },
        Suite {
            name: "TLS 1.2 ECDHE-ECDSA AES-256-GCM",
            suite: cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            version: &rustls::version::TLS12,
        },
    ]
}

fn configs(suite: Suite) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let certificate = generated.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        generated.signing_key.serialize_der(),
    ));
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![certificate.clone()], key)
        .unwrap();
    // As herald configures it (transport/tls.rs).
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    server.send_tls13_tickets = 0;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certificate).unwrap();
    let client_provider = rustls::crypto::CryptoProvider {
        cipher_suites: vec![suite.suite],
        ..rustls::crypto::ring::default_provider()
    };
    let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(client_provider))
        .with_protocol_versions(&[suite.version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    (Arc::new(server), Arc::new(client))
}

/// Bytes of RSS per connection, over the last nine tenths of `count`.
async fn connect_all(server: Server, suite: Suite, count: usize) -> usize {
    let (server_config, client_config) = configs(suite);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let connector = tokio_rustls::TlsConnector::from(client_config);
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config.clone());
    let mut kept = Vec::with_capacity(count);
    let first = count / 10;
    let mut before = rss_bytes();
    for connection in 0..count {
        if connection == first {
            // The first tenth warms the allocator and the runtime up.
            before = rss_bytes();
        }
        let client = async {
            let tcp = TcpStream::connect(address).await.unwrap();
            match server {
                Server::Plain => None,
                _ => Some(
                    connector
                        .connect(ServerName::try_from("localhost").unwrap(), tcp)
                        .await
                        .unwrap(),
                ),
            }
        };
        let accepted = async {
            let (tcp, _) = listener.accept().await.unwrap();
            match server {
                Server::Plain => Kept::Plain(tcp),
                Server::TokioRustls => {
                    Kept::TokioRustls(Box::new(acceptor.accept(tcp).await.unwrap()))
                }
                Server::Herald => Kept::Herald(Box::new(
                    TlsStream::accept(tcp, server_config.clone()).await.unwrap(),
                )),
            }
        };
        let (client, accepted) = tokio::join!(client, accepted);
        drop(client);
        kept.push(accepted);
    }
    let after = rss_bytes();
    drop(kept);
    after.saturating_sub(before) / (count - first)
}

/// Runs one server in a fresh process, so that no freed memory is reused.
fn measure(server: Server, suite: usize, count: usize) -> usize {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            count.to_string(),
            server.name().to_owned(),
            suite.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let count: usize = args
        .next()
        .map(|n| n.parse().expect("N is a number"))
        .unwrap_or(10_000);
    if let Some(name) = args.next() {
        // A child: one server, one line of output.
        let server = Server::ALL
            .into_iter()
            .find(|server| server.name() == name)
            .expect("plain, tokio-rustls or herald");
        let suite = suites()[args.next().unwrap().parse::<usize>().unwrap()];
        rlimit::increase_nofile_limit(u64::MAX).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        println!("{}", runtime.block_on(connect_all(server, suite, count)));
        return;
    }
    println!(
        "size_of: TcpStream {} B, tokio-rustls server stream {} B, herald TlsStream {} B, \
         rustls UnbufferedServerConnection {} B",
        std::mem::size_of::<TcpStream>(),
        std::mem::size_of::<tokio_rustls::server::TlsStream<TcpStream>>(),
        std::mem::size_of::<TlsStream>(),
        std::mem::size_of::<rustls::server::UnbufferedServerConnection>(),
    );
    let plain = measure(Server::Plain, 0, count);
    println!("plain: {plain} B of RSS per idle connection ({count} connections)");
    let runs = [(Server::TokioRustls, 0), (Server::Herald, 0)]
        .into_iter()
        .chain((1..suites().len()).map(|suite| (Server::Herald, suite)));
    for (server, suite) in runs {
        let per_connection = measure(server, suite, count);
        println!(
            "{}, {}: {per_connection} B, {} B above plain",
            server.name(),
            suites()[suite].name,
            per_connection as i64 - plain as i64
        );
    }
}
