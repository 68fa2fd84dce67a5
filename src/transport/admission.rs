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
    /// `limits.connection_rate_per_ip` exceeded by this client address, before
    /// its token was even looked at: 429 after the given wait.
    AttemptRate(Duration),
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Origin => "forbidden_origin",
            Refusal::NodeFull => "max_connections",
            Refusal::PerIp => "max_connections_per_ip",
            Refusal::Rate(_) => "connection_rate",
            Refusal::AttemptRate(_) => "connection_rate_per_ip",
        }
    }

    /// Seconds to put in `Retry-After`, when the client may retry.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Refusal::Origin => None,
            Refusal::NodeFull | Refusal::PerIp => Some(1),
            Refusal::Rate(wait) | Refusal::AttemptRate(wait) => {
                Some(wait.as_secs_f64().ceil().max(1.0) as u64)
            }
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
    /// The node-wide bucket, charged only for upgrades whose token was accepted,
    /// so that tokenless floods cannot starve legitimate clients.
    rate: Mutex<TokenBucket>,
    /// Per-address buckets charged for every upgrade attempt before its token
    /// is checked; `None` when `limits.connection_rate_per_ip` is 0.
    attempts: Option<AttemptBuckets>,
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
            attempts: (limits.connection_rate_per_ip > 0.0).then(|| {
                AttemptBuckets::new(
                    limits.connection_rate_per_ip,
                    limits.connection_burst_per_ip as f64,
                )
            }),
            proxy_header,
            trusted_proxies,
        })
    }

    /// The client's IP. Without a trusted proxy in front it is the peer. When
    /// the peer is one of `server.trusted_proxies`, the header is read from its
    /// end: the last entry is what that proxy saw, and the walk goes further
    /// back only while the address found is itself a trusted proxy. An entry
    /// that does not parse (`unknown`, an obfuscated name, garbage) stops the
    /// walk at the last trusted hop, so a forged earlier entry never wins.
    /// Entries may carry a port (`1.2.3.4:5678`, `[::1]:80`) or be written the
    /// `Forwarded` way (`for="[2001:db8::1]:80";proto=https`).
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        // An IPv4 client of a dual-stack listener appears as ::ffff:a.b.c.d.
        let peer = peer.to_canonical();
        let Some(header) = &self.proxy_header else {
            return peer;
        };
        if !self.is_trusted_proxy(peer) {
            return peer;
        }
        let mut values = Vec::new();
        for value in headers.get_all(header) {
            match value.to_str() {
                Ok(text) => values.push(text),
                // Unreadable bytes may hide the proxy's own entry.
                Err(_) => return peer,
            }
        }
        let mut client = peer;
        for entry in values.iter().flat_map(|value| value.split(',')).rev() {
            match parse_forwarded_address(entry) {
                Some(address) => {
                    client = address;
                    if !self.is_trusted_proxy(address) {
                        return address;
                    }
                }
                None => return client,
            }
        }
        client
    }

    fn is_trusted_proxy(&self, address: IpAddr) -> bool {
        self.trusted_proxies
            .iter()
            .any(|net| net.contains(&address))
    }

    /// Charges the client's address for one upgrade attempt. Called before the
    /// token is verified, so that one address cannot spend the node's CPU on
    /// signature checks, nor the node's connection budget.
    pub fn check_attempt(&self, client: IpAddr) -> Result<(), Refusal> {
        match &self.attempts {
            Some(buckets) => buckets.try_take(client, Instant::now()),
            None => Ok(()),
        }
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

/// Parses one entry of a forwarding header: an address, with or without a
/// port, bracketed or not, or a `Forwarded` element's `for=` parameter.
fn parse_forwarded_address(entry: &str) -> Option<IpAddr> {
    let mut text = entry.trim();
    if text.contains('=') {
        text = text.split(';').find_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            key.trim()
                .eq_ignore_ascii_case("for")
                .then_some(value.trim())
        })?;
    }
    let text = text.trim_matches('"');
    let address = if let Some(bracketed) = text.strip_prefix('[') {
        let (address, rest) = bracketed.split_once(']')?;
        if !(rest.is_empty() || rest.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        address.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6)?
    } else if let Ok(address) = text.parse::<IpAddr>() {
        address
    } else {
        let (host, port) = text.rsplit_once(':')?;
        if !is_port(port) {
            return None;
        }
        host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)?
    };
    Some(address.to_canonical())
}

fn is_port(text: &str) -> bool {
    !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit())
}

/// The most client addresses with an attempt bucket at once.
const MAX_TRACKED_ADDRESSES: usize = 65_536;

/// Per-address attempt buckets. IPv6 addresses are grouped by /64, the
/// smallest block one subscriber usually holds. Bounded: at most
/// [`MAX_TRACKED_ADDRESSES`] entries. When full, buckets that have refilled
/// (they hold no information) are swept, at most once a second; addresses
/// that still find no room share one overflow bucket.
struct AttemptBuckets {
    rate: f64,
    burst: f64,
    state: Mutex<AttemptState>,
}

struct AttemptState {
    buckets: HashMap<IpAddr, TokenBucket>,
    overflow: TokenBucket,
    last_sweep: Option<Instant>,
}

impl AttemptBuckets {
    fn new(rate: f64, burst: f64) -> AttemptBuckets {
        AttemptBuckets {
            rate,
            burst,
            state: Mutex::new(AttemptState {
                buckets: HashMap::new(),
                overflow: TokenBucket::new(rate, burst, Instant::now()),
                last_sweep: None,
            }),
        }
    }

