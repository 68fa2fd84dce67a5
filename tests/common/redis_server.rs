//! Real `redis-server` processes on free ports, started and stopped by the
//! tests themselves: never a Redis the user already runs.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const INSTALL_HINT: &str = "the Redis tests need the `redis-server` binary on PATH; install it with \
     `apt-get install redis-server` (Debian/Ubuntu), `dnf install redis` (Fedora) or `brew install redis` (macOS)";

fn require_binary(name: &str) {
    if Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        panic!("{name} not found: {INSTALL_HINT}");
    }
}

/// A port that is free now, with port + 10000 free as well (Redis Cluster's bus).
pub fn free_port() -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed =
        (std::process::id() as u64 * 7919 + NEXT.fetch_add(1, Ordering::SeqCst) * 131) % 20_000;
    for offset in 0..20_000u64 {
        let port = 20_000 + ((seed + offset * 7) % 25_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port");
}

/// One `redis-server` process.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    pub fn start_with(args: &[&str]) -> RedisServer {
        Self::start_on(free_port(), args)
    }

    pub fn start_on(port: u16, args: &[&str]) -> RedisServer {
        require_binary("redis-server");
        let dir = std::env::temp_dir().join(format!("herald-redis-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = RedisServer {
            port,
            dir,
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--dir", self.dir.to_str().unwrap()])
            .args(&self.args)
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server: {e}; {INSTALL_HINT}"));
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
                let password = self.password();
                let command = match &password {
                    Some(p) => format!("AUTH {p}\r\nPING\r\n"),
                    None => "PING\r\n".to_owned(),
                };
                if stream.write_all(command.as_bytes()).is_ok() {
                    let mut reply = [0u8; 64];
                    if let Ok(n) = stream.read(&mut reply) {
                        if String::from_utf8_lossy(&reply[..n]).contains("PONG") {
                            return;
                        }
                    }
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

    fn password(&self) -> Option<String> {
        let index = self.args.iter().position(|a| a == "--requirepass")?;
        self.args.get(index + 1).cloned()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Points `config` at this server.
    pub fn configure(&self, config: &mut herald::config::Config) {
        config.broker.kind = herald::config::BrokerKind::Redis;
        config.broker.url = Some(herald::config::RedisUrl::new(self.url()));
    }

    /// Publishes every payload on `channel`, pipelined 1,000 at a time.
    pub async fn publish_many(&self, channel: &str, payloads: impl Iterator<Item = String>) {
        let mut connection = self.connection().await;
        let mut pipeline = redis::pipe();
        let mut queued = 0;
        for payload in payloads {
            pipeline.cmd("PUBLISH").arg(channel).arg(payload).ignore();
            queued += 1;
            if queued == 1000 {
                pipeline.query_async::<()>(&mut connection).await.unwrap();
                pipeline = redis::pipe();
                queued = 0;
            }
        }
        if queued > 0 {
            pipeline.query_async::<()>(&mut connection).await.unwrap();
        }
    }

    pub async fn connection(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Channels the server has subscribers for, without herald's probe channels.
pub async fn pubsub_channels(
    connection: &mut redis::aio::MultiplexedConnection,
    command: &str,
) -> Vec<String> {
    let mut channels: Vec<String> = redis::cmd("PUBSUB")
        .arg(command)
        .query_async(connection)
        .await
        .unwrap();
    channels.retain(|c| !c.contains('#'));
    channels.sort();
    channels
}

/// Polls `PUBSUB <command>` until it equals `expected`.
pub async fn eventually_channels(
    connection: &mut redis::aio::MultiplexedConnection,
    command: &str,
    expected: &[&str],
) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let channels = pubsub_channels(connection, command).await;
        if channels == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "PUBSUB {command} is {channels:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Three primaries forming a Redis Cluster with all 16384 slots assigned.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub async fn start() -> RedisCluster {
        Self::start_with(&[]).await
    }

    /// Three primaries with `extra` server arguments, such as
    /// `["--cluster-require-full-coverage", "no"]`.
    pub async fn start_with(extra: &[&str]) -> RedisCluster {
        require_binary("redis-cli");
        let mut args = vec![
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
        ];
        args.extend_from_slice(extra);
        let nodes: Vec<RedisServer> = (0..3).map(|_| RedisServer::start_with(&args)).collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let status = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "redis-cli --cluster create failed");
        let cluster = RedisCluster { nodes };
        cluster.wait_ok().await;
        cluster
    }

    /// Waits until every node reports `cluster_state:ok`.
    pub async fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for node in &self.nodes {
            loop {
                let info: Result<String, _> = async {
                    let mut connection = redis::Client::open(node.url())?
                        .get_multiplexed_async_connection()
                        .await?;
                    redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async::<String>(&mut connection)
                        .await
                }
                .await;
                if info
                    .map(|i| i.contains("cluster_state:ok"))
                    .unwrap_or(false)
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "cluster did not reach cluster_state:ok"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }

    async fn command(&self, node: usize, args: &[&str]) -> redis::Value {
        let mut connection = self.nodes[node].connection().await;
        let mut command = redis::cmd(args[0]);
        for arg in &args[1..] {
            command.arg(*arg);
        }
        command.query_async(&mut connection).await.unwrap()
    }

    /// Moves the slot of `channel` (which holds no keys) to node `to`, the way
    /// `redis-cli --cluster reshard` does: IMPORTING, MIGRATING, then NODE on
    /// every primary.
    pub async fn move_slot_of(&self, channel: &str, to: usize) {
        let from = self.owner_of(channel).await;
        assert_ne!(from, to);
        let mut connection = self.nodes[0].connection().await;
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(channel)
            .query_async(&mut connection)
            .await
            .unwrap();
        let slot = slot.to_string();
        let id = |value: redis::Value| match value {
            redis::Value::BulkString(bytes) => String::from_utf8(bytes).unwrap(),
            redis::Value::SimpleString(text) => text,
            other => panic!("CLUSTER MYID: {other:?}"),
        };
        let from_id = id(self.command(from, &["CLUSTER", "MYID"]).await);
        let to_id = id(self.command(to, &["CLUSTER", "MYID"]).await);
        self.command(to, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id])
            .await;
        self.command(from, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id])
            .await;
        self.command(to, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id])
            .await;
        self.command(from, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id])
            .await;
        let other = (0..3).find(|n| *n != from && *n != to).unwrap();
        self.command(other, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id])
            .await;
        assert_eq!(self.owner_of(channel).await, to);
    }

    /// The index of the node serving `channel`'s slot.
    pub async fn owner_of(&self, channel: &str) -> usize {
        let mut connection = self.nodes[0].connection().await;
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(channel)
            .query_async(&mut connection)
            .await
            .unwrap();
        let slots: redis::Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut connection)
            .await
            .unwrap();
        let redis::Value::Array(ranges) = slots else {
            panic!("CLUSTER SLOTS: {slots:?}")
        };
        for range in ranges {
            let redis::Value::Array(fields) = range else {
                continue;
            };
            let (redis::Value::Int(start), redis::Value::Int(end)) = (&fields[0], &fields[1])
            else {
                continue;
            };
            if (*start..=*end).contains(&slot) {
                let redis::Value::Array(primary) = &fields[2] else {
                    continue;
                };
                let redis::Value::Int(port) = primary[1] else {
                    continue;
                };
                return self
                    .nodes
                    .iter()
                    .position(|n| i64::from(n.port) == port)
                    .unwrap();
            }
        }
        panic!("no owner for slot {slot}");
    }
}

