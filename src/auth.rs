//! Who may connect, subscribe, publish and call endpoints.
//!
//! Client authentication is off unless `AUTH_JWT_SECRET` (HS256) or
//! `AUTH_JWT_PUBLIC_KEY_FILE` (RS256/ES256) is set. A token comes from the
//! `token` query parameter, an `Authorization: Bearer` header, or the
//! Socket.IO handshake `auth.token`. Its `topics` claim (patterns with `*`)
//! limits subscriptions; its `publish` claim lists the topics the client may
//! publish to from its socket; its optional `info` claim travels with the
//! connection. A connection without a token may instead be admitted by the
//! application back end's connect hook (`backend::hooks`), whose answer
//! builds the same [`Identity`]. Endpoint tokens (`API_TOKEN`, `ADMIN_TOKEN`)
//! are compared in constant time and never open each other's endpoints.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::value::RawValue;

/// A secret setting: never printed, not even by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: String) -> Self {
        Secret(s)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison: the time taken does not depend on where
    /// the first differing byte is.
    pub fn matches(&self, candidate: &str) -> bool {
        let a = self.0.as_bytes();
        let b = candidate.as_bytes();
        let mut diff = (a.len() != b.len()) as u8;
        for (i, x) in a.iter().enumerate() {
            diff |= x ^ b.get(i).copied().unwrap_or(0);
        }
        diff == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A topic pattern: `*` matches any run of characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    pub fn new(p: &str) -> Self {
        Pattern(p.to_string())
    }

    pub fn matches(&self, topic: &str) -> bool {
        glob(self.0.as_bytes(), topic.as_bytes())
    }

    /// The pattern as configured.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn glob(p: &[u8], t: &[u8]) -> bool {
    // Iterative wildcard match with backtracking to the last `*`.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

fn any_match(patterns: &[Pattern], topic: &str) -> bool {
    patterns.iter().any(|p| p.matches(topic))
}

/// What an authenticated (or anonymous) client may do.
#[derive(Debug, Clone)]
pub struct Identity {
    pub subject: Option<String>,
    /// `None`: any topic.
    topics: Option<Vec<Pattern>>,
    publish: Vec<Pattern>,
    public: Vec<Pattern>,
    /// Admitted without a token because public topics are configured.
    anonymous: bool,
    /// The token's `exp` in Unix milliseconds, when it has one.
    expires_at: Option<u64>,
    /// `AUTH_JWT_LEEWAY_MS`: how long after `exp` the connection is closed.
    leeway: Duration,
    /// Application data about the client (the connect hook's `info`, or a
    /// token's `info` claim), handed to the back end with every hook call.
    info: Option<Arc<RawValue>>,
    /// Admitted by the connect hook rather than a token: with client tokens
    /// off such an identity cannot be refreshed (any token would widen it).
    from_hook: bool,
}

impl Identity {
    /// The client's user id: the token's `sub` or the connect hook's
    /// `user`; `""` when anonymous.
    pub fn user(&self) -> &str {
        self.subject.as_deref().unwrap_or("")
    }

    pub fn info(&self) -> Option<&Arc<RawValue>> {
        self.info.as_ref()
    }

    /// Whether the identity names `topic` itself (a `topics` claim or hook
    /// answer that matches it, or `AUTH_PUBLIC_TOPICS`), as opposed to
    /// allowing it only because it allows every topic. A subscribe hook is
    /// skipped only for these.
    pub fn explicitly_allows(&self, topic: &str) -> bool {
        any_match(&self.public, topic) || self.topics.as_ref().is_some_and(|t| any_match(t, topic))
    }

    /// Whether the connect hook admitted this connection.
    pub fn from_connect_hook(&self) -> bool {
        self.from_hook
    }

    pub fn may_subscribe(&self, topic: &str) -> bool {
        any_match(&self.public, topic) || self.topics.as_ref().is_none_or(|t| any_match(t, topic))
    }

    pub fn may_publish(&self, topic: &str) -> bool {
        any_match(&self.publish, topic)
    }

    /// Whether the client presented a token (the proxy needs one when
    /// authentication is on).
    pub fn anonymous(&self) -> bool {
        self.anonymous
    }

    /// The token's `exp` in Unix milliseconds (`None`: it never expires).
    pub fn expires_at(&self) -> Option<u64> {
        self.expires_at
    }

    /// How long from now until the connection must be closed for an
    /// expired token (`exp` + leeway); `None` when the token has no `exp`.
    pub fn time_left(&self) -> Option<Duration> {
        let deadline = self.expires_at? + self.leeway.as_millis() as u64;
        Some(Duration::from_millis(deadline.saturating_sub(unix_ms())))
    }
}

/// Now, in Unix milliseconds.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a token is required: pass ?token=…, an Authorization: Bearer header, or auth.token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error(
        "this connection was admitted by the application back end and client tokens are off on this node: connect again to renew it"
    )]
    NotRefreshable,
    #[error("the application back end admitted the connection with an expiresAt in the past")]
    HookExpired,
}