    fn try_take(&self, client: IpAddr, now: Instant) -> Result<(), Refusal> {
        let key = match client {
            IpAddr::V6(v6) => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                IpAddr::from(octets)
            }
            v4 => v4,
        };
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let state = &mut *state;
        if !state.buckets.contains_key(&key) && state.buckets.len() >= MAX_TRACKED_ADDRESSES {
            let due = state
                .last_sweep
                .is_none_or(|last| now.saturating_duration_since(last) >= Duration::from_secs(1));
            if due {
                state.last_sweep = Some(now);
                state.buckets.retain(|_, bucket| !bucket.is_full(now));
            }
        }
        let bucket =
            if state.buckets.len() < MAX_TRACKED_ADDRESSES || state.buckets.contains_key(&key) {
                state
                    .buckets
                    .entry(key)
                    .or_insert_with(|| TokenBucket::new(self.rate, self.burst, now))
            } else {
                &mut state.overflow
            };
        if bucket.try_take(now) {
            Ok(())
        } else {
            Err(Refusal::AttemptRate(bucket.retry_after()))
        }
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

    fn admission(header: &str, trusted: &[&str]) -> Admission {
        let mut config = Config::default();
        config.server.trusted_proxy_header = Some(header.to_owned());
        config.server.trusted_proxies = trusted.iter().map(|t| (*t).to_owned()).collect();
        Admission::from_config(&config).unwrap()
    }

    fn client_ip(admission: &Admission, peer: &str, values: &[&str]) -> String {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(
                admission.proxy_header.clone().unwrap(),
                hyper::header::HeaderValue::from_str(value).unwrap(),
            );
        }
        admission
            .client_ip(peer.parse().unwrap(), &headers)
            .to_string()
    }

    #[test]
    fn forwarded_addresses_cannot_be_spoofed() {
        let check = |peer: &str, values: &[&str], expected: &str| {
            let admission = admission("x-forwarded-for", &["10.0.0.0/8", "fd00::/8"]);
            assert_eq!(
                client_ip(&admission, peer, values),
                expected,
                "{peer} {values:?}"
            );
        };
        // An untrusted peer is the client, whatever it claims.
        check("203.0.113.9", &["1.1.1.1"], "203.0.113.9");
        // A trusted proxy's own entry is the last one.
        check("10.0.0.1", &["1.1.1.1, 203.0.113.7"], "203.0.113.7");
        // The proxy appends ip:port: its entry is still the one used, and the
        // forged entry before it is not.
        check("10.0.0.1", &["6.6.6.6, 203.0.113.7:51234"], "203.0.113.7");
        check("10.0.0.1", &["6.6.6.6", "[2001:db8::7]:443"], "2001:db8::7");
        check("10.0.0.1", &["6.6.6.6, [2001:db8::7]"], "2001:db8::7");
        check("10.0.0.1", &["6.6.6.6, 2001:db8::7"], "2001:db8::7");
        check(
            "10.0.0.1",
            &["for=6.6.6.6, for=\"[2001:db8::7]:80\";proto=https"],
            "2001:db8::7",
        );
        check(
            "10.0.0.1",
            &["6.6.6.6, for=203.0.113.7;by=10.0.0.1"],
            "203.0.113.7",
        );
        // An entry that does not parse stops the walk at the proxy.
        check("10.0.0.1", &["6.6.6.6, unknown"], "10.0.0.1");
        check("10.0.0.1", &["6.6.6.6, _hidden"], "10.0.0.1");
        check("10.0.0.1", &["6.6.6.6, 1.2.3.4:99999999"], "10.0.0.1");
        // Trusted hops are walked over, untrusted ones end the walk.
        check(
            "10.0.0.1",
            &["6.6.6.6, 203.0.113.7, 10.0.0.2"],
            "203.0.113.7",
        );
        check("10.0.0.1", &["6.6.6.6, garbage, 10.0.0.2"], "10.0.0.2");
        check("10.0.0.1", &["10.0.0.3, 10.0.0.2"], "10.0.0.3");
        // No header: the peer.
        check("10.0.0.1", &[], "10.0.0.1");
        check("::ffff:10.0.0.1", &["203.0.113.7"], "203.0.113.7");
    }

    #[test]
    fn attempt_buckets_are_per_address_and_bounded() {
        let buckets = AttemptBuckets::new(1.0, 2.0);
        let now = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(buckets.try_take(a, now).is_ok());
        assert!(buckets.try_take(a, now).is_ok());
        assert!(matches!(
            buckets.try_take(a, now),
            Err(Refusal::AttemptRate(_))
        ));
        assert!(buckets.try_take(b, now).is_ok());
        // One IPv6 /64 is one client.
        let v6a: IpAddr = "2001:db8::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8::ffff:2".parse().unwrap();
        assert!(buckets.try_take(v6a, now).is_ok());
        assert!(buckets.try_take(v6b, now).is_ok());
        assert!(buckets.try_take(v6a, now).is_err());
        // Full: refilled buckets are swept to make room.
        for i in 0..MAX_TRACKED_ADDRESSES as u32 {
            let _ = buckets.try_take(IpAddr::from(i.to_be_bytes()), now);
        }
        let state = buckets.state.lock().unwrap();
        assert!(state.buckets.len() <= MAX_TRACKED_ADDRESSES);
        drop(state);
        let later = now + Duration::from_secs(5);
        assert!(
            buckets
                .try_take("198.51.100.1".parse().unwrap(), later)
                .is_ok()
        );
        assert!(buckets.state.lock().unwrap().buckets.len() < 10);
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
