//! Redis Sentinel: find the primary, and follow it across failovers.
//!
//! The node keeps one standalone [`Link`](super::link::Link) to the primary.
//! Before every connection attempt it asks the Sentinels, in turn, for the
//! primary's address (`SENTINEL get-master-addr-by-name`) and checks with
//! `ROLE` that the node found is a primary. While connected, it asks again on
//! every probe: a failover that demotes the old primary does not always close
//! its connections (a demoted primary keeps its subscribers and even receives
//! the new primary's messages through replication, but publishes to it go
//! nowhere), so the link is rebuilt as soon as the Sentinels name another
//! primary. The rebuilt link resubscribes and sends a `gap`.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionInfo, RedisError, Value};

use crate::config::{BrokerConfig, ConfigError};

pub(super) struct Sentinel {
    /// Where the Sentinels listen, with their password.
    sentinels: Vec<ConnectionInfo>,
    /// `broker.master_name`.
    master_name: String,
    /// The primary's connection settings (password, RESP3), to which the
    /// address found is added.
    primary_settings: redis::RedisConnectionInfo,
    timeout: Duration,
}

impl Sentinel {
    pub fn from_config(config: &BrokerConfig) -> Result<Sentinel, ConfigError> {
        let sentinels = config
            .sentinels
            .iter()
            .map(|address| {
                let info = info_for(address).map_err(|e| {
                    ConfigError::invalid("broker.sentinels", format!("{address:?}: {e}"))
                })?;
                let mut settings = info.redis_settings().clone();
                if let Some(password) = &config.sentinel_password {
                    settings = settings.set_password(password.expose());
                }
                Ok(info.set_redis_settings(settings))
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let mut primary_settings =
            redis::RedisConnectionInfo::default().set_protocol(redis::ProtocolVersion::RESP3);
        if let Some(password) = &config.password {
            primary_settings = primary_settings.set_password(password.expose());
        }
        Ok(Sentinel {
            sentinels,
            master_name: config.master_name.clone().unwrap_or_default(),
            primary_settings,
            timeout: config.command_timeout,
        })
    }

    /// The primary's address (`host:port`) and connection settings, from the
    /// first Sentinel that knows it.
    pub async fn primary(&self) -> Result<(String, ConnectionInfo), RedisError> {
        let mut last_error = None;
        for sentinel in &self.sentinels {
            match self.ask(sentinel).await {
                Ok(Some((host, port))) => {
                    let address = format!("{host}:{port}");
                    let info =
                        info_for(&address)?.set_redis_settings(self.primary_settings.clone());
                    return Ok((address, info));
                }
                Ok(None) => {
                    last_error = Some(RedisError::from((
                        redis::ErrorKind::Io,
                        "this Sentinel does not know the primary",
                        self.master_name.clone(),
                    )))
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error
            .unwrap_or_else(|| RedisError::from((redis::ErrorKind::Io, "no Sentinel to ask"))))
    }

    async fn ask(&self, sentinel: &ConnectionInfo) -> Result<Option<(String, u16)>, RedisError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let mut connection: MultiplexedConnection = redis::Client::open(sentinel.clone())?
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let reply: Value = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master_name)
            .query_async(&mut connection)
            .await?;
        Ok(parse_address(&reply))
    }
}

/// Checks that `connection` is to a primary: a Sentinel may name the old
/// primary for a moment after a failover.
pub(super) async fn is_primary(connection: &mut MultiplexedConnection) -> Result<bool, RedisError> {
    let role: Value = redis::cmd("ROLE").query_async(connection).await?;
    Ok(match role {
        Value::Array(fields) => {
            matches!(
                fields.first(),
                Some(Value::BulkString(role)) if role == b"master"
            ) || matches!(fields.first(), Some(Value::SimpleString(role)) if role == "master")
        }
        _ => false,
    })
}

fn info_for(address: &str) -> Result<ConnectionInfo, RedisError> {
    Ok(redis::Client::open(format!("redis://{address}/"))?
        .get_connection_info()
        .clone())
}

/// `SENTINEL get-master-addr-by-name` answers `[host, port]`, or nil.
fn parse_address(reply: &Value) -> Option<(String, u16)> {
    let Value::Array(fields) = reply else {
        return None;
    };
    let text = |value: &Value| match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    };
    let host = text(fields.first()?)?;
    let port = text(fields.get(1)?)?.parse().ok()?;
    Some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_parsed() {
        let reply = Value::Array(vec![
            Value::BulkString(b"10.0.0.7".to_vec()),
            Value::BulkString(b"6380".to_vec()),
        ]);
        assert_eq!(parse_address(&reply), Some(("10.0.0.7".into(), 6380)));
        assert_eq!(parse_address(&Value::Nil), None);
        let bad = Value::Array(vec![Value::BulkString(b"h".to_vec())]);
        assert_eq!(parse_address(&bad), None);
    }
}
