//! A node for WebSocket conformance testing: `GET /echo` (the `test-echo`
//! feature) upgrades without a token into a session that sends every message
//! back, through the same frame reader, outbox and writer as a real session.
//! `scripts/autobahn.sh` runs the Autobahn testsuite against it.
//!
//! It listens on `127.0.0.1` on a free port, prints one line
//! `LISTENING <address>` to stdout, and runs until it is killed. Logs go to
//! stderr, filtered by `HERALD_LOG` (default `warn`).
//!
//! ```text
//! cargo run --example echo_server --features test-echo
//! ```

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use herald::config::{Config, Secret, random_hex};
use tokio::net::TcpListener;

/// Limits that let Autobahn's case 9 through: messages of up to 16 MiB, sent
/// in up to a million fragments or in 64-byte chops, many echoes queued.
fn echo_config() -> Config {
    let mut config = Config::default();
    config.node.id = Some("echo".into());
    // Unused by /echo, but the node needs a valid verifier to start.
    config.auth.hmac_secret = Some(Secret::new(random_hex(32)));
    let limits = &mut config.limits;
    limits.max_message_bytes = 16 << 20;
    limits.queue_bytes = 256 << 20;
    limits.queue_messages = 100_000;
    // Every fragment takes a request token: case 9.3 sends 65,536 of them.
    limits.requests_per_second = 1e9;
    limits.request_burst = 1_000_000_000;
    limits.connection_rate_per_ip = 0.0;
    limits.frame_timeout = Duration::from_secs(120);
    limits.write_timeout = Duration::from_secs(60);
    // No unsolicited pings in the middle of a case.
    config.ping.interval = Duration::from_secs(3600);
    config.ping.timeout = Duration::from_secs(3600);
    config.shutdown.timeout = Duration::from_secs(5);
    config.shutdown.drain_period = Duration::ZERO;
    config
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("HERALD_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let config = echo_config();
    config.validate().context("echo configuration")?;
    herald::check_config(&config).context("echo configuration")?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "LISTENING {}", listener.local_addr()?)?;
    stdout.flush()?;
    drop(stdout);
    herald::run(listener, config, std::future::pending()).await?;
    Ok(())
}
