//! Redis Cluster: one link per primary, routed by hash slot.
//!
//! The cluster is read with `CLUSTER SLOTS` from any node that answers. Each
//! primary that owns slots gets its own [`Link`], a plain RESP3 connection on
//! which the node `SSUBSCRIBE`s the shard channels of that primary's slots and
//! `SPUBLISH`es to them. The redis crate's cluster client is not used: it
//! forwards every shard's pushes through one unbounded queue to the task that
//! also routes every command, so a large fan-out would stall commands and the
//! backlog could grow without bound. Here each shard's pushes are delivered
//! inside its own connection's reader, exactly as in standalone mode.
//!
//! A coordinator task keeps the topology and the links in step:
//! - it routes each interest change from the hub to the link of the channel's
//!   slot;
//! - it re-reads the topology when a link asks (a redirection, an unsolicited
//!   unsubscribe after a slot moved, a primary that stopped answering), at most
//!   every [`MIN_REFRESH_INTERVAL`], and every [`REFRESH_INTERVAL`] anyway;
//! - when a slot changes hands, its channels are subscribed on the new owner
//!   and their subscribers get a `gap`; a primary that left the topology has
//!   its link retired.
//!
//! One shard down is one link down: only that shard's channels are affected.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionAddr, ConnectionInfo, RedisError, Value};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use super::link::{self, Command, Common, Link, Reply, Scope, Shard};

/// The number of hash slots in a Redis Cluster.
const SLOTS: usize = 16_384;

/// The least time between two topology reads, however many links ask.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_millis(200);

/// The topology is re-read at least this often, to notice changes no link saw.
const REFRESH_INTERVAL: Duration = Duration::from_secs(30);

/// The hash slot of a key or channel, with `{hash tags}`, as Redis computes it.
pub fn slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(length) if length > 0 => &key[open + 1..open + 1 + length],
            _ => key,
        },
        None => key,
    };
    crc16::State::<crc16::XMODEM>::calculate(hashed) % SLOTS as u16
}

/// Which primary owns each slot.
pub(super) struct Topology {
    table: RwLock<SlotTable>,
    /// Bumped after every successful read, for publishes waiting for one.
    version: watch::Sender<u64>,
    /// Links ask for a new read here.
    refresh: Notify,
}

#[derive(Default, Clone)]
struct SlotTable {
    /// Per slot, an index into `primaries`, or `None` while no primary owns it.
    owners: Vec<Option<u16>>,
    /// Each primary's `host:port` and where to connect to it.
    primaries: Vec<(Arc<str>, ConnectionInfo)>,
}

impl SlotTable {
    /// The same owners and primaries (connection settings come from config).
    fn same_as(&self, other: &SlotTable) -> bool {
        self.owners == other.owners
            && self.primaries.len() == other.primaries.len()
            && self
                .primaries
                .iter()
                .zip(&other.primaries)
                .all(|(a, b)| a.0 == b.0)
    }
}

impl Topology {
    fn new() -> Topology {
        Topology {
            table: RwLock::new(SlotTable::default()),
            version: watch::Sender::new(0),
            refresh: Notify::new(),
        }
    }

    /// The primary owning `channel` (a Redis channel name), if known.
    pub fn owner(&self, channel: &str) -> Option<Arc<str>> {
        let table = self.table.read().unwrap_or_else(|p| p.into_inner());
        let index = (*table.owners.get(slot(channel.as_bytes()) as usize)?)?;
        Some(table.primaries[index as usize].0.clone())
    }

    pub fn request_refresh(&self) {
        self.refresh.notify_one();
    }
}

pub(super) struct Cluster {
    common: Arc<Common>,
    /// `broker.cluster_urls`, with RESP3 set.
    seeds: Vec<ConnectionInfo>,
    topology: Arc<Topology>,
    /// One link per primary that owns slots, by `host:port`.
    links: Mutex<HashMap<Arc<str>, Arc<Link>>>,
}

