//! [`Endpoint`]: where and how to connect (provider URL, HTTP client with its connection pool,
//! TLS settings), and one attempt through it: token exchange, then the WebSocket upgrade.

use std::sync::Arc;
use std::time::Duration;

use morrigan_protocol::api::TokenResponse;
use morrigan_protocol::paths;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::Value;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use url::Url;

use super::{Connection, DEFAULT_TIMEOUT};
use crate::Error;
use crate::token::{check_token_shape, peek_claims, report_url_to_ws, token_label};

/// Where and how to connect: the provider URL plus HTTP and TLS settings.
///
/// Cheap to clone (the HTTP client and TLS configuration are shared); reuse one for many
/// connections so that HTTP keep-alive and TLS session resumption apply.
#[derive(Clone)]
pub struct Endpoint {
    provider_url: Url,
    http: reqwest::Client,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("provider_url", &self.provider_url.as_str())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// An endpoint that trusts the platform's root certificates.
    ///
    /// `provider_url` is the connection provider's root, e.g.
    /// `https://morrigan.example/api/core/connection`
    /// ([`paths::CONNECTION`](morrigan_protocol::paths::CONNECTION)); a URL without a path
    /// (`https://morrigan.example`) gets that path.
    pub fn new(provider_url: &str) -> Result<Self, Error> {
        Self::with_root_cas(provider_url, &[] as &[&[u8]])
    }

