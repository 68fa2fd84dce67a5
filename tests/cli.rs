//! The `herald` binary: configuration errors exit 64 naming the key, before
//! any port is bound; `check-config` redacts secrets; `token` mints tokens.

use std::process::{Command, Output};

const SECRET: &str = "cli-secret-0123456789abcdef0123456789";

fn herald(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    command.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("HERALD_") {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().copied());
    command.output().expect("herald runs")
}

fn write_config(text: &str) -> tempfile_path::Path {
    tempfile_path::Path::new(text)
}

/// A file removed when dropped.
mod tempfile_path {
    pub struct Path(pub std::path::PathBuf);
    impl Path {
        pub fn new(text: &str) -> Path {
            let path = std::env::temp_dir().join(format!(
                "herald-cli-{}-{}.toml",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            ));
            std::fs::write(&path, text).unwrap();
            Path(path)
        }
        pub fn as_str(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }
    impl Drop for Path {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn check(config: &str, env: &[(&str, &str)], expected_status: i32, expected_in_stderr: &str) {
    let file = write_config(config);
    let output = herald(&["check-config", "--config", file.as_str()], env);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(expected_status),
        "{config}\n{stderr}"
    );
    assert!(
        stderr.contains(expected_in_stderr),
        "expected {expected_in_stderr:?} in {stderr}"
    );
}

#[test]
fn invalid_configuration_exits_64_naming_the_key() {
    let secret = format!("[auth]\nhmac_secret = \"{SECRET}\"\n");
    check(
        &format!("{secret}[ping]\ninterval = \"0s\"\n"),
        &[],
        64,
        "ping.interval",
    );
    check(
        &format!("{secret}[ping]\nintervall = \"5s\"\n"),
        &[],
        64,
        "intervall",
    );
    check(&format!("{secret}[nonsense]\nx = 1\n"), &[], 64, "nonsense");
    check(
        &format!("{secret}[server]\nlisten = \"nowhere\"\n"),
        &[],
        64,
        "server.listen",
    );
    check(
        "[auth]\nhmac_secret = \"short\"\n",
        &[],
        64,
        "auth.hmac_secret",
    );
    check("", &[], 64, "auth.hmac_secret");
    check(
        &secret,
        &[("HERALD_LIMITS__QUEUE_MESSAGES", "none")],
        64,
        "queue_messages",
    );
    check(
        &secret,
        &[("HERALD_AUTH__ALGORITHMS", "RS256")],
        64,
        "auth.public_key_file",
    );
    check(
        "[auth]\nalgorithms = [\"RS256\"]\npublic_key_file = \"/nonexistent.pem\"\n",
        &[],
        64,
        "auth.public_key_file",
    );
    check(
        &secret,
        &[("HERALD_SERVER__SEND_BUFFER_BYTES", "100")],
        64,
        "server.send_buffer_bytes",
    );
    check(
        &format!("{secret}[server]\nmax_unsent_bytes = 2147483648\n"),
        &[],
        64,
        "server.max_unsent_bytes",
    );
    check(&secret, &[], 0, "");
}

#[test]
fn serve_with_bad_config_exits_before_binding() {
    let output = herald(
        &["serve"],
        &[
            ("HERALD_PING__TIMEOUT", "forever"),
            ("HERALD_AUTH__HMAC_SECRET", SECRET),
        ],
    );
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("ping.timeout"));
}

#[test]
fn check_config_prints_the_effective_configuration_without_secrets() {
    let output = herald(
        &["check-config"],
        &[
            ("HERALD_AUTH__HMAC_SECRET", SECRET),
            ("HERALD_API__KEY", "api-key-0123456789abcdef"),
            ("HERALD_PING__INTERVAL", "7s"),
        ],
    );
    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("interval = \"7s\""), "{stdout}");
    assert!(stdout.contains("<redacted>"));
    assert!(!stdout.contains(SECRET));
    assert!(!stdout.contains("api-key-0123456789abcdef"));
    let parsed: toml::Value = toml::from_str(&stdout).expect("the output is TOML");
    assert_eq!(parsed["server"]["listen"].as_str(), Some("0.0.0.0:8080"));
}

#[test]
fn token_mints_a_verifiable_token() {
    let output = herald(
        &[
            "token",
            "--sub",
            "alice",
            "--channels",
            "prices.*,news",
            "--ttl",
            "1h",
        ],
        &[("HERALD_AUTH__HMAC_SECRET", SECRET)],
    );
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let token = String::from_utf8(output.stdout).unwrap();
    let auth = herald::config::AuthConfig {
        hmac_secret: Some(herald::config::Secret::new(SECRET)),
        ..Default::default()
    };
    let principal = herald::auth::Authenticator::from_config(&auth)
        .unwrap()
        .authenticate(token.trim())
        .unwrap();
    assert_eq!(&*principal.user, "alice");
    assert!(principal.may_subscribe("prices.AAPL"));
    assert!(principal.may_subscribe("news"));
    assert!(!principal.may_subscribe("other"));
    let ttl = principal.expires_at - herald::auth::unix_now();
    assert!((3590..=3606).contains(&ttl), "{ttl}");
}

/// Runs `herald healthcheck --url URL` and returns its exit status.
fn healthcheck(url: &str) -> i32 {
    herald(&["healthcheck", "--url", url, "--timeout", "1s"], &[])
        .status
        .code()
        .unwrap_or(-1)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn healthcheck_follows_readiness_and_a_second_sigterm_skips_the_drain() {
    use futures_util::StreamExt;
    use std::time::{Duration, Instant};

    /// Kills the node if the test fails half way.
    struct Node(std::process::Child);
    impl Drop for Node {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let port = free_port();
    let mut node = Node(
        Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("serve")
            .env("HERALD_AUTH__HMAC_SECRET", SECRET)
            .env("HERALD_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env("HERALD_SHUTDOWN__DRAIN_PERIOD", "20s")
            .env("HERALD_SHUTDOWN__TIMEOUT", "30s")
            .env("HERALD_LOG__LEVEL", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let child = &mut node.0;
    let ready = format!("http://127.0.0.1:{port}/readyz");
    let started = Instant::now();
    while healthcheck(&ready) != 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "never ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(healthcheck(&format!("http://127.0.0.1:{port}/nope")), 1);
    assert_eq!(
        healthcheck(&format!("http://127.0.0.1:{}/readyz", free_port())),
        1
    );
    assert_eq!(healthcheck("https://127.0.0.1:1/readyz"), 1);

    let token = herald::auth::mint_hs256(SECRET, "u", &["news".into()], Duration::from_secs(60));
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws?token={token}"))
            .await
            .unwrap();
    let term = |pid: u32| {
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
    };
    term(child.id());
    let draining = Instant::now();
    while healthcheck(&ready) != 1 {
        assert!(draining.elapsed() < Duration::from_secs(5), "still ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    term(child.id());
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(message)) = ws.next().await {
            if let tokio_tungstenite::tungstenite::Message::Close(frame) = message {
                return frame.map(|f| u16::from(f.code));
            }
        }
        None
    })
    .await
    .expect("closed after the second signal");
    assert_eq!(closed, Some(1001));
    let exited = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(exited.elapsed() < Duration::from_secs(5), "did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}
