//! Admission control, decided before any socket is upgraded: the Origin
//! allow-list, connections per node and per client IP, and the rate of new
//! connections. A refused upgrade gets 403, 429 or 503 with `Retry-After`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::HeaderMap;
use hyper::header::HeaderName;
use ipnet::IpNet;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::{Config, ConfigError};
use crate::rate::TokenBucket;

/// Why an upgrade was refused. [`Refusal::reason`] is the JSON `error` and the
/// `reason` label of `herald_connections_rejected_total`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The Origin is not on `server.allowed_origins`: 403.
    Origin,
    /// `limits.max_connections` reached: 503.
    NodeFull,
    /// `limits.max_connections_per_ip` reached for this client: 429.
    PerIp,
    /// `limits.connection_rate` exceeded: 429 after the given wait.
    Rate(Duration),
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Origin => "forbidden_origin",
            Refusal::NodeFull => "max_connections",
            Refusal::PerIp => "max_connections_per_ip",
            Refusal::Rate(_) => "connection_rate",
        }
    }

    /// Seconds to put in `Retry-After`, when the client may retry.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Refusal::Origin => None,
            Refusal::NodeFull | Refusal::PerIp => Some(1),
            Refusal::Rate(wait) => Some(wait.as_secs_f64().ceil().max(1.0) as u64),
        }
    }
}

/// Held for as long as an admitted connection lives; releases its slots on drop.
pub struct Admitted {
    _slot: OwnedSemaphorePermit,
    ip: Option<(IpAddr, IpCounts)>,
}

/// Open connections per client IP.
type IpCounts = Arc<Mutex<HashMap<IpAddr, usize>>>;

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some((ip, counts)) = self.ip.take() {
            let mut counts = counts.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(count) = counts.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(&ip);
                }
            }
        }
    }
}

pub struct Admission {
    origins: Vec<OriginRule>,
    slots: Arc<Semaphore>,
    max_per_ip: usize,
    /// Open connections per client IP. An entry exists only while its count is
    /// above zero, so the map is bounded by `limits.max_connections`.
    per_ip: IpCounts,
    rate: Mutex<TokenBucket>,
    proxy_header: Option<HeaderName>,
    trusted_proxies: Vec<IpNet>,
}

impl Admission {
    pub fn from_config(config: &Config) -> Result<Admission, ConfigError> {
        let origins = config
            .server
            .allowed_origins
            .iter()
            .map(|rule| {
                OriginRule::parse(rule).ok_or_else(|| {
                    ConfigError::invalid(
                        "server.allowed_origins",
                        format!("{rule:?} is not scheme://host[:port], *, or scheme://*.domain"),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        let proxy_header = match &config.server.trusted_proxy_header {
            Some(name) => Some(HeaderName::try_from(name.as_str()).map_err(|_| {
                ConfigError::invalid(
                    "server.trusted_proxy_header",
                    format!("{name:?} is not a header name"),
                )
            })?),
            None => None,
        };
        let trusted_proxies = config
            .server
            .trusted_proxies
            .iter()
            .map(|net| {
                net.parse::<IpNet>()
                    .or_else(|_| net.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        ConfigError::invalid(
                            "server.trusted_proxies",
                            format!("{net:?} is not an IP address or CIDR"),
                        )
                    })
            })
            .collect::<Result<_, _>>()?;
        let limits = &config.limits;
        Ok(Admission {
            origins,
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            max_per_ip: limits.max_connections_per_ip,
            per_ip: Arc::new(Mutex::new(HashMap::new())),
            rate: Mutex::new(TokenBucket::new(
                limits.connection_rate,
                limits.connection_burst as f64,
                Instant::now(),
            )),
            proxy_header,
            trusted_proxies,
        })
    }

    /// The client's IP: the peer, or, when the peer is a trusted proxy, the
    /// last address it appended to the configured header.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        // An IPv4 client of a dual-stack listener appears as ::ffff:a.b.c.d.
        let peer = peer.to_canonical();
        let Some(header) = &self.proxy_header else {
            return peer;
        };
        if !self.trusted_proxies.iter().any(|net| net.contains(&peer)) {
            return peer;
        }
        headers
            .get_all(header)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .filter_map(|item| item.trim().parse::<IpAddr>().ok())
            .map(|ip| ip.to_canonical())
            .next_back()
            .unwrap_or(peer)
    }

    /// Checks the Origin: absent (not a browser) or on the allow-list.
    pub fn check_origin(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        if self.origins.is_empty() {
            return Ok(());
        }
        match headers.get(hyper::header::ORIGIN) {
            None => Ok(()),
            Some(origin) => {
                let origin = origin.to_str().map_err(|_| Refusal::Origin)?;
                if self.origins.iter().any(|rule| rule.matches(origin)) {
                    Ok(())
                } else {
                    Err(Refusal::Origin)
                }
            }
        }
    }

    /// Takes a connection slot, a per-IP slot and a rate token, or refuses.
    pub fn admit(&self, client: IpAddr) -> Result<Admitted, Refusal> {
        let slot = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::NodeFull)?;
        let ip = if self.max_per_ip > 0 {
            let mut counts = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            let count = counts.entry(client).or_insert(0);
            if *count >= self.max_per_ip {
                return Err(Refusal::PerIp);
            }
            *count += 1;
            Some((client, self.per_ip.clone()))
        } else {
            None
        };
        let admitted = Admitted { _slot: slot, ip };
        let mut rate = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        if !rate.try_take(Instant::now()) {
            return Err(Refusal::Rate(rate.retry_after()));
        }
        Ok(admitted)
    }
}

/// One `server.allowed_origins` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum OriginRule {
    Any,
    Exact {
        scheme: String,
        host: String,
        port: Option<u16>,
    },
    /// `scheme://*.domain`: any subdomain of `domain`, at any depth.
    Subdomains {
        scheme: String,
        domain: String,
        port: Option<u16>,
    },
}

/// Splits `scheme://host[:port]` (lowercased); `None` if it is not one.
fn split_origin(text: &str) -> Option<(String, String, Option<u16>)> {
    let text = text.trim().to_ascii_lowercase();
    let (scheme, rest) = text.split_once("://")?;
    if scheme.is_empty() || rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
        return None;
    }
    // An IPv6 literal is bracketed; its colons are not a port separator.
    let (host, port) = match rest.strip_prefix('[') {
        Some(bracketed) => {
            let (address, after) = bracketed.split_once(']')?;
            let port = match after.strip_prefix(':') {
                Some(port) => Some(port.parse().ok()?),
                None if after.is_empty() => None,
                None => return None,
            };
            (format!("[{address}]"), port)
        }
        None => match rest.rsplit_once(':') {
            Some((host, port)) => (host.to_owned(), Some(port.parse().ok()?)),
            None => (rest.to_owned(), None),
        },
    };
    if host.is_empty() {
        return None;
    }
    // An explicit default port is the same origin as none.
    let port = match (scheme, port) {
        ("https" | "wss", Some(443)) | ("http" | "ws", Some(80)) => None,
        (_, port) => port,
    };
    Some((scheme.to_owned(), host, port))
}

