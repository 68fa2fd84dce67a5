//! The live demo (`server.demo`, on in `herald dev`): the page in
//! `clients/demo/` and the JavaScript client's `dist/herald.min.js`, embedded
//! in the binary; `GET /demo/token`, which mints short-lived tokens for the
//! demo channels; and the demo price feed (`server.demo_feed`).
//!
//! Nothing here is built or fetched at run time, and the page loads nothing
//! from anywhere but the node that served it.

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use hyper::header::{
    CACHE_CONTROL, CONTENT_TYPE, ETAG, HOST, HeaderMap, HeaderName, HeaderValue, IF_NONE_MATCH,
};
use hyper::{Method, Response, StatusCode};
use serde_json::{Map, Value, json};
use tracing::debug;

use crate::Node;
use crate::auth::{sign_hs256, unix_now};
use crate::transport::http::{self, Body};

/// The channels a demo token may subscribe to: the page's stock board,
/// notifications, chat room and shared counter.
pub const DEMO_CHANNELS: [&str; 4] = ["prices.*", "notify.demo", "chat.lobby", "counter.demo"];

/// The channels a demo token may publish on, in its `publish` claim, for the
/// chat room and the counter. The node does not read this claim yet.
pub const DEMO_PUBLISH: [&str; 2] = ["chat.lobby", "counter.demo"];

/// The lifetime of a demo token when `ttl` is not given, in seconds.
pub const DEFAULT_TTL_SECS: u64 = 600;

/// The shortest and longest `ttl` accepted, in seconds. Short enough to watch
/// an in-band refresh happen; long tokens are not what a demo needs.
pub const TTL_RANGE_SECS: std::ops::RangeInclusive<u64> = 5..=3600;

/// The longest user name accepted.
pub const MAX_USER_LEN: usize = 32;

/// The symbols of the demo feed, with the prices they start from.
pub const FEED_SYMBOLS: [(&str, f64); 4] = [
    ("AAPL", 189.50),
    ("MSFT", 415.20),
    ("GOOG", 152.80),
    ("AMZN", 178.30),
];

/// How often the feed moves prices. Each symbol moves at most once a tick,
/// and at random three ticks in five: about three prices a second each.
pub const FEED_TICK: Duration = Duration::from_millis(200);

/// The Content-Security-Policy of every demo response: scripts, styles and
/// connections from this node only (`'self'` covers `ws:`/`wss:` to the same
/// host), no inline code, no frames, no forms posting anywhere.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
    /// Whether other origins may load it: the client bundle may be imported
    /// by pages served elsewhere, which for a module script needs CORS.
    shared: bool,
}

const ASSETS: [Asset; 4] = [
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../../clients/demo/index.html"),
        shared: false,
    },
    Asset {
        path: "/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../clients/demo/app.js"),
        shared: false,
    },
    Asset {
        path: "/style.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../clients/demo/style.css"),
        shared: false,
    },
    Asset {
        path: "/herald.min.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../clients/js/dist/herald.min.js"),
        shared: true,
    },
];

/// The answer to a demo path, with the route name for
/// `herald_http_requests_total`: `demo` for the page and its files,
/// `demo_token` for tokens, `other` for a wrong method. `None` for any other
/// path. Only called when `server.demo` is on.
pub(crate) fn respond(
    method: &Method,
    path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    node: &Node,
) -> Option<(&'static str, Response<Body>)> {
    let route = if path == "/demo/token" {
        "demo_token"
    } else if ASSETS.iter().any(|asset| asset.path == path) {
        "demo"
    } else {
        return None;
    };
    // HEAD too for the files, as static file servers do.
    let allowed = method == Method::GET || (method == Method::HEAD && route == "demo");
    if !allowed {
        return Some((
            "other",
            http::error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this path",
            ),
        ));
    }
    let response = match route {
        "demo_token" => token(query, headers, node),
        _ => asset(path, headers),
    };
    Some((route, response))
}