impl Cluster {
    /// Reads the topology once (an authentication failure is an error; an
    /// unreachable cluster is not) and starts the coordinator.
    pub async fn start(
        common: Arc<Common>,
        seeds: Vec<ConnectionInfo>,
    ) -> Result<Arc<Cluster>, RedisError> {
        let cluster = Arc::new(Cluster {
            common,
            seeds,
            topology: Arc::new(Topology::new()),
            links: Mutex::new(HashMap::new()),
        });
        match cluster.read_topology().await {
            Ok(table) => cluster.apply(table),
            Err(error) if link::is_auth_error(&error) => return Err(error),
            Err(error) => {
                warn!(%error, "Redis Cluster is unreachable; starting anyway and retrying")
            }
        }
        tokio::spawn(coordinate(cluster.clone()));
        Ok(cluster)
    }

    fn lock_links(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<Link>>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The link carrying `channel` (a client-visible name), if any.
    pub fn link_for(&self, channel: &str) -> Option<Arc<Link>> {
        let owner = self.topology.owner(&self.common.redis_channel(channel))?;
        self.lock_links().get(&owner).cloned()
    }

    /// Ready while at least one shard link is up: a node that can serve some
    /// channels keeps its clients and its endpoint. Channels of a shard that is
    /// down are accepted and get a `gap` when it is back.
    pub fn is_ready(&self) -> bool {
        self.lock_links()
            .values()
            .any(|link| link.state() == link::UP)
    }

    /// Runs `command` (`SPUBLISH`, `herald_publish`, `herald_read`) on the
    /// connection to the primary owning `channel`'s slot. A redirection (the
    /// command did not run) waits for a fresh topology and tries once more;
    /// any other failure is reported, never retried, since Redis may already
    /// have run the command.
    pub async fn on_owner(&self, channel: &str, command: &Command<'_>) -> Result<Reply, String> {
        let mut redirected = false;
        loop {
            let link = self
                .link_for(channel)
                .ok_or_else(|| "no Redis Cluster primary is known for this channel".to_owned())?;
            let mut connection = link
                .connection()
                .ok_or_else(|| format!("not connected to the Redis primary {}", link.label()))?;
            match link.run(&mut connection, command).await {
                Ok(value) => return Ok(value),
                Err(error) if link::is_redirect(&error) && !redirected => {
                    redirected = true;
                    let mut version = self.topology.version.subscribe();
                    version.borrow_and_update();
                    self.topology.request_refresh();
                    let wait = self.common.config.command_timeout;
                    if tokio::time::timeout(wait, version.changed()).await.is_err() {
                        return Err(error.to_string());
                    }
                }
                Err(error) => return Err(error.to_string()),
            }
        }
    }

    /// Reads `CLUSTER SLOTS` from the first node that answers: the known
    /// primaries first, then the seeds.
    async fn read_topology(&self) -> Result<SlotTable, RedisError> {
        let mut candidates: Vec<ConnectionInfo> = {
            let table = self
                .topology
                .table
                .read()
                .unwrap_or_else(|p| p.into_inner());
            table
                .primaries
                .iter()
                .map(|(_, info)| info.clone())
                .collect()
        };
        candidates.extend(self.seeds.iter().cloned());
        let mut last_error = None;
        for candidate in candidates {
            match self.read_topology_from(&candidate).await {
                Ok(table) => return Ok(table),
                Err(error) if link::is_auth_error(&error) => return Err(error),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            RedisError::from((redis::ErrorKind::Io, "no Redis Cluster node to ask"))
        }))
    }