    /// An endpoint that also trusts the CA certificates in `root_ca_pems` (each a PEM bundle),
    /// for both HTTPS and WSS (a server with a private or self-signed CA).
    pub fn with_root_cas(
        provider_url: &str,
        root_ca_pems: &[impl AsRef<[u8]>],
    ) -> Result<Self, Error> {
        let mut provider_url = Url::parse(provider_url)
            .map_err(|e| Error::Config(format!("provider URL {provider_url:?}: {e}")))?;
        // A bare server URL means the standard mount point.
        if provider_url.path() == "/" {
            provider_url.set_path(paths::CONNECTION);
        }
        if !matches!(provider_url.scheme(), "http" | "https") {
            return Err(Error::Config(format!(
                "provider URL must be http or https, not {:?}",
                provider_url.scheme()
            )));
        }
        let mut roots = Vec::new();
        for pem in root_ca_pems {
            let certs = CertificateDer::pem_slice_iter(pem.as_ref())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::Config(format!("root CA PEM: {e}")))?;
            if certs.is_empty() {
                return Err(Error::Config("root CA PEM holds no certificate".into()));
            }
            roots.extend(certs);
        }
        let tls = Arc::new(tls_config(&roots)?);
        let http = reqwest::Client::builder()
            .tls_certs_merge(
                roots
                    .iter()
                    .map(|der| reqwest::Certificate::from_der(der))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| Error::Config(format!("root CA: {e}")))?,
            )
            .user_agent(concat!("morrigan-client/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
        Ok(Self {
            provider_url,
            http,
            tls,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Bounds each network step (default [`DEFAULT_TIMEOUT`]).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn provider_url(&self) -> &Url {
        &self.provider_url
    }

    /// Exchanges an identity token for a connection token (`POST <provider_url>`).
    ///
    /// The identity token goes raw in `Authorization` (the original server accepts nothing else)
    /// and in the body. Any content type is accepted: the original labels JSON `text/html`.
    /// 401/403 give [`Error::IdentityRejected`] (fatal); other statuses
    /// [`Error::ExchangeFailed`].
    pub async fn exchange_token(&self, identity_token: &str) -> Result<String, Error> {
        check_token_shape(identity_token)
            .map_err(|_| Error::Config("identity token is not a JWT".into()))?;
        let trace_id = format!("{:032x}", rand::random::<u128>());
        tracing::debug!(
            url = %self.provider_url, token = %token_label(identity_token), %trace_id,
            "requesting connection token"
        );
        let response = self
            .http
            .post(self.provider_url.clone())
            .header(header::AUTHORIZATION, identity_token)
            .json(&serde_json::json!({ "idtoken": identity_token, "traceId": trace_id }))
            .timeout(self.timeout)
            .send()
            .await?;
        let status = response.status().as_u16();
        let body = response.text().await?;
        match status {
            200 => {
                let parsed: TokenResponse = serde_json::from_str(&body).map_err(|e| {
                    Error::Protocol(format!(
                        "token exchange answer is not a token response: {e}"
                    ))
                })?;
                check_token_shape(&parsed.token)?;
                Ok(parsed.token)
            }
            401 | 403 => {
                let (state, reason) = error_body(&body);
                Err(Error::IdentityRejected {
                    status,
                    state,
                    reason,
                })
            }
            _ => Err(Error::ExchangeFailed {
                status,
                reason: error_body(&body).1,
            }),
        }
    }

    /// Exchanges the identity token, opens the WebSocket and waits for `accepted`.
    pub async fn connect(&self, identity_token: &str) -> Result<Connection, Error> {
        let connection_token = self.exchange_token(identity_token).await?;
        self.connect_with_token(&connection_token).await
    }

    /// Opens the WebSocket with a connection token already obtained, and waits for `accepted`.
    pub async fn connect_with_token(&self, connection_token: &str) -> Result<Connection, Error> {
        let label = token_label(connection_token);
        let report_url = peek_claims(connection_token)?
            .report_url
            .ok_or_else(|| Error::Protocol("connection token has no reportUrl".into()))?;
        let url = report_url_to_ws(&report_url)?;
        if self.provider_url.scheme() == "https" && url.scheme() == "ws" {
            tracing::warn!(%url, "server told an HTTPS client to connect without TLS");
        }
        let mut request = url.as_str().into_client_request()?;
        let origin = HeaderValue::from_str(connection_token)
            .map_err(|_| Error::Protocol("connection token is not a valid header value".into()))?;
        request.headers_mut().insert(header::ORIGIN, origin);
        let config = WebSocketConfig::default()
            .read_buffer_size(16 * 1024)
            .write_buffer_size(0)
            .max_message_size(Some(16 << 20));
        tracing::debug!(%url, token = %label, "opening WebSocket");
        let handshake = tokio_tungstenite::connect_async_tls_with_config(
            request,
            Some(config),
            true,
            Some(tokio_tungstenite::Connector::Rustls(self.tls.clone())),
        );
        let ws = match tokio::time::timeout(self.timeout, handshake).await {
            Err(_) => return Err(Error::Timeout("WebSocket handshake")),
            Ok(Err(tungstenite::Error::Http(response))) => {
                let status = response.status().as_u16();
                let body = response.body().as_deref().unwrap_or_default();
                let reason = error_body(&String::from_utf8_lossy(body)).1;
                return Err(Error::UpgradeRefused { status, reason });
            }
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok((ws, _response))) => ws,
        };
        Connection::accept(ws, url, self.timeout).await
    }
}

/// Connects once, without retries: token exchange, WebSocket, `accepted`.
///
/// For tools and load generators. For a device, use [`Client`](crate::Client), which reconnects,
/// refreshes the identity token and dispatches messages.
pub async fn connect_once(provider_url: &str, identity_token: &str) -> Result<Connection, Error> {
    Endpoint::new(provider_url)?.connect(identity_token).await
}

fn tls_config(extra_roots: &[CertificateDer<'static>]) -> Result<rustls::ClientConfig, Error> {
    // An explicit provider rather than the process default: the application may not install one,
    // and another dependency enabling `ring` would make the default ambiguous.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = if extra_roots.is_empty() {
        rustls_platform_verifier::Verifier::new(provider.clone())
    } else {
        rustls_platform_verifier::Verifier::new_with_extra_roots(
            extra_roots.iter().cloned(),
            provider.clone(),
        )
    }
    .map_err(|e| Error::Config(format!("TLS verifier: {e}")))?;
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

/// `(state, reason)` of an error body `{"state","status"?,"reason"}`; a non-JSON body (a proxy's
/// error page) becomes a short excerpt.
fn error_body(body: &str) -> (String, String) {
    let field = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    match serde_json::from_str::<Value>(body) {
        Ok(v) => {
            let state = field(&v, "state")
                .or_else(|| field(&v, "status"))
                .unwrap_or_default();
            let reason = field(&v, "reason").unwrap_or_default();
            (state, reason)
        }
        Err(_) => (String::new(), body.chars().take(200).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_of_both_servers() {
        let (state, reason) = error_body(
            r#"{"state":"authenticationfailed","status":"noRecordError","reason":"No record"}"#,
        );
        assert_eq!(
            (state.as_str(), reason.as_str()),
            ("authenticationfailed", "No record")
        );
        let (state, _) = error_body(r#"{"status":"failed","reason":"x"}"#);
        assert_eq!(state, "failed");
        let (_, reason) = error_body("<html>Bad Gateway</html>");
        assert_eq!(reason, "<html>Bad Gateway</html>");
    }

    #[test]
    fn endpoint_checks_its_configuration() {
        assert!(matches!(Endpoint::new("not a url"), Err(Error::Config(_))));
        assert!(matches!(Endpoint::new("ws://h/x"), Err(Error::Config(_))));
        assert!(matches!(
            Endpoint::with_root_cas("http://h/x", &["not pem"]),
            Err(Error::Config(_))
        ));
        let custom = Endpoint::new("http://127.0.0.1:1/custom/mount").unwrap();
        assert_eq!(custom.provider_url().path(), "/custom/mount");
        let bare = Endpoint::new("https://h:8443").unwrap();
        assert_eq!(
            bare.provider_url().as_str(),
            "https://h:8443/api/core/connection"
        );
    }
}
