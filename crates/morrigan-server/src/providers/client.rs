//! The client provider: `client.state` (persisted on the client record) and
//! `client.token.refresh` (a new identity token, recorded so that deprovisioning revokes it).

use async_trait::async_trait;
use morrigan_protocol::message::types;
use morrigan_protocol::time_format;
use serde_json::{Value, json};

use super::{HandlerError, MessageContext, Provider};
use crate::credentials::CredentialError;

/// Longest `client.state` value stored.
pub const MAX_STATE_LEN: usize = 128;

pub struct ClientProvider;

#[async_trait]
impl Provider for ClientProvider {
    fn name(&self) -> &str {
        "client"
    }
    fn messages(&self) -> Vec<String> {
        vec!["state".into(), "token.refresh".into()]
    }
    fn endpoints(&self) -> Vec<String> {
        [
            "POST /provision",
            "GET /",
            "GET /:clientId",
            "DELETE /:clientId",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
    fn functions(&self) -> Vec<String> {
        vec![crate::auth::functions::API.to_string()]
    }
    async fn handle(
        &self,
        ctx: &MessageContext,
        message: &str,
        body: Value,
    ) -> Result<Option<Value>, HandlerError> {
        match message {
            "state" => {
                let state = body
                    .get("state")
                    .and_then(Value::as_str)
                    .ok_or_else(|| HandlerError::Invalid("'state' must be a string".into()))?;
                if state.is_empty() || state.len() > MAX_STATE_LEN {
                    return Err(HandlerError::Invalid(format!(
                        "'state' must be 1-{MAX_STATE_LEN} bytes of UTF-8"
                    )));
                }
                tracing::info!(client = %ctx.client_id, state, "client reported state");
                if !ctx
                    .services
                    .store
                    .set_client_state(&ctx.client_id, state, &time_format::now())
                    .await?
                {
                    return Err(HandlerError::Invalid(
                        "client is no longer provisioned".into(),
                    ));
                }
                for hook in ctx.services.hooks.iter() {
                    hook.client_state(&ctx.connection_id, &ctx.client_id, state)
                        .await;
                }
                Ok(None)
            }
            "token.refresh" => {
                let services = &ctx.services;
                // The client may have been deprovisioned while connected: no new token then.
                if services.store.client(&ctx.client_id).await?.is_none() {
                    return Err(HandlerError::Invalid(
                        "client is no longer provisioned".into(),
                    ));
                }
                let issued =
                    services
                        .credentials
                        .refresh(&ctx.client_id)
                        .await
                        .map_err(|e| match e {
                            CredentialError::Store(e) => HandlerError::from(e),
                            other => HandlerError::Failed(other.to_string()),
                        })?;
                let expires = time::OffsetDateTime::from_unix_timestamp(issued.claims.exp)
                    .map(time_format::format)
                    .unwrap_or_default();
                tracing::info!(client = %ctx.client_id, jti = %issued.claims.jti, "identity token refreshed");
                Ok(Some(json!({
                    "type": types::CLIENT_TOKEN_ISSUE,
                    "token": issued.token,
                    "expires": expires,
                })))
            }
            _ => Err(HandlerError::UnknownMessage),
        }
    }
}
