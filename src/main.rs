//! The `herald` binary: parse the command line, load and validate the
//! configuration, set up logging, and hand over to [`herald::run`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use herald::config::{
    ChannelRule, Config, ConfigError, EXIT_INVALID_CONFIG, LogFormat, Secret, SlowPolicy,
    random_hex,
};

#[derive(Parser)]
#[command(
    name = "herald",
    version,
    about = "A pub/sub push gateway: JWT-authenticated WebSockets fed from Redis channels"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Serve {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run a single development node on the in-memory broker, with generated
    /// secrets and ready-to-paste examples.
    Dev {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Serve HTTPS and wss:// with a freshly generated self-signed
        /// certificate for localhost.
        #[arg(long)]
        tls: bool,
        /// Do not run the demo price feed (`server.demo_feed`), which
        /// publishes made-up prices on prices.AAPL, prices.MSFT, ...
        #[arg(long)]
        no_feed: bool,
    },
    /// Mint an HS256 client token with the configured `auth.hmac_secret`.
    Token {
        /// The token's subject (user id).
        #[arg(long)]
        sub: String,
        /// Comma-separated channel patterns the token grants, e.g. 'prices.*,news'.
        #[arg(long, default_value = "")]
        channels: String,
        /// Lifetime, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print the effective configuration with secrets redacted; exit 64 if invalid.
    CheckConfig {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// GET a node's readiness endpoint: exit 0 when it answers 200, else 1.
    /// For container health checks in images without a shell or curl.
    Healthcheck {
        /// The URL to check.
        #[arg(long, default_value = "http://127.0.0.1:8080/readyz")]
        url: String,
        /// How long to wait for the answer.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// For https:// URLs: the PEM CA certificates to trust.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// For https:// URLs: do not verify the certificate (as Kubernetes
        /// HTTPS probes do); the check is about readiness, not identity.
        #[arg(long)]
        insecure: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => match load(config.as_deref()) {
            Ok(config) => serve(config, None),
            Err(error) => invalid(error),
        },
        Command::Dev {
            config,
            tls,
            no_feed,
        } => match dev_config(config, tls, no_feed) {
            Ok((config, banner)) => serve(config, Some(banner)),
            Err(error) => invalid(error),
        },
        Command::Token {
            sub,
            channels,
            ttl,
            config,
        } => match load(config.as_deref()) {
            Ok(config) => {
                let Some(secret) = config.auth.hmac_secret else {
                    return invalid(ConfigError::invalid(
                        "auth.hmac_secret",
                        "is required to mint tokens",
                    ));
                };
                let channels: Vec<String> = channels
                    .split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned)
                    .collect();
                println!(
                    "{}",
                    herald::auth::mint_hs256(secret.expose(), &sub, &channels, ttl)
                );
                ExitCode::SUCCESS
            }
            Err(error) => invalid(error),
        },
        Command::Healthcheck {
            url,
            timeout,
            ca_file,
            insecure,
        } => healthcheck(&url, timeout, ca_file.as_deref(), insecure),
        Command::CheckConfig { config } => match load(config.as_deref()) {
            Ok(config) => {
                print!("{}", config.to_redacted_toml());
                ExitCode::SUCCESS
            }
            Err(error) => invalid(error),
        },
    }
}

/// Loads the configuration and checks it against the components, before any
/// port is bound.
fn load(file: Option<&std::path::Path>) -> Result<Config, ConfigError> {
    let config = Config::load(file)?;
    herald::check_config(&config)?;
    Ok(config)
}

/// Raises the soft limit on open files to the hard limit: every connection is
/// a file, and container runtimes often start processes at a soft 1,024.
fn raise_open_files_limit(max_connections: usize) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            // A WebSocket, plus headroom for HTTP connections, Redis and logs.
            if limit < max_connections as u64 + 64 {
                tracing::warn!(
                    open_files = limit,
                    max_connections,
                    "the open-files limit is below limits.max_connections; raise the hard limit (ulimit -Hn) or lower max_connections"
                );
            } else {
                tracing::info!(open_files = limit, "open-files limit");
            }
        }
        Err(error) => tracing::warn!(%error, "cannot read or raise the open-files limit"),
    }
}