impl OriginRule {
    fn parse(rule: &str) -> Option<OriginRule> {
        if rule.trim() == "*" {
            return Some(OriginRule::Any);
        }
        let (scheme, host, port) = split_origin(rule)?;
        match host.strip_prefix("*.") {
            Some(domain) if !domain.is_empty() && !domain.contains('*') => {
                Some(OriginRule::Subdomains {
                    scheme,
                    domain: domain.to_owned(),
                    port,
                })
            }
            Some(_) => None,
            None if host.contains('*') => None,
            None => Some(OriginRule::Exact { scheme, host, port }),
        }
    }

    fn matches(&self, origin: &str) -> bool {
        if *self == OriginRule::Any {
            return true;
        }
        let Some((scheme, host, port)) = split_origin(origin) else {
            return false;
        };
        match self {
            OriginRule::Any => true,
            OriginRule::Exact {
                scheme: s,
                host: h,
                port: p,
            } => *s == scheme && *h == host && *p == port,
            OriginRule::Subdomains {
                scheme: s,
                domain,
                port: p,
            } => {
                // A label boundary is required: `evil-example.com` and
                // `example.com.evil.com` do not end with `.example.com`.
                *s == scheme
                    && *p == port
                    && host.len() > domain.len() + 1
                    && host.ends_with(domain.as_str())
                    && host.as_bytes()[host.len() - domain.len() - 1] == b'.'
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(rule: &str, origin: &str, expected: bool) {
        let parsed = OriginRule::parse(rule).unwrap_or_else(|| panic!("rule {rule}"));
        assert_eq!(parsed.matches(origin), expected, "{rule} vs {origin}");
    }

    #[test]
    fn origin_rules() {
        check("https://*.example.com", "https://app.example.com", true);
        check("https://*.example.com", "https://a.b.example.com", true);
        check("https://*.example.com", "https://APP.Example.com", true);
        check("https://*.example.com", "https://example.com", false);
        check(
            "https://*.example.com",
            "https://example.com.evil.com",
            false,
        );
        check("https://*.example.com", "https://evil-example.com", false);
        check("https://*.example.com", "https://evilexample.com", false);
        check("https://*.example.com", "http://app.example.com", false);
        check(
            "https://*.example.com",
            "https://app.example.com:8443",
            false,
        );
        check("https://*.example.com", "null", false);
        check("https://app.example.com", "https://app.example.com", true);
        check(
            "https://app.example.com",
            "https://app.example.com:443",
            true,
        );
        check(
            "https://app.example.com",
            "https://app.example.com.evil.com",
            false,
        );
        check("http://localhost:3000", "http://localhost:3000", true);
        check("http://localhost:3000", "http://localhost:3001", false);
        check("*", "https://anything.test", true);
        check("*", "null", true);
        check("http://[::1]:8080", "http://[::1]:8080", true);
        check("http://[::1]:8080", "http://[::1]:8081", false);
        assert_eq!(OriginRule::parse("example.com"), None);
        assert_eq!(OriginRule::parse("https://*"), None);
        assert_eq!(OriginRule::parse("https://a.*.com"), None);
        assert_eq!(OriginRule::parse("https://example.com/path"), None);
    }
}
