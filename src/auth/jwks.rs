//! Signing keys from a JSON Web Key Set (`auth.jwks_url`).
//!
//! [`KeySet::parse`] is pure: a document in, the usable keys by `kid` out.
//! [`Jwks`] holds the last good set and refreshes it in the background
//! ([`Jwks::run`]): every `auth.jwks_refresh_interval`, and early when a token
//! names a `kid` the set lacks ([`Jwks::request_refresh`]), at most once per
//! `auth.jwks_min_refresh_interval` however many bogus kids arrive. A failed
//! fetch keeps the last good set. Until the first fetch succeeds the node is
//! not ready.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use serde_json::Value;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::fetch::Fetcher;
use crate::metrics::Metrics;

/// The longest `kid` kept; longer ones are skipped.
const MAX_KID_BYTES: usize = 256;
/// The most keys kept from one document.
pub(crate) const MAX_KEYS: usize = 64;

/// A usable signing key.
pub(crate) struct Key {
    pub(crate) key: DecodingKey,
    /// The JWK's `alg`, when it names one: tokens must use exactly it.
    pub(crate) algorithm: Option<Algorithm>,
}

/// The usable keys of one JWKS document, by `kid`.
pub(crate) struct KeySet {
    keys: HashMap<String, Key>,
}

/// Why a JWKS document was refused as a whole.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum KeySetError {
    #[error("not a JSON object with a `keys` array")]
    NotAKeySet,
    #[error("no usable signing key ({skipped} skipped)")]
    NoUsableKey { skipped: usize },
}

impl KeySet {
    /// The keys of `document` that can verify one of `algorithms`. A key is
    /// skipped, not fatal, when it has no `kid` or a repeated one, is for
    /// encryption, is symmetric (a published key must never verify a token),
    /// names an algorithm not configured, or does not parse. Returns the set
    /// and how many keys were skipped.
    pub(crate) fn parse(
        document: &[u8],
        algorithms: &[Algorithm],
    ) -> Result<(KeySet, usize), KeySetError> {
        #[derive(serde::Deserialize)]
        struct Document {
            keys: Vec<Value>,
        }
        let document: Document =
            serde_json::from_slice(document).map_err(|_| KeySetError::NotAKeySet)?;
        let mut keys = HashMap::new();
        let mut skipped = 0;
        for value in document.keys {
            match usable(value, algorithms) {
                Some((kid, key)) if keys.len() < MAX_KEYS && !keys.contains_key(&kid) => {
                    keys.insert(kid, key);
                }
                _ => skipped += 1,
            }
        }
        if keys.is_empty() {
            return Err(KeySetError::NoUsableKey { skipped });
        }
        Ok((KeySet { keys }, skipped))
    }

    pub(crate) fn get(&self, kid: &str) -> Option<&Key> {
        self.keys.get(kid)
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }
}

fn usable(value: Value, algorithms: &[Algorithm]) -> Option<(String, Key)> {
    let jwk: Jwk = serde_json::from_value(value).ok()?;
    let kid = jwk.common.key_id.clone()?;
    if kid.is_empty() || kid.len() > MAX_KID_BYTES {
        return None;
    }
    if matches!(&jwk.common.public_key_use, Some(use_) if *use_ != PublicKeyUse::Signature) {
        return None;
    }
    let algorithm = match &jwk.common.key_algorithm {
        None => None,
        // Encryption algorithms and names jsonwebtoken cannot verify fail here.
        Some(name) => Some(name.to_string().parse::<Algorithm>().ok()?),
    };
    let key = DecodingKey::from_jwk(&jwk).ok()?;
    if key.family() == AlgorithmFamily::Hmac {
        return None;
    }
    let fits = |a: &Algorithm| a.family() == key.family() && algorithm.is_none_or(|k| k == *a);
    if !algorithms.iter().any(fits) {
        return None;
    }
    Some((kid, Key { key, algorithm }))
}