/// `herald healthcheck`: 0 when `url` answers 200 within `timeout`.
fn healthcheck(url: &str, timeout: Duration, ca_file: Option<&Path>, insecure: bool) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("herald healthcheck: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let check = get_status(url, ca_file, insecure);
    match runtime.block_on(async { tokio::time::timeout(timeout, check).await }) {
        Ok(Ok(200)) => ExitCode::SUCCESS,
        Ok(Ok(status)) => {
            eprintln!("herald healthcheck: {url} answered {status}");
            ExitCode::FAILURE
        }
        Ok(Err(error)) => {
            eprintln!("herald healthcheck: {url}: {error:#}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("herald healthcheck: {url}: no answer within {timeout:?}");
            ExitCode::FAILURE
        }
    }
}

/// The status of a GET of `url`, over TLS for `https://`.
async fn get_status(url: &str, ca_file: Option<&Path>, insecure: bool) -> anyhow::Result<u16> {
    let uri: hyper::Uri = url.parse().context("not a URL")?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => anyhow::bail!("only http:// and https:// URLs are supported"),
    };
    let host = uri.host().context("the URL has no host")?.to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let stream = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .context("cannot connect")?;
    if !https {
        return get(stream, &host, port, &path).await;
    }
    let config = tls_client_config(ca_file, insecure)?;
    let name = rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
        .context("not a valid TLS server name")?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await
        .context("TLS handshake failed")?;
    get(stream, &host, port, &path).await
}

async fn get<I>(io: I, host: &str, port: u16, path: &str) -> anyhow::Result<u16>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, format!("{host}:{port}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let response = sender.send_request(request).await?;
    Ok(response.status().as_u16())
}

fn tls_client_config(
    ca_file: Option<&Path>,
    insecure: bool,
) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let config = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth()
    } else {
        let path = ca_file.context("an https:// URL needs --ca-file or --insecure")?;
        let mut roots = rustls::RootCertStore::empty();
        for certificate in rustls::pki_types::CertificateDer::pem_file_iter(path)
            .with_context(|| format!("cannot read {}", path.display()))?
        {
            roots.add(certificate?)?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(config)
}

/// Accepts any server certificate, for `--insecure`: the signatures of the
/// handshake are still checked, the certificate's issuer and name are not.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn invalid(error: ConfigError) -> ExitCode {
    eprintln!("herald: invalid configuration: {error}");
    ExitCode::from(EXIT_INVALID_CONFIG as u8)
}

/// `herald dev`: the configuration with generated secrets, the demo page and
/// feed, and the banner to print once the listener is bound.
fn dev_config(
    file: Option<PathBuf>,
    tls: bool,
    no_feed: bool,
) -> Result<(Config, DevBanner), ConfigError> {
    let mut config = Config::read(file.as_deref())?;
    let mut cert_file = None;
    if tls {
        let dir = std::env::temp_dir().join(format!("herald-dev-tls-{}", std::process::id()));
        let (cert, key) = herald::transport::tls::write_dev_certificate(&dir).map_err(|e| {
            ConfigError::invalid("--tls", format!("cannot write a certificate: {e}"))
        })?;
        config.server.tls = Some(herald::config::TlsConfig::with_files(cert.clone(), key));
        cert_file = Some(cert);
    }
    config.broker.kind = herald::config::BrokerKind::Memory;
    // The demo page and its feed are on unless configured off.
    let demo = *config.server.demo.get_or_insert(true);
    if no_feed {
        config.server.demo_feed = Some(false);
    }
    let feed = *config.server.demo_feed.get_or_insert(true);
    // Prices tick faster than anyone reads them: keep only the newest, at
    // most a few a second. Rules from the file come first, and win.
    config.channels.push(ChannelRule {
        pattern: "prices.*".to_owned(),
        policy: SlowPolicy::Conflate,
        max_rate_hz: Some(4.0),
        ..ChannelRule::default()
    });
    // Notifications keep a history: reload the page, publish meanwhile, and
    // the missed ones are recovered.
    config.channels.push(ChannelRule {
        pattern: "notify.*".to_owned(),
        history_size: 100,
        history_ttl: Some(std::time::Duration::from_secs(3600)),
        ..ChannelRule::default()
    });
    // Chat lines say who wrote them, as the server knows it.
    config.channels.push(ChannelRule {
        pattern: "chat.*".to_owned(),
        stamp_from: true,
        presence: true,
        join_leave: true,
        ..ChannelRule::default()
    });
    let secret = config
        .auth
        .hmac_secret
        .get_or_insert_with(|| Secret::new(random_hex(32)))
        .clone();
    let api_key = config
        .api
        .key
        .get_or_insert_with(|| Secret::new(random_hex(16)))
        .clone();
    // A development node with generated secrets stays on loopback unless the
    // listen address was configured.
    if config.server.listen == herald::config::ServerConfig::default().listen {
        config.server.listen.set_ip([127, 0, 0, 1].into());
    }
    config.validate()?;
    herald::check_config(&config)?;
    let token = herald::auth::mint_hs256(
        secret.expose(),
        "dev-user",
        &["*".to_owned()],
        Duration::from_secs(86_400),
    );
    let banner = DevBanner {
        cert_file,
        demo,
        feed,
        token,
        secret,
        api_key,
    };
    Ok((config, banner))
}