/// A page or file, revalidated on every use (`no-cache` with an `ETag`), so
/// that a new binary's page is never mixed with an old cached script.
fn asset(path: &str, headers: &HeaderMap) -> Response<Body> {
    let index = ASSETS
        .iter()
        .position(|asset| asset.path == path)
        .expect("respond() checked the path");
    let asset = &ASSETS[index];
    let etag = etags()[index].clone();
    let unchanged = headers
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|tag| {
            let tag = tag.trim();
            tag == "*" || tag.trim_start_matches("W/") == etag
        });
    let mut response = if unchanged {
        let mut response = Response::new(Body::default());
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        response
    } else {
        let mut response = Response::new(Body::new(Bytes::from_static(asset.body)));
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
        response
    };
    let headers = response.headers_mut();
    headers.insert(ETAG, etag);
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if asset.shared {
        headers.insert(
            HeaderName::from_static("access-control-allow-origin"),
            HeaderValue::from_static("*"),
        );
    }
    protect(headers);
    response
}

/// The headers every demo response carries.
fn protect(headers: &mut HeaderMap) {
    headers.insert(
        HeaderName::from_static("content-security-policy"),
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        HeaderName::from_static("referrer-policy"),
        HeaderValue::from_static("no-referrer"),
    );
}

/// Each asset's `ETag`: the first 16 bytes of its SHA-256, in quotes.
fn etags() -> &'static [HeaderValue; 4] {
    static ETAGS: OnceLock<[HeaderValue; 4]> = OnceLock::new();
    ETAGS.get_or_init(|| {
        ASSETS.each_ref().map(|asset| {
            use sha2::{Digest, Sha256};
            let digest = Sha256::digest(asset.body);
            let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
            HeaderValue::from_str(&format!("\"{hex}\"")).expect("hex is a valid header value")
        })
    })
}

/// Why a token request was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TokenRequestError {
    /// `user` is empty, too long, or has a character outside `A-Za-z0-9_-`.
    User,
    /// `ttl` is not a whole number of seconds within [`TTL_RANGE_SECS`].
    Ttl,
    /// The `Host` header is missing, repeated, or not a host and port.
    Host,
}

impl TokenRequestError {
    fn code(&self) -> &'static str {
        match self {
            TokenRequestError::User => "invalid_user",
            TokenRequestError::Ttl => "invalid_ttl",
            TokenRequestError::Host => "invalid_host",
        }
    }

    fn message(&self) -> String {
        match self {
            TokenRequestError::User => {
                format!("user must be 1 to {MAX_USER_LEN} characters from A-Z a-z 0-9 _ -")
            }
            TokenRequestError::Ttl => format!(
                "ttl must be a whole number of seconds from {} to {}",
                TTL_RANGE_SECS.start(),
                TTL_RANGE_SECS.end()
            ),
            TokenRequestError::Host => {
                "the request needs one Host header with a host name and port".to_owned()
            }
        }
    }
}

/// A valid token request: the user (`None`: make one up) and the lifetime.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TokenRequest {
    pub user: Option<String>,
    pub ttl_secs: u64,
}

/// Reads `user` and `ttl` from a query string; other parameters are ignored,
/// and the first of a repeated one counts. Nothing is percent-decoded: a valid
/// user name needs no encoding. Pure.
pub(crate) fn parse_token_request(query: Option<&str>) -> Result<TokenRequest, TokenRequestError> {
    let param = |name: &str| {
        query?
            .split('&')
            .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value)
    };
    let user = match param("user") {
        None => None,
        Some(user)
            if (1..=MAX_USER_LEN).contains(&user.len())
                && user
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
        {
            Some(user.to_owned())
        }
        Some(_) => return Err(TokenRequestError::User),
    };
    let ttl_secs = match param("ttl") {
        None => DEFAULT_TTL_SECS,
        // Digits only: `parse` alone would also take a leading `+`.
        Some(ttl) if !ttl.is_empty() && ttl.bytes().all(|b| b.is_ascii_digit()) => ttl
            .parse::<u64>()
            .ok()
            .filter(|ttl| TTL_RANGE_SECS.contains(ttl))
            .ok_or(TokenRequestError::Ttl)?,
        Some(_) => return Err(TokenRequestError::Ttl),
    };
    Ok(TokenRequest { user, ttl_secs })
}