/// The cached key set and its refresher.
pub(crate) struct Jwks {
    fetcher: Fetcher,
    algorithms: Vec<Algorithm>,
    refresh_interval: Duration,
    min_refresh_interval: Duration,
    /// The last good set; `None` until a fetch has succeeded.
    keys: ArcSwapOption<KeySet>,
    /// Bumped when a fetch starts and when it ends, good or bad: odd while
    /// one is under way. Waiters on an early refresh wake on it.
    fetched: watch::Sender<u64>,
    /// Asks [`Jwks::run`] for a fetch now.
    kick: Notify,
    early: Mutex<Early>,
}

/// The early-refresh rate limit.
#[derive(Default)]
struct Early {
    /// When the last early refresh was asked for.
    last: Option<Instant>,
    /// The `fetched` count that ends it.
    done_at: u64,
}

impl Jwks {
    pub(crate) fn new(
        fetcher: Fetcher,
        algorithms: Vec<Algorithm>,
        refresh_interval: Duration,
        min_refresh_interval: Duration,
    ) -> Jwks {
        Jwks {
            fetcher,
            algorithms,
            refresh_interval,
            min_refresh_interval,
            keys: ArcSwapOption::empty(),
            fetched: watch::channel(0).0,
            kick: Notify::new(),
            early: Mutex::new(Early::default()),
        }
    }

    /// The last good set, if any fetch has succeeded.
    pub(crate) fn keys(&self) -> Option<Arc<KeySet>> {
        self.keys.load_full()
    }

    /// Whether a set has been fetched.
    pub(crate) fn is_ready(&self) -> bool {
        self.keys.load().is_some()
    }

    /// A token named a `kid` the set lacks: asks for an early fetch and
    /// returns a future that ends when it has been tried, or `None` when
    /// one was asked for less than `auth.jwks_min_refresh_interval` ago
    /// and has ended: the key is then truly unknown. Callers that arrive
    /// while an early fetch is under way share it.
    pub(crate) fn request_refresh(&self) -> Option<impl Future<Output = ()> + use<>> {
        let mut early = self.early.lock().expect("early refresh lock");
        let now = Instant::now();
        let fetched = *self.fetched.borrow();
        if fetched >= early.done_at
            && early
                .last
                .is_some_and(|last| now.duration_since(last) < self.min_refresh_interval)
        {
            return None;
        }
        if fetched >= early.done_at {
            early.last = Some(now);
            // A fetch already under way may have started before the kid
            // was published: wait for the end of the one after it.
            early.done_at = fetched + 2 + fetched % 2;
            self.kick.notify_one();
        }
        let target = early.done_at;
        let mut receiver = self.fetched.subscribe();
        Some(async move {
            let _ = receiver.wait_for(|count| *count >= target).await;
        })
    }

    /// Fetches the set until `stop`: at once, then every
    /// `auth.jwks_refresh_interval` (±10%), early when asked. Until the first
    /// success it retries after 1 s, doubling up to the interval.
    pub(crate) async fn run(self: Arc<Self>, metrics: Metrics, stop: CancellationToken) {
        let mut retry = Duration::from_secs(1);
        let mut trigger = "startup";
        loop {
            self.fetched.send_modify(|count| *count += 1);
            let ok = self.fetch(&metrics, trigger).await;
            self.fetched.send_modify(|count| *count += 1);
            let wait = if ok || self.is_ready() {
                retry = Duration::from_secs(1);
                jittered(self.refresh_interval)
            } else {
                let wait = retry.min(self.refresh_interval);
                retry = (retry * 2).min(self.refresh_interval);
                wait
            };
            trigger = tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => "interval",
                () = self.kick.notified() => "unknown_kid",
            };
        }
    }

    /// One fetch: swaps in the new set, or keeps the old one and says why.
    async fn fetch(&self, metrics: &Metrics, trigger: &'static str) -> bool {
        let outcome = match self.fetcher.get().await {
            Err(error) => Err((error.outcome(), error.to_string())),
            Ok(body) => KeySet::parse(&body, &self.algorithms)
                .map_err(|error| ("invalid", error.to_string())),
        };
        match outcome {
            Ok((set, skipped)) => {
                if skipped > 0 {
                    tracing::warn!(
                        url = self.fetcher.display(),
                        skipped,
                        "JWKS keys skipped: no kid, not for signing, symmetric, or an algorithm not in auth.algorithms"
                    );
                }
                tracing::debug!(
                    url = self.fetcher.display(),
                    keys = set.len(),
                    trigger,
                    "JWKS fetched"
                );
                metrics.jwks_fetched(trigger, "ok", set.len());
                self.keys.store(Some(Arc::new(set)));
                true
            }
            Err((outcome, why)) => {
                tracing::warn!(
                    url = self.fetcher.display(),
                    trigger,
                    error = %why,
                    kept = self.is_ready(),
                    "JWKS fetch failed; keeping the last good key set"
                );
                metrics.jwks_fetched(trigger, outcome, 0);
                false
            }
        }
    }
}