/// What `herald dev` prints once it listens: where the demo is, how to
/// publish to it, and a console snippet.
struct DevBanner {
    /// The generated certificate, with `--tls`.
    cert_file: Option<PathBuf>,
    demo: bool,
    feed: bool,
    /// A 24-hour token for `dev-user` granting every channel.
    token: String,
    secret: Secret,
    api_key: Secret,
}

impl DevBanner {
    /// The banner for a node listening on `address` (the bound address, so
    /// that a configured port 0 shows the port the system chose).
    fn render(&self, mut address: std::net::SocketAddr) -> String {
        if address.ip().is_unspecified() {
            address.set_ip([127, 0, 0, 1].into());
        }
        let (http, ws) = if self.cert_file.is_some() {
            ("https", "wss")
        } else {
            ("http", "ws")
        };
        let base = format!("{http}://{address}");
        let (cacert, cert_export, trust) = match &self.cert_file {
            None => (String::new(), String::new(), String::new()),
            Some(cert) => {
                let cert = cert.display();
                (
                    " --cacert \"$HERALD_DEV_CERT\"".to_owned(),
                    format!("\n  export HERALD_DEV_CERT={cert}"),
                    format!(
                        r#"
The certificate is self-signed, for localhost and 127.0.0.1: {cert}
Trust it, or tools refuse it:
  curl:      add --cacert {cert}
  Chromium:  chrome://certificate-manager -> Custom -> Trusted certificates -> Import {cert}
             (or open the page once and accept the warning)
  Debian:    sudo cp {cert} /usr/local/share/ca-certificates/herald-dev.crt && sudo update-ca-certificates
"#
                    ),
                )
            }
        };
        let curl = |channel: &str, data: &str| {
            format!(
                r#"curl -sS{cacert} {base}/api/publish -H "Authorization: Bearer $HERALD_API_KEY" -H 'Content-Type: application/json' -d '{{"channel":"{channel}","data":{data}}}'"#
            )
        };
        let mut banner = format!(
            "\nherald dev node on {base} (in-memory broker{feed})\n",
            feed = if self.feed {
                ", demo feed on prices.*"
            } else {
                ""
            },
        );
        let page = if self.demo {
            banner.push_str(&format!(
                r#"
Open the live demo:

  {base}/

Publish a notification to it from a terminal:

  export HERALD_API_KEY={api_key}{cert_export}
  {notify}
"#,
                api_key = self.api_key.expose(),
                notify = curl("notify.demo", r#"{"text":"Hello from curl"}"#),
            ));
            format!("{base}/")
        } else {
            // Any page of this node's origin will do for the console.
            banner.push_str(&format!(
                "\nThe demo page is off (server.demo = false).\n\n  export HERALD_API_KEY={api_key}{cert_export}\n",
                api_key = self.api_key.expose(),
            ));
            format!("{base}/healthz")
        };
        banner.push_str(&format!(
            r#"
Or speak the protocol by hand: open the browser console on {page}
(a page of this node: Chromium blocks {ws}://127.0.0.1 from about:blank and other sites)
and paste this, with a token for "dev-user" granting every channel, valid 24h:

  const ws = new WebSocket("{ws}://" + location.host + "/ws?token={token}");
  ws.onmessage = (e) => console.log(JSON.parse(e.data));
  ws.onopen = () => ws.send(JSON.stringify({{op: "subscribe", id: 1, channels: ["news"]}}));

then publish to it:

  {news}

More tokens: HERALD_AUTH__HMAC_SECRET={secret} herald token --sub alice --channels 'news,prices.*'
{trust}"#,
            token = self.token,
            news = curl("news", r#"{"hello":"world"}"#),
            secret = self.secret.expose(),
        ));
        banner
    }
}

fn serve(config: Config, banner: Option<DevBanner>) -> ExitCode {
    init_tracing(&config);
    raise_open_files_limit(config.limits.max_connections);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("herald: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = runtime.block_on(async move {
        let listener = bind(config.server.listen).with_context(|| {
            format!("cannot listen on {} (server.listen)", config.server.listen)
        })?;
        if let Some(banner) = banner {
            println!("{}", banner.render(listener.local_addr()?));
        }
        // The first signal starts the paced drain; a second one skips the pacing.
        herald::run_with_hurry(
            listener,
            config,
            herald::shutdown::signal(),
            herald::shutdown::signal(),
        )
        .await?;
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("herald: {error:#}");
            match error.downcast_ref::<herald::StartError>() {
                Some(herald::StartError::Config(_) | herald::StartError::Broker(_)) => {
                    ExitCode::from(EXIT_INVALID_CONFIG as u8)
                }
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// Binds with a listen backlog large enough for reconnect storms.
fn bind(address: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(4096)
}

fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::builder()
        .parse(&config.log.level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