    async fn read_topology_from(&self, node: &ConnectionInfo) -> Result<SlotTable, RedisError> {
        let timeout = self.common.config.command_timeout;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let mut connection: MultiplexedConnection = redis::Client::open(node.clone())?
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let reply: Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut connection)
            .await?;
        parse_slots(&reply, node).ok_or_else(|| {
            RedisError::from((redis::ErrorKind::Parse, "unexpected CLUSTER SLOTS reply"))
        })
    }

    /// Installs a topology: links for new primaries, retirement for gone ones,
    /// and the channels whose slot changed hands moved to their new link.
    fn apply(&self, table: SlotTable) {
        let channels = self.common.hub.channels();
        let before: Vec<Option<Arc<str>>> = channels
            .iter()
            .map(|c| self.topology.owner(&self.common.redis_channel(c)))
            .collect();
        {
            let mut current = self
                .topology
                .table
                .write()
                .unwrap_or_else(|p| p.into_inner());
            if current.same_as(&table) {
                drop(current);
                self.topology.version.send_modify(|v| *v += 1);
                return;
            }
            *current = table.clone();
        }
        let owning: Vec<&(Arc<str>, ConnectionInfo)> = table
            .primaries
            .iter()
            .enumerate()
            .filter(|(index, _)| table.owners.contains(&Some(*index as u16)))
            .map(|(_, primary)| primary)
            .collect();
        {
            let mut links = self.lock_links();
            links.retain(|address, link| {
                let keep = owning.iter().any(|(a, _)| a == address);
                if !keep {
                    info!(primary = %address, "Redis primary left the topology");
                    link.retire();
                }
                keep
            });
            for (address, target) in owning {
                if links.contains_key(address) {
                    continue;
                }
                let link = Link::new(
                    self.common.clone(),
                    Scope::Shard(Shard {
                        address: address.clone(),
                        topology: self.topology.clone(),
                        dirty: Mutex::new(Default::default()),
                        gap_due: Mutex::new(Default::default()),
                        notify: Notify::new(),
                    }),
                    target.clone(),
                    None,
                );
                tokio::spawn(link::supervise(link.clone(), None));
                links.insert(address.clone(), link);
            }
        }
        info!(
            primaries = self.lock_links().len(),
            "Redis Cluster topology read"
        );
        // Channels whose slot moved: the new owner subscribes them and tells
        // their subscribers about the gap; the old one forgets them.
        for (channel, before) in channels.iter().zip(before) {
            let after = self.topology.owner(&self.common.redis_channel(channel));
            if before.is_some() && before != after {
                if let Some(old) = before.and_then(|a| self.lock_links().get(&a).cloned()) {
                    old.mark_dirty(channel.clone(), false);
                }
                if let Some(new) = self.link_for(channel) {
                    new.mark_dirty(channel.clone(), true);
                }
            }
        }
        self.topology.version.send_modify(|v| *v += 1);
    }

    /// Sends the hub's interest changes to the links of their slots. A channel
    /// without a known owner is dropped here: the link that comes to own it
    /// subscribes everything it carries when it connects.
    fn route_interest(&self) {
        for channel in self.common.hub.take_dirty() {
            if let Some(link) = self.link_for(&channel) {
                link.mark_dirty(channel, false);
            }
        }
    }
}

/// Keeps the topology and the links in step until the node stops.
async fn coordinate(cluster: Arc<Cluster>) {
    let common = cluster.common.clone();
    let mut last_read = Instant::now();
    let mut next_read = Instant::now() + REFRESH_INTERVAL;
    let mut wanted = cluster.lock_links().is_empty();
    let mut backoff = common.config.reconnect_min;
    loop {
        cluster.route_interest();
        if wanted && last_read.elapsed() >= MIN_REFRESH_INTERVAL {
            last_read = Instant::now();
            match cluster.read_topology().await {
                Ok(table) => {
                    cluster.apply(table);
                    wanted = false;
                    backoff = common.config.reconnect_min;
                    next_read = Instant::now() + REFRESH_INTERVAL;
                }
                Err(error) => {
                    warn!(%error, "cannot read the Redis Cluster topology");
                    next_read = Instant::now() + backoff;
                    backoff = (backoff * 2).min(common.config.reconnect_max);
                }
            }
            // Apply the routes of anything that changed meanwhile.
            cluster.route_interest();
        }
        let until = if wanted {
            last_read + MIN_REFRESH_INTERVAL
        } else {
            next_read
        };
        tokio::select! {
            _ = common.shutdown.cancelled() => return,
            _ = common.hub.interest_changed() => {}
            _ = cluster.topology.refresh.notified() => wanted = true,
            _ = tokio::time::sleep_until(until) => {
                if Instant::now() >= next_read {
                    wanted = true;
                }
            }
        }
    }
}

