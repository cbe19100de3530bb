//! Operator authentication: user tokens, functions (permissions) and who may grant what.
//! Passwords are hashed by [`crate::passwords`].

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use morrigan_protocol::api::audience;

use crate::error::ApiError;
use crate::state::AppState;
use crate::store::IdentityRow;

pub use morrigan_protocol::functions;

/// Identity names: 1-64 of `[A-Za-z0-9_.-]`, anchored (the original's regex was not: S9).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Passwords: 8-1024 characters.
pub fn valid_password(password: &str) -> bool {
    (8..=1024).contains(&password.chars().count())
}

/// Every entry must be a known function (the original accepted anything: S9).
pub fn validate_functions(list: &[String]) -> Result<(), ApiError> {
    for f in list {
        if !functions::ALL.contains(&f.as_str()) {
            return Err(ApiError::bad_request(format!(
                "Unknown function '{f}'. Known functions: {}.",
                functions::ALL.join(", ")
            )));
        }
    }
    Ok(())
}

/// Extracts a bearer token (`Authorization: Bearer <jwt>`, scheme case-insensitive).
pub fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// An authenticated operator: a valid, unrevoked user token whose identity exists.
#[derive(Debug, Clone)]
pub struct User {
    pub identity: IdentityRow,
    /// The `jti` of the token used, so a password change can keep this session.
    pub token_id: String,
}

impl User {
    /// 403 unless the identity holds every function in `required`.
    pub fn require(&self, required: &[&str]) -> Result<(), ApiError> {
        for f in required {
            if !self.identity.functions.iter().any(|g| g == f) {
                return Err(ApiError::forbidden(format!(
                    "This requires the function '{f}'."
                )));
            }
        }
        Ok(())
    }

    /// The functions of `functions` this identity does not hold, quoted, comma-separated.
    fn lacking<'a>(&self, functions: impl IntoIterator<Item = &'a str>) -> Option<String> {
        let mut lacking: Vec<String> = Vec::new();
        for f in functions {
            let quoted = format!("'{f}'");
            if !self.identity.functions.iter().any(|g| g == f) && !lacking.contains(&quoted) {
                lacking.push(quoted);
            }
        }
        (!lacking.is_empty()).then(|| lacking.join(", "))
    }

    /// 403 unless this identity holds every function in `functions`: nobody grants a
    /// function they do not hold (to another identity or, through its id, to itself).
    pub fn may_grant(&self, functions: &[String]) -> Result<(), ApiError> {
        match self.lacking(functions.iter().map(String::as_str)) {
            None => Ok(()),
            Some(list) => Err(ApiError::forbidden(format!(
                "You cannot grant functions you do not hold: {list}."
            ))),
        }
    }

    /// 403 unless this identity holds every function `target` holds: an identity changes or
    /// deletes only identities no more privileged than itself (no password reset of a
    /// superior, no stripping one).
    pub fn may_manage(&self, target: &IdentityRow) -> Result<(), ApiError> {
        match self.lacking(target.functions.iter().map(String::as_str)) {
            None => Ok(()),
            Some(list) => Err(ApiError::forbidden(format!(
                "Identity '{}' holds functions you do not hold: {list}.",
                target.name
            ))),
        }
    }
}

/// How long a verified user token is trusted without checking it again.
pub const USER_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(5);
/// Most tokens cached; past this the cache starts over (operators are few; this bounds memory
/// against a flood of distinct valid tokens).
const USER_CACHE_MAX: usize = 10_000;

/// Recently verified user tokens. A REST call with a cached token costs no signature check and
/// no store read (they were most of a send's CPU). Changes this node makes to identities or
/// their tokens clear it at once; a revocation made on another node of a cluster takes effect
/// here within [`USER_CACHE_TTL`].
#[derive(Default)]
pub struct UserCache {
    entries: dashmap::DashMap<Box<str>, (User, std::time::Instant, i64)>,
}

impl UserCache {
    fn get(&self, token: &str) -> Option<User> {
        let entry = self.entries.get(token)?;
        let (user, at, exp) = &*entry;
        let fresh = at.elapsed() < USER_CACHE_TTL
            && time::OffsetDateTime::now_utc().unix_timestamp() < *exp;
        fresh.then(|| user.clone())
    }

    fn put(&self, token: &str, user: &User, exp: i64) {
        if self.entries.len() >= USER_CACHE_MAX {
            self.entries.clear();
        }
        self.entries
            .insert(token.into(), (user.clone(), std::time::Instant::now(), exp));
    }

    /// Forgets every cached token (after an identity or its tokens changed).
    pub fn clear(&self) {
        self.entries.clear();
    }
}

impl FromRequestParts<AppState> for User {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts).ok_or_else(|| {
            ApiError::unauthorized("A user token is required: 'Authorization: Bearer <token>'.")
        })?;
        if let Some(user) = state.user_cache.get(token) {
            return Ok(user);
        }
        let claims = state
            .tokens
            .verify(token, audience::USER)
            .await
            .map_err(|e| match e {
                crate::tokens::TokenError::Store(s) => ApiError::from(s),
                other => ApiError::unauthorized(format!("Invalid user token: {other}.")),
            })?;
        let now = morrigan_protocol::time_format::now();
        if state.store.live_token(&claims.jti, &now).await?.is_none() {
            return Err(ApiError::unauthorized("The user token has been revoked."));
        }
        let identity = state.store.identity(&claims.sub).await?.ok_or_else(|| {
            ApiError::unauthorized("The identity of this token no longer exists.")
        })?;
        let user = User {
            identity,
            token_id: claims.jti,
        };
        state.user_cache.put(token, &user, claims.exp);
        Ok(user)
    }
}
