//! Token issue and verification.
//!
//! Every token is an EdDSA (Ed25519) JWT. The header's `kid` names the issuing node's signing
//! key; its public half is in the store, so any node of a cluster verifies any node's tokens
//! (and `/.well-known/jwks.json` publishes them). Claims: `sub`, `iss` (node id), `aud` (the
//! token kind), `iat`, `exp`, `jti`, and `reportUrl` on connection tokens.
//!
//! The keys are parsed once: jsonwebtoken takes keys as bytes and re-derives them on every
//! call (for Ed25519 a point compression per sign and a decompression per verify), so signing
//! and the signature check use ed25519-dalek with the parsed keys directly and no curve work
//! is repeated per token. jsonwebtoken still reads the header, and the output is byte-for-byte
//! what `jsonwebtoken::encode` produces (a test pins it).
//!
//! A signature is necessary but not sufficient: user and identity tokens must also still have
//! their record (revocation deletes it), and connection tokens are consumed by
//! [`crate::store::ConnectionStore::accept_connection`]. Those checks live with the callers.
//!
//! The connect path proves possession without a signature check: identity and connection
//! tokens are stored with the SHA-256 of their text ([`digest`]) when issued, and the one
//! statement that must run anyway (the pending record's insert, the accept's conditional
//! update) also requires that digest ([`Tokens::presented`]). A token's text matching what was
//! issued is what a valid signature proves, for the price of a SHA-256 instead of a curve
//! operation; the signature is still checked on every refusal (to say why) and for tokens
//! recorded without a digest (by a release that kept none).

use std::path::Path;
use std::sync::{Arc, RwLock};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use jsonwebtoken::{Algorithm, Header};
use morrigan_protocol::api::{Claims, audience};
use std::collections::HashMap;

use crate::store::{KeyStore, SigningKeyRow, StoreError, TokenKind, TokenRow};

/// Clock skew tolerated on `exp`/`iat`, in seconds. jsonwebtoken's default (60 s) would double
/// a 60-second connection token, so it is set explicitly.
pub const LEEWAY_SECS: u64 = 2;

/// Longer tokens are refused unread; ours are under 600 bytes.
const MAX_TOKEN_LEN: usize = 4096;

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token is signed by an unknown key")]
    UnknownKey,
    #[error("token signature, audience or expiry is invalid")]
    Invalid,
    #[error("token has expired")]
    Expired,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl TokenError {
    /// The refusal reason as metrics label it (a fixed set).
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed",
            TokenError::UnknownKey => "unknown_key",
            TokenError::Invalid => "invalid",
            TokenError::Expired => "expired",
            TokenError::Store(_) => "store_error",
        }
    }
}

/// The record of a token just issued: its claims and the digest of its text, so that only
/// this exact text is accepted as it (see [`digest`]).
pub fn token_row(kind: TokenKind, issued: &Issued) -> TokenRow {
    let claims = &issued.claims;
    let at = |t: i64| {
        time::OffsetDateTime::from_unix_timestamp(t)
            .map(morrigan_protocol::time_format::format)
            .unwrap_or_default()
    };
    TokenRow {
        id: claims.jti.clone(),
        kind,
        subject: claims.sub.clone(),
        issuer: claims.iss.clone(),
        issued: at(claims.iat),
        expires: at(claims.exp),
        digest: Some(digest(&issued.token)),
    }
}

/// Failure to load or create the node's signing key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("signing key file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("signing key file {path} is not a PKCS#8 Ed25519 key")]
    Format { path: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Signs tokens with this node's key and verifies anyone's.
pub struct Tokens {
    node_id: String,
    kid: String,
    signing: SigningKey,
    /// `base64url(header).`: the same for every token this node signs.
    header_prefix: String,
    public_key: [u8; 32],
    /// Verification keys by kid, filled from the store on a miss. Read-mostly.
    keys: RwLock<HashMap<String, Arc<VerifyingKey>>>,
    store: Arc<dyn KeyStore>,
    /// Counts issues and refusals (`morrigan_tokens_issued_total`, `..._token_refusals_total`).
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// A freshly issued token.
#[derive(Debug, Clone)]
pub struct Issued {
    pub token: String,
    pub claims: Claims,
}

/// A token as presented, before the store has vouched for it: see [`Tokens::presented`].
#[derive(Debug, Clone)]
pub struct Presented {
    /// The payload as presented. Trusted only once the store has matched `digest`.
    pub claims: Claims,
    /// [`digest`] of the token's text.
    pub digest: String,
}

/// The SHA-256 of a token's text, base64url: what the store keeps to recognise the token.
pub fn digest(token: &str) -> String {
    use sha2::Digest;
    URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(token.as_bytes()))
}

/// The `kind` label of an audience.
fn kind_label(aud: &str) -> &'static str {
    match aud {
        audience::USER => "user",
        audience::IDENTITY => "identity",
        audience::CONNECTION => "connection",
        _ => "other",
    }
}