/// What the connect hook's `result` says about a client, the counterpart of
/// a token's claims.
#[derive(Debug, Clone, Default)]
pub struct HookGrant {
    pub user: Option<String>,
    /// `None`: any topic (like a token without `topics`).
    pub topics: Option<Vec<String>>,
    /// `None`: no topic.
    pub publish: Option<Vec<String>>,
    /// Unix milliseconds, like a token's `exp` (but in ms).
    pub expires_at: Option<u64>,
    pub info: Option<Arc<RawValue>>,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    topics: Option<Vec<String>>,
    #[serde(default)]
    publish: Option<Vec<String>>,
    /// NumericDate: seconds, possibly with a fraction.
    #[serde(default)]
    exp: Option<f64>,
    #[serde(default)]
    nbf: Option<f64>,
    /// Application data about the client; any JSON value.
    #[serde(default)]
    info: Option<serde_json::Value>,
}

/// Checks client tokens. Built from the configuration at start-up.
#[derive(Clone)]
pub struct Authenticator {
    verifier: Option<(DecodingKey, Validation)>,
    public: Vec<Pattern>,
    /// Clock skew allowed on `exp` and `nbf` (`AUTH_JWT_LEEWAY_MS`).
    leeway: Duration,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("enabled", &self.verifier.is_some())
            .field("public", &self.public)
            .field("leeway", &self.leeway)
            .finish()
    }
}

