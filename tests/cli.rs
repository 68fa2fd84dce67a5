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