/// The claims of a JWT whose signature has been checked, if its audience is `aud` and it has
/// not expired (with [`LEEWAY_SECS`]). `Claims` requires sub, iss, aud, iat, exp and jti: a
/// token without them is malformed.
fn valid_claims(token: &str, aud: &str) -> Result<Claims, TokenError> {
    let payload = token.split('.').nth(1).ok_or(TokenError::Malformed)?;
    let payload = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| TokenError::Malformed)?;
    let claims: Claims = serde_json::from_slice(&payload).map_err(|_| TokenError::Malformed)?;
    if claims.aud != aud {
        return Err(TokenError::Invalid);
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if claims.exp.saturating_add(LEEWAY_SECS as i64) < now {
        return Err(TokenError::Expired);
    }
    Ok(claims)
}

fn kid_for(public_key: &[u8; 32]) -> String {
    URL_SAFE_NO_PAD.encode(&public_key[..12])
}

impl Tokens {
    /// Loads the node's signing key from `<data_dir>/signing-key.pem`, creating it (mode 0600)
    /// on first start, and publishes its public half in the store.
    pub async fn load_or_create(
        data_dir: &Path,
        node_id: &str,
        store: Arc<dyn KeyStore>,
    ) -> Result<Self, KeyError> {
        let path = data_dir.join("signing-key.pem");
        let path_str = path.display().to_string();
        let signing = match std::fs::read_to_string(&path) {
            Ok(pem) => SigningKey::from_pkcs8_pem(&pem).map_err(|_| KeyError::Format {
                path: path_str.clone(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = SigningKey::generate(&mut rand::rngs::OsRng);
                let pem = key
                    .to_pkcs8_pem(Default::default())
                    .map_err(|_| KeyError::Format {
                        path: path_str.clone(),
                    })?;
                morrigan_files::write_private(&path, pem.as_bytes()).map_err(|source| {
                    KeyError::Io {
                        path: path_str.clone(),
                        source,
                    }
                })?;
                key
            }
            Err(source) => {
                return Err(KeyError::Io {
                    path: path_str,
                    source,
                });
            }
        };
        Self::from_key(signing, node_id, store).await
    }

    /// Builds from an in-memory key (tests, benchmarks).
    pub async fn from_key(
        signing: SigningKey,
        node_id: &str,
        store: Arc<dyn KeyStore>,
    ) -> Result<Self, KeyError> {
        let public_key = signing.verifying_key().to_bytes();
        let kid = kid_for(&public_key);
        store
            .put_signing_key(&SigningKeyRow {
                kid: kid.clone(),
                node_id: node_id.to_string(),
                public_key: public_key.to_vec(),
                created: morrigan_protocol::time_format::now(),
            })
            .await?;
        let mut keys = HashMap::new();
        keys.insert(kid.clone(), Arc::new(signing.verifying_key()));
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.clone());
        let header = serde_json::to_vec(&header).map_err(|_| KeyError::Format {
            path: "<memory>".into(),
        })?;
        Ok(Self {
            node_id: node_id.to_string(),
            kid,
            header_prefix: format!("{}.", URL_SAFE_NO_PAD.encode(header)),
            signing,
            public_key,
            keys: RwLock::new(keys),
            store,
            metrics: None,
        })
    }

    /// Counts issued and refused tokens in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Counts a refusal decided after verification (revoked, replayed, ...).
    pub fn refused(&self, aud: &str, reason: &'static str) {
        if let Some(m) = &self.metrics {
            m.token_refused(kind_label(aud), reason);
        }
    }

    /// This node's key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// This node's public key.
    pub fn public_key(&self) -> &[u8; 32] {
        &self.public_key
    }

    /// Issues a token for `sub` with audience `aud`, valid for `ttl_secs`.
    pub fn issue(
        &self,
        aud: &str,
        sub: &str,
        ttl_secs: u64,
        report_url: Option<String>,
    ) -> Result<Issued, TokenError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = Claims {
            sub: sub.to_string(),
            iss: self.node_id.clone(),
            aud: aud.to_string(),
            iat: now,
            exp: now.saturating_add(i64::try_from(ttl_secs).unwrap_or(i64::MAX)),
            jti: uuid::Uuid::new_v4().to_string(),
            report_url,
        };
        let payload = serde_json::to_vec(&claims).map_err(|_| TokenError::Malformed)?;
        let mut token = self.header_prefix.clone();
        URL_SAFE_NO_PAD.encode_string(payload, &mut token);
        let signature = self.signing.sign(token.as_bytes());
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(signature.to_bytes(), &mut token);
        if let Some(m) = &self.metrics {
            m.token_issued(kind_label(aud));
        }
        Ok(Issued { token, claims })
    }