/// The `Host` header, if there is exactly one and it is a plausible
/// `host[:port]` (names, IPv4, or bracketed IPv6). It is echoed into the
/// WebSocket URL the page connects to.
fn host(headers: &HeaderMap) -> Option<&str> {
    let mut hosts = headers.get_all(HOST).iter();
    let (Some(host), None) = (hosts.next(), hosts.next()) else {
        return None;
    };
    let host = host.to_str().ok()?;
    let plausible = !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    plausible.then_some(host)
}

/// `GET /demo/token?user=NAME&ttl=SECS`: `{"token", "user", "url",
/// "expires_at"}`, a token for the demo channels signed with
/// `auth.hmac_secret`. Answers JSON errors with 400 for bad input.
fn token(query: Option<&str>, headers: &HeaderMap, node: &Node) -> Response<Body> {
    let request = match parse_token_request(query) {
        Ok(request) => request,
        Err(error) => return refused(&error),
    };
    let Some(host) = host(headers) else {
        return refused(&TokenRequestError::Host);
    };
    let auth = &node.config.auth;
    let Some(secret) = &auth.hmac_secret else {
        // Configuration validation requires it whenever the demo is on.
        return http::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "demo_unavailable",
            "auth.hmac_secret is not set",
        );
    };
    let user = request
        .user
        .unwrap_or_else(|| format!("guest-{}", crate::config::random_hex(3)));
    let now = unix_now();
    let expires_at = now + request.ttl_secs;
    let mut claims = Map::new();
    claims.insert("sub".into(), json!(user));
    claims.insert("publish".into(), json!(DEMO_PUBLISH));
    claims.insert(auth.channels_claim.clone(), json!(DEMO_CHANNELS));
    claims.insert("iat".into(), json!(now));
    claims.insert("exp".into(), json!(expires_at));
    if let Some(issuer) = &auth.issuer {
        claims.insert("iss".into(), json!(issuer));
    }
    if let Some(audience) = &auth.audience {
        claims.insert("aud".into(), json!(audience));
    }
    let token = sign_hs256(secret.expose(), &Value::Object(claims));
    let scheme = if node.tls.is_some() { "wss" } else { "ws" };
    let mut response = http::json(
        StatusCode::OK,
        json!({
            "token": token,
            "user": user,
            "url": format!("{scheme}://{host}/ws"),
            "expires_at": expires_at,
        }),
    );
    no_store(&mut response);
    response
}

fn refused(error: &TokenRequestError) -> Response<Body> {
    let mut response = http::error(StatusCode::BAD_REQUEST, error.code(), error.message());
    no_store(&mut response);
    response
}

fn no_store(response: &mut Response<Body>) {
    let headers = response.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    protect(headers);
}

/// The demo price feed: until the node shuts down, every [`FEED_TICK`] moves
/// some of [`FEED_SYMBOLS`] a little and publishes
/// `{"symbol":"AAPL","price":189.52,"ts":<Unix ms>}` on `prices.<SYMBOL>`
/// through the broker, like a backend would. A publish that fails (Redis
/// down) is skipped.
pub(crate) async fn feed(node: Node) {
    let mut prices = FEED_SYMBOLS.map(|(_, open)| open);
    let mut ticks = tokio::time::interval(FEED_TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = node.shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        for ((symbol, open), price) in FEED_SYMBOLS.iter().zip(prices.iter_mut()) {
            if crate::shutdown::random_unit() < 0.4 {
                continue;
            }
            *price = next_price(*price, *open, crate::shutdown::random_unit());
            let ts = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_millis());
            let payload = format!(r#"{{"symbol":"{symbol}","price":{price:.2},"ts":{ts}}}"#);
            let channel = format!("prices.{symbol}");
            if let Err(error) = node.broker.publish(&channel, Bytes::from(payload)).await {
                debug!(%error, channel, "demo feed: publish failed");
            }
        }
    }
}

