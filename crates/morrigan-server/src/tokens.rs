//! Token issue and verification.
//!
//! Every token is an EdDSA (Ed25519) JWT. The header's `kid` names the issuing node's signing
//! key; its public half is in the store, so any node of a cluster verifies any node's tokens
//! (and `/.well-known/jwks.json` publishes them). Claims: `sub`, `iss` (node id), `aud` (the
//! token kind), `iat`, `exp`, `jti`, and `reportUrl` on connection tokens.
//!
//! A signature is necessary but not sufficient: user and identity tokens must also still have
//! their record (revocation deletes it), and connection tokens are consumed by
//! [`crate::store::Store::accept_connection`]. Those checks live with the callers.

use std::path::Path;
use std::sync::{Arc, RwLock};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use morrigan_protocol::api::{Claims, audience};
use std::collections::HashMap;

use crate::store::{SigningKeyRow, Store, StoreError};

/// Clock skew tolerated on `exp`/`iat`, in seconds. jsonwebtoken's default (60 s) would double
/// a 60-second connection token, so it is set explicitly.
pub const LEEWAY_SECS: u64 = 2;

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
    encoding: EncodingKey,
    public_key: [u8; 32],
    /// Verification keys by kid, filled from the store on a miss. Read-mostly.
    keys: RwLock<HashMap<String, Arc<DecodingKey>>>,
    store: Arc<dyn Store>,
    /// Counts issues and refusals (`morrigan_tokens_issued_total`, `..._token_refusals_total`).
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

/// A freshly issued token.
#[derive(Debug, Clone)]
pub struct Issued {
    pub token: String,
    pub claims: Claims,
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

fn kid_for(public_key: &[u8; 32]) -> String {
    URL_SAFE_NO_PAD.encode(&public_key[..12])
}

impl Tokens {
    /// Loads the node's signing key from `<data_dir>/signing-key.pem`, creating it (mode 0600)
    /// on first start, and publishes its public half in the store.
    pub async fn load_or_create(
        data_dir: &Path,
        node_id: &str,
        store: Arc<dyn Store>,
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
                crate::fsutil::write_private(&path, pem.as_bytes()).map_err(|source| {
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
        store: Arc<dyn Store>,
    ) -> Result<Self, KeyError> {
        let der = signing.to_pkcs8_der().map_err(|_| KeyError::Format {
            path: "<memory>".into(),
        })?;
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
        keys.insert(kid.clone(), Arc::new(DecodingKey::from_ed_der(&public_key)));
        Ok(Self {
            node_id: node_id.to_string(),
            kid,
            encoding: EncodingKey::from_ed_der(der.as_bytes()),
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
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &self.encoding)
            .map_err(|_| TokenError::Malformed)?;
        if let Some(m) = &self.metrics {
            m.token_issued(kind_label(aud));
        }
        Ok(Issued { token, claims })
    }

    async fn decoding_key(&self, kid: &str) -> Result<Arc<DecodingKey>, TokenError> {
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
        let key = Arc::new(DecodingKey::from_ed_der(&row.public_key));
        if let Ok(mut keys) = self.keys.write() {
            keys.insert(kid.to_string(), key.clone());
        }
        Ok(key)
    }

    /// Verifies signature, audience and expiry (with [`LEEWAY_SECS`]).
    pub async fn verify(&self, token: &str, aud: &str) -> Result<Claims, TokenError> {
        let result = self.verify_inner(token, aud).await;
        if let (Err(e), Some(m)) = (&result, &self.metrics) {
            m.token_refused(kind_label(aud), crate::metrics::token_error_reason(e));
        }
        result
    }

    async fn verify_inner(&self, token: &str, aud: &str) -> Result<Claims, TokenError> {
        if token.len() > 4096 {
            return Err(TokenError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::EdDSA {
            return Err(TokenError::Invalid);
        }
        let kid = header.kid.ok_or(TokenError::Malformed)?;
        let key = self.decoding_key(&kid).await?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = LEEWAY_SECS;
        validation.set_audience(&[aud]);
        validation.set_required_spec_claims(&["exp", "sub", "aud", "iss"]);
        match jsonwebtoken::decode::<Claims>(token, &key, &validation) {
            Ok(data) => Ok(data.claims),
            Err(e) => match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => Err(TokenError::Expired),
                jsonwebtoken::errors::ErrorKind::InvalidToken
                | jsonwebtoken::errors::ErrorKind::Base64(_)
                | jsonwebtoken::errors::ErrorKind::Json(_)
                | jsonwebtoken::errors::ErrorKind::Utf8(_) => Err(TokenError::Malformed),
                _ => Err(TokenError::Invalid),
            },
        }
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
