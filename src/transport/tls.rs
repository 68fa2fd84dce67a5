//! Native TLS for the one listener: HTTPS and `wss://` through rustls (ring
//! provider, TLS 1.2 and 1.3, ALPN `http/1.1`), optional client certificates,
//! and certificate rotation without a restart.
//!
//! The server configuration lives behind an [`ArcSwap`]: a handshake takes the
//! current one without locking, and a reload swaps in a new one, so reloading
//! never blocks a handshake and open connections keep the certificate they
//! were made with. The files are read again every `server.tls.reload_interval`
//! and compared by content, which also catches Kubernetes Secret volumes that
//! swap a symlink instead of writing the file. A new pair that does not load
//! keeps the old one, is logged, and is counted.
//!
//! Handshakes are bounded: at most `server.tls.max_handshakes` at once (a
//! connection beyond it is closed at once) and each within
//! `server.tls.handshake_timeout`; failures are counted by reason.
//!
//! The connections themselves are [`TlsStream`]s, over rustls's unbuffered
//! API, so that an idle connection holds no TLS buffers
//! ([`crate::transport::tls_stream`]).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{ConfigError, TlsConfig};
use crate::metrics::Metrics;
use crate::transport::tls_stream::TlsStream;

/// Accepts TLS connections with the current configuration.
pub struct Tls {
    config: TlsConfig,
    current: ArcSwap<rustls::ServerConfig>,
    /// A hash of the files the current configuration was built from.
    loaded_from: std::sync::Mutex<[u8; 32]>,
    handshakes: Arc<Semaphore>,
    metrics: Metrics,
}

/// Why a handshake did not complete: the `reason` label of
/// `herald_tls_handshake_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// `server.tls.max_handshakes` were already in progress.
    TooMany,
    /// Not complete within `server.tls.handshake_timeout`.
    Timeout,
    /// The client closed the connection during the handshake.
    Eof,
    /// The client's certificate was missing or not trusted (mutual TLS).
    ClientCertificate,
    /// The client sent an alert (it did not trust our certificate, say).
    Alert,
    /// Not TLS, or no version or cipher suite in common.
    Protocol,
    /// Any other I/O error.
    Io,
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 7] = [
        HandshakeFailure::TooMany,
        HandshakeFailure::Timeout,
        HandshakeFailure::Eof,
        HandshakeFailure::ClientCertificate,
        HandshakeFailure::Alert,
        HandshakeFailure::Protocol,
        HandshakeFailure::Io,
    ];

    pub fn reason(self) -> &'static str {
        match self {
            HandshakeFailure::TooMany => "too_many_handshakes",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Eof => "eof",
            HandshakeFailure::ClientCertificate => "client_certificate",
            HandshakeFailure::Alert => "alert",
            HandshakeFailure::Protocol => "protocol",
            HandshakeFailure::Io => "io",
        }
    }

    fn classify(error: &std::io::Error) -> HandshakeFailure {
        if error.kind() == std::io::ErrorKind::UnexpectedEof {
            return HandshakeFailure::Eof;
        }
        match error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            Some(rustls::Error::NoCertificatesPresented | rustls::Error::InvalidCertificate(_)) => {
                HandshakeFailure::ClientCertificate
            }
            Some(rustls::Error::AlertReceived(_)) => HandshakeFailure::Alert,
            Some(_) => HandshakeFailure::Protocol,
            None => HandshakeFailure::Io,
        }
    }
}

impl Tls {
    /// Loads the configured files; an error names the key at fault.
    pub fn new(config: &TlsConfig, metrics: Metrics) -> Result<Tls, ConfigError> {
        let (server, hash) = load(config)?;
        Ok(Tls {
            config: config.clone(),
            current: ArcSwap::from_pointee(server),
            loaded_from: std::sync::Mutex::new(hash),
            handshakes: Arc::new(Semaphore::new(config.max_handshakes)),
            metrics,
        })
    }

    /// Whether clients must present a certificate (`server.tls.client_ca_file`)
    /// for everything but the health and metrics endpoints.
    pub fn requires_client_certificates(&self) -> bool {
        self.config.client_ca_file.is_some()
    }

    /// Completes the TLS handshake on `stream`, within the bounds.
    pub async fn accept(&self, stream: TcpStream) -> Result<TlsStream, HandshakeFailure> {
        let result = self.handshake(stream).await;
        if let Err(failure) = &result {
            self.metrics.tls_handshake_failed(failure.reason());
        }
        result
    }