    async fn verifying_key(&self, kid: &str) -> Result<Arc<VerifyingKey>, TokenError> {
        if let Ok(keys) = self.keys.read()
            && let Some(k) = keys.get(kid)
        {
            return Ok(k.clone());
        }
        // Bound what a peer can make us look up: kids are short base64url strings.
        if kid.len() > 64 {
            return Err(TokenError::UnknownKey);
        }
        let row = self
            .store
            .signing_key(kid)
            .await?
            .ok_or(TokenError::UnknownKey)?;
        let bytes: [u8; 32] = row
            .public_key
            .as_slice()
            .try_into()
            .map_err(|_| TokenError::UnknownKey)?;
        let key = Arc::new(VerifyingKey::from_bytes(&bytes).map_err(|_| TokenError::UnknownKey)?);
        if let Ok(mut keys) = self.keys.write() {
            keys.insert(kid.to_string(), key.clone());
        }
        Ok(key)
    }

    /// Verifies signature, audience and expiry (with [`LEEWAY_SECS`]).
    pub async fn verify(&self, token: &str, aud: &str) -> Result<Claims, TokenError> {
        let result = self.verify_inner(token, aud).await;
        if let (Err(e), Some(m)) = (&result, &self.metrics) {
            m.token_refused(kind_label(aud), e.reason());
        }
        result
    }