/// Parses a `CLUSTER SLOTS` reply: `[[start, end, [host, port, id, ...],
/// replicas...], ...]`. A primary announced without a host is on the host
/// that was asked.
fn parse_slots(reply: &Value, asked: &ConnectionInfo) -> Option<SlotTable> {
    let Value::Array(ranges) = reply else {
        return None;
    };
    let mut table = SlotTable {
        owners: vec![None; SLOTS],
        primaries: Vec::new(),
    };
    for range in ranges {
        let Value::Array(fields) = range else {
            return None;
        };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(primary))) =
            (fields.first(), fields.get(1), fields.get(2))
        else {
            return None;
        };
        let host = match primary.first() {
            Some(Value::BulkString(host)) => String::from_utf8(host.clone()).ok()?,
            Some(Value::SimpleString(host)) => host.clone(),
            _ => return None,
        };
        let Some(Value::Int(port)) = primary.get(1) else {
            return None;
        };
        let host = if host.is_empty() || host == "?" {
            asked_host(asked)?
        } else {
            host
        };
        let port = u16::try_from(*port).ok()?;
        let address: Arc<str> = format!("{host}:{port}").into();
        let index = match table.primaries.iter().position(|(a, _)| *a == address) {
            Some(index) => index,
            None => {
                table
                    .primaries
                    .push((address, with_address(asked, &host, port)));
                table.primaries.len() - 1
            }
        };
        let (start, end) = (usize::try_from(*start).ok()?, usize::try_from(*end).ok()?);
        if start > end || end >= SLOTS {
            return None;
        }
        for owner in &mut table.owners[start..=end] {
            *owner = Some(index as u16);
        }
    }
    Some(table)
}

fn asked_host(info: &ConnectionInfo) -> Option<String> {
    match info.addr() {
        ConnectionAddr::Tcp(host, _) | ConnectionAddr::TcpTls { host, .. } => Some(host.clone()),
        _ => None,
    }
}

/// `template` (credentials, database, TLS settings) pointed at `host:port`.
fn with_address(template: &ConnectionInfo, host: &str, port: u16) -> ConnectionInfo {
    let addr = match template.addr() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host.to_owned(), port),
    };
    template.clone().set_addr(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from CLUSTER KEYSLOT.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        assert_eq!(slot(b""), 0);
    }

    #[test]
    fn cluster_slots_replies_are_parsed() {
        let asked = redis::Client::open("redis://:pw@10.0.0.1:7000/")
            .unwrap()
            .get_connection_info()
            .clone();
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(8191),
                node("10.0.0.2", 7001),
            ]),
            Value::Array(vec![
                Value::Int(8192),
                Value::Int(16383),
                node("", 7002),
                node("10.0.0.9", 7009),
            ]),
        ]);
        let table = parse_slots(&reply, &asked).unwrap();
        assert_eq!(table.primaries.len(), 2);
        assert_eq!(&*table.primaries[0].0, "10.0.0.2:7001");
        assert_eq!(&*table.primaries[1].0, "10.0.0.1:7002");
        assert_eq!(table.owners[0], Some(0));
        assert_eq!(table.owners[16383], Some(1));
        // Credentials carry over to every primary.
        assert_eq!(table.primaries[0].1.redis_settings().password(), Some("pw"));
        assert!(parse_slots(&Value::Int(1), &asked).is_none());
    }
}