    async fn handshake(&self, stream: TcpStream) -> Result<TlsStream, HandshakeFailure> {
        let Ok(_permit) = self.handshakes.clone().try_acquire_owned() else {
            return Err(HandshakeFailure::TooMany);
        };
        self.metrics.tls_handshake_started();
        let handshake = TlsStream::accept(stream, self.current.load_full());
        let outcome = tokio::time::timeout(self.config.handshake_timeout, handshake).await;
        self.metrics.tls_handshake_ended();
        match outcome {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(error)) => Err(HandshakeFailure::classify(&error)),
            Err(_) => Err(HandshakeFailure::Timeout),
        }
    }

    /// Loads the files again if they changed. A pair that does not load keeps
    /// the current configuration.
    pub fn reload(&self) {
        let hash = match files_hash(&self.config) {
            Ok(hash) => hash,
            Err((key, error)) => {
                warn!(key, %error, "cannot read the TLS files; keeping the current certificate");
                self.metrics.tls_reloaded(false);
                return;
            }
        };
        let mut loaded_from = self.loaded_from.lock().unwrap_or_else(|p| p.into_inner());
        if *loaded_from == hash {
            return;
        }
        match load(&self.config) {
            Ok((server, hash)) => {
                self.current.store(Arc::new(server));
                *loaded_from = hash;
                self.metrics.tls_reloaded(true);
                info!("TLS certificate reloaded");
            }
            Err(error) => {
                // Remember the bad files, so that the error is logged once
                // per change rather than at every poll.
                *loaded_from = hash;
                self.metrics.tls_reloaded(false);
                warn!(%error, "the new TLS files do not load; keeping the current certificate");
            }
        }
    }

    /// Polls the files every `server.tls.reload_interval` until `stop`.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let mut interval = tokio::time::interval(self.config.reload_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = interval.tick() => self.reload(),
            }
        }
    }
}

/// Reads the files and builds a server configuration, with the hash of what
/// was read.
fn load(config: &TlsConfig) -> Result<(rustls::ServerConfig, [u8; 32]), ConfigError> {
    let hash = files_hash(config).map_err(|(key, error)| ConfigError::invalid(key, error))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&config.cert_file)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| invalid_file("server.tls.cert_file", &config.cert_file, e))?;
    if chain.is_empty() {
        return Err(ConfigError::invalid(
            "server.tls.cert_file",
            format!("{} holds no PEM certificate", config.cert_file.display()),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&config.key_file)
        .map_err(|e| invalid_file("server.tls.key_file", &config.key_file, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ConfigError::invalid("server.tls", e.to_string()))?;
    let builder = match &config.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<_, _>>())
                .map_err(|e| invalid_file("server.tls.client_ca_file", path, e))?;
            for ca in cas {
                roots.add(ca).map_err(|e| {
                    ConfigError::invalid("server.tls.client_ca_file", e.to_string())
                })?;
            }
            // A certificate that is presented must be valid; one that is not
            // presented is refused per request, so that the kubelet's probes
            // and Prometheus (which present none) still reach /healthz,
            // /readyz and /metrics.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| ConfigError::invalid("server.tls.client_ca_file", e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder.with_single_cert(chain, key).map_err(|e| {
        ConfigError::invalid(
            "server.tls.key_file",
            format!("does not match server.tls.cert_file or is not usable: {e}"),
        )
    })?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    // TLS 1.3 session tickets cost memory per ticket and buy little for
    // long-lived WebSockets; the stateful cache is bounded by rustls.
    server.send_tls13_tickets = 0;
    Ok((server, hash))
}

fn invalid_file(key: &str, path: &Path, error: impl std::fmt::Display) -> ConfigError {
    ConfigError::invalid(key, format!("{}: {error}", path.display()))
}

/// The SHA-256 of the three files' contents, in order.
fn files_hash(config: &TlsConfig) -> Result<[u8; 32], (&'static str, String)> {
    let mut hasher = Sha256::new();
    let files = [
        ("server.tls.cert_file", Some(&config.cert_file)),
        ("server.tls.key_file", Some(&config.key_file)),
        ("server.tls.client_ca_file", config.client_ca_file.as_ref()),
    ];
    for (key, path) in files {
        if let Some(path) = path {
            let bytes =
                std::fs::read(path).map_err(|e| (key, format!("{}: {e}", path.display())))?;
            hasher.update((bytes.len() as u64).to_le_bytes());
            hasher.update(&bytes);
        }
    }
    Ok(hasher.finalize().into())
}

/// A self-signed certificate for `localhost` and `127.0.0.1`, written as
/// `cert.pem` and `key.pem` into `dir`, for `herald dev --tls`.
pub fn write_dev_certificate(
    dir: &Path,
) -> std::io::Result<(std::path::PathBuf, std::path::PathBuf)> {
    let generated = rcgen::generate_simple_self_signed(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ])
    .map_err(std::io::Error::other)?;
    std::fs::create_dir_all(dir)?;
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, generated.cert.pem())?;
    std::fs::write(&key, generated.signing_key.serialize_pem())?;
    Ok((cert, key))
}

/// How long the node keeps polling the files when nothing changes.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(10);