    async fn verify_inner(&self, token: &str, aud: &str) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        self.check_signature(token).await?;
        valid_claims(token, aud)
    }

    /// Audience, expiry and digest of a token whose signature is *not* checked here: the
    /// caller's store statement requires the digest recorded when the token was issued, which
    /// proves the text (claims and signature) is exactly what a node signed. A token refused
    /// here is refused by [`Tokens::verify`], whose error (and refusal count) it returns: the
    /// signature comes first in saying why.
    pub async fn presented(&self, token: &str, aud: &str) -> Result<Presented, TokenError> {
        let read = || -> Result<Presented, TokenError> {
            if token.len() > MAX_TOKEN_LEN {
                return Err(TokenError::Malformed);
            }
            Ok(Presented {
                claims: valid_claims(token, aud)?,
                digest: digest(token),
            })
        };
        match read() {
            Ok(p) => Ok(p),
            Err(e) => Err(self.verify(token, aud).await.err().unwrap_or(e)),
        }
    }

    /// Header, key and signature: nothing in the payload is trusted before this holds.
    async fn check_signature(&self, token: &str) -> Result<(), TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::EdDSA {
            return Err(TokenError::Invalid);
        }
        let kid = header.kid.ok_or(TokenError::Malformed)?;
        let key = self.verifying_key(&kid).await?;
        let (message, signature) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TokenError::Malformed)?;
        let signature = Signature::from_slice(&signature).map_err(|_| TokenError::Malformed)?;
        // `verify`, not `verify_strict` (whose extra checks cost more per token): the keys are
        // our nodes' own, and a malleated signature would carry the same claims, so the same
        // `jti` and record.
        key.verify(message.as_bytes(), &signature)
            .map_err(|_| TokenError::Invalid)
    }

    /// The JSON Web Key Set of every signing key in the store.
    pub async fn jwks(&self) -> Result<serde_json::Value, StoreError> {
        let keys = self.store.signing_keys().await?;
        let keys: Vec<_> = keys
            .iter()
            .map(|k| {
                serde_json::json!({
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "alg": "EdDSA",
                    "use": "sig",
                    "kid": k.kid,
                    "x": URL_SAFE_NO_PAD.encode(&k.public_key),
                })
            })
            .collect();
        Ok(serde_json::json!({ "keys": keys }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;

    async fn tokens(seed: u8) -> Tokens {
        let store = SqliteStore::connect("sqlite::memory:")
            .await
            .expect("store");
        Tokens::from_key(
            SigningKey::from_bytes(&[seed; 32]),
            "node-a",
            Arc::new(store),
        )
        .await
        .expect("tokens")
    }

    fn sign_with(t: &Tokens, claims: &Claims) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(t.kid.clone());
        let der = t.signing.to_pkcs8_der().expect("der");
        jsonwebtoken::encode(
            &header,
            claims,
            &jsonwebtoken::EncodingKey::from_ed_der(der.as_bytes()),
        )
        .expect("encode")
    }

    #[tokio::test]
    async fn issued_tokens_are_what_jsonwebtoken_would_sign() {
        let t = tokens(7).await;
        let issued = t
            .issue(
                audience::CONNECTION,
                "c-1",
                60,
                Some("http://x/connect".into()),
            )
            .expect("issue");
        assert_eq!(issued.token, sign_with(&t, &issued.claims));
        let claims = t
            .verify(&issued.token, audience::CONNECTION)
            .await
            .expect("verify");
        assert_eq!(claims.jti, issued.claims.jti);
        assert_eq!(claims.report_url.as_deref(), Some("http://x/connect"));
    }

    #[tokio::test]
    async fn refusals() {
        let t = tokens(7).await;
        let issued = t.issue(audience::IDENTITY, "dev", 60, None).expect("issue");
        // Another audience.
        assert!(matches!(
            t.verify(&issued.token, audience::USER).await,
            Err(TokenError::Invalid)
        ));
        // A changed payload (the signature no longer holds).
        let mut forged = issued.claims.clone();
        forged.sub = "someone-else".into();
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).expect("json"));
        let parts: Vec<&str> = issued.token.split('.').collect();
        let tampered = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        assert!(matches!(
            t.verify(&tampered, audience::IDENTITY).await,
            Err(TokenError::Invalid)
        ));
        // Signed by a key the store does not know, under this node's kid.
        let stranger = tokens(9).await;
        let mut claims = issued.claims.clone();
        claims.jti = "other".into();
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(t.kid.clone());
        let der = stranger.signing.to_pkcs8_der().expect("der");
        let foreign = jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_ed_der(der.as_bytes()),
        )
        .expect("encode");
        assert!(matches!(
            t.verify(&foreign, audience::IDENTITY).await,
            Err(TokenError::Invalid)
        ));
        // Expired beyond the leeway; within it still valid.
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut old = issued.claims.clone();
        old.exp = now - LEEWAY_SECS as i64 - 5;
        assert!(matches!(
            t.verify(&sign_with(&t, &old), audience::IDENTITY).await,
            Err(TokenError::Expired)
        ));
        old.exp = now - 1;
        assert!(
            t.verify(&sign_with(&t, &old), audience::IDENTITY)
                .await
                .is_ok()
        );
        // Garbage and an unsigned token.
        assert!(matches!(
            t.verify("a.b.c", audience::IDENTITY).await,
            Err(TokenError::Malformed)
        ));
        let unsigned = format!("eyJhbGciOiJub25lIn0.{}.", parts[1]);
        assert!(t.verify(&unsigned, audience::IDENTITY).await.is_err());
    }

    #[tokio::test]
    async fn presented_tokens_are_read_not_trusted() {
        let t = tokens(7).await;
        let issued = t.issue(audience::IDENTITY, "dev", 60, None).expect("issue");
        let p = t
            .presented(&issued.token, audience::IDENTITY)
            .await
            .expect("read");
        assert_eq!(p.claims.jti, issued.claims.jti);
        assert_eq!(p.digest, digest(&issued.token));
        assert_eq!(p.digest.len(), 43);
        // A changed payload reads, but its digest is not the issued token's: the store refuses.
        let mut forged = issued.claims.clone();
        forged.sub = "someone-else".into();
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).expect("json"));
        let parts: Vec<&str> = issued.token.split('.').collect();
        let tampered = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        let p = t
            .presented(&tampered, audience::IDENTITY)
            .await
            .expect("read");
        assert_ne!(p.digest, digest(&issued.token));
        // Audience and expiry are checked without the store.
        assert!(matches!(
            t.presented(&issued.token, audience::CONNECTION).await,
            Err(TokenError::Invalid)
        ));
        let mut old = issued.claims.clone();
        old.exp = time::OffsetDateTime::now_utc().unix_timestamp() - LEEWAY_SECS as i64 - 5;
        assert!(matches!(
            t.presented(&sign_with(&t, &old), audience::IDENTITY).await,
            Err(TokenError::Expired)
        ));
        assert!(matches!(
            t.presented("a.b.c", audience::IDENTITY).await,
            Err(TokenError::Malformed)
        ));
        let long = "a".repeat(MAX_TOKEN_LEN + 1);
        assert!(matches!(
            t.presented(&long, audience::IDENTITY).await,
            Err(TokenError::Malformed)
        ));
    }
}
