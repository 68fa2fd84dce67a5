//! JWT verification: a token in, a [`Principal`] or a typed [`AuthError`] out.
//! [`Authenticator::authenticate`] is pure: no I/O once the authenticator is
//! built from configuration. With `auth.jwks_url` the keys come from a JSON
//! Web Key Set that [`jwks`] keeps fresh in the background;
//! [`Authenticator::authenticate_waiting`] then also waits, briefly and
//! rate-limited, for a key set that may hold a `kid` not seen yet.
//!
//! The accepted algorithms come from `auth.algorithms` only. The token's header
//! selects among them and never widens them; `none` is never accepted, and an
//! HMAC token is checked against `auth.hmac_secret` only, never against a
//! public key, which defeats key-confusion tokens. A JWKS key verifies only
//! tokens of its own family, and of its own `alg` when it names one.

mod fetch;
pub(crate) mod jwks;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Deserialize;
use serde_json::Value;

use crate::channel::{Pattern, SubjectTemplate};
use crate::config::{AuthConfig, ConfigError};
use crate::metrics::Metrics;
use jwks::Jwks;
use tokio_util::sync::CancellationToken;

/// An authenticated client.
#[derive(Clone, Debug)]
pub struct Principal {
    /// The token's `sub`.
    pub user: Arc<str>,
    /// Channel patterns this connection may subscribe to.
    pub grants: Arc<[Pattern]>,
    /// Channel patterns this connection may publish to.
    pub publish_grants: Arc<[Pattern]>,
    /// When the token stops being valid: its `exp` plus the configured leeway,
    /// in seconds since the Unix epoch.
    pub expires_at: u64,
}

impl Principal {
    /// Whether the token allows subscribing to `channel`.
    pub fn may_subscribe(&self, channel: &str) -> bool {
        self.grants.iter().any(|grant| grant.matches(channel))
    }

    /// Whether the token allows subscribing to the pattern `pattern`: some
    /// grant covers every channel the pattern can match.
    pub fn may_subscribe_pattern(&self, pattern: &Pattern) -> bool {
        self.grants.iter().any(|grant| grant.covers(pattern))
    }

    /// Whether the token allows a subscription the session holds: a channel,
    /// or a pattern (a name with `*`).
    pub fn may_hold(&self, subscription: &str) -> bool {
        match subscription.contains('*') {
            true => Pattern::parse(subscription)
                .is_ok_and(|pattern| self.may_subscribe_pattern(&pattern)),
            false => self.may_subscribe(subscription),
        }
    }

    /// Whether the token allows publishing to `channel`.
    pub fn may_publish(&self, channel: &str) -> bool {
        self.publish_grants
            .iter()
            .any(|grant| grant.matches(channel))
    }
}

/// Why a token was refused. [`AuthError::code`] is the stable reason sent to
/// clients and used as the metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token: send Authorization: Bearer, ?token= or the herald.auth.<token> subprotocol")]
    Missing,
    #[error("token is larger than the configured maximum")]
    TooLarge,
    #[error("token is not a well-formed JWT")]
    Malformed,
    #[error("token signature algorithm is not allowed")]
    AlgorithmNotAllowed,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token issuer is not accepted")]
    WrongIssuer,
    #[error("token audience is not accepted")]
    WrongAudience,
    #[error("token lacks the required claim `{0}`")]
    MissingClaim(String),
    #[error("token claim `{0}` has the wrong type")]
    InvalidClaim(String),
    #[error("refreshed token is for a different subject")]
    SubjectChanged,
    #[error("token header has no `kid`, which auth.jwks_url requires")]
    MissingKid,
    #[error("token `kid` names no key of the key set")]
    UnknownKey,
}

impl AuthError {
    /// Every [`AuthError::code`].
    pub const CODES: [&'static str; 14] = [
        "missing_token",
        "token_too_large",
        "malformed_token",
        "algorithm_not_allowed",
        "bad_signature",
        "token_expired",
        "token_not_yet_valid",
        "wrong_issuer",
        "wrong_audience",
        "missing_claim",
        "invalid_claim",
        "subject_changed",
        "missing_kid",
        "unknown_key",
    ];