/// A TCP proxy in front of Redis that can silently stall the connections it
/// already carries: bytes stop flowing, but nothing is closed, as when a
/// replica is failed over behind a load balancer.
pub struct StallingProxy {
    pub port: u16,
    /// Connections opened before this generation are stalled.
    stalled_before: Arc<AtomicU64>,
    generation: Arc<AtomicU64>,
}

impl StallingProxy {
    pub async fn start(target_port: u16) -> StallingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let stalled_before = Arc::new(AtomicU64::new(0));
        let generation = Arc::new(AtomicU64::new(0));
        let (stalled, generations) = (stalled_before.clone(), generation.clone());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let this = generations.fetch_add(1, Ordering::SeqCst) + 1;
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target_port)).await
                else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(client_read, server_write, this, stalled.clone()));
                tokio::spawn(pump(server_read, client_write, this, stalled.clone()));
            }
        });
        StallingProxy {
            port,
            stalled_before,
            generation,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Freezes every connection open now; new ones flow normally.
    pub fn stall_current(&self) {
        self.stalled_before
            .store(self.generation.load(Ordering::SeqCst) + 1, Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    generation: u64,
    stalled_before: Arc<AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while generation < stalled_before.load(Ordering::SeqCst) {
            // Stalled: hold the bytes forever, close nothing.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// A primary, one replica and three Sentinels monitoring them as `mymaster`:
/// all real `redis-server` processes.
pub struct RedisSentinels {
    pub primary: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<SentinelProcess>,
}

/// One `redis-server --sentinel` process with its own config file.
pub struct SentinelProcess {
    pub port: u16,
    dir: PathBuf,
    child: Child,
}

impl Drop for SentinelProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl RedisSentinels {
    pub const MASTER_NAME: &'static str = "mymaster";

    pub async fn start() -> RedisSentinels {
        let primary = RedisServer::start();
        let primary_port = primary.port.to_string();
        let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &primary_port]);
        let sentinels = (0..3)
            .map(|_| {
                let port = free_port();
                let dir = std::env::temp_dir()
                    .join(format!("herald-sentinel-{}-{port}", std::process::id()));
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir).unwrap();
                let conf = dir.join("sentinel.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\nbind 127.0.0.1\ndir {}\n\
                         sentinel monitor {} 127.0.0.1 {primary_port} 2\n\
                         sentinel down-after-milliseconds {} 1000\n\
                         sentinel failover-timeout {} 10000\n\
                         sentinel parallel-syncs {} 1\n",
                        dir.display(),
                        Self::MASTER_NAME,
                        Self::MASTER_NAME,
                        Self::MASTER_NAME,
                        Self::MASTER_NAME,
                    ),
                )
                .unwrap();
                let child = Command::new("redis-server")
                    .arg(&conf)
                    .arg("--sentinel")
                    .current_dir(&dir)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap_or_else(|e| panic!("cannot start a Sentinel: {e}; {INSTALL_HINT}"));
                SentinelProcess { port, dir, child }
            })
            .collect();
        let set = RedisSentinels {
            primary,
            replica,
            sentinels,
        };
        set.wait_for_replica().await;
        set
    }

    pub fn addresses(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect()
    }

    async fn sentinel_command(&self, index: usize, args: &[&str]) -> Option<redis::Value> {
        let url = format!("redis://127.0.0.1:{}", self.sentinels[index].port);
        let mut connection = redis::Client::open(url)
            .ok()?
            .get_multiplexed_async_connection()
            .await
            .ok()?;
        let mut command = redis::cmd(args[0]);
        for arg in &args[1..] {
            command.arg(*arg);
        }
        command.query_async(&mut connection).await.ok()
    }

    /// Waits until every Sentinel knows the replica (they learn of it from the
    /// primary's INFO, every ten seconds at first), so that a failover can
    /// promote it.
    async fn wait_for_replica(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
        for index in 0..self.sentinels.len() {
            loop {
                let replicas = self
                    .sentinel_command(index, &["SENTINEL", "REPLICAS", Self::MASTER_NAME])
                    .await;
                if matches!(replicas, Some(redis::Value::Array(list)) if !list.is_empty()) {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "Sentinel {index} never saw the replica"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// The port of the primary the Sentinels name now.
    pub async fn primary_port(&self) -> Option<u16> {
        let reply = self
            .sentinel_command(
                0,
                &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", Self::MASTER_NAME],
            )
            .await?;
        let redis::Value::Array(fields) = reply else {
            return None;
        };
        match fields.get(1)? {
            redis::Value::BulkString(port) => std::str::from_utf8(port).ok()?.parse().ok(),
            _ => None,
        }
    }

    /// Asks a Sentinel to fail over, and waits until the replica is named.
    pub async fn failover(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            self.sentinel_command(0, &["SENTINEL", "FAILOVER", Self::MASTER_NAME])
                .await;
            let named = tokio::time::Instant::now() + Duration::from_secs(5);
            while tokio::time::Instant::now() < named {
                if self.primary_port().await == Some(self.replica.port) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the failover did not happen"
            );
        }
    }
}