/// One step of the feed's random walk: at most 0.2% up or down (`random` in
/// [0, 1) picks where), pulled 1% of the way back toward `open` so that
/// prices never drift far, and never below a cent. Pure.
pub(crate) fn next_price(price: f64, open: f64, random: f64) -> f64 {
    let step = (random - 0.5) * 0.004 * price;
    let pull = (open - price) * 0.01;
    (price + step + pull).max(0.01)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(query: Option<&str>, expected: Result<TokenRequest, TokenRequestError>) {
        assert_eq!(parse_token_request(query), expected, "{query:?}");
    }

    fn ok(user: Option<&str>, ttl_secs: u64) -> Result<TokenRequest, TokenRequestError> {
        Ok(TokenRequest {
            user: user.map(str::to_owned),
            ttl_secs,
        })
    }

    #[test]
    fn token_requests_are_validated() {
        check(None, ok(None, DEFAULT_TTL_SECS));
        check(Some(""), ok(None, DEFAULT_TTL_SECS));
        check(Some("user=alice"), ok(Some("alice"), DEFAULT_TTL_SECS));
        check(Some("user=guest-1_A&ttl=5"), ok(Some("guest-1_A"), 5));
        check(Some("ttl=3600&x=1"), ok(None, 3600));
        check(Some("user=a&user=b"), ok(Some("a"), DEFAULT_TTL_SECS));
        check(
            Some(&format!("user={}", "a".repeat(32))),
            ok(Some(&"a".repeat(32)), 600),
        );
        check(
            Some(&format!("user={}", "a".repeat(33))),
            Err(TokenRequestError::User),
        );
        check(Some("user="), Err(TokenRequestError::User));
        check(Some("user"), Err(TokenRequestError::User));
        check(Some("user=al%20ice"), Err(TokenRequestError::User));
        check(Some("user=alice.bob"), Err(TokenRequestError::User));
        check(Some("user=%C3%A9"), Err(TokenRequestError::User));
        check(Some("ttl=4"), Err(TokenRequestError::Ttl));
        check(Some("ttl=3601"), Err(TokenRequestError::Ttl));
        check(Some("ttl=+60"), Err(TokenRequestError::Ttl));
        check(Some("ttl=60s"), Err(TokenRequestError::Ttl));
        check(Some("ttl="), Err(TokenRequestError::Ttl));
        check(
            Some("ttl=99999999999999999999999"),
            Err(TokenRequestError::Ttl),
        );
    }

    #[test]
    fn only_one_plausible_host_is_echoed() {
        let check = |values: &[&str], expected: Option<&str>| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(HOST, HeaderValue::from_str(value).unwrap());
            }
            assert_eq!(host(&headers), expected, "{values:?}");
        };
        check(&["127.0.0.1:8080"], Some("127.0.0.1:8080"));
        check(&["push.example.com"], Some("push.example.com"));
        check(&["[::1]:8080"], Some("[::1]:8080"));
        check(&[], None);
        check(&[""], None);
        check(&["a b"], None);
        check(&["x\"/><script>"], None);
        check(&["user@host"], None);
        check(&["a:1", "b:2"], None);
    }

    #[test]
    fn feed_prices_stay_near_their_open_price() {
        let open = 100.0;
        let mut price = open;
        // The worst case: every step up as far as it goes.
        for _ in 0..100_000 {
            price = next_price(price, open, 0.999_999);
        }
        assert!(price > open && price < open * 1.25, "{price}");
        for _ in 0..100_000 {
            price = next_price(price, open, 0.0);
        }
        assert!(price < open && price > open * 0.75, "{price}");
        assert!((next_price(open, open, 0.5) - open).abs() < 1e-9);
    }

    #[test]
    fn assets_are_the_files_in_the_repository() {
        let html = std::str::from_utf8(ASSETS[0].body).unwrap();
        assert!(html.contains("<script type=\"module\" src=\"/app.js\">"));
        assert!(html.contains("href=\"/style.css\""));
        let app = std::str::from_utf8(ASSETS[1].body).unwrap();
        assert!(app.contains("from \"/herald.min.js\""));
        // No inline scripts or styles: the CSP would block them.
        assert!(!html.contains("<script>") && !html.contains("style=\""));
        assert_eq!(etags().len(), ASSETS.len());
    }
}