    /// The stable machine-readable reason.
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_token",
            AuthError::TooLarge => "token_too_large",
            AuthError::Malformed => "malformed_token",
            AuthError::AlgorithmNotAllowed => "algorithm_not_allowed",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "token_expired",
            AuthError::NotYetValid => "token_not_yet_valid",
            AuthError::WrongIssuer => "wrong_issuer",
            AuthError::WrongAudience => "wrong_audience",
            AuthError::MissingClaim(_) => "missing_claim",
            AuthError::InvalidClaim(_) => "invalid_claim",
            AuthError::SubjectChanged => "subject_changed",
            AuthError::MissingKid => "missing_kid",
            AuthError::UnknownKey => "unknown_key",
        }
    }
}

/// Verifies tokens against the configured keys and rules.
pub struct Authenticator {
    /// `auth.algorithms`, parsed.
    algorithms: Vec<Algorithm>,
    /// Key for HS* tokens, when a secret is configured.
    hmac_key: Option<DecodingKey>,
    /// Key for the asymmetric algorithms, when a public key file is configured.
    public_key: Option<DecodingKey>,
    /// Keys for the asymmetric algorithms by `kid`, with `auth.jwks_url`.
    jwks: Option<Arc<Jwks>>,
    /// How long a token with an unknown `kid` waits for an early fetch.
    jwks_wait: Duration,
    /// Leeway, nbf, issuer and audience rules, one per configured algorithm
    /// and allowing only it: jsonwebtoken wants every algorithm of a
    /// validation to fit the key.
    validations: Vec<(Algorithm, Validation)>,
    /// Leeway in seconds, added to `exp` for the connection's expiry.
    leeway: u64,
    channels_claim: String,
    /// `auth.user_channels`, still holding their `{sub}` placeholders.
    user_channels: Vec<SubjectTemplate>,
    publish_claim: String,
    /// `auth.user_publish`, like `user_channels`.
    user_publish: Vec<SubjectTemplate>,
    max_token_bytes: usize,
}