/// `interval` ±10%, so that nodes started together do not fetch together.
fn jittered(interval: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let _ = getrandom::fill(&mut byte);
    interval.mul_f64(0.9 + 0.2 * f64::from(byte[0]) / 255.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const EC_X: &str = "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU";
    const EC_Y: &str = "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0";

    fn ec(kid: &str) -> Value {
        json!({"kty": "EC", "kid": kid, "crv": "P-256", "x": EC_X, "y": EC_Y})
    }

    #[test]
    fn keys_are_kept_by_kid_and_unusable_ones_skipped() {
        let document = json!({"keys": [
            ec("a"),
            ec("a"),
            {"kty": "EC", "crv": "P-256", "x": EC_X, "y": EC_Y},
            {"kty": "oct", "kid": "secret", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"},
            {"kty": "EC", "kid": "enc", "use": "enc", "crv": "P-256", "x": EC_X, "y": EC_Y},
            {"kty": "EC", "kid": "rsa-alg", "alg": "RS256", "crv": "P-256", "x": EC_X, "y": EC_Y},
            {"kty": "EC", "kid": "oaep", "alg": "RSA-OAEP", "crv": "P-256", "x": EC_X, "y": EC_Y},
            {"kty": "XYZ", "kid": "odd"},
            "not a key",
            {"kty": "EC", "kid": "b", "alg": "ES256", "crv": "P-256", "x": EC_X, "y": EC_Y},
        ]});
        let bytes = serde_json::to_vec(&document).unwrap();
        let (set, skipped) = KeySet::parse(&bytes, &[Algorithm::ES256, Algorithm::RS256]).unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(skipped, 8);
        assert!(set.get("a").unwrap().algorithm.is_none());
        assert_eq!(set.get("b").unwrap().algorithm, Some(Algorithm::ES256));
        // Keys for algorithms not configured are not kept.
        assert_eq!(
            KeySet::parse(&bytes, &[Algorithm::EdDSA]).err(),
            Some(KeySetError::NoUsableKey { skipped: 10 })
        );
    }

    #[test]
    fn documents_that_are_not_key_sets_are_refused() {
        for document in [&b"[]"[..], b"{}", b"{\"keys\": 1}", b"nonsense", b""] {
            assert_eq!(
                KeySet::parse(document, &[Algorithm::ES256]).err(),
                Some(KeySetError::NotAKeySet),
                "{:?}",
                String::from_utf8_lossy(document)
            );
        }
    }

    #[test]
    fn the_number_of_keys_is_bounded() {
        let keys: Vec<Value> = (0..MAX_KEYS + 10).map(|i| ec(&format!("k{i}"))).collect();
        let bytes = serde_json::to_vec(&json!({ "keys": keys })).unwrap();
        let (set, skipped) = KeySet::parse(&bytes, &[Algorithm::ES256]).unwrap();
        assert_eq!((set.len(), skipped), (MAX_KEYS, 10));
    }
}
