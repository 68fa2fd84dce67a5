//! One bounded HTTP(S) GET: the JWKS document. Plain `http://` or `https://`
//! through rustls (the system's roots plus `auth.jwks_ca_file`), HTTP/1.1, one
//! connection per fetch, a deadline on the whole exchange and a cap on the
//! body. Nothing else of an HTTP client: no redirects, no proxies, no
//! compression.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Request;
use hyper::header::{ACCEPT, CONTENT_LENGTH, HOST, USER_AGENT};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::ConfigError;

/// Why a fetch failed. [`FetchError::outcome`] is the metric label.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error("cannot connect: {0}")]
    Unreachable(std::io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("HTTP exchange failed: {0}")]
    Http(String),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("the body is larger than auth.jwks_max_bytes ({0} bytes)")]
    TooLarge(usize),
    #[error("no answer within auth.jwks_timeout")]
    Timeout,
}

impl FetchError {
    pub(crate) fn outcome(&self) -> &'static str {
        match self {
            FetchError::Unreachable(_) => "unreachable",
            FetchError::Tls(_) => "tls_error",
            FetchError::Http(_) => "http_error",
            FetchError::Status(_) => "http_status",
            FetchError::TooLarge(_) => "too_large",
            FetchError::Timeout => "timeout",
        }
    }
}

/// Fetches one URL, configured once.
pub(crate) struct Fetcher {
    /// What goes into the request line: path and query.
    target: String,
    /// The `Host` header.
    authority: String,
    host: String,
    port: u16,
    /// For `https://`: the connector and the name the certificate must carry.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    timeout: Duration,
    max_bytes: usize,
    /// The URL without credentials or query, for logs.
    display: String,
}

impl Fetcher {
    /// Parses `url` (`http://` or `https://` only) and builds its TLS
    /// configuration. Errors name `auth.jwks_url` or `auth.jwks_ca_file`.
    pub(crate) fn new(
        url: &str,
        ca_file: Option<&Path>,
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<Fetcher, ConfigError> {
        let invalid = |why: String| ConfigError::invalid("auth.jwks_url", why);
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| invalid(format!("{url:?} is not a URL: {e}")))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(invalid("must start with http:// or https://".to_owned())),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| invalid("has no host".to_owned()))?;
        if authority.as_str().contains('@') {
            return Err(invalid(
                "must not carry credentials; a JWKS is public".to_owned(),
            ));
        }
        let host = authority.host().trim_matches(['[', ']']).to_owned();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let target = uri
            .path_and_query()
            .map_or("/".to_owned(), |p| p.as_str().to_owned());
        let tls = match https {
            false => {
                if ca_file.is_some() {
                    return Err(ConfigError::invalid(
                        "auth.jwks_ca_file",
                        "is only used with an https:// auth.jwks_url",
                    ));
                }
                None
            }
            true => {
                let name = ServerName::try_from(host.clone())
                    .map_err(|e| invalid(format!("host {host:?}: {e}")))?;
                Some((TlsConnector::from(Arc::new(client_config(ca_file)?)), name))
            }
        };
        Ok(Fetcher {
            display: format!(
                "{}://{}{}",
                if https { "https" } else { "http" },
                authority,
                uri.path()
            ),
            target,
            authority: authority.as_str().to_owned(),
            host,
            port,
            tls,
            timeout,
            max_bytes,
        })
    }

    /// The URL as it may be logged: no query string.
    pub(crate) fn display(&self) -> &str {
        &self.display
    }

    /// GETs the URL: the body of a 200 answer, within the timeout and the cap.
    pub(crate) async fn get(&self) -> Result<Bytes, FetchError> {
        tokio::time::timeout(self.timeout, self.exchange())
            .await
            .unwrap_or(Err(FetchError::Timeout))
    }

    async fn exchange(&self) -> Result<Bytes, FetchError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(FetchError::Unreachable)?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => self.over(tcp).await,
            Some((connector, name)) => {
                let stream = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(FetchError::Tls)?;
                self.over(stream).await
            }
        }
    }

    async fn over<S>(&self, stream: S) -> Result<Bytes, FetchError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let http = |e: hyper::Error| FetchError::Http(e.to_string());
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        // Drives the connection; it ends with the exchange, or with the
        // timeout that drops this future and the sender with it.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let request = Request::get(self.target.as_str())
            .header(HOST, self.authority.as_str())
            .header(ACCEPT, "application/jwk-set+json, application/json")
            .header(USER_AGENT, concat!("herald/", env!("CARGO_PKG_VERSION")))
            .body(Empty::<Bytes>::new())
            .expect("a request built from a parsed URI is valid");
        let response = sender.send_request(request).await.map_err(http)?;
        if !response.status().is_success() {
            return Err(FetchError::Status(response.status().as_u16()));
        }
        let declared = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|length| length > self.max_bytes as u64) {
            return Err(FetchError::TooLarge(self.max_bytes));
        }
        let body = Limited::new(response.into_body(), self.max_bytes)
            .collect()
            .await
            .map_err(|e| match e.downcast::<http_body_util::LengthLimitError>() {
                Ok(_) => FetchError::TooLarge(self.max_bytes),
                Err(e) => FetchError::Http(e.to_string()),
            })?;
        Ok(body.to_bytes())
    }
}

/// The platform's roots, plus the PEM certificates of `ca_file`.
fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, ConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    // A machine without a certificate store still works with jwks_ca_file.
    for certificate in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(certificate);
    }
    if let Some(path) = ca_file {
        let invalid = |why: String| {
            ConfigError::invalid("auth.jwks_ca_file", format!("{}: {why}", path.display()))
        };
        let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| invalid(e.to_string()))?
            .collect::<Result<_, _>>()
            .map_err(|e| invalid(e.to_string()))?;
        if certificates.is_empty() {
            return Err(invalid("holds no PEM certificate".to_owned()));
        }
        for certificate in certificates {
            roots.add(certificate).map_err(|e| invalid(e.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth())
}