impl Authenticator {
    /// Builds the verifier, reading and parsing the public key file if any.
    pub fn from_config(config: &AuthConfig) -> Result<Authenticator, ConfigError> {
        let mut algorithms = Vec::new();
        for name in &config.algorithms {
            let algorithm: Algorithm = name.parse().map_err(|_| {
                ConfigError::invalid(
                    "auth.algorithms",
                    format!(
                        "unknown algorithm {name:?}; use HS256/384/512, RS256/384/512, PS256/384/512, ES256, ES384 or EdDSA"
                    ),
                )
            })?;
            algorithms.push(algorithm);
        }
        if algorithms.is_empty() {
            return Err(ConfigError::invalid(
                "auth.algorithms",
                "must list at least one algorithm",
            ));
        }
        let wants_hmac = algorithms.iter().any(|a| family(*a) == Family::Hmac);
        let hmac_key = match (&config.hmac_secret, wants_hmac) {
            (Some(secret), true) => {
                if secret.expose().len() < 32 {
                    return Err(ConfigError::invalid(
                        "auth.hmac_secret",
                        "must be at least 32 bytes for HMAC algorithms",
                    ));
                }
                Some(DecodingKey::from_secret(secret.expose().as_bytes()))
            }
            (None, true) => {
                return Err(ConfigError::invalid(
                    "auth.hmac_secret",
                    "is required because auth.algorithms lists an HS* algorithm",
                ));
            }
            (_, false) => None,
        };
        let asymmetric: Vec<Family> = algorithms
            .iter()
            .map(|a| family(*a))
            .filter(|f| *f != Family::Hmac)
            .collect();
        if asymmetric.contains(&Family::Unsupported) {
            return Err(ConfigError::invalid(
                "auth.algorithms",
                format!(
                    "{:?} lists an algorithm herald does not support",
                    config.algorithms
                ),
            ));
        }
        let (public_key, jwks) = match (&config.public_key_file, &config.jwks_url) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    "auth.jwks_url",
                    "set either auth.public_key_file or auth.jwks_url, not both",
                ));
            }
            _ if asymmetric.is_empty() => (None, None),
            (None, None) => {
                return Err(ConfigError::invalid(
                    "auth.public_key_file",
                    "is required, or auth.jwks_url, because auth.algorithms lists an asymmetric algorithm",
                ));
            }
            (Some(path), None) => (Some(public_key(path, &asymmetric)?), None),
            (None, Some(url)) => {
                let fetcher = fetch::Fetcher::new(
                    url,
                    config.jwks_ca_file.as_deref(),
                    config.jwks_timeout,
                    config.jwks_max_bytes,
                )?;
                let jwks = Jwks::new(
                    fetcher,
                    algorithms.clone(),
                    config.jwks_refresh_interval,
                    config.jwks_min_refresh_interval,
                );
                (None, Some(Arc::new(jwks)))
            }
        };
        if config.jwks_ca_file.is_some() && config.jwks_url.is_none() {
            return Err(ConfigError::invalid(
                "auth.jwks_ca_file",
                "is only used with auth.jwks_url",
            ));
        }
        let templates = |key: &str, templates: &[String]| {
            templates
                .iter()
                .map(|template| {
                    SubjectTemplate::parse(template)
                        .map_err(|e| ConfigError::invalid(key, format!("{template:?}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let user_channels = templates("auth.user_channels", &config.user_channels)?;
        let user_publish = templates("auth.user_publish", &config.user_publish)?;

        let mut validation = Validation::new(algorithms[0]);
        validation.leeway = config.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        match &config.issuer {
            Some(issuer) => {
                validation.set_issuer(&[issuer]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &config.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let validations = algorithms
            .iter()
            .map(|algorithm| {
                let mut validation = validation.clone();
                validation.algorithms = vec![*algorithm];
                (*algorithm, validation)
            })
            .collect();

        Ok(Authenticator {
            validations,
            algorithms,
            hmac_key,
            public_key,
            jwks,
            leeway: config.leeway.as_secs(),
            channels_claim: config.channels_claim.clone(),
            user_channels,
            publish_claim: config.publish_claim.clone(),
            user_publish,
            max_token_bytes: config.max_token_bytes,
            jwks_wait: config.jwks_timeout + Duration::from_millis(500),
        })
    }

    /// Verifies `token` and extracts the principal.
    pub fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > self.max_token_bytes {
            return Err(AuthError::TooLarge);
        }
        let header = self.header(token)?;
        if family(header.algorithm) == Family::Hmac {
            let key = self
                .hmac_key
                .as_ref()
                .ok_or(AuthError::AlgorithmNotAllowed)?;
            return self.decode(token, key, header.algorithm);
        }
        let Some(jwks) = &self.jwks else {
            let key = self
                .public_key
                .as_ref()
                .ok_or(AuthError::AlgorithmNotAllowed)?;
            return self.decode(token, key, header.algorithm);
        };
        let kid = header.kid.ok_or(AuthError::MissingKid)?;
        let keys = jwks.keys().ok_or(AuthError::UnknownKey)?;
        let key = keys.get(&kid).ok_or(AuthError::UnknownKey)?;
        if key.key.family() != header.algorithm.family()
            || key.algorithm.is_some_and(|a| a != header.algorithm)
        {
            return Err(AuthError::AlgorithmNotAllowed);
        }
        self.decode(token, &key.key, header.algorithm)
    }

    /// Like [`Authenticator::authenticate`], but a token whose `kid` the key
    /// set lacks first waits for an early fetch of the set (rate-limited by
    /// `auth.jwks_min_refresh_interval`, bounded by `auth.jwks_timeout`): the
    /// identity provider may have just rotated its keys.
    pub async fn authenticate_waiting(&self, token: &str) -> Result<Principal, AuthError> {
        match self.authenticate(token) {
            Err(AuthError::UnknownKey) => {
                let Some(jwks) = &self.jwks else {
                    return Err(AuthError::UnknownKey);
                };
                let Some(fetched) = jwks.request_refresh() else {
                    return Err(AuthError::UnknownKey);
                };
                let _ = tokio::time::timeout(self.jwks_wait, fetched).await;
                self.authenticate(token)
            }
            result => result,
        }
    }

    /// Whether tokens can be verified: false while `auth.jwks_url` has never
    /// been fetched.
    pub fn is_ready(&self) -> bool {
        self.jwks.as_ref().is_none_or(|jwks| jwks.is_ready())
    }

    /// Keeps the key set of `auth.jwks_url` fresh until `stop`. Nothing to do
    /// without one.
    pub fn spawn_refresher(&self, metrics: Metrics, stop: CancellationToken) {
        if let Some(jwks) = &self.jwks {
            tokio::spawn(jwks.clone().run(metrics, stop));
        }
    }

    fn decode(
        &self,
        token: &str,
        key: &DecodingKey,
        algorithm: Algorithm,
    ) -> Result<Principal, AuthError> {
        let (_, validation) = self
            .validations
            .iter()
            .find(|(a, _)| *a == algorithm)
            .ok_or(AuthError::AlgorithmNotAllowed)?;
        let data = jsonwebtoken::decode::<Claims>(token, key, validation).map_err(map_jwt_error)?;
        self.principal(data.claims)
    }

    /// Verifies a refreshed token: it must be valid and for the same subject.
    pub async fn refresh(&self, current: &Principal, token: &str) -> Result<Principal, AuthError> {
        let next = self.authenticate_waiting(token).await?;
        if next.user != current.user {
            return Err(AuthError::SubjectChanged);
        }
        Ok(next)
    }

    /// Reads the header's `alg` ourselves so that `none` and unknown names get a
    /// precise answer, and refuses anything not configured before any key is used.
    fn header(&self, token: &str) -> Result<TokenHeader, AuthError> {
        let header = token.split('.').next().ok_or(AuthError::Malformed)?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header.trim_end_matches('='))
            .map_err(|_| AuthError::Malformed)?;
        #[derive(Deserialize)]
        struct RawHeader {
            alg: String,
            kid: Option<String>,
        }
        let raw: RawHeader = serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed)?;
        let algorithm: Algorithm = raw
            .alg
            .parse()
            .map_err(|_| AuthError::AlgorithmNotAllowed)?;
        if !self.algorithms.contains(&algorithm) {
            return Err(AuthError::AlgorithmNotAllowed);
        }
        Ok(TokenHeader {
            algorithm,
            kid: raw.kid,
        })
    }

    fn principal(&self, claims: Claims) -> Result<Principal, AuthError> {
        let sub = claims
            .sub
            .clone()
            .ok_or_else(|| AuthError::MissingClaim("sub".into()))?;
        let exp = claims
            .exp
            .ok_or_else(|| AuthError::MissingClaim("exp".into()))?;
        let grants = grants(&claims, &self.channels_claim, &self.user_channels, &sub)?;
        let publish_grants =
            grants_or_none(&claims, &self.publish_claim, &self.user_publish, &sub)?;
        Ok(Principal {
            user: sub.into(),
            grants: grants.into(),
            publish_grants: publish_grants.into(),
            expires_at: exp.saturating_add(self.leeway),
        })
    }
}

/// The patterns a claim lists, plus the templates instantiated for `sub`.
fn grants(
    claims: &Claims,
    claim: &str,
    templates: &[SubjectTemplate],
    sub: &str,
) -> Result<Vec<Pattern>, AuthError> {
    let mut grants = Vec::new();
    match claims.rest.get(claim) {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for item in items {
                // A malformed grant refuses the token rather than being guessed at.
                if let Some(pattern) = item.as_str().and_then(|s| Pattern::parse(s).ok()) {
                    grants.push(pattern);
                } else {
                    return Err(AuthError::InvalidClaim(claim.to_owned()));
                }
            }
        }
        Some(_) => return Err(AuthError::InvalidClaim(claim.to_owned())),
    }
    // The subject is escaped into one literal segment, so it matches exactly
    // itself: see `SubjectTemplate`.
    grants.extend(
        templates
            .iter()
            .filter_map(|template| template.instantiate(sub)),
    );
    Ok(grants)
}

/// Like [`grants`], for a claim that usually is absent: no allocation then.
fn grants_or_none(
    claims: &Claims,
    claim: &str,
    templates: &[SubjectTemplate],
    sub: &str,
) -> Result<Vec<Pattern>, AuthError> {
    if templates.is_empty() && !claims.rest.contains_key(claim) {
        return Ok(Vec::new());
    }
    grants(claims, claim, templates, sub)
}

/// What herald reads of a token's header.
struct TokenHeader {
    algorithm: Algorithm,
    kid: Option<String>,
}

/// Reads `auth.public_key_file`, a PEM key of the one asymmetric family
/// `auth.algorithms` lists.
fn public_key(path: &std::path::Path, families: &[Family]) -> Result<DecodingKey, ConfigError> {
    let first = families[0];
    if families.iter().any(|f| *f != first) {
        return Err(ConfigError::invalid(
            "auth.algorithms",
            "may list asymmetric algorithms of one key type only (RSA, EC or Ed25519) with auth.public_key_file; auth.jwks_url allows several",
        ));
    }
    let pem = std::fs::read(path).map_err(|e| {
        ConfigError::invalid(
            "auth.public_key_file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    match first {
        Family::Rsa => DecodingKey::from_rsa_pem(&pem),
        Family::Ec => DecodingKey::from_ec_pem(&pem),
        Family::Ed => DecodingKey::from_ed_pem(&pem),
        Family::Hmac | Family::Unsupported => unreachable!("only asymmetric families"),
    }
    .map_err(|e| {
        ConfigError::invalid(
            "auth.public_key_file",
            format!(
                "{} is not a PEM public key of the configured type: {e}",
                path.display()
            ),
        )
    })
}

/// The claims herald reads. `sub` and `exp` are optional here so that their
/// absence is reported by the validation as `missing_claim`, not as malformed.
#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<u64>,
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Hmac,
    Rsa,
    Ec,
    Ed,
    Unsupported,
}

fn family(algorithm: Algorithm) -> Family {
    use Algorithm::*;
    match algorithm {
        HS256 | HS384 | HS512 => Family::Hmac,
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => Family::Rsa,
        ES256 | ES384 => Family::Ec,
        EdDSA => Family::Ed,
        // Algorithms added to jsonwebtoken later are unknown to herald; they
        // cannot appear in `auth.algorithms` without being listed here.
        _ => Family::Unsupported,
    }
}

fn map_jwt_error(error: jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind;
    match error.into_kind() {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::MissingRequiredClaim(claim) => AuthError::MissingClaim(claim),
        ErrorKind::InvalidClaimFormat(claim) => AuthError::InvalidClaim(claim),
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::UnsupportedAlgorithm => AuthError::AlgorithmNotAllowed,
        // A key that does not fit the algorithm cannot have made the signature.
        ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat => AuthError::BadSignature,
        _ => AuthError::Malformed,
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Mints an HS256 token for `sub` granting `channels`, valid for `ttl`. For
/// `herald token`, `herald dev` and tests.
pub fn mint_hs256(secret: &str, sub: &str, channels: &[String], ttl: Duration) -> String {
    mint_hs256_publishing(secret, sub, channels, &[], ttl)
}

/// Like [`mint_hs256`], also granting publishing to `publish` (the default
/// `auth.publish_claim`, `publish`), when not empty.
pub fn mint_hs256_publishing(
    secret: &str,
    sub: &str,
    channels: &[String],
    publish: &[String],
    ttl: Duration,
) -> String {
    let now = unix_now();
    let mut claims = serde_json::json!({
        "sub": sub,
        "channels": channels,
        "iat": now,
        "exp": now + ttl.as_secs(),
    });
    if !publish.is_empty() {
        claims["publish"] = serde_json::json!(publish);
    }
    sign_hs256(secret, &claims)
}

/// Signs `claims` (a JSON object) into an HS256 token with `secret`. Pure.
pub fn sign_hs256(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing with an in-memory secret cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn authenticator(config: impl FnOnce(&mut AuthConfig)) -> Authenticator {
        let mut auth = AuthConfig {
            hmac_secret: Some(Secret::new(SECRET)),
            ..AuthConfig::default()
        };
        config(&mut auth);
        Authenticator::from_config(&auth).unwrap()
    }

    #[test]
    fn minted_token_round_trips() {
        let auth = authenticator(|_| {});
        let token = mint_hs256(
            SECRET,
            "alice",
            &["prices.*".into()],
            Duration::from_secs(60),
        );
        let principal = auth.authenticate(&token).unwrap();
        assert_eq!(&*principal.user, "alice");
        assert!(principal.may_subscribe("prices.AAPL"));
        assert!(!principal.may_subscribe("news"));
    }

    #[test]
    fn user_channels_substitute_only_safe_subjects() {
        let auth = authenticator(|c| c.user_channels = vec!["user.{sub}.*".into()]);
        let ok = auth
            .authenticate(&mint_hs256(SECRET, "bob", &[], Duration::from_secs(60)))
            .unwrap();
        assert!(ok.may_subscribe("user.bob.inbox"));
        assert!(!ok.may_subscribe("user.eve.inbox"));
        let sneaky = auth
            .authenticate(&mint_hs256(SECRET, "*", &[], Duration::from_secs(60)))
            .unwrap();
        assert!(!sneaky.may_subscribe("user.eve.inbox"));
        // A subject that is a prefix of another's, cut at a separator, gets
        // only its own channels.
        for (subject, foreign) in [
            ("alice", "user.alice=2Ebob.inbox"),
            ("alice.bob", "user.alice.bob.inbox"),
            ("alice*", "user.alice.inbox"),
            ("a/b", "user.a/b.inbox"),
            ("a", "user.a=2Fb.inbox"),
            ("", "user..inbox"),
        ] {
            let principal = auth
                .authenticate(&mint_hs256(SECRET, subject, &[], Duration::from_secs(60)))
                .unwrap();
            assert!(
                !principal.may_subscribe(foreign),
                "{subject:?} got {foreign}"
            );
        }
        let dotted = auth
            .authenticate(&mint_hs256(
                SECRET,
                "alice.bob",
                &[],
                Duration::from_secs(60),
            ))
            .unwrap();
        assert!(dotted.may_subscribe("user.alice=2Ebob.inbox"));
    }

    #[test]
    fn every_error_code_is_listed() {
        let all = [
            AuthError::Missing,
            AuthError::TooLarge,
            AuthError::Malformed,
            AuthError::AlgorithmNotAllowed,
            AuthError::BadSignature,
            AuthError::Expired,
            AuthError::NotYetValid,
            AuthError::WrongIssuer,
            AuthError::WrongAudience,
            AuthError::MissingClaim("x".into()),
            AuthError::InvalidClaim("x".into()),
            AuthError::SubjectChanged,
            AuthError::MissingKid,
            AuthError::UnknownKey,
        ];
        let codes: Vec<&str> = all.iter().map(AuthError::code).collect();
        assert_eq!(codes, AuthError::CODES);
    }

    #[test]
    fn none_and_garbage() {
        let auth = authenticator(|_| {});
        assert_eq!(auth.authenticate("").err(), Some(AuthError::Missing));
        assert_eq!(auth.authenticate("abc").err(), Some(AuthError::Malformed));
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ4IiwiZXhwIjo5OTk5OTk5OTk5fQ.";
        assert_eq!(
            auth.authenticate(none).err(),
            Some(AuthError::AlgorithmNotAllowed)
        );
        let big = "a".repeat(9000);
        assert_eq!(auth.authenticate(&big).err(), Some(AuthError::TooLarge));
    }
}
