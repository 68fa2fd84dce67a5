//! What the load tester's end-to-end tests share: a herald node running in
//! the test process on `127.0.0.1:0`, a `redis-server` on a free port, and
//! running the built `herald-loadtest` binary.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use herald::config::{Config, Secret};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const SECRET: &str = "loadtest-secret-0123456789abcdef0123";
pub const API_KEY: &str = "loadtest-api-key-0123456789";

/// The longest any one run of the tool may take here.
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// A herald node in this process.
pub struct Node {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), herald::StartError>>,
}

impl Node {
    pub async fn start() -> Node {
        Node::start_with(|_| {}).await
    }

    /// Starts a node with the tests' configuration, changed by `adjust`.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Node {
        let mut config = Config::default();
        config.node.id = Some("loadtest-node".into());
        config.auth.hmac_secret = Some(Secret::new(SECRET));
        config.api.key = Some(Secret::new(API_KEY));
        config.shutdown.timeout = Duration::from_secs(5);
        config.shutdown.drain_period = Duration::ZERO;
        // The load tester's clients all come from loopback.
        config.limits.connection_rate_per_ip = 0.0;
        adjust(&mut config);
        config.validate().expect("the test configuration is valid");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(herald::run(listener, config, async move {
            let _ = stopped.await;
        }));
        Node {
            addr,
            stop: Some(stop),
            handle,
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn api_url(&self) -> String {
        format!("http://{}/api/publish", self.addr)
    }

    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.addr)
    }

    pub async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.handle.await.unwrap().unwrap();
    }
}

/// A JSON summary file unique to this test.
fn summary_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "herald-loadtest-{name}-{}.json",
        std::process::id()
    ))
}

/// Runs the tool with `args` plus `--json FILE`, checks it succeeded (every
/// `--check` passed), and returns the summary.
pub async fn run_tool(name: &str, args: &[String]) -> Value {
    let (success, summary, _, report) = run(name, args).await;
    assert!(success, "{name} failed: {report}");
    summary
}

/// Runs the tool like [`run_tool`], checks that it failed (a check failed,
/// but the run itself went through and wrote its summary), and returns the
/// summary and what it printed.
pub async fn run_tool_failing(name: &str, args: &[String]) -> (Value, String) {
    let (success, summary, stdout, report) = run(name, args).await;
    assert!(!success, "{name} passed though it should not: {report}");
    (summary, stdout)
}

/// Runs the tool; returns whether it exited 0, its summary, its stdout, and
/// all of its output for messages.
async fn run(name: &str, args: &[String]) -> (bool, Value, String, String) {
    let path = summary_path(name);
    let output: Output = tokio::time::timeout(
        RUN_LIMIT,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_herald-loadtest"))
            .args(args)
            .arg("--json")
            .arg(&path)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the tool finishes in time")
    .expect("the tool starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report = format!(
        "exit {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    assert!(stdout.contains("== herald-loadtest"), "no table: {report}");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("the summary file was not written ({error}): {report}"));
    let _ = std::fs::remove_file(&path);
    let summary: Value = serde_json::from_str(&text).expect("the summary is JSON");
    assert!(summary["config"].is_object(), "{summary:#}");
    assert!(
        !text.contains(SECRET) && !text.contains(API_KEY),
        "secrets leaked into the summary"
    );
    (
        output.status.success(),
        summary,
        stdout.into_owned(),
        report,
    )
}

pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|arg| (*arg).to_owned()).collect()
}

/// A `redis-server` on a free port, never one the user already runs. It may
/// be killed and started again by a command the load tester runs as a fault
/// (see [`Redis::restart_command`]); both processes are stopped on drop.
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Redis {
    pub fn start() -> Redis {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "herald-loadtest-redis-{}-{port}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(Redis::arguments(port, &dir))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot start redis-server ({error}); install it, e.g. `apt-get install redis-server`"
                )
            });
        let redis = Redis {
            port,
            dir,
            child: Some(child),
        };
        redis.wait_ready();
        redis
    }

    fn arguments(port: u16, dir: &std::path::Path) -> Vec<String> {
        strings(&[
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            dir.to_str().unwrap(),
        ])
    }

    fn wait_ready(&self) {
        use std::io::{Read, Write};
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut stream) = StdStream::connect(("127.0.0.1", self.port)) {
                let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
                let mut reply = [0u8; 16];
                if stream.write_all(b"PING\r\n").is_ok()
                    && stream
                        .read(&mut reply)
                        .is_ok_and(|n| reply[..n].starts_with(b"+PONG"))
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on {} did not start",
                self.port
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis-server runs").id()
    }

    fn pidfile(&self) -> PathBuf {
        self.dir.join("restarted.pid")
    }

    /// A shell command that starts this server again (daemonized, on the
    /// same port) after it was killed.
    pub fn restart_command(&self) -> String {
        let arguments: Vec<String> = Redis::arguments(self.port, &self.dir)
            .into_iter()
            .map(|argument| format!("'{argument}'"))
            .collect();
        format!(
            "redis-server {} --daemonize yes --pidfile '{}'",
            arguments.join(" "),
            self.pidfile().display()
        )
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Ok(pid) = std::fs::read_to_string(self.pidfile()) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP port that is free now.
fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