/// How tokens are verified.
pub enum KeySource<'a> {
    Secret(&'a Secret),
    /// PEM of an RSA or EC public key.
    PublicKeyPem(&'a [u8]),
}

impl Authenticator {
    /// Authentication off: everyone may subscribe to anything, nobody publishes.
    pub fn open() -> Self {
        Authenticator {
            verifier: None,
            public: Vec::new(),
            leeway: Duration::ZERO,
        }
    }

    /// Allows `leeway` of clock skew on `exp` and `nbf`, at connect, at
    /// refresh and for the expiry timer.
    pub fn with_leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway;
        self
    }

    pub fn new(
        key: KeySource<'_>,
        audience: Option<&str>,
        issuer: Option<&str>,
        public: Vec<Pattern>,
    ) -> Result<Self, String> {
        let (key, algorithms) = match key {
            KeySource::Secret(s) => (
                DecodingKey::from_secret(s.expose().as_bytes()),
                vec![Algorithm::HS256],
            ),
            KeySource::PublicKeyPem(pem) => {
                if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
                    (k, vec![Algorithm::RS256])
                } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
                    (k, vec![Algorithm::ES256])
                } else {
                    return Err("not a PEM RSA or EC (P-256) public key".into());
                }
            }
        };
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms;
        // `exp` and `nbf` are checked when present, by `authenticate` with
        // millisecond precision and `AUTH_JWT_LEEWAY_MS` (jsonwebtoken's
        // leeway is whole seconds).
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        // A configured audience or issuer is required: a token without the
        // claim is refused, not waved through.
        match audience {
            Some(a) => {
                validation.set_audience(&[a]);
                validation.required_spec_claims.insert("aud".into());
            }
            None => validation.validate_aud = false,
        }
        if let Some(i) = issuer {
            validation.set_issuer(&[i]);
            validation.required_spec_claims.insert("iss".into());
        }
        Ok(Authenticator {
            verifier: Some((key, validation)),
            public,
            leeway: Duration::ZERO,
        })
    }

    pub fn enabled(&self) -> bool {
        self.verifier.is_some()
    }

    /// Checks `token`. Without one, a client is let in only when public
    /// topics are configured, and may then subscribe to those alone.
    pub fn authenticate(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        let Some((key, validation)) = &self.verifier else {
            return Ok(Identity {
                subject: None,
                topics: None,
                publish: Vec::new(),
                public: Vec::new(),
                anonymous: false,
                expires_at: None,
                leeway: self.leeway,
                info: None,
                from_hook: false,
            });
        };
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            if self.public.is_empty() {
                return Err(AuthError::Missing);
            }
            return Ok(Identity {
                subject: None,
                topics: Some(Vec::new()),
                publish: Vec::new(),
                public: self.public.clone(),
                anonymous: true,
                expires_at: None,
                leeway: self.leeway,
                info: None,
                from_hook: false,
            });
        };
        let data = jsonwebtoken::decode::<Claims>(token, key, validation)
            .map_err(|e| AuthError::Invalid(describe(&e)))?;
        let c = data.claims;
        let now = unix_ms() as f64;
        let leeway = self.leeway.as_millis() as f64;
        let expires_at = c.exp.map(|exp| (exp * 1000.0).max(0.0) as u64);
        if let Some(exp) = expires_at
            && now >= exp as f64 + leeway
        {
            return Err(AuthError::Invalid("the token has expired".into()));
        }
        if let Some(nbf) = c.nbf
            && nbf * 1000.0 > now + leeway
        {
            return Err(AuthError::Invalid(
                "the token is not valid yet (nbf)".into(),
            ));
        }
        Ok(Identity {
            subject: c.sub,
            topics: c
                .topics
                .map(|t| t.iter().map(|p| Pattern::new(p)).collect()),
            publish: c
                .publish
                .unwrap_or_default()
                .iter()
                .map(|p| Pattern::new(p))
                .collect(),
            public: self.public.clone(),
            anonymous: false,
            expires_at,
            leeway: self.leeway,
            info: c
                .info
                .filter(|v| !v.is_null())
                .and_then(|v| serde_json::value::to_raw_value(&v).ok())
                .map(Arc::from),
            from_hook: false,
        })
    }

    /// Whether a client without a token (`token` absent or empty) goes to
    /// the connect hook instead of [`Authenticator::authenticate`]: always
    /// when client tokens are off, and when they are on for a client that
    /// brings none. A client with a token keeps the token rules.
    pub fn wants_hook(&self, token: Option<&str>) -> bool {
        !self.enabled() || token.is_none_or(str::is_empty)
    }

    /// The identity the connect hook's answer gives: exactly what a token
    /// with `sub`/`topics`/`publish`/`exp`/`info` would give (public
    /// topics included, expiry with the same leeway).
    pub fn from_hook(&self, grant: HookGrant) -> Result<Identity, AuthError> {
        if let Some(at) = grant.expires_at
            && unix_ms() >= at + self.leeway.as_millis() as u64
        {
            return Err(AuthError::HookExpired);
        }
        let patterns = |v: Vec<String>| v.iter().map(|p| Pattern::new(p)).collect::<Vec<_>>();
        Ok(Identity {
            subject: grant.user.filter(|u| !u.is_empty()),
            topics: grant.topics.map(patterns),
            publish: grant.publish.map(patterns).unwrap_or_default(),
            public: self.public.clone(),
            anonymous: false,
            expires_at: grant.expires_at,
            leeway: self.leeway,
            info: grant.info,
            from_hook: true,
        })
    }

    /// The identity a `refresh` with `token` gives `current`. A connection
    /// admitted by the connect hook cannot be refreshed while client tokens
    /// are off: every token would be accepted and widen it to any topic.
    pub fn refresh(&self, current: &Identity, token: &str) -> Result<Identity, AuthError> {
        if !self.enabled() && current.from_hook {
            return Err(AuthError::NotRefreshable);
        }
        self.authenticate(Some(token))
    }
}

fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => "the token has expired".into(),
        K::ImmatureSignature => "the token is not valid yet (nbf)".into(),
        K::InvalidSignature => "the signature does not verify".into(),
        K::InvalidAudience => "wrong audience (aud)".into(),
        K::InvalidIssuer => "wrong issuer (iss)".into(),
        K::InvalidAlgorithm => "algorithm not accepted".into(),
        K::MissingRequiredClaim(c) => format!("the required claim {c} is missing"),
        _ => "malformed token".into(),
    }
}

/// The client token of an HTTP handshake: `token` query parameter first,
/// then `Authorization: Bearer`.
pub fn token_from(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    if let Some(q) = query {
        for pair in q.split('&') {
            if let Some(v) = pair.strip_prefix("token=") {
                return Some(v.to_string());
            }
        }
    }
    bearer(headers)
}

/// The value of `Authorization: Bearer …`.
pub fn bearer(headers: &HeaderMap) -> Option<String> {
    let h = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, value) = h.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| value.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn token(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn auth() -> Authenticator {
        Authenticator::new(
            KeySource::Secret(&Secret::new("s3cret".into())),
            None,
            None,
            Vec::new(),
        )
        .unwrap()
    }

    #[test]
    fn patterns() {
        let p = Pattern::new("news.*");
        assert!(p.matches("news.sports"));
        assert!(p.matches("news."));
        assert!(!p.matches("news"));
        assert!(!p.matches("admin"));
        assert!(Pattern::new("*").matches("anything"));
        assert!(Pattern::new("a*b*c").matches("aXbYc"));
        assert!(!Pattern::new("a*b*c").matches("aXbY"));
        assert!(Pattern::new("exact").matches("exact"));
    }

    #[test]
    fn tokens_are_checked() {
        let a = auth();
        assert_eq!(a.authenticate(None).unwrap_err(), AuthError::Missing);
        let good = token(
            json!({"sub":"u","exp": now() + 60, "topics":["news.*"]}),
            "s3cret",
        );
        let id = a.authenticate(Some(&good)).unwrap();
        assert!(id.may_subscribe("news.sports"));
        assert!(!id.may_subscribe("admin"));
        assert!(!id.may_publish("news.sports"));
        let expired = token(json!({"exp": now() - 10}), "s3cret");
        assert!(
            matches!(a.authenticate(Some(&expired)), Err(AuthError::Invalid(m)) if m.contains("expired"))
        );
        let forged = token(json!({"exp": now() + 60}), "other");
        assert!(a.authenticate(Some(&forged)).is_err());
        let early = token(json!({"nbf": now() + 600}), "s3cret");
        assert!(a.authenticate(Some(&early)).is_err());
        assert!(a.authenticate(Some("garbage")).is_err());
        let open = token(json!({"publish":["chat.*"]}), "s3cret");
        let id = a.authenticate(Some(&open)).unwrap();
        assert!(id.may_subscribe("anything"), "no topics claim: any topic");
        assert!(id.may_publish("chat.room1"));
    }

    #[test]
    fn expiry_and_leeway() {
        let ms = unix_ms();
        let a = auth();
        let id = a
            .authenticate(Some(&token(json!({"exp": now() + 60}), "s3cret")))
            .unwrap();
        assert_eq!(id.expires_at(), Some((now() + 60) * 1000));
        let left = id.time_left().unwrap();
        assert!(left > Duration::from_secs(58) && left <= Duration::from_secs(60));
        let never = a.authenticate(Some(&token(json!({}), "s3cret"))).unwrap();
        assert_eq!(never.time_left(), None);
        // Expired 2 s ago: refused without leeway, accepted with 5 s.
        let stale = token(json!({"exp": ms / 1000 - 2}), "s3cret");
        assert!(a.authenticate(Some(&stale)).is_err());
        let lenient = auth().with_leeway(Duration::from_secs(5));
        let id = lenient.authenticate(Some(&stale)).unwrap();
        assert!(id.time_left().unwrap() <= Duration::from_secs(3));
        let early = token(json!({"nbf": ms / 1000 + 2}), "s3cret");
        assert!(a.authenticate(Some(&early)).is_err());
        assert!(lenient.authenticate(Some(&early)).is_ok());
    }

    #[test]
    fn configured_audience_and_issuer_are_required() {
        let a = Authenticator::new(
            KeySource::Secret(&Secret::new("s3cret".into())),
            Some("switchboard"),
            Some("issuer-1"),
            Vec::new(),
        )
        .unwrap();
        let ok = token(json!({"aud":"switchboard","iss":"issuer-1"}), "s3cret");
        assert!(a.authenticate(Some(&ok)).is_ok());
        for claims in [
            json!({"iss":"issuer-1"}),
            json!({"aud":"switchboard"}),
            json!({"aud":"other","iss":"issuer-1"}),
        ] {
            assert!(
                a.authenticate(Some(&token(claims.clone(), "s3cret")))
                    .is_err(),
                "{claims}"
            );
        }
    }

    #[test]
    fn public_topics_admit_anonymous_clients_to_those_only() {
        let a = Authenticator::new(
            KeySource::Secret(&Secret::new("k".into())),
            None,
            None,
            vec![Pattern::new("public.*")],
        )
        .unwrap();
        let anon = a.authenticate(None).unwrap();
        assert!(anon.may_subscribe("public.news"));
        assert!(!anon.may_subscribe("private"));
    }

    #[test]
    fn hook_grants_build_identities_like_tokens() {
        let a = auth();
        let id = a
            .from_hook(HookGrant {
                user: Some("u1".into()),
                topics: Some(vec!["room.*".into()]),
                publish: Some(vec!["chat.*".into()]),
                expires_at: Some(unix_ms() + 60_000),
                info: Some(Arc::from(
                    RawValue::from_string(r#"{"n":1}"#.into()).unwrap(),
                )),
            })
            .unwrap();
        assert_eq!(id.user(), "u1");
        assert!(id.may_subscribe("room.1") && !id.may_subscribe("other"));
        assert!(id.explicitly_allows("room.1"));
        assert!(id.may_publish("chat.x") && !id.may_publish("room.1"));
        assert_eq!(id.info().unwrap().get(), r#"{"n":1}"#);
        assert!(id.time_left().unwrap() > Duration::from_secs(58));
        let any = a.from_hook(HookGrant::default()).unwrap();
        assert_eq!(any.user(), "");
        assert!(any.may_subscribe("x") && !any.explicitly_allows("x"));
        assert!(!any.may_publish("x"));
        let stale = HookGrant {
            expires_at: Some(unix_ms() - 1000),
            ..Default::default()
        };
        assert_eq!(a.from_hook(stale).unwrap_err(), AuthError::HookExpired);
        // Tokens off: a hook identity is not refreshable, a plain one is.
        let open = Authenticator::open();
        let hooked = open.from_hook(HookGrant::default()).unwrap();
        assert_eq!(
            open.refresh(&hooked, "x").unwrap_err(),
            AuthError::NotRefreshable
        );
        assert!(open.refresh(&open.authenticate(None).unwrap(), "x").is_ok());
        assert!(open.wants_hook(Some("t")) && a.wants_hook(None) && !a.wants_hook(Some("t")));
        // The `info` claim of a token.
        let t = token(json!({"sub":"u","info":{"plan":"pro"}}), "s3cret");
        let id = a.authenticate(Some(&t)).unwrap();
        assert_eq!(id.info().unwrap().get(), r#"{"plan":"pro"}"#);
    }

    #[test]
    fn secrets_compare_and_never_print() {
        let s = Secret::new("abc".into());
        assert!(s.matches("abc"));
        assert!(!s.matches("abd"));
        assert!(!s.matches("ab"));
        assert!(!s.matches("abcd"));
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
    }

    #[test]
    fn token_sources() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer xyz".parse().unwrap());
        assert_eq!(token_from(&h, None).as_deref(), Some("xyz"));
        assert_eq!(
            token_from(&h, Some("a=1&token=qqq")).as_deref(),
            Some("qqq")
        );
        assert_eq!(token_from(&HeaderMap::new(), Some("a=1")), None);
    }
}
